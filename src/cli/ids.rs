use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::bail;
use clap::{Args, Subcommand};

use super::connection::EtcdArgs;
use super::errors::{NoAnswer, reach_wait, within};
use coord::agent::hold::{Ended, Held, HoldError};
use coord::agent::manifest::host_name;
use coord::agent::supervise::max_grace;
use coord::etcd::Session;
use coord::ids::{self, ClaimRecord};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct IdsArgs {
    #[command(subcommand)]
    claim: Option<ClaimCommand>,
    /// The pool to list.
    pool: Option<String>,
    /// Print JSON, one object per id.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    etcd: EtcdArgs,
}

#[derive(Debug, Subcommand)]
enum ClaimCommand {
    /// Run a command with a unique id from the pool in COORD_INSTANCE_ID;
    /// the id is released when it ends, and the command is stopped if the
    /// claim is lost.
    Claim(ClaimArgs),
}

#[derive(Debug, Args)]
struct ClaimArgs {
    /// The pool to claim from (`<namespace>/ids/<pool>/` in etcd).
    pool: String,
    /// Ids are 0..size. Must match the pool's size, stored by its first
    /// claimer (agents' `[[instance_id]]` included).
    #[arg(long)]
    size: u32,
    /// Session lease TTL: how long the id outlives this process if it dies.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    ttl: Duration,
    /// Wait for a free id if the pool is full, instead of failing (exit 75).
    #[arg(long)]
    wait: bool,
    /// The command to run with the id, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
}

/// Why no id was claimed.
#[derive(Debug)]
enum ClaimError {
    Id(ids::IdError),
    NoAnswer(NoAnswer),
}

pub async fn ids(args: IdsArgs) -> anyhow::Result<ExitCode> {
    if let Some(ClaimCommand::Claim(c)) = args.claim {
        return claim(c).await;
    }
    let Some(pool) = args.pool else {
        bail!("name a pool: coord ids POOL, or coord ids claim POOL --size N -- CMD");
    };
    let (client, namespace) = args.etcd.connect().await?;
    let all = ids::list(&client, &namespace, &pool).await?;
    if all.is_empty() && !args.json {
        println!("no ids claimed in pool `{pool}`");
        return Ok(ExitCode::SUCCESS);
    }
    if !args.json {
        println!("{:>6}  {:24}  {:>10}  GENERATION", "ID", "AGENT", "AGE");
    }
    for (id, kv) in all {
        let record: Option<ClaimRecord> = serde_json::from_slice(&kv.value).ok();
        let agent = record.as_ref().map_or("?", |r| r.agent.as_str()).to_owned();
        let age = record
            .as_ref()
            .and_then(|r| humantime::parse_rfc3339(&r.claimed_at).ok())
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string())
            .unwrap_or_else(|| "?".into());
        if args.json {
            println!(
                "{}",
                serde_json::json!({"id": id, "agent": agent, "age": age, "generation": kv.create_revision})
            );
        } else {
            println!("{id:>6}  {agent:24}  {age:>10}  {}", kv.create_revision);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn claim(args: ClaimArgs) -> anyhow::Result<ExitCode> {
    if args.ttl < Duration::from_secs(2) || args.ttl.subsec_nanos() != 0 {
        bail!("--ttl must be whole seconds, at least 2s (etcd leases count seconds)");
    }
    let (client, namespace) = args.etcd.connect().await?;
    let session = Session::start(client.clone(), args.ttl);
    let me = ClaimRecord {
        agent: format!("coord-ids@{}", host_name()),
        claimed_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    };
    let take = async {
        // Bounded, so an etcd that does not answer ends the command.
        let lease = within(
            &client,
            "no session lease was granted",
            reach_wait(&client),
            session.wait_alive(),
        )
        .await
        .map_err(ClaimError::NoAnswer)?;
        if args.wait {
            ids::claim_waiting(&client, &namespace, &args.pool, args.size, lease, None, &me).await
        } else {
            ids::claim(&client, &namespace, &args.pool, args.size, lease, None, &me).await
        }
        .map_err(ClaimError::Id)
    };
    let grace = max_grace(args.ttl).min(Duration::from_secs(2));
    let held = super::hold_for_command(&client, &session, &args.command, grace, take).await?;
    session.close().await;
    Ok(match held {
        Err(HoldError::Claim(None)) => ExitCode::from(143),
        Err(HoldError::Claim(Some(ClaimError::Id(e @ ids::IdError::Exhausted { .. })))) => {
            eprintln!("coord ids: {e} (use --wait to wait for one)");
            ExitCode::from(75)
        }
        Err(HoldError::Claim(Some(ClaimError::Id(e)))) => return Err(e.into()),
        Err(HoldError::Claim(Some(ClaimError::NoAnswer(e)))) => return Err(e.into()),
        Err(HoldError::Supervisor(e)) => {
            return Err(anyhow::Error::new(e).context(format!(
                "cannot start `{}` under a supervisor",
                args.command[0]
            )));
        }
        Ok(Held::Released { last, .. }) => match last {
            Some(Ended::Exited(code)) => ExitCode::from(code.clamp(0, 255) as u8),
            _ => ExitCode::from(143),
        },
        Ok(Held::Lost { claim }) => {
            eprintln!(
                "coord ids: the claim on id {} was lost; the command was stopped",
                claim.id
            );
            ExitCode::from(75)
        }
    })
}
