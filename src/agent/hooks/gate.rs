//! Fleet gates: a hook with `fleet = { at_most = N, splay }` waits a random
//! time up to `splay`, then takes one of `N` places of the semaphore
//! `<namespace>/gates/<hook>` on the agent's session lease and holds it
//! for the run — so at most N agents of the fleet run that hook at once.
//!
//! The semaphore is the library's (`lock::acquire_gate`); the lease is the
//! one the agent holds its name on (the same gated session the services,
//! tasks and ids controllers get), so an agent whose name another agent
//! holds takes no place: its gated hooks wait until it has its name. A
//! gate is pacing across a fleet, not mutual exclusion: a lease lost
//! during a run frees the place while the run goes on.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::agent::manifest::FleetGate;
use crate::agent::status::Status;
use crate::etcd::{Backoff, Client, SessionState};
use crate::lock::{self, Guard, Holder, LockError};

/// Where gates are taken: the connection, the gated session, the
/// namespace and who holds them.
#[derive(Clone)]
struct Target {
    client: Client,
    session: watch::Receiver<SessionState>,
    namespace: String,
    holder: Holder,
}

/// The agent's gates, re-pointed at each connection (they outlive it, as
/// the hooks do).
#[derive(Debug)]
pub struct Gates {
    target: watch::Sender<Option<Target>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            target: watch::Sender::new(None),
        }
    }
}

/// A place held at a gate, until [`Entered::leave`].
#[derive(Debug)]
pub struct Entered {
    client: Client,
    guard: Guard,
}

impl Entered {
    /// Gives the place back (best effort: if etcd does not answer, it goes
    /// with the lease).
    pub async fn leave(self) {
        if let Err(e) = self.guard.release(&self.client).await {
            debug!(gate = %self.guard.name, error = %e, "Could not give the gate's place back; it goes with the lease.");
        }
    }
}

impl Gates {
    /// From now on, gates are taken on `client` with the lease `session`
    /// shows, under `namespace`.
    pub fn follow(
        &self,
        client: Client,
        session: watch::Receiver<SessionState>,
        namespace: &str,
        agent: &str,
    ) {
        self.target.send_replace(Some(Target {
            client,
            session,
            namespace: namespace.to_owned(),
            holder: Holder {
                agent: agent.to_owned(),
                host: crate::agent::manifest::host_name(),
                pid: std::process::id(),
            },
        }));
    }

    /// Waits the splay, then for a place at `hook`'s gate; `None` when
    /// `stop` came first. The wait shows in `status` (and its metrics) for
    /// as long as it lasts.
    pub async fn enter(
        &self,
        hook: &str,
        resource: &str,
        fleet: FleetGate,
        splay: bool,
        stop: &CancellationToken,
        status: &Status,
    ) -> Option<Entered> {
        let _waiting = status.gate_waiting(hook, resource);
        if splay && !fleet.splay.is_zero() {
            let ms = rand::random_range(0..=fleet.splay.as_millis() as u64);
            let delay = Duration::from_millis(ms);
            debug!(hook, delay = %humantime::format_duration(delay), "Waiting the hook's splay before its gate.");
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        let started = std::time::Instant::now();
        let mut targets = self.target.subscribe();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut said = false;
        loop {
            let target = targets.borrow_and_update().clone();
            let Some(mut target) = target else {
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    changed = targets.changed() => if changed.is_err() { return None },
                }
                continue;
            };
            let state = *target.session.borrow_and_update();
            let SessionState::Alive { lease, .. } = state else {
                if !said {
                    info!(
                        hook,
                        "Hook waits for the agent's session (and its name) before its gate."
                    );
                    said = true;
                }
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = targets.changed() => {}
                    _ = target.session.changed() => {}
                }
                continue;
            };
            let acquire = lock::acquire_gate(
                &target.client,
                lease,
                &target.namespace,
                hook,
                fleet.at_most,
                &target.holder,
            );
            // A new lease or a new connection makes the wait moot: the
            // dropped acquire leaves the queue by itself.
            let result = tokio::select! {
                _ = stop.cancelled() => return None,
                _ = targets.changed() => continue,
                _ = lease_changes(&mut target.session, lease) => continue,
                r = acquire => r,
            };
            match result {
                Ok(guard) => {
                    status.gate_passed(hook, started.elapsed());
                    debug!(hook, gate = %guard.key, waited_ms = started.elapsed().as_millis() as u64, "Took a place at the hook's gate.");
                    return Some(Entered {
                        client: target.client.clone(),
                        guard,
                    });
                }
                Err(LockError::SessionExpired { .. }) => continue,
                Err(e) => {
                    let wait = backoff.next_delay();
                    warn!(hook, error = %e, retry_in = %humantime::format_duration(wait), "Could not queue at the hook's gate; trying again.");
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
}

/// Returns once the session is no longer alive on `lease`.
async fn lease_changes(session: &mut watch::Receiver<SessionState>, lease: crate::etcd::LeaseId) {
    loop {
        if session.changed().await.is_err() {
            return;
        }
        match *session.borrow_and_update() {
            SessionState::Alive { lease: now, .. } if now == lease => {}
            _ => return,
        }
    }
}
