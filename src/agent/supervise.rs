//! A lock-guarded command never outlives its lock.
//!
//! The command does not run under the agent directly but under a small
//! supervisor — the coord binary re-executed as `coord supervise` — that
//! owns the lease's local deadline. The agent feeds it every renewed
//! deadline on a pipe; when the deadline comes close without a renewal (the
//! agent lost etcd, was stopped with SIGSTOP, or was killed with -9 and the
//! pipe closed), the supervisor sends the command TERM, waits the grace
//! period, then KILL — timed so the command is dead before the lease can
//! expire on the server, which is the earliest anyone else can take the
//! lock. The local deadline is never later than the server's expiry (see
//! `etcd::session`), and CLOCK_MONOTONIC is one clock for every process on
//! the host, so the supervisor can keep it without the agent.

use std::ffi::OsString;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::time::{ClockId, clock_gettime};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::time::Instant;

/// Kill this long before the deadline, for scheduling delays.
pub const KILL_MARGIN: Duration = Duration::from_millis(300);

/// The longest grace period a lease of `ttl` allows: the deadline is
/// renewed every TTL/3, so it is normally at least 2/3 TTL away, and TERM
/// must not come while renewals are still on time.
pub fn max_grace(ttl: Duration) -> Duration {
    (ttl / 3).saturating_sub(KILL_MARGIN)
}

/// Nanoseconds on CLOCK_MONOTONIC, the clock all processes share.
fn monotonic_ns() -> i64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |t| t.tv_sec() * 1_000_000_000 + t.tv_nsec())
}

/// `deadline` (a tokio instant) as CLOCK_MONOTONIC nanoseconds.
fn to_monotonic(deadline: Instant) -> i64 {
    let now = Instant::now();
    let ahead = deadline.saturating_duration_since(now).as_nanos() as i64;
    monotonic_ns() + ahead
}

/// The agent's end: a command running under a supervisor.
#[derive(Debug)]
pub struct Supervised {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Supervised {
    /// Starts `argv` under `coord supervise` (`coord` is the binary to
    /// re-execute), with `env` added to its environment, to be stopped with
    /// `grace` between TERM and KILL, and killed before `deadline` unless
    /// renewed.
    pub fn spawn(
        coord: &Path,
        argv: &[String],
        env: &[(String, String)],
        grace: Duration,
        deadline: Instant,
    ) -> std::io::Result<Supervised> {
        let mut cmd = Command::new(coord);
        cmd.arg("supervise")
            .arg("--grace")
            .arg(humantime::format_duration(grace).to_string())
            .arg("--deadline-ns")
            .arg(to_monotonic(deadline).to_string())
            .arg("--")
            .args(argv)
            .env_remove(crate::agent::status::NOTIFY_SOCKET)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            // Its own process group: a Ctrl-C or a stop meant for the agent
            // must not reach the supervisor.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take();
        Ok(Supervised { child, stdin })
    }

    /// Starts the supervisor ahead of time, before the lock is ours, so that
    /// taking the lock costs no process start: it waits for
    /// [`Supervised::go`] before running `argv`.
    pub fn prepare(coord: &Path, argv: &[String], grace: Duration) -> std::io::Result<Supervised> {
        let mut cmd = Command::new(coord);
        cmd.arg("supervise")
            .arg("--grace")
            .arg(humantime::format_duration(grace).to_string())
            .arg("--wait-go")
            .arg("--")
            .args(argv)
            .env_remove(crate::agent::status::NOTIFY_SOCKET)
            .stdin(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take();
        Ok(Supervised { child, stdin })
    }

    /// Runs the prepared command with `env` added, to be killed before
    /// `deadline` unless renewed.
    pub async fn go(&mut self, deadline: Instant, env: &[(String, String)]) {
        let env: std::collections::BTreeMap<&str, &str> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let env = serde_json::to_string(&env).unwrap_or_else(|_| "{}".into());
        self.send(&format!("go {} {env}\n", to_monotonic(deadline)))
            .await;
    }

    /// Hands the supervisor a renewed deadline.
    pub async fn renew(&mut self, deadline: Instant) {
        self.send(&format!("deadline {}\n", to_monotonic(deadline)))
            .await;
    }

    /// Asks the supervisor to stop the command now (TERM, grace, KILL).
    pub async fn stop(&mut self) {
        self.send("stop\n").await;
    }

    async fn send(&mut self, line: &str) {
        if let Some(stdin) = self.stdin.as_mut()
            && stdin.write_all(line.as_bytes()).await.is_err()
        {
            // The supervisor is gone; wait() reports how it ended.
            self.stdin = None;
        }
    }

    /// Waits for the command (through its supervisor) to end.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }
}

/// The supervisor's end: runs `argv`, keeps the deadline read from stdin,
/// and exits with the command's status (128 + signal if it was killed).
/// Without a first deadline it waits for a `go <deadline> <env JSON>` line
/// first (and exits 0 without running anything on `stop` or EOF).
pub async fn supervise(argv: &[OsString], grace: Duration, first_deadline: Option<i64>) -> i32 {
    let Some((program, args)) = argv.split_first() else {
        eprintln!("coord supervise: no command given");
        return 64;
    };
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut env: std::collections::BTreeMap<String, String> = Default::default();
    let first_deadline = match first_deadline {
        Some(d) => d,
        None => loop {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    let mut parts = line.splitn(3, ' ');
                    match (parts.next(), parts.next(), parts.next()) {
                        (Some("go"), Some(ns), rest) => {
                            if let Some(json) = rest {
                                env = serde_json::from_str(json).unwrap_or_default();
                            }
                            break ns.parse().unwrap_or(0);
                        }
                        (Some("stop"), _, _) => return 0,
                        _ => {}
                    }
                }
                _ => return 0,
            }
        },
    };
    let mut child = match Command::new(program)
        .args(args)
        .envs(&env)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "coord supervise: cannot start `{}`: {e}",
                program.to_string_lossy()
            );
            return 127;
        }
    };
    let group = child.id().map(|id| Pid::from_raw(id as i32));
    let deadline = Arc::new(AtomicI64::new(first_deadline));
    let stop_now = Arc::new(tokio::sync::Notify::new());
    {
        let deadline = deadline.clone();
        let stop_now = stop_now.clone();
        tokio::spawn(async move {
            // EOF (the agent is gone) leaves the last deadline in force.
            while let Ok(Some(line)) = lines.next_line().await {
                match line.split_once(' ') {
                    Some(("deadline", ns)) => {
                        if let Ok(ns) = ns.trim().parse::<i64>() {
                            deadline.store(ns, Ordering::Relaxed);
                        }
                    }
                    _ if line.trim() == "stop" => stop_now.notify_one(),
                    _ => {}
                }
            }
        });
    }
    let signal = |s: Signal| {
        if let Some(g) = group {
            let _ = killpg(g, s);
        }
    };
    let mut termed_at: Option<Instant> = None;
    let status = loop {
        let remaining_ns = deadline.load(Ordering::Relaxed) - monotonic_ns();
        let remaining = Duration::from_nanos(remaining_ns.max(0) as u64);
        if termed_at.is_none() && remaining <= grace + KILL_MARGIN {
            eprintln!(
                "coord supervise: the lock's lease runs out in {remaining:?}; stopping the command"
            );
            signal(Signal::SIGTERM);
            termed_at = Some(Instant::now());
        }
        let kill_due = termed_at.is_some_and(|t| t.elapsed() >= grace) || remaining <= KILL_MARGIN;
        if kill_due {
            signal(Signal::SIGKILL);
        }
        tokio::select! {
            s = child.wait() => break s,
            _ = stop_now.notified(), if termed_at.is_none() => {
                signal(Signal::SIGTERM);
                termed_at = Some(Instant::now());
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    };
    // Whatever the command left in its group goes with it.
    signal(Signal::SIGKILL);
    match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
        }
        Err(_) => 1,
    }
}

/// How a guarded run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The command exited by itself (code, or 128 + signal).
    Exited(i32),
    /// The lease was lost: the command was stopped.
    LockLost,
    /// Asked to stop (shutdown, timeout): the command was stopped.
    Stopped,
}

/// Runs a prepared command while `lease` lives: hands it every renewed
/// deadline, stops it when the lease is lost or `stop` completes, and
/// returns how it ended.
pub async fn run_guarded(
    mut supervised: Supervised,
    lease: crate::etcd::LeaseId,
    env: &[(String, String)],
    mut session: tokio::sync::watch::Receiver<crate::etcd::SessionState>,
    stop: impl std::future::Future<Output = ()>,
) -> Ended {
    use crate::etcd::SessionState;
    let deadline = match *session.borrow_and_update() {
        SessionState::Alive { lease: l, deadline } if l == lease => Some(deadline),
        _ => None,
    };
    let Some(deadline) = deadline else {
        supervised.stop().await;
        let _ = supervised.wait().await;
        return Ended::LockLost;
    };
    supervised.go(deadline, env).await;
    let mut ending: Option<Ended> = None;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            status = supervised.wait() => {
                let code = status.map_or(1, |s| {
                    use std::os::unix::process::ExitStatusExt;
                    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
                });
                return ending.unwrap_or(Ended::Exited(code));
            }
            changed = session.changed(), if ending.is_none() => {
                let now = if changed.is_ok() { *session.borrow_and_update() } else { SessionState::Closed };
                match now {
                    SessionState::Alive { lease: l, deadline } if l == lease => supervised.renew(deadline).await,
                    _ => {
                        ending = Some(Ended::LockLost);
                        supervised.stop().await;
                    }
                }
            }
            _ = &mut stop, if ending.is_none() => {
                ending = Some(Ended::Stopped);
                supervised.stop().await;
            }
        }
    }
}
