use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use tracing::warn;

use super::connection::EtcdArgs;
use super::errors::{NoAnswer, reach_wait, within};
use coord::agent::hold::{Ended, Held, HoldError};
use coord::agent::manifest::host_name;
use coord::agent::supervise::{max_grace, supervise};
use coord::etcd::Session;
use coord::lock::{self, Holder, Mode};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    /// One holder at a time.
    Mutex,
    /// Up to --limit holders at a time.
    Semaphore,
    /// Shared with other readers; waits for a writer.
    Read,
    /// Alone: no reader, no other writer.
    Write,
}

#[derive(Debug, Args)]
pub struct LockArgs {
    /// The lock's name (`<namespace>/locks/<name>` in etcd, as `etcdctl lock` uses).
    name: String,
    /// `mutex`: one holder; `semaphore`: up to --limit holders; `read`:
    /// shared with other readers; `write`: alone, readers excluded.
    #[arg(long, value_enum, default_value = "mutex")]
    mode: ModeArg,
    /// Holders a semaphore admits (only with `--mode semaphore`).
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
    /// The command to run while holding the lock, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
}

/// What a one-shot command waits for before anything else.
const LEASE: &str = "no session lease was granted";

/// Exit status when `--timeout` ran out or the lock was lost (EX_TEMPFAIL).
const EXIT_TIMEOUT: u8 = 75;

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
enum TakeError {
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error("`{name}` was not ours within {}", humantime::format_duration(*timeout))]
    Timeout { name: String, timeout: Duration },
    /// etcd gave no lease in time, or stopped answering while we waited:
    /// not the same as someone else holding the lock.
    #[error(transparent)]
    NoAnswer(NoAnswer),
}

pub async fn lock(args: LockArgs) -> anyhow::Result<ExitCode> {
    if args.limit.is_some() && !matches!(args.mode, ModeArg::Semaphore) {
        // Refused rather than taken to mean a semaphore: every holder of a
        // semaphore must agree on its limit, so it is said in full, and a
        // `--limit` beside another mode is a mistake to point out.
        bail!(
            "--limit is for a semaphore: add `--mode semaphore` to admit {} holders; nothing was locked",
            args.limit.unwrap_or_default()
        );
    }
    let (client, namespace) = args.etcd.connect().await?;
    let mode = match args.mode {
        ModeArg::Mutex => Mode::Mutex,
        ModeArg::Semaphore => Mode::Semaphore(args.limit.unwrap_or(1)),
        ModeArg::Read => Mode::Read,
        ModeArg::Write => Mode::Write,
    };
    // Inside a command that already holds this very lock: re-enter
    // instead of queueing behind ourselves.
    if let Some(held) = held_here(&client, &namespace, &args.name, mode).await? {
        return re_enter(&args, &held).await;
    }
    if args.ttl < Duration::from_secs(2) || args.ttl.subsec_nanos() != 0 {
        bail!("--ttl must be whole seconds, at least 2s (etcd leases count seconds)");
    }
    let grace = args.grace.min(max_grace(args.ttl));
    if grace < args.grace {
        warn!(grace = %humantime::format_duration(grace), ttl = %humantime::format_duration(args.ttl), "Grace period shortened to fit the TTL.");
    }
    let session = Session::start(client.clone(), args.ttl);
    let me = Holder {
        agent: format!("coord-lock@{}", host_name()),
        host: host_name(),
        pid: std::process::id(),
    };
    let take = async {
        let started = tokio::time::Instant::now();
        // Without a lease nothing can even queue: an etcd that does not
        // answer ends the command after a bounded wait, whether or not
        // --timeout was given, and says so rather than blaming a holder.
        let reach = reach_wait(&client);
        let lease_wait = args.timeout.map_or(reach, |t| t.min(reach));
        let lease = within(&client, LEASE, lease_wait, session.wait_alive())
            .await
            .map_err(TakeError::NoAnswer)?;
        let acquire = lock::acquire(&client, lease, &namespace, &args.name, mode, &me);
        match args.timeout {
            None => Ok(acquire.await?),
            Some(t) => {
                let left = t.saturating_sub(started.elapsed());
                match tokio::time::timeout(left, acquire).await {
                    Ok(g) => Ok(g?),
                    Err(_) => {
                        let seen = NoAnswer::seen_by(&client, LEASE, t);
                        Err(if seen.is_unreachable() {
                            TakeError::NoAnswer(seen)
                        } else {
                            TakeError::Timeout {
                                name: args.name.clone(),
                                timeout: t,
                            }
                        })
                    }
                }
            }
        }
    };
    let held = super::hold_for_command(&client, &session, &args.command, grace, take).await?;
    // Revoking the lease removes our key (or our place in the queue).
    session.close().await;
    match held {
        Err(HoldError::Claim(Some(TakeError::Timeout { .. }))) => {
            eprintln!(
                "coord lock: `{}` was not ours within {}",
                args.name,
                humantime::format_duration(args.timeout.unwrap_or_default())
            );
            Ok(ExitCode::from(EXIT_TIMEOUT))
        }
        Err(HoldError::Claim(None)) => Ok(ExitCode::from(143)),
        Err(HoldError::Claim(Some(TakeError::NoAnswer(e)))) => Err(e.into()),
        Err(HoldError::Claim(Some(e))) => Err(e.into()),
        Err(HoldError::Supervisor(e)) => Err(anyhow::Error::new(e).context(format!(
            "cannot start `{}` under a supervisor",
            args.command[0]
        ))),
        Ok(Held::Lost { .. }) => {
            warn!(lock = %args.name, "Lock lost; the command was stopped.");
            eprintln!(
                "coord lock: lost `{}` while the command ran; it was stopped",
                args.name
            );
            Ok(ExitCode::from(EXIT_TIMEOUT))
        }
        Ok(Held::Released { last, .. }) => {
            // Stopped by a signal: the shell convention for TERM.
            let code = match last {
                Some(Ended::Exited(c)) => c,
                _ => 143,
            };
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
    }
}

/// The lock this process's environment says it holds — only when it is
/// exactly `name` (not a lock above or below it), held in a mode that
/// covers `mode`, and its holder key is still in etcd on the lease its name
/// says. A held lock that does not cover `mode` (a reader asking to write)
/// is an error: queueing behind our own key would wait forever.
async fn held_here(
    client: &coord::etcd::Client,
    namespace: &str,
    name: &str,
    mode: Mode,
) -> anyhow::Result<Option<HeldHere>> {
    let (Ok(held_name), Ok(key)) = (
        std::env::var("COORD_LOCK_NAME"),
        std::env::var("COORD_LOCK_KEY"),
    ) else {
        return Ok(None);
    };
    if held_name != name || lock::holder_lease(namespace, name, &key).is_none() {
        return Ok(None);
    }
    let held_mode: Mode = std::env::var("COORD_LOCK_MODE")
        .unwrap_or_default()
        .parse()
        .map_err(|e| {
            anyhow::anyhow!("COORD_LOCK_MODE: {e}; cannot tell whether `{name}` may be re-entered")
        })?;
    if !held_mode.covers(mode) {
        bail!(
            "this command holds `{name}` in mode {held_mode}, which does not cover {mode}:              re-entering would wait for itself forever; release it first"
        );
    }
    let token: i64 = std::env::var("COORD_FENCING_TOKEN")
        .ok()
        .and_then(|t| t.parse().ok())
        .context("COORD_FENCING_TOKEN is missing or not a number; cannot re-enter")?;
    if !lock::still_held(client, namespace, name, &key, token).await? {
        bail!(
            "`{name}` is no longer held by the command that started this one (its key `{key}` is gone); not re-entering"
        );
    }
    Ok(Some(HeldHere { token }))
}

/// A lock held by the command we run inside.
#[derive(Debug)]
struct HeldHere {
    token: i64,
}

/// Runs the command in our own process group — the guarded command's, so
/// its supervisor stops it with the rest — and returns its status.
async fn re_enter(args: &LockArgs, held: &HeldHere) -> anyhow::Result<ExitCode> {
    let cmd = coord::agent::process::command(
        &args.command,
        coord::agent::process::Grouping::Caller,
        coord::agent::process::OnParentDeath::Kill,
    );
    tracing::debug!(lock = %args.name, token = held.token, "Re-entering a lock this command holds.");
    let status = tokio::process::Command::from(cmd)
        .status()
        .await
        .with_context(|| format!("cannot run `{}`", args.command[0]))?;
    Ok(exit_code(status))
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
