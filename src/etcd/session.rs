//! One lease per agent, kept alive, with a local deadline.
//!
//! The local deadline is `time the keepalive was sent + TTL granted`. The
//! server can only have received that keepalive after it was sent, so its
//! own expiry is never earlier than our deadline: when the deadline passes we
//! *must* assume the lease is gone, even though etcd may not know yet. That is
//! what lets lock-guarded commands be stopped before anyone else can take the
//! lock.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use super::clock::{BootInstant, Clock};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::connection::Served;
use super::{Client, Error, LeaseId, RetryPolicy};

/// How much longer than a renewal interval a keepalive may go unanswered
/// on an endpoint that batches keepalives (see [`BATCHING_HINT`]) before
/// it is taken to be stopped; a member gets the interval alone.
const PROXY_SLACK: Duration = Duration::from_secs(1);

/// A keepalive answered later than this came from an endpoint that batches
/// them (etcd's grpc-proxy): a member on the same LAN answers within
/// milliseconds. (A member across a WAN slower than this also counts as
/// batching, which only gives it the longer wait.)
const BATCHING_HINT: Duration = Duration::from_millis(100);

/// What the session knows about its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// No lease yet: etcd has not answered the first grant.
    Pending,
    /// The lease is ours at least until `deadline` (on `CLOCK_BOOTTIME`,
    /// which counts suspend as the server does).
    Alive {
        /// The lease.
        lease: LeaseId,
        /// Until when it is ours for sure, on `CLOCK_BOOTTIME`.
        deadline: BootInstant,
    },
    /// The lease may be gone; a new one is being requested.
    Lost {
        /// The lease that may be gone.
        lease: LeaseId,
    },
    /// The session was closed and its lease revoked (or left to expire).
    Closed,
}

impl SessionState {
    /// The lease, while it is alive.
    pub fn lease(&self) -> Option<LeaseId> {
        match self {
            SessionState::Alive { lease, .. } => Some(*lease),
            _ => None,
        }
    }
}

/// Counters a session keeps about its lease, for whoever monitors it (the
/// library exports no metrics itself). One set may be shared by the
/// sessions that replace each other, so the counts only grow.
#[derive(Debug, Default)]
pub struct SessionStats {
    granted: AtomicU64,
    renewals: AtomicU64,
    lost: AtomicU64,
    moved: AtomicU64,
}

impl SessionStats {
    /// Leases granted (the first one and each after a loss).
    pub fn granted(&self) -> u64 {
        self.granted.load(Ordering::Relaxed)
    }

    /// Keepalives etcd answered, each moving the local deadline.
    pub fn renewals(&self) -> u64 {
        self.renewals.load(Ordering::Relaxed)
    }

    /// Leases given up as lost (local deadline passed, or etcd said expired).
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Keepalive streams given up on an endpoint that left a keepalive
    /// unanswered too long (a stopped member), and opened on the next.
    pub fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }
}

/// The agent's lease, kept alive in the background.
///
/// ```no_run
/// # async fn demo(client: coord::etcd::Client) {
/// use std::time::Duration;
/// let session = coord::etcd::Session::start(client, Duration::from_secs(10));
/// let lease = session.wait_alive().await;
/// // … attach keys to `lease` …
/// session.close().await;
/// # }
/// ```
#[derive(Debug)]
pub struct Session {
    state: watch::Receiver<SessionState>,
    cancel: CancellationToken,
    abandon: watch::Sender<Option<LeaseId>>,
    /// Set when dropped: stop without revoking.
    dropped: Arc<AtomicBool>,
    task: JoinHandle<()>,
    stats: Arc<SessionStats>,
}

impl Session {
    /// Starts granting and renewing a lease of `ttl` (whole seconds, at
    /// least 2: etcd's minimum).
    pub fn start(client: Client, ttl: Duration) -> Session {
        Self::start_counted(client, ttl, Arc::default())
    }

    /// Like [`Session::start`], counting into `stats` (which may outlive
    /// this session and be handed to the next one).
    pub fn start_counted(client: Client, ttl: Duration, stats: Arc<SessionStats>) -> Session {
        Self::start_with_clock(client, ttl, stats, Clock::system())
    }

    /// Like [`Session::start`], re-granting the lease after a loss paced
    /// by `retry` rather than the default 100 ms doubling to 5 s.
    pub fn start_paced(client: Client, ttl: Duration, retry: RetryPolicy) -> Session {
        Self::spawn(client, ttl, Arc::default(), Clock::system(), retry)
    }

    /// Like [`Session::start_counted`], keeping the local deadline on
    /// `clock` (tests suspend it with a [`super::Suspender`]).
    pub fn start_with_clock(
        client: Client,
        ttl: Duration,
        stats: Arc<SessionStats>,
        clock: Clock,
    ) -> Session {
        Self::spawn(client, ttl, stats, clock, RetryPolicy::DEFAULT)
    }

    fn spawn(
        client: Client,
        ttl: Duration,
        stats: Arc<SessionStats>,
        clock: Clock,
        retry: RetryPolicy,
    ) -> Session {
        let (tx, rx) = watch::channel(SessionState::Pending);
        let cancel = CancellationToken::new();
        let abandon = watch::Sender::new(None);
        let dropped = Arc::new(AtomicBool::new(false));
        let keeper = Keeper {
            dropped: dropped.clone(),
            client,
            abandon: abandon.subscribe(),
            ttl_secs: ttl.as_secs().max(2) as i64,
            state: tx,
            cancel: cancel.clone(),
            stats: stats.clone(),
            clock,
            retry,
        };
        let task = tokio::spawn(keeper.run());
        Session {
            state: rx,
            cancel,
            abandon,
            dropped,
            task,
            stats,
        }
    }

    /// Grants, renewals and losses so far.
    pub fn stats(&self) -> Arc<SessionStats> {
        self.stats.clone()
    }

    /// The current state.
    pub fn state(&self) -> SessionState {
        *self.state.borrow()
    }

    /// A receiver that sees every state change (and every renewal).
    pub fn subscribe(&self) -> watch::Receiver<SessionState> {
        self.state.clone()
    }

    /// Waits until a lease is alive and returns it.
    pub async fn wait_alive(&self) -> LeaseId {
        alive_lease(&mut self.state.clone()).await
    }

    /// A handle that gives up a lease of this session without closing it.
    pub fn abandoner(&self) -> Abandoner {
        Abandoner(self.abandon.clone())
    }

    /// Stops renewing and revokes the lease at once, so that everything
    /// attached to it disappears now rather than after the TTL.
    pub async fn close(mut self) {
        self.cancel.cancel();
        let _ = (&mut self.task).await;
    }

    /// Like [`Session::close`], through a shared reference (the session
    /// of a handle others share): returns once the lease is revoked (or
    /// given up on) and the state is [`SessionState::Closed`].
    pub async fn stop(&self) {
        self.cancel.cancel();
        let mut state = self.state.clone();
        while *state.borrow_and_update() != SessionState::Closed {
            if state.changed().await.is_err() {
                return;
            }
        }
    }
}

impl Drop for Session {
    /// A session dropped without [`Session::close`] stops renewing, so
    /// nothing stays held for a session nobody has any more: the lease
    /// ends after its TTL. It is not revoked: a drop may come on a path
    /// where something the lease guards (a lock-guarded command) still
    /// runs, and only the TTL gives that time to be stopped.
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::Relaxed);
        self.cancel.cancel();
    }
}

/// Gives up one lease of a session: renewals stop, the state turns
/// `Lost`, and a new lease is granted. The old lease is left to expire
/// rather than revoked, so whoever stops work on `Lost` (a guarded command,
/// which gets no more renewals) is done before anything on it goes.
#[derive(Debug, Clone)]
pub struct Abandoner(watch::Sender<Option<LeaseId>>);

impl Abandoner {
    /// Gives up `lease` if it is the session's current one (or, if it is
    /// not granted yet, never keeps it).
    pub fn abandon(&self, lease: LeaseId) {
        self.0.send_replace(Some(lease));
    }
}

/// Waits on a session's state until a lease is alive and returns it.
pub async fn alive_lease(state: &mut watch::Receiver<SessionState>) -> LeaseId {
    loop {
        if let Some(lease) = state.borrow_and_update().lease() {
            return lease;
        }
        if state.changed().await.is_err() {
            // The keeper only stops when closed; there will never be a lease.
            std::future::pending::<()>().await;
        }
    }
}

struct Keeper {
    dropped: Arc<AtomicBool>,
    client: Client,
    abandon: watch::Receiver<Option<LeaseId>>,
    ttl_secs: i64,
    state: watch::Sender<SessionState>,
    cancel: CancellationToken,
    stats: Arc<SessionStats>,
    clock: Clock,
    retry: RetryPolicy,
}

enum Ended {
    Shutdown,
    Lost(&'static str),
    /// Given up by its holder ([`Abandoner`]): left to expire.
    Abandoned,
}

impl Keeper {
    async fn run(self) {
        let mut previous: Option<LeaseId> = None;
        loop {
            let Some((lease, deadline)) = self.grant().await else {
                self.state.send_replace(SessionState::Closed);
                return;
            };
            info!(lease = %lease, ttl_s = self.ttl_secs, "Session lease granted.");
            self.stats.granted.fetch_add(1, Ordering::Relaxed);
            if let Some(old) = previous.take() {
                // The old lease may still live on the server (we lost touch,
                // not etcd — e.g. etcd restarted with its data). Revoke it
                // before anyone sees the new lease, so that what hung off it
                // is gone before it is written again: a re-claim then finds
                // its old instance id or lock free.
                if revoke(&self.client, old).await.is_ok() {
                    debug!(lease = %old, "Stale session lease revoked.");
                }
            }
            if deadline <= self.clock.now() {
                // Answered (or the old lease revoked) only after the TTL
                // counted from the send had run out: nothing says this lease
                // still lives, so nobody gets to use it.
                debug!(lease = %lease, "Session lease granted too late to use; granting another.");
                previous = Some(lease);
                continue;
            }
            self.state
                .send_replace(SessionState::Alive { lease, deadline });
            match self.keep_alive(lease, deadline).await {
                Ended::Shutdown if self.dropped.load(Ordering::Relaxed) => {
                    info!(lease = %lease, "Session dropped; its lease is no longer renewed and ends after its TTL.");
                    self.state.send_replace(SessionState::Closed);
                    return;
                }
                Ended::Shutdown => {
                    match revoke(&self.client, lease).await {
                        Ok(()) => info!(lease = %lease, "Session lease revoked."),
                        Err(e) => {
                            warn!(lease = %lease, error = %e, "Could not revoke the session lease; it expires after its TTL.")
                        }
                    }
                    self.state.send_replace(SessionState::Closed);
                    return;
                }
                Ended::Lost(why) => {
                    warn!(lease = %lease, reason = why, "Session lease lost.");
                    self.stats.lost.fetch_add(1, Ordering::Relaxed);
                    self.state.send_replace(SessionState::Lost { lease });
                    previous = Some(lease);
                }
                Ended::Abandoned => {
                    warn!(lease = %lease, "Session lease given up; it expires after its TTL.");
                    self.stats.lost.fetch_add(1, Ordering::Relaxed);
                    self.state.send_replace(SessionState::Lost { lease });
                }
            }
        }
    }

    /// Grants a lease, retrying with backoff until etcd answers. `None` on
    /// shutdown.
    async fn grant(&self) -> Option<(LeaseId, BootInstant)> {
        let mut backoff = self.retry.backoff();
        loop {
            let sent = self.clock.now();
            let ttl = self.ttl_secs;
            let attempt = self.client.unary("lease grant", |mut c| async move {
                c.lease_grant(ttl, None).await
            });
            let result = tokio::select! {
                _ = self.cancel.cancelled() => return None,
                r = attempt => r,
            };
            match result {
                Ok(resp) => {
                    let granted = Duration::from_secs(resp.ttl().max(0) as u64);
                    return Some((LeaseId(resp.id()), sent + granted));
                }
                Err(e) => {
                    let wait = backoff.next_delay();
                    if e.unreachable().is_some() {
                        // Said once per endpoint by the client.
                        debug!(error = %e, retry_in = ?wait, "Could not grant a session lease.");
                    } else {
                        warn!(error = %e, retry_in = ?wait, "Could not grant a session lease.");
                    }
                    tokio::select! {
                        _ = self.cancel.cancelled() => return None,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn keep_alive(&self, lease: LeaseId, mut deadline: BootInstant) -> Ended {
        let ttl = Duration::from_secs(self.ttl_secs as u64);
        let interval = ttl / 3;
        // After a broken stream, try again soon (another endpoint may answer)
        // but not in a hot loop.
        let retry = (ttl / 10).clamp(Duration::from_millis(50), Duration::from_millis(500));
        let mut stream: Option<(
            etcd_client::LeaseKeeper,
            etcd_client::LeaseKeepAliveStream,
            Served,
        )> = None;
        // A keepalive unanswered this long: the member is taken to be
        // stopped or hung (it keeps the connection open and answers
        // nothing), and the stream moves to another endpoint — early
        // enough to leave an election's time before the deadline.
        let stuck_after = interval.min(self.client.request_timeout());
        // Unless the endpoint batches: etcd's grpc-proxy does not pass a
        // keepalive on but answers it when its own keepalive for the lease
        // comes back — every interval, on a 500 ms tick — so a healthy
        // proxy may take interval + 0.5 s. An endpoint that has answered
        // one of this stream's keepalives later than a member would is
        // given that long and a little more.
        let batched_after = interval + PROXY_SLACK.min(interval / 2);
        let mut batching = false;
        // Send times of unanswered keepalives, on both clocks: the boot
        // clock for the deadline, the monotonic one for the next ping.
        let mut in_flight: VecDeque<(BootInstant, Instant)> = VecDeque::new();
        // The first renewal is due one interval after the send that
        // `deadline` counts from, like every later one: at once when the
        // grant was answered late (etcd frozen, then thawed) and the
        // deadline is already nearer than a whole interval.
        let left = deadline.saturating_duration_since(self.clock.now());
        let mut next_ping = Instant::now() + left.saturating_sub(ttl - interval);
        loop {
            let served = stream.as_ref().map(|(_, _, served)| served.clone());
            let suspected = async {
                match &served {
                    Some(served) => served.suspected().await,
                    None => std::future::pending().await,
                }
            };
            let wait = if batching { batched_after } else { stuck_after };
            let stuck_at = in_flight.front().map(|(_, sent)| *sent + wait);
            let stuck = async {
                match stuck_at {
                    Some(at) => sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let message = async {
                match stream.as_mut() {
                    Some((_, s, _)) => s.message().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return Ended::Shutdown,
                _ = abandoned(self.abandon.clone(), lease) => return Ended::Abandoned,
                _ = suspected => {
                    debug!(lease = %lease, "The keepalive stream's endpoint is not answering; reopening elsewhere.");
                    stream = None;
                    in_flight.clear();
                    next_ping = Instant::now();
                }
                _ = stuck => {
                    self.stats.moved.fetch_add(1, Ordering::Relaxed);
                    if let Some(served) = &served {
                        served.not_answering("lease keepalive");
                    }
                    stream = None;
                    in_flight.clear();
                    next_ping = Instant::now();
                }
                _ = self.clock.sleep_until(deadline) => {
                    return Ended::Lost("no keepalive answer before the local deadline");
                }
                _ = sleep_until(next_ping) => {
                    if stream.is_none() {
                        // Opening the stream sends a keepalive and waits for
                        // its answer, so a successful open is a renewal.
                        let opened_at = Instant::now();
                        let opened_boot = self.clock.now();
                        match self.open(lease, deadline).await {
                            Ok(s) => {
                                stream = Some(s);
                                batching = opened_at.elapsed() > BATCHING_HINT;
                                in_flight.clear();
                                deadline = deadline.max(opened_boot + ttl);
                                self.stats.renewals.fetch_add(1, Ordering::Relaxed);
                                self.state.send_replace(SessionState::Alive { lease, deadline });
                                next_ping = opened_at + interval;
                            }
                            Err(Error::Request { source: etcd_client::Error::LeaseKeepAliveError(_), .. }) => {
                                return Ended::Lost("etcd says the lease has expired");
                            }
                            Err(e) => {
                                debug!(lease = %lease, error = %e, "Could not open the keepalive stream.");
                                next_ping = Instant::now() + retry;
                            }
                        }
                        continue;
                    }
                    let sent = Instant::now();
                    let sent_boot = self.clock.now();
                    let Some((keeper, _, _)) = stream.as_mut() else { continue };
                    if let Err(e) = keeper.keep_alive().await {
                        debug!(lease = %lease, error = %e, "Keepalive send failed.");
                        stream = None;
                        next_ping = Instant::now() + retry;
                        continue;
                    }
                    in_flight.push_back((sent_boot, sent));
                    // An unanswered ping is retried sooner than a regular one.
                    next_ping = if in_flight.len() > 1 { sent + retry } else { sent + interval };
                }
                msg = message => match msg {
                    Ok(Some(resp)) => {
                        let (sent_boot, sent) = in_flight
                            .pop_front()
                            .unwrap_or_else(|| (self.clock.now(), Instant::now()));
                        batching |= sent.elapsed() > BATCHING_HINT;
                        if resp.ttl() <= 0 {
                            return Ended::Lost("etcd says the lease has expired");
                        }
                        deadline = deadline.max(sent_boot + Duration::from_secs(resp.ttl() as u64));
                        self.stats.renewals.fetch_add(1, Ordering::Relaxed);
                        self.state.send_replace(SessionState::Alive { lease, deadline });
                        if in_flight.is_empty() {
                            // Counted from the answer, as etcd's own client
                            // does: a grpc-proxy renews on its own schedule,
                            // one interval after its last answer, and a ping
                            // sent just then is answered at once. Counted
                            // from the send, ours would drift against the
                            // proxy's and wait up to a whole interval for it.
                            next_ping = Instant::now() + interval;
                        }
                    }
                    Ok(None) | Err(_) => {
                        debug!(lease = %lease, "Keepalive stream closed; reopening.");
                        stream = None;
                        next_ping = Instant::now() + retry;
                    }
                },
            }
        }
    }

    async fn open(
        &self,
        lease: LeaseId,
        deadline: BootInstant,
    ) -> Result<
        (
            etcd_client::LeaseKeeper,
            etcd_client::LeaseKeepAliveStream,
            Served,
        ),
        Error,
    > {
        let budget = deadline
            .saturating_duration_since(self.clock.now())
            .min(self.client.request_timeout());
        let ((keeper, stream), served) = self
            .client
            .stream_within("lease keepalive", budget, |mut c| async move {
                c.lease_keep_alive(lease.0).await
            })
            .await?;
        Ok((keeper, stream, served))
    }
}

/// Returns once `lease` is given up; never if the session is gone.
async fn abandoned(mut abandon: watch::Receiver<Option<LeaseId>>, lease: LeaseId) {
    if abandon.wait_for(|a| *a == Some(lease)).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn revoke(client: &Client, lease: LeaseId) -> Result<(), Error> {
    client
        .unary("lease revoke", |mut c| async move {
            c.lease_revoke(lease.0).await
        })
        .await
        .map(|_| ())
}
