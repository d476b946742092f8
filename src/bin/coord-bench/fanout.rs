//! Fan-out: N agents render from the same prefix; the time from the put's
//! acknowledgement until every one of their files has the new value.
//!
//! coord: N separate `coord run` processes, each with its own connection,
//! session, watch and `[[file]]` (written durably: fsync, rename, fsync
//! dir). Peer: N `etcdctl watch --prefix` processes, each writing its file
//! with `sh -c 'printf > tmp; mv'` (no fsync). Separate processes on both
//! sides, so that the comparison is like for like and nothing is shared
//! that a real fleet would not share; on a 2-core machine this measures
//! mostly how fast N processes can be scheduled, for both.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::Ctx;
use crate::harness::{Agent, ms_between, wait_all};
use crate::reaction::spawn_peer;
use crate::report::{Report, Row, Stat, percentile};

const WARMUP: usize = 3;

pub async fn run(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let n = ctx.fanout_agents;
    let rounds = ctx.rounds(30, 8);
    let client = &ctx.client;
    let dir = tempfile::tempdir()?;
    client.put("/fan/coord/value", "start", None).await?;

    let started = Instant::now();
    let mut agents = Vec::new();
    let mut coord_files: Vec<PathBuf> = Vec::new();
    for i in 0..n {
        let out = dir.path().join(format!("coord-{i:03}.out"));
        let body = format!(
            "[[file]]\npath = \"{}\"\nsource = \"{{% for k, v in keys('/fan/coord/') | items %}}{{{{ v }}}}{{% endfor %}}\"\n",
            out.display()
        );
        agents.push(Agent::start(
            ctx,
            &dir.path().join(format!("agent-{i:03}")),
            &format!("bench-fan-{i:03}"),
            &body,
            "warn",
        )?);
        coord_files.push(out);
    }
    if let Err(e) = wait_all(&coord_files, "start", Duration::from_secs(180)) {
        let mut why = e.to_string();
        for a in &mut agents {
            if let Err(e) = a.check_running() {
                why = format!("{why}\n{e}");
                break;
            }
        }
        bail!(why);
    }
    println!(
        "  {n} coord agents up and rendered in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut peers = Vec::new();
    let mut peer_files: Vec<PathBuf> = Vec::new();
    for i in 0..n {
        let out = dir.path().join(format!("peer-{i:03}.out"));
        peers.push(spawn_peer(&ctx.endpoint(), &out, "/fan/peer/")?);
        peer_files.push(out);
    }
    // etcdctl says nothing once its watch is set up: put until all react.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let v = format!("start{attempt}");
        client.put("/fan/peer/value", v.clone(), None).await?;
        if wait_all(&peer_files, &v, Duration::from_secs(3)).is_ok() {
            break;
        }
        if attempt >= 40 {
            bail!("the {n} etcdctl watchers never all reacted");
        }
    }

    let (mut coord_all, mut peer_all) = (Vec::new(), Vec::new());
    let (mut coord_mid, mut peer_mid) = (Vec::new(), Vec::new());
    for round in 0..WARMUP + rounds {
        let value = format!("v{round}");
        for (key, files, all, mid) in [
            (
                "/fan/coord/value",
                &coord_files,
                &mut coord_all,
                &mut coord_mid,
            ),
            ("/fan/peer/value", &peer_files, &mut peer_all, &mut peer_mid),
        ] {
            client.put(key, value.clone(), None).await?;
            let acked = Instant::now();
            let seen = wait_all(files, &value, Duration::from_secs(60))?;
            if round >= WARMUP {
                let each: Vec<f64> = seen.iter().map(|t| ms_between(acked, *t)).collect();
                all.push(each.iter().copied().fold(f64::MIN, f64::max));
                mid.push(percentile(&each, 0.5));
            }
        }
    }
    for a in &agents {
        let _ = kill(Pid::from_raw(a.pid() as i32), Signal::SIGTERM);
    }
    for a in agents {
        a.stop();
    }
    drop(peers);
    client.delete_prefix("/fan/").await?;

    println!(
        "  {rounds} rounds each, alternating, after {WARMUP} warm-up; the median file had it after \
         {:.1} ms (coord) and {:.1} ms (etcdctl)",
        percentile(&coord_mid, 0.5),
        percentile(&peer_mid, 0.5)
    );
    println!(
        "  why processes: one coord agent per host is what a fleet runs; {n} of them (and {n} etcdctl) \
         on this machine share its cores, so this is an upper bound for both"
    );
    report.add(
        Row::new(
            "fan-out",
            format!("put acked → all {n} agents' files have it"),
            crate::report::Unit::Ms,
        )
        .coord(Stat::of(&coord_all))
        .peer(Stat::of(&peer_all)),
    );
    Ok(())
}
