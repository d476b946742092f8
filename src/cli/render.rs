use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;

use coord::agent::files::{Renderer, WriteOutcome, write};
use coord::agent::hooks::HookRunner;
use coord::agent::manifest::Manifest;
use coord::etcd::{Cache, Client};

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// The manifest whose [[file]]s to render.
    #[arg(value_name = "FILE")]
    manifest: PathBuf,
    /// Render every file once (checks and validate hooks included, no
    /// on_change hooks) and exit non-zero if any failed: for init
    /// containers and CI.
    #[arg(long, conflicts_with = "dry_run")]
    once: bool,
    /// Print a unified diff of what each file would become; write nothing.
    #[arg(long)]
    dry_run: bool,
}

pub async fn render(args: RenderArgs) -> anyhow::Result<ExitCode> {
    if !args.once && !args.dry_run {
        bail!("say --once to render the files or --dry-run to see what would change");
    }
    let manifest = Manifest::load(&args.manifest)?;
    if manifest.files.is_empty() {
        println!("{}: no [[file]] to render", args.manifest.display());
        return Ok(ExitCode::SUCCESS);
    }
    let opts = manifest.connect_options()?;
    let client = Client::connect(&opts)
        .await
        .with_context(|| format!("failed to connect to etcd at {}", opts.endpoints.join(",")))?;
    let cache = Cache::new(client);
    let sub = cache.subscribe("");
    let wait = opts.request_timeout * 3;
    tokio::time::timeout(wait, sub.ready())
        .await
        .with_context(|| {
            format!(
                "etcd at {} did not answer within {}",
                opts.endpoints.join(","),
                humantime::format_duration(wait)
            )
        })?;
    let snapshot = sub.snapshot();
    let m = manifest.clone();
    let keys = Arc::new(snapshot.clone());
    let hooks = tokio::task::spawn_blocking(move || HookRunner::for_manifest(&m, keys)).await??;
    let mut renderer = Renderer::new(&manifest.agent.namespace).with_agent(&manifest.agent.name);
    let mut failed = 0;
    for spec in &manifest.files {
        let path = spec.path.display();
        let rendered = match renderer.render(spec, &snapshot, None) {
            Ok(r) => r,
            Err(e) => {
                println!("failed     {path}: {e}");
                failed += 1;
                continue;
            }
        };
        if args.dry_run {
            let old = std::fs::read(&spec.path).unwrap_or_default();
            let old = String::from_utf8_lossy(&old);
            let new = String::from_utf8_lossy(&rendered.content);
            if old == new {
                println!("unchanged  {path}");
            } else {
                let diff = similar::TextDiff::from_lines(old.as_ref(), new.as_ref());
                print!(
                    "{}",
                    diff.unified_diff().header(
                        &format!("{path}"),
                        &format!("{path} (rendered at revision {})", rendered.revision)
                    )
                );
            }
            continue;
        }
        match write(spec, &rendered.content, Some(&hooks)).await {
            Ok(WriteOutcome::Unchanged) => println!("unchanged  {path}"),
            Ok(WriteOutcome::Replaced { .. }) => println!("replaced   {path}"),
            Err(e) => {
                println!("failed     {path}: {e}");
                failed += 1;
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "error: {failed} file{} failed",
            if failed == 1 { "" } else { "s" }
        );
        ExitCode::FAILURE
    })
}
