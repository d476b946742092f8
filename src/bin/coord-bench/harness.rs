//! The bench harness the scenarios share: finding programs, waiting for files, reading
//! /proc, running `coord run` agents.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::Ctx;

/// The `coord` binary next to this program (both come from one
/// `cargo build --release --bins`).
pub fn coord_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find this program's own path")?;
    let coord = me.with_file_name("coord");
    if !coord.is_file() {
        bail!(
            "the `coord` binary is not next to coord-bench (looked for {}); build it with \
             `cargo build --release --bins` and run target/release/coord-bench",
            coord.display()
        );
    }
    Ok(coord)
}

/// Fails, saying how to install it, when `program` is not on PATH.
pub fn require_program(program: &str) -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .any(|d| d.join(program).is_file());
    if !found {
        bail!(
            "`{program}` is not on PATH; install etcd and etcdctl with `bash deploy/install-deps.sh`"
        );
    }
    Ok(())
}

/// `machine: 2 cores, <CPU model>, Linux <kernel>, etcd <version>, load …`.
pub fn machine_line() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".to_owned(), |s| s.trim().to_owned());
    let etcd = coord::etcd::local::etcd_binary()
        .ok()
        .and_then(|bin| Command::new(bin).arg("--version").output().ok())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .and_then(|l| l.split_whitespace().last().map(str::to_owned))
        })
        .unwrap_or_else(|| "?".to_owned());
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    format!(
        "machine: {cores} cores, {cpu}, Linux {kernel}, etcd {etcd}; load average {load} at the start"
    )
}

/// Milliseconds between two instants, negative if `b` is before `a`.
pub fn ms_between(a: Instant, b: Instant) -> f64 {
    if b >= a {
        (b - a).as_secs_f64() * 1e3
    } else {
        -((a - b).as_secs_f64() * 1e3)
    }
}

/// Waits (polling every 20 µs, off the async workers) until `path` holds
/// exactly `want`; returns when it first did.
pub fn wait_for(path: &Path, want: &str, timeout: Duration) -> anyhow::Result<Instant> {
    tokio::task::block_in_place(|| {
        let deadline = Instant::now() + timeout;
        loop {
            if std::fs::read(path).is_ok_and(|b| b == want.as_bytes()) {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not read {want:?} within {timeout:?}",
                    path.display()
                );
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    })
}

/// Waits until every file of `paths` holds `want`; returns, for each, when
/// it was first seen so (sweeping the ones not yet done every 100 µs).
pub fn wait_all(paths: &[PathBuf], want: &str, timeout: Duration) -> anyhow::Result<Vec<Instant>> {
    tokio::task::block_in_place(|| {
        let deadline = Instant::now() + timeout;
        let mut seen: Vec<Option<Instant>> = vec![None; paths.len()];
        let mut left = paths.len();
        while left > 0 {
            for (p, s) in paths.iter().zip(seen.iter_mut()) {
                if s.is_none() && std::fs::read(p).is_ok_and(|b| b == want.as_bytes()) {
                    *s = Some(Instant::now());
                    left -= 1;
                }
            }
            if left > 0 {
                if Instant::now() > deadline {
                    bail!(
                        "{left} of {} files did not read {want:?} within {timeout:?}",
                        paths.len()
                    );
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        Ok(seen.into_iter().flatten().collect())
    })
}

/// A `VmRSS:`-style field of /proc/<pid>/status, in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// VmRSS and VmHWM of `pid`, in MiB.
pub fn rss_mib(pid: u32) -> (f64, f64) {
    let f = |field| proc_status_kib(pid, field).map_or(f64::NAN, |k| k as f64 / 1024.0);
    (f("VmRSS"), f("VmHWM"))
}

/// The direct children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    coord::agent::process::processes()
        .map(|all| all.filter(|p| p.ppid == pid).map(|p| p.pid).collect())
        .unwrap_or_default()
}

/// `etcdctl --endpoints <endpoint>` with the v3 API.
pub fn etcdctl(endpoint: &str) -> Command {
    let mut c = Command::new("etcdctl");
    c.env("ETCDCTL_API", "3").args(["--endpoints", endpoint]);
    c
}

/// A child process in its own process group, killed (the whole group) on
/// drop.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    /// Stopped and its group killed already: nothing left for drop.
    done: bool,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> anyhow::Result<Proc> {
        let child = cmd
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
        Ok(Proc { child, done: false })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL to the process alone (not its group), and reap it.
    pub fn kill_leader(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `patience`; SIGKILL to the group if still
    /// there (or if anything of its group is left).
    pub fn stop(&mut self, patience: Duration) {
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = self.child.wait();
        self.done = true;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A `coord run` agent on a manifest written into `dir`.
#[derive(Debug)]
pub struct Agent {
    pub proc: Proc,
    pub log: PathBuf,
}

impl Agent {
    /// Starts `coord run <dir>/agent.toml` with `body` after an `[agent]`
    /// and `[etcd]` header for `name`; `log_filter` is `COORD_LOG`.
    pub fn start(
        ctx: &Ctx,
        dir: &Path,
        name: &str,
        body: &str,
        log_filter: &str,
    ) -> anyhow::Result<Agent> {
        Agent::start_on(ctx, &[ctx.endpoint()], dir, name, body, log_filter)
    }

    /// [`Agent::start`] against `endpoints` (etcd members or proxies).
    pub fn start_on(
        ctx: &Ctx,
        endpoints: &[String],
        dir: &Path,
        name: &str,
        body: &str,
        log_filter: &str,
    ) -> anyhow::Result<Agent> {
        std::fs::create_dir_all(dir.join("state"))?;
        let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        let manifest = format!(
            "[agent]\nname = \"{name}\"\nttl = \"10s\"\nstate_dir = \"state\"\n\n\
             [etcd]\nendpoints = [{}]\n\n{body}",
            endpoints.join(", ")
        );
        let path = dir.join("agent.toml");
        std::fs::write(&path, manifest)?;
        let log = dir.join("coord.log");
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new(&ctx.coord);
        cmd.arg("run")
            .arg(&path)
            .env("COORD_LOG", log_filter)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        Ok(Agent {
            proc: Proc::spawn(cmd)?,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The last lines of its log, for an error message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// Fails with the log's tail if the agent has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.proc.child.try_wait() {
            bail!("coord run exited ({status}):\n{}", self.log_tail());
        }
        Ok(())
    }

    /// A clean stop (SIGTERM: the lease is revoked).
    pub fn stop(mut self) {
        self.proc.stop(Duration::from_secs(5));
    }
}

/// The WASM plugin `log-events`, built with deploy/build-plugins.sh if it
/// is not there yet.
pub fn log_events_plugin(ctx: &Ctx) -> anyhow::Result<PathBuf> {
    let wasm = ctx
        .root
        .join("plugins/target/wasm32-wasip2/release/log_events.wasm");
    if wasm.is_file() {
        return Ok(wasm);
    }
    let script = ctx.root.join("deploy/build-plugins.sh");
    println!("  building the WASM plugins: bash {}", script.display());
    let status = Command::new("bash")
        .arg(&script)
        .env_remove("CARGO_TARGET_DIR")
        .stdout(Stdio::null())
        .status()
        .context("cannot run deploy/build-plugins.sh")?;
    if !status.success() || !wasm.is_file() {
        bail!(
            "building the WASM plugins failed ({status}); run `bash deploy/build-plugins.sh` \
             in {} (it needs the wasm32-wasip2 target: rustup target add wasm32-wasip2)",
            ctx.root.display()
        );
    }
    Ok(wasm)
}

/// User and system CPU time of `pid` so far, in milliseconds.
pub fn cpu_ms(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which may hold spaces) in parentheses;
    // utime and stime are fields 14 and 15, in clock ticks.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) * 1000.0 / hz,
        _ => f64::NAN,
    }
}

/// `coord run <manifest>` at info, its output appended to `log` (kept across
/// restarts), marked with `marker=1` in its environment so that whatever it
/// leaves running can be found.
pub fn run_agent_appending(
    coord: &Path,
    manifest: &Path,
    log: &Path,
    marker: &str,
) -> anyhow::Result<Proc> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut cmd = Command::new(coord);
    cmd.arg("run")
        .arg(manifest)
        .env(marker, "1")
        .env("COORD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    Proc::spawn(cmd)
}
