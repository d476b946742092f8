//! The presence controller: keeps the agent's presence key in etcd
//! (`<namespace>/agents/<name>`, on the session lease) as the desired
//! state says.
//!
//! Level-triggered, in the style of kube-runtime's controller: every trigger
//! (a cache change, a new session lease, a new desired state) only *queues*
//! the resources it concerns; reconciling a resource compares what etcd has
//! (from the cache) with what is wanted and writes the difference. A failed
//! reconcile is queued again with backoff.
//!
//! Invariant 1: nothing is reconciled before the cache has completed its
//! first full read of every prefix the resources depend on, so an empty
//! cache never looks like "everything is missing".

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::status::Status;
use super::status::report::{QueueName, ResourceKind};
use crate::etcd::{
    Backoff, Cache, CacheEvent, Client, LeaseId, SessionState, Subscription, unreachable_in,
};
use crate::presence::{self, AgentRecord, Registration};

/// The address the presence record publishes: `configured`, else the
/// local address of the route to the first etcd endpoint that resolves
/// (the address the host's peers most likely reach it at: they share that
/// network with etcd). *Why a connected UDP socket:* it asks the kernel's
/// routing table and sends nothing. `None` when neither can be had.
pub async fn advertised_address(
    configured: Option<std::net::IpAddr>,
    endpoints: &[String],
) -> Option<std::net::IpAddr> {
    if configured.is_some() {
        return configured;
    }
    for endpoint in endpoints {
        let Some(authority) = endpoint
            .split_once("://")
            .map_or(Some(endpoint.as_str()), |(_, rest)| rest.split('/').next())
        else {
            continue;
        };
        let Ok(mut peers) = tokio::net::lookup_host(authority).await else {
            continue;
        };
        let Some(peer) = peers.next() else { continue };
        let any: std::net::SocketAddr = if peer.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let local = std::net::UdpSocket::bind(any)
            .and_then(|s| s.connect(peer).and_then(|()| s.local_addr()));
        match local {
            Ok(local) => return Some(local.ip()),
            Err(e) => {
                debug!(endpoint, error = %e, "No route to this etcd endpoint to take the agent's address from.")
            }
        }
    }
    None
}

/// What the agent wants to exist in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub namespace: String,
    pub agent: String,
    pub record: AgentRecord,
}

/// One thing the reconciler keeps in shape. A closed set: each resource
/// kind of the manifest adds its variant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ResourceKey {
    /// The agent's own presence key.
    Presence,
}

/// Counters for status and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconcileStats {
    /// Writes made because etcd differed from the desired state.
    pub writes: u64,
    /// Reconciles that failed and were queued again.
    pub failures: u64,
}

/// The queue of resources to reconcile, each with the time it is due and
/// its backoff after failures.
#[derive(Debug, Default)]
struct Queue {
    due: BTreeMap<ResourceKey, Instant>,
    backoff: BTreeMap<ResourceKey, Backoff>,
}

impl Queue {
    fn now(&mut self, key: ResourceKey) {
        self.due.insert(key, Instant::now());
    }

    fn failed(&mut self, key: ResourceKey) -> Duration {
        let wait = self
            .backoff
            .entry(key.clone())
            .or_insert_with(|| Backoff::new(Duration::from_millis(100), Duration::from_secs(10)))
            .next_delay();
        self.due.insert(key, Instant::now() + wait);
        wait
    }

    fn succeeded(&mut self, key: &ResourceKey) {
        self.backoff.remove(key);
    }

    fn next_due(&self) -> Option<Instant> {
        self.due.values().min().copied()
    }

    fn take_due(&mut self) -> Vec<ResourceKey> {
        let now = Instant::now();
        let ready: Vec<_> = self
            .due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &ready {
            self.due.remove(k);
        }
        ready
    }
}

/// Runs until `cancel`; nothing is deleted on the way out — the caller
/// revokes the session lease, which removes everything at once.
pub struct PresenceController {
    client: Client,
    cache: Cache,
    session: watch::Receiver<SessionState>,
    desired: watch::Receiver<Desired>,
    stats: watch::Sender<ReconcileStats>,
    status: Status,
}

impl std::fmt::Debug for PresenceController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceController").finish_non_exhaustive()
    }
}

impl PresenceController {
    pub fn new(
        client: Client,
        cache: Cache,
        session: watch::Receiver<SessionState>,
        desired: watch::Receiver<Desired>,
    ) -> Self {
        PresenceController {
            client,
            cache,
            session,
            desired,
            stats: watch::Sender::new(ReconcileStats::default()),
            status: Status::default(),
        }
    }

    /// Reports readiness, the queue and the presence key to `status`.
    pub fn with_status(mut self, status: Status) -> Self {
        self.status = status;
        self
    }

    /// A view of the counters.
    pub fn stats(&self) -> watch::Receiver<ReconcileStats> {
        self.stats.subscribe()
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let mut desired = self.desired.borrow_and_update().clone();
        let mut sub = self.subscribe(&desired);
        let mut queue = Queue::default();
        let mut lease = self.session.borrow_and_update().lease();
        let mut all_ready = false;
        let mut waiting_logged = false;
        queue.now(ResourceKey::Presence);
        loop {
            if !all_ready {
                all_ready = sub.is_ready();
                self.status.set_cache_ready(all_ready);
                if all_ready {
                    debug!("Cache ready; reconciling.");
                } else if !waiting_logged {
                    debug!("Waiting for the cache's first full read before reconciling.");
                    waiting_logged = true;
                }
            }
            if all_ready && lease.is_some() {
                for key in queue.take_due() {
                    self.reconcile(&key, &desired, &sub, lease, &mut queue)
                        .await;
                }
                self.status.reconciled();
            }
            self.status.set_queue(QueueName::Presence, queue.due.len());
            let next = queue.next_due();
            let mut new_desired = None;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = sub.ready(), if !all_ready => {}
                _ = async { sleep_until(next.unwrap_or_else(Instant::now)).await }, if next.is_some() && all_ready && lease.is_some() => {}
                changed = self.session.changed() => {
                    if changed.is_err() { return; }
                    let now = self.session.borrow_and_update().lease();
                    if now != lease {
                        lease = now;
                        // A new lease owns nothing yet: everything must be
                        // written again.
                        queue.now(ResourceKey::Presence);
                    }
                }
                changed = self.desired.changed() => {
                    if changed.is_err() { return; }
                    new_desired = Some(self.desired.borrow_and_update().clone());
                }
                event = sub.recv() => {
                    let touched = match &event {
                        CacheEvent::Lagged => true,
                        CacheEvent::Changed { changes, .. } => changes.iter().any(|c| c.key() == sub.prefix()),
                    };
                    if touched {
                        queue.now(ResourceKey::Presence);
                    }
                }
            }
            if let Some(next) = new_desired
                && next != desired
            {
                if presence::key(&next.namespace, &next.agent) != sub.prefix() {
                    sub = self.subscribe(&next);
                    all_ready = false;
                }
                desired = next;
                queue.now(ResourceKey::Presence);
            }
        }
    }

    fn subscribe(&self, desired: &Desired) -> Subscription {
        self.cache
            .subscribe(&presence::key(&desired.namespace, &desired.agent))
    }

    async fn reconcile(
        &self,
        key: &ResourceKey,
        desired: &Desired,
        sub: &Subscription,
        lease: Option<LeaseId>,
        queue: &mut Queue,
    ) {
        let Some(lease) = lease else { return };
        match key {
            ResourceKey::Presence => {
                let etcd_key = presence::key(&desired.namespace, &desired.agent);
                let result = presence::register(
                    &self.client,
                    &desired.namespace,
                    &desired.agent,
                    &desired.record,
                    lease,
                    sub.get(&etcd_key).as_ref(),
                )
                .await;
                match result {
                    Ok(Registration::Unchanged) => {
                        self.status
                            .set(ResourceKind::Presence, &desired.agent, "registered", None);
                        queue.succeeded(key)
                    }
                    Ok(Registration::Written) => {
                        info!(key = %etcd_key, lease = %lease, "Agent presence registered.");
                        self.status
                            .set(ResourceKind::Presence, &desired.agent, "registered", None);
                        self.stats.send_modify(|s| s.writes += 1);
                        queue.succeeded(key);
                    }
                    Ok(Registration::HeldByOldSession) => {
                        // Its lease is being revoked or expires within the
                        // TTL; the deletion will queue this again.
                        let wait = queue.failed(key.clone());
                        debug!(key = %etcd_key, retry_in = ?wait, "Presence still held by an old session of this agent.");
                    }
                    Ok(Registration::HeldByOther(other)) => {
                        let wait = queue.failed(key.clone());
                        let host = other
                            .record
                            .as_ref()
                            .map_or("an unknown host", |r| r.host.as_str());
                        error!(key = %etcd_key, holder_host = %host, retry_in = ?wait, "Another agent already uses this name; give each host its own [agent] name.");
                        self.status.set(
                            ResourceKind::Presence,
                            &desired.agent,
                            "name taken",
                            Some(format!("another agent (on {host}) already uses this name")),
                        );
                        self.stats.send_modify(|s| s.failures += 1);
                    }
                    Err(e) => {
                        let wait = queue.failed(key.clone());
                        if unreachable_in(&e).is_some() {
                            // Said once per endpoint by the client.
                            debug!(key = %etcd_key, error = %e, retry_in = ?wait, "Could not register agent presence.");
                        } else {
                            warn!(key = %etcd_key, error = %e, retry_in = ?wait, "Could not register agent presence.");
                        }
                        self.status.set(
                            ResourceKind::Presence,
                            &desired.agent,
                            "failed",
                            Some(e.to_string()),
                        );
                        self.stats.send_modify(|s| s.failures += 1);
                    }
                }
            }
        }
    }
}
