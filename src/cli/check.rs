use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use coord::agent::files::Renderer;
use coord::agent::hooks::HookRunner;
use coord::agent::manifest::{FileSource, Location, Manifest, Problem, Runner, Step};

use super::EXIT_USAGE;

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The manifest to validate.
    #[arg(value_name = "FILE")]
    manifest: PathBuf,
    /// Check the manifest alone, not what this host has (templates,
    /// credential files, directories, WASM plugins): for a manifest meant
    /// for another host, checked in CI.
    #[arg(long)]
    manifest_only: bool,
}

/// Validates the manifest, then what would fail at run time on this host;
/// every problem at once, located, exit 64 when there is one.
pub async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let manifest = Manifest::load(&args.manifest)?;
    if !args.manifest_only {
        let mut report = manifest.host_report();
        report.errors.extend(template_problems(&manifest));
        let m = manifest.clone();
        let plugins =
            tokio::task::spawn_blocking(move || HookRunner::plugin_problems(&m, Runner::OneShot))
                .await?;
        for e in plugins {
            let location = match manifest.hooks.iter().position(|h| h.name == e.hook()) {
                Some(i) => manifest.locate(&[Step::Key("hook"), Step::Item(i), Step::Key("wasm")]),
                None => Location { line: 1, column: 1 },
            };
            report.errors.push(Problem {
                file: manifest.path.clone(),
                location,
                message: e.to_string(),
            });
        }
        for warning in &report.warnings {
            eprintln!("{}", warning.show("warning"));
        }
        if !report.errors.is_empty() {
            report.errors.sort();
            for error in &report.errors {
                eprintln!("{}", error.show("error"));
            }
            let n = report.errors.len();
            eprintln!(
                "error: {n} problem{} would fail at run time on this host",
                if n == 1 { "" } else { "s" }
            );
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    }
    println!("{}", manifest.summary());
    Ok(ExitCode::SUCCESS)
}

/// Every template that would not render whatever etcd holds: a syntax
/// error or an unknown function, located in the template file (or, for an
/// inline `source`, in the manifest).
fn template_problems(manifest: &Manifest) -> Vec<Problem> {
    let renderer = Renderer::new(&manifest.agent.namespace);
    let mut out = Vec::new();
    for (i, spec) in manifest.files.iter().enumerate() {
        match &spec.source {
            FileSource::Template(template) => {
                // An unreadable template is in the host report.
                let Ok(text) = std::fs::read_to_string(template) else {
                    continue;
                };
                for p in renderer.check_template(&text) {
                    out.push(Problem {
                        file: template.clone(),
                        location: Location {
                            line: p.line,
                            column: p.column,
                        },
                        message: format!(
                            "{} (the template of [[file]] `{}`)",
                            p.message,
                            spec.path.display()
                        ),
                    });
                }
            }
            FileSource::Inline(text) => {
                let at = manifest.locate(&[Step::Key("file"), Step::Item(i), Step::Key("source")]);
                for p in renderer.check_template(text) {
                    out.push(Problem {
                        file: manifest.path.clone(),
                        location: at,
                        message: format!(
                            "[[file]] `{}`: line {} of its `source`: {}",
                            spec.path.display(),
                            p.line,
                            p.message
                        ),
                    });
                }
            }
            FileSource::Key(_) | FileSource::Prefix { .. } => {}
        }
    }
    out
}
