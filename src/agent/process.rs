//! The one place coord starts a child process, and the one way it stops one.
//!
//! Every child gets:
//! - **its own process group** (unless it must stay in its caller's, see
//!   [`Grouping::Caller`]), so that stopping it reaches whatever it started:
//!   *stop* is TERM to the group, a grace period, KILL to the group, and
//!   then waiting until no process of the group runs any more;
//! - **`PR_SET_PDEATHSIG` = KILL**, so it dies when the coord thread that
//!   started it goes, even by `kill -9`. (The signal follows the *thread*
//!   that forked: coord starts children from tokio's worker threads or a
//!   plain main thread, which live as long as the process.)
//! - **an environment without coord's secrets**: `COORD_PASSWORD`, the
//!   variable a manifest's `password_env` names ([`withhold_env`]), and
//!   systemd's `NOTIFY_SOCKET` (only the agent speaks for its unit).
//!
//! A run to completion ([`run`]: hooks, exec checks, `check` commands) ends
//! when its leader exits: the rest of its group is killed then, so a `cmd &`
//! left holding stdout cannot hang it, and its output readers are bounded by
//! the same timeout. A hook that wants a daemon must hand it to the service
//! manager (`systemd-run`, `systemctl start`), not leave it behind.

use std::collections::{BTreeSet, VecDeque};
use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tracing::info;

use crate::untrusted::Untrusted;

/// Longest line kept or logged from a child's output; the rest of the
/// line is cut.
pub const LINE_LIMIT: usize = 4096;
/// Lines of a child's output logged per run; the rest are only counted.
const LOGGED_LINES: usize = 200;
/// Lines kept (the last ones) per stream, to explain a failure.
const KEPT_LINES: usize = 20;

/// Variables no child inherits, whoever starts it.
static WITHHELD: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
const ALWAYS_WITHHELD: [&str; 2] = ["COORD_PASSWORD", crate::agent::status::NOTIFY_SOCKET];

/// Keeps the variable `name` (a manifest's `password_env`) out of every
/// child's environment from now on.
pub fn withhold_env(name: &str) {
    WITHHELD
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.to_owned());
}

/// Where a child's process group is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// A group of its own, led by the child.
    Own,
    /// The caller's group: for `coord lock` re-entering a lock inside a
    /// guarded command, whose group the outer supervisor stops as one.
    Caller,
}

/// What happens to a child when the coord thread that started it dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnParentDeath {
    /// The kernel KILLs it (`PR_SET_PDEATHSIG`).
    Kill,
    /// It notices on its own and stops what it runs in order: the
    /// supervisor, which sees its socket close.
    Notice,
}

/// A command for `argv` with coord's rules applied: the group, death with
/// its parent, the environment scrubbed. The caller adds its environment,
/// stdio, and spawns it (std, or `tokio::process::Command::from`).
pub fn command<S: AsRef<OsStr>>(
    argv: &[S],
    grouping: Grouping,
    on_parent_death: OnParentDeath,
) -> std::process::Command {
    let (program, args) = match argv.split_first() {
        Some((p, a)) => (p.as_ref(), a),
        None => (OsStr::new(""), &[][..]),
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    for name in ALWAYS_WITHHELD {
        cmd.env_remove(name);
    }
    for name in WITHHELD.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        cmd.env_remove(name);
    }
    if grouping == Grouping::Own {
        cmd.process_group(0);
    }
    if on_parent_death == OnParentDeath::Kill {
        die_with_parent(&mut cmd);
    }
    cmd
}

/// Asks the kernel to KILL the child when the thread that forks it ends.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut std::process::Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe calls are allowed. It makes two plain system
    // calls (prctl, getppid), allocates nothing, and builds its error from
    // an errno without allocating.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
            // The parent died before the request took effect: die now.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(Errno::ESRCH as i32));
            }
            Ok(())
        });
    }
}

/// Starts a lock-guarded command — the supervisor's child — as
/// [`command`] with [`Grouping::Own`] and [`OnParentDeath::Kill`] would, the
/// supervisor's environment plus `env` and stdin from /dev/null, and returns
/// its pid once it has exec'd.
///
/// *Why not `Command::spawn`:* the death signal must be asked for in the
/// child (`pre_exec`), which makes std fork — copying this process's page
/// tables, then tearing the copy down at exec: about a millisecond, on
/// every lock handover's path. Here the child borrows our memory until it
/// execs (`CLONE_VM | CLONE_VFORK`, as `posix_spawn` does), and does only
/// what the async-signal-safe calls below do: nothing in it allocates.
#[allow(unsafe_code)]
pub fn spawn_leader<S: AsRef<OsStr>>(
    argv: &[S],
    env: &std::collections::BTreeMap<String, String>,
) -> std::io::Result<Pid> {
    use std::ffi::{CString, OsString};
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    use std::sync::atomic::{AtomicI32, Ordering};

    use nix::libc;
    use nix::sched::CloneFlags;

    let c_string = |bytes: &[u8]| {
        CString::new(bytes).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a NUL byte in the command",
            )
        })
    };
    let args = argv
        .iter()
        .map(|a| c_string(a.as_ref().as_bytes()))
        .collect::<std::io::Result<Vec<_>>>()?;
    if args.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no command given",
        ));
    }
    let mut vars: std::collections::BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for name in ALWAYS_WITHHELD {
        vars.remove(OsStr::new(name));
    }
    for name in WITHHELD.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        vars.remove(OsStr::new(name));
    }
    vars.extend(env.iter().map(|(k, v)| (k.into(), v.into())));
    let vars = vars
        .iter()
        .map(|(k, v)| c_string(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<std::io::Result<Vec<_>>>()?;
    let argp: Vec<*const libc::c_char> = args
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = vars
        .iter()
        .map(|v| v.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let devnull = std::fs::File::open("/dev/null")?;
    let devnull = devnull.as_raw_fd();
    let parent = nix::unistd::getpid().as_raw();
    // Written by the child, which shares our memory, if it cannot exec.
    let failed = AtomicI32::new(0);
    let mut stack = vec![0u8; 64 * 1024];
    let child = Box::new(|| -> isize {
        // SAFETY: plain system calls on data prepared above; no allocation,
        // no lock, no unwinding: the child either execs or `_exit`s.
        unsafe {
            let fail = || -> isize {
                failed.store(nix::errno::Errno::last_raw().max(1), Ordering::SeqCst);
                libc::_exit(127)
            };
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return fail();
            }
            // The parent died before the request took effect: die now.
            if libc::getppid() != parent {
                libc::_exit(127);
            }
            if libc::setpgid(0, 0) != 0 || libc::dup2(devnull, 0) < 0 {
                return fail();
            }
            // Rust ignores SIGPIPE; a command expects the default, as
            // `Command::spawn` would give it.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            libc::execvpe(argp[0], argp.as_ptr(), envp.as_ptr());
            fail()
        }
    });
    // SAFETY: the child runs on `stack`, which is far larger than the
    // calls above need, and we are suspended until it execs or exits.
    let pid = unsafe {
        nix::sched::clone(
            child,
            &mut stack,
            CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK,
            Some(libc::SIGCHLD),
        )
    }?;
    match failed.load(Ordering::SeqCst) {
        0 => Ok(pid),
        code => {
            let _ = nix::sys::wait::waitpid(pid, None);
            Err(std::io::Error::from_raw_os_error(code))
        }
    }
}

/// Waits for our child `pid` to end (reaping it) and returns its status.
pub fn wait_exit(pid: Pid) -> std::io::Result<ExitStatus> {
    use nix::sys::wait::{WaitStatus, waitpid};
    use std::os::unix::process::ExitStatusExt;
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(ExitStatus::from_raw(code << 8)),
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                return Ok(ExitStatus::from_raw(signal as i32));
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// A process group: signalled as one, and known empty once no process of
/// it runs. Linux does not reuse a group's id while any process (even a
/// zombie) is in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group(i32);

impl Group {
    /// The group led by `pid` (a child started with [`Grouping::Own`]).
    pub fn led_by(pid: u32) -> Group {
        Group(pid as i32)
    }

    /// The group's id.
    pub fn id(self) -> u32 {
        self.0 as u32
    }

    /// Sends `signal` to every process of the group (none left is fine).
    pub fn signal(self, signal: Signal) {
        if self.0 > 1 {
            let _ = killpg(Pid::from_raw(self.0), signal);
        }
    }

    /// Whether a process of the group may still run. Zombies do not count:
    /// they run nothing, and whoever reaps them (init may not) is not us.
    pub fn is_alive(self) -> bool {
        if self.0 <= 1 {
            return false;
        }
        match killpg(Pid::from_raw(self.0), None) {
            Err(Errno::ESRCH) => false,
            _ => members_running(self.0),
        }
    }

    /// KILL to the group, then waits until none of it runs.
    pub async fn kill_and_wait(self) {
        self.signal(Signal::SIGKILL);
        self.wait_gone().await;
    }

    /// Waits until no process of the group runs.
    pub async fn wait_gone(self) {
        let mut pause = Duration::from_millis(1);
        while self.is_alive() {
            // Killed processes may linger while they leave the kernel.
            self.signal(Signal::SIGKILL);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

/// Whether a process other than a zombie has process group `pgid`.
fn members_running(pgid: i32) -> bool {
    match processes() {
        Some(mut all) => all.any(|p| p.pgrp == pgid && p.running()),
        // Without /proc, trust the kernel's word that the group exists.
        None => true,
    }
}

/// One process, as `/proc/<pid>/stat` tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub ppid: u32,
    pub pgrp: i32,
    /// `R`, `S`, `D`, `Z` (zombie), …
    pub state: char,
}

impl ProcessInfo {
    /// Not a zombie (nor dead): it may still run code.
    pub fn running(&self) -> bool {
        !matches!(self.state, 'Z' | 'X')
    }
}

/// Every process of the host, from /proc (`None` without /proc).
pub fn processes() -> Option<impl Iterator<Item = ProcessInfo>> {
    let dir = std::fs::read_dir("/proc").ok()?;
    Some(dir.flatten().filter_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // pid (comm) state ppid pgrp …; comm may hold spaces.
        let rest = stat.get(stat.rfind(')')? + 2..)?;
        let mut f = rest.split(' ');
        let state = f.next()?.chars().next()?;
        let ppid = f.next()?.parse().ok()?;
        let pgrp = f.next()?.parse().ok()?;
        Some(ProcessInfo {
            pid,
            ppid,
            pgrp,
            state,
        })
    }))
}

/// Stops a child of ours and its group: TERM, up to `grace` for the leader
/// to exit, KILL; returns once none of the group runs, with the leader's
/// status.
pub async fn stop(
    child: &mut tokio::process::Child,
    group: Group,
    grace: Duration,
) -> Option<ExitStatus> {
    group.signal(Signal::SIGTERM);
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            group.signal(Signal::SIGKILL);
            child.wait().await.ok()
        }
    };
    group.kill_and_wait().await;
    status
}

/// What to run to completion.
#[derive(Debug, Clone)]
pub struct Job<'a> {
    pub argv: &'a [String],
    /// Added to the (scrubbed) environment, in order.
    pub env: Vec<(String, String)>,
    /// Written to its stdin, which is then closed; `None`: /dev/null.
    pub stdin: Option<Vec<u8>>,
    /// From the start to the end of the run and of its output.
    pub timeout: Duration,
    /// Between TERM and KILL when the timeout is up.
    pub grace: Duration,
    /// Log each line of output with this label (at most a few hundred).
    pub log_as: Option<String>,
}

/// The output of one stream of a run: its last lines, each cut at
/// [`LINE_LIMIT`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    pub lines: VecDeque<String>,
    /// Lines that came before the kept ones.
    pub dropped: usize,
}

impl Captured {
    /// The kept lines joined with `sep`, trimmed.
    pub fn joined(&self, sep: &str) -> String {
        let lines: Vec<&str> = self.lines.iter().map(String::as_str).collect();
        lines.join(sep).trim().to_owned()
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct Finished {
    /// The leader's status; `None` when the timeout stopped it.
    pub status: Option<ExitStatus>,
    pub stdout: Captured,
    pub stderr: Captured,
}

/// Why a job did not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start `{program}`: {source}")]
pub struct SpawnError {
    pub program: String,
    #[source]
    pub source: std::io::Error,
}

/// Runs `job` to its end: the leader's exit (then the rest of its group is
/// killed) or the timeout (TERM, grace, KILL to the group). Returns when no
/// process of the group runs and the output is read — or abandoned at the
/// timeout, if something outside the group still holds the pipes.
pub async fn run(job: Job<'_>) -> Result<Finished, SpawnError> {
    let program = job.argv.first().cloned().unwrap_or_default();
    let mut cmd = command(job.argv, Grouping::Own, OnParentDeath::Kill);
    cmd.envs(job.env.iter().map(|(k, v)| (k, v)))
        .stdin(if job.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| {
        super::fd_limit::note(&source);
        SpawnError {
            program: program.clone(),
            source,
        }
    })?;
    super::fd_limit::available();
    let group = Group::led_by(child.id().unwrap_or(0));
    // Dropped (the caller gave up on the run): the whole group goes.
    let _kill_on_drop = KillOnDrop(group);
    let deadline = tokio::time::Instant::now() + job.timeout;
    let feed = {
        let stdin = child.stdin.take();
        let bytes = job.stdin.unwrap_or_default();
        async move {
            if let Some(mut stdin) = stdin {
                // A child that does not read its stdin closes the pipe: fine.
                let _ = stdin.write_all(&bytes).await;
                let _ = stdin.shutdown().await;
            }
        }
    };
    let budget = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(LOGGED_LINES));
    let out = read_lines(
        child.stdout.take(),
        "stdout",
        job.log_as.clone(),
        budget.clone(),
    );
    let err = read_lines(
        child.stderr.take(),
        "stderr",
        job.log_as.clone(),
        budget.clone(),
    );
    // The readers run beside the wait (a child blocked on a full pipe
    // would never exit), all of it bounded by the timeout.
    let readers = async { tokio::join!(out, err) };
    tokio::pin!(readers);
    let mut outputs: Option<(Captured, Captured)> = None;
    let status = {
        let ended = async {
            let (_, status) = tokio::join!(feed, child.wait());
            // The leader's exit ends the run: the rest of its group goes.
            group.kill_and_wait().await;
            status.ok()
        };
        tokio::pin!(ended);
        let mut status: Option<Option<ExitStatus>> = None;
        let _ = tokio::time::timeout_at(deadline, async {
            while status.is_none() || outputs.is_none() {
                tokio::select! {
                    s = &mut ended, if status.is_none() => status = Some(s),
                    o = &mut readers, if outputs.is_none() => outputs = Some(o),
                }
            }
        })
        .await;
        status
    };
    let status = match status {
        Some(status) => status,
        None => {
            stop(&mut child, group, job.grace).await;
            None
        }
    };
    // The group is gone, so the pipes are closed unless something that
    // left the group holds them: the readers get a moment more, no longer.
    let (stdout, stderr) = match outputs {
        Some(o) => o,
        None => tokio::time::timeout(Duration::from_millis(100), &mut readers)
            .await
            .unwrap_or_default(),
    };
    let unlogged = budget.load(std::sync::atomic::Ordering::Relaxed);
    if unlogged == 0
        && let Some(label) = &job.log_as
    {
        info!(child = %label, "Output beyond {LOGGED_LINES} lines was not logged.");
    }
    Ok(Finished {
        status,
        stdout,
        stderr,
    })
}

/// Kills a group when dropped (a run given up half-way).
struct KillOnDrop(Group);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.signal(Signal::SIGKILL);
    }
}

/// Reads `pipe` line by line, each cut at [`LINE_LIMIT`]; logs them while
/// `budget` lasts; keeps the last [`KEPT_LINES`].
async fn read_lines(
    pipe: Option<impl AsyncRead + Unpin>,
    stream: &'static str,
    log_as: Option<String>,
    budget: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Captured {
    use std::sync::atomic::Ordering;
    let mut kept = Captured::default();
    let Some(pipe) = pipe else { return kept };
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // Read up to a newline, but never hold more than LINE_LIMIT bytes
        // of one line: the rest of a long line is skipped.
        let mut line_len = 0usize;
        let mut ended = false;
        loop {
            let available = match reader.fill_buf().await {
                Ok(b) if !b.is_empty() => b,
                _ => {
                    ended = true;
                    break;
                }
            };
            let (chunk, found) = match available.iter().position(|b| *b == b'\n') {
                Some(i) => (&available[..i], Some(i + 1)),
                None => (available, None),
            };
            let room = LINE_LIMIT.saturating_sub(line_len);
            buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            line_len += chunk.len();
            let used = found.unwrap_or(available.len());
            reader.consume(used);
            if found.is_some() {
                break;
            }
        }
        if ended && line_len == 0 {
            return kept;
        }
        // Escaped once here: it is logged now and maybe quoted in an error
        // later, and a child's output must never forge a log line.
        let line = Untrusted(&String::from_utf8_lossy(&buf)).to_string();
        if let Some(label) = &log_as
            && budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
        {
            info!(child = %label, stream, "{line}");
        }
        if kept.lines.len() == KEPT_LINES {
            kept.lines.pop_front();
            kept.dropped += 1;
        }
        kept.lines.push_back(line);
        if ended {
            return kept;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(argv: &[String], timeout_ms: u64) -> Job<'_> {
        Job {
            argv,
            env: Vec::new(),
            stdin: None,
            timeout: Duration::from_millis(timeout_ms),
            grace: Duration::from_millis(100),
            log_as: None,
        }
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn a_background_child_holding_stdout_does_not_hang_the_run() {
        let argv = sh("sleep 1000 & echo done");
        let started = std::time::Instant::now();
        let done = run(job(&argv, 5_000)).await.expect("runs");
        assert!(done.status.is_some_and(|s| s.success()));
        assert_eq!(done.stdout.joined("\n"), "done");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "the leader's exit ended it"
        );
    }

    #[tokio::test]
    async fn a_timeout_stops_the_whole_group_and_the_readers() {
        let argv = sh("sleep 1000 & sleep 1000");
        let done = run(job(&argv, 300)).await.expect("runs");
        assert!(done.status.is_none(), "stopped at its timeout");
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_only_the_last_lines_kept() {
        let argv = sh("head -c 100000 /dev/zero | tr '\\0' x; echo; seq 1 50");
        let done = run(job(&argv, 5_000)).await.expect("runs");
        assert_eq!(done.stdout.lines.len(), KEPT_LINES);
        assert_eq!(done.stdout.lines.back().map(String::as_str), Some("50"));
        assert_eq!(done.stdout.dropped, 51 - KEPT_LINES);
    }

    #[test]
    fn children_never_inherit_coords_secrets() {
        withhold_env("COORD_TEST_PASSWORD_ENV");
        let cmd = command(&["true"], Grouping::Own, OnParentDeath::Kill);
        let removed: Vec<String> = cmd
            .get_envs()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        for name in ["COORD_PASSWORD", "NOTIFY_SOCKET", "COORD_TEST_PASSWORD_ENV"] {
            assert!(removed.iter().any(|r| r == name), "{name} in {removed:?}");
        }
    }
}
