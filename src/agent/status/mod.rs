//! What the agent tells operators about itself: the state of every
//! resource, Prometheus metrics, the local HTTP endpoint that serves them
//! (`[status]`), and systemd's notify protocol.
//!
//! Controllers report into one [`Status`] handle; a controller built
//! without one gets a detached handle that nobody reads.

mod board;
mod metrics;
mod notify;
pub mod report;
mod server;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use board::Board;
use board::now as rfc3339_now;
use metrics::{Live, Metrics};
pub use notify::Notifier;
use report::{HookResult, HookRunReport, QueueName, ResourceKind, StatusReport};
pub use server::{ServeError, StatusServer};

use super::manifest::Manifest;
use crate::etcd::{SessionState, SessionStats, WatchStats};

/// systemd's notify socket variable. Only the agent speaks for its unit:
/// the commands it starts (hooks, checks, tasks) do not inherit it, so
/// none can send READY=1 or pet the watchdog in its place.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// How a render ended: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenderOutcome {
    Replaced,
    Unchanged,
    /// Rendering or writing failed; the old file stayed.
    Failed,
    /// The file's `on_change` hooks failed on a new render, so the
    /// previous content was put back (`revert = true`).
    Reverted,
}

impl RenderOutcome {
    fn name(self) -> &'static str {
        match self {
            RenderOutcome::Replaced => "replaced",
            RenderOutcome::Unchanged => "unchanged",
            RenderOutcome::Failed => "failed",
            RenderOutcome::Reverted => "reverted",
        }
    }
}

/// How a task run ended: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskExit {
    Code(i32),
    Signal(i32),
    /// The lock was lost and the command stopped.
    LockLost,
    /// The agent stopped it (shutdown, removed from the manifest, timeout).
    Stopped,
}

impl TaskExit {
    fn label(self) -> String {
        match self {
            TaskExit::Code(c) => c.to_string(),
            TaskExit::Signal(s) => format!("signal_{s}"),
            TaskExit::LockLost => "lock_lost".to_owned(),
            TaskExit::Stopped => "stopped".to_owned(),
        }
    }
}

/// A hook run waiting at its gate, shown in `/status` until dropped.
#[derive(Debug)]
pub struct GateWait {
    status: Status,
    hook: String,
    resource: String,
}

impl Drop for GateWait {
    fn drop(&mut self) {
        self.status
            .board()
            .gate_wait(&self.hook, &self.resource, false);
    }
}

/// The agent's shared status: cheap to clone, one per agent process.
#[derive(Debug, Clone)]
pub struct Status {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    board: Arc<Mutex<Board>>,
    metrics: Metrics,
    session_stats: Arc<SessionStats>,
    watch_stats: Arc<WatchStats>,
    first_reconcile: watch::Sender<bool>,
}

impl Default for Status {
    fn default() -> Self {
        Status::new("")
    }
}

impl Status {
    pub fn new(agent: &str) -> Status {
        let mut board = Board::new();
        board.agent = agent.to_owned();
        let board = Arc::new(Mutex::new(board));
        let session_stats = Arc::<SessionStats>::default();
        let watch_stats = Arc::<WatchStats>::default();
        let metrics = Metrics::new(Live {
            board: board.clone(),
            session: session_stats.clone(),
            watch: watch_stats.clone(),
        });
        Status {
            inner: Arc::new(Inner {
                board,
                metrics,
                session_stats,
                watch_stats,
                first_reconcile: watch::Sender::new(false),
            }),
        }
    }

    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        self.inner.board.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counters every session of this agent adds to, so they only grow
    /// across reconnects.
    pub fn session_stats(&self) -> Arc<SessionStats> {
        self.inner.session_stats.clone()
    }

    /// Counters every cache of this agent adds to.
    pub fn watch_stats(&self) -> Arc<WatchStats> {
        self.inner.watch_stats.clone()
    }

    pub fn set_session(&self, state: SessionState) {
        self.board().set_session(state);
    }

    pub fn session_alive(&self) -> bool {
        self.board().session_alive()
    }

    pub fn set_cache_ready(&self, ready: bool) {
        self.board().cache_ready = ready;
    }

    /// The reconciler finished a pass (the first one makes the agent ready).
    pub fn reconciled(&self) {
        let first = {
            let mut b = self.board();
            !std::mem::replace(&mut b.first_reconcile_done, true)
        };
        if first {
            self.inner.first_reconcile.send_replace(true);
        }
    }

    /// Becomes `true` once the first reconcile pass finished.
    pub fn first_reconcile(&self) -> watch::Receiver<bool> {
        self.inner.first_reconcile.subscribe()
    }

    pub fn set_queue(&self, queue: QueueName, depth: usize) {
        self.board().set_queue(queue, depth as u64);
    }

    /// Sets a resource's state; `error`, when given, becomes its latest
    /// error.
    pub fn set(&self, kind: ResourceKind, name: &str, state: &str, error: Option<String>) {
        self.board().set(kind, name, state, error);
    }

    /// Says why a resource is in its current state, until it changes.
    pub fn set_detail(&self, kind: ResourceKind, name: &str, detail: Option<String>) {
        self.board().set_detail(kind, name, detail);
    }

    /// Lists what `manifest` declares (new resources as `pending`) and
    /// forgets what it no longer does.
    pub fn declare(&self, manifest: &Manifest) {
        let mut b = self.board();
        b.agent = manifest.agent.name.clone();
        b.declare(
            ResourceKind::Presence,
            std::slice::from_ref(&manifest.agent.name),
        );
        let files: Vec<String> = manifest
            .files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        b.declare(ResourceKind::File, &files);
        let services: Vec<String> = manifest
            .services
            .iter()
            .map(|s| format!("{}/{}", s.name, s.id))
            .collect();
        b.declare(ResourceKind::Service, &services);
        let tasks: Vec<String> = manifest.tasks.iter().map(|t| t.name.clone()).collect();
        b.declare(ResourceKind::Task, &tasks);
        let mut locks: Vec<String> = manifest.tasks.iter().map(|t| t.lock.clone()).collect();
        locks.sort();
        locks.dedup();
        b.declare(ResourceKind::Lock, &locks);
        let pools: Vec<String> = manifest
            .instance_ids
            .iter()
            .map(|i| i.pool.clone())
            .collect();
        b.declare(ResourceKind::InstanceId, &pools);
    }

    pub fn file_rendered(
        &self,
        path: &Path,
        took: Duration,
        outcome: RenderOutcome,
        error: Option<String>,
    ) {
        let m = &self.inner.metrics;
        m.file_renders
            .get_or_create(&vec![("result", outcome.name().to_owned())])
            .inc();
        m.file_render_seconds.observe(took.as_secs_f64());
        let state = match outcome {
            RenderOutcome::Failed => "failed",
            RenderOutcome::Reverted => "reverted",
            RenderOutcome::Replaced | RenderOutcome::Unchanged => "current",
        };
        self.set(
            ResourceKind::File,
            &path.display().to_string(),
            state,
            error,
        );
    }

    pub fn hook_ran(
        &self,
        hook: &str,
        event: &str,
        resource: &str,
        took: Duration,
        result: HookResult,
        error: Option<String>,
    ) {
        let m = &self.inner.metrics;
        m.hook_runs
            .get_or_create(&vec![
                ("hook", hook.to_owned()),
                ("result", result.name().to_owned()),
            ])
            .inc();
        m.hook_run_seconds
            .get_or_create(&vec![("hook", hook.to_owned())])
            .observe(took.as_secs_f64());
        self.board().hook_ran(HookRunReport {
            hook: hook.to_owned(),
            event: event.to_owned(),
            resource: resource.to_owned(),
            result,
            duration_ms: took.as_millis() as u64,
            at: rfc3339_now(),
            error,
        });
    }

    /// A run of `hook` for `resource` waits at its fleet gate until the
    /// returned value is dropped.
    pub fn gate_waiting(&self, hook: &str, resource: &str) -> GateWait {
        self.board().gate_wait(hook, resource, true);
        GateWait {
            status: self.clone(),
            hook: hook.to_owned(),
            resource: resource.to_owned(),
        }
    }

    /// A run of `hook` got its place at the gate after `waited`.
    pub fn gate_passed(&self, hook: &str, waited: Duration) {
        self.inner
            .metrics
            .hook_gate_wait_seconds
            .get_or_create(&vec![("hook", hook.to_owned())])
            .observe(waited.as_secs_f64());
    }

    pub fn task_ended(&self, task: &str, exit: TaskExit) {
        self.inner
            .metrics
            .task_runs
            .get_or_create(&vec![("task", task.to_owned()), ("exit", exit.label())])
            .inc();
        let state = match exit {
            TaskExit::Code(c) => format!("last exit {c}"),
            TaskExit::Signal(s) => format!("last run killed by signal {s}"),
            TaskExit::LockLost => "last run stopped: lock lost".to_owned(),
            TaskExit::Stopped => "last run stopped".to_owned(),
        };
        let error = match exit {
            TaskExit::Code(0) | TaskExit::Stopped => None,
            _ => Some(state.clone()),
        };
        self.set(ResourceKind::Task, task, &state, error);
    }

    /// A DNS query was answered (`qtype` and `result` from small closed
    /// sets: see `dns::type_label` and `dns::QueryResult`).
    pub fn dns_query(&self, qtype: &'static str, result: &'static str) {
        self.inner
            .metrics
            .dns_queries
            .get_or_create(&vec![
                ("type", qtype.to_owned()),
                ("result", result.to_owned()),
            ])
            .inc();
    }

    /// Why `/health` is not 200 (empty when it is).
    pub fn problems(&self) -> Vec<String> {
        self.board().problems()
    }

    pub fn report(&self) -> StatusReport {
        self.board().report()
    }

    /// The Prometheus exposition.
    pub fn metrics_text(&self) -> String {
        self.inner.metrics.encode()
    }
}
