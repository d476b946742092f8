//! The supervisor: a lock-guarded command runs under it, so that it never
//! outlives its lock.
//!
//! The command does not run under the agent (or `coord lock`) directly but
//! under a small supervisor — the coord binary re-executed as
//! `coord supervise` — that owns the lease's local deadline. Its parent
//! feeds it every renewed deadline on a socket; when the deadline comes
//! close without a renewal (the parent lost etcd, or was stopped with
//! SIGSTOP), the supervisor sends the command's group TERM, waits the grace
//! period, then KILL — timed so the command is dead before the lease can
//! expire on the server, which is the earliest anyone else can take the
//! lock. When its parent goes (the socket's end of file: `kill -9` of the
//! agent), it stops the command the same way at once.
//!
//! Deadlines are on `CLOCK_BOOTTIME` ([`crate::etcd::BootInstant`]), which
//! counts suspend as the lease on the server does, and is one clock for
//! every process of the host.
//!
//! The supervisor is a *child subreaper*: whatever the command starts and
//! leaves behind — in its group or not, even a nested `coord lock` and its
//! own supervisor — is reparented to it, and it reports the command's end
//! (`exit <code>`) only once none of them runs. Right after starting the
//! command it reports `pid <pid>` (the command's process group): if the
//! supervisor itself is killed (`kill -9`, the OOM killer), the command
//! dies with it (`PR_SET_PDEATHSIG`), and its parent, seeing the socket
//! close without an `exit`, kills that group and waits until none of it
//! runs before it releases anything.

use std::ffi::OsString;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::Child;

use super::process::{self, Group, Grouping, OnParentDeath};
use crate::etcd::{BootInstant, Clock};

/// Kill this long before the deadline, for scheduling delays.
pub const KILL_MARGIN: Duration = Duration::from_millis(300);

/// The longest grace period a lease of `ttl` allows: the deadline is
/// renewed every TTL/3, so it is normally at least 2/3 TTL away, and TERM
/// must not come while renewals are still on time.
pub fn max_grace(ttl: Duration) -> Duration {
    (ttl / 3).saturating_sub(KILL_MARGIN)
}

/// The parent's end: a command running under a supervisor.
///
/// The two talk over a socket pair on the supervisor's stdin: the parent
/// sends `go`, `deadline` and `stop` lines; the supervisor answers
/// `pid <pid>` once the command runs and `exit <code>` the moment nothing
/// of it runs any more, before its own exit, so the lock can be released
/// without waiting for a process teardown.
#[derive(Debug)]
pub struct Supervised {
    child: Child,
    to: Option<OwnedWriteHalf>,
    from: Option<Lines<BufReader<OwnedReadHalf>>>,
    /// The command's process group, once reported.
    group: Option<Group>,
    /// Set once the command is known gone.
    ended: Option<i32>,
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
        let mut line: Vec<OsString> = vec![
            coord.into(),
            "supervise".into(),
            "--grace".into(),
            humantime::format_duration(grace).to_string().into(),
            "--".into(),
        ];
        line.extend(argv.iter().map(OsString::from));
        // Its own process group, so that a Ctrl-C or a stop meant for its
        // parent does not reach it; no death signal, since it notices its
        // parent's death on the socket and stops the command with its
        // grace (a KILL would leave the command's children to nobody).
        let mut cmd = process::command(&line, Grouping::Own, OnParentDeath::Notice);
        cmd.stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)));
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let child = cmd.spawn().inspect_err(|e| {
            super::fd_limit::note(e);
        })?;
        super::fd_limit::available();
        let (from, to) = ours.into_split();
        Ok(Supervised {
            child,
            to: Some(to),
            from: Some(BufReader::new(from).lines()),
            group: None,
            ended: None,
        })
    }

    /// Runs the prepared command with `env` added, to be stopped before
    /// `deadline` unless renewed.
    pub async fn go(&mut self, deadline: BootInstant, env: &[(String, String)]) {
        let env: std::collections::BTreeMap<&str, &str> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let env = serde_json::to_string(&env).unwrap_or_else(|_| "{}".into());
        self.send(&format!("go {} {env}\n", deadline.as_nanos()))
            .await;
    }

    /// Hands the supervisor a renewed deadline.
    pub async fn renew(&mut self, deadline: BootInstant) {
        self.send(&format!("deadline {}\n", deadline.as_nanos()))
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
            // The supervisor is gone; wait() finds out how it ended.
            self.to = None;
        }
    }

    /// Waits until nothing of the command runs and returns its exit code
    /// (128 + signal if it was killed): from the supervisor's report or, if
    /// the supervisor died without one, after killing the command's group
    /// and waiting for it. Cancel-safe.
    pub async fn wait(&mut self) -> i32 {
        if let Some(code) = self.ended {
            return code;
        }
        while let Some(from) = self.from.as_mut() {
            let line = from.next_line().await.ok().flatten();
            let Some(line) = line else {
                self.from = None;
                break;
            };
            if let Some(pid) = line.strip_prefix("pid ") {
                self.group = pid.trim().parse().ok().map(Group::led_by);
            } else if let Some(code) = line.strip_prefix("exit ") {
                let code = code.trim().parse().unwrap_or(1);
                self.ended = Some(code);
                return code;
            }
        }
        // The supervisor is gone without saying the command ended: the
        // command died with it (PDEATHSIG), and what it left in its group
        // goes now, before anyone may release the lock.
        if let Some(group) = self.group {
            group.kill_and_wait().await;
        }
        let code = exit_code(self.child.wait().await);
        self.ended = Some(code);
        code
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        // Given up half-way (the caller's future dropped): the supervisor
        // goes with kill_on_drop, and the command's group with it.
        if self.ended.is_none()
            && let Some(group) = self.group
        {
            group.signal(Signal::SIGKILL);
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
    /// The command is over, with this code, and its parent told.
    Exited(i32),
    Deadline(BootInstant),
    Stop,
    /// The parent closed the socket: it is gone.
    ParentGone,
}

/// When to signal the command, from the lease's deadline and the grace
/// period, on `CLOCK_BOOTTIME`: a suspend that passes the deadline leads
/// to KILL at the first look after the resume.
#[derive(Debug, Clone)]
pub struct Deadline {
    deadline: BootInstant,
    grace: Duration,
    termed_at: Option<BootInstant>,
}

impl Deadline {
    /// A command to be gone `KILL_MARGIN` before `deadline`, with `grace`
    /// between TERM and KILL.
    pub fn new(deadline: BootInstant, grace: Duration) -> Deadline {
        Deadline {
            deadline,
            grace,
            termed_at: None,
        }
    }

    /// A renewal.
    pub fn renew(&mut self, deadline: BootInstant) {
        self.deadline = deadline;
    }

    /// A request to stop now (TERM, grace, KILL).
    pub fn stop(&mut self, now: BootInstant) {
        self.termed_at.get_or_insert(now);
    }

    /// The signals due at `now`: TERM once, when the deadline is within
    /// the grace period (or a stop was asked), then KILL when the grace is
    /// over or the deadline is within `KILL_MARGIN`.
    pub fn due(&mut self, now: BootInstant) -> Vec<Signal> {
        let mut signals = Vec::new();
        let remaining = self.deadline.saturating_duration_since(now);
        if self.termed_at.is_none() && remaining <= self.grace + KILL_MARGIN {
            self.termed_at = Some(now);
            signals.push(Signal::SIGTERM);
        }
        let grace_over = self
            .termed_at
            .is_some_and(|t| now.saturating_duration_since(t) >= self.grace);
        if grace_over || remaining <= KILL_MARGIN {
            signals.push(Signal::SIGKILL);
        }
        signals
    }

    /// Whether TERM has been sent (or asked for).
    pub fn stopping(&self) -> bool {
        self.termed_at.is_some()
    }

    /// How long the main loop may sleep before the next look: until the
    /// next signal is due, at most 50 ms (so a resume is seen soon).
    fn next_look(&self, now: BootInstant) -> Duration {
        let remaining = self.deadline.saturating_duration_since(now);
        let until = match self.termed_at {
            None => remaining.saturating_sub(self.grace + KILL_MARGIN),
            Some(t) => (t + self.grace).saturating_duration_since(now),
        };
        until.clamp(Duration::from_millis(1), Duration::from_millis(50))
    }
}

/// The supervisor's end: waits for `go <deadline> <env JSON>` on stdin (and
/// exits 0 without running anything on `stop` or end of file), runs `argv`,
/// reports `pid <pid>`, keeps the deadline from later `deadline` lines,
/// stops the command on `stop` or when its parent goes, reports
/// `exit <code>` on stdin (a socket) once nothing the command started runs,
/// and returns the command's status (128 + signal if it was killed).
///
/// Plain threads and blocking calls, no async runtime: each wake-up (the
/// `go`, the command's exit) then costs one futex or one syscall return,
/// which is what a lock handover waits on.
pub fn supervise(argv: &[OsString], grace: Duration) -> i32 {
    use std::io::{BufRead, Write};
    if argv.is_empty() {
        eprintln!("coord supervise: no command given");
        return 64;
    }
    let (mut lines, mut to) = match parent_channel() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("coord supervise: stdin is not its parent's socket: {e}");
            return 64;
        }
    };
    // Whatever the command leaves behind is reparented to us, to be
    // killed and reaped before we say it is over.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!(
            "coord supervise: cannot become a subreaper ({e}); descendants that leave the command's group are not waited for"
        );
    }
    let clock = Clock::system();
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
                        break (BootInstant::from_nanos(ns.parse().unwrap_or(0)), env);
                    }
                    (Some("stop"), _, _) => return 0,
                    _ => {}
                }
            }
            _ => return 0,
        }
    };
    let leader = match process::spawn_leader(argv, &env) {
        Ok(pid) => pid,
        Err(e) => {
            eprintln!(
                "coord supervise: cannot start `{}`: {e}",
                argv[0].to_string_lossy()
            );
            let _ = to.write_all(b"exit 127\n");
            return 127;
        }
    };
    let group = Group::led_by(leader.as_raw() as u32);
    let _ = to.write_all(format!("pid {leader}\n").as_bytes());
    let (tell, heard) = std::sync::mpsc::channel();
    {
        let tell = tell.clone();
        std::thread::spawn(move || {
            let code = exit_code(process::wait_exit(leader));
            // The leader's exit ends the run: what it left in its group,
            // and anything else it started, goes before its parent hears
            // it is over (and may release the lock) — here, in the thread
            // that saw it, which saves the handover a thread switch.
            group.signal(Signal::SIGKILL);
            reap_descendants(group);
            let _ = to.write_all(format!("exit {code}\n").as_bytes());
            let _ = tell.send(Heard::Exited(code));
        });
    }
    std::thread::spawn(move || {
        for line in lines.lines() {
            let Ok(line) = line else { break };
            let heard = match line.split_once(' ') {
                Some(("deadline", ns)) => match ns.trim().parse() {
                    Ok(ns) => Heard::Deadline(BootInstant::from_nanos(ns)),
                    Err(_) => continue,
                },
                _ if line.trim() == "stop" => Heard::Stop,
                _ => continue,
            };
            if tell.send(heard).is_err() {
                return;
            }
        }
        let _ = tell.send(Heard::ParentGone);
    });
    let mut deadline = Deadline::new(first_deadline, grace);
    loop {
        let now = clock.now();
        let was_stopping = deadline.stopping();
        for signal in deadline.due(now) {
            if signal == Signal::SIGTERM && !was_stopping {
                eprintln!(
                    "coord supervise: the lock's lease is about to run out; stopping the command"
                );
            }
            group.signal(signal);
        }
        match heard.recv_timeout(deadline.next_look(clock.now())) {
            Ok(Heard::Exited(code)) => return code,
            Ok(Heard::Deadline(d)) => deadline.renew(d),
            Ok(Heard::Stop) | Ok(Heard::ParentGone) => {
                if !deadline.stopping() {
                    deadline.stop(clock.now());
                    group.signal(Signal::SIGTERM);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // The waiting thread is gone without a word: our parent,
                // seeing no `exit`, kills the group and waits for it.
                group.signal(Signal::SIGKILL);
                return 1;
            }
        }
    }
}

/// Kills and reaps every descendant left (reparented to us, the
/// subreaper) until none is left and `group` has no running process.
fn reap_descendants(group: Group) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let me = std::process::id();
    loop {
        // Reap what has exited.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => {}
                Err(nix::errno::Errno::ECHILD) => {
                    if !group.is_alive() {
                        return;
                    }
                    break;
                }
                Err(_) => break,
            }
        }
        // Our children are ours until reaped: their pids are safe to kill.
        for pid in children_of(me) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        group.signal(Signal::SIGKILL);
        match waitpid(None, Some(WaitPidFlag::__WALL)) {
            Ok(_) => {}
            Err(nix::errno::Errno::ECHILD) => {
                if !group.is_alive() {
                    return;
                }
                // Group members that are not our children (we could not
                // become a subreaper): wait for them to go.
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// The running (not zombie) children of `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    process::processes()
        .map(|all| {
            all.filter(|p| p.ppid == parent && p.running())
                .map(|p| p.pid)
                .collect()
        })
        .unwrap_or_default()
}

/// Our stdin, the socket our parent talks to us on: a line reader and a
/// writer.
fn parent_channel() -> std::io::Result<(
    std::io::BufReader<std::os::unix::net::UnixStream>,
    std::os::unix::net::UnixStream,
)> {
    use std::os::fd::AsFd;
    let fd = std::io::stdin().as_fd().try_clone_to_owned()?;
    let socket = std::os::unix::net::UnixStream::from(fd);
    Ok((std::io::BufReader::new(socket.try_clone()?), socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> BootInstant {
        BootInstant::from_nanos(ms * 1_000_000)
    }

    #[test]
    fn renewals_keep_the_command_running() {
        let mut d = Deadline::new(at(10_000), Duration::from_secs(2));
        assert!(d.due(at(1_000)).is_empty());
        d.renew(at(13_000));
        assert!(d.due(at(4_000)).is_empty());
    }

    #[test]
    fn a_deadline_within_the_grace_terms_then_kills() {
        let mut d = Deadline::new(at(10_000), Duration::from_secs(2));
        assert_eq!(d.due(at(7_800)), vec![Signal::SIGTERM]);
        assert!(d.due(at(8_000)).is_empty());
        assert_eq!(d.due(at(9_800)), vec![Signal::SIGKILL]);
    }

    #[test]
    fn a_suspend_past_the_deadline_kills_at_the_first_look_after_the_resume() {
        // Looked at 1 s in; the host then sleeps for an hour. The boot
        // clock counts the hour, so the next look is past the deadline.
        let mut d = Deadline::new(at(10_000), Duration::from_secs(2));
        assert!(d.due(at(1_000)).is_empty());
        let after_resume = at(1_000) + Duration::from_secs(3600);
        assert_eq!(d.due(after_resume), vec![Signal::SIGTERM, Signal::SIGKILL]);
    }
}
