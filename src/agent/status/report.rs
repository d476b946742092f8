//! What `/status` serves and `coord status` reads: plain data, the same
//! types on both sides.

use serde::{Deserialize, Serialize};

/// The agent's state at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub agent: String,
    pub version: String,
    pub pid: u32,
    pub started_at: String,
    /// What `/health` says: the session is alive and the cache ready.
    pub healthy: bool,
    /// Why it is not healthy (empty when it is).
    pub problems: Vec<String>,
    pub session: SessionReport,
    /// The reconciler's cache has completed its first full read.
    pub cache_ready: bool,
    /// The first reconcile pass has run (systemd's READY=1 was sent).
    pub first_reconcile_done: bool,
    /// Work waiting, per queue (see the README's `coord_reconcile_queue_depth`).
    pub queues: Vec<QueueReport>,
    pub resources: Vec<ResourceReport>,
    /// The latest hook runs, newest last.
    pub hooks: Vec<HookRunReport>,
    /// Hook runs waiting at their fleet gate (`fleet = { … }`): its splay,
    /// then a place among the hook's `at_most`.
    #[serde(default)]
    pub gates: Vec<GateWaitReport>,
}

/// A hook run waiting at its fleet gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateWaitReport {
    pub hook: String,
    pub resource: String,
    /// When it began to wait (RFC 3339).
    pub since: String,
}

/// The session lease as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionReport {
    pub state: SessionPhase,
    /// The lease id (hex) while alive or being replaced.
    pub lease: Option<String>,
    /// Time left until the local deadline, while alive.
    pub expires_in_ms: Option<u64>,
    /// When the state last changed (RFC 3339).
    pub since: String,
}

/// The states of [`crate::etcd::SessionState`], without their data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionPhase {
    /// No lease yet: etcd has not answered.
    Pending,
    Alive,
    /// The lease may be gone; a new one is being requested.
    Lost,
    Closed,
}

impl SessionPhase {
    pub const ALL: [SessionPhase; 4] = [
        SessionPhase::Pending,
        SessionPhase::Alive,
        SessionPhase::Lost,
        SessionPhase::Closed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SessionPhase::Pending => "pending",
            SessionPhase::Alive => "alive",
            SessionPhase::Lost => "lost",
            SessionPhase::Closed => "closed",
        }
    }
}

/// One queue of pending work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueReport {
    pub queue: QueueName,
    pub depth: u64,
}

/// The agent's queues of pending work: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueName {
    /// The reconciler's resources due or waiting for a retry.
    Presence,
    /// Files marked dirty (in their debounce) or waiting to retry a write.
    Files,
}

impl QueueName {
    pub fn name(self) -> &'static str {
        match self {
            QueueName::Presence => "presence",
            QueueName::Files => "files",
        }
    }
}

/// The kinds of resource the agent keeps: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    Presence,
    Service,
    File,
    Task,
    Lock,
    InstanceId,
}

impl ResourceKind {
    pub fn name(self) -> &'static str {
        match self {
            ResourceKind::Presence => "presence",
            ResourceKind::Service => "service",
            ResourceKind::File => "file",
            ResourceKind::Task => "task",
            ResourceKind::Lock => "lock",
            ResourceKind::InstanceId => "instance_id",
        }
    }
}

/// One resource and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceReport {
    pub kind: ResourceKind,
    /// The file's path, `service/instance`, the task, lock or pool name.
    pub name: String,
    /// A short word or phrase: `current`, `passing`, `held id 3`, …
    pub state: String,
    /// Why it is in this state, while it is: a critical service's check
    /// output, a maintenance reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The latest error, kept after recovery (see `last_error_at`).
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// When `state` last changed (RFC 3339).
    pub last_change: String,
}

/// One hook run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookRunReport {
    pub hook: String,
    pub event: String,
    pub resource: String,
    pub result: HookResult,
    pub duration_ms: u64,
    pub at: String,
    pub error: Option<String>,
}

/// How a hook run ended: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookResult {
    Ok,
    /// A validator said no.
    Vetoed,
    Failed,
}

impl HookResult {
    pub fn name(self) -> &'static str {
        match self {
            HookResult::Ok => "ok",
            HookResult::Vetoed => "vetoed",
            HookResult::Failed => "failed",
        }
    }
}
