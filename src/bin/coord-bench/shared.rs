//! Shared etcd: an agent rendering from `/app/` on an etcd that also serves
//! everyone else. Three windows, each with a fresh agent and a fresh peer
//! (`etcdctl watch --prefix /app/`, which also sees only `/app/`):
//!
//! - quiet: nothing else happens;
//! - busy: another client writes 10,000 unrelated keys during the window;
//! - loaded: 200 MiB of unrelated data sits in etcd.
//!
//! For each: the renders the agent did after it settled (counted from its
//! debug log; target 0 — nothing it reads changed), its CPU time over the
//! window (utime + stime from /proc/<pid>/stat) and its RSS.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::Ctx;
use crate::harness::{Agent, Proc, cpu_ms, etcdctl, rss_mib};
use crate::report::{Report, Row, Stat, Unit};

/// Unrelated keys written during the busy window.
const WRITES: usize = 10_000;

pub async fn run(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let window = Duration::from_secs(ctx.rounds(10, 4) as u64);
    let bulk_mib = ctx.rounds(200, 200);
    for i in 0..20 {
        ctx.client
            .put(&format!("/app/settings/{i:02}"), format!("value {i}"), None)
            .await?;
    }
    let quiet = measure(ctx, window, Load::Quiet).await?;
    let busy = measure(ctx, window, Load::Busy).await?;
    println!("  writing {bulk_mib} MiB of unrelated data …");
    let big = vec![b'z'; 1 << 20];
    for i in 0..bulk_mib {
        ctx.client
            .put(&format!("/bulk/{i:04}"), big.clone(), None)
            .await?;
    }
    let loaded = measure(ctx, window, Load::Quiet).await?;
    ctx.client.delete_prefix("/bulk/").await?;
    ctx.client.delete_prefix("/other/").await?;
    ctx.client.delete_prefix("/app/").await?;
    println!(
        "  window {} s; busy: {WRITES} unrelated writes took {:.1} s",
        window.as_secs(),
        busy.writing.as_secs_f64()
    );

    report.add(
        Row::new(
            "shared",
            format!("renders caused by {WRITES} unrelated writes"),
            Unit::Count,
        )
        .coord(Stat::one(busy.renders as f64))
        .target("0", busy.renders == 0),
    );
    report.add(
        Row::new("shared", "agent CPU time, quiet etcd", Unit::Ms)
            .coord(Stat::one(quiet.cpu_ms))
            .peer(Stat::one(quiet.peer_cpu_ms)),
    );
    let cpu_noise = (quiet.cpu_ms * 0.5).max(30.0);
    report.add(
        Row::new(
            "shared",
            format!("agent CPU time, {WRITES} unrelated writes"),
            Unit::Ms,
        )
        .coord(Stat::one(busy.cpu_ms))
        .peer(Stat::one(busy.peer_cpu_ms))
        .target(
            format!("≤ quiet + {cpu_noise:.0} ms (noise)"),
            busy.cpu_ms <= quiet.cpu_ms + cpu_noise,
        ),
    );
    report.add(
        Row::new("shared", "agent RSS, quiet etcd", Unit::MiB)
            .coord(Stat::one(quiet.rss))
            .peer(Stat::one(quiet.peer_rss)),
    );
    report.add(
        Row::new(
            "shared",
            format!("agent RSS, {WRITES} unrelated writes"),
            Unit::MiB,
        )
        .coord(Stat::one(busy.rss))
        .peer(Stat::one(busy.peer_rss))
        .target("≤ quiet + 2 MiB", busy.rss <= quiet.rss + 2.0),
    );
    report.add(
        Row::new(
            "shared",
            format!("agent RSS, {bulk_mib} MiB unrelated data"),
            Unit::MiB,
        )
        .coord(Stat::one(loaded.rss))
        .peer(Stat::one(loaded.peer_rss))
        .target("≤ quiet + 2 MiB", loaded.rss <= quiet.rss + 2.0),
    );
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    Quiet,
    Busy,
}

#[derive(Debug)]
struct Window {
    renders: usize,
    cpu_ms: f64,
    rss: f64,
    peer_cpu_ms: f64,
    peer_rss: f64,
    writing: Duration,
}

/// Starts an agent and a peer, waits until the agent's file is rendered,
/// then measures over `window` (with the writes of a busy one).
async fn measure(ctx: &Ctx, window: Duration, load: Load) -> anyhow::Result<Window> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("app.conf");
    let body = format!(
        "[[file]]\npath = \"{}\"\nsource = \"{{% for k, v in keys('/app/settings/')|items %}}{{{{ k }}}} = {{{{ v }}}}\\n{{% endfor %}}\"\n",
        out.display()
    );
    let mut agent = Agent::start(
        ctx,
        &dir.path().join("agent"),
        "bench-shared",
        &body,
        "warn,coord::agent::files=debug",
    )?;
    let mut cmd = etcdctl(&ctx.endpoint());
    cmd.args(["watch", "--prefix", "/app/"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut peer = Proc::spawn(cmd)?;
    let started = Instant::now();
    while !out.exists() {
        agent.check_running()?;
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the agent did not render in 60 s:\n{}", agent.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let start-up work (connections, the first watch) finish first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let renders_before = renders(&agent);
    let (cpu_before, peer_cpu_before) = (cpu_ms(agent.pid()), cpu_ms(peer.pid()));
    let begun = Instant::now();
    let mut writing = Duration::ZERO;
    if load == Load::Busy {
        // One key per request, as many clients writing would.
        for i in 0..WRITES {
            ctx.client
                .put(
                    &format!("/other/{i:05}"),
                    format!("unrelated write {i}"),
                    None,
                )
                .await?;
        }
        writing = begun.elapsed();
    }
    if let Some(rest) = window.checked_sub(begun.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    agent.check_running()?;
    let result = Window {
        renders: renders(&agent) - renders_before,
        cpu_ms: cpu_ms(agent.pid()) - cpu_before,
        rss: rss_mib(agent.pid()).0,
        peer_cpu_ms: cpu_ms(peer.pid()) - peer_cpu_before,
        peer_rss: rss_mib(peer.pid()).0,
        writing,
    };
    peer.stop(Duration::from_secs(1));
    agent.stop();
    Ok(result)
}

/// Renders so far, from the files controller's debug lines.
fn renders(agent: &Agent) -> usize {
    std::fs::read_to_string(&agent.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Rendered file") || l.contains("Render failed"))
        .count()
}
