//! The agent's state as the controllers report it: what `/status` and
//! `/health` show and the metrics' gauges read.

use std::collections::{BTreeMap, VecDeque};
use std::time::SystemTime;

use super::report::{
    GateWaitReport, HookRunReport, QueueName, QueueReport, ResourceKind, ResourceReport,
    SessionPhase, SessionReport, StatusReport,
};
use crate::etcd::{LeaseId, SessionState};

/// Hook runs kept for `/status`.
const HOOK_HISTORY: usize = 50;

pub(super) fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[derive(Debug)]
struct Resource {
    state: String,
    /// Why it is in this state, while it is (cleared on a change).
    detail: Option<String>,
    last_error: Option<(String, String)>,
    last_change: String,
}

#[derive(Debug)]
pub(super) struct Board {
    pub agent: String,
    started_at: String,
    session: SessionState,
    session_since: String,
    pub cache_ready: bool,
    pub first_reconcile_done: bool,
    queues: BTreeMap<QueueName, u64>,
    resources: BTreeMap<(ResourceKind, String), Resource>,
    hooks: VecDeque<HookRunReport>,
    /// Runs waiting at a fleet gate: (hook, resource) → since when.
    gates: BTreeMap<(String, String), String>,
}

impl Board {
    pub fn new() -> Board {
        Board {
            agent: String::new(),
            started_at: now(),
            session: SessionState::Pending,
            session_since: now(),
            cache_ready: false,
            first_reconcile_done: false,
            queues: BTreeMap::new(),
            resources: BTreeMap::new(),
            hooks: VecDeque::new(),
            gates: BTreeMap::new(),
        }
    }

    pub fn session_phase(&self) -> SessionPhase {
        phase(&self.session)
    }

    pub fn session_alive(&self) -> bool {
        matches!(self.session, SessionState::Alive { .. })
    }

    pub fn set_session(&mut self, state: SessionState) {
        if phase(&state) != phase(&self.session) {
            self.session_since = now();
        }
        self.session = state;
    }

    /// Why the agent is not healthy; empty when it is.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        match self.session {
            SessionState::Alive { .. } => {}
            SessionState::Pending => out.push(
                "session: no lease yet (etcd has not answered a lease grant)".to_owned(),
            ),
            SessionState::Lost { lease } => out.push(format!(
                "session: lease {lease} lost (no keepalive answer before its deadline); asking etcd for a new one"
            )),
            SessionState::Closed => out.push("session: closed (the agent is stopping)".to_owned()),
        }
        if !self.cache_ready {
            out.push("cache: the first full read from etcd has not completed".to_owned());
        }
        out
    }

    pub fn set_queue(&mut self, queue: QueueName, depth: u64) {
        self.queues.insert(queue, depth);
    }

    pub fn queue(&self, queue: QueueName) -> u64 {
        self.queues.get(&queue).copied().unwrap_or(0)
    }

    /// Sets a resource's state; `error` is kept as its latest error.
    pub fn set(&mut self, kind: ResourceKind, name: &str, state: &str, error: Option<String>) {
        let at = now();
        let r = self
            .resources
            .entry((kind, name.to_owned()))
            .or_insert_with(|| Resource {
                state: String::new(),
                detail: None,
                last_error: None,
                last_change: at.clone(),
            });
        if r.state != state {
            r.state = state.to_owned();
            r.detail = None;
            r.last_change = at.clone();
        }
        if let Some(e) = error {
            r.last_error = Some((e, at));
        }
    }

    /// Says why a resource is in its current state (a failing check's
    /// output, a maintenance reason), until the state changes.
    pub fn set_detail(&mut self, kind: ResourceKind, name: &str, detail: Option<String>) {
        if let Some(r) = self.resources.get_mut(&(kind, name.to_owned())) {
            r.detail = detail;
        }
    }

    /// Forgets resources of `kind` that are not in `keep` (removed from the
    /// manifest), and lists the new ones as `pending`.
    pub fn declare(&mut self, kind: ResourceKind, keep: &[String]) {
        self.resources
            .retain(|(k, name), _| *k != kind || keep.contains(name));
        for name in keep {
            if !self.resources.contains_key(&(kind, name.clone())) {
                self.set(kind, name, "pending", None);
            }
        }
    }

    pub fn count(&self, kind: ResourceKind, state: impl Fn(&str) -> bool) -> usize {
        self.resources
            .iter()
            .filter(|((k, _), r)| *k == kind && state(&r.state))
            .count()
    }

    pub fn hook_ran(&mut self, run: HookRunReport) {
        if self.hooks.len() == HOOK_HISTORY {
            self.hooks.pop_front();
        }
        self.hooks.push_back(run);
    }

    pub fn gate_wait(&mut self, hook: &str, resource: &str, waiting: bool) {
        let key = (hook.to_owned(), resource.to_owned());
        if waiting {
            self.gates.insert(key, now());
        } else {
            self.gates.remove(&key);
        }
    }

    /// Runs waiting at a gate, per hook.
    pub fn gate_waits(&self) -> BTreeMap<&str, i64> {
        let mut out = BTreeMap::new();
        for (hook, _) in self.gates.keys() {
            *out.entry(hook.as_str()).or_default() += 1;
        }
        out
    }

    pub fn report(&self) -> StatusReport {
        let (lease, expires_in_ms) = match self.session {
            SessionState::Alive { lease, deadline } => (
                Some(lease),
                Some(
                    deadline
                        .saturating_duration_since(crate::etcd::Clock::system().now())
                        .as_millis() as u64,
                ),
            ),
            SessionState::Lost { lease } => (Some(lease), None),
            _ => (None, None),
        };
        let problems = self.problems();
        StatusReport {
            agent: self.agent.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            started_at: self.started_at.clone(),
            healthy: problems.is_empty(),
            problems,
            session: SessionReport {
                state: self.session_phase(),
                lease: lease.map(|l: LeaseId| l.to_string()),
                expires_in_ms,
                since: self.session_since.clone(),
            },
            cache_ready: self.cache_ready,
            first_reconcile_done: self.first_reconcile_done,
            queues: [QueueName::Presence, QueueName::Files]
                .into_iter()
                .map(|queue| QueueReport {
                    queue,
                    depth: self.queue(queue),
                })
                .collect(),
            resources: self
                .resources
                .iter()
                .map(|((kind, name), r)| ResourceReport {
                    kind: *kind,
                    name: name.clone(),
                    state: r.state.clone(),
                    detail: r.detail.clone(),
                    last_error: r.last_error.as_ref().map(|(e, _)| e.clone()),
                    last_error_at: r.last_error.as_ref().map(|(_, at)| at.clone()),
                    last_change: r.last_change.clone(),
                })
                .collect(),
            hooks: self.hooks.iter().cloned().collect(),
            gates: self
                .gates
                .iter()
                .map(|((hook, resource), since)| GateWaitReport {
                    hook: hook.clone(),
                    resource: resource.clone(),
                    since: since.clone(),
                })
                .collect(),
        }
    }
}

fn phase(state: &SessionState) -> SessionPhase {
    match state {
        SessionState::Pending => SessionPhase::Pending,
        SessionState::Alive { .. } => SessionPhase::Alive,
        SessionState::Lost { .. } => SessionPhase::Lost,
        SessionState::Closed => SessionPhase::Closed,
    }
}
