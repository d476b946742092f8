//! `[[task]]`: commands that run only while the agent holds their lock.
//!
//! Each task has its own loop: wait for its time, take the lock on the
//! agent's session lease, run the command under a supervisor (so it never
//! outlives the lock), record the run, release. A leader keeps the lock
//! and restarts its command with backoff.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::hooks::{Event, HookRunner};
use super::manifest::{Schedule, TaskSpec};
use super::sleep_or_stop;
use super::status::report::ResourceKind;
use super::status::{Status, TaskExit};
use super::supervise::{Ended, Supervised, max_grace, run_guarded};
use crate::etcd::{Backoff, Client, LeaseId, SessionState, alive_lease};
use crate::lock::{self, Holder};

/// Runs kept per task in `<namespace>/tasks/<task>/runs/`.
const HISTORY: usize = 20;

/// One run, as recorded in etcd (no lease: it outlives the agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub agent: String,
    pub token: i64,
    pub started_at: String,
    pub ended_at: String,
    /// The exit code, or 128 + signal.
    pub exit: Option<i32>,
    /// The lock was lost and the command stopped.
    pub lock_lost: bool,
}

fn tasks_key(namespace: &str, task: &str, rest: &str) -> String {
    format!("{}/tasks/{task}/{rest}", namespace.trim_end_matches('/'))
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// The task loops of one agent.
#[derive(Debug, Clone)]
pub struct TasksController {
    client: Client,
    namespace: String,
    agent: String,
    coord: PathBuf,
    ids: Option<super::instance_ids::HeldIds>,
    status: Status,
}

impl TasksController {
    /// `coord` is the binary to run supervisors with (the agent itself).
    pub fn new(client: Client, namespace: &str, agent: &str, coord: PathBuf) -> Self {
        TasksController {
            client,
            namespace: namespace.to_owned(),
            agent: agent.to_owned(),
            coord,
            ids: None,
            status: Status::default(),
        }
    }

    /// Reports task runs and locks to `status`.
    pub fn with_status(mut self, status: Status) -> Self {
        self.status = status;
        self
    }

    /// Gives commands the agent's instance ids as
    /// `COORD_INSTANCE_ID_<POOL>` (pool upper-cased, `-` as `_`).
    pub fn with_ids(mut self, ids: super::instance_ids::HeldIds) -> Self {
        self.ids = Some(ids);
        self
    }

    pub async fn run(
        self,
        session: watch::Receiver<SessionState>,
        mut specs: watch::Receiver<Vec<TaskSpec>>,
        hooks: watch::Receiver<Arc<HookRunner>>,
        cancel: CancellationToken,
    ) {
        let mut running: BTreeMap<String, (TaskSpec, CancellationToken)> = BTreeMap::new();
        loop {
            let wanted = specs.borrow_and_update().clone();
            running.retain(|name, (spec, stop)| {
                let keep = wanted.iter().any(|w| w.name == *name && w == spec);
                if !keep {
                    stop.cancel();
                }
                keep
            });
            for spec in wanted {
                if running.contains_key(&spec.name) {
                    continue;
                }
                let stop = cancel.child_token();
                let this = self.clone();
                let (session, hooks, s) = (session.clone(), hooks.clone(), spec.clone());
                let token = stop.clone();
                tokio::spawn(async move { this.task_loop(s, session, hooks, token).await });
                running.insert(spec.name.clone(), (spec, stop));
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = specs.changed() => if changed.is_err() { return },
            }
        }
    }

    async fn task_loop(
        self,
        spec: TaskSpec,
        mut session: watch::Receiver<SessionState>,
        hooks: watch::Receiver<Arc<HookRunner>>,
        stop: CancellationToken,
    ) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            // When to try next.
            let slot = match &spec.schedule {
                Schedule::Once => {
                    if self.done(&spec).await {
                        info!(task = %spec.name, "Task already done once; not running it.");
                        return;
                    }
                    0
                }
                Schedule::Leader => 0,
                Schedule::Every(every) => {
                    let (slot, wait) = next_slot(*every);
                    if sleep_or_stop(wait, &stop).await {
                        return;
                    }
                    slot
                }
                Schedule::Cron(expr) => {
                    let Some((slot, wait)) = next_cron(expr) else {
                        warn!(task = %spec.name, cron = %expr, "No next time for this cron expression; the task stops.");
                        return;
                    };
                    if sleep_or_stop(wait, &stop).await {
                        return;
                    }
                    slot
                }
            };
            // Take the lock on the current lease.
            self.status
                .set(ResourceKind::Task, &spec.name, "waiting for the lock", None);
            let lease = tokio::select! {
                _ = stop.cancelled() => return,
                l = alive_lease(&mut session) => l,
            };
            let grace = spec.grace.min(max_grace(ttl_of(&session, lease)));
            let prepared = match Supervised::prepare(&self.coord, &spec.run, grace) {
                Ok(p) => p,
                Err(e) => {
                    warn!(task = %spec.name, error = %e, "Cannot start the task's supervisor.");
                    if sleep_or_stop(backoff.next_delay(), &stop).await {
                        return;
                    }
                    continue;
                }
            };
            let me = Holder {
                agent: self.agent.clone(),
                host: super::manifest::host_name(),
                pid: std::process::id(),
            };
            let acquire = lock::acquire(
                &self.client,
                lease,
                &self.namespace,
                &spec.lock,
                spec.mode,
                &me,
            );
            let guard = tokio::select! {
                _ = stop.cancelled() => {
                    // Our place in the queue goes with its key.
                    let _ = self.client.delete(&lock::holder_key(&self.namespace, &spec.lock, spec.mode, lease)).await;
                    return;
                }
                g = acquire => match g {
                    Ok(g) => g,
                    Err(e) => {
                        warn!(task = %spec.name, error = %e, "Could not take the task's lock.");
                        self.status.set(ResourceKind::Lock, &spec.lock, "free", Some(e.to_string()));
                        if sleep_or_stop(backoff.next_delay(), &stop).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            info!(task = %spec.name, lock = %spec.lock, token = guard.token, "Task lock acquired.");
            self.status.set(
                ResourceKind::Lock,
                &spec.lock,
                &format!("held (token {})", guard.token),
                None,
            );
            self.fire(
                &hooks,
                &spec,
                Event::LockAcquired {
                    lock: spec.lock.clone(),
                    fencing_token: guard.token,
                },
            );
            // A round (or the one-off) someone else already ran is skipped.
            let skip = match &spec.schedule {
                Schedule::Once => self.done(&spec).await,
                Schedule::Every(_) | Schedule::Cron(_) => self.slot_taken(&spec, slot).await,
                Schedule::Leader => false,
            };
            if skip {
                let _ = guard.release(&self.client).await;
                self.status
                    .set(ResourceKind::Lock, &spec.lock, "free", None);
                continue;
            }
            if matches!(spec.schedule, Schedule::Every(_) | Schedule::Cron(_)) {
                let _ = self
                    .client
                    .put(
                        &tasks_key(&self.namespace, &spec.name, "slot"),
                        slot.to_string(),
                        None,
                    )
                    .await;
            }
            let mut prepared = Some(prepared);
            let lost = loop {
                let supervised = match prepared.take() {
                    Some(p) => p,
                    None => match Supervised::prepare(&self.coord, &spec.run, grace) {
                        Ok(p) => p,
                        Err(e) => {
                            warn!(task = %spec.name, error = %e, "Cannot restart the task's supervisor.");
                            break false;
                        }
                    },
                };
                let started_at = now_rfc3339();
                self.status
                    .set(ResourceKind::Task, &spec.name, "running", None);
                let env = self.env(&spec, &guard);
                let timeout = spec.timeout;
                let stopping = stop.clone();
                let stop_or_timeout = async move {
                    match timeout {
                        Some(t) => {
                            tokio::select! {
                                _ = stopping.cancelled() => {}
                                _ = tokio::time::sleep(t) => {}
                            }
                        }
                        None => stopping.cancelled().await,
                    }
                };
                let ended =
                    run_guarded(supervised, lease, &env, session.clone(), stop_or_timeout).await;
                let (exit, lock_lost) = match ended {
                    Ended::Exited(code) => (Some(code), false),
                    Ended::LockLost => (None, true),
                    Ended::Stopped => (None, false),
                };
                info!(task = %spec.name, token = guard.token, exit = ?exit, lock_lost, "Task run ended.");
                self.status.task_ended(
                    &spec.name,
                    match (exit, lock_lost) {
                        (_, true) => TaskExit::LockLost,
                        (Some(c), _) if c > 128 => TaskExit::Signal(c - 128),
                        (Some(c), _) => TaskExit::Code(c),
                        (None, false) => TaskExit::Stopped,
                    },
                );
                self.record(
                    &spec,
                    RunRecord {
                        agent: self.agent.clone(),
                        token: guard.token,
                        started_at,
                        ended_at: now_rfc3339(),
                        exit,
                        lock_lost,
                    },
                )
                .await;
                let signal = exit.filter(|c| *c > 128).map(|c| c - 128);
                self.fire(
                    &hooks,
                    &spec,
                    Event::TaskFinished {
                        task: spec.name.clone(),
                        fencing_token: guard.token,
                        exit_code: exit.filter(|c| *c <= 128),
                        signal,
                    },
                );
                if lock_lost {
                    break true;
                }
                if spec.schedule == Schedule::Once && exit == Some(0) {
                    let done = serde_json::json!({"agent": self.agent, "token": guard.token, "at": now_rfc3339()});
                    let _ = self
                        .client
                        .put(
                            &tasks_key(&self.namespace, &spec.name, "done"),
                            done.to_string(),
                            None,
                        )
                        .await;
                }
                if stop.is_cancelled() || spec.schedule != Schedule::Leader {
                    break false;
                }
                // A leader's command exited: restart it while we hold the lock.
                let wait = backoff.next_delay();
                warn!(task = %spec.name, exit = ?exit, retry_in = ?wait, "Leader command exited; restarting it.");
                if sleep_or_stop(wait, &stop).await {
                    break false;
                }
            };
            if lost {
                warn!(task = %spec.name, lock = %spec.lock, "Task lock lost; its command was stopped.");
                self.status.set(
                    ResourceKind::Lock,
                    &spec.lock,
                    "lost",
                    Some("lost with the session lease; the command was stopped".to_owned()),
                );
                self.fire(
                    &hooks,
                    &spec,
                    Event::LockLost {
                        lock: spec.lock.clone(),
                        fencing_token: guard.token,
                    },
                );
            } else {
                let _ = guard.release(&self.client).await;
                self.status
                    .set(ResourceKind::Lock, &spec.lock, "free", None);
            }
            if stop.is_cancelled() {
                return;
            }
            if spec.schedule == Schedule::Once && !lost && self.done(&spec).await {
                return;
            }
            if spec.schedule == Schedule::Once && sleep_or_stop(backoff.next_delay(), &stop).await {
                return;
            }
        }
    }

    fn env(&self, spec: &TaskSpec, guard: &lock::Guard) -> Vec<(String, String)> {
        let token = guard.token.to_string();
        let mut env: Vec<(String, String)> = spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.extend([
            ("COORD_TASK".to_owned(), spec.name.clone()),
            ("COORD_LOCK_NAME".to_owned(), spec.lock.clone()),
            ("COORD_LOCK_KEY".to_owned(), guard.key.clone()),
            ("COORD_FENCING_TOKEN".to_owned(), token.clone()),
            ("ETCD_LOCK_KEY".to_owned(), guard.key.clone()),
            ("ETCD_LOCK_REV".to_owned(), token),
        ]);
        if let Some(ids) = &self.ids {
            for (pool, id) in ids.borrow().iter() {
                let name = pool.to_uppercase().replace('-', "_");
                env.push((format!("COORD_INSTANCE_ID_{name}"), id.to_string()));
            }
        }
        env
    }

    fn fire(&self, hooks: &watch::Receiver<Arc<HookRunner>>, spec: &TaskSpec, event: Event) {
        if !spec.on_change.is_empty() {
            hooks.borrow().clone().fire(&spec.on_change, &event);
        }
    }

    async fn done(&self, spec: &TaskSpec) -> bool {
        matches!(
            self.client
                .get(&tasks_key(&self.namespace, &spec.name, "done"))
                .await,
            Ok(Some(_))
        )
    }

    async fn slot_taken(&self, spec: &TaskSpec, slot: i64) -> bool {
        match self
            .client
            .get(&tasks_key(&self.namespace, &spec.name, "slot"))
            .await
        {
            Ok(Some(kv)) => kv
                .value_str()
                .parse::<i64>()
                .is_ok_and(|taken| taken >= slot),
            _ => false,
        }
    }

    /// Records a run and keeps the history bounded.
    async fn record(&self, spec: &TaskSpec, run: RunRecord) {
        let prefix = tasks_key(&self.namespace, &spec.name, "runs/");
        let key = format!("{prefix}{:020}", run.token);
        let value = serde_json::to_vec(&run).unwrap_or_default();
        if let Err(e) = self.client.put(&key, value, None).await {
            warn!(task = %spec.name, error = %e, "Could not record the task run.");
            return;
        }
        if let Ok(all) = self.client.get_prefix(&prefix).await
            && all.kvs.len() > HISTORY
        {
            for old in &all.kvs[..all.kvs.len() - HISTORY] {
                let _ = self.client.delete(&old.key).await;
            }
        }
    }
}

/// The lease's TTL, from how far its deadline is (never below 2 s).
fn ttl_of(session: &watch::Receiver<SessionState>, lease: LeaseId) -> Duration {
    match *session.borrow() {
        SessionState::Alive { lease: l, deadline } if l == lease => deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_secs(2)),
        _ => Duration::from_secs(2),
    }
}

/// The next slot of an interval, aligned to the Unix epoch so that every
/// agent agrees on it: (slot number, time until it starts).
fn next_slot(every: Duration) -> (i64, Duration) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let every_ms = every.as_millis().max(1);
    let slot = now.as_millis() / every_ms + 1;
    let at = Duration::from_millis((slot * every_ms) as u64);
    (slot as i64, at.saturating_sub(now))
}

/// The next time of a cron expression: (its Unix second, time until then).
fn next_cron(expr: &str) -> Option<(i64, Duration)> {
    let cron = croner::Cron::from_str(expr).ok()?;
    let now = chrono::Utc::now();
    let next = cron.find_next_occurrence(&now, false).ok()?;
    let wait = (next - now).to_std().unwrap_or_default();
    Some((next.timestamp(), wait))
}
