//! Runs hooks for the agent: never two runs of one hook for one resource at
//! once, bursts coalesced to the latest event, failures retried with backoff,
//! and nothing a hook does can stop the agent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::exec::ExecHook;
use super::gate::Gates;
use super::{Envelope, Event, HookError, KeyReader, Outcome, WasmHost, WasmPlugin};
use crate::agent::manifest::{HookAction, HookSpec, Manifest, Runner};
use crate::agent::status::Status;
use crate::agent::status::report::HookResult;
use crate::etcd::Backoff;

/// A hook ready to run.
#[derive(Clone)]
pub enum Runnable {
    Exec(ExecHook),
    Wasm {
        plugin: WasmPlugin,
        timeout: Duration,
    },
}

impl std::fmt::Debug for Runnable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Runnable::Exec(h) => f.debug_tuple("Exec").field(h).finish(),
            Runnable::Wasm { plugin, timeout } => f
                .debug_struct("Wasm")
                .field("plugin", &plugin.name())
                .field("world", &plugin.world())
                .field("timeout", timeout)
                .finish(),
        }
    }
}

impl Runnable {
    async fn run(&self, envelope: &Envelope) -> Result<Outcome, HookError> {
        match self {
            Runnable::Exec(h) => h.run(envelope).await,
            Runnable::Wasm { plugin, timeout } => plugin.call(envelope, *timeout).await,
        }
    }
}

/// What WASM hooks need: the engine, and where their reads come from.
#[derive(Clone)]
pub struct Plugins {
    pub host: WasmHost,
    pub keys: Arc<dyn KeyReader>,
}

impl std::fmt::Debug for Plugins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugins")
            .field("cache_dir", &self.host.cache_dir())
            .finish_non_exhaustive()
    }
}

/// Counters per hook, for status and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HookStats {
    pub runs: u64,
    pub failures: u64,
    /// Events dropped because a newer one for the same resource came first.
    pub coalesced: u64,
}

struct Hook {
    spec: HookSpec,
    runnable: Runnable,
}

/// How the run of a tracked event ended (see [`HookRunner::fire_tracked`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The hook ran (or vetoed, which is a validator's answer).
    Ran,
    /// It failed, and kept failing through its retries: the last error.
    Failed(String),
    /// A newer event for the same resource replaced it before it was done.
    Superseded,
    /// The runner stopped (a reload with new hooks, shutdown).
    Stopped,
}

/// An event waiting to run, and who wants to know how it ended.
struct Pending {
    envelope: Envelope,
    done: Option<oneshot::Sender<Verdict>>,
}

impl Pending {
    fn tell(self, verdict: Verdict) {
        if let Some(done) = self.done {
            let _ = done.send(verdict);
        }
    }
}

/// One (hook, resource) pair: a lock so runs never overlap, and the latest
/// event waiting to run (a newer one replaces it: bursts coalesce).
struct Slot {
    gate: tokio::sync::Mutex<()>,
    pending: watch::Sender<Option<Pending>>,
}

impl Slot {
    fn take(&self) -> Option<Pending> {
        let mut taken = None;
        // Taking is not news: only `fire` wakes the worker.
        self.pending.send_if_modified(|p| {
            taken = p.take();
            false
        });
        taken
    }
}

/// The agent's hooks.
pub struct HookRunner {
    agent: String,
    hooks: HashMap<String, Hook>,
    slots: Mutex<HashMap<(String, String), Arc<Slot>>>,
    stats: watch::Sender<HashMap<String, HookStats>>,
    stop: CancellationToken,
    /// One worker per busy slot, joined by [`HookRunner::shutdown`].
    workers: TaskTracker,
    /// First retry delay after a failed run (doubles each time).
    retry_base: Duration,
    status: Status,
    /// Where hooks with `fleet` take their place; without it they run
    /// ungated (`coord hook`, tests of the runner alone).
    gates: Option<Arc<Gates>>,
}

impl std::fmt::Debug for HookRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookRunner")
            .field("agent", &self.agent)
            .field("hooks", &self.hooks.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl HookRunner {
    /// Prepares every hook of a manifest that has only `exec` hooks.
    pub fn new(agent: &str, specs: &[HookSpec]) -> Result<HookRunner, HookError> {
        Self::with_plugins(agent, specs, None)
    }

    /// Prepares every hook of a manifest. WASM components are compiled (or
    /// loaded from the cache) and checked here, so a bad plugin is found
    /// when the manifest is loaded; this blocks for as long as compiling
    /// takes — call it from a blocking thread in async code.
    pub fn with_plugins(
        agent: &str,
        specs: &[HookSpec],
        plugins: Option<&Plugins>,
    ) -> Result<HookRunner, HookError> {
        let mut hooks = HashMap::new();
        for spec in specs {
            let runnable = match (&spec.action, plugins) {
                (HookAction::Exec { argv }, _) => Runnable::Exec(ExecHook {
                    name: spec.name.clone(),
                    argv: argv.clone(),
                    env: spec.env.clone(),
                    timeout: spec.timeout,
                    ambient: None,
                }),
                (HookAction::Wasm(_), Some(p)) => Runnable::Wasm {
                    plugin: p.host.load(spec, p.keys.clone())?,
                    timeout: spec.timeout,
                },
                (HookAction::Wasm(w), None) => {
                    return Err(HookError::Load {
                        hook: spec.name.clone(),
                        path: w.path.display().to_string(),
                        message: "no WASM engine was set up for this runner".into(),
                    });
                }
            };
            hooks.insert(
                spec.name.clone(),
                Hook {
                    spec: spec.clone(),
                    runnable,
                },
            );
        }
        Ok(HookRunner {
            agent: agent.to_owned(),
            hooks,
            slots: Mutex::default(),
            stats: watch::Sender::new(HashMap::new()),
            stop: CancellationToken::new(),
            workers: TaskTracker::new(),
            retry_base: Duration::from_millis(500),
            status: Status::default(),
            gates: None,
        })
    }

    /// Prepares the hooks of `manifest` for `who`: WASM components are
    /// compiled with their compilation cache where
    /// [`AgentSettings::wasm_cache_dir`](crate::agent::manifest::AgentSettings::wasm_cache_dir)
    /// says (without a cache if that cannot be created), reading keys
    /// through `keys`. Blocks while compiling; the first hook that fails
    /// is the error.
    pub fn for_manifest(
        manifest: &Manifest,
        keys: Arc<dyn KeyReader>,
        who: Runner,
    ) -> Result<HookRunner, HookError> {
        let plugins = Self::plugins_for(manifest, keys, who)?;
        Self::with_plugins(&manifest.agent.name, &manifest.hooks, plugins.as_ref())
    }

    /// Loads every WASM hook of `manifest` as [`for_manifest`](Self::for_manifest)
    /// would and returns every one that fails, not only the first: what
    /// `coord check` reports.
    pub fn plugin_problems(manifest: &Manifest, who: Runner) -> Vec<HookError> {
        let keys: Arc<dyn KeyReader> = Arc::new(crate::etcd::CacheSnapshot::default());
        let plugins = match Self::plugins_for(manifest, keys, who) {
            Ok(Some(p)) => p,
            Ok(None) => return Vec::new(),
            Err(e) => return vec![e],
        };
        manifest
            .hooks
            .iter()
            .filter(|h| matches!(h.action, HookAction::Wasm(_)))
            .filter_map(|spec| plugins.host.load(spec, plugins.keys.clone()).err())
            .collect()
    }

    fn plugins_for(
        manifest: &Manifest,
        keys: Arc<dyn KeyReader>,
        who: Runner,
    ) -> Result<Option<Plugins>, HookError> {
        let Some(first) = manifest
            .hooks
            .iter()
            .find(|h| matches!(h.action, HookAction::Wasm(_)))
        else {
            return Ok(None);
        };
        let dir = manifest.agent.wasm_cache_dir(who);
        let host = match dir.as_deref().map(|d| (d, WasmHost::new(Some(d)))) {
            Some((_, Ok(host))) => Ok(host),
            Some((d, Err(e))) => {
                warn!(dir = %d.display(), error = %e, "No compilation cache for WASM hooks; compiling at every start.");
                WasmHost::new(None)
            }
            None => WasmHost::new(None),
        }
        .map_err(|e| HookError::Load {
            hook: first.name.clone(),
            path: first_path(first),
            message: e.to_string(),
        })?;
        Ok(Some(Plugins { host, keys }))
    }

    /// Gives every shell hook `ambient` on top of its event.
    pub fn with_ambient(mut self, ambient: super::AmbientEnv) -> Self {
        for hook in self.hooks.values_mut() {
            if let Runnable::Exec(exec) = &mut hook.runnable {
                exec.ambient = Some(ambient.clone());
            }
        }
        self
    }

    /// Reports every run (result, duration) to `status`.
    pub fn with_status(mut self, status: Status) -> Self {
        self.status = status;
        self
    }

    /// Runs hooks with `fleet` through the fleet gates of `gates`.
    pub fn with_gates(mut self, gates: Arc<Gates>) -> Self {
        self.gates = Some(gates);
        self
    }

    /// Makes retries come sooner or later than the default 500 ms first
    /// delay (tests use a short one).
    pub fn with_retry_base(mut self, base: Duration) -> Self {
        self.retry_base = base;
        self
    }

    /// Whether a hook of that name exists.
    pub fn has(&self, name: &str) -> bool {
        self.hooks.contains_key(name)
    }

    /// Counters per hook name.
    pub fn stats(&self) -> watch::Receiver<HashMap<String, HookStats>> {
        self.stats.subscribe()
    }

    /// Runs hook `name` on `event` now and returns what it said, waiting
    /// for any run of the same hook on the same resource to finish first.
    /// No retries: the caller decides (a validate step fails closed).
    pub async fn run_now(&self, name: &str, event: Event) -> Result<Outcome, HookError> {
        let hook = self.hooks.get(name).ok_or_else(|| HookError::Failed {
            hook: name.to_owned(),
            status: "no such hook in the manifest".into(),
        })?;
        let (slot, _) = self.slot(name, &event.resource());
        let envelope = Envelope::new(self.agent.clone(), event);
        let _running = slot.gate.lock().await;
        let started = std::time::Instant::now();
        let result = hook.runnable.run(&envelope).await;
        self.record(name, &envelope, started, &result);
        result
    }

    /// Queues `event` for each hook in `names` and returns at once. A burst
    /// for one resource is coalesced: a hook that is busy runs once more,
    /// with the latest event. Failures are retried with backoff up to the
    /// hook's `retries`; a newer event replaces a failing one.
    pub fn fire(self: &Arc<Self>, names: &[String], event: &Event) {
        for name in names {
            self.queue(name, event, None);
        }
    }

    /// Like [`HookRunner::fire`], and resolves once every hook in `names`
    /// is done with this event: [`Verdict::Failed`] if any failed through
    /// its retries, else superseded or stopped if any was, else ran.
    pub fn fire_tracked(
        self: &Arc<Self>,
        names: &[String],
        event: &Event,
    ) -> impl std::future::Future<Output = Verdict> + Send + 'static {
        let waits: Vec<oneshot::Receiver<Verdict>> = names
            .iter()
            .map(|name| {
                let (tx, rx) = oneshot::channel();
                self.queue(name, event, Some(tx));
                rx
            })
            .collect();
        async move {
            let mut worst = Verdict::Ran;
            for wait in waits {
                // A sender dropped unanswered: the runner went away.
                let verdict = wait.await.unwrap_or(Verdict::Stopped);
                worst = match (worst, verdict) {
                    (Verdict::Failed(e), _) | (_, Verdict::Failed(e)) => Verdict::Failed(e),
                    (Verdict::Ran, other) => other,
                    (other, _) => other,
                };
            }
            worst
        }
    }

    fn queue(self: &Arc<Self>, name: &str, event: &Event, done: Option<oneshot::Sender<Verdict>>) {
        if !self.hooks.contains_key(name) {
            // The manifest checks references, so this is a bug, not an
            // operator's mistake.
            warn!(hook = %name, "Event for an unknown hook ignored.");
            if let Some(done) = done {
                let _ = done.send(Verdict::Failed(format!("no hook `{name}`")));
            }
            return;
        }
        let (slot, created) = self.slot(name, &event.resource());
        if created {
            self.spawn_worker(name, slot.clone());
        }
        let envelope = Envelope::new(self.agent.clone(), event.clone());
        let mut replaced = None;
        slot.pending
            .send_modify(|p| replaced = p.replace(Pending { envelope, done }));
        if let Some(old) = replaced {
            old.tell(Verdict::Superseded);
            self.count(name, |s| s.coalesced += 1);
        }
    }

    /// Stops the workers and returns once they have ended; runs in
    /// progress are dropped (their processes killed).
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.workers.close();
        self.workers.wait().await;
    }

    fn slot(&self, name: &str, resource: &str) -> (Arc<Slot>, bool) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let key = (name.to_owned(), resource.to_owned());
        if let Some(slot) = slots.get(&key) {
            return (slot.clone(), false);
        }
        let slot = Arc::new(Slot {
            gate: tokio::sync::Mutex::new(()),
            pending: watch::Sender::new(None),
        });
        slots.insert(key, slot.clone());
        (slot, true)
    }

    fn record(
        &self,
        name: &str,
        envelope: &Envelope,
        started: std::time::Instant,
        result: &Result<Outcome, HookError>,
    ) {
        self.count(name, |s| {
            s.runs += 1;
            if result.is_err() {
                s.failures += 1;
            }
        });
        let (outcome, error) = match result {
            Ok(Outcome::Done) => (HookResult::Ok, None),
            Ok(Outcome::Vetoed(reason)) => (HookResult::Vetoed, Some(reason.clone())),
            Err(e) => (HookResult::Failed, Some(e.to_string())),
        };
        self.status.hook_ran(
            name,
            envelope.event.name(),
            &envelope.event.resource(),
            started.elapsed(),
            outcome,
            error,
        );
    }

    fn count(&self, name: &str, f: impl FnOnce(&mut HookStats)) {
        self.stats
            .send_modify(|all| f(all.entry(name.to_owned()).or_default()));
    }

    /// The worker of one slot: waits for an event, runs it with retries.
    fn spawn_worker(self: &Arc<Self>, name: &str, slot: Arc<Slot>) {
        let weak = Arc::downgrade(self);
        let stop = self.stop.clone();
        let name = name.to_owned();
        let mut news = slot.pending.subscribe();
        self.workers.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = news.changed() => if changed.is_err() { return },
                }
                news.borrow_and_update();
                let Some(runner) = weak.upgrade() else { return };
                runner.drain(&name, &slot, &mut news, &stop).await;
            }
        });
    }

    async fn drain(
        &self,
        name: &str,
        slot: &Slot,
        news: &mut watch::Receiver<Option<Pending>>,
        stop: &CancellationToken,
    ) {
        let Some(hook) = self.hooks.get(name) else {
            return;
        };
        let mut backoff = Backoff::new(self.retry_base, Duration::from_secs(60));
        let mut attempt = 0u32;
        let mut current: Option<Pending> = None;
        loop {
            if let Some(newer) = slot.take() {
                if let Some(old) = current.replace(newer) {
                    old.tell(Verdict::Superseded);
                }
                attempt = 0;
                backoff.reset();
            }
            let Some(pending) = current.take() else {
                return;
            };
            let envelope = &pending.envelope;
            let (started, result) = {
                let _running = slot.gate.lock().await;
                // The fleet gate is held for the run only: a retry's
                // backoff waits outside it, so others may go meanwhile.
                let entered = match (&hook.spec.fleet, &self.gates) {
                    (Some(fleet), Some(gates)) => {
                        let resource = envelope.event.resource();
                        let splay = attempt == 0;
                        let entered = gates
                            .enter(name, &resource, *fleet, splay, stop, &self.status)
                            .await;
                        match entered {
                            Some(e) => Some(e),
                            None => return pending.tell(Verdict::Stopped),
                        }
                    }
                    _ => None,
                };
                let started = std::time::Instant::now();
                let result = tokio::select! {
                    _ = stop.cancelled() => None,
                    r = hook.runnable.run(envelope) => Some(r),
                };
                if let Some(entered) = entered {
                    entered.leave().await;
                }
                match result {
                    Some(r) => (started, r),
                    None => return pending.tell(Verdict::Stopped),
                }
            };
            self.record(name, envelope, started, &result);
            match result {
                Ok(Outcome::Done) => {
                    info!(hook = %name, event = envelope.event.name(), resource = %envelope.event.resource(), "Hook ran.");
                    pending.tell(Verdict::Ran);
                }
                Ok(Outcome::Vetoed(reason)) => {
                    info!(hook = %name, event = envelope.event.name(), reason = %reason, "Hook vetoed.");
                    pending.tell(Verdict::Ran);
                }
                // A wiring mistake (wrong kind of event) will not heal.
                Err(e)
                    if attempt < hook.spec.retries
                        && !matches!(e, HookError::WrongEvent { .. }) =>
                {
                    attempt += 1;
                    let wait = backoff.next_delay();
                    warn!(hook = %name, event = envelope.event.name(), error = %e, attempt, retry_in = ?wait, "Hook failed; retrying.");
                    current = Some(pending);
                    tokio::select! {
                        _ = stop.cancelled() => {
                            if let Some(p) = current.take() {
                                p.tell(Verdict::Stopped);
                            }
                            return;
                        }
                        _ = tokio::time::sleep(wait) => {}
                        // A newer event replaces the failing one at once.
                        _ = news.changed() => { news.borrow_and_update(); }
                    }
                }
                Err(e) => {
                    error!(hook = %name, event = envelope.event.name(), error = %e, attempts = attempt + 1, "Hook failed; giving up on this event.");
                    pending.tell(Verdict::Failed(e.to_string()));
                }
            }
        }
    }
}

impl Drop for HookRunner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The component file of a WASM hook, for errors.
fn first_path(spec: &HookSpec) -> String {
    match &spec.action {
        HookAction::Wasm(w) => w.path.display().to_string(),
        HookAction::Exec { argv } => argv.join(" "),
    }
}
