//! `[[task]]`: commands that run only while the agent holds their lock.
//!
//! Each task has its own loop: wait for its time, take the lock on the
//! agent's session lease ([`Holding`]: the command runs under a
//! supervisor, so it never outlives the lock), record the run, release. A
//! leader holds the lock while its command runs; when the command exits,
//! it releases and takes the lock again after a backoff.
//!
//! Runs of this agent on one lock queue locally first (one holder per lock
//! and agent, each run with its own key and fencing token); a changed
//! task's new loop starts once the old one has stopped its command and
//! released; a stop waits for every loop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::controller::{Context, Loops};
use super::hold::{Claim, Ended, Guarded, Held, HoldError, Holding};
use super::hooks::{Event, HookRunner};
use super::manifest::{Schedule, TaskSpec};
use super::schedule_clock::ScheduleClock;
use super::sleep_or_stop;
use super::status::TaskExit;
use super::status::report::ResourceKind;
use super::supervise::max_grace;
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
    ctx: Context,
    coord: PathBuf,
    ids: Option<super::instance_ids::HeldIds>,
    /// The agent's local queue per lock name.
    turns: Arc<std::sync::Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// What `every` and cron schedules read: wall time, steps back held.
    clock: ScheduleClock,
}

impl TasksController {
    /// `coord` is the binary to run supervisors with (the agent itself).
    pub fn new(ctx: &Context, coord: PathBuf) -> Self {
        TasksController {
            ctx: ctx.clone(),
            coord,
            ids: None,
            turns: Arc::default(),
            clock: ScheduleClock::default(),
        }
    }

    /// Gives commands the agent's instance ids as
    /// `COORD_INSTANCE_ID_<POOL>` (pool upper-cased, `-` as `_`).
    pub fn with_ids(mut self, ids: super::instance_ids::HeldIds) -> Self {
        self.ids = Some(ids);
        self
    }

    pub async fn run(self, mut specs: watch::Receiver<Vec<TaskSpec>>) {
        let (session, hooks, cancel) = (
            self.ctx.session.clone(),
            self.ctx.hooks.clone(),
            self.ctx.cancel.clone(),
        );
        let mut loops: Loops<String> = Loops::new(&cancel);
        let mut current: BTreeMap<String, TaskSpec> = BTreeMap::new();
        loop {
            let wanted = specs.borrow_and_update().clone();
            // A changed task's old loop stops, and its new one starts only
            // once the old one has returned: command gone, lock released.
            loops.follow(
                &mut current,
                wanted.into_iter().map(|t| (t.name.clone(), t)),
                |spec, stop| {
                    let this = self.clone();
                    this.task_loop(spec, session.clone(), hooks.clone(), stop)
                },
            );
            tokio::select! {
                _ = cancel.cancelled() => break,
                changed = specs.changed() => if changed.is_err() { break },
            }
        }
        // Every command stopped and every lock released before the caller
        // may revoke the lease.
        loops.shutdown().await;
    }

    /// The agent's local queue for `lock`: one holder per (lock, agent),
    /// whatever the number of tasks naming it.
    fn local_turn(&self, lock: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.turns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(lock.to_owned())
            .or_default()
            .clone()
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
                Schedule::Every(_) => {
                    let Some((slot, at)) = spec.schedule.next_round(self.clock.now()) else {
                        return;
                    };
                    if self.clock.sleep_until(at, &stop).await {
                        return;
                    }
                    slot
                }
                Schedule::Cron(expr) => {
                    let Some((slot, at)) = spec.schedule.next_round(self.clock.now()) else {
                        warn!(task = %spec.name, cron = %expr, "No next time for this cron expression; the task stops.");
                        return;
                    };
                    if self.clock.sleep_until(at, &stop).await {
                        return;
                    }
                    slot
                }
            };
            self.ctx
                .status
                .set(ResourceKind::Task, &spec.name, "waiting for the lock", None);
            let lease = tokio::select! {
                _ = stop.cancelled() => return,
                l = alive_lease(&mut session) => l,
            };
            let grace = spec.grace.min(max_grace(ttl_of(&session, lease)));
            let claim = self.claim(&spec, lease, &stop);
            let guarded = Guarded {
                client: &self.ctx.client,
                session: &session,
                coord: &self.coord,
                argv: &spec.run,
                grace,
            };
            let mut holding = match Holding::claim(guarded, claim).await {
                Ok(h) => h,
                Err(HoldError::Claim(TaskClaimError::Stopped)) => return,
                Err(e) => {
                    warn!(task = %spec.name, error = %e, "Could not take the task's lock.");
                    self.ctx.status.set(
                        ResourceKind::Lock,
                        &spec.lock,
                        "free",
                        Some(e.to_string()),
                    );
                    if sleep_or_stop(backoff.next_delay(), &stop).await {
                        return;
                    }
                    continue;
                }
            };
            let token = holding.held().guard.token;
            info!(task = %spec.name, lock = %spec.lock, token, "Task lock acquired.");
            self.ctx.status.set(
                ResourceKind::Lock,
                &spec.lock,
                &format!("held (token {token})"),
                None,
            );
            self.fire(
                &hooks,
                &spec,
                Event::LockAcquired {
                    lock: spec.lock.clone(),
                    fencing_token: token,
                },
            );
            // A round (or the one-off) someone else already ran is skipped;
            // a round is claimed by one compare-and-set, so holders of a
            // semaphore never both run it.
            let run = match &spec.schedule {
                Schedule::Once => !self.done(&spec).await,
                Schedule::Every(_) | Schedule::Cron(_) => self.claim_round(&spec, slot).await,
                Schedule::Leader => true,
            };
            let mut restart = false;
            if run {
                let started_at = now_rfc3339();
                self.ctx
                    .status
                    .set(ResourceKind::Task, &spec.name, "running", None);
                let stopped = async {
                    match spec.timeout {
                        Some(t) => {
                            tokio::select! {
                                _ = stop.cancelled() => {}
                                _ = tokio::time::sleep(t) => {}
                            }
                        }
                        None => stop.cancelled().await,
                    }
                };
                let ended = holding.run(self.env(&spec, slot), stopped).await;
                restart = self
                    .ran(&spec, &hooks, token, &started_at, ended, &stop)
                    .await;
            }
            match holding.finish().await {
                Held::Lost { .. } => {
                    warn!(task = %spec.name, lock = %spec.lock, "Task lock lost; its command was stopped.");
                    self.ctx.status.set(
                        ResourceKind::Lock,
                        &spec.lock,
                        "lost",
                        Some(
                            "lost (the lease, or the holder key was deleted); the command was stopped"
                                .to_owned(),
                        ),
                    );
                    self.fire(
                        &hooks,
                        &spec,
                        Event::LockLost {
                            lock: spec.lock.clone(),
                            fencing_token: token,
                        },
                    );
                }
                Held::Released { .. } => {
                    self.ctx
                        .status
                        .set(ResourceKind::Lock, &spec.lock, "free", None);
                }
            }
            if stop.is_cancelled() {
                return;
            }
            if restart {
                // A leader whose command exited lets the lock go and takes
                // it again after a pause: every run has its own fencing
                // token, and a host where the command keeps failing lets
                // another one lead.
                let wait = backoff.next_delay();
                warn!(task = %spec.name, retry_in = ?wait, "Leader command exited; taking the lock again after a pause.");
                if sleep_or_stop(wait, &stop).await {
                    return;
                }
                continue;
            }
            if spec.schedule == Schedule::Once && self.done(&spec).await {
                return;
            }
            if spec.schedule == Schedule::Once && sleep_or_stop(backoff.next_delay(), &stop).await {
                return;
            }
        }
    }

    /// Takes the task's lock on `lease`: first this agent's local turn on
    /// the lock, then the lock in etcd — a fresh holder key, so a fresh
    /// fencing token, for every run. Stopping while waiting gives up the
    /// place in the queue.
    async fn claim(
        &self,
        spec: &TaskSpec,
        lease: LeaseId,
        stop: &CancellationToken,
    ) -> Result<TaskClaim, TaskClaimError> {
        let turn = tokio::select! {
            _ = stop.cancelled() => return Err(TaskClaimError::Stopped),
            t = self.local_turn(&spec.lock).lock_owned() => t,
        };
        let me = Holder {
            agent: self.ctx.agent.clone(),
            host: super::manifest::host_name(),
            pid: std::process::id(),
        };
        let acquire = lock::acquire(
            &self.ctx.client,
            lease,
            &self.ctx.namespace,
            &spec.lock,
            spec.mode,
            &me,
        );
        tokio::select! {
            _ = stop.cancelled() => {
                // Our place in the queue goes with its key.
                let _ = self.ctx.client.delete(&lock::holder_key(&self.ctx.namespace, &spec.lock, spec.mode, lease)).await;
                Err(TaskClaimError::Stopped)
            }
            g = acquire => g.map(|guard| TaskClaim { guard, _turn: turn }).map_err(TaskClaimError::Lock),
        }
    }

    /// Records a run that ended and fires its hook; whether it was a
    /// leader's command that exited by itself (to be started again).
    async fn ran(
        &self,
        spec: &TaskSpec,
        hooks: &watch::Receiver<Arc<HookRunner>>,
        token: i64,
        started_at: &str,
        ended: Ended,
        stop: &CancellationToken,
    ) -> bool {
        let (exit, lock_lost) = match ended {
            Ended::Exited(code) => (Some(code), false),
            Ended::LockLost => (None, true),
            Ended::Stopped => (None, false),
        };
        match ended {
            Ended::Exited(code) => info!(task = %spec.name, token, exit = code, "Task run ended."),
            Ended::LockLost => {
                info!(task = %spec.name, token, "Task run ended: the lock was lost, so it was stopped.")
            }
            Ended::Stopped => info!(task = %spec.name, token, "Task run ended: it was stopped."),
        }
        self.ctx.status.task_ended(
            &spec.name,
            match (exit, lock_lost) {
                (_, true) => TaskExit::LockLost,
                (Some(c), _) if c > 128 => TaskExit::Signal(c - 128),
                (Some(c), _) => TaskExit::Code(c),
                (None, false) => TaskExit::Stopped,
            },
        );
        self.record(
            spec,
            RunRecord {
                agent: self.ctx.agent.clone(),
                token,
                started_at: started_at.to_owned(),
                ended_at: now_rfc3339(),
                exit,
                lock_lost,
            },
        )
        .await;
        let signal = exit.filter(|c| *c > 128).map(|c| c - 128);
        self.fire(
            hooks,
            spec,
            Event::TaskFinished {
                task: spec.name.clone(),
                fencing_token: token,
                exit_code: exit.filter(|c| *c <= 128),
                signal,
            },
        );
        if lock_lost {
            return false;
        }
        if spec.schedule == Schedule::Once && exit == Some(0) {
            let done =
                serde_json::json!({"agent": self.ctx.agent, "token": token, "at": now_rfc3339()});
            let _ = self
                .ctx
                .client
                .put(
                    &tasks_key(&self.ctx.namespace, &spec.name, "done"),
                    done.to_string(),
                    None,
                )
                .await;
        }
        !stop.is_cancelled() && spec.schedule == Schedule::Leader && exit.is_some()
    }

    fn env(&self, spec: &TaskSpec, slot: i64) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.push(("COORD_TASK".to_owned(), spec.name.clone()));
        if matches!(spec.schedule, Schedule::Every(_) | Schedule::Cron(_)) {
            env.push(("COORD_TASK_ROUND".to_owned(), slot.to_string()));
        }
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
            self.ctx
                .client
                .get(&tasks_key(&self.ctx.namespace, &spec.name, "done"))
                .await,
            Ok(Some(_))
        )
    }

    /// Claims round `slot` for this run: one compare-and-set on the
    /// task's round record, so however many agents hold the lock at once
    /// (a semaphore), one runs the round. An etcd error skips the round.
    async fn claim_round(&self, spec: &TaskSpec, slot: i64) -> bool {
        let key = tasks_key(&self.ctx.namespace, &spec.name, "slot");
        let current = match self.ctx.client.get(&key).await {
            Ok(kv) => kv,
            Err(e) => {
                warn!(task = %spec.name, round = slot, error = %e, "Cannot read the task's last round; skipping this one.");
                return false;
            }
        };
        let version = match &current {
            Some(kv)
                if kv
                    .value_str()
                    .parse::<i64>()
                    .is_ok_and(|taken| taken >= slot) =>
            {
                return false;
            }
            Some(kv) => kv.version,
            None => 0,
        };
        matches!(
            self.ctx
                .client
                .put_guarded(&key, slot.to_string(), Some(version))
                .await,
            Ok(crate::etcd::Guarded::Applied { .. })
        )
    }

    /// Records a run and keeps the history bounded.
    async fn record(&self, spec: &TaskSpec, run: RunRecord) {
        let prefix = tasks_key(&self.ctx.namespace, &spec.name, "runs/");
        let key = format!("{prefix}{:020}", run.token);
        let value = serde_json::to_vec(&run).unwrap_or_default();
        if let Err(e) = self.ctx.client.put(&key, value, None).await {
            warn!(task = %spec.name, error = %e, "Could not record the task run.");
            return;
        }
        if let Ok(all) = self.ctx.client.get_prefix(&prefix).await
            && all.kvs.len() > HISTORY
        {
            for old in &all.kvs[..all.kvs.len() - HISTORY] {
                let _ = self.ctx.client.delete(&old.key).await;
            }
        }
    }
}

/// A task's lock, held with this agent's local turn on it.
#[derive(Debug)]
pub struct TaskClaim {
    guard: lock::Guard,
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl Claim for TaskClaim {
    fn key(&self) -> &str {
        self.guard.key()
    }

    fn created(&self) -> i64 {
        self.guard.created()
    }

    fn lease(&self) -> LeaseId {
        Claim::lease(&self.guard)
    }

    fn env(&self) -> Vec<(String, String)> {
        self.guard.env()
    }

    async fn release(&self, client: &Client) -> Result<(), String> {
        Claim::release(&self.guard, client).await
    }
}

/// Why a task's lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum TaskClaimError {
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error("stopped while waiting for the lock")]
    Stopped,
}

/// The lease's TTL, from how far its deadline is (never below 2 s).
fn ttl_of(session: &watch::Receiver<SessionState>, lease: LeaseId) -> Duration {
    match *session.borrow() {
        SessionState::Alive { lease: l, deadline } if l == lease => deadline
            .saturating_duration_since(crate::etcd::Clock::system().now())
            .max(Duration::from_secs(2)),
        _ => Duration::from_secs(2),
    }
}
