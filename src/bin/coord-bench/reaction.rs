//! Reaction: a put is sent → the file holds the new value.
//!
//! coord: a `coord run` agent with a `[[file]]` rendering one key (staged,
//! fsynced, renamed, directory fsynced). Peer: `etcdctl watch --prefix … --
//! sh -c 'printf … > tmp && mv tmp file'` (no fsync). The floor is the bare
//! put's acknowledgement. Rounds alternate coord / peer after a warm-up.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::Ctx;
use crate::harness::{Agent, Proc, etcdctl, ms_between, wait_for};
use crate::report::{Report, Row, Stat, Unit};

const WARMUP: usize = 20;
const PATIENCE: Duration = Duration::from_secs(10);

pub async fn run(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let rounds = ctx.rounds(300, 60);
    let dir = tempfile::tempdir()?;
    let coord_out = dir.path().join("coord.out");
    let peer_out = dir.path().join("peer.out");
    let client = &ctx.client;
    client.put("/bench/coord", "start", None).await?;
    let agent_dir = dir.path().join("agent");
    let mut agent = Agent::start(
        ctx,
        &agent_dir,
        "bench-reaction",
        &format!(
            "[[file]]\npath = \"{}\"\nkey = \"/bench/coord\"\n",
            coord_out.display()
        ),
        "warn",
    )?;
    wait_for(&coord_out, "start", PATIENCE)
        .map_err(|e| anyhow::anyhow!("{e}; agent log:\n{}", agent.log_tail()))?;
    let mut peer = spawn_peer(&ctx.endpoint(), &peer_out, "/bench/peer")?;
    // etcdctl says nothing once its watch is set up: put until it reacts.
    let mut n = 0;
    loop {
        n += 1;
        client.put("/bench/peer", format!("start{n}"), None).await?;
        if wait_for(&peer_out, &format!("start{n}"), Duration::from_millis(500)).is_ok() {
            break;
        }
        anyhow::ensure!(n < 20, "etcdctl watch never wrote {}", peer_out.display());
    }

    let (mut floor, mut coord_sent, mut peer_sent) = (Vec::new(), Vec::new(), Vec::new());
    let (mut coord_acked, mut peer_acked) = (Vec::new(), Vec::new());
    for round in 0..WARMUP + rounds {
        let value = format!("v{round}");
        let sent = Instant::now();
        client.put("/bench/coord", value.clone(), None).await?;
        let acked = Instant::now();
        let done = wait_for(&coord_out, &value, PATIENCE)?;
        let sent_peer = Instant::now();
        client.put("/bench/peer", value.clone(), None).await?;
        let acked_peer = Instant::now();
        let done_peer = wait_for(&peer_out, &value, PATIENCE)?;
        if round >= WARMUP {
            floor.push(ms_between(sent, acked));
            floor.push(ms_between(sent_peer, acked_peer));
            coord_sent.push(ms_between(sent, done));
            peer_sent.push(ms_between(sent_peer, done_peer));
            coord_acked.push(ms_between(acked, done));
            peer_acked.push(ms_between(acked_peer, done_peer));
        }
    }
    agent.check_running()?;
    agent.stop();
    peer.stop(Duration::from_secs(1));

    let floor = Stat::of(&floor);
    let coord = Stat::of(&coord_sent);
    let limit = floor.median + 1.0;
    println!(
        "  {rounds} rounds each, alternating, after {WARMUP} warm-up; coord: fsync + rename + fsync dir, \
         etcdctl: sh -c 'printf > tmp; mv' (no fsync)"
    );
    println!(
        "  coord median - bare put median = {:.3} ms (target: at most 1 ms)",
        coord.median - floor.median
    );
    report.add(Row::new("reaction", "bare put acknowledged (the floor)", Unit::Ms).coord(floor));
    report.add(
        Row::new("reaction", "put sent → file replaced", Unit::Ms)
            .coord(coord)
            .peer(Stat::of(&peer_sent))
            .target(
                format!("median ≤ put + 1 ms = {limit:.2} ms"),
                coord.median <= limit,
            ),
    );
    report.add(
        Row::new("reaction", "put acknowledged → file replaced", Unit::Ms)
            .coord(Stat::of(&coord_acked))
            .peer(Stat::of(&peer_acked)),
    );
    Ok(())
}

/// `etcdctl watch --prefix <prefix> -- sh -c '…'` writing each value into
/// `out` (through a temporary file and `mv`).
pub fn spawn_peer(endpoint: &str, out: &std::path::Path, prefix: &str) -> anyhow::Result<Proc> {
    let tmp = out.with_extension("tmp");
    // etcdctl 3.4 puts the value in double quotes; strip them.
    let script = format!(
        "v=${{ETCD_WATCH_VALUE#\\\"}}; printf '%s' \"${{v%\\\"}}\" > '{}' && mv '{}' '{}'",
        tmp.display(),
        tmp.display(),
        out.display()
    );
    let mut cmd = etcdctl(endpoint);
    cmd.args(["watch", "--prefix", prefix, "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Proc::spawn(cmd).context("starting etcdctl watch")
}
