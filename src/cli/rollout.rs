//! `coord rollout` and `coord kv set --stage`: staged rollouts of one key.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;

use super::connection::EtcdArgs;
use coord::etcd::Client;
use coord::labels::Selector;
use coord::presence;
use coord::rollout::{self, Report, Rollout, RolloutError};
use std::collections::{BTreeMap, BTreeSet};

/// Exit status when a rollout is refused: one is staged already, none is,
/// or the key moved since staging (nothing was written).
pub const EXIT_REFUSED: u8 = 3;

#[derive(Debug, Args)]
#[command(
    after_help = "Exit status: 0 done, 1 error, 3 refused (a rollout of the key is already staged, none is, or the key changed since staging; nothing written)."
)]
pub struct RolloutArgs {
    #[command(subcommand)]
    command: RolloutCommand,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    etcd: EtcdArgs,
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Show the staged rollout of KEY: its value, selector and agents.
    Status {
        /// The staged key, as given to `coord kv set --stage`.
        #[arg(id = "KEY", value_name = "KEY")]
        key: String,
    },
    /// Write the staged value for everyone (only if KEY has not changed
    /// since staging) and end the rollout.
    Promote {
        /// The staged key, as given to `coord kv set --stage`.
        #[arg(id = "KEY", value_name = "KEY")]
        key: String,
    },
    /// End the rollout without writing: the staged agents go back to the
    /// current value.
    Abort {
        /// The staged key, as given to `coord kv set --stage`.
        #[arg(id = "KEY", value_name = "KEY")]
        key: String,
    },
}

/// Exit 3 for a refusal, the error otherwise.
fn finish(result: Result<ExitCode, anyhow::Error>) -> anyhow::Result<ExitCode> {
    match result {
        Err(e) if e.downcast_ref::<RolloutError>().is_some_and(refused) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(EXIT_REFUSED))
        }
        other => other,
    }
}

fn refused(e: &RolloutError) -> bool {
    matches!(
        e,
        RolloutError::AlreadyStaged { .. }
            | RolloutError::NotStaged { .. }
            | RolloutError::KeyMoved { .. }
    )
}

fn show(r: &Rollout, json: bool, what: &str) {
    if json {
        println!(
            "{}",
            json!({"key": r.key, "state": what, "value": r.value, "selector": r.selector, "agents": r.agents, "base_version": r.base_version, "staged_at": r.staged_at})
        );
    } else {
        println!(
            "{what} {} to {} agent{} ({}): {}",
            r.key,
            r.agents.len(),
            if r.agents.len() == 1 { "" } else { "s" },
            r.selector,
            r.agents.join(", ")
        );
    }
}

/// A staged rollout and each staged agent's report; `absent`: the staged
/// agents with no presence record.
fn show_status(
    r: &Rollout,
    reports: &BTreeMap<String, Report>,
    absent: &BTreeSet<String>,
    json: bool,
) {
    if json {
        println!(
            "{}",
            json!({"key": r.key, "state": "staged", "value": r.value, "selector": r.selector, "agents": r.agents, "base_version": r.base_version, "staged_at": r.staged_at, "soak_ms": r.soak_ms, "auto": r.auto, "reports": reports, "absent": absent})
        );
        return;
    }
    show(r, false, "staged");
    if r.auto || r.soak_ms > 0 {
        println!(
            "  soak {}{}",
            humantime::format_duration(std::time::Duration::from_millis(r.soak_ms)),
            if r.auto {
                ", promoted or aborted by itself"
            } else {
                ""
            }
        );
    }
    for agent in &r.agents {
        let report = match reports.get(agent) {
            None => None,
            Some(rep) if rep.unaffected => {
                Some("not affected (none of its files reads the key)".to_owned())
            }
            Some(rep) => Some(report_line(rep)),
        };
        let line = match (absent.contains(agent), report) {
            (false, Some(line)) => line,
            (false, None) => "no report yet".to_owned(),
            (true, None) => "absent (no agent of that name runs; not waited for)".to_owned(),
            (true, Some(line)) => {
                format!("absent (no agent of that name runs; not waited for); last report: {line}")
            }
        };
        println!("  {agent}  {line}");
    }
}

/// One agent's report: render, check, hooks, services.
fn report_line(rep: &Report) -> String {
    let hooks = match rep.hooks {
        None if !(rep.rendered && rep.checked) => "hooks not run",
        None => "hooks running",
        Some(true) => "hooks passed",
        Some(false) => "hooks failed",
    };
    let mut line = format!(
        "{}, {}, {hooks}",
        if rep.rendered {
            "rendered"
        } else {
            "render failed"
        },
        if rep.checked {
            "check passed"
        } else {
            "check failed"
        },
    );
    if !rep.services.is_empty() {
        let services: Vec<String> = rep
            .services
            .iter()
            .map(|(instance, health)| format!("{instance} {}", health.name()))
            .collect();
        line.push_str(&format!(", services: {}", services.join(", ")));
    }
    if let Some(e) = &rep.error {
        line.push_str(&format!(": {e}"));
    }
    line
}

/// `--soak` and `--auto`.
#[derive(Debug, Clone, Copy)]
pub struct How {
    pub soak: std::time::Duration,
    pub auto: bool,
}

/// `coord kv set KEY VALUE --stage SELECTOR`.
pub async fn stage(
    client: &Client,
    namespace: &str,
    key: &str,
    raw: Vec<u8>,
    selector: &Selector,
    how: How,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let result = async {
        let value = String::from_utf8(raw).map_err(|_| {
            anyhow::anyhow!(
                "refused to stage `{key}`: a staged value must be UTF-8 text; nothing was written"
            )
        })?;
        let agents: Vec<String> = presence::list(client, namespace)
            .await
            .with_context(|| {
                format!(
                    "failed to list agents under `{}`",
                    presence::prefix(namespace)
                )
            })?
            .into_iter()
            .filter(|a| {
                a.record
                    .as_ref()
                    .is_some_and(|r| selector.matches(&r.labels))
            })
            .map(|a| a.name)
            .collect();
        if agents.is_empty() {
            anyhow::bail!(
                "refused to stage `{key}`: no agent matches `{selector}`; nothing was written"
            );
        }
        let base_version = client
            .get(key)
            .await
            .with_context(|| format!("failed to read `{key}`"))?
            .map_or(0, |kv| kv.version);
        let r = Rollout {
            key: key.to_owned(),
            value,
            selector: selector.to_string(),
            agents,
            base_version,
            staged_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            soak_ms: how.soak.as_millis() as u64,
            auto: how.auto,
        };
        rollout::stage(client, namespace, &r).await?;
        show(&r, json, "staged");
        Ok(ExitCode::SUCCESS)
    }
    .await;
    finish(result)
}

pub async fn rollout(args: RolloutArgs) -> anyhow::Result<ExitCode> {
    let (client, namespace) = args.etcd.connect().await?;
    let json = args.json;
    let result = async {
        match args.command {
            RolloutCommand::Status { key } => {
                let Some(staged) = rollout::staged(&client, &namespace, &key).await? else {
                    Err(RolloutError::NotStaged { key })?
                };
                let reports = rollout::reports(&client, &namespace, &key, staged.id).await?;
                let absent =
                    rollout::absent(&client, &namespace, &key, &staged.rollout.agents).await?;
                show_status(&staged.rollout, &reports, &absent, json);
            }
            RolloutCommand::Promote { key } => {
                let r = rollout::promote(&client, &namespace, &key).await?;
                show(&r, json, "promoted");
            }
            RolloutCommand::Abort { key } => {
                let r = rollout::abort(&client, &namespace, &key).await?;
                show(&r, json, "aborted");
            }
        }
        Ok(ExitCode::SUCCESS)
    }
    .await;
    finish(result)
}
