use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;

use coord::agent::files::{Renderer, WriteOutcome, write};
use coord::agent::hooks::HookRunner;
use coord::agent::manifest::{Manifest, Runner};
use coord::etcd::{Client, ReadSet};

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
    // Hooks read only what the manifest lets them; templates read what
    // they ask for, each at one revision.
    let mut hook_reads = ReadSet::default();
    for prefix in manifest.wasm_read_prefixes() {
        hook_reads.add_prefix(&prefix);
    }
    let snapshot = client.read(&hook_reads, None).await.with_context(|| {
        format!(
            "failed to read what the hooks may read from etcd at {}",
            opts.endpoints.join(",")
        )
    })?;
    let m = manifest.clone();
    let keys = Arc::new(snapshot.clone());
    let hooks =
        tokio::task::spawn_blocking(move || HookRunner::for_manifest(&m, keys, Runner::OneShot))
            .await??;
    let mut renderer = Renderer::new(&manifest.agent.namespace).with_agent(&manifest.agent.name);
    let mut failed = 0;
    for spec in &manifest.files {
        let path = spec.path.display();
        let rendered = renderer
            .render(spec, &client, &ReadSet::default(), None, None)
            .await;
        let content = match rendered.result {
            Ok(c) => c,
            Err(e) => {
                println!("failed     {path}: {e}");
                failed += 1;
                continue;
            }
        };
        if args.dry_run {
            let old = std::fs::read(&spec.path).unwrap_or_default();
            let old = String::from_utf8_lossy(&old);
            let new = String::from_utf8_lossy(&content);
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
        match write(spec, &content, Some(&hooks)).await {
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
