//! The etcd layer: connection, session lease, watcher and read cache.
//!
//! This is the only part of coord that talks to etcd directly (and the only
//! module that imports `etcd_client`). Everything above it — the primitives,
//! the agent and the CLI — goes through these types.

mod backoff;
mod cache;
mod changes;
mod clock;
mod connection;
mod error;
pub mod local;
mod mvcc;
mod ordering;
mod reachability;
mod reads;
mod session;
mod watcher;
mod watchset;

pub use backoff::{Backoff, RetryPolicy};
pub use cache::{Cache, CacheEvent, CacheSnapshot, Subscription};
pub use changes::{ChangeWatcher, ValueChange};
pub use clock::{BootInstant, Clock, Suspender};
pub use connection::{
    BATCH, Client, ConnectOptions, DEFAULT_DIAL_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, KeyValue,
    LeaseId, Op, Password, Snapshot, TlsFiles,
};
pub use error::{Error, unreachable_in};
pub use mvcc::{Committed, Condition, Conditional, Guarded};
pub use reachability::{EndpointState, REMINDER};
pub use reads::{Range, ReadSet};
pub use session::{Abandoner, Session, SessionState, SessionStats, alive_lease};
pub use watcher::{Change, PrefixWatcher, WatchEvent, WatchStats};
pub use watchset::{WatchSet, WatchSetEvent};
