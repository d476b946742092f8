//! Locks, measured against `etcdctl lock`: `cargo bench --bench locks`.
//!
//! 1. Clean handover: the holder's command exits → the next holder's
//!    command has started. A queue of 40 contenders per round, coord and
//!    etcdctl alternating, 3 rounds each; timestamps from bash's
//!    $EPOCHREALTIME inside the commands.
//! 2. Holder killed with -9 → the next holder's command starts, with a 2 s
//!    TTL (target: TTL + 100 ms at most).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use coord::etcd::local::LocalEtcd;

mod common;
use common::percentile;

const QUEUE: usize = 40;
const ROUNDS: usize = 3;
const KILLS: usize = 5;

enum Tool {
    Coord,
    Etcdctl,
}

fn contender(tool: &Tool, endpoint: &str, name: &str, script: &str, ttl: u64) -> Child {
    let mut cmd = match tool {
        Tool::Coord => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_coord"));
            c.args([
                "lock",
                name,
                "--ttl",
                &format!("{ttl}s"),
                "--endpoints",
                endpoint,
                "--",
            ]);
            c
        }
        Tool::Etcdctl => {
            let mut c = Command::new("etcdctl");
            c.env("ETCDCTL_API", "3").args([
                "--endpoints",
                endpoint,
                "--dial-timeout",
                "2s",
                "lock",
                "--ttl",
                &ttl.to_string(),
                &format!("/coord/locks/{name}"),
                "--",
            ]);
            c
        }
    };
    cmd.args(["bash", "-c", script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("coord and etcdctl must be installed (bash deploy/install-deps.sh)")
}

/// Handover gaps (ms) from a log of `start T` / `end T` lines in order.
fn gaps(log: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(log).expect("log");
    let mut last_end: Option<f64> = None;
    let mut out = Vec::new();
    for line in text.lines() {
        let (what, t) = line.split_once(' ').expect("line");
        let t: f64 = t.trim().parse().expect("time");
        match what {
            "start" => {
                if let Some(e) = last_end.take() {
                    out.push((t - e) * 1e3);
                }
            }
            _ => last_end = Some(t),
        }
    }
    out
}

fn handover(tool: &Tool, endpoint: &str, dir: &Path, round: usize) -> Vec<f64> {
    let name = format!("h{round}-{}", matches!(tool, Tool::Coord));
    let log = dir.join(format!("{name}.log"));
    let script = format!(
        "echo \"start $EPOCHREALTIME\" >> {0}; echo \"end $EPOCHREALTIME\" >> {0}",
        log.display()
    );
    // The first contender holds while the others queue up behind it.
    let gate = dir.join(format!("{name}.gate"));
    let first_script = format!(
        "while [ ! -e {} ]; do sleep 0.01; done; {script}",
        gate.display()
    );
    let mut children = vec![contender(tool, endpoint, &name, &first_script, 10)];
    std::thread::sleep(Duration::from_millis(300));
    for _ in 1..QUEUE {
        children.push(contender(tool, endpoint, &name, &script, 10));
    }
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(&gate, "").expect("gate");
    for mut c in children {
        let _ = c.wait();
    }
    gaps(&log)
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn killed(tool: &Tool, endpoint: &str, dir: &Path, round: usize) -> f64 {
    let name = format!("k{round}-{}", matches!(tool, Tool::Coord));
    let started = dir.join(format!("{name}.started"));
    let holder_script = format!("touch {}; sleep 1000", started.display());
    let mut holder = contender(tool, endpoint, &name, &holder_script, 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !started.exists() {
        assert!(Instant::now() < deadline, "the holder never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let next_log = dir.join(format!("{name}.next"));
    let mut next = contender(
        tool,
        endpoint,
        &name,
        &format!("echo $EPOCHREALTIME > {}", next_log.display()),
        2,
    );
    std::thread::sleep(Duration::from_millis(500));
    let killed_at = now_s();
    let _ = holder.kill();
    let _ = holder.wait();
    let _ = next.wait();
    let t: f64 = std::fs::read_to_string(&next_log)
        .expect("next started")
        .trim()
        .parse()
        .expect("time");
    // etcdctl leaves its command running after a kill; clean it up.
    let _ = Command::new("pkill").args(["-f", &holder_script]).status();
    (t - killed_at) * 1e3
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let etcd =
        runtime.block_on(async { LocalEtcd::start().await.unwrap_or_else(|e| panic!("{e}")) });
    let endpoint = etcd.endpoint();
    let dir = tempfile::tempdir().expect("tmp");
    println!(
        "coord locks benchmark — {} cores, etcd at {endpoint}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let (mut coord_h, mut etcdctl_h) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        coord_h.extend(handover(&Tool::Coord, &endpoint, dir.path(), round));
        etcdctl_h.extend(handover(&Tool::Etcdctl, &endpoint, dir.path(), round));
    }
    let (cm, cp) = (
        percentile(&mut coord_h, 0.5),
        percentile(&mut coord_h, 0.99),
    );
    let (em, ep) = (
        percentile(&mut etcdctl_h, 0.5),
        percentile(&mut etcdctl_h, 0.99),
    );
    println!(
        "\nClean handover: holder's command exits -> next holder's command started ({} handovers each)",
        coord_h.len()
    );
    println!("{:<16} {:>10} {:>10}", "", "median", "p99");
    println!("{:<16} {:>7.3} ms {:>7.3} ms", "coord lock", cm, cp);
    println!("{:<16} {:>7.3} ms {:>7.3} ms", "etcdctl lock", em, ep);
    println!(
        "etcdctl/coord median = {:.2}x (target: at least 2x)",
        em / cm
    );
    let (mut coord_k, mut etcdctl_k) = (Vec::new(), Vec::new());
    for round in 0..KILLS {
        coord_k.push(killed(&Tool::Coord, &endpoint, dir.path(), round));
        etcdctl_k.push(killed(&Tool::Etcdctl, &endpoint, dir.path(), round));
    }
    println!("\nHolder killed with -9 -> next holder's command started (TTL 2 s, {KILLS} each)");
    println!("{:<16} {:>10} {:>10}", "", "median", "max");
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!(
        "{:<16} {:>7.0} ms {:>7.0} ms",
        "coord lock",
        percentile(&mut coord_k.clone(), 0.5),
        max(&coord_k)
    );
    println!(
        "{:<16} {:>7.0} ms {:>7.0} ms",
        "etcdctl lock",
        percentile(&mut etcdctl_k.clone(), 0.5),
        max(&etcdctl_k)
    );
    println!(
        "target for coord: at most TTL + 100 ms = 2100 ms (etcd grants at least the TTL, so the floor is the TTL)"
    );
}
