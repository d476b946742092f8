use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::connection::EtcdArgs;
use coord::presence;

#[derive(Debug, Args)]
pub struct AgentsArgs {
    /// Print JSON, one object per agent, for scripts.
    #[arg(long)]
    json: bool,
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
        println!("no agents under {}", presence::prefix(&namespace));
        return Ok(ExitCode::SUCCESS);
    }
    let width = agents
        .iter()
        .map(|a| a.name.len())
        .max()
        .unwrap_or(0)
        .max(5);
    println!(
        "{:width$}  {:10}  {:20}  {:16}  LEASE",
        "AGENT", "VERSION", "STARTED", "MANIFEST SHA256"
    );
    for a in &agents {
        let (version, started, hash) = match &a.record {
            Some(r) => (
                r.version.as_str(),
                r.started_at.as_str(),
                r.manifest_hash.get(..16).unwrap_or(&r.manifest_hash),
            ),
            None => ("?", "?", "?"),
        };
        let lease = a.lease.map_or_else(|| "-".to_owned(), |l| l.to_string());
        println!(
            "{:width$}  {version:10}  {started:20}  {hash:16}  {lease}",
            a.name
        );
    }
    Ok(ExitCode::SUCCESS)
}
