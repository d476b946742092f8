//! DNS: a `coord run` agent's `[dns]` server against dnsmasq serving the
//! same records (A from a hosts file, SRV from `srv-host` lines), both
//! loaded by dnsperf over loopback UDP, one after the other.
//!
//! Two figures per query type: queries per second with dnsperf's default
//! 100 queries outstanding (the server saturated), and the latency of each
//! query at a fixed 2,000 queries per second (median and p99 from
//! dnsperf's per-query lines). The agent answers from its watch cache;
//! dnsmasq from its in-memory hosts table.

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hickory_server::proto::op::Message;
use hickory_server::proto::rr::{Name, RecordType};

use crate::Ctx;
use crate::harness::{Agent, Proc};
use crate::report::{Report, Row, Stat, Unit};

const SERVICES: usize = 10;
const INSTANCES: usize = 3;
/// The fixed rate latency is measured at: well below either server's
/// ceiling, so the figure is the answer's cost, not a queue's.
const LATENCY_QPS: u32 = 2_000;

pub async fn run(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    for (program, check) in [("dnsperf", "-h"), ("dnsmasq", "--version")] {
        let ran = Command::new(program)
            .arg(check)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if ran.is_err() {
            bail!(
                "`{program}` is not installed; install dnsperf and dnsmasq with `bash deploy/install-deps.sh` \
                 (Debian packages dnsperf, dnsmasq-base)"
            );
        }
    }
    let build = if cfg!(debug_assertions) {
        "debug build"
    } else {
        "release build"
    };
    let dir = tempfile::tempdir()?;
    let (coord_port, peer_port) = (free_port()?, free_port()?);

    let mut services = format!("[dns]\nlisten = \"127.0.0.1:{coord_port}\"\n\n");
    let mut hosts = String::new();
    let mut srv_hosts = Vec::new();
    for s in 0..SERVICES {
        for i in 0..INSTANCES {
            let ip = format!("10.2.{s}.{}", i + 1);
            services.push_str(&format!(
                "[[service]]\nname = \"svc{s}\"\nid = \"i{i}\"\naddress = \"{ip}:8080\"\n"
            ));
            hosts.push_str(&format!(
                "{ip} svc{s}.service.coord i{i}.svc{s}.service.coord\n"
            ));
            srv_hosts.push(format!(
                "--srv-host=svc{s}.service.coord,i{i}.svc{s}.service.coord,8080,1,1"
            ));
        }
    }
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let mut agent = Agent::start(ctx, &agent_dir, "dns-bench", &services, "warn")?;
    let hosts_file = dir.path().join("hosts");
    std::fs::write(&hosts_file, hosts)?;
    let mut dnsmasq = Command::new("dnsmasq");
    dnsmasq
        .args([
            "--keep-in-foreground",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--local-ttl=0",
            "--user=root",
            &format!("--port={peer_port}"),
            &format!("--pid-file={}", dir.path().join("dnsmasq.pid").display()),
        ])
        .arg(format!("--addn-hosts={}", hosts_file.display()))
        .args(&srv_hosts)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _peer = Proc::spawn(dnsmasq)?;

    // Both answer every service with all its instances before timing.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (who, port) in [("coord", coord_port), ("dnsmasq", peer_port)] {
        for s in 0..SERVICES {
            let name = format!("svc{s}.service.coord");
            while ask(port, &name, RecordType::A) != Some(INSTANCES) {
                if who == "coord" {
                    agent.check_running()?;
                }
                if Instant::now() > deadline {
                    bail!("{who} did not answer {name} with {INSTANCES} addresses within 60 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    println!(
        "  {SERVICES} services × {INSTANCES} instances; coord on 127.0.0.1:{coord_port} ({build}), \
         dnsmasq on 127.0.0.1:{peer_port}"
    );

    let secs = ctx.rounds(5, 2);
    for rtype in ["A", "SRV"] {
        let queries = dir.path().join(format!("queries-{rtype}"));
        let lines: String = (0..SERVICES)
            .map(|s| format!("svc{s}.service.coord {rtype}\n"))
            .collect();
        std::fs::write(&queries, lines)?;
        // Warm-up, then coord and the peer alternately.
        dnsperf(coord_port, &queries, 1, None).await?;
        dnsperf(peer_port, &queries, 1, None).await?;
        let coord_qps = dnsperf(coord_port, &queries, secs, None).await?;
        let peer_qps = dnsperf(peer_port, &queries, secs, None).await?;
        let coord_lat = dnsperf(coord_port, &queries, secs, Some(LATENCY_QPS)).await?;
        let peer_lat = dnsperf(peer_port, &queries, secs, Some(LATENCY_QPS)).await?;
        println!(
            "  {rtype}: coord {:.0} qps, dnsmasq {:.0} qps; at {LATENCY_QPS} qps: {} and {} answers timed",
            coord_qps.qps,
            peer_qps.qps,
            coord_lat.latencies_us.len(),
            peer_lat.latencies_us.len()
        );
        let mut qps = Row::new(
            "dns",
            format!("{rtype} queries per second, 100 outstanding ({build})"),
            Unit::Count,
        )
        .coord(Stat::one(coord_qps.qps.round()))
        .peer(Stat::one(peer_qps.qps.round()));
        qps.ratio = Some(format!("{:.2}x", peer_qps.qps / coord_qps.qps));
        report.add(qps);
        report.add(
            Row::new(
                "dns",
                format!("{rtype} query → answer at {LATENCY_QPS} qps ({build})"),
                Unit::Us,
            )
            .coord(Stat::of(&coord_lat.latencies_us))
            .peer(Stat::of(&peer_lat.latencies_us)),
        );
    }
    agent.stop();
    Ok(())
}

/// What one dnsperf run measured.
#[derive(Debug)]
struct Load {
    qps: f64,
    /// Per answer, when timed (`-v`).
    latencies_us: Vec<f64>,
}

/// dnsperf against `127.0.0.1:port` for `secs` seconds; at `rate` queries
/// per second with every answer timed, else as fast as it goes. Fails if
/// any answer is not NOERROR or a query was lost.
async fn dnsperf(
    port: u16,
    queries: &Path,
    secs: usize,
    rate: Option<u32>,
) -> anyhow::Result<Load> {
    let mut cmd = tokio::process::Command::new("dnsperf");
    cmd.args([
        "-s",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-l",
        &secs.to_string(),
    ])
    .arg("-d")
    .arg(queries)
    .stdin(Stdio::null());
    if let Some(rate) = rate {
        cmd.args(["-Q", &rate.to_string(), "-v"]);
    }
    let out = cmd.output().await.context("cannot run dnsperf")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("dnsperf failed ({}):\n{text}", out.status);
    }
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let qps =
        field("Queries per second:").context("no `Queries per second` in dnsperf's output")?;
    if field("Queries lost:").unwrap_or(0.0) > 0.0 {
        bail!("dnsperf lost queries against port {port}:\n{text}");
    }
    let mut latencies_us = Vec::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("> ")) {
        // `> NOERROR name type seconds`
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() != Some(&"NOERROR") {
            bail!("port {port} answered `{line}`");
        }
        if let Some(secs) = f.last().and_then(|s| s.parse::<f64>().ok()) {
            latencies_us.push(secs * 1e6);
        }
    }
    Ok(Load { qps, latencies_us })
}

/// How many answers `name` gets from `127.0.0.1:port`; `None` when nothing
/// answers or the answer is not NOERROR.
fn ask(port: u16, name: &str, rtype: RecordType) -> Option<usize> {
    let socket = UdpSocket::bind("127.0.0.1:0").ok()?;
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    let mut query = Message::query();
    query.metadata.id = rand::random();
    query.add_query(hickory_server::proto::op::Query::query(
        Name::from_ascii(name).ok()?,
        rtype,
    ));
    socket
        .send_to(&query.to_vec().ok()?, ("127.0.0.1", port))
        .ok()?;
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).ok()?;
    let reply = Message::from_vec(&buf[..n]).ok()?;
    (reply.metadata.response_code == hickory_server::proto::op::ResponseCode::NoError)
        .then_some(reply.answers.len())
}

/// A loopback port free for UDP and TCP right now.
fn free_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no loopback port free for both UDP and TCP")
}
