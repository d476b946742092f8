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
//! The agent holds nothing else — no service, id, lock or task — unless it
//! holds its name: [`gate`] shows the other controllers the session's lease
//! only while the presence key is on it, so a second agent with the same
//! name waits, quietly, until the first one stops.
//!
//! Invariant 1: nothing is reconciled before the cache has completed its
//! first full read of every prefix the resources depend on, so an empty
//! cache never looks like "everything is missing".

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::status::Status;
use super::status::report::{QueueName, ResourceKind};
use crate::etcd::{
    Abandoner, Backoff, Cache, CacheEvent, Client, LeaseId, SessionState, Subscription,
    unreachable_in,
};
use crate::presence::{self, Agent, AgentRecord, Registration};

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
    /// The lease the agent's name is held on, if any.
    name: watch::Sender<Option<LeaseId>>,
    /// Gives up a lease on which the name was taken by another agent.
    abandoner: Option<Abandoner>,
    /// The other holder last reported, so a clash is told once.
    clash: Option<String>,
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
            name: watch::Sender::new(None),
            abandoner: None,
            clash: None,
        }
    }

    /// Gives up the lease through `abandoner` if another agent takes the
    /// name while it is held on it (someone deleted the presence key by
    /// hand and the other agent wrote it first): what hung off that lease
    /// is no longer the name holder's to keep.
    pub fn with_abandoner(mut self, abandoner: Abandoner) -> Self {
        self.abandoner = Some(abandoner);
        self
    }

    /// The lease on which the agent holds its name (`None` while another
    /// agent has it, or before it is registered), for [`gate`].
    pub fn name(&self) -> watch::Receiver<Option<LeaseId>> {
        self.name.subscribe()
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

    /// The name is held on `lease`: the other controllers may start.
    fn held(&mut self, key: &str, lease: LeaseId) {
        if self.name.send_if_modified(|held| {
            let changed = *held != Some(lease);
            *held = Some(lease);
            changed
        }) && self.clash.take().is_some()
        {
            info!(key = %key, lease = %lease, "The agent's name is free again and now held by this agent; starting its services, ids and tasks.");
        }
    }

    /// Another agent holds the name: said once per holder, and if the name
    /// was ours on this very lease, the lease is given up.
    fn clashed(&mut self, key: &str, lease: LeaseId, other: &Agent, wait: Duration) {
        if *self.name.borrow() == Some(lease) {
            warn!(key = %key, lease = %lease, "Another agent took this agent's name (its presence key was deleted and written again); giving up the session lease and everything on it.");
            self.name.send_replace(None);
            if let Some(a) = &self.abandoner {
                a.abandon(lease);
            }
        }
        let (host, pid) = other
            .record
            .as_ref()
            .map_or(("unknown".to_owned(), "unknown".to_owned()), |r| {
                (r.host.clone(), r.pid.to_string())
            });
        let holder = format!("{host}/{pid}/{}", other.lease.map_or(0, |l| l.0));
        if self.clash.as_deref() == Some(holder.as_str()) {
            debug!(key = %key, retry_in = ?wait, "The agent's name is still held by another agent.");
            return;
        }
        self.clash = Some(holder);
        let holder_lease = other
            .lease
            .map_or_else(|| "none".to_owned(), |l| l.to_string());
        warn!(key = %key, holder_host = %host, holder_pid = %pid, holder_lease = %holder_lease, "Another agent already uses this name; this agent holds nothing (no services, instance ids, locks or tasks) until the name is free. Give each host its own [agent] name.");
    }

    fn subscribe(&self, desired: &Desired) -> Subscription {
        // The key alone: a prefix of the same text would also see every
        // agent whose name starts with this one's (`web-1` → `web-10`).
        self.cache
            .subscribe_key(&presence::key(&desired.namespace, &desired.agent))
    }

    async fn reconcile(
        &mut self,
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
                        self.held(&etcd_key, lease);
                        queue.succeeded(key)
                    }
                    Ok(Registration::Written) => {
                        info!(key = %etcd_key, lease = %lease, "Agent presence registered.");
                        self.status
                            .set(ResourceKind::Presence, &desired.agent, "registered", None);
                        self.stats.send_modify(|s| s.writes += 1);
                        self.held(&etcd_key, lease);
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
                        self.clashed(&etcd_key, lease, &other, wait);
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

/// What the services, tasks and instance-id controllers see of the
/// session: its state, except that a live lease shows as `Pending` until
/// the agent's name is held on it. The agent that does not hold its name
/// so claims, registers and runs nothing. Every renewal is passed on, until
/// the session itself ends (the presence controller may stop first: the
/// name stays as it was, so guarded commands keep their renewals while
/// they stop).
pub async fn gate(
    mut session: watch::Receiver<SessionState>,
    mut name: watch::Receiver<Option<LeaseId>>,
    out: watch::Sender<SessionState>,
) {
    let mut naming = true;
    loop {
        let state = *session.borrow_and_update();
        let held = *name.borrow_and_update();
        let gated = match state {
            SessionState::Alive { lease, .. } if held != Some(lease) => SessionState::Pending,
            other => other,
        };
        out.send_if_modified(|shown| {
            let changed = *shown != gated;
            *shown = gated;
            changed
        });
        tokio::select! {
            changed = session.changed() => if changed.is_err() { return },
            changed = name.changed(), if naming => naming = changed.is_ok(),
        }
    }
}
