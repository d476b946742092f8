//! systemd's notify protocol (`Type=notify`): READY=1 after the first
//! reconcile, WATCHDOG=1 while the session is alive, STOPPING=1 on the way
//! out. Without NOTIFY_SOCKET every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::Status;

/// Talks to the service manager for one agent process.
#[derive(Debug)]
pub struct Notifier {
    stop: CancellationToken,
    /// The ready and watchdog loops, joined by [`Notifier::stopping`].
    tasks: TaskTracker,
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        // systemd gone or the socket unwritable: nothing an operator of
        // this agent can fix here, and the agent works without it.
        debug!(error = %e, "Could not notify the service manager.");
    }
}

impl Notifier {
    /// Sends READY=1 once `status` reports the first reconcile, and
    /// WATCHDOG=1 at half of WATCHDOG_USEC while the session is alive — a
    /// hung agent or a lost session then gets the agent restarted.
    pub fn start(status: Status) -> Notifier {
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        if std::env::var_os(super::NOTIFY_SOCKET).is_none() {
            return Notifier { stop, tasks };
        }
        let mut ready = status.first_reconcile();
        let until = stop.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = until.cancelled() => {}
                r = ready.wait_for(|r| *r) => if r.is_ok() {
                    send(&[NotifyState::Ready, NotifyState::Status("reconciled")]);
                    info!("Told systemd the agent is ready.");
                },
            }
        });
        if let Some(timeout) = sd_notify::watchdog_enabled() {
            let every = (timeout / 2).max(Duration::from_millis(10));
            let until = stop.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = until.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    if status.session_alive() {
                        send(&[NotifyState::Watchdog]);
                    }
                }
            });
        }
        Notifier { stop, tasks }
    }

    /// STOPPING=1: the agent is shutting down; returns once the ready and
    /// watchdog loops have ended.
    pub async fn stopping(&self) {
        self.stop.cancel();
        send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
        self.tasks.close();
        self.tasks.wait().await;
    }
}
