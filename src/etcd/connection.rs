use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{
    Certificate, Compare, CompareOp, ConnectOptions as RawOptions, DeleteOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
};

use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Error;
use super::error::{brief, worth_another_endpoint};
use super::reachability::{EndpointState, Reachability};

/// Default time allowed to open a connection to one endpoint.
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time allowed for one unary request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach etcd: endpoints, timeouts, TLS and credentials.
///
/// ```
/// use coord::etcd::ConnectOptions;
/// let opts = ConnectOptions::new(vec!["http://127.0.0.1:2379".into()]);
/// assert_eq!(opts.endpoints.len(), 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// `http://` or `https://` URLs of the cluster's members.
    pub endpoints: Vec<String>,
    /// Time allowed to open a connection to one endpoint.
    pub dial_timeout: Duration,
    /// Time allowed for one unary request (failover to other endpoints included).
    pub request_timeout: Duration,
    /// TLS to etcd, if any.
    pub tls: Option<TlsFiles>,
    /// etcd's auth user, if any (with `password`).
    pub username: Option<String>,
    /// The user's password.
    pub password: Option<Password>,
}

impl ConnectOptions {
    /// Options for `endpoints` with default timeouts, no TLS and no auth.
    pub fn new(endpoints: Vec<String>) -> Self {
        ConnectOptions {
            endpoints,
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            tls: None,
            username: None,
            password: None,
        }
    }
}

/// PEM files for TLS to etcd. Any may be absent: without `ca` the system
/// roots are not consulted (etcd clusters use their own CA), so `ca` is
/// needed for `https://` endpoints; `cert` and `key` go together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate that signed the members' certificates.
    pub ca: Option<PathBuf>,
    /// The client certificate, for etcd's client-certificate auth.
    pub cert: Option<PathBuf>,
    /// The client certificate's key.
    pub key: Option<PathBuf>,
}

/// A password that never shows up in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Password(secret.into())
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// The id of an etcd lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // etcdctl and the etcd logs print lease ids in hex.
        write!(f, "{:x}", self.0)
    }
}

/// One key as etcd stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// Its value.
    pub value: Vec<u8>,
    /// The revision that created it (this incarnation).
    pub create_revision: i64,
    /// The revision of its last write.
    pub mod_revision: i64,
    /// 1 when created, +1 on each write.
    pub version: i64,
    /// The lease it is attached to, if any.
    pub lease: Option<LeaseId>,
}

impl KeyValue {
    pub(crate) fn from_raw(kv: &etcd_client::KeyValue) -> Self {
        KeyValue {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
            lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
        }
    }

    /// The value as text (lossy for values that are not UTF-8).
    pub fn value_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.value)
    }
}

/// Operations per transaction in [`Client::apply`]: etcd refuses more than
/// 128 by default (`--max-txn-ops`), and a key may appear only once.
pub const BATCH: usize = 64;

/// One write of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write `value` at `key`, attached to `lease` if given.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// The lease to attach it to.
        lease: Option<LeaseId>,
    },
    /// Delete `key`.
    Delete {
        /// The key.
        key: String,
    },
}

/// The keys under a prefix at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The revision of the read.
    pub revision: i64,
    /// The keys, in key order.
    pub kvs: Vec<KeyValue>,
}

/// A connection to an etcd cluster, cheap to clone.
///
/// Each endpoint gets its own connection, opened lazily. Requests go to the
/// endpoint that last answered; when it cannot be reached (or has no
/// leader), the request moves on to the next endpoint within the same
/// timeout. (tonic's balanced channel keeps routing to a dead member, so
/// failover is done here.) Unary requests are bounded by the request
/// timeout; streams (watches and keepalives) are not, because they are
/// meant to live long. Every request carries the "require leader" flag so
/// that a member cut off from the majority fails fast instead of hanging.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

struct Shared {
    endpoints: Vec<Endpoint>,
    preferred: AtomicUsize,
    options: RawOptions,
    request_timeout: Duration,
}

struct Endpoint {
    url: String,
    client: OnceCell<etcd_client::Client>,
    seen: Reachability,
    /// Cancelled when the endpoint is found not answering (and replaced):
    /// streams opened on it ([`Served`]) move to another endpoint.
    suspect: std::sync::Mutex<CancellationToken>,
}

/// The endpoint a stream was opened on, for the stream to learn that the
/// endpoint stopped answering (a request to it timed out) or to say so
/// itself (its own messages went unanswered). A stopped member (SIGSTOP,
/// a hung disk) keeps its TCP connections open and answers nothing; its
/// streams would otherwise wait until HTTP/2 keepalive gives up on them.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    client: Client,
    index: usize,
    token: CancellationToken,
}

impl Served {
    /// Completes when the endpoint is suspected of not answering.
    pub(crate) async fn suspected(&self) {
        self.token.cancelled().await;
    }

    /// Says the endpoint did not answer: every stream on it moves, and
    /// requests go to the next endpoint.
    pub(crate) fn not_answering(&self, op: &'static str) {
        if !self.token.is_cancelled() {
            self.client.suspect(self.index, op);
        }
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.endpoints())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Prepares connections to every endpoint; nothing is dialled until
    /// the first request, so this succeeds while etcd is down.
    pub async fn connect(opts: &ConnectOptions) -> Result<Client, Error> {
        if opts.endpoints.is_empty() {
            return Err(Error::Config("no endpoints given".into()));
        }
        let mut raw = RawOptions::new()
            .with_connect_timeout(opts.dial_timeout)
            .with_require_leader(true)
            // Dead TCP connections (a partitioned member) are found by HTTP/2
            // pings; etcd refuses pings more often than every 5s.
            .with_keep_alive(Duration::from_secs(10), opts.dial_timeout)
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &opts.tls {
            raw = raw.with_tls(tls_options(tls)?);
        }
        match (&opts.username, &opts.password) {
            (Some(user), Some(password)) => {
                raw = raw
                    .with_user(user.clone(), password.expose())
                    .with_auto_token_refresh(true);
            }
            (Some(_), None) => {
                return Err(Error::Config("a username needs a password".into()));
            }
            (None, Some(_)) => {
                return Err(Error::Config("a password needs a username".into()));
            }
            (None, None) => {}
        }
        for url in &opts.endpoints {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Error::Config(format!(
                    "endpoint `{url}` must start with http:// or https://"
                )));
            }
        }
        Ok(Client {
            shared: Arc::new(Shared {
                endpoints: opts
                    .endpoints
                    .iter()
                    .map(|url| Endpoint {
                        url: url.clone(),
                        client: OnceCell::new(),
                        seen: Reachability::default(),
                        suspect: std::sync::Mutex::default(),
                    })
                    .collect(),
                preferred: AtomicUsize::new(0),
                options: raw,
                request_timeout: opts.request_timeout,
            }),
        })
    }

    /// The endpoints this client was built with.
    pub fn endpoints(&self) -> Vec<String> {
        self.shared
            .endpoints
            .iter()
            .map(|e| e.url.clone())
            .collect()
    }

    /// Each endpoint as last seen by a request: answering, unreachable
    /// (and why), or not asked yet.
    pub fn endpoint_states(&self) -> Vec<EndpointState> {
        self.shared
            .endpoints
            .iter()
            .map(|e| e.seen.state(&e.url))
            .collect()
    }

    /// The time allowed for one unary request.
    pub fn request_timeout(&self) -> Duration {
        self.shared.request_timeout
    }

    async fn endpoint(&self, i: usize) -> Result<etcd_client::Client, etcd_client::Error> {
        let ep = &self.shared.endpoints[i];
        ep.client
            .get_or_try_init(|| {
                etcd_client::Client::connect([ep.url.as_str()], Some(self.shared.options.clone()))
            })
            .await
            .cloned()
    }

    /// Runs one request under the request timeout, moving on to the next
    /// endpoint when one cannot serve it.
    pub(crate) async fn unary<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, Error>
    where
        F: Fn(etcd_client::Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.unary_within(op, self.shared.request_timeout, f).await
    }

    pub(crate) async fn unary_within<T, F, Fut>(
        &self,
        op: &'static str,
        timeout: Duration,
        f: F,
    ) -> Result<T, Error>
    where
        F: Fn(etcd_client::Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.serve(op, timeout, f).await.map(|(v, _)| v)
    }

    /// Opens a stream like [`Client::unary_within`], and says which
    /// endpoint it is on.
    pub(crate) async fn stream_within<T, F, Fut>(
        &self,
        op: &'static str,
        timeout: Duration,
        f: F,
    ) -> Result<(T, Served), Error>
    where
        F: Fn(etcd_client::Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.serve(op, timeout, f).await
    }

    /// Tries the endpoints in turn from the preferred one. While another
    /// endpoint is left to try, one gets half the time that is left: a
    /// member that takes no request (stopped, hung) then costs part of the
    /// budget, not all of it, and is suspected, so later requests and
    /// streams go elsewhere. (A request that timed out may still have been
    /// applied, as one cut off by a transport error may: callers already
    /// retry such requests whole.)
    async fn serve<T, F, Fut>(
        &self,
        op: &'static str,
        timeout: Duration,
        f: F,
    ) -> Result<(T, Served), Error>
    where
        F: Fn(etcd_client::Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        let n = self.shared.endpoints.len();
        let mut last: Option<etcd_client::Error> = None;
        // Endpoints that let this request time out, or failed one lately:
        // skipped while any other is left, or a paused member would take
        // half the budget of every request, and the rest of it each time
        // a round (waiting out a leader election on the others) came back
        // to it.
        let mut silent: Vec<bool> = self
            .shared
            .endpoints
            .iter()
            .map(|e| e.seen.failed_within(self.shared.request_timeout))
            .collect();
        'rounds: for round in 1u64.. {
            let start = self.shared.preferred.load(Ordering::Relaxed);
            let mut order: Vec<usize> = (0..n)
                .map(|step| (start + step) % n)
                .filter(|&i| !silent[i])
                .collect();
            if order.is_empty() {
                order = (0..n).map(|step| (start + step) % n).collect();
            }
            for (step, &i) in order.iter().enumerate() {
                let token = self.suspect_token(i);
                let attempt = async {
                    let c = self.endpoint(i).await?;
                    f(c).await
                };
                let ep = &self.shared.endpoints[i];
                let now = tokio::time::Instant::now();
                let until = if step + 1 < order.len() {
                    now + deadline.saturating_duration_since(now) / 2
                } else {
                    deadline
                };
                match tokio::time::timeout_at(until, attempt).await {
                    Err(_) => {
                        ep.seen
                            .no_answer(&ep.url, until.saturating_duration_since(now));
                        silent[i] = true;
                        self.suspect(i, op);
                        if until >= deadline {
                            break 'rounds;
                        }
                    }
                    Ok(Ok(v)) => {
                        ep.seen.answered(&ep.url);
                        self.shared.preferred.store(i, Ordering::Relaxed);
                        let served = Served {
                            client: self.clone(),
                            index: i,
                            token,
                        };
                        return Ok((v, served));
                    }
                    Ok(Err(e)) if worth_another_endpoint(&e) => {
                        debug!(endpoint = %ep.url, op, error = %e, "Endpoint cannot serve; trying the next.");
                        if super::error::is_transport(&e) {
                            ep.seen.failed(&ep.url, brief(&e));
                        } else {
                            ep.seen.answered(&ep.url);
                        }
                        // The next that may answer; never back to a silent one.
                        let next = order[(step + 1) % order.len()];
                        self.shared.preferred.store(next, Ordering::Relaxed);
                        last = Some(e);
                    }
                    Ok(Err(e)) => {
                        // An answer, if not the one hoped for.
                        ep.seen.answered(&ep.url);
                        return Err(Error::Request { op, source: e });
                    }
                }
            }
            // No endpoint could serve: wait a little (a leader election
            // takes about a second) and go round again while time lasts.
            let pause = Duration::from_millis(50 * round.min(10));
            if tokio::time::Instant::now() + pause >= deadline {
                break;
            }
            tokio::time::sleep(pause).await;
        }
        Err(match last {
            Some(source) => Error::Request { op, source },
            None => Error::Timeout { op, timeout },
        })
    }

    fn suspect_token(&self, i: usize) -> CancellationToken {
        self.shared.endpoints[i]
            .suspect
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Endpoint `i` did not answer `op` in time: its streams move, and the
    /// next endpoint is preferred. With one endpoint there is nowhere else
    /// to go, and its streams are left to resume when it answers.
    fn suspect(&self, i: usize, op: &'static str) {
        let n = self.shared.endpoints.len();
        if n < 2 {
            return;
        }
        let _ = self.shared.preferred.compare_exchange(
            i,
            (i + 1) % n,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        let ep = &self.shared.endpoints[i];
        let old = std::mem::take(&mut *ep.suspect.lock().unwrap_or_else(|p| p.into_inner()));
        old.cancel();
        warn!(endpoint = %ep.url, op, "etcd endpoint did not answer in time; moving to the next one.");
    }

    /// Reads one key.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, Error> {
        let resp = self
            .unary("get", |mut c| async move { c.get(key, None).await })
            .await?;
        Ok(resp.kvs().first().map(KeyValue::from_raw))
    }

    /// Reads every key under `prefix` at one revision, a page at a time
    /// (a prefix may hold more than one gRPC message).
    pub async fn get_prefix(&self, prefix: &str) -> Result<Snapshot, Error> {
        let mut set = super::ReadSet::default();
        set.add_prefix(prefix);
        let view = self.read(&set, None).await?;
        Ok(Snapshot {
            revision: view.revision(),
            kvs: view.into_kvs(),
        })
    }

    /// Writes `value` at `key`, attached to `lease` if given. Returns the
    /// revision of the write.
    pub async fn put(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        lease: Option<LeaseId>,
    ) -> Result<i64, Error> {
        let value = value.into();
        let opts = lease.map(|l| PutOptions::new().with_lease(l.0));
        let resp = self
            .unary("put", |mut c| {
                let (value, opts) = (value.clone(), opts.clone());
                async move { c.put(key, value, opts).await }
            })
            .await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Writes `value` at `key` only if the key does not exist (its
    /// `create_revision` is 0). Returns `None` when written, or the key that
    /// is already there.
    pub async fn put_if_absent(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        lease: Option<LeaseId>,
    ) -> Result<Option<KeyValue>, Error> {
        let value = value.into();
        let opts = lease.map(|l| PutOptions::new().with_lease(l.0));
        let resp = self
            .unary("put if absent", |mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key, value.clone(), opts.clone())])
                    .or_else([TxnOp::get(key, None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        if resp.succeeded() {
            return Ok(None);
        }
        let existing = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().map(KeyValue::from_raw),
            _ => None,
        });
        Ok(existing)
    }

    /// Applies many writes in as few round trips as etcd allows: batches of
    /// [`BATCH`] operations, each batch one transaction (so atomic).
    pub async fn apply(&self, ops: &[Op]) -> Result<(), Error> {
        for chunk in ops.chunks(BATCH) {
            self.unary("batch", |mut c| {
                let txn = Txn::new().and_then(
                    chunk
                        .iter()
                        .map(|op| match op {
                            Op::Put { key, value, lease } => TxnOp::put(
                                key.as_str(),
                                value.clone(),
                                lease.map(|l| PutOptions::new().with_lease(l.0)),
                            ),
                            Op::Delete { key } => TxnOp::delete(key.as_str(), None),
                        })
                        .collect::<Vec<_>>(),
                );
                async move { c.txn(txn).await }
            })
            .await?;
        }
        Ok(())
    }

    /// Deletes one key; returns how many keys were deleted (0 or 1).
    pub async fn delete(&self, key: &str) -> Result<i64, Error> {
        let resp = self
            .unary("delete", |mut c| async move { c.delete(key, None).await })
            .await?;
        Ok(resp.deleted())
    }

    /// Deletes every key under `prefix`; returns how many were deleted.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<i64, Error> {
        let resp = self
            .unary("delete prefix", |mut c| async move {
                c.delete(prefix, Some(DeleteOptions::new().with_prefix()))
                    .await
            })
            .await?;
        Ok(resp.deleted())
    }

    /// Compacts the key history up to `revision`, as an operator (or etcd's
    /// auto-compaction) would.
    pub async fn compact(&self, revision: i64) -> Result<(), Error> {
        self.unary(
            "compact",
            |mut c| async move { c.compact(revision, None).await },
        )
        .await?;
        Ok(())
    }
}

fn tls_options(files: &TlsFiles) -> Result<TlsOptions, Error> {
    let read = |what: &'static str, path: &PathBuf| {
        std::fs::read(path).map_err(|source| Error::ReadFile {
            what,
            path: path.clone(),
            source,
        })
    };
    let mut tls = TlsOptions::new();
    if let Some(ca) = &files.ca {
        tls = tls.ca_certificate(Certificate::from_pem(read("the TLS CA certificate", ca)?));
    }
    match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(
                read("the TLS client certificate", cert)?,
                read("the TLS client key", key)?,
            ));
        }
        (None, None) => {}
        _ => {
            return Err(Error::Config(
                "a TLS client certificate and key go together: give both or neither".into(),
            ));
        }
    }
    Ok(tls)
}
