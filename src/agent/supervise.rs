//! A lock-guarded command never outlives its lock.
//!
//! The command does not run under the agent directly but under a small
//! supervisor — the coord binary re-executed as `coord supervise` — that
//! owns the lease's local deadline. The agent feeds it every renewed
//! deadline on a socket; when the deadline comes close without a renewal (the
//! agent lost etcd, was stopped with SIGSTOP, or was killed with -9 and the
//! socket closed), the supervisor sends the command TERM, waits the grace
//! period, then KILL — timed so the command is dead before the lease can
//! expire on the server, which is the earliest anyone else can take the
//! lock. The local deadline is never later than the server's expiry (see
//! `etcd::session`), and CLOCK_MONOTONIC is one clock for every process on
//! the host, so the supervisor can keep it without the agent.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::time::{ClockId, clock_gettime};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::{Child, Command};
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
///
/// The two talk over a socket pair on the supervisor's stdin: the agent
/// sends `go`, `deadline` and `stop` lines; the supervisor answers
/// `exit <code>` the moment the command is gone, before its own exit, so the
/// lock can be released without waiting for a process teardown.
#[derive(Debug)]
pub struct Supervised {
    child: Child,
    to: Option<OwnedWriteHalf>,
    from: Option<Lines<BufReader<OwnedReadHalf>>>,
}

impl Supervised {
    /// Starts the supervisor ahead of time, before the lock is ours, so that
    /// taking the lock costs no process start: it waits for
    /// [`Supervised::go`] before running `argv`, and is stopped with `grace`
    /// between TERM and KILL. `coord` is the binary to re-execute.
    pub fn prepare(coord: &Path, argv: &[String], grace: Duration) -> std::io::Result<Supervised> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        let ours = tokio::net::UnixStream::from_std(ours)?;
        let mut cmd = Command::new(coord);
        cmd.arg("supervise")
            .arg("--grace")
            .arg(humantime::format_duration(grace).to_string())
            .arg("--")
            .args(argv)
            .env_remove(crate::agent::status::NOTIFY_SOCKET)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            // Its own process group: a Ctrl-C or a stop meant for the agent
            // must not reach the supervisor.
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd.spawn()?;
        let (from, to) = ours.into_split();
        Ok(Supervised {
            child,
            to: Some(to),
            from: Some(BufReader::new(from).lines()),
        })
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
        if let Some(to) = self.to.as_mut()
            && to.write_all(line.as_bytes()).await.is_err()
        {
            // The supervisor is gone; wait() reports how it ended.
            self.to = None;
        }
    }

    /// Waits for the command to end and returns its exit code (128 +
    /// signal if it was killed): from the supervisor's report, or from the
    /// supervisor's own status if it ended without one. Cancel-safe.
    pub async fn wait(&mut self) -> i32 {
        loop {
            tokio::select! {
                line = async { self.from.as_mut()?.next_line().await.ok().flatten() }, if self.from.is_some() => {
                    match line.as_deref().and_then(|l| l.strip_prefix("exit ")) {
                        Some(code) => return code.trim().parse().unwrap_or(1),
                        None if line.is_none() => self.from = None,
                        None => {}
                    }
                }
                status = self.child.wait() => return exit_code(status),
            }
        }
    }
}

fn exit_code(status: std::io::Result<ExitStatus>) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.map_or(1, |s| {
        s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
    })
}

/// What the supervisor's threads tell its main loop.
enum Heard {
    Exited(std::io::Result<ExitStatus>),
    Deadline(i64),
    Stop,
}

/// The supervisor's end: waits for `go <deadline> <env JSON>` on stdin (and
/// exits 0 without running anything on `stop` or EOF), runs `argv`, keeps
/// the deadline from later `deadline` lines, reports `exit <code>` on stdin
/// (a socket) when the command ends, and returns the command's status
/// (128 + signal if it was killed).
///
/// Plain threads and blocking calls, no async runtime: each wake-up (the
/// `go`, the command's exit) then costs one futex or one syscall return,
/// which is what a lock handover waits on.
pub fn supervise(argv: &[OsString], grace: Duration) -> i32 {
    use std::io::{BufRead, Write};
    let Some((program, args)) = argv.split_first() else {
        eprintln!("coord supervise: no command given");
        return 64;
    };
    let (mut lines, mut to) = match agent_channel() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("coord supervise: stdin is not the agent's socket: {e}");
            return 64;
        }
    };
    let (first_deadline, env) = loop {
        let mut line = String::new();
        match lines.read_line(&mut line) {
            Ok(n) if n > 0 => {
                let mut parts = line.trim_end().splitn(3, ' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some("go"), Some(ns), rest) => {
                        let env: std::collections::BTreeMap<String, String> = rest
                            .and_then(|json| serde_json::from_str(json).ok())
                            .unwrap_or_default();
                        break (ns.parse().unwrap_or(0), env);
                    }
                    (Some("stop"), _, _) => return 0,
                    _ => {}
                }
            }
            _ => return 0,
        }
    };
    let spawned = std::process::Command::new(program)
        .args(args)
        .envs(&env)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "coord supervise: cannot start `{}`: {e}",
                program.to_string_lossy()
            );
            let _ = to.write_all(b"exit 127\n");
            return 127;
        }
    };
    let group = Pid::from_raw(child.id() as i32);
    let (tell, heard) = std::sync::mpsc::channel();
    {
        let tell = tell.clone();
        std::thread::spawn(move || {
            let _ = tell.send(Heard::Exited(child.wait()));
        });
    }
    std::thread::spawn(move || {
        // EOF (the agent is gone) leaves the last deadline in force.
        for line in lines.lines() {
            let Ok(line) = line else { break };
            let heard = match line.split_once(' ') {
                Some(("deadline", ns)) => match ns.trim().parse() {
                    Ok(ns) => Heard::Deadline(ns),
                    Err(_) => continue,
                },
                _ if line.trim() == "stop" => Heard::Stop,
                _ => continue,
            };
            if tell.send(heard).is_err() {
                break;
            }
        }
    });
    let signal = |s: Signal| {
        let _ = killpg(group, s);
    };
    let mut deadline = first_deadline;
    let mut termed_at: Option<std::time::Instant> = None;
    let status = loop {
        let remaining_ns = deadline - monotonic_ns();
        let remaining = Duration::from_nanos(remaining_ns.max(0) as u64);
        if termed_at.is_none() && remaining <= grace + KILL_MARGIN {
            eprintln!(
                "coord supervise: the lock's lease runs out in {remaining:?}; stopping the command"
            );
            signal(Signal::SIGTERM);
            termed_at = Some(std::time::Instant::now());
        }
        let kill_due = termed_at.is_some_and(|t| t.elapsed() >= grace) || remaining <= KILL_MARGIN;
        if kill_due {
            signal(Signal::SIGKILL);
        }
        match heard.recv_timeout(Duration::from_millis(20)) {
            Ok(Heard::Exited(status)) => break status,
            Ok(Heard::Deadline(ns)) => deadline = ns,
            Ok(Heard::Stop) => {
                if termed_at.is_none() {
                    signal(Signal::SIGTERM);
                    termed_at = Some(std::time::Instant::now());
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Err(std::io::Error::other(
                    "lost the thread waiting for the command",
                ));
            }
        }
    };
    // Whatever the command left in its group goes with it, before the
    // agent hears that the command is gone (and may release the lock).
    signal(Signal::SIGKILL);
    let code = exit_code(status);
    let _ = to.write_all(format!("exit {code}\n").as_bytes());
    code
}

/// Our stdin, the socket the agent talks to us on: a line reader and a
/// writer.
fn agent_channel() -> std::io::Result<(
    std::io::BufReader<std::os::unix::net::UnixStream>,
    std::os::unix::net::UnixStream,
)> {
    use std::os::fd::AsFd;
    let fd = std::io::stdin().as_fd().try_clone_to_owned()?;
    let socket = std::os::unix::net::UnixStream::from(fd);
    Ok((std::io::BufReader::new(socket.try_clone()?), socket))
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
            code = supervised.wait() => {
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
