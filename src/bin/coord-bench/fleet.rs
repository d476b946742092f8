//! Fleet scale (issue 21): N real `coord run` agents — separate processes,
//! each with its own connection, session and watches — against a 3-member
//! etcd on loopback, first connected to the members directly (spread over
//! the three), then through two `etcd grpc-proxy` processes (half the
//! agents on each).
//!
//! Each agent registers a service, claims an instance id from a pool of N
//! and renders a file from a shared prefix plus a key of its own. For each
//! N it measures: start → every service registered, every id claimed,
//! every file rendered; a shared key changed → each file has it (when each
//! file changed is told by inotify, not by polling N files); one agent's own
//! key changed → its file has it, and how many watch events etcd sent for
//! it (1 = nobody else woke); idle: etcd's CPU, watcher count and keepalive
//! messages (from each member's `/metrics`) and the agents' CPU. Without
//! proxies, the same fan-out with N `etcdctl watch` processes gives the
//! ratio.
//!
//! Why processes on one machine: it is what a fleet runs, one agent per
//! host; on 2 cores the N agents and etcd share the CPU, so every latency
//! here is an upper bound. Memory: most of an agent's RSS is shared code
//! pages; the private part is printed for each N.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use coord::etcd::Client;
use coord::etcd::local::LocalCluster;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use notify::Watcher as _;

use crate::Ctx;
use crate::harness::{Agent, Proc, cpu_ms, ms_between, proc_status_kib};
use crate::reaction::spawn_peer;
use crate::report::{Report, Row, Stat, Unit, percentile};

/// Shared-change rounds per N (after one unmeasured).
const ROUNDS: usize = 8;

/// How the agents reach etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Members,
    Proxies,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Members => "direct",
            Via::Proxies => "2 proxies",
        }
    }
}

pub async fn run(
    ctx: &Ctx,
    report: &mut Report,
    sizes: &[usize],
    idle: Duration,
) -> anyhow::Result<()> {
    let _inotify = InotifyLimit::at_least(2 * sizes.iter().max().copied().unwrap_or(0) + 256);
    let cluster = LocalCluster::start(3)
        .await
        .context("starting a 3-member etcd cluster")?;
    let client = cluster.client().await;
    let members = cluster.endpoints();
    let tmp = tempfile::tempdir()?;
    let proxies = Proxies::start(&members, tmp.path())?;
    wait_reachable(&cluster, &proxies.endpoints).await?;
    println!(
        "  3 members ({}), 2 grpc-proxies ({})",
        members.join(", "),
        proxies.endpoints.join(", ")
    );
    for &n in sizes {
        for via in [Via::Members, Via::Proxies] {
            let endpoints = match via {
                Via::Members => &members,
                Via::Proxies => &proxies.endpoints,
            };
            let dir = tmp
                .path()
                .join(format!("n{n}-{}", via.name().replace(' ', "-")));
            let m = match one_fleet(
                ctx, &client, &members, endpoints, &proxies, n, via, &dir, idle,
            )
            .await
            {
                Ok(m) => m,
                // Through the proxies an agent may not work at all (see
                // BENCHMARKS.md): say so and go on with the next size.
                Err(e) if via == Via::Proxies => {
                    println!("  {n} agents, {}: FAILED: {e:#}", via.name());
                    report.failed(
                        "fleet",
                        &format!("{n} agents through 2 grpc-proxies: {e:#}"),
                    );
                    let _ = client.delete_prefix(&format!("/f{n}p/")).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            m.print_and_report(report);
            if via == Via::Members {
                let peer = peers_fanout(&client, &members, n, &dir).await?;
                println!(
                    "  {n} etcdctl watch: shared change → file median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                    peer.median, peer.p99, peer.max
                );
                report.add(
                    Row::new(
                        "fleet",
                        format!(
                            "{n} agents, direct: shared change → each file (vs {n} etcdctl watch)"
                        ),
                        Unit::Ms,
                    )
                    .coord(m.shared)
                    .peer(Stat {
                        median: peer.median,
                        p99: peer.p99,
                    }),
                );
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(())
}

/// What one fleet measured.
struct Measured {
    n: usize,
    via: Via,
    services_ms: f64,
    ids_ms: f64,
    files_ms: f64,
    private_mib: f64,
    shared: Stat,
    shared_max: f64,
    /// Bytes etcd sent to clients per shared change, per agent.
    bytes_per_agent_change: f64,
    own_ms: f64,
    own_events: f64,
    own_others_rewritten: usize,
    etcd_cpu_pct: f64,
    proxies_cpu_pct: f64,
    watchers: f64,
    keepalives_per_s: f64,
    agents_cpu_ms_per_min: f64,
}

impl Measured {
    fn print_and_report(&self, report: &mut Report) {
        let (n, via) = (self.n, self.via.name());
        println!(
            "  {n} agents, {via}: start → services {:.1} s, ids {:.1} s, files {:.1} s; \
             {:.1} MiB private memory per agent",
            self.services_ms / 1e3,
            self.ids_ms / 1e3,
            self.files_ms / 1e3,
            self.private_mib
        );
        println!(
            "  {n} agents, {via}: shared change → file median {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
             etcd sent {:.0} bytes per agent per change",
            self.shared.median, self.shared.p99, self.shared_max, self.bytes_per_agent_change
        );
        println!(
            "  {n} agents, {via}: own key → its file {:.1} ms; watch events etcd sent: {:.0}; \
             other agents' files rewritten: {}",
            self.own_ms, self.own_events, self.own_others_rewritten
        );
        println!(
            "  {n} agents, {via}, idle: etcd CPU {:.2} % of one core (all members){}, {:.0} watchers, \
             {:.1} keepalives/s; agents {:.0} ms CPU per minute in all ({:.2} ms each)",
            self.etcd_cpu_pct,
            if self.via == Via::Proxies {
                format!(", proxies {:.2} %", self.proxies_cpu_pct)
            } else {
                String::new()
            },
            self.watchers,
            self.keepalives_per_s,
            self.agents_cpu_ms_per_min,
            self.agents_cpu_ms_per_min / n as f64
        );
        let row =
            |figure: String, unit| Row::new("fleet", format!("{n} agents, {via}: {figure}"), unit);
        report.add(
            row("start → all registered, claimed, rendered".into(), Unit::Ms).coord(Stat::one(
                self.services_ms.max(self.ids_ms).max(self.files_ms),
            )),
        );
        let shared = row("shared change → each file".into(), Unit::Ms).coord(self.shared);
        report.add(if n >= 1000 {
            shared.target("p99 < 1 s at 1,000", self.shared.p99 < 1000.0)
        } else {
            shared
        });
        report.add(
            row("own key: watch events etcd sent".into(), Unit::Count)
                .coord(Stat::one(self.own_events))
                .target("1 (no other agent woken)", self.own_events <= 1.0),
        );
        let cpu = row("idle etcd CPU, % of one core".into(), Unit::Count)
            .coord(Stat::one(self.etcd_cpu_pct));
        report.add(if n >= 1000 {
            cpu.target("< 10 % at 1,000", self.etcd_cpu_pct < 10.0)
        } else {
            cpu
        });
        report.add(row("etcd watchers".into(), Unit::Count).coord(Stat::one(self.watchers)));
        report.add(
            row("keepalives/s at etcd".into(), Unit::Count).coord(Stat::one(self.keepalives_per_s)),
        );
        report.add(
            row("idle agents' CPU, ms per minute in all".into(), Unit::Ms)
                .coord(Stat::one(self.agents_cpu_ms_per_min)),
        );
    }
}

#[allow(clippy::too_many_arguments)]
async fn one_fleet(
    ctx: &Ctx,
    client: &Client,
    members: &[String],
    endpoints: &[String],
    proxies: &Proxies,
    n: usize,
    via: Via,
    dir: &Path,
    idle: Duration,
) -> anyhow::Result<Measured> {
    let tag = format!("f{n}{}", if via == Via::Members { "d" } else { "p" });
    let (shared_prefix, own_prefix) = (format!("/{tag}/shared/"), format!("/{tag}/own/"));
    let (service, pool) = (format!("{tag}-svc"), format!("{tag}-pool"));
    let out = dir.join("out");
    std::fs::create_dir_all(&out)?;
    client.put(&format!("{shared_prefix}a"), "s0", None).await?;
    for i in 0..n {
        client
            .put(&format!("{own_prefix}{i:04}"), "o0", None)
            .await?;
    }
    let files: Vec<PathBuf> = (0..n)
        .map(|i| out.join(format!("agent-{i:04}.txt")))
        .collect();
    let outputs = Outputs::watch(&out)?;

    let started = Instant::now();
    let mut agents = Vec::with_capacity(n);
    for (i, file) in files.iter().enumerate() {
        let body = format!(
            "[[service]]\nname = \"{service}\"\naddress = \"127.0.0.1:{port}\"\n\n\
             [[instance_id]]\npool = \"{pool}\"\nsize = {n}\n\n\
             [[file]]\npath = \"{file}\"\n\
             source = \"{{% for k, v in keys('{shared_prefix}') | items %}}{{{{ v }}}}{{% endfor %}}|{{{{ key('{own_prefix}{i:04}') }}}}\"\n",
            port = 20000 + i,
            file = file.display(),
        );
        // Each agent lists every endpoint, starting from a different one,
        // so that connections spread as a fleet's would.
        let mine: Vec<String> = (0..endpoints.len())
            .map(|k| endpoints[(i + k) % endpoints.len()].clone())
            .collect();
        agents.push(Agent::start_on(
            ctx,
            &mine,
            &dir.join(format!("agent-{i:04}")),
            &format!("{tag}-{i:04}"),
            &body,
            "warn",
        )?);
    }
    let (mut services_ms, mut ids_ms, mut files_ms) = (None, None, None);
    let deadline = Instant::now() + Duration::from_secs(120 + n as u64 / 2);
    while services_ms.is_none() || ids_ms.is_none() || files_ms.is_none() {
        if Instant::now() > deadline {
            for a in &mut agents {
                a.check_running()?;
            }
            bail!(
                "{n} agents, {}: not all up after {:.0} s (services {}, ids {}, files {})",
                via.name(),
                started.elapsed().as_secs_f64(),
                services_ms.is_some(),
                ids_ms.is_some(),
                files_ms.is_some()
            );
        }
        let now = ms_between(started, Instant::now());
        // A read that times out while a thousand agents start is "not yet".
        let count = |prefix: String| async move {
            client.get_prefix(&prefix).await.map_or(0, |s| s.kvs.len())
        };
        if services_ms.is_none() && count(format!("/coord/services/{service}/")).await >= n {
            services_ms = Some(now);
        }
        if ids_ms.is_none() && count(format!("/coord/ids/{pool}/")).await >= n {
            ids_ms = Some(now);
        }
        if files_ms.is_none()
            && files
                .iter()
                .all(|f| std::fs::read(f).is_ok_and(|b| b == b"s0|o0"))
        {
            files_ms = Some(now);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let private_mib = agents
        .iter()
        .take(20)
        .map(|a| {
            let anon = proc_status_kib(a.pid(), "RssAnon").unwrap_or(0);
            anon as f64 / 1024.0
        })
        .sum::<f64>()
        / agents.len().min(20) as f64;

    // A shared change, seen by every file.
    let mut samples = Vec::new();
    let mut shared_max: f64 = 0.0;
    let mut sent_before = 0.0;
    for round in 0..=ROUNDS {
        if round == 1 {
            sent_before =
                sum_metric(members, "etcd_network_client_grpc_sent_bytes_total", None).await?;
        }
        let value = format!("s{}", round + 1);
        outputs.drain();
        client
            .put(&format!("{shared_prefix}a"), value.clone(), None)
            .await?;
        let acked = Instant::now();
        let seen = tokio::task::block_in_place(|| {
            outputs.wait(&files, &format!("{value}|"), Duration::from_secs(60))
        })?;
        if round > 0 {
            let each: Vec<f64> = seen.iter().map(|t| ms_between(acked, *t)).collect();
            shared_max = shared_max.max(each.iter().copied().fold(0.0, f64::max));
            samples.extend(each);
        }
    }

    let sent =
        sum_metric(members, "etcd_network_client_grpc_sent_bytes_total", None).await? - sent_before;
    let bytes_per_agent_change = sent / ROUNDS as f64 / n as f64;

    // One agent's own key: its file, and who else woke.
    let j = n / 2;
    let events_before = sum_metric(members, "etcd_debugging_mvcc_events_total", None).await?;
    outputs.drain();
    client
        .put(&format!("{own_prefix}{j:04}"), "o1", None)
        .await?;
    let acked = Instant::now();
    let seen = tokio::task::block_in_place(|| {
        outputs.wait(
            std::slice::from_ref(&files[j]),
            "|o1",
            Duration::from_secs(30),
        )
    })?;
    let own_ms = ms_between(acked, seen[0]);
    std::thread::sleep(Duration::from_secs(1));
    let others: std::collections::HashSet<PathBuf> = outputs
        .touched()
        .into_iter()
        .filter(|p| files.contains(p) && *p != files[j])
        .collect();
    let own_events =
        sum_metric(members, "etcd_debugging_mvcc_events_total", None).await? - events_before;

    // Idle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pids: Vec<u32> = agents.iter().map(Agent::pid).collect();
    let agents_cpu = || {
        pids.iter()
            .map(|p| cpu_ms(*p))
            .filter(|c| c.is_finite())
            .sum::<f64>()
    };
    let proxies_cpu = || proxies.procs.iter().map(|p| cpu_ms(p.pid())).sum::<f64>();
    let (cpu0, ka0) = etcd_cpu_and_keepalives(members).await?;
    let (agents0, proxies0, t0) = (agents_cpu(), proxies_cpu(), Instant::now());
    tokio::time::sleep(idle).await;
    let secs = t0.elapsed().as_secs_f64();
    let (cpu1, ka1) = etcd_cpu_and_keepalives(members).await?;
    let (agents1, proxies1) = (agents_cpu(), proxies_cpu());
    let watchers = sum_metric(members, "etcd_debugging_mvcc_watcher_total", None).await?;

    // A clean stop: every lease revoked.
    for a in &agents {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(a.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    for a in agents {
        a.stop();
    }
    client.delete_prefix(&format!("/{tag}/")).await?;
    Ok(Measured {
        n,
        via,
        services_ms: services_ms.unwrap_or(f64::NAN),
        ids_ms: ids_ms.unwrap_or(f64::NAN),
        files_ms: files_ms.unwrap_or(f64::NAN),
        private_mib,
        shared: Stat::of(&samples),
        shared_max,
        bytes_per_agent_change,
        own_ms,
        own_events,
        own_others_rewritten: others.len(),
        etcd_cpu_pct: (cpu1 - cpu0) / secs * 100.0,
        proxies_cpu_pct: (proxies1 - proxies0) / 1e3 / secs * 100.0,
        watchers,
        keepalives_per_s: (ka1 - ka0) / secs,
        agents_cpu_ms_per_min: (agents1 - agents0) * 60.0 / secs,
    })
}

/// Per-file fan-out of `n` `etcdctl watch --prefix` processes.
struct PeerFanout {
    median: f64,
    p99: f64,
    max: f64,
}

async fn peers_fanout(
    client: &Client,
    members: &[String],
    n: usize,
    dir: &Path,
) -> anyhow::Result<PeerFanout> {
    let out = dir.join("peers");
    std::fs::create_dir_all(&out)?;
    let prefix = format!("/peer{n}/");
    let files: Vec<PathBuf> = (0..n)
        .map(|i| out.join(format!("peer-{i:04}.out")))
        .collect();
    let mut peers = Vec::with_capacity(n);
    for (i, f) in files.iter().enumerate() {
        peers.push(spawn_peer(&members[i % members.len()], f, &prefix)?);
    }
    let outputs = Outputs::watch(&out)?;
    // etcdctl says nothing once its watch is set up: put until all react.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let v = format!("w{attempt}");
        outputs.drain();
        client.put(&format!("{prefix}v"), v.clone(), None).await?;
        let ok = tokio::task::block_in_place(|| outputs.wait(&files, &v, Duration::from_secs(10)));
        if ok.is_ok() {
            break;
        }
        if attempt >= 30 {
            bail!("the {n} etcdctl watchers never all reacted");
        }
    }
    let mut samples = Vec::new();
    let mut max: f64 = 0.0;
    for round in 0..ROUNDS {
        let v = format!("p{round}");
        outputs.drain();
        client.put(&format!("{prefix}v"), v.clone(), None).await?;
        let acked = Instant::now();
        let seen =
            tokio::task::block_in_place(|| outputs.wait(&files, &v, Duration::from_secs(60)))?;
        let each: Vec<f64> = seen.iter().map(|t| ms_between(acked, *t)).collect();
        max = max.max(each.iter().copied().fold(0.0, f64::max));
        samples.extend(each);
    }
    drop(peers);
    client.delete_prefix(&prefix).await?;
    Ok(PeerFanout {
        median: percentile(&samples, 0.5),
        p99: percentile(&samples, 0.99),
        max,
    })
}

/// Two `etcd grpc-proxy start` processes in front of the members.
struct Proxies {
    procs: Vec<Proc>,
    endpoints: Vec<String>,
}

impl Proxies {
    fn start(members: &[String], dir: &Path) -> anyhow::Result<Proxies> {
        let hosts: Vec<&str> = members
            .iter()
            .map(|m| m.trim_start_matches("http://"))
            .collect();
        let (mut procs, mut endpoints) = (Vec::new(), Vec::new());
        for k in 0..2 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let log = std::fs::File::create(dir.join(format!("proxy-{k}.log")))?;
            let mut cmd = Command::new(coord::etcd::local::etcd_binary()?);
            cmd.args(["grpc-proxy", "start"])
                .arg(format!("--endpoints={}", hosts.join(",")))
                .arg(format!("--listen-addr=127.0.0.1:{port}"))
                .arg(format!(
                    "--data-dir={}",
                    dir.join(format!("proxy-{k}")).display()
                ))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            procs.push(Proc::spawn(cmd).context("starting etcd grpc-proxy")?);
            endpoints.push(format!("http://127.0.0.1:{port}"));
        }
        Ok(Proxies { procs, endpoints })
    }
}

/// Waits until a read through each of `endpoints` answers.
async fn wait_reachable(cluster: &LocalCluster, endpoints: &[String]) -> anyhow::Result<()> {
    for e in endpoints {
        let mut opts = cluster.connect_options();
        opts.endpoints = vec![e.clone()];
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = match Client::connect(&opts).await {
                Ok(c) => c.get("/probe").await.is_ok(),
                Err(_) => false,
            };
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!("{e} does not answer");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// etcd's CPU seconds and lease keepalive messages received so far, summed
/// over `members`.
async fn etcd_cpu_and_keepalives(members: &[String]) -> anyhow::Result<(f64, f64)> {
    Ok((
        sum_metric(members, "process_cpu_seconds_total", None).await?,
        sum_metric(
            members,
            "grpc_server_msg_received_total",
            Some("grpc_method=\"LeaseKeepAlive\""),
        )
        .await?,
    ))
}

/// The sum over `endpoints` of a metric's samples (those whose labels
/// contain `label`, if given), from each one's `/metrics`.
async fn sum_metric(endpoints: &[String], name: &str, label: Option<&str>) -> anyhow::Result<f64> {
    let http = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut total = 0.0;
    for e in endpoints {
        let url = format!("{e}/metrics");
        let response = http
            .get(url.parse()?)
            .await
            .with_context(|| format!("GET {url}"))?;
        let body = response.into_body().collect().await?.to_bytes();
        for line in String::from_utf8_lossy(&body).lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            if !(rest.starts_with(' ') || rest.starts_with('{'))
                || label.is_some_and(|l| !rest.contains(l))
            {
                continue;
            }
            if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                total += v;
            }
        }
    }
    Ok(total)
}

/// The files of one directory, watched with inotify: when each changed.
struct Outputs {
    events: Receiver<(Instant, PathBuf)>,
    _watcher: notify::RecommendedWatcher,
}

impl Outputs {
    fn watch(dir: &Path) -> anyhow::Result<Outputs> {
        let (tx, events) = std::sync::mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
            let at = Instant::now();
            if let Ok(e) = e {
                for p in e.paths {
                    let _ = tx.send((at, p));
                }
            }
        })?;
        watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
        Ok(Outputs {
            events,
            _watcher: watcher,
        })
    }

    /// Forgets what changed so far.
    fn drain(&self) {
        while self.events.try_recv().is_ok() {}
    }

    /// The paths changed since the last drain.
    fn touched(&self) -> Vec<PathBuf> {
        self.events.try_iter().map(|(_, p)| p).collect()
    }

    /// Waits until each of `files` contains `want`; returns when each was
    /// first seen so (the change's inotify event, or a sweep's time for a
    /// file whose event was missed).
    fn wait(
        &self,
        files: &[PathBuf],
        want: &str,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Instant>> {
        let index: HashMap<&Path, usize> = files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.as_path(), i))
            .collect();
        let mut seen: Vec<Option<Instant>> = vec![None; files.len()];
        let mut left = files.len();
        let has = |p: &Path| std::fs::read_to_string(p).is_ok_and(|t| t.contains(want));
        let deadline = Instant::now() + timeout;
        while left > 0 {
            if Instant::now() > deadline {
                bail!(
                    "{left} of {} files did not get {want:?} within {timeout:?}",
                    files.len()
                );
            }
            match self.events.recv_timeout(Duration::from_millis(500)) {
                Ok((at, p)) => {
                    if let Some(&i) = index.get(p.as_path())
                        && seen[i].is_none()
                        && has(&p)
                    {
                        seen[i] = Some(at);
                        left -= 1;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let now = Instant::now();
                    for (i, f) in files.iter().enumerate() {
                        if seen[i].is_none() && has(f) {
                            seen[i] = Some(now);
                            left -= 1;
                        }
                    }
                    if left > 0 && now > deadline {
                        bail!(
                            "{left} of {} files did not get {want:?} within {timeout:?}",
                            files.len()
                        );
                    }
                }
                Err(RecvTimeoutError::Disconnected) => bail!("the file watcher stopped"),
            }
        }
        Ok(seen.into_iter().flatten().collect())
    }
}

/// `fs.inotify.max_user_instances` raised for the run (one host here plays
/// a whole fleet; each agent takes one or two instances, and an agent
/// without one polls its manifest instead), and put back after.
struct InotifyLimit {
    was: Option<String>,
}

const INOTIFY_INSTANCES: &str = "/proc/sys/fs/inotify/max_user_instances";

impl InotifyLimit {
    fn at_least(want: usize) -> InotifyLimit {
        let was = std::fs::read_to_string(INOTIFY_INSTANCES).ok();
        let now: usize = was
            .as_deref()
            .and_then(|w| w.trim().parse().ok())
            .unwrap_or(0);
        if now >= want {
            return InotifyLimit { was: None };
        }
        match std::fs::write(INOTIFY_INSTANCES, want.to_string()) {
            Ok(()) => {
                println!("  fs.inotify.max_user_instances raised from {now} to {want} for the run");
                InotifyLimit { was }
            }
            Err(e) => {
                println!(
                    "  fs.inotify.max_user_instances is {now} and cannot be raised ({e}): agents past it poll their manifest"
                );
                InotifyLimit { was: None }
            }
        }
    }
}

impl Drop for InotifyLimit {
    fn drop(&mut self) {
        if let Some(was) = &self.was {
            let _ = std::fs::write(INOTIFY_INSTANCES, was.trim());
        }
    }
}
