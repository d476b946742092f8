//! Lock handover, `coord lock` against `etcdctl lock` on the same lock
//! layout.
//!
//! 1. Clean handover: the holder's command exits → the next holder's
//!    command has started. A queue of contenders per round, coord and
//!    etcdctl alternating; timestamps from bash's `$EPOCHREALTIME` inside
//!    the commands.
//! 2. Holder killed with -9 → the next holder's command starts, with a 2 s
//!    TTL (target: TTL + 100 ms at most). etcdctl leaves its command
//!    running after it is killed (coord's supervisor kills it before the
//!    lease can expire); the leftover is killed with the holder's process
//!    group afterwards.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use coord::agent::supervise::Supervised;
use coord::etcd::{Clock, Session};
use coord::lock::{self, Holder, Mode};

use crate::Ctx;
use crate::harness::{Proc, etcdctl, ms_between};
use crate::report::{Report, Row, Stat, Unit};

const TTL_S: u64 = 2;

#[derive(Debug, Clone, Copy)]
enum Tool {
    Coord,
    Etcdctl,
}

fn contender(ctx: &Ctx, tool: Tool, name: &str, script: &str, ttl: u64) -> Command {
    let mut cmd = match tool {
        Tool::Coord => {
            let mut c = Command::new(&ctx.coord);
            c.args(["lock", name, "--ttl", &format!("{ttl}s"), "--endpoints"])
                .arg(ctx.endpoint())
                .arg("--");
            c
        }
        Tool::Etcdctl => {
            let mut c = etcdctl(&ctx.endpoint());
            c.args([
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
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// Handover gaps (ms) from a log of `start T` / `end T` lines in order.
fn gaps(log: &Path) -> anyhow::Result<Vec<f64>> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let mut last_end: Option<f64> = None;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((what, t)) = line.split_once(' ') else {
            bail!("bad line in {}: {line:?}", log.display());
        };
        let t: f64 = t.trim().parse().context("a time")?;
        match what {
            "start" => {
                if let Some(e) = last_end.take() {
                    out.push((t - e) * 1e3);
                }
            }
            _ => last_end = Some(t),
        }
    }
    Ok(out)
}

fn handover(
    ctx: &Ctx,
    tool: Tool,
    dir: &Path,
    round: usize,
    queue: usize,
) -> anyhow::Result<Vec<f64>> {
    let name = format!("h{round}-{tool:?}");
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
    let spawn = |s: &str| -> anyhow::Result<Child> {
        contender(ctx, tool, &name, s, 10)
            .spawn()
            .context("starting a contender")
    };
    let mut children = vec![spawn(&first_script)?];
    std::thread::sleep(Duration::from_millis(300));
    for _ in 1..queue {
        children.push(spawn(&script)?);
    }
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(&gate, "")?;
    for mut c in children {
        let _ = c.wait();
    }
    let g = gaps(&log)?;
    if g.len() + 1 != queue {
        bail!("{tool:?}: only {} of {queue} contenders ran", g.len() + 1);
    }
    Ok(g)
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn killed(ctx: &Ctx, tool: Tool, dir: &Path, round: usize) -> anyhow::Result<f64> {
    let name = format!("k{round}-{tool:?}");
    let started = dir.join(format!("{name}.started"));
    let holder_script = format!("touch {}; sleep 1000", started.display());
    let mut holder = Proc::spawn(contender(ctx, tool, &name, &holder_script, TTL_S))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !started.exists() {
        if Instant::now() > deadline {
            bail!("{tool:?}: the holder never started");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let next_log = dir.join(format!("{name}.next"));
    let mut next = Proc::spawn(contender(
        ctx,
        tool,
        &name,
        &format!("echo $EPOCHREALTIME > {}", next_log.display()),
        TTL_S,
    ))?;
    std::thread::sleep(Duration::from_millis(500));
    let killed_at = now_s();
    holder.kill_leader();
    let _ = next.child.wait();
    let t: f64 = std::fs::read_to_string(&next_log)
        .with_context(|| format!("{tool:?}: the next holder never started"))?
        .trim()
        .parse()
        .context("a time")?;
    // Dropping `holder` kills its process group: etcdctl's orphaned command.
    drop(holder);
    Ok((t - killed_at) * 1e3)
}

/// The same handover through the library alone, in this process: one
/// session holds, another waits in `lock::acquire`; from the release being
/// sent to the waiter's `acquire` returning. What is left of the command
/// line's handover beyond this is processes: the supervisor noticing the
/// exit, `coord lock` exiting, the next supervisor starting the command.
async fn library_handover(ctx: &Ctx, rounds: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (a, b) = (ctx.etcd.client().await, ctx.etcd.client().await);
    let (sa, sb) = (
        Session::start(a.clone(), Duration::from_secs(10)),
        Session::start(b.clone(), Duration::from_secs(10)),
    );
    let (la, lb) = (sa.wait_alive().await, sb.wait_alive().await);
    let me = Holder {
        agent: "coord-bench".into(),
        host: "localhost".into(),
        pid: std::process::id(),
    };
    let (mut samples, mut rpc) = (Vec::new(), Vec::new());
    for round in 0..rounds + 10 {
        let name = format!("lib-{round}");
        let held = lock::acquire(&a, la, "/coord", &name, Mode::Mutex, &me).await?;
        let waiter = {
            let (b, me, name) = (b.clone(), me.clone(), name.clone());
            tokio::spawn(async move {
                let g = lock::acquire(&b, lb, "/coord", &name, Mode::Mutex, &me).await;
                (Instant::now(), g)
            })
        };
        // Let the waiter queue up and watch.
        tokio::time::sleep(Duration::from_millis(30)).await;
        let sent = Instant::now();
        held.release(&a).await?;
        let released = Instant::now();
        let (got, next) = waiter.await?;
        next?.release(&b).await?;
        if round >= 10 {
            samples.push(ms_between(sent, got));
            rpc.push(ms_between(sent, released));
        }
    }
    sa.close().await;
    sb.close().await;
    Ok((samples, rpc))
}

/// Each of `rounds` runs of `bash -c`: how long it takes from being
/// spawned to running its first command (the process start every handover
/// pays once), and from that command's end to its parent's `wait`
/// returning (the exit every handover must notice). Milliseconds.
fn bash_runs(rounds: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    use std::io::Read as _;
    let (mut starts, mut exits) = (Vec::new(), Vec::new());
    for round in 0..rounds + 5 {
        let spawned = now_s();
        let mut child = Command::new("bash")
            .args(["-c", "echo $EPOCHREALTIME"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("bash must be installed")?;
        let mut printed = String::new();
        child
            .stdout
            .take()
            .context("bash's stdout")?
            .read_to_string(&mut printed)?;
        child.wait()?;
        let waited = now_s();
        let t: f64 = printed.trim().parse().context("a time from bash")?;
        if round >= 5 {
            starts.push((t - spawned) * 1e3);
            exits.push((waited - t) * 1e3);
        }
    }
    Ok((starts, exits))
}

/// The same `bash -c` run under `coord supervise`, as a lock holder runs
/// it: from `go` sent to the command's first instruction, and from its
/// last to the parent's `wait` returning (the supervisor reaps it, checks
/// its group is empty and reports `exit`). Against [`bash_runs`] this is
/// what the supervisor — the part that makes a command never outlive its
/// lock — adds to a handover. Milliseconds.
async fn supervised_runs(ctx: &Ctx, rounds: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("t");
    let argv = vec![
        "bash".to_owned(),
        "-c".to_owned(),
        format!("echo $EPOCHREALTIME > {}", out.display()),
    ];
    let clock = Clock::default();
    let (mut starts, mut exits) = (Vec::new(), Vec::new());
    for round in 0..rounds + 5 {
        let mut sup = Supervised::prepare(&ctx.coord, &argv, Duration::from_secs(1))
            .context("starting `coord supervise`")?;
        // As under `coord lock`: the supervisor is up and waiting before
        // the lock is taken.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let go = now_s();
        sup.go(clock.now() + Duration::from_secs(60), &[]).await;
        let code = sup.wait().await;
        let waited = now_s();
        if code != 0 {
            bail!("the supervised `bash -c` exited {code}");
        }
        let t: f64 = std::fs::read_to_string(&out)?
            .trim()
            .parse()
            .context("a time from bash")?;
        if round >= 5 {
            starts.push((t - go) * 1e3);
            exits.push((waited - t) * 1e3);
        }
    }
    Ok((starts, exits))
}

pub async fn run(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let (queue, rounds, kills) = if ctx.quick { (20, 2, 2) } else { (40, 3, 5) };
    let (library, delete) = library_handover(ctx, ctx.rounds(60, 20)).await?;
    let (library, delete) = (Stat::of(&library), Stat::of(&delete));
    println!(
        "  library handover: of its {:.2} ms median, the release (a delete) takes {:.2} ms to be acknowledged",
        library.median, delete.median
    );
    let (starts, exits) = bash_runs(ctx.rounds(100, 30))?;
    let (bash, exit) = (Stat::of(&starts), Stat::of(&exits));
    // Nothing can start the next command before etcd has committed the
    // release, nor have it running before a process start.
    let floor = Stat::one(delete.median + bash.median);
    println!(
        "  floor: release acknowledged {:.2} ms + `bash -c` started {:.2} ms = {:.2} ms",
        delete.median, bash.median, floor.median
    );
    // What any lock tool that runs commands also does on the way: notice
    // the holder's command exit, and the waiter learn of the release and
    // confirm it is first (the library's handover: etcdctl confirms with
    // two reads, coord with one).
    let full = Stat::one(exit.median + library.median + bash.median);
    println!(
        "  full floor: exit noticed {:.2} ms + library handover {:.2} ms + `bash -c` started {:.2} ms = {:.2} ms",
        exit.median, library.median, bash.median, full.median
    );
    // coord's own floor: the same path with the command under its
    // supervisor, which nothing in coord's guarantee lets it skip.
    let (sup_starts, sup_exits) = supervised_runs(ctx, ctx.rounds(100, 30)).await?;
    let (sup_start, sup_exit) = (Stat::of(&sup_starts), Stat::of(&sup_exits));
    let supervised = Stat::one(sup_exit.median + library.median + sup_start.median);
    println!(
        "  supervised floor: exit reported {:.2} ms + library handover {:.2} ms + supervised start {:.2} ms = {:.2} ms ({:.2}x the floor)",
        sup_exit.median,
        library.median,
        sup_start.median,
        supervised.median,
        supervised.median / floor.median
    );
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        // One unmeasured round each to warm caches up.
        handover(ctx, Tool::Coord, dir.path(), 100, 5)?;
        handover(ctx, Tool::Etcdctl, dir.path(), 100, 5)?;
        let (mut coord_h, mut etcdctl_h) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            coord_h.extend(handover(ctx, Tool::Coord, dir.path(), round, queue)?);
            etcdctl_h.extend(handover(ctx, Tool::Etcdctl, dir.path(), round, queue)?);
        }
        let (c, e) = (Stat::of(&coord_h), Stat::of(&etcdctl_h));
        println!(
            "  clean handover: {} handovers each ({rounds} queues of {queue}, alternating)",
            coord_h.len()
        );
        println!(
            "  coord / floor = {:.2} (target ≤ 1.25); etcdctl / floor = {:.2}; coord / full floor = {:.2}; coord / etcdctl = {:.2}",
            c.median / floor.median,
            e.median / floor.median,
            c.median / full.median,
            c.median / e.median
        );
        report.add(
            Row::new("locks", "holder's command exits → next started", Unit::Ms)
                .coord(c)
                .peer(e)
                .target(
                    format!("≤ 1.25x the floor ({:.2} ms)", floor.median),
                    c.median <= 1.25 * floor.median,
                ),
        );
        report.add(
            Row::new(
                "locks",
                "the same in the library: release → acquire returns",
                Unit::Ms,
            )
            .coord(library),
        );
        report.add(
            Row::new(
                "locks",
                "floor: release acknowledged + one `bash -c` start",
                Unit::Ms,
            )
            .coord(floor),
        );
        report.add(
            Row::new(
                "locks",
                "full floor: exit noticed + library handover + `bash -c` start",
                Unit::Ms,
            )
            .coord(full),
        );
        report.add(
            Row::new(
                "locks",
                "supervised floor: exit reported + library handover + supervised start",
                Unit::Ms,
            )
            .coord(supervised),
        );
        report.add(
            Row::new(
                "locks",
                "holder's command exits → next started, vs the full floor",
                Unit::Ms,
            )
            .coord(c)
            .peer(e)
            .target(
                format!("≤ 1.25x the full floor ({:.2} ms)", full.median),
                c.median <= 1.25 * full.median,
            ),
        );

        let (mut coord_k, mut etcdctl_k) = (Vec::new(), Vec::new());
        for round in 0..kills {
            coord_k.push(killed(ctx, Tool::Coord, dir.path(), round)?);
            etcdctl_k.push(killed(ctx, Tool::Etcdctl, dir.path(), round)?);
        }
        let limit = (TTL_S * 1000 + 100) as f64;
        let c = Stat::of(&coord_k);
        println!(
            "  holder killed with -9: TTL {TTL_S} s, {kills} each; p99 = the largest; the floor is the TTL \
             (etcd keeps the lease at least that long)"
        );
        report.add(
            Row::new(
                "locks",
                "holder killed -9 → next started (TTL 2 s)",
                Unit::Ms,
            )
            .coord(c)
            .peer(Stat::of(&etcdctl_k))
            .target(format!("≤ TTL + 100 ms = {limit:.0} ms"), c.p99 <= limit),
        );
        Ok(())
    })
}
