//! The nemesis: guarded commands while an operator does everything at once.
//!
//! Three agents on a three-member etcd cluster (TTL 3 s), each with a
//! leader task on lock `lead` and an `every 1s` task on lock `tick`, and two
//! `coord lock tick` loops beside them. A driver picks a fault at random
//! every 1–3 s: SIGTERM and restart of an agent, SIGHUP with a changed
//! task, `kill -9` of an agent (restarted a moment later), `kill -9` of a
//! supervisor, SIGSTOP of an agent past its TTL then SIGCONT, `etcdctl del`
//! of a holder key, and a restart of one etcd member.
//!
//! Every guarded command appends `start`, `beat` and `end` lines (token,
//! pid) to its lock's log and holds an exclusive `flock` on the lock's
//! witness file while any process of its group lives. Appends to one file
//! are ordered by the kernel, so the log's order is the true order across
//! processes and no clocks are compared; a command that cannot take the
//! flock at its start logs `overlap` — the kernel's word that the previous
//! command still ran. The checker counts, per lock: commands whose lines
//! interleave with a later command's start (overlaps), tokens not strictly
//! increasing in start order, and, at the end, processes left running
//! (found by a marker in their environment).
//!
//! An overlap right after an `etcdctl del` of the running command's holder
//! key is the operator breaking the lock by hand: the next waiter takes it
//! at once while the old command is being stopped (TERM, its grace, KILL).
//! Those are counted apart, and must end within the grace.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use coord::etcd::local::LocalCluster;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::Rng;

use crate::Ctx;
use crate::harness::{Proc, children};
use crate::report::{Report, Row, Stat, Unit};

const TTL: &str = "3s";
const GRACE: &str = "600ms";
const LOCKS: [&str; 2] = ["lead", "tick"];
const MARKER: &str = "COORD_NEMESIS";

/// The guarded command: runs `min..min+spread` beats of 50 ms, or stops
/// with TERM in 8 more beats (400 ms, within the grace).
fn script(dir: &Path, lock: &str, who: &str, min: u32, spread: u32) -> String {
    let log = dir.join(format!("{lock}.log"));
    let witness = dir.join(format!("{lock}.witness"));
    let (log, witness) = (log.display(), witness.display());
    format!(
        "exec 9>>{witness}; flock -n 9 || echo \"overlap $COORD_FENCING_TOKEN $$ {who}\" >> {log}; \
         echo \"start $COORD_FENCING_TOKEN $$ {who}\" >> {log}; \
         stopping() {{ for i in 1 2 3 4 5 6 7 8; do echo \"beat $COORD_FENCING_TOKEN $$ {who}\" >> {log}; sleep 0.05; done; \
         echo \"end $COORD_FENCING_TOKEN $$ {who}\" >> {log}; exit 0; }}; trap stopping TERM; \
         n=$((RANDOM % {spread} + {min})); i=0; \
         while [ $i -lt $n ]; do echo \"beat $COORD_FENCING_TOKEN $$ {who}\" >> {log}; sleep 0.05; i=$((i+1)); done; \
         echo \"end $COORD_FENCING_TOKEN $$ {who}\" >> {log}"
    )
}

fn toml_argv(script: &str) -> String {
    format!(
        "[\"bash\", \"-c\", \"{}\"]",
        script.replace('\\', "\\\\").replace('"', "\\\"")
    )
}

struct Agent {
    name: String,
    dir: PathBuf,
    proc: Option<Proc>,
    /// Bumped by each SIGHUP with a changed task.
    generation: u32,
    stopped: bool,
}

impl Agent {
    fn manifest(&self, endpoints: &str, logs: &Path) -> String {
        let lead = script(logs, "lead", &format!("{}-lead", self.name), 10, 30);
        let tick = script(logs, "tick", &format!("{}-tick", self.name), 2, 6);
        format!(
            "[agent]\nname = \"{name}\"\nttl = \"{TTL}\"\nstate_dir = \"state\"\n\n\
             [etcd]\nendpoints = [{endpoints}]\ndial_timeout = \"1s\"\nrequest_timeout = \"1s\"\n\n\
             [[task]]\nname = \"lead\"\nlock = \"lead\"\nschedule = \"leader\"\ngrace = \"{GRACE}\"\n\
             env = {{ GENERATION = \"{gen}\" }}\nrun = {lead}\n\n\
             [[task]]\nname = \"tick\"\nlock = \"tick\"\nschedule = \"every 1s\"\ngrace = \"{GRACE}\"\nrun = {tick}\n",
            name = self.name,
            gen = self.generation,
            lead = toml_argv(&lead),
            tick = toml_argv(&tick),
        )
    }

    fn start(&mut self, ctx: &Ctx, endpoints: &str, logs: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.dir.join("state"))?;
        let path = self.dir.join("agent.toml");
        std::fs::write(&path, self.manifest(endpoints, logs))?;
        self.proc = Some(crate::harness::run_agent_appending(
            &ctx.coord,
            &path,
            &self.dir.join("coord.log"),
            MARKER,
        )?);
        self.stopped = false;
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    fn signal(&self, s: Signal) {
        if let Some(pid) = self.pid() {
            let _ = kill(Pid::from_raw(pid as i32), s);
        }
    }

    /// SIGTERM and wait (bounded) for a clean stop.
    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(15));
        }
    }
}

/// What the driver did, for the report.
#[derive(Debug, Default)]
struct Faults {
    done: BTreeMap<&'static str, u32>,
    /// (lock, token) of holder keys deleted by hand.
    deleted: BTreeSet<(String, i64)>,
}

fn all_supervisors(roots: &[u32]) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo: Vec<u32> = roots.to_vec();
    while let Some(p) = todo.pop() {
        for c in children(p) {
            let cmdline = std::fs::read(format!("/proc/{c}/cmdline")).unwrap_or_default();
            if cmdline.split(|b| *b == 0).nth(1) == Some(b"supervise") {
                out.push(c);
            }
            todo.push(c);
        }
    }
    out
}

/// Processes (not zombies) whose environment holds the marker.
fn marked_processes() -> Vec<u32> {
    let needle = format!("{MARKER}=1");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.get(s.rfind(')')? + 2..).map(|r| r.starts_with('Z')))
                .unwrap_or(true);
            !zombie
                && std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
        })
        .collect()
}

/// The checker's findings for one lock.
#[derive(Debug, Default)]
struct Verdict {
    runs: usize,
    overlaps: usize,
    /// Overlaps with a command whose holder key was deleted by hand, and
    /// the longest of them in log lines of the old command after the new
    /// start (beats are 50 ms apart).
    broken_by_hand: usize,
    broken_longest_beats: usize,
    token_order: usize,
}

fn check(log: &Path, lock: &str, deleted: &BTreeSet<(String, i64)>) -> anyhow::Result<Verdict> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut spans: BTreeMap<(i64, u32), (usize, usize)> = BTreeMap::new();
    let mut starts: Vec<(i64, u32, usize)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() != 4 {
            bail!("{}: bad line {i}: {line:?}", log.display());
        }
        let token: i64 = f[1]
            .parse()
            .with_context(|| format!("a token at line {i}"))?;
        let pid: u32 = f[2].parse().with_context(|| format!("a pid at line {i}"))?;
        let span = spans.entry((token, pid)).or_insert((i, i));
        span.1 = i;
        if f[0] == "start" {
            starts.push((token, pid, i));
        }
    }
    let mut v = Verdict {
        runs: starts.len(),
        ..Verdict::default()
    };
    for (n, &(t1, p1, s1)) in starts.iter().enumerate() {
        if n > 0 && t1 <= starts[n - 1].0 {
            v.token_order += 1;
        }
        // Every earlier command still writing after this one started.
        for &(t0, p0, s0) in &starts[..n] {
            let last0 = spans[&(t0, p0)].1;
            if s0 < s1 && last0 > s1 {
                let late = text
                    .lines()
                    .skip(s1)
                    .take(last0 - s1 + 1)
                    .filter(|l| l.split(' ').nth(2) == Some(&p0.to_string()[..]))
                    .count();
                if deleted.contains(&(lock.to_owned(), t0)) {
                    v.broken_by_hand += 1;
                    v.broken_longest_beats = v.broken_longest_beats.max(late);
                } else {
                    v.overlaps += 1;
                    println!(
                        "  OVERLAP on {lock}: token {t0} (pid {p0}) wrote {late} lines after token {t1} (pid {p1}) started"
                    );
                }
            }
        }
    }
    Ok(v)
}

pub async fn run(ctx: &Ctx, report: &mut Report, runs: usize) -> anyhow::Result<()> {
    let mut cluster = LocalCluster::start(3)
        .await
        .context("starting a 3-member etcd cluster")?;
    let client = cluster.client().await;
    let endpoints: Vec<String> = cluster.endpoints();
    let quoted = endpoints
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let work = tempfile::tempdir()?;
    let logs = work.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut agents: Vec<Agent> = (0..3)
        .map(|i| Agent {
            name: format!("n{i}"),
            dir: work.path().join(format!("n{i}")),
            proc: None,
            generation: 0,
            stopped: false,
        })
        .collect();
    for a in agents.iter_mut() {
        a.start(ctx, &quoted, &logs)?;
    }
    // Two `coord lock tick` loops.
    let stop_loops = Arc::new(AtomicBool::new(false));
    let lock_pids = Arc::new(std::sync::Mutex::new(BTreeSet::<u32>::new()));
    let mut loops = Vec::new();
    for l in 0..2 {
        let (coord, eps, logs, stop, pids) = (
            ctx.coord.clone(),
            endpoints.join(","),
            logs.clone(),
            stop_loops.clone(),
            lock_pids.clone(),
        );
        loops.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let s = script(&logs, "tick", &format!("lock{l}"), 2, 6);
                let child = Command::new(&coord)
                    .args([
                        "lock",
                        "tick",
                        "--ttl",
                        TTL,
                        "--grace",
                        GRACE,
                        "--endpoints",
                        &eps,
                        "--",
                        "bash",
                        "-c",
                        &s,
                    ])
                    .env(MARKER, "1")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn();
                let Ok(mut child) = child else {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                };
                pids.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(child.id());
                let _ = child.wait();
                pids.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&child.id());
            }
        }));
    }
    let started = Instant::now();
    let mut faults = Faults::default();
    let mut rng = rand::rng();
    let count_runs = || -> usize {
        LOCKS
            .iter()
            .map(|l| {
                std::fs::read_to_string(logs.join(format!("{l}.log")))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.starts_with("start "))
                    .count()
            })
            .sum()
    };
    let limit = Duration::from_secs(60 * 30);
    while count_runs() < runs {
        if started.elapsed() > limit {
            bail!("only {} guarded runs in {limit:?}", count_runs());
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
        let which = rng.random_range(0..7);
        let i = rng.random_range(0..agents.len());
        let name: &'static str = match which {
            0 => {
                agents[i].stop();
                agents[i].start(ctx, &quoted, &logs)?;
                "SIGTERM and restart of an agent"
            }
            1 => {
                agents[i].generation += 1;
                let text = agents[i].manifest(&quoted, &logs);
                std::fs::write(agents[i].dir.join("agent.toml"), text)?;
                agents[i].signal(Signal::SIGHUP);
                "SIGHUP with a changed task"
            }
            2 => {
                if let Some(mut p) = agents[i].proc.take() {
                    p.kill_leader();
                    // Dropping it would kill its group: the supervisors,
                    // which must see their parent go and stop on their own.
                    std::mem::forget(p);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                agents[i].start(ctx, &quoted, &logs)?;
                "kill -9 of an agent (restarted 0.5 s later)"
            }
            3 => {
                let mut roots: Vec<u32> = agents.iter().filter_map(Agent::pid).collect();
                roots.extend(lock_pids.lock().unwrap_or_else(|p| p.into_inner()).iter());
                let sups = all_supervisors(&roots);
                if sups.is_empty() {
                    continue;
                }
                let victim = sups[rng.random_range(0..sups.len())];
                let _ = kill(Pid::from_raw(victim as i32), Signal::SIGKILL);
                "kill -9 of a supervisor"
            }
            4 => {
                agents[i].signal(Signal::SIGSTOP);
                tokio::time::sleep(Duration::from_millis(4000)).await;
                agents[i].signal(Signal::SIGCONT);
                "SIGSTOP of an agent for 4 s (TTL 3 s), then SIGCONT"
            }
            5 => {
                let lock = LOCKS[rng.random_range(0..LOCKS.len())];
                let held = client
                    .get_prefix(&format!("/coord/locks/{lock}/"))
                    .await
                    .map(|r| r.kvs)
                    .unwrap_or_default();
                let Some(first) = held.iter().min_by_key(|kv| kv.create_revision) else {
                    continue;
                };
                faults
                    .deleted
                    .insert((lock.to_owned(), first.create_revision));
                let _ = Command::new("etcdctl")
                    .env("ETCDCTL_API", "3")
                    .args(["--endpoints", &endpoints.join(","), "del", &first.key])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                "etcdctl del of the holder key"
            }
            _ => {
                let m = rng.random_range(0..cluster.len());
                cluster
                    .member(m)
                    .restart()
                    .context("restarting an etcd member")?;
                "restart of one etcd member of three"
            }
        };
        *faults.done.entry(name).or_default() += 1;
    }
    let duration = started.elapsed();
    // The end: the loops finish their current command, every agent stops.
    stop_loops.store(true, Ordering::SeqCst);
    for l in loops {
        let _ = tokio::task::spawn_blocking(move || l.join()).await;
    }
    for a in agents.iter_mut() {
        a.stop();
    }
    // Whatever was stopping has had its grace.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let left = marked_processes();
    for pid in &left {
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }
    let mut total = Verdict::default();
    for lock in LOCKS {
        let v = check(&logs.join(format!("{lock}.log")), lock, &faults.deleted)?;
        let flocked = std::fs::read_to_string(logs.join(format!("{lock}.log")))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("overlap "))
            .count();
        println!(
            "  lock {lock}: {} runs, {} overlaps, {} after a holder key was deleted by hand (flock saw {flocked} in all), {} tokens out of order",
            v.runs, v.overlaps, v.broken_by_hand, v.token_order
        );
        total.runs += v.runs;
        total.overlaps += v.overlaps;
        total.broken_by_hand += v.broken_by_hand;
        total.broken_longest_beats = total.broken_longest_beats.max(v.broken_longest_beats);
        total.token_order += v.token_order;
    }
    println!("  {} s, faults:", duration.as_secs());
    for (name, n) in &faults.done {
        println!("    {n:>3}  {name}");
    }
    if !left.is_empty() {
        println!("  LEFT RUNNING after every agent stopped: {left:?}");
    }
    let count = |n: usize| Stat::one(n as f64);
    report.add(
        Row::new("nemesis", "guarded runs under faults", Unit::Count)
            .coord(count(total.runs))
            .target(format!("≥ {runs}"), total.runs >= runs),
    );
    report.add(
        Row::new("nemesis", "overlapping lifetimes", Unit::Count)
            .coord(count(total.overlaps))
            .target("0", total.overlaps == 0),
    );
    report.add(
        Row::new("nemesis", "tokens out of start order", Unit::Count)
            .coord(count(total.token_order))
            .target("0", total.token_order == 0),
    );
    report.add(
        Row::new("nemesis", "processes left running at the end", Unit::Count)
            .coord(count(left.len()))
            .target("0", left.is_empty()),
    );
    // 50 ms beats: the old command's lines after the new start bound how
    // long it still ran; its stop takes 8 beats (within the 600 ms grace).
    report.add(
        Row::new(
            "nemesis",
            "overlaps after `etcdctl del` of the holder key (lock broken by hand)",
            Unit::Count,
        )
        .coord(count(total.broken_by_hand))
        .target(
            format!(
                "old command gone within the grace (longest: {} lines ≈ {} ms)",
                total.broken_longest_beats,
                total.broken_longest_beats * 50
            ),
            total.broken_longest_beats <= 20,
        ),
    );
    Ok(())
}
