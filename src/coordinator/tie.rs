//! What ties a held thing (lock guard, id claim, registration,
//! leadership) to the session lease it is held on.

use std::future::Future;

use tokio::sync::watch;

use crate::etcd::{Client, LeaseId, RetryPolicy, SessionState};

/// Why something held on the session is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// The lease it was held on is gone (expired, revoked from outside, or
    /// past its local deadline); the session has moved on to a new one or
    /// is getting one.
    Lease,
    /// Its key was deleted (by hand, or by someone breaking the lock).
    Key,
    /// The session was closed or its last handle dropped.
    SessionClosed,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Lost::Lease => "its session lease is gone",
            Lost::Key => "its key was deleted",
            Lost::SessionClosed => "the session was closed",
        })
    }
}

/// A lease of a session, with what is needed to learn it is gone.
#[derive(Debug, Clone)]
pub(crate) struct Tie {
    pub(crate) client: Client,
    state: watch::Receiver<SessionState>,
    pub(crate) lease: LeaseId,
    retry: RetryPolicy,
}

impl Tie {
    pub(crate) fn new(
        client: Client,
        state: watch::Receiver<SessionState>,
        lease: LeaseId,
        retry: RetryPolicy,
    ) -> Self {
        Tie {
            client,
            state,
            lease,
            retry,
        }
    }

    /// Resolves once the session no longer has this lease alive.
    pub(crate) fn lease_gone(&self) -> impl Future<Output = Lost> + Send + use<> {
        let mut state = self.state.clone();
        let lease = self.lease;
        async move {
            loop {
                match *state.borrow_and_update() {
                    SessionState::Alive { lease: l, .. } if l == lease => {}
                    // Only before the first grant, never after ours.
                    SessionState::Pending => {}
                    SessionState::Closed => return Lost::SessionClosed,
                    SessionState::Alive { .. } | SessionState::Lost { .. } => return Lost::Lease,
                }
                if state.changed().await.is_err() {
                    return Lost::SessionClosed;
                }
            }
        }
    }

    /// Resolves once the lease is gone or `key` (created at `created`) is
    /// deleted, whichever comes first.
    pub(crate) fn lost(
        &self,
        key: String,
        created: i64,
    ) -> impl Future<Output = Lost> + Send + use<> {
        let lease = self.lease_gone();
        let client = self.client.clone();
        let retry = self.retry;
        async move {
            let deleted = async {
                let mut backoff = retry.backoff();
                loop {
                    match client.wait_deleted(&key, created, created).await {
                        Ok(()) => return Lost::Key,
                        // etcd unreachable: the lease side tells if that
                        // lasts; try the watch again meanwhile.
                        Err(_) => tokio::time::sleep(backoff.next_delay()).await,
                    }
                }
            };
            tokio::select! {
                why = lease => why,
                why = deleted => why,
            }
        }
    }

    /// Deletes `key` (this incarnation of it) from the runtime in the
    /// background: the best a `Drop` can do.
    pub(crate) fn delete_in_background(&self, key: String, created: i64) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone();
        runtime.spawn(async move {
            if let Err(e) = client.delete_if_created(&key, created).await {
                tracing::debug!(key, error = %e, "Could not delete a dropped handle's key; it goes with the lease.");
            }
        });
    }
}
