use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use coord::agent::RunOptions;
use coord::agent::manifest::Manifest;
use coord::etcd::local::{LocalEtcd, etcd_binary};

#[derive(Debug, Args)]
pub struct DevArgs {
    /// The manifest to run (its [etcd] endpoints are replaced by the local
    /// etcd); by default `agent.toml.example` in the current directory.
    #[arg(value_name = "FILE", default_value = DEFAULT_MANIFEST)]
    manifest: PathBuf,
    /// Where the local etcd keeps its data between runs.
    #[arg(long, default_value = ".coord-dev")]
    data_dir: PathBuf,
}

/// What `coord dev` runs when given no manifest: the example at the root
/// of a coord checkout.
const DEFAULT_MANIFEST: &str = "agent.toml.example";

pub async fn dev(args: DevArgs, stderr: &super::Stderr) -> anyhow::Result<ExitCode> {
    if args.manifest.as_os_str() == DEFAULT_MANIFEST && !args.manifest.exists() {
        let here = std::env::current_dir().map_or_else(|_| ".".into(), |d| d.display().to_string());
        anyhow::bail!(
            "coord dev runs `{DEFAULT_MANIFEST}` when given no manifest, and there is none in {here}; \
             run it from a coord checkout, or name a manifest: coord dev FILE"
        );
    }
    // Validate first: a typo should not cost an etcd start.
    let manifest = Manifest::load(&args.manifest)?;
    let bin = etcd_binary()?;
    stderr.say(format_args!(
        "coord dev: starting etcd ({}) with its data in {}",
        bin.display(),
        args.data_dir.display()
    ));
    let etcd = LocalEtcd::start_in(&args.data_dir)
        .await
        .context("failed to start the local etcd")?;
    let endpoint = etcd.endpoint();
    stderr.say(format_args!("coord dev: etcd is up at {endpoint}"));
    stderr.say(format_args!(
        "coord dev: running the agent on {}; Ctrl-C stops both",
        args.manifest.display()
    ));
    stderr.say(format_args!(
        "coord dev: in another terminal try: coord agents --endpoints {endpoint}"
    ));
    let opts = RunOptions {
        endpoints: Some(vec![endpoint]),
        watch_manifest: true,
    };
    let code = super::run::run_agent(manifest, opts).await?;
    drop(etcd);
    stderr.say(format_args!(
        "coord dev: etcd stopped; its data stays in {}",
        args.data_dir.display()
    ));
    Ok(code)
}
