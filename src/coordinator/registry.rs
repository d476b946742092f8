//! The service registry through a [`Coord`]: registration in one call,
//! kept written on the session's lease, whatever lease that is.

use std::collections::BTreeMap;
use std::future::Future;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::{Coord, Lost, Tie, alive};
use crate::etcd::{Client, Error, LeaseId, Op, RetryPolicy, SessionState};
use crate::registry::check::{Check, Tally};
use crate::registry::{
    self, Endpoint, Health, HealthRecord, Instance, bounded_output, endpoint_key, health_key,
};

/// One instance of a service, as [`Registry::register`] lists it.
///
/// ```
/// use coord::coordinator::Service;
/// let api = Service::new("api", "api-1", "10.0.0.5:8080").metadata("zone", "eu-1");
/// assert_eq!(api.metadata["zone"], "eu-1");
/// ```
#[derive(Debug, Clone)]
pub struct Service {
    /// The service's name (`api`).
    pub name: String,
    /// This instance's id, unique within the service.
    pub id: String,
    /// Where clients reach it, `host:port`.
    pub addr: String,
    /// What discovery shows beside the address (`version`, `zone`,
    /// `weight`, …).
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// A health check the registration runs itself: while it fails the
    /// instance is critical and withdrawn from discovery.
    pub check: Option<Check>,
}

impl Service {
    /// Instance `id` of service `name` at `addr`, without metadata.
    pub fn new(name: impl Into<String>, id: impl Into<String>, addr: impl Into<String>) -> Self {
        Service {
            name: name.into(),
            id: id.into(),
            addr: addr.into(),
            metadata: BTreeMap::new(),
            check: None,
        }
    }

    /// Runs `check` for the instance (see [`Check`]).
    pub fn check(mut self, check: Check) -> Self {
        self.check = Some(check);
        self
    }

    /// Adds a metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// The registry under a [`Coord`]'s namespace: register instances,
/// discover them, follow them.
#[derive(Debug, Clone)]
pub struct Registry {
    coord: Coord,
}

impl Registry {
    pub(super) fn new(coord: Coord) -> Self {
        Registry { coord }
    }

    /// Registers `service` in one call: its health record and its
    /// discovery entry, on the session lease, written before this returns.
    /// With a check, the check runs once first (so a failing instance is
    /// never listed) and then every interval. A background task writes the
    /// registration again on each new lease (after a loss or a revoke), so
    /// the instance comes back by itself, and whenever its health or
    /// maintenance changes.
    pub async fn register(&self, service: Service) -> Result<Registration, Error> {
        let state = self.coord.session_events();
        let mut tally = Tally::new(Health::Passing);
        if let Some(check) = &service.check {
            // The first result decides alone: nothing before it to outvote.
            tally.apply(check.run_once().await, 1, 1);
        }
        let (desired_tx, desired_rx) = watch::channel(Desired {
            status: tally.status,
            output: tally.output.clone(),
            maintenance: None,
        });
        let (written_tx, written_rx) = watch::channel(None);
        let mut keeper = Keeper {
            client: self.coord.client().clone(),
            namespace: self.coord.namespace().to_owned(),
            agent: self.coord.name().to_owned(),
            service: service.clone(),
            state: state.clone(),
            desired: desired_rx,
            written: written_tx,
            since: now(),
            last_status: None,
            tally,
            retry: self.coord.retry_policy(),
        };
        let lease = self.coord.lease().await?;
        let first = keeper.desired.borrow_and_update().clone();
        keeper.write(lease, &first).await?;
        let task = tokio::spawn(keeper.run(Some((lease, first))));
        Ok(Registration {
            service,
            namespace: self.coord.namespace().to_owned(),
            client: self.coord.client().clone(),
            retry: self.coord.retry_policy(),
            state,
            desired: desired_tx,
            written: written_rx,
            task: Some(task),
            released: false,
        })
    }

    /// The instances of `service` listed for discovery now (read from
    /// etcd).
    pub async fn discover(&self, service: &str) -> Result<Vec<Instance>, Error> {
        let mut all = self.instances(service).await?;
        all.retain(Instance::is_listed);
        Ok(all)
    }

    /// Every instance of `service`, listed or not, with its health.
    pub async fn instances(&self, service: &str) -> Result<Vec<Instance>, Error> {
        registry::read(self.coord.client(), self.coord.namespace(), Some(service)).await
    }

    /// `service`'s instances as a `Stream` of updates (through the shared
    /// cache): the first once the first full read is done, every listed
    /// instance as added; then one per change (added, removed, health).
    pub fn watch(
        &self,
        service: &str,
    ) -> impl futures_core::Stream<Item = registry::ServiceUpdate> + Send + use<> {
        registry::ServiceWatch::new(self.coord.cache(), self.coord.namespace(), service)
            .into_stream()
    }

    /// A gRPC channel balanced over `service`'s listed instances, following
    /// discovery (see [`registry::grpc_channel`]); abort the task to stop
    /// following.
    pub fn grpc_channel(&self, service: &str) -> (tonic::transport::Channel, JoinHandle<()>) {
        registry::grpc_channel(self.coord.cache(), self.coord.namespace(), service)
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// What the registration should say now.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Desired {
    status: Health,
    output: String,
    maintenance: Option<String>,
}

impl Desired {
    fn effective(&self) -> (Health, String) {
        match &self.maintenance {
            Some(reason) => (Health::Maintenance, reason.clone()),
            None => (self.status, self.output.clone()),
        }
    }
}

/// Writes a registration, and writes it again whenever the lease or
/// what it should say changes.
struct Keeper {
    client: Client,
    namespace: String,
    agent: String,
    service: Service,
    state: watch::Receiver<SessionState>,
    desired: watch::Receiver<Desired>,
    written: watch::Sender<Option<LeaseId>>,
    since: String,
    last_status: Option<Health>,
    tally: Tally,
    retry: RetryPolicy,
}

impl Keeper {
    async fn write(&mut self, lease: LeaseId, desired: &Desired) -> Result<(), Error> {
        let (status, output) = desired.effective();
        if self.last_status != Some(status) {
            self.since = now();
        }
        let s = &self.service;
        let record = HealthRecord {
            status,
            output: bounded_output(output),
            agent: self.agent.clone(),
            addr: s.addr.clone(),
            metadata: s.metadata.clone(),
            since: self.since.clone(),
        };
        let endpoint = Endpoint {
            addr: s.addr.clone(),
            metadata: s.metadata.clone(),
        };
        let listing = if status.serves() {
            Op::Put {
                key: endpoint_key(&self.namespace, &s.name, &s.id),
                value: serde_json::to_vec(&endpoint).unwrap_or_default(),
                lease: Some(lease),
            }
        } else {
            Op::Delete {
                key: endpoint_key(&self.namespace, &s.name, &s.id),
            }
        };
        let health = Op::Put {
            key: health_key(&self.namespace, &s.name, &s.id),
            value: serde_json::to_vec(&record).unwrap_or_default(),
            lease: Some(lease),
        };
        self.client.apply(&[health, listing]).await?;
        self.last_status = Some(status);
        self.written.send_replace(Some(lease));
        Ok(())
    }

    /// What the registration should say now: the check's tally and the
    /// maintenance asked for.
    fn wanted(&mut self) -> Desired {
        let maintenance = self.desired.borrow_and_update().maintenance.clone();
        Desired {
            status: self.tally.status,
            output: self.tally.output.clone(),
            maintenance,
        }
    }

    async fn run(mut self, mut last: Option<(LeaseId, Desired)>) {
        let mut backoff = self.retry.backoff();
        let check = self.service.check.clone();
        let mut next_check = check
            .as_ref()
            .map(|c| tokio::time::Instant::now() + c.interval);
        loop {
            let Ok(lease) = alive(&mut self.state).await else {
                return;
            };
            let desired = self.wanted();
            if last.as_ref() != Some(&(lease, desired.clone())) {
                match self.write(lease, &desired).await {
                    Ok(()) => {
                        if last.as_ref().is_some_and(|(l, _)| *l != lease) {
                            debug!(service = %self.service.name, instance = %self.service.id, lease = %lease, "Registration written again on a new lease.");
                        }
                        last = Some((lease, desired));
                        backoff.reset();
                    }
                    Err(e) => {
                        let wait = backoff.next_delay();
                        warn!(service = %self.service.name, instance = %self.service.id, error = %e, retry_in = ?wait, "Could not write the registration.");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
            }
            let check_due = async {
                match next_check {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = self.state.changed() => if changed.is_err() { return },
                // The registration was dropped or released.
                changed = self.desired.changed() => if changed.is_err() { return },
                () = check_due => {
                    if let Some(check) = &check {
                        let result = check.run_once().await;
                        if result.status != self.tally.status {
                            debug!(service = %self.service.name, instance = %self.service.id, status = result.status.name(), "Health check result.");
                        }
                        self.tally.apply(result, check.successes, check.failures);
                        next_check = Some(tokio::time::Instant::now() + check.interval);
                    }
                }
            }
        }
    }
}

/// A registered instance, kept written on the session's lease.
///
/// Unlike a lock or an id, a registration comes back by itself: after
/// the lease is lost or revoked it is written again on the next one.
/// [`Registration::lost`] tells when the lease it is written on goes.
/// Dropping it deregisters in the background; [`Registration::release`]
/// does so and waits.
#[derive(Debug)]
pub struct Registration {
    service: Service,
    namespace: String,
    client: Client,
    retry: RetryPolicy,
    state: watch::Receiver<SessionState>,
    desired: watch::Sender<Desired>,
    written: watch::Receiver<Option<LeaseId>>,
    task: Option<JoinHandle<()>>,
    released: bool,
}

impl Registration {
    /// The instance as registered.
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// The lease the registration was last written on.
    pub fn lease(&self) -> Option<LeaseId> {
        *self.written.borrow()
    }

    /// Resolves when the lease the registration is written on now is gone
    /// (it is then written again on the next lease, by itself).
    pub fn lost(&self) -> impl Future<Output = Lost> + Send + use<> {
        let lease = self.lease().unwrap_or(LeaseId(0));
        Tie::new(self.client.clone(), self.state.clone(), lease, self.retry).lease_gone()
    }

    /// Waits until the registration is written on a lease other than
    /// `previous` and returns it.
    pub async fn rewritten(&self, previous: LeaseId) -> Option<LeaseId> {
        let mut written = self.written.clone();
        loop {
            if let Some(lease) = *written.borrow_and_update()
                && lease != previous
            {
                return Some(lease);
            }
            written.changed().await.ok()?;
        }
    }

    /// Withdraws the instance from discovery while `reason` holds
    /// (`Some`), its health record showing maintenance; `None` ends it.
    pub fn set_maintenance(&self, reason: Option<&str>) {
        self.desired
            .send_modify(|d| d.maintenance = reason.map(str::to_owned));
    }

    /// Stops keeping the registration and deletes it, waiting for etcd.
    pub async fn release(mut self) -> Result<(), Error> {
        self.released = true;
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        registry::deregister(
            &self.client,
            &self.namespace,
            &self.service.name,
            &self.service.id,
        )
        .await
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if self.released {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (client, ns) = (self.client.clone(), self.namespace.clone());
        let (name, id) = (self.service.name.clone(), self.service.id.clone());
        runtime.spawn(async move {
            if let Err(e) = registry::deregister(&client, &ns, &name, &id).await {
                debug!(service = %name, instance = %id, error = %e, "Could not deregister a dropped registration; it goes with the lease.");
            }
        });
    }
}
