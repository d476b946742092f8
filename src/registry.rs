//! Service registry and discovery.
//!
//! An instance that may receive traffic is listed under
//! `<namespace>/services/<service>/<instance>` with the value
//! `{"Addr": "host:port", "Metadata": {…}}` — the format of gRPC-go's etcd
//! resolver, so Go clients dialling `etcd:////coord/services/<service>/`
//! (four slashes: grpc-go drops the first of the key's path) discover coord
//! services unchanged. Its health lives beside it under
//! `<namespace>/health/<service>/<instance>`, so an instance withdrawn from
//! discovery (critical, or in maintenance) stays visible. Both hang off the
//! registering agent's session lease.

pub mod check;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

use crate::etcd::{CacheSnapshot, Client, Condition, Conditional, Error, KeyValue, LeaseId};

/// The health of a service instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// Its check passes: listed.
    Passing,
    /// Its check warns: still listed.
    Warning,
    /// Its check fails: withdrawn from discovery.
    Critical,
    /// In maintenance: withdrawn from discovery.
    Maintenance,
}

impl Health {
    /// Whether an instance in this state is listed for discovery.
    pub fn serves(self) -> bool {
        matches!(self, Health::Passing | Health::Warning)
    }

    /// The status as coord writes it (`passing`, …).
    pub fn name(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
            Health::Maintenance => "maintenance",
        }
    }
}

/// An instance as listed for discovery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    #[serde(rename = "Addr")]
    /// `host:port`.
    pub addr: String,
    #[serde(
        rename = "Metadata",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    /// What discovery shows beside the address.
    pub metadata: BTreeMap<String, serde_json::Value>,
}

/// An instance's health record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthRecord {
    /// The effective status.
    pub status: Health,
    /// What the last check said (HTTP status, command output, …).
    #[serde(default)]
    pub output: String,
    /// The agent that runs the instance.
    pub agent: String,
    /// The instance's address (also when withdrawn from discovery).
    pub addr: String,
    #[serde(default)]
    /// The instance's metadata.
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// When the status last changed, RFC 3339.
    pub since: String,
}

/// One instance with everything known about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// The service.
    pub service: String,
    /// The instance's id.
    pub id: String,
    /// Present while the instance is listed for discovery.
    pub endpoint: Option<Endpoint>,
    /// Its health record, if any.
    pub health: Option<HealthRecord>,
}

impl Instance {
    /// The address, from discovery or from the health record.
    pub fn addr(&self) -> Option<&str> {
        self.endpoint
            .as_ref()
            .map(|e| e.addr.as_str())
            .or_else(|| self.health.as_ref().map(|h| h.addr.as_str()))
    }

    /// The instance's metadata, from discovery or from the health record.
    pub fn metadata(&self) -> Option<&BTreeMap<String, serde_json::Value>> {
        self.endpoint
            .as_ref()
            .map(|e| &e.metadata)
            .or_else(|| self.health.as_ref().map(|h| &h.metadata))
    }

    /// `weight` from the metadata (a number, or a string holding one), 1
    /// when absent.
    pub fn weight(&self) -> u32 {
        self.metadata()
            .and_then(|m| m.get("weight"))
            .and_then(|w| match w {
                serde_json::Value::Number(n) => n.as_u64(),
                serde_json::Value::String(s) => s.parse().ok(),
                _ => None,
            })
            .map_or(1, |w| w.min(u64::from(u32::MAX)) as u32)
    }

    /// Whether it is listed for discovery.
    pub fn is_listed(&self) -> bool {
        self.endpoint.is_some()
    }
}

/// `<namespace>/services/`.
pub fn services_prefix(namespace: &str) -> String {
    format!("{}/services/", namespace.trim_end_matches('/'))
}

/// `<namespace>/health/`.
pub fn health_prefix(namespace: &str) -> String {
    format!("{}/health/", namespace.trim_end_matches('/'))
}

/// `<namespace>/services/<service>/<instance>`.
pub fn endpoint_key(namespace: &str, service: &str, id: &str) -> String {
    format!("{}{service}/{id}", services_prefix(namespace))
}

/// `<namespace>/health/<service>/<instance>`.
pub fn health_key(namespace: &str, service: &str, id: &str) -> String {
    format!("{}{service}/{id}", health_prefix(namespace))
}

/// `<namespace>/checks/`: where TTL checks are reported.
pub fn checks_prefix(namespace: &str) -> String {
    format!("{}/checks/", namespace.trim_end_matches('/'))
}

/// `<namespace>/checks/<service>/<instance>`.
pub fn check_key(namespace: &str, service: &str, id: &str) -> String {
    format!("{}{service}/{id}", checks_prefix(namespace))
}

/// `<namespace>/maint/<agent>` (the whole agent) or
/// `<namespace>/maint/<agent>/<service>`.
pub fn maintenance_key(namespace: &str, agent: &str, service: Option<&str>) -> String {
    let base = format!("{}/maint/{agent}", namespace.trim_end_matches('/'));
    match service {
        Some(s) => format!("{base}/{s}"),
        None => base,
    }
}

/// Most bytes of a check's output, or of a TTL report's note, that coord
/// stores. *Why a bound:* the output goes into the instance's health
/// record, and health records are written in transactions of up to 64
/// operations that etcd refuses whole past its request limit (1.5 MiB by
/// default) — one huge note would keep every other service from
/// registering.
pub const OUTPUT_LIMIT: usize = 1024;

/// What ends an output that was cut to [`OUTPUT_LIMIT`].
pub const TRUNCATED: &str = " …[truncated]";

/// `output` cut to at most [`OUTPUT_LIMIT`] bytes, at a character
/// boundary, ending with [`TRUNCATED`] when something was cut.
pub fn bounded_output(mut output: String) -> String {
    if output.len() <= OUTPUT_LIMIT {
        return output;
    }
    let mut cut = OUTPUT_LIMIT - TRUNCATED.len();
    while !output.is_char_boundary(cut) {
        cut -= 1;
    }
    output.truncate(cut);
    output.push_str(TRUNCATED);
    output
}

/// A TTL check's report, written by whoever watches the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// The status reported.
    pub status: Health,
    #[serde(default)]
    /// A note (cut to [`OUTPUT_LIMIT`]).
    pub output: String,
}

/// Parses a TTL report, its note cut to [`OUTPUT_LIMIT`]: anyone may
/// write the key, not only [`report_check`].
pub fn parse_report(kv: &KeyValue) -> Option<CheckReport> {
    let report: CheckReport = serde_json::from_slice(&kv.value).ok()?;
    Some(CheckReport {
        output: bounded_output(report.output),
        ..report
    })
}

/// Why a report or a maintenance switch was not written.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// No instance of that service is registered (no health record).
    #[error(
        "no instance `{service}/{id}` is registered (`coord services {service} --all` lists them); nothing was reported"
    )]
    NoSuchInstance {
        /// The service named.
        service: String,
        /// The instance id named.
        id: String,
    },
    /// No agent of that name is present.
    #[error(
        "no agent `{agent}` is present (`coord agents` lists them); nothing was put in maintenance"
    )]
    NoSuchAgent {
        /// The agent named.
        agent: String,
    },
    /// The agent is present but registers no instance of that service.
    #[error(
        "agent `{agent}` registers no instance of service `{service}` (`coord services {service} --all` lists who does); nothing was put in maintenance"
    )]
    NoSuchService {
        /// The agent named.
        agent: String,
        /// The service named.
        service: String,
    },
    /// etcd failed. (Not `transparent`: the etcd error stays in the chain
    /// of sources, where the CLI finds an unreachable etcd.)
    #[error("{0}")]
    Etcd(#[from] Error),
}

/// Reports a TTL check's result (no lease: the reporter may be a cron job),
/// its note cut to [`OUTPUT_LIMIT`]. Refused for an instance that is not
/// registered (it has no health record), checked in the same transaction
/// as the write: a report for a typo would otherwise stay in etcd for
/// good, on no lease, waiting for an instance that never comes.
pub async fn report_check(
    client: &Client,
    namespace: &str,
    service: &str,
    id: &str,
    report: &CheckReport,
) -> Result<(), TargetError> {
    let report = CheckReport {
        status: report.status,
        output: bounded_output(report.output.clone()),
    };
    let missing = || TargetError::NoSuchInstance {
        service: service.to_owned(),
        id: id.to_owned(),
    };
    let health = health_key(namespace, service, id);
    let Some(record) = client.get(&health).await? else {
        return Err(missing());
    };
    let when = [Condition::CreatedAt {
        key: health,
        revision: record.create_revision,
    }];
    let key = check_key(namespace, service, id);
    match client.put_if(&key, json(&report), &when).await? {
        Conditional::Applied { .. } => Ok(()),
        Conditional::Refused { .. } => Err(missing()),
    }
}

/// Why an agent or one of its services is in maintenance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Maintenance {
    /// Why.
    pub reason: String,
    /// When it was set, RFC 3339.
    pub since: String,
}

/// Puts an agent (or one service on it) in maintenance: its instances are
/// withdrawn from discovery until [`end_maintenance`]. Refused unless the
/// agent is present (checked in the same transaction as the write) and,
/// for one service, registers an instance of it: the key is on no lease,
/// so one for a typo would stay for good.
pub async fn start_maintenance(
    client: &Client,
    namespace: &str,
    agent: &str,
    service: Option<&str>,
    reason: &str,
) -> Result<(), TargetError> {
    let no_agent = || TargetError::NoSuchAgent {
        agent: agent.to_owned(),
    };
    let presence = crate::presence::key(namespace, agent);
    let Some(record) = client.get(&presence).await? else {
        return Err(no_agent());
    };
    if let Some(service) = service {
        let runs_it = read(client, namespace, Some(service))
            .await?
            .iter()
            .any(|i| i.health.as_ref().is_some_and(|h| h.agent == agent));
        if !runs_it {
            return Err(TargetError::NoSuchService {
                agent: agent.to_owned(),
                service: service.to_owned(),
            });
        }
    }
    let record_now = Maintenance {
        reason: reason.to_owned(),
        since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    let when = [Condition::CreatedAt {
        key: presence,
        revision: record.create_revision,
    }];
    let key = maintenance_key(namespace, agent, service);
    match client.put_if(&key, json(&record_now), &when).await? {
        Conditional::Applied { .. } => Ok(()),
        Conditional::Refused { .. } => Err(no_agent()),
    }
}

/// Ends maintenance; returns whether it was on.
pub async fn end_maintenance(
    client: &Client,
    namespace: &str,
    agent: &str,
    service: Option<&str>,
) -> Result<bool, Error> {
    Ok(client
        .delete(&maintenance_key(namespace, agent, service))
        .await?
        > 0)
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    // Maps of strings and JSON values always serialise.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Lists `endpoint` for discovery on `lease`.
pub async fn list(
    client: &Client,
    namespace: &str,
    service: &str,
    id: &str,
    endpoint: &Endpoint,
    lease: LeaseId,
) -> Result<(), Error> {
    client
        .put(
            &endpoint_key(namespace, service, id),
            json(endpoint),
            Some(lease),
        )
        .await
        .map(|_| ())
}

/// Withdraws an instance from discovery (its health record stays).
pub async fn unlist(
    client: &Client,
    namespace: &str,
    service: &str,
    id: &str,
) -> Result<(), Error> {
    client
        .delete(&endpoint_key(namespace, service, id))
        .await
        .map(|_| ())
}

/// Writes an instance's health record on `lease`.
pub async fn report(
    client: &Client,
    namespace: &str,
    service: &str,
    id: &str,
    record: &HealthRecord,
    lease: LeaseId,
) -> Result<(), Error> {
    client
        .put(
            &health_key(namespace, service, id),
            json(record),
            Some(lease),
        )
        .await
        .map(|_| ())
}

/// Removes an instance entirely: discovery entry and health record.
pub async fn deregister(
    client: &Client,
    namespace: &str,
    service: &str,
    id: &str,
) -> Result<(), Error> {
    client.delete(&endpoint_key(namespace, service, id)).await?;
    client.delete(&health_key(namespace, service, id)).await?;
    Ok(())
}

/// Parses a discovery value; `None` for values coord cannot read.
pub fn parse_endpoint(kv: &KeyValue) -> Option<Endpoint> {
    serde_json::from_slice(&kv.value).ok()
}

/// Parses a health value.
pub fn parse_health(kv: &KeyValue) -> Option<HealthRecord> {
    serde_json::from_slice(&kv.value).ok()
}

/// `(service, instance)` of a key under `prefix`.
fn split<'a>(key: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    let rest = key.strip_prefix(prefix)?;
    let (service, id) = rest.split_once('/')?;
    (!service.is_empty() && !id.is_empty() && !id.contains('/')).then_some((service, id))
}

/// Every instance of every service (or of `service`), from the discovery
/// and health prefixes.
pub fn instances(
    namespace: &str,
    service: Option<&str>,
    endpoints: impl IntoIterator<Item = KeyValue>,
    health: impl IntoIterator<Item = KeyValue>,
) -> Vec<Instance> {
    let sp = services_prefix(namespace);
    let hp = health_prefix(namespace);
    let mut out: BTreeMap<(String, String), Instance> = BTreeMap::new();
    let wanted = |s: &str| service.is_none_or(|w| w == s);
    for kv in endpoints {
        if let Some((s, id)) = split(&kv.key, &sp).filter(|(s, _)| wanted(s)) {
            out.entry((s.to_owned(), id.to_owned()))
                .or_insert_with(|| blank(s, id))
                .endpoint = parse_endpoint(&kv);
        }
    }
    for kv in health {
        if let Some((s, id)) = split(&kv.key, &hp).filter(|(s, _)| wanted(s)) {
            out.entry((s.to_owned(), id.to_owned()))
                .or_insert_with(|| blank(s, id))
                .health = parse_health(&kv);
        }
    }
    out.into_values().collect()
}

fn blank(service: &str, id: &str) -> Instance {
    Instance {
        service: service.to_owned(),
        id: id.to_owned(),
        endpoint: None,
        health: None,
    }
}

/// Every instance, read from etcd (`service` limits it to one service).
pub async fn read(
    client: &Client,
    namespace: &str,
    service: Option<&str>,
) -> Result<Vec<Instance>, Error> {
    let scope = |prefix: String| match service {
        Some(s) => format!("{prefix}{s}/"),
        None => prefix,
    };
    let endpoints = client
        .get_prefix(&scope(services_prefix(namespace)))
        .await?;
    let health = client.get_prefix(&scope(health_prefix(namespace))).await?;
    Ok(instances(namespace, service, endpoints.kvs, health.kvs))
}

/// The instances listed for discovery of `service` in a cache snapshot of
/// the whole namespace (or keyspace).
pub fn listed_in(snapshot: &CacheSnapshot, namespace: &str, service: &str) -> Vec<Instance> {
    let sp = format!("{}{service}/", services_prefix(namespace));
    let hp = format!("{}{service}/", health_prefix(namespace));
    instances(
        namespace,
        Some(service),
        snapshot.under(&sp).cloned().collect::<Vec<_>>(),
        snapshot.under(&hp).cloned().collect::<Vec<_>>(),
    )
}

/// How a caller picks one instance among the listed ones.
#[derive(Debug)]
pub enum Picker {
    /// Each in turn.
    RoundRobin(AtomicUsize),
    /// Uniformly at random.
    Random,
    /// At random, in proportion to the `weight` metadata (default 1).
    Weighted,
}

impl Picker {
    /// Each listed instance in turn.
    pub fn round_robin() -> Self {
        Picker::RoundRobin(AtomicUsize::new(0))
    }

    /// One of the listed instances, or `None` when none is.
    ///
    /// ```
    /// use coord::registry::{Endpoint, Instance, Picker};
    /// let inst = |id: &str| Instance {
    ///     service: "api".into(),
    ///     id: id.into(),
    ///     endpoint: Some(Endpoint { addr: format!("{id}:80"), metadata: Default::default() }),
    ///     health: None,
    /// };
    /// let all = [inst("a"), inst("b")];
    /// let rr = Picker::round_robin();
    /// assert_eq!(rr.pick(&all).map(|i| i.id.as_str()), Some("a"));
    /// assert_eq!(rr.pick(&all).map(|i| i.id.as_str()), Some("b"));
    /// ```
    pub fn pick<'a>(&self, instances: &'a [Instance]) -> Option<&'a Instance> {
        let listed: Vec<&Instance> = instances.iter().filter(|i| i.is_listed()).collect();
        if listed.is_empty() {
            return None;
        }
        match self {
            Picker::RoundRobin(next) => {
                let i = next.fetch_add(1, Ordering::Relaxed) % listed.len();
                Some(listed[i])
            }
            Picker::Random => Some(listed[rand::random_range(0..listed.len())]),
            Picker::Weighted => {
                let total: u64 = listed.iter().map(|i| u64::from(i.weight())).sum();
                if total == 0 {
                    return None;
                }
                let mut ticket = rand::random_range(0..total);
                listed.into_iter().find(|i| {
                    let w = u64::from(i.weight());
                    if ticket < w {
                        true
                    } else {
                        ticket -= w;
                        false
                    }
                })
            }
        }
    }
}

/// A change to a service's instances, as a [`ServiceWatch`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum ServiceChange {
    /// Listed for discovery (new, or back from critical or maintenance).
    Added(Instance),
    /// No longer listed (gone, critical, or in maintenance).
    Removed(Instance),
    /// Its health record's status changed.
    HealthChanged {
        /// The instance now.
        instance: Instance,
        /// Its status before (`None`: it had none).
        old: Option<Health>,
    },
}

/// What a [`ServiceWatch`] yields: the changes, and the whole current set.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceUpdate {
    /// What changed since the last update.
    pub changes: Vec<ServiceChange>,
    /// Every instance (listed or not), sorted by id.
    pub current: Vec<Instance>,
}

/// Follows one service's instances through the cache.
///
/// ```no_run
/// # async fn demo(cache: coord::etcd::Cache) {
/// let mut watch = coord::registry::ServiceWatch::new(&cache, "/coord", "api");
/// loop {
///     let update = watch.next().await; // first: everything as Added
///     for change in &update.changes {
///         println!("{change:?}");
///     }
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct ServiceWatch {
    namespace: String,
    service: String,
    endpoints: crate::etcd::Subscription,
    health: crate::etcd::Subscription,
    last: Option<Vec<Instance>>,
}

impl ServiceWatch {
    /// Follows `service`'s instances under `namespace` through `cache`.
    pub fn new(cache: &crate::etcd::Cache, namespace: &str, service: &str) -> Self {
        ServiceWatch {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            endpoints: cache.subscribe(&format!("{}{service}/", services_prefix(namespace))),
            health: cache.subscribe(&format!("{}{service}/", health_prefix(namespace))),
            last: None,
        }
    }

    fn current(&self) -> Vec<Instance> {
        instances(
            &self.namespace,
            Some(&self.service),
            self.endpoints.list(),
            self.health.list(),
        )
    }

    /// The updates as a `Stream`: the first one once the first full read
    /// is done (every listed instance as added), then one per change.
    pub fn into_stream(self) -> impl futures_core::Stream<Item = ServiceUpdate> + Send {
        futures_util::stream::unfold(self, |mut watch| async move {
            let update = watch.next().await;
            Some((update, watch))
        })
    }

    /// The next change. The first call waits for the first full read and
    /// reports every listed instance as added (and may report no change,
    /// for a service without instances).
    pub async fn next(&mut self) -> ServiceUpdate {
        if self.last.is_none() {
            self.endpoints.ready().await;
            self.health.ready().await;
            let current = self.current();
            self.last = Some(current.clone());
            return ServiceUpdate {
                changes: diff_instances(&[], &current),
                current,
            };
        }
        loop {
            tokio::select! {
                _ = self.endpoints.recv() => {}
                _ = self.health.recv() => {}
            }
            let current = self.current();
            let previous = self.last.replace(current.clone()).unwrap_or_default();
            let changes = diff_instances(&previous, &current);
            if !changes.is_empty() {
                return ServiceUpdate { changes, current };
            }
        }
    }
}

fn diff_instances(old: &[Instance], new: &[Instance]) -> Vec<ServiceChange> {
    let find = |set: &[Instance], i: &Instance| set.iter().find(|o| o.id == i.id).cloned();
    let mut changes = Vec::new();
    for i in old {
        let now = find(new, i);
        if i.is_listed() && !now.as_ref().is_some_and(Instance::is_listed) {
            changes.push(ServiceChange::Removed(now.unwrap_or_else(|| i.clone())));
        }
    }
    for i in new {
        let before = find(old, i);
        if i.is_listed() && !before.as_ref().is_some_and(Instance::is_listed) {
            changes.push(ServiceChange::Added(i.clone()));
        }
        let old_status = before
            .as_ref()
            .and_then(|b| b.health.as_ref().map(|h| h.status));
        let new_status = i.health.as_ref().map(|h| h.status);
        if new_status.is_some() && old_status != new_status {
            changes.push(ServiceChange::HealthChanged {
                instance: i.clone(),
                old: old_status,
            });
        }
    }
    changes
}

/// A gRPC channel balanced over a service's listed instances, following
/// discovery: instances join and leave the channel as they are listed and
/// withdrawn. The Rust counterpart of dialling `etcd:////coord/services/api/`
/// from Go. Drop the returned task handle's abort guard to stop following.
///
/// Requests fail with UNAVAILABLE while no instance is listed.
pub fn grpc_channel(
    cache: &crate::etcd::Cache,
    namespace: &str,
    service: &str,
) -> (tonic::transport::Channel, tokio::task::JoinHandle<()>) {
    use tonic::transport::Endpoint as GrpcEndpoint;
    use tonic::transport::channel::Change;
    let (channel, tx) = tonic::transport::Channel::balance_channel::<String>(64);
    let mut watch = ServiceWatch::new(cache, namespace, service);
    let task = tokio::spawn(async move {
        loop {
            let update = watch.next().await;
            for change in update.changes {
                let sent = match change {
                    ServiceChange::Added(i) => {
                        let Some(addr) = i.addr() else { continue };
                        match GrpcEndpoint::from_shared(format!("http://{addr}")) {
                            Ok(ep) => tx.send(Change::Insert(i.id.clone(), ep)).await,
                            Err(e) => {
                                tracing::warn!(instance = %i.id, addr, error = %e, "Instance address is not usable for gRPC; skipped.");
                                continue;
                            }
                        }
                    }
                    ServiceChange::Removed(i) => tx.send(Change::Remove(i.id.clone())).await,
                    ServiceChange::HealthChanged { .. } => continue,
                };
                if sent.is_err() {
                    // The channel was dropped: nobody to follow for.
                    return;
                }
            }
        }
    });
    (channel, task)
}
