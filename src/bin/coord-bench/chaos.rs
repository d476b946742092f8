//! Chaos: rendered files, instance ids and services while agents and etcd
//! members are killed, paused and restarted at random.
//!
//! Five agents on a three-member etcd cluster (TTL 3 s). Each renders a
//! `[[file]]` from the shared prefix `/chaos/shared/` (8 keys) and a key of
//! its own, holds an `[[instance_id]]` from a pool of 4 (one fewer than the
//! agents: one always waits, so every claim lost is contended), and
//! registers a `[[service]]` whose exec check fails while a flag file
//! exists (every 500 ms, critical after 2 failures).
//!
//! A writer changes a key four times a second, each write a
//! compare-and-swap on the key's version: a write that timed out can never
//! land after a later one, so the last acknowledged value is the one etcd
//! holds. A driver picks a fault every 1–3 s: `kill -9` of an agent
//! (restarted 0.5 s later), SIGTERM and restart, SIGSTOP of an agent past
//! its TTL then SIGCONT, `kill -9` of an etcd member (restarted 1 s later),
//! SIGSTOP of an etcd member for 3 s, and a flip of a service's health.
//!
//! Every fault opens a disturbance window: an etcd window ends when the
//! writer's first write sent after the member is back (answering a
//! linearizable read) is acknowledged — etcd is healthy again; an agent's
//! window ends when it runs again. The checkers run all the time:
//!
//! - files: read every 20 ms; each must be one complete render (a `BEGIN
//!   n` line, n shared keys, the own key, an `END n` line), and must hold
//!   every value acknowledged 5 s before, once 5 s have passed since the
//!   last window of etcd or of its agent ended;
//! - ids: the pool's keys read, every running agent's id file read, the
//!   keys read again; an agent whose file names an id that etcd shows held
//!   by another agent, at both reads, claims an id held twice; and two
//!   running agents' files naming one id are counted too;
//! - services: an instance listed while its flag has said critical for
//!   longer than interval × failures + 1 s, counted from the flip or from
//!   the end of the last window (plus the TTL after a `kill -9`: the dead
//!   agent's lease keeps its keys until it expires).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use coord::etcd::local::LocalCluster;
use coord::etcd::{Client, Guarded};
use coord::{ids, registry};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::Rng;

use crate::Ctx;
use crate::harness::Proc;
use crate::report::{Report, Row, Stat, Unit};

const AGENTS: usize = 5;
const TTL: Duration = Duration::from_secs(3);
const POOL: &str = "chaos";
const POOL_SIZE: u32 = 4;
const SHARED: &str = "/chaos/shared/";
const SHARED_KEYS: usize = 8;
const OWN: &str = "/chaos/own/";
const SERVICE: &str = "chaos";
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
const CHECK_FAILURES: u32 = 2;
/// interval × failures + 1 s.
const WITHDRAW_WITHIN: Duration = Duration::from_millis(500 * 2 + 1000);
const STALE_AFTER: Duration = Duration::from_secs(5);
const WRITE_EVERY: Duration = Duration::from_millis(250);
const MARKER: &str = "COORD_CHAOS";
/// Violations printed as they are found (the counts go on).
const SHOW: usize = 20;

/// The template: a complete render is recognisable by its first and last
/// lines, which both carry the number of shared keys.
const TEMPLATE: &str = r#"BEGIN {{ keys("@SHARED@") | length }}
{% for k, v in keys("@SHARED@") | items %}
{{ k }}={{ v }}
{% endfor %}
own={{ key("@OWN@@NAME@") }}
END {{ keys("@SHARED@") | length }}
"#;

fn shared_key(n: usize) -> String {
    format!("{SHARED}s{n}")
}

/// A time span a fault disturbed: `end` is unset while it lasts.
#[derive(Debug, Clone)]
struct Window {
    start: Instant,
    /// etcd: when the member answered again (the writer's next
    /// acknowledged write ends the window).
    back: Option<Instant>,
    end: Option<Instant>,
    /// An agent killed with `-9`: its lease outlives it by up to the TTL.
    orphans_lease: bool,
}

impl Window {
    fn new(start: Instant, orphans_lease: bool) -> Window {
        Window {
            start,
            back: None,
            end: None,
            orphans_lease,
        }
    }
}

#[derive(Debug)]
struct AgentView {
    windows: Vec<Window>,
    /// Set while its service's flag says critical.
    sick_since: Option<Instant>,
    /// Running and not stopped.
    live: bool,
    /// Bumped on every change of `live`.
    generation: u64,
    /// The last thing done to it, and when (for the findings).
    last_event: (&'static str, Instant),
}

/// What the driver did and the writer acknowledged, shared with the
/// checkers.
#[derive(Debug)]
struct World {
    began: Instant,
    etcd: Vec<Window>,
    agents: Vec<AgentView>,
    /// Per key, the values (sequence numbers) acknowledged, in order.
    acked: BTreeMap<String, Vec<(u64, Instant)>>,
    /// etcd windows: member back → writer acknowledged again, in ms.
    healthy_again_ms: Vec<f64>,
}

impl World {
    fn new(began: Instant) -> World {
        World {
            began,
            etcd: Vec::new(),
            agents: (0..AGENTS)
                .map(|_| AgentView {
                    windows: Vec::new(),
                    sick_since: None,
                    live: false,
                    generation: 0,
                    last_event: ("start", began),
                })
                .collect(),
            acked: BTreeMap::new(),
            healthy_again_ms: Vec::new(),
        }
    }

    fn ack(&mut self, key: &str, seq: u64, sent: Instant, at: Instant) {
        let values = self.acked.entry(key.to_owned()).or_default();
        if values.last().is_none_or(|(s, _)| *s < seq) {
            values.push((seq, at));
        }
        for w in self.etcd.iter_mut().filter(|w| w.end.is_none()) {
            if let Some(back) = w.back
                && sent >= back
            {
                w.end = Some(at);
                self.healthy_again_ms
                    .push(at.duration_since(back).as_secs_f64() * 1e3);
            }
        }
    }

    fn agent_down(&mut self, i: usize, what: &'static str, orphans_lease: bool) {
        let now = Instant::now();
        let a = &mut self.agents[i];
        a.windows.push(Window::new(now, orphans_lease));
        a.live = false;
        a.generation += 1;
        a.last_event = (what, now);
    }

    fn agent_up(&mut self, i: usize, what: &'static str) {
        let now = Instant::now();
        let a = &mut self.agents[i];
        if let Some(w) = a.windows.last_mut()
            && w.end.is_none()
        {
            w.end = Some(now);
        }
        a.live = true;
        a.generation += 1;
        a.last_event = (what, now);
    }

    /// When etcd and agent `i` were last disturbed (the end of the last
    /// window begun by `now`); `None` while one lasts.
    fn quiet_since(&self, i: usize, now: Instant) -> Option<Instant> {
        let mut q = self.began;
        for w in self.etcd.iter().chain(&self.agents[i].windows) {
            if w.start <= now {
                q = q.max(w.end?);
            }
        }
        Some(q)
    }

    /// The last value of `key` acknowledged by `cutoff` (0 if none).
    fn required(&self, key: &str, cutoff: Instant) -> (u64, Option<Instant>) {
        self.acked
            .get(key)
            .and_then(|v| v.iter().rev().find(|(_, at)| *at <= cutoff))
            .map_or((0, None), |(s, at)| (*s, Some(*at)))
    }

    /// By when agent `i`'s instance, critical since `since`, must be
    /// withdrawn, as seen at `now`; `None` while a window lasts.
    fn withdraw_by(&self, i: usize, since: Instant, now: Instant) -> Option<Instant> {
        let agent = &self.agents[i];
        let mut q = since;
        for w in &agent.windows {
            if w.start > now {
                continue;
            }
            let mut end = w.end?;
            if w.orphans_lease {
                end = end.max(w.start + TTL);
            }
            q = q.max(end);
        }
        for w in &self.etcd {
            if w.start > now {
                continue;
            }
            let mut end = w.end?;
            // A leader elected while a dead agent's lease still runs gives
            // that lease its whole TTL again.
            if agent
                .windows
                .iter()
                .any(|k| k.orphans_lease && k.start <= end && k.start + TTL >= w.start)
            {
                end += TTL;
            }
            q = q.max(end);
        }
        Some(q + WITHDRAW_WITHIN)
    }
}

/// What the checkers found.
#[derive(Debug, Default)]
struct Counts {
    file_reads: u64,
    /// Reads that were checked for staleness (no window in the last 5 s).
    stale_checked: u64,
    renders_seen: u64,
    blank: u64,
    partial: u64,
    /// A file that was there and then was not.
    missing: u64,
    /// (agent, key, value required) found missing from the file.
    stale: BTreeSet<(usize, String, u64)>,
    stale_reads: u64,
    id_checks: u64,
    /// (agent, id, holder's create revision).
    id_held_elsewhere: BTreeSet<(usize, u32, i64)>,
    /// (agent, agent, id).
    id_files_alike: BTreeSet<(usize, usize, u32)>,
    service_checks: u64,
    /// (agent, critical since).
    listed_critical: BTreeSet<(usize, Instant)>,
    /// Flip to critical → seen withdrawn, for flips no window disturbed.
    withdrawn_ms: Vec<f64>,
    writes_acked: u64,
    writes_failed: u64,
    shown: usize,
}

impl Counts {
    fn show(&mut self, what: std::fmt::Arguments<'_>) {
        if self.shown < SHOW {
            println!("  {what}");
        }
        self.shown += 1;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Agent {
    name: String,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Agent {
    fn file(&self) -> PathBuf {
        self.dir.join("rendered.txt")
    }

    fn id_file(&self) -> PathBuf {
        self.dir.join("id")
    }

    fn flag(&self) -> PathBuf {
        self.dir.join("sick")
    }

    fn instance(&self) -> String {
        format!("{}-{SERVICE}", self.name)
    }

    fn manifest(&self, endpoints: &str) -> String {
        let dir = self.dir.display();
        let source = TEMPLATE
            .replace("@SHARED@", SHARED)
            .replace("@OWN@", OWN)
            .replace("@NAME@", &self.name);
        format!(
            "[agent]\nname = \"{name}\"\nttl = \"{ttl}s\"\nstate_dir = \"{dir}/state\"\n\n\
             [etcd]\nendpoints = [{endpoints}]\ndial_timeout = \"1s\"\nrequest_timeout = \"1s\"\n\n\
             [[file]]\npath = \"{dir}/rendered.txt\"\n\
             check = [\"sh\", \"-c\", \"tail -n 1 {{staged}} | grep -q '^END '\"]\n\
             source = \"\"\"\n{source}\"\"\"\n\n\
             [[instance_id]]\npool = \"{POOL}\"\nsize = {POOL_SIZE}\nfile = \"{dir}/id\"\n\n\
             [[service]]\nname = \"{SERVICE}\"\naddress = \"127.0.0.1:{port}\"\n\
             check = {{ exec = [\"sh\", \"-c\", \"test ! -e {dir}/sick || exit 2\"], interval = \"{interval}ms\", \
             timeout = \"1s\", failures = {CHECK_FAILURES} }}\n",
            name = self.name,
            ttl = TTL.as_secs(),
            port = 9000 + self.name[1..].parse::<u16>().unwrap_or(0),
            interval = CHECK_INTERVAL.as_millis(),
        )
    }

    fn start(&mut self, coord: &Path, endpoints: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.dir.join("state"))?;
        let path = self.dir.join("agent.toml");
        std::fs::write(&path, self.manifest(endpoints))?;
        self.proc = Some(crate::harness::run_agent_appending(
            coord,
            &path,
            &self.dir.join("coord.log"),
            MARKER,
        )?);
        Ok(())
    }

    fn signal(&self, s: Signal) {
        if let Some(p) = &self.proc {
            let _ = kill(Pid::from_raw(p.pid() as i32), s);
        }
    }

    /// `kill -9` of the agent alone; its checks die with their group.
    fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill_leader();
        }
    }

    /// The last lines of its log, if it has exited by itself.
    fn exited(&mut self) -> Option<String> {
        let p = self.proc.as_mut()?;
        let status = p.child.try_wait().ok()??;
        self.proc = None;
        let log = std::fs::read_to_string(self.dir.join("coord.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        Some(format!(
            "{status}: {}",
            lines[lines.len().saturating_sub(3)..].join(" / ")
        ))
    }

    /// SIGTERM and wait (bounded) for a clean stop.
    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(15));
        }
    }
}

/// One complete render: the shared keys' values and the own key's, as
/// sequence numbers.
fn parse(text: &str, name: &str) -> Result<BTreeMap<String, u64>, String> {
    let value = |v: &str| v.strip_prefix('v').and_then(|s| s.parse::<u64>().ok());
    let mut lines = text.lines();
    let n = lines
        .next()
        .and_then(|l| l.strip_prefix("BEGIN "))
        .and_then(|n| n.parse::<usize>().ok())
        .ok_or("no `BEGIN n` line first")?;
    if n != SHARED_KEYS {
        return Err(format!("{n} shared keys, not {SHARED_KEYS}"));
    }
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let line = lines.next().ok_or("fewer key lines than BEGIN says")?;
        let (k, v) = line.split_once('=').ok_or("a key line without `=`")?;
        let v = value(v).ok_or("a value that is not `v<n>`")?;
        out.insert(format!("{SHARED}{k}"), v);
    }
    let own = lines
        .next()
        .and_then(|l| l.strip_prefix("own="))
        .and_then(value)
        .ok_or("no `own=` line after the keys")?;
    out.insert(format!("{OWN}{name}"), own);
    let end = lines.next().and_then(|l| l.strip_prefix("END "));
    if end != Some(&n.to_string()[..]) {
        return Err("no `END n` line matching BEGIN".into());
    }
    if lines.any(|l| !l.is_empty()) {
        return Err("lines after END".into());
    }
    Ok(out)
}

/// Reads every agent's file every 20 ms until `stop`.
fn check_files(
    files: Vec<(String, PathBuf)>,
    world: Arc<Mutex<World>>,
    counts: Arc<Mutex<Counts>>,
    stop: Arc<AtomicBool>,
) {
    let mut last: Vec<Option<String>> = vec![None; files.len()];
    while !stop.load(Ordering::SeqCst) {
        for (i, (name, path)) in files.iter().enumerate() {
            let t = Instant::now();
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if last[i].is_some() {
                        let mut c = lock(&counts);
                        c.missing += 1;
                        c.show(format_args!(
                            "MISSING: {} was rendered and is gone",
                            path.display()
                        ));
                    }
                    continue;
                }
                Err(_) => continue,
            };
            // The world before the counts, as everywhere.
            let w = lock(&world);
            let mut c = lock(&counts);
            c.file_reads += 1;
            if last[i].as_deref() != Some(&text[..]) {
                c.renders_seen += 1;
            }
            let values = match parse(&text, name) {
                Ok(v) => v,
                Err(why) => {
                    if text.is_empty() {
                        c.blank += 1;
                        c.show(format_args!("BLANK: {}", path.display()));
                    } else {
                        c.partial += 1;
                        c.show(format_args!(
                            "PARTIAL: {} ({why}): {text:?}",
                            path.display()
                        ));
                    }
                    last[i] = Some(text);
                    continue;
                }
            };
            last[i] = Some(text);
            let Some(quiet) = w.quiet_since(i, t) else {
                continue;
            };
            if quiet + STALE_AFTER > t {
                continue;
            }
            c.stale_checked += 1;
            let cutoff = t - STALE_AFTER;
            for (key, has) in &values {
                let (want, acked) = w.required(key, cutoff);
                if *has < want {
                    c.stale_reads += 1;
                    if c.stale.insert((i, key.clone(), want)) {
                        let late = acked.map_or(0, |a| t.duration_since(a.max(quiet)).as_millis());
                        c.show(format_args!(
                            "STALE: {name}'s file has {key} = v{has}, v{want} was acknowledged {late} ms ago \
                             (etcd and the agent quiet for {} ms)",
                            t.duration_since(quiet).as_millis()
                        ));
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Who holds each id of the pool: (agent, create revision).
async fn holders(client: &Client) -> Option<BTreeMap<u32, (String, i64)>> {
    let prefix = ids::prefix("/coord", POOL);
    let snap = client.get_prefix(&prefix).await.ok()?;
    Some(
        snap.kvs
            .iter()
            .filter_map(|kv| {
                let id = kv.key.strip_prefix(&prefix)?.parse().ok()?;
                let rec: ids::ClaimRecord = serde_json::from_slice(&kv.value).ok()?;
                Some((id, (rec.agent, kv.create_revision)))
            })
            .collect(),
    )
}

/// Reads the pool and the id files, and the listed instances, every
/// 100 ms until `stop`.
async fn check_etcd(
    client: Client,
    agents: Vec<(String, PathBuf, String)>,
    world: Arc<Mutex<World>>,
    counts: Arc<Mutex<Counts>>,
    stop: Arc<AtomicBool>,
) {
    // Flips seen listed after they happened, waiting to be seen withdrawn.
    let mut pending: BTreeMap<usize, Instant> = BTreeMap::new();
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Ids: the file read between two reads of the pool.
        let before: Vec<(bool, u64)> = lock(&world)
            .agents
            .iter()
            .map(|a| (a.live, a.generation))
            .collect();
        let Some(first) = holders(&client).await else {
            continue;
        };
        let files: Vec<Option<u32>> = agents
            .iter()
            .map(|(_, id_file, _)| {
                std::fs::read_to_string(id_file)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
            })
            .collect();
        let Some(second) = holders(&client).await else {
            continue;
        };
        {
            let w = lock(&world);
            let stable: Vec<bool> = w
                .agents
                .iter()
                .zip(&before)
                .map(|(a, b)| a.live && (a.live, a.generation) == *b)
                .collect();
            let events: Vec<(&'static str, Instant)> =
                w.agents.iter().map(|a| a.last_event).collect();
            drop(w);
            let mut c = lock(&counts);
            c.id_checks += 1;
            for (i, (name, _, _)) in agents.iter().enumerate() {
                let Some(id) = files[i].filter(|_| stable[i]) else {
                    continue;
                };
                if let (Some(a), Some(b)) = (first.get(&id), second.get(&id))
                    && a == b
                    && a.0 != *name
                    && c.id_held_elsewhere.insert((i, id, a.1))
                {
                    c.show(format_args!(
                    "ID HELD TWICE: {name}'s id file says {id}, which etcd gives to {} (last event on {name}: {} {} ms before)",
                    a.0,
                    events[i].0,
                    events[i].1.elapsed().as_millis()
                ));
                }
                for j in i + 1..agents.len() {
                    if stable[j] && files[j] == Some(id) && c.id_files_alike.insert((i, j, id)) {
                        c.show(format_args!(
                            "ID FILES ALIKE: {name} and {} both have id {id} in their files",
                            agents[j].0
                        ));
                    }
                }
            }
        }
        // Services: listed while critical past the bound.
        let sick =
            |w: &World| -> Vec<Option<Instant>> { w.agents.iter().map(|a| a.sick_since).collect() };
        let before = sick(&lock(&world));
        let t0 = Instant::now();
        let Ok(listed) = client
            .get_prefix(&registry::endpoint_key("/coord", SERVICE, ""))
            .await
        else {
            continue;
        };
        let listed: BTreeSet<String> = listed
            .kvs
            .iter()
            .filter_map(|kv| kv.key.rsplit('/').next().map(str::to_owned))
            .collect();
        let w = lock(&world);
        let after = sick(&w);
        let events: Vec<(&'static str, Instant)> = w.agents.iter().map(|a| a.last_event).collect();
        let mut c = lock(&counts);
        c.service_checks += 1;
        for (i, (name, _, instance)) in agents.iter().enumerate() {
            let Some(since) = before[i].filter(|s| after[i] == Some(*s)) else {
                pending.remove(&i);
                continue;
            };
            let deadline = w.withdraw_by(i, since, t0);
            if listed.contains(instance) {
                if deadline == Some(since + WITHDRAW_WITHIN) && !pending.contains_key(&i) {
                    pending.insert(i, since);
                }
                if let Some(d) = deadline
                    && t0 > d
                    && c.listed_critical.insert((i, since))
                {
                    c.show(format_args!(
                        "LISTED WHILE CRITICAL: {instance} critical for {} ms, past its bound by {} ms (last event on {name}: {} {} ms before)",
                        t0.duration_since(since).as_millis(),
                        t0.duration_since(d).as_millis(),
                        events[i].0,
                        events[i].1.elapsed().as_millis()
                    ));
                }
            } else if pending.get(&i) == Some(&since) {
                pending.remove(&i);
                if deadline == Some(since + WITHDRAW_WITHIN) {
                    c.withdrawn_ms
                        .push(t0.duration_since(since).as_secs_f64() * 1e3);
                }
            }
        }
    }
}

/// Writes a key every 250 ms until `stop`: 3 of 4 writes to a shared key,
/// the others to an agent's own key, each a compare-and-swap on the
/// version the last answer gave.
async fn write(
    client: Client,
    names: Vec<String>,
    world: Arc<Mutex<World>>,
    counts: Arc<Mutex<Counts>>,
    stop: Arc<AtomicBool>,
    mut seq: u64,
    mut versions: BTreeMap<String, i64>,
) {
    let parse = |kv: &coord::etcd::KeyValue| {
        kv.value_str()
            .strip_prefix('v')
            .and_then(|s| s.parse::<u64>().ok())
    };
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(WRITE_EVERY).await;
        let key = {
            let mut rng = rand::rng();
            if rng.random_range(0..4) < 3 {
                shared_key(rng.random_range(0..SHARED_KEYS))
            } else {
                format!("{OWN}{}", names[rng.random_range(0..names.len())])
            }
        };
        seq += 1;
        let expected = versions.get(&key).copied();
        let sent = Instant::now();
        let answer = client.put_guarded(&key, format!("v{seq}"), expected).await;
        let at = Instant::now();
        match answer {
            Ok(Guarded::Applied { kv, .. }) => {
                if let Some(kv) = kv {
                    versions.insert(key.clone(), kv.version);
                }
                lock(&world).ack(&key, seq, sent, at);
                lock(&counts).writes_acked += 1;
            }
            Ok(Guarded::Refused { current }) => {
                // A write that timed out landed after all: what etcd holds
                // is known now.
                if let Some(kv) = current {
                    versions.insert(key.clone(), kv.version);
                    if let Some(s) = parse(&kv) {
                        lock(&world).ack(&key, s, sent, at);
                    }
                }
            }
            Err(_) => lock(&counts).writes_failed += 1,
        }
    }
}

pub async fn run(ctx: &Ctx, report: &mut Report, minutes: u64) -> anyhow::Result<()> {
    let mut cluster = LocalCluster::start(3)
        .await
        .context("starting a 3-member etcd cluster")?;
    let client = cluster.client().await;
    let quoted = cluster
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let work = tempfile::tempdir()?;
    let mut agents: Vec<Agent> = (0..AGENTS)
        .map(|i| Agent {
            name: format!("c{i}"),
            dir: work.path().join(format!("c{i}")),
            proc: None,
        })
        .collect();
    let names: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    // Every key before any agent: a render never misses one.
    let mut seq = 0u64;
    let mut versions = BTreeMap::new();
    let began = Instant::now();
    let world = Arc::new(Mutex::new(World::new(began)));
    let keys: Vec<String> = (0..SHARED_KEYS)
        .map(shared_key)
        .chain(names.iter().map(|n| format!("{OWN}{n}")))
        .collect();
    for key in &keys {
        seq += 1;
        let sent = Instant::now();
        match client.put_guarded(key, format!("v{seq}"), None).await? {
            Guarded::Applied { kv: Some(kv), .. } => {
                versions.insert(key.clone(), kv.version);
            }
            other => anyhow::bail!("writing {key} at the start: {other:?}"),
        }
        lock(&world).ack(key, seq, sent, Instant::now());
    }
    for (i, a) in agents.iter_mut().enumerate() {
        a.start(&ctx.coord, &quoted)?;
        lock(&world).agent_up(i, "start");
    }
    println!(
        "  {AGENTS} agents, ids from a pool of {POOL_SIZE}, in {}; faults every 1–3 s for {minutes} min",
        work.path().display()
    );
    let counts = Arc::new(Mutex::new(Counts::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write(
        cluster.client().await,
        names.clone(),
        world.clone(),
        counts.clone(),
        stop.clone(),
        seq,
        versions,
    ));
    let etcd_checker = tokio::spawn(check_etcd(
        cluster.client().await,
        agents
            .iter()
            .map(|a| (a.name.clone(), a.id_file(), a.instance()))
            .collect(),
        world.clone(),
        counts.clone(),
        stop.clone(),
    ));
    let file_checker = {
        let files = agents.iter().map(|a| (a.name.clone(), a.file())).collect();
        let (world, counts, stop) = (world.clone(), counts.clone(), stop.clone());
        std::thread::spawn(move || check_files(files, world, counts, stop))
    };
    // The first renders, claims and registrations before any fault.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut faults: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut exits = 0usize;
    let mut rng = rand::rng();
    let started = Instant::now();
    let length = Duration::from_secs(60 * minutes);
    let mut next_progress = Duration::from_secs(60);
    while started.elapsed() < length {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
        if started.elapsed() >= next_progress {
            next_progress += Duration::from_secs(60);
            let c = lock(&counts);
            println!(
                "  {} min: {} file reads, {} blank, {} partial, {} stale, {} ids held twice, {} listed while critical; {} faults",
                started.elapsed().as_secs() / 60,
                c.file_reads,
                c.blank,
                c.partial,
                c.stale.len(),
                c.id_held_elsewhere.len() + c.id_files_alike.len(),
                c.listed_critical.len(),
                faults.values().sum::<u32>()
            );
        }
        // An agent that exited by itself is a finding: said, counted and
        // started again.
        for (n, a) in agents.iter_mut().enumerate() {
            if let Some(why) = a.exited() {
                lock(&world).agent_down(n, "exit", true);
                exits += 1;
                lock(&counts).show(format_args!("EXITED: {} ({why})", a.name));
                a.start(&ctx.coord, &quoted)?;
                lock(&world).agent_up(n, "restart after its exit");
            }
        }
        let i = rng.random_range(0..AGENTS);
        let name: &'static str = match rng.random_range(0..7) {
            0 => {
                lock(&world).agent_down(i, "kill -9", true);
                tokio::task::block_in_place(|| agents[i].kill9());
                tokio::time::sleep(Duration::from_millis(500)).await;
                agents[i].start(&ctx.coord, &quoted)?;
                lock(&world).agent_up(i, "restart after kill -9");
                "kill -9 of an agent (restarted 0.5 s later)"
            }
            1 => {
                lock(&world).agent_down(i, "SIGTERM", false);
                tokio::task::block_in_place(|| agents[i].stop());
                agents[i].start(&ctx.coord, &quoted)?;
                lock(&world).agent_up(i, "restart after SIGTERM");
                "SIGTERM and restart of an agent"
            }
            2 => {
                lock(&world).agent_down(i, "SIGSTOP", false);
                agents[i].signal(Signal::SIGSTOP);
                tokio::time::sleep(TTL + Duration::from_secs(1)).await;
                agents[i].signal(Signal::SIGCONT);
                lock(&world).agent_up(i, "SIGCONT");
                "SIGSTOP of an agent for 4 s (TTL 3 s), then SIGCONT"
            }
            3 => {
                let m = rng.random_range(0..cluster.len());
                lock(&world).etcd.push(Window::new(Instant::now(), false));
                cluster.member(m).kill();
                tokio::time::sleep(Duration::from_secs(1)).await;
                cluster
                    .member(m)
                    .restart()
                    .context("restarting an etcd member")?;
                cluster
                    .member(m)
                    .wait_healthy()
                    .await
                    .context("an etcd member after its restart")?;
                if let Some(w) = lock(&world).etcd.last_mut() {
                    w.back = Some(Instant::now());
                }
                "kill -9 of an etcd member (restarted 1 s later)"
            }
            4 => {
                let m = rng.random_range(0..cluster.len());
                lock(&world).etcd.push(Window::new(Instant::now(), false));
                cluster.member(m).pause();
                tokio::time::sleep(Duration::from_secs(3)).await;
                cluster.member(m).resume();
                cluster
                    .member(m)
                    .wait_healthy()
                    .await
                    .context("an etcd member after SIGCONT")?;
                if let Some(w) = lock(&world).etcd.last_mut() {
                    w.back = Some(Instant::now());
                }
                "SIGSTOP of an etcd member for 3 s, then SIGCONT"
            }
            _ => {
                let flag = agents[i].flag();
                let mut w = lock(&world);
                if w.agents[i].sick_since.is_some() {
                    std::fs::remove_file(&flag)?;
                    w.agents[i].sick_since = None;
                    "a service's check made to pass"
                } else {
                    w.agents[i].sick_since = Some(Instant::now());
                    std::fs::write(&flag, "")?;
                    "a service's check made to fail"
                }
            }
        };
        *faults.entry(name).or_default() += 1;
    }
    let duration = started.elapsed();
    // The last etcd window closes with the writer's next answer.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let _ = writer.await;
    let _ = etcd_checker.await;
    let _ = tokio::task::spawn_blocking(move || file_checker.join()).await;
    tokio::task::block_in_place(|| {
        for a in agents.iter_mut() {
            a.stop();
        }
    });
    let w = lock(&world);
    let c = lock(&counts);
    if c.file_reads == 0 {
        anyhow::bail!(
            "no agent ever rendered its file; see the coord.log files in {}",
            work.path().display()
        );
    }
    println!("  {} s of faults:", duration.as_secs());
    for (name, n) in &faults {
        println!("    {n:>4}  {name}");
    }
    println!(
        "  writes: {} acknowledged, {} failed; file reads: {} ({} checked for staleness), {} renders seen; \
         id checks: {}; service checks: {}",
        c.writes_acked,
        c.writes_failed,
        c.file_reads,
        c.stale_checked,
        c.renders_seen,
        c.id_checks,
        c.service_checks
    );
    let healthy = Stat::of(&w.healthy_again_ms);
    let withdrawn = Stat::of(&c.withdrawn_ms);
    println!(
        "  etcd healthy again (member back → a write acknowledged): median {:.0} ms, p99 {:.0} ms over {}; \
         check failing → withdrawn (undisturbed): median {:.0} ms, p99 {:.0} ms over {}",
        healthy.median,
        healthy.p99,
        w.healthy_again_ms.len(),
        withdrawn.median,
        withdrawn.p99,
        c.withdrawn_ms.len()
    );
    let count = |n: usize| Stat::one(n as f64);
    let total_faults: u32 = faults.values().sum();
    report.add(
        Row::new(
            "chaos",
            format!(
                "faults in {} min (see the list above)",
                duration.as_secs() / 60
            ),
            Unit::Count,
        )
        .coord(count(total_faults as usize)),
    );
    report.add(
        Row::new("chaos", "file reads (5 agents, every 20 ms)", Unit::Count)
            .coord(count(c.file_reads as usize)),
    );
    report.add(
        Row::new("chaos", "agents that exited by themselves", Unit::Count)
            .coord(count(exits))
            .target("0", exits == 0),
    );
    let bad = (c.blank + c.partial + c.missing) as usize;
    report.add(
        Row::new("chaos", "blank, partial or vanished files", Unit::Count)
            .coord(count(bad))
            .target("0", bad == 0),
    );
    report.add(
        Row::new(
            "chaos",
            "files stale 5 s after etcd and the agent are back",
            Unit::Count,
        )
        .coord(count(c.stale.len()))
        .target("0", c.stale.is_empty()),
    );
    let twice = c.id_held_elsewhere.len() + c.id_files_alike.len();
    report.add(
        Row::new(
            "chaos",
            "ids held twice (id file vs etcd, two files)",
            Unit::Count,
        )
        .coord(count(twice))
        .target("0", twice == 0),
    );
    report.add(
        Row::new(
            "chaos",
            "instances listed while critical > interval × failures + 1 s",
            Unit::Count,
        )
        .coord(count(c.listed_critical.len()))
        .target("0", c.listed_critical.is_empty()),
    );
    report
        .add(Row::new("chaos", "etcd member back → a write acknowledged", Unit::Ms).coord(healthy));
    report.add(
        Row::new(
            "chaos",
            "check failing → instance withdrawn (no fault between)",
            Unit::Ms,
        )
        .coord(withdrawn)
        .target(
            format!("< {} ms", WITHDRAW_WITHIN.as_millis()),
            withdrawn.p99 < WITHDRAW_WITHIN.as_millis() as f64,
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{OWN, SHARED, parse};

    /// Only a whole render parses; a cut one says what is missing.
    #[test]
    fn a_render_parses_only_whole() {
        let mut text = "BEGIN 8\n".to_owned();
        for n in 0..8 {
            text.push_str(&format!("s{n}=v{n}\n"));
        }
        text.push_str("own=v42\nEND 8\n");
        let values = parse(&text, "c1").expect("a whole render");
        assert_eq!(values[&format!("{OWN}c1")], 42);
        assert_eq!(values[&format!("{SHARED}s3")], 3);
        for cut in [0, 8, 20, text.len() - 3] {
            assert!(parse(&text[..cut], "c1").is_err(), "cut at {cut}");
        }
    }
}
