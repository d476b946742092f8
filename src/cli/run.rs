use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use coord::agent::manifest::Manifest;
use coord::agent::{self, Control, ReloadRequest, RunOptions};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The manifest to run.
    #[arg(value_name = "FILE")]
    manifest: PathBuf,
    /// Do not watch the manifest for changes (SIGHUP still reloads).
    #[arg(long)]
    no_watch: bool,
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let manifest = Manifest::load(&args.manifest)?;
    let opts = RunOptions {
        endpoints: None,
        watch_manifest: !args.no_watch,
    };
    run_agent(manifest, opts).await
}

/// Runs the agent with the process's signals wired to it: the first
/// SIGINT/SIGTERM stops it cleanly (lease revoked), a second exits at once;
/// SIGHUP reloads the manifest.
pub async fn run_agent(manifest: Manifest, opts: RunOptions) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    let (reload_tx, reload) = mpsc::channel(4);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        info!("Stopping; a second signal exits at once.");
        stop.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        warn!("Second signal; exiting without cleanup.");
        std::process::exit(130);
    });
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            info!("SIGHUP received; reloading the manifest.");
            if reload_tx.send(ReloadRequest::Signal).await.is_err() {
                return;
            }
        }
    });
    agent::run(manifest, opts, Control { shutdown, reload }).await?;
    Ok(ExitCode::SUCCESS)
}
