use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::connection::EtcdArgs;
use coord::{labels, presence};

#[derive(Debug, Args)]
pub struct AgentsArgs {
    /// Print JSON, one object per agent, for scripts.
    #[arg(long)]
    json: bool,
    /// Only the agents whose labels match, like `zone=eu-1,role!=canary`.
    #[arg(long, value_name = "SELECTOR")]
    select: Option<labels::Selector>,
    #[command(flatten)]
    etcd: EtcdArgs,
}

pub async fn agents(args: AgentsArgs) -> anyhow::Result<ExitCode> {
    let (client, namespace) = args.etcd.connect().await?;
    let agents = presence::list(&client, &namespace).await.with_context(|| {
        format!(
            "failed to list agents under `{}`",
            presence::prefix(&namespace)
        )
    })?;
    let agents: Vec<_> = agents
        .into_iter()
        .filter(|a| match (&args.select, &a.record) {
            (None, _) => true,
            (Some(s), Some(r)) => s.matches(&r.labels),
            (Some(s), None) => s.matches(&labels::Labels::new()),
        })
        .collect();
    if args.json {
        for a in &agents {
            let line = serde_json::json!({
                "name": a.name,
                "lease": a.lease.map(|l| l.to_string()),
                "record": a.record,
            });
            println!("{line}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if agents.is_empty() {
        match &args.select {
            Some(s) => println!("no agents under {} match {s}", presence::prefix(&namespace)),
            None => println!("no agents under {}", presence::prefix(&namespace)),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let width = agents
        .iter()
        .map(|a| a.name.len())
        .max()
        .unwrap_or(0)
        .max(5);
    println!(
        "{:width$}  {:10}  {:20}  {:16}  {:16}  LABELS",
        "AGENT", "VERSION", "STARTED", "MANIFEST SHA256", "LEASE"
    );
    for a in &agents {
        let (version, started, hash, shown) = match &a.record {
            Some(r) => (
                r.version.as_str(),
                r.started_at.as_str(),
                r.manifest_hash.get(..16).unwrap_or(&r.manifest_hash),
                labels::show(&r.labels),
            ),
            None => ("?", "?", "?", String::new()),
        };
        let lease = a.lease.map_or_else(|| "-".to_owned(), |l| l.to_string());
        println!(
            "{:width$}  {version:10}  {started:20}  {hash:16}  {lease:16}  {}",
            a.name,
            if shown.is_empty() { "-" } else { &shown }
        );
    }
    Ok(ExitCode::SUCCESS)
}
