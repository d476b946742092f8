use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use coord::agent::RunOptions;
use coord::agent::manifest::Manifest;
use coord::etcd::local::{LocalEtcd, etcd_binary};

#[derive(Debug, Args)]
pub struct DevArgs {
    /// The manifest to run (its [etcd] endpoints are replaced by the local etcd).
    #[arg(value_name = "FILE", default_value = "agent.toml.example")]
    manifest: PathBuf,
    /// Where the local etcd keeps its data between runs.
    #[arg(long, default_value = ".coord-dev")]
    data_dir: PathBuf,
}

pub async fn dev(args: DevArgs, stderr: &super::Stderr) -> anyhow::Result<ExitCode> {
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
