//! The declarative layer: a manifest says what the host wants, the
//! reconciler makes etcd agree and keeps it so. It uses the library
//! ([`crate::etcd`], [`crate::presence`], …) and never etcd directly.

pub mod controller;
pub mod dns;
pub mod fd_limit;
pub mod files;
pub mod hold;
pub mod hooks;
pub mod instance_ids;
pub mod manifest;
pub mod presence;
pub mod process;
mod reload;
mod runtime;
pub mod schedule_clock;
pub mod services;
pub mod state_dir;
pub mod status;
pub mod supervise;
pub mod tasks;

pub use reload::ReloadRequest;
pub use runtime::{AgentError, Control, RunOptions, run};

/// Sleeps for `wait`; `true` if `stop` came first.
pub(crate) async fn sleep_or_stop(
    wait: std::time::Duration,
    stop: &tokio_util::sync::CancellationToken,
) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(wait) => false,
    }
}
