//! Idle RSS: one `coord run` agent with every resource kind in use — a
//! service with a TCP check, a rendered file with a WASM hook, a leader
//! task, an instance id with a shell hook — idle for a while after it has
//! settled, next to an idle `etcdctl watch --prefix /` started at the same
//! time. VmRSS, RssAnon and VmHWM from /proc/<pid>/status.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::Ctx;
use crate::harness::{Agent, Proc, children, etcdctl, log_events_plugin, proc_status_kib, rss_mib};
use crate::report::{Report, Row, Stat, Unit};

pub async fn run(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let idle = Duration::from_secs(ctx.rounds(10, 3) as u64);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let accept = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            drop(conn);
        }
    });
    ctx.client.put("/idle/config", "idle", None).await?;
    let wasm = match log_events_plugin(ctx) {
        Ok(wasm) => Some(wasm),
        Err(e) => {
            println!("  no WASM hook (the plugins could not be built: {e:#}); a shell hook only");
            None
        }
    };
    let mut cmd = etcdctl(&ctx.endpoint());
    cmd.args(["watch", "--prefix", "/"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut peer = Proc::spawn(cmd)?;
    let all = settle_and_idle(ctx, port, wasm.as_deref(), idle).await?;
    let (peer_rss, peer_hwm) = rss_mib(peer.pid());
    let peer_threads = proc_status_kib(peer.pid(), "Threads").unwrap_or(0);
    let peer_anon = anon_mib(peer.pid());
    peer.stop(Duration::from_secs(1));
    // The same without the WASM hook: what the WASM engine costs.
    let shell_only = match wasm {
        Some(_) => Some(settle_and_idle(ctx, port, None, idle).await?),
        None => None,
    };
    accept.abort();
    ctx.client.delete("/idle/config").await?;

    println!(
        "  settled in {:.1} s, then idle {} s; agent threads {}, etcdctl threads {peer_threads}; \
         the leader task's supervisor (`coord supervise`, a separate process): {}",
        all.settled.as_secs_f64(),
        idle.as_secs(),
        all.threads,
        all.supervisors
    );
    report.add(
        Row::new("idle", "agent RSS (VmRSS), every kind in use", Unit::MiB)
            .coord(Stat::one(all.rss))
            .peer(Stat::one(peer_rss))
            .target("≤ etcdctl watch's", all.rss <= peer_rss),
    );
    report.add(
        Row::new(
            "idle",
            "of which private (RssAnon; the rest is mapped code)",
            Unit::MiB,
        )
        .coord(Stat::one(all.anon))
        .peer(Stat::one(peer_anon)),
    );
    report.add(
        Row::new("idle", "agent peak RSS (VmHWM)", Unit::MiB)
            .coord(Stat::one(all.hwm))
            .peer(Stat::one(peer_hwm)),
    );
    if let Some(s) = shell_only {
        report.add(
            Row::new(
                "idle",
                "agent RSS, the same without the WASM hook",
                Unit::MiB,
            )
            .coord(Stat::one(s.rss))
            .peer(Stat::one(peer_rss)),
        );
    }
    Ok(())
}

/// Anonymous (private) resident memory: heap and stacks, without the pages
/// of the binary and libraries that VmRSS also counts.
fn anon_mib(pid: u32) -> f64 {
    proc_status_kib(pid, "RssAnon").map_or(f64::NAN, |k| k as f64 / 1024.0)
}

#[derive(Debug)]
struct Idle {
    rss: f64,
    anon: f64,
    hwm: f64,
    threads: u64,
    settled: Duration,
    supervisors: String,
}

/// Starts an agent with every resource kind (the file's hook in WASM if
/// `wasm` is given), waits until all are in place, lets it idle, measures.
async fn settle_and_idle(
    ctx: &Ctx,
    port: u16,
    wasm: Option<&Path>,
    idle: Duration,
) -> anyhow::Result<Idle> {
    let dir = tempfile::tempdir()?;
    let (file_hook, wasm_hook) = match wasm {
        Some(wasm) => (
            "on_change = [\"audit\"]\n",
            format!(
                "[[hook]]\nname = \"audit\"\nwasm = '{}'\n\n",
                wasm.display()
            ),
        ),
        None => ("on_change = [\"note\"]\n", String::new()),
    };
    let d = dir.path();
    let marker = d.join("leader.running");
    let body = format!(
        "[[service]]\nname = \"idle\"\naddress = \"127.0.0.1:{port}\"\n\
         check = {{ tcp = \"127.0.0.1:{port}\", interval = \"1s\" }}\n\n\
         [[file]]\npath = \"{}\"\nkey = \"/idle/config\"\n{file_hook}\n\
         [[task]]\nname = \"idle-leader\"\nschedule = \"leader\"\n\
         run = [\"sh\", \"-c\", \"touch {}; exec sleep 100000\"]\n\n\
         [[instance_id]]\npool = \"idle\"\nsize = 16\nfile = \"{}\"\non_change = [\"note\"]\n\n\
         {wasm_hook}[[hook]]\nname = \"note\"\nexec = [\"/bin/true\"]\n",
        d.join("rendered.txt").display(),
        marker.display(),
        d.join("instance-id").display(),
    );
    let mut agent = Agent::start(ctx, &d.join("agent"), "bench-idle", &body, "warn")?;
    let started = Instant::now();
    loop {
        agent.check_running()?;
        let listed = !ctx
            .client
            .get_prefix("/coord/services/idle/")
            .await?
            .kvs
            .is_empty();
        if listed
            && marker.exists()
            && d.join("rendered.txt").exists()
            && d.join("instance-id").exists()
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "the agent did not settle in 60 s (service listed {listed}, leader {}, file {}, id {}):\n{}",
                marker.exists(),
                d.join("rendered.txt").exists(),
                d.join("instance-id").exists(),
                agent.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let settled = started.elapsed();
    tokio::time::sleep(idle).await;
    agent.check_running()?;
    let (rss, hwm) = rss_mib(agent.pid());
    let anon = anon_mib(agent.pid());
    let threads = proc_status_kib(agent.pid(), "Threads").unwrap_or(0);
    let supervisors: Vec<String> = children(agent.pid())
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "coord")
        })
        .map(|p| format!("pid {p} {:.1} MiB", rss_mib(p).0))
        .collect();
    agent.stop();
    Ok(Idle {
        rss,
        hwm,
        anon,
        threads,
        settled,
        supervisors: if supervisors.is_empty() {
            "not found".to_owned()
        } else {
            supervisors.join(", ")
        },
    })
}
