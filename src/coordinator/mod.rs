//! [`Coord`]: one handle from which a service gets everything coord
//! offers — registry, locks, config center, instance ids and elections —
//! on one connection and one session lease.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use coord::{Coord, Options};
//!
//! let coord = Coord::connect(
//!     Options::new(["http://127.0.0.1:2379"])
//!         .namespace("/coord")
//!         .session_ttl(Duration::from_secs(10)),
//! )
//! .await?;
//! let billing = coord.scope("billing"); // keys under /coord/billing/…
//! println!("etcd answered in {:?}", coord.ping().await?.round_trip);
//! coord.close().await; // revokes the lease: what it held goes at once
//! # drop(billing);
//! # Ok(()) }
//! ```
//!
//! The session lease is the one thing every handle shares. What is held on
//! it — a lock guard, an id claim, a registration — knows it
//! (`lost()`), and goes with it: on [`Coord::close`] at once, when the last
//! `Coord` clone is dropped after the TTL (dropping stops the renewer).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::etcd::{
    Cache, Client, ConnectOptions, Error, LeaseId, Password, RetryPolicy, Session, SessionState,
    TlsFiles,
};

/// The namespace [`Options`] start with, as the agent's.
pub const DEFAULT_NAMESPACE: &str = "/coord";
/// The session TTL [`Options`] start with.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(10);
/// The endpoint [`Options::from_env`] falls back to.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";

/// How to connect a [`Coord`]: the etcd connection, the namespace its keys
/// live under, the session TTL, and the name it holds things by.
///
/// ```
/// use std::time::Duration;
/// use coord::Options;
/// let opts = Options::new(["http://10.0.0.1:2379", "http://10.0.0.2:2379"])
///     .namespace("/shop")
///     .session_ttl(Duration::from_secs(15))
///     .request_timeout(Duration::from_secs(3));
/// assert_eq!(opts.connect.endpoints.len(), 2);
/// assert_eq!(opts.namespace, "/shop");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Endpoints, timeouts, TLS and credentials.
    pub connect: ConnectOptions,
    /// Where keys live: `<namespace>/services/…`, `<namespace>/locks/…`.
    pub namespace: String,
    /// The session lease's TTL: how long what this handle holds outlives
    /// it if the process dies (whole seconds, at least 2).
    pub session_ttl: Duration,
    /// The name this handle holds locks, ids and registrations by (shown
    /// to whoever looks); default `<host>-<pid>`.
    pub name: String,
    /// How long [`Coord::connect`] waits for the first lease.
    pub connect_timeout: Duration,
    /// How the handle's background retries are paced (re-granting the
    /// session lease, writing a registration again, watching a held key);
    /// default 100 ms doubling to 5 s, without jitter.
    pub retry: RetryPolicy,
}

impl Options {
    /// Options for `endpoints`: namespace `/coord`, a 10 s session, the
    /// default timeouts, no TLS, no auth.
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ConnectOptions::new(endpoints.into_iter().map(Into::into).collect()).into()
    }

    /// Options from the environment the CLI reads too: `COORD_ENDPOINTS`
    /// (comma-separated; default `http://127.0.0.1:2379`) and
    /// `COORD_NAMESPACE` (default `/coord`).
    pub fn from_env() -> Self {
        let endpoints = std::env::var("COORD_ENDPOINTS")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let opts = Options::new(endpoints.split(',').map(|e| e.trim().to_owned()));
        match std::env::var("COORD_NAMESPACE") {
            Ok(ns) if !ns.is_empty() => opts.namespace(ns),
            _ => opts,
        }
    }

    /// Keys under `namespace` (a trailing `/` is dropped).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into().trim_end_matches('/').to_owned();
        self
    }

    /// The session lease's TTL.
    pub fn session_ttl(mut self, ttl: Duration) -> Self {
        self.session_ttl = ttl;
        self
    }

    /// The name things are held by.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Time allowed to open a connection to one endpoint.
    pub fn dial_timeout(mut self, timeout: Duration) -> Self {
        self.connect.dial_timeout = timeout;
        self
    }

    /// Time allowed for one request.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.connect.request_timeout = timeout;
        self
    }

    /// How long [`Coord::connect`] waits for etcd to grant the first lease.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// TLS to etcd with these PEM files.
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.connect.tls = Some(files);
        self
    }

    /// Pacing of the handle's background retries (see [`RetryPolicy`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// etcd's username and password auth.
    pub fn auth(mut self, user: impl Into<String>, password: Password) -> Self {
        self.connect.username = Some(user.into());
        self.connect.password = Some(password);
        self
    }
}

impl From<ConnectOptions> for Options {
    fn from(connect: ConnectOptions) -> Self {
        let connect_timeout = connect.dial_timeout + connect.request_timeout;
        Options {
            connect,
            namespace: DEFAULT_NAMESPACE.to_owned(),
            session_ttl: DEFAULT_SESSION_TTL,
            name: default_name(),
            connect_timeout,
            retry: RetryPolicy::DEFAULT,
        }
    }
}

fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "coord".to_owned())
}

fn default_name() -> String {
    format!("{}-{}", host_name(), std::process::id())
}

/// The coordinator: one connection, one session lease, one read cache,
/// shared by every handle got from it. Cheap to clone; clones and
/// [scopes](Coord::scope) share the connection and the session.
///
/// [`Coord::close`] revokes the lease, so everything held on it goes at
/// once. When the last clone is dropped without it, the session stops
/// renewing and everything held goes after the TTL.
#[derive(Debug, Clone)]
pub struct Coord {
    shared: Arc<Shared>,
    namespace: String,
}

#[derive(Debug)]
struct Shared {
    client: Client,
    session: Session,
    cache: Cache,
    name: String,
    host: String,
    root: String,
    retry: RetryPolicy,
}

/// What [`Coord::ping`] measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    /// A linearizable read's round trip (the cluster's leader took part).
    pub round_trip: Duration,
    /// etcd's revision at the read.
    pub revision: i64,
    /// The session's lease, if it is alive.
    pub lease: Option<LeaseId>,
}

impl Coord {
    /// Connects to etcd and waits (up to [`Options::connect_timeout`]) for
    /// the session's first lease, so that wrong endpoints or credentials
    /// fail here rather than at the first use.
    pub async fn connect(options: impl Into<Options>) -> Result<Coord, Error> {
        let options = options.into();
        if options.session_ttl < Duration::from_secs(2) || options.session_ttl.subsec_nanos() != 0 {
            return Err(Error::Config(format!(
                "a session TTL is whole seconds, at least 2 (etcd leases count seconds), not {}",
                humantime::format_duration(options.session_ttl)
            )));
        }
        let client = Client::connect(&options.connect).await?;
        let session = Session::start_paced(client.clone(), options.session_ttl, options.retry);
        let first = tokio::time::timeout(options.connect_timeout, session.wait_alive()).await;
        if first.is_err() {
            // Dropped: it stops trying.
            return Err(Error::Timeout {
                op: "grant of the first session lease",
                timeout: options.connect_timeout,
            });
        }
        Ok(Coord {
            shared: Arc::new(Shared {
                cache: Cache::new(client.clone()),
                client,
                session,
                name: options.name,
                host: host_name(),
                root: options.namespace.clone(),
                retry: options.retry,
            }),
            namespace: options.namespace,
        })
    }

    /// A handle whose keys live under `<namespace>/<name>` — what the Go
    /// seeds call a module — sharing this one's connection and session.
    /// Scopes nest.
    pub fn scope(&self, name: &str) -> Coord {
        Coord {
            shared: self.shared.clone(),
            namespace: format!("{}/{}", self.namespace, name.trim_matches('/')),
        }
    }

    /// The namespace this handle's keys live under.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The namespace of the handle [`Coord::connect`] returned, which
    /// every scope of it shares.
    pub fn root_namespace(&self) -> &str {
        &self.shared.root
    }

    /// The name things are held by ([`Options::name`]).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The host name, as recorded in what this handle holds.
    pub fn host(&self) -> &str {
        &self.shared.host
    }

    /// The etcd client, for what the handles do not cover.
    pub fn client(&self) -> &Client {
        &self.shared.client
    }

    /// The read cache (watch-fed), shared by every handle.
    pub fn cache(&self) -> &Cache {
        &self.shared.cache
    }

    /// The session's state now.
    pub fn session_state(&self) -> SessionState {
        self.shared.session.state()
    }

    /// A receiver of every session state change.
    pub fn session_events(&self) -> watch::Receiver<SessionState> {
        self.shared.session.subscribe()
    }

    /// The session's lease, waiting while a new one is being granted;
    /// [`Error::SessionClosed`] once the session is closed.
    pub async fn lease(&self) -> Result<LeaseId, Error> {
        alive(&mut self.shared.session.subscribe()).await
    }

    /// Whether etcd answers a linearizable read, and how fast.
    pub async fn ping(&self) -> Result<Ping, Error> {
        let started = tokio::time::Instant::now();
        let revision = self.shared.client.current_revision().await?;
        Ok(Ping {
            round_trip: started.elapsed(),
            revision,
            lease: self.shared.session.state().lease(),
        })
    }

    /// How this handle paces its retries ([`Options::retry`]); also for
    /// operations of your own, with [`RetryPolicy::retry`].
    pub fn retry_policy(&self) -> RetryPolicy {
        self.shared.retry
    }

    /// Locks under this handle's namespace, held on the session.
    pub fn locks(&self) -> Locks {
        Locks::new(self.clone())
    }

    /// Instance ids of `pool` (`0..size`) under this handle's namespace.
    pub fn ids(&self, pool: &str, size: u32) -> Ids {
        Ids::new(self.clone(), pool, size)
    }

    /// The service registry under this handle's namespace.
    pub fn registry(&self) -> Registry {
        Registry::new(self.clone())
    }

    /// The config center: keys under `<namespace>/config/`, or absolute
    /// ones as given.
    pub fn config(&self) -> ConfigCenter {
        ConfigCenter::new(self.clone())
    }

    /// Leader elections under this handle's namespace.
    pub fn elections(&self) -> Elections {
        Elections::new(self.clone())
    }

    /// Closes the session for every clone and scope: stops renewing and
    /// revokes the lease, so everything held on it goes now.
    pub async fn close(self) {
        self.shared.session.stop().await;
    }

    /// What lease-tied handles keep: the client and the session's state,
    /// never the session itself (a guard kept must not keep it renewing).
    pub(crate) fn tie(&self, lease: LeaseId) -> Tie {
        Tie::new(
            self.shared.client.clone(),
            self.session_events(),
            lease,
            self.shared.retry,
        )
    }
}

/// The alive lease, waiting through `Pending` and `Lost`;
/// [`Error::SessionClosed`] once closed.
pub(crate) async fn alive(state: &mut watch::Receiver<SessionState>) -> Result<LeaseId, Error> {
    loop {
        match *state.borrow_and_update() {
            SessionState::Alive { lease, .. } => return Ok(lease),
            SessionState::Closed => return Err(Error::SessionClosed),
            SessionState::Pending | SessionState::Lost { .. } => {}
        }
        if state.changed().await.is_err() {
            return Err(Error::SessionClosed);
        }
    }
}

mod config;
mod elections;
mod ids;
mod locks;
mod registry;
mod tie;

pub use config::ConfigCenter;
pub use elections::{Elections, Leading};
pub use ids::{IdClaim, Ids};
pub use locks::{LockGuard, Locks};
pub use registry::{Registration, Registry, Service};
pub use tie::Lost;
use tie::Tie;
