//! Keeps the host's service instances registered, with their health.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::check::{CheckResult, run as run_check};
use crate::agent::controller::{Context, Loops};
use crate::agent::hooks::{Event, HookRunner};
use crate::agent::manifest::{CheckKind, ServiceSpec};
use crate::agent::status::report::ResourceKind;
use crate::etcd::{Backoff, LeaseId, Op, SessionState, Subscription, unreachable_in};
use crate::registry::{self, Endpoint, Health, HealthRecord};
use crate::untrusted::Untrusted;

type Key = (String, String);

/// Counters for status and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Effective health per `service/instance`.
    pub health: BTreeMap<String, Health>,
    /// Batches written to etcd.
    pub writes: u64,
}

struct Instance {
    spec: ServiceSpec,
    /// What the checks say (maintenance is applied on top).
    check: Health,
    output: String,
    passes: u32,
    fails: u32,
    /// The published status and since when.
    effective: Option<Health>,
    since: String,
    /// When a TTL check last heard from its reporter, and the revision of
    /// that report.
    ttl_seen: Instant,
    report_revision: i64,
}

/// An instance's active check: (kind, interval, timeout); none for TTL
/// checks, which something outside reports.
fn active_check(spec: &ServiceSpec) -> Option<(CheckKind, Duration, Duration)> {
    let c = spec.check.as_ref()?;
    (!matches!(c.kind, CheckKind::Ttl(_))).then(|| (c.kind.clone(), c.interval, c.timeout))
}

/// Runs an instance's check every `interval`, feeding `results`, until
/// `stop` (a check cut short kills its process group).
async fn check_loop(
    key: Key,
    (kind, interval, timeout): (CheckKind, Duration, Duration),
    results: mpsc::UnboundedSender<(Key, CheckResult)>,
    stop: CancellationToken,
) {
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = run_check(&kind, timeout) => r,
        };
        if results.send((key.clone(), result)).is_err() {
            return;
        }
        if crate::agent::sleep_or_stop(interval, &stop).await {
            return;
        }
    }
}

impl Instance {
    fn new(spec: ServiceSpec) -> Self {
        let check = spec.check.as_ref().map_or(Health::Passing, |c| c.initial);
        Instance {
            spec,
            check,
            output: String::new(),
            passes: 0,
            fails: 0,
            effective: None,
            since: now(),
            ttl_seen: Instant::now(),
            report_revision: 0,
        }
    }

    /// Applies a result with the thresholds: `successes` good results in a
    /// row to recover from critical, `failures` bad ones to become critical.
    fn apply(&mut self, result: CheckResult) {
        let (successes, failures) = self
            .spec
            .check
            .as_ref()
            .map_or((1, 1), |c| (c.successes, c.failures));
        match result.status {
            Health::Critical => {
                self.passes = 0;
                self.fails += 1;
                if self.check == Health::Critical || self.fails >= failures {
                    self.check = Health::Critical;
                }
            }
            good => {
                self.fails = 0;
                self.passes += 1;
                if self.check != Health::Critical || self.passes >= successes {
                    self.check = good;
                }
            }
        }
        self.output = result.output;
    }

    fn ttl_deadline(&self) -> Option<Instant> {
        match self.spec.check.as_ref().map(|c| &c.kind) {
            Some(CheckKind::Ttl(ttl)) if self.check != Health::Critical => {
                Some(self.ttl_seen + *ttl)
            }
            _ => None,
        }
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The services resource kind.
pub struct ServicesController {
    ctx: Context,
    stats: watch::Sender<ServiceStats>,
}

impl std::fmt::Debug for ServicesController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServicesController")
            .field("agent", &self.ctx.agent)
            .finish_non_exhaustive()
    }
}

/// The cache views the controller needs, present while there are services:
/// only this agent's own keys, never a fleet-wide prefix — a watch on all
/// of `services/` or `health/` would wake every agent at each registration
/// and health change of any other (O(N²) events for a fleet of N).
struct Views {
    /// `maint/<agent>`: the whole agent in maintenance (the key alone: a
    /// prefix would also see agent `web-10`'s flags from `web-1`).
    agent_maint: Subscription,
    /// `maint/<agent>/`: its services in maintenance.
    service_maint: Subscription,
    /// Each instance's own keys.
    instances: BTreeMap<Key, InstanceViews>,
}

/// One instance's keys, each watched alone.
struct InstanceViews {
    endpoint: Subscription,
    health: Subscription,
    /// The TTL report, for a TTL check only (nothing else reads it).
    check: Option<Subscription>,
}

impl InstanceViews {
    fn subscriptions(&self) -> impl Iterator<Item = &Subscription> {
        [&self.endpoint, &self.health]
            .into_iter()
            .chain(self.check.as_ref())
    }
}

fn is_ttl(spec: &ServiceSpec) -> bool {
    matches!(
        spec.check.as_ref().map(|c| &c.kind),
        Some(CheckKind::Ttl(_))
    )
}

impl Views {
    fn new(ctx: &Context) -> Self {
        let agent_maint = registry::maintenance_key(&ctx.namespace, &ctx.agent, None);
        Views {
            service_maint: ctx.cache.subscribe(&format!("{agent_maint}/")),
            agent_maint: ctx.cache.subscribe_key(&agent_maint),
            instances: BTreeMap::new(),
        }
    }

    /// Watches the keys of exactly `instances`: new ones start unread (so
    /// invariant 1 holds for them too), removed ones stop being watched.
    fn follow(&mut self, ctx: &Context, instances: &BTreeMap<Key, Instance>) {
        self.instances.retain(|k, _| instances.contains_key(k));
        for ((service, id), inst) in instances {
            let ttl = is_ttl(&inst.spec);
            let views = self
                .instances
                .entry((service.clone(), id.clone()))
                .or_insert_with(|| InstanceViews {
                    endpoint: ctx.cache.subscribe_key(&registry::endpoint_key(
                        &ctx.namespace,
                        service,
                        id,
                    )),
                    health: ctx.cache.subscribe_key(&registry::health_key(
                        &ctx.namespace,
                        service,
                        id,
                    )),
                    check: None,
                });
            if ttl && views.check.is_none() {
                views.check = Some(ctx.cache.subscribe_key(&registry::check_key(
                    &ctx.namespace,
                    service,
                    id,
                )));
            } else if !ttl {
                views.check = None;
            }
        }
    }

    fn subscriptions(&self) -> impl Iterator<Item = &Subscription> {
        [&self.agent_maint, &self.service_maint].into_iter().chain(
            self.instances
                .values()
                .flat_map(InstanceViews::subscriptions),
        )
    }

    fn ready(&self) -> bool {
        self.subscriptions().all(Subscription::is_ready)
    }
}

impl ServicesController {
    pub fn new(ctx: &Context) -> Self {
        ServicesController {
            ctx: ctx.clone(),
            stats: watch::Sender::new(ServiceStats::default()),
        }
    }

    pub fn stats(&self) -> watch::Receiver<ServiceStats> {
        self.stats.subscribe()
    }

    pub async fn run(self, specs: watch::Receiver<Vec<ServiceSpec>>) {
        let (session, hooks, cancel) = (
            self.ctx.session.clone(),
            self.ctx.hooks.clone(),
            self.ctx.cancel.clone(),
        );
        let mut checkers: Loops<Key> = Loops::new(&cancel);
        self.control(session, specs, hooks, &cancel, &mut checkers)
            .await;
        checkers.shutdown().await;
    }

    async fn control(
        &self,
        mut session: watch::Receiver<SessionState>,
        mut specs: watch::Receiver<Vec<ServiceSpec>>,
        hooks: watch::Receiver<Arc<HookRunner>>,
        cancel: &CancellationToken,
        checkers: &mut Loops<Key>,
    ) {
        let (results_tx, mut results) = mpsc::unbounded_channel::<(Key, CheckResult)>();
        let mut instances: BTreeMap<Key, Instance> = BTreeMap::new();
        let mut views: Option<Views> = None;
        let mut lease = session.borrow_and_update().lease();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut retry_at: Option<Instant> = None;
        let mut removed: Vec<Key> = Vec::new();
        let mut wanted = specs.borrow_and_update().clone();
        loop {
            // Bring the instances in line with the manifest.
            let keep: BTreeMap<Key, &ServiceSpec> = wanted
                .iter()
                .map(|s| ((s.name.clone(), s.id.clone()), s))
                .collect();
            let gone: Vec<Key> = instances
                .keys()
                .filter(|k| !keep.contains_key(*k))
                .cloned()
                .collect();
            for k in gone {
                instances.remove(&k);
                checkers.stop(&k);
                removed.push(k);
            }
            for (k, spec) in &keep {
                if let Some(inst) = instances.get_mut(k)
                    && inst.spec != **spec
                    && inst.spec.check == spec.check
                {
                    // What is registered changed (address, weight, tags, hooks)
                    // but not how health is judged: the instance keeps its
                    // standing and is rewritten in place, never withdrawn.
                    inst.spec = (*spec).clone();
                    continue;
                }
                if instances.get(k).is_none_or(|i| &i.spec != *spec) {
                    instances.insert(k.clone(), Instance::new((*spec).clone()));
                    match active_check(spec) {
                        Some(check) => {
                            let (key, tx) = (k.clone(), results_tx.clone());
                            checkers.start(k.clone(), move |stop| check_loop(key, check, tx, stop));
                        }
                        None => checkers.stop(k),
                    }
                }
            }
            if instances.is_empty() && removed.is_empty() {
                views = None;
            } else {
                views
                    .get_or_insert_with(|| Views::new(&self.ctx))
                    .follow(&self.ctx, &instances);
            }
            // Invariant 1: nothing is written before every view has been read.
            let ready = views.as_ref().is_some_and(Views::ready);
            if ready
                && let (Some(v), Some(l)) = (&views, lease)
                && retry_at.is_none_or(|at| at <= Instant::now())
            {
                let runner = hooks.borrow().clone();
                match self
                    .reconcile(v, l, &mut instances, &removed, &runner)
                    .await
                {
                    Ok(()) => {
                        removed.clear();
                        retry_at = None;
                        backoff.reset();
                    }
                    Err(e) => {
                        let wait = backoff.next_delay();
                        if unreachable_in(&e).is_some() {
                            // Said once per endpoint by the client.
                            debug!(error = %e, retry_in = ?wait, "Could not register services.");
                        } else {
                            warn!(error = %e, retry_in = ?wait, "Could not register services.");
                        }
                        for ((service, id), inst) in &instances {
                            let state = inst.effective.map_or("pending", Health::name);
                            self.ctx.status.set(
                                ResourceKind::Service,
                                &format!("{service}/{id}"),
                                state,
                                Some(format!("could not register: {e}")),
                            );
                        }
                        retry_at = Some(Instant::now() + wait);
                    }
                }
            }
            let ttl_due = instances.values().filter_map(Instance::ttl_deadline).min();
            let wake = [ttl_due, retry_at].into_iter().flatten().min();
            let view_ready = views.as_ref().map(|v| {
                let futs: Vec<_> = v.subscriptions().map(Subscription::ready).collect();
                async move {
                    for f in futs {
                        f.await;
                    }
                }
            });
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = session.changed() => {
                    if changed.is_err() { return; }
                    lease = session.borrow_and_update().lease();
                }
                changed = specs.changed() => {
                    if changed.is_err() { return; }
                    wanted = specs.borrow_and_update().clone();
                }
                Some((key, result)) = results.recv() => {
                    if let Some(inst) = instances.get_mut(&key) {
                        inst.apply(result);
                    }
                }
                _ = async { match view_ready { Some(f) => f.await, None => std::future::pending().await } }, if !ready => {}
                _ = async { sleep_until(wake.unwrap_or_else(Instant::now)).await }, if wake.is_some() => {
                    let now = Instant::now();
                    for inst in instances.values_mut() {
                        if inst.ttl_deadline().is_some_and(|d| d <= now) {
                            inst.apply(CheckResult { status: Health::Critical, output: "TTL expired: no report in time".into() });
                            inst.check = Health::Critical;
                        }
                    }
                }
                reports = next_change(views.as_mut()) => {
                    if reports && let Some(v) = &views {
                        self.take_reports(v, &mut instances);
                    }
                }
            }
        }
    }

    /// TTL reports from `coord services pass|warn|fail`.
    fn take_reports(&self, views: &Views, instances: &mut BTreeMap<Key, Instance>) {
        for (k, inst) in instances.iter_mut() {
            if !is_ttl(&inst.spec) {
                continue;
            }
            let key = registry::check_key(&self.ctx.namespace, &inst.spec.name, &inst.spec.id);
            let Some(kv) = views
                .instances
                .get(k)
                .and_then(|v| v.check.as_ref())
                .and_then(|c| c.get(&key))
            else {
                continue;
            };
            if kv.mod_revision <= inst.report_revision {
                continue;
            }
            inst.report_revision = kv.mod_revision;
            let Some(report) = registry::parse_report(&kv) else {
                continue;
            };
            inst.ttl_seen = Instant::now();
            // The reporter is authoritative: no thresholds.
            inst.check = report.status;
            inst.output = report.output;
        }
    }

    async fn reconcile(
        &self,
        views: &Views,
        lease: LeaseId,
        instances: &mut BTreeMap<Key, Instance>,
        removed: &[Key],
        hooks: &Arc<HookRunner>,
    ) -> Result<(), crate::etcd::Error> {
        let ns = &self.ctx.namespace;
        let agent_maint =
            views
                .agent_maint
                .get(&registry::maintenance_key(ns, &self.ctx.agent, None));
        let mut ops = Vec::new();
        for ((service, id), inst) in instances.iter_mut() {
            let service_maint = views.service_maint.get(&registry::maintenance_key(
                ns,
                &self.ctx.agent,
                Some(service),
            ));
            let own = views.instances.get(&(service.clone(), id.clone()));
            let maint_record = service_maint.or_else(|| agent_maint.clone());
            let maint = maint_record.is_some();
            let effective = if maint {
                Health::Maintenance
            } else {
                inst.check
            };
            if inst.effective != Some(effective) {
                let old = inst.effective;
                inst.effective = Some(effective);
                inst.since = now();
                info!(service = %service, instance = %id, old = old.map_or("pending", Health::name), new = effective.name(), output = %Untrusted(&inst.output), "Service health changed.");
                if !inst.spec.on_change.is_empty() {
                    hooks.fire(
                        &inst.spec.on_change,
                        &Event::ServiceHealthChanged {
                            service: service.clone(),
                            instance: id.clone(),
                            old,
                            new: effective,
                        },
                    );
                }
                self.stats.send_modify(|s| {
                    s.health.insert(format!("{service}/{id}"), effective);
                });
                self.ctx.status.set(
                    ResourceKind::Service,
                    &format!("{service}/{id}"),
                    effective.name(),
                    None,
                );
            }
            // Why, for `coord status`: what the failing check said, or
            // the reason given to `coord maint on`.
            let detail = match effective {
                Health::Critical => Some(Untrusted(&inst.output).to_string()),
                Health::Maintenance => Some(
                    maint_record
                        .as_ref()
                        .and_then(|kv| {
                            serde_json::from_slice::<registry::Maintenance>(&kv.value).ok()
                        })
                        .map(|m| m.reason)
                        .filter(|r| !r.is_empty())
                        .map_or_else(
                            || "maintenance, no reason given".to_owned(),
                            |r| format!("maintenance: {r}"),
                        ),
                ),
                Health::Passing | Health::Warning => None,
            };
            self.ctx
                .status
                .set_detail(ResourceKind::Service, &format!("{service}/{id}"), detail);
            let record = HealthRecord {
                status: effective,
                output: inst.output.clone(),
                agent: self.ctx.agent.clone(),
                addr: inst.spec.address.clone(),
                metadata: inst.spec.metadata.clone(),
                since: inst.since.clone(),
            };
            let health_key = registry::health_key(ns, service, id);
            let value = serde_json::to_vec(&record).unwrap_or_default();
            if own
                .and_then(|v| v.health.get(&health_key))
                .is_none_or(|kv| kv.value != value || kv.lease != Some(lease))
            {
                ops.push(Op::Put {
                    key: health_key,
                    value,
                    lease: Some(lease),
                });
            }
            let endpoint_key = registry::endpoint_key(ns, service, id);
            let observed = own.and_then(|v| v.endpoint.get(&endpoint_key));
            if effective.serves() {
                let endpoint = Endpoint {
                    addr: inst.spec.address.clone(),
                    metadata: inst.spec.metadata.clone(),
                };
                let value = serde_json::to_vec(&endpoint).unwrap_or_default();
                if observed.is_none_or(|kv| kv.value != value || kv.lease != Some(lease)) {
                    ops.push(Op::Put {
                        key: endpoint_key,
                        value,
                        lease: Some(lease),
                    });
                }
            } else if observed.is_some() {
                ops.push(Op::Delete { key: endpoint_key });
            }
        }
        for (service, id) in removed {
            info!(service = %service, instance = %id, "Service instance removed from the manifest; deregistering.");
            // Rollout reports show the health kept here: a removed
            // instance has none.
            self.stats.send_modify(|s| {
                s.health.remove(&format!("{service}/{id}"));
            });
            ops.push(Op::Delete {
                key: registry::endpoint_key(ns, service, id),
            });
            ops.push(Op::Delete {
                key: registry::health_key(ns, service, id),
            });
        }
        if ops.is_empty() {
            return Ok(());
        }
        debug!(writes = ops.len(), lease = %lease, "Registering services.");
        self.ctx.client.apply(&ops).await?;
        self.stats.send_modify(|s| s.writes += 1);
        Ok(())
    }
}

/// Waits for a change in any view; `true` when it is a TTL report.
async fn next_change(views: Option<&mut Views>) -> bool {
    let Some(v) = views else {
        return std::future::pending().await;
    };
    type Wait<'a> = std::pin::Pin<Box<dyn Future<Output = bool> + Send + 'a>>;
    let Views {
        agent_maint,
        service_maint,
        instances,
    } = v;
    let mut waits: Vec<Wait<'_>> = vec![
        Box::pin(async move {
            agent_maint.recv().await;
            false
        }),
        Box::pin(async move {
            service_maint.recv().await;
            false
        }),
    ];
    for InstanceViews {
        endpoint,
        health,
        check,
    } in instances.values_mut()
    {
        waits.push(Box::pin(async move {
            endpoint.recv().await;
            false
        }));
        waits.push(Box::pin(async move {
            health.recv().await;
            false
        }));
        if let Some(check) = check {
            waits.push(Box::pin(async move {
                check.recv().await;
                true
            }));
        }
    }
    futures_util::future::select_all(waits).await.0
}
