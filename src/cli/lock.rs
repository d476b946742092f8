use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use tracing::warn;

use super::connection::EtcdArgs;
use coord::agent::manifest::host_name;
use coord::agent::supervise::{Ended, Supervised, max_grace, run_guarded, supervise};
use coord::etcd::Session;
use coord::lock::{self, Holder, Mode};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    Mutex,
    Semaphore,
    Read,
    Write,
}

#[derive(Debug, Args)]
pub struct LockArgs {
    /// The lock's name (`<namespace>/locks/<name>` in etcd, as `etcdctl lock` uses).
    name: String,
    #[arg(long, value_enum, default_value = "mutex")]
    mode: ModeArg,
    /// Holders a semaphore admits.
    #[arg(long, required_if_eq("mode", "semaphore"))]
    limit: Option<u32>,
    /// Session lease TTL: how long the lock outlives this process if it dies.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    ttl: Duration,
    /// Give up if the lock is not ours within this time (exit 75).
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Time between TERM and KILL when the command must stop.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    grace: Duration,
    /// The command to run while holding the lock.
    #[arg(last = true, required = true)]
    command: Vec<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
}

/// Exit status when `--timeout` ran out (EX_TEMPFAIL).
const EXIT_TIMEOUT: u8 = 75;

pub async fn lock(args: LockArgs) -> anyhow::Result<ExitCode> {
    let (client, namespace) = args.etcd.connect().await?;
    let mode = match args.mode {
        ModeArg::Mutex => Mode::Mutex,
        ModeArg::Semaphore => Mode::Semaphore(args.limit.unwrap_or(1)),
        ModeArg::Read => Mode::Read,
        ModeArg::Write => Mode::Write,
    };
    // Inside a command that already holds this lock: re-enter instead of
    // queueing behind ourselves.
    let prefix = lock::prefix(&namespace, &args.name);
    if std::env::var("COORD_LOCK_KEY").is_ok_and(|k| k.starts_with(&prefix)) {
        let status = tokio::process::Command::new(&args.command[0])
            .args(&args.command[1..])
            .status()
            .await
            .with_context(|| format!("cannot run `{}`", args.command[0]))?;
        return Ok(exit_code(status));
    }
    if args.ttl < Duration::from_secs(2) || args.ttl.subsec_nanos() != 0 {
        bail!("--ttl must be whole seconds, at least 2s (etcd leases count seconds)");
    }
    let grace = args.grace.min(max_grace(args.ttl));
    if grace < args.grace {
        warn!(grace = ?grace, ttl = ?args.ttl, "Grace period shortened to fit the TTL.");
    }
    let coord =
        std::env::current_exe().context("cannot find the coord binary to supervise with")?;
    // The supervisor starts while we queue, so that taking the lock costs
    // no process start.
    let mut supervised = Supervised::prepare(&coord, &args.command, grace)
        .with_context(|| format!("cannot start `{}` under a supervisor", args.command[0]))?;
    let session = Session::start(client.clone(), args.ttl);
    let me = Holder {
        agent: format!("coord-lock@{}", host_name()),
        host: host_name(),
        pid: std::process::id(),
    };
    let take = async {
        let lease = session.wait_alive().await;
        lock::acquire(&client, lease, &namespace, &args.name, mode, &me)
            .await
            .map(|guard| (lease, guard))
    };
    let (lease, guard) = match args.timeout {
        None => take.await?,
        Some(t) => match tokio::time::timeout(t, take).await {
            Ok(g) => g?,
            Err(_) => {
                // Revoking the lease removes our place in the queue.
                supervised.stop().await;
                session.close().await;
                eprintln!(
                    "coord lock: `{}` was not ours within {}",
                    args.name,
                    humantime::format_duration(t)
                );
                return Ok(ExitCode::from(EXIT_TIMEOUT));
            }
        },
    };
    let token = guard.token.to_string();
    let env = vec![
        ("COORD_LOCK_NAME".to_owned(), args.name.clone()),
        ("COORD_LOCK_KEY".to_owned(), guard.key.clone()),
        ("COORD_FENCING_TOKEN".to_owned(), token.clone()),
        ("ETCD_LOCK_KEY".to_owned(), guard.key.clone()),
        ("ETCD_LOCK_REV".to_owned(), token),
    ];
    let interrupted = super::stop_signal()?;
    let ended = run_guarded(supervised, lease, &env, session.subscribe(), interrupted).await;
    match ended {
        Ended::LockLost => {
            warn!(lock = %args.name, "Lock lost with the session; the command was stopped.");
            session.close().await;
            eprintln!(
                "coord lock: lost `{}` while the command ran; it was stopped",
                args.name
            );
            Ok(ExitCode::from(EXIT_TIMEOUT))
        }
        Ended::Exited(_) | Ended::Stopped => {
            let _ = guard.release(&client).await;
            session.close().await;
            // Stopped by a signal: the shell convention for TERM.
            let code = if let Ended::Exited(c) = ended { c } else { 143 };
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
    }
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    ExitCode::from(code.clamp(0, 255) as u8)
}

#[derive(Debug, Args)]
pub struct SuperviseArgs {
    #[arg(long, value_parser = humantime::parse_duration)]
    grace: Duration,
    #[arg(last = true, required = true)]
    command: Vec<OsString>,
}

/// Runs without an async runtime (see [`supervise`]); exits at once,
/// without waiting for the thread that reads the agent's socket.
pub fn supervise_command(args: &SuperviseArgs) -> ! {
    std::process::exit(supervise(&args.command, args.grace))
}
