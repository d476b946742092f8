use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use coord::agent::hooks::HookRunner;
use coord::agent::manifest::{Location, Manifest, ManifestError};
use coord::etcd::CacheSnapshot;

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The manifest to validate.
    #[arg(value_name = "FILE")]
    manifest: PathBuf,
}

pub async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let manifest = Manifest::load(&args.manifest)?;
    load_hooks(&manifest).await?;
    // The manifest is good; what the host lacks does not make it bad.
    for warning in manifest.host_warnings() {
        eprintln!("{warning}");
    }
    println!("{}", manifest.summary());
    Ok(ExitCode::SUCCESS)
}

/// Loads every hook as the agent would (WASM components compiled and
/// checked against their world), reporting a failure at the hook's place
/// in the manifest.
pub async fn load_hooks(manifest: &Manifest) -> anyhow::Result<HookRunner> {
    let m = manifest.clone();
    let built = tokio::task::spawn_blocking(move || {
        HookRunner::for_manifest(&m, Arc::new(CacheSnapshot::default()))
    })
    .await?;
    built.map_err(|e| {
        let location = manifest
            .hook(e.hook())
            .map_or(Location { line: 1, column: 1 }, |h| h.location);
        ManifestError::at(&manifest.path, location, e.to_string()).into()
    })
}
