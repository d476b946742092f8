//! Distributed locks: mutex, semaphore and read/write, with fencing tokens.
//!
//! The mutex uses the key layout and algorithm of etcd's own concurrency
//! package, so coord, `etcdctl lock <namespace>/locks/<name>` and Go
//! services contend for the same lock correctly: every contender creates
//! `<namespace>/locks/<name>/<lease-hex>` on its session lease; the key with
//! the lowest create revision holds the lock; each waiter watches only the
//! key created just before its own (no thundering herd), and re-reads its
//! own key after waiting, since its lease may have expired meanwhile.
//!
//! The **fencing token** is the holder key's create revision: it grows with
//! every new holder of a lock name, so a resource that remembers the
//! highest token it has seen can refuse a stale holder.
//!
//! Read/write locks keep their keys under `…/<name>/read/` and
//! `…/<name>/write/`, queued in one order by create revision (FIFO, so a
//! writer is not starved by a stream of readers). Semaphores put up to
//! `limit` holders under the mutex layout.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::etcd::{Client, Condition, Error as EtcdError, KeyValue, LeaseId};

/// How a lock is shared. A closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One holder.
    Mutex,
    /// Up to this many holders.
    Semaphore(u32),
    /// Shared with other readers, excluded by writers.
    Read,
    /// Exclusive, queued with readers in arrival order.
    Write,
}

impl Mode {
    /// Whether holding a lock in this mode also gives what `wanted` asks
    /// for, so a holder may re-enter the same lock in that mode: a writer
    /// may read, a reader may not write; a mutex holder has the lock alone,
    /// so it has any semaphore place too; a read/write key is not a mutex
    /// key.
    pub fn covers(self, wanted: Mode) -> bool {
        match (self, wanted) {
            (held, wanted) if held == wanted => true,
            (Mode::Write, Mode::Read) => true,
            (Mode::Mutex, Mode::Semaphore(_)) => true,
            _ => false,
        }
    }
}

impl std::fmt::Display for Mode {
    /// `mutex`, `read`, `write` or `semaphore:<limit>`, as
    /// `COORD_LOCK_MODE` says it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Mutex => f.write_str("mutex"),
            Mode::Read => f.write_str("read"),
            Mode::Write => f.write_str("write"),
            Mode::Semaphore(n) => write!(f, "semaphore:{n}"),
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "mutex" => Ok(Mode::Mutex),
            "read" => Ok(Mode::Read),
            "write" => Ok(Mode::Write),
            other => other
                .strip_prefix("semaphore:")
                .and_then(|n| n.parse().ok())
                .map(Mode::Semaphore)
                .ok_or_else(|| format!("unknown lock mode `{other}`")),
        }
    }
}

/// Who holds a lock, stored as the holder key's value (etcd's own tools
/// ignore it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The agent (or `Coord` name) that holds it.
    pub agent: String,
    /// The host it runs on.
    pub host: String,
    /// The holding process.
    pub pid: u32,
}

/// Why a lock could not be taken or kept.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("failed to take lock `{name}`: {source}")]
    /// etcd could not be reached or refused the request.
    Etcd {
        /// The lock.
        name: String,
        #[source]
        /// What etcd said.
        source: EtcdError,
    },
    #[error("lost lock `{name}` while waiting for it: the session lease expired")]
    /// Our key went while we waited (the lease ended, or it was deleted).
    SessionExpired {
        /// The lock.
        name: String,
    },
    /// The name or mode cannot be a lock's.
    #[error("invalid lock `{name}`: {reason}")]
    Invalid {
        /// The lock.
        name: String,
        /// Why not.
        reason: String,
    },
    /// The lock was not ours within the time given; our place in its queue
    /// was given up (the queue key deleted).
    #[error("`{name}` was not ours within {}; gave up our place in its queue", humantime::format_duration(*timeout))]
    Timeout {
        /// The lock.
        name: String,
        /// How long it was given.
        timeout: Duration,
    },
}

/// Maps an etcd failure on lock `name` to a [`LockError`].
fn etcd_error(name: &str) -> impl Fn(EtcdError) -> LockError + Copy + '_ {
    move |source| LockError::Etcd {
        name: name.to_owned(),
        source,
    }
}

/// `<namespace>/locks/<name>/`: what `etcdctl lock <namespace>/locks/<name>`
/// contends on.
pub fn prefix(namespace: &str, name: &str) -> String {
    format!("{}/locks/{name}/", namespace.trim_end_matches('/'))
}

/// A held lock. Dropping it does not release it (that needs etcd); call
/// [`Guard::release`], or let the session lease go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    /// The lock's name.
    pub name: String,
    /// The holder key.
    pub key: String,
    /// The fencing token: the holder key's create revision.
    pub token: i64,
    /// How it is held.
    pub mode: Mode,
    /// The session lease the lock hangs off.
    pub lease: LeaseId,
}

impl Guard {
    /// Releases the lock by deleting the holder key — only this holding
    /// of it: a key the same lease created again later (a new holding,
    /// with a new token) is left alone.
    pub async fn release(&self, client: &Client) -> Result<(), LockError> {
        client
            .delete_if_created(&self.key, self.token)
            .await
            .map(|_| ())
            .map_err(etcd_error(&self.name))
    }

    /// How long the lock is guaranteed to last without another renewal:
    /// the lease's remaining TTL; `None` when the lease is gone.
    pub async fn remaining_ttl(
        &self,
        client: &Client,
    ) -> Result<Option<std::time::Duration>, LockError> {
        client
            .lease_ttl(self.lease)
            .await
            .map(|ttl| ttl.map(|s| std::time::Duration::from_secs(s.max(0) as u64)))
            .map_err(etcd_error(&self.name))
    }

    /// The condition that this holding still holds the lock — its holder
    /// key, created at its token — to add to a transaction so that the
    /// write happens only while the lock is ours (Go's `IsOwner()`).
    pub fn is_owner(&self) -> Condition {
        fence(&self.key, self.token)
    }

    /// Whether the holder key is still there (the lock is still held).
    pub async fn is_held(&self, client: &Client) -> Result<bool, LockError> {
        client
            .get(&self.key)
            .await
            .map(|kv| kv.is_some_and(|kv| kv.create_revision == self.token))
            .map_err(etcd_error(&self.name))
    }
}

/// The condition that holder key `key` with fencing token `token` still
/// holds its lock (see [`Guard::is_owner`]).
pub fn fence(key: &str, token: i64) -> Condition {
    Condition::CreatedAt {
        key: key.to_owned(),
        revision: token,
    }
}

/// The holder key of `lease` for `name` in `mode`.
pub fn holder_key(namespace: &str, name: &str, mode: Mode, lease: LeaseId) -> String {
    holder_key_in(&prefix(namespace, name), mode, lease)
}

/// The holder key of `lease` in the lock whose keys live under `base`.
fn holder_key_in(base: &str, mode: Mode, lease: LeaseId) -> String {
    match mode {
        Mode::Read => format!("{base}read/{:x}", lease.0),
        Mode::Write => format!("{base}write/{:x}", lease.0),
        Mode::Mutex | Mode::Semaphore(_) => format!("{base}{:x}", lease.0),
    }
}

/// The lease a holder key of lock `name` is on, if `key` is one (in any
/// mode) — exactly that lock, not one below or above it.
pub fn holder_lease(namespace: &str, name: &str, key: &str) -> Option<LeaseId> {
    let rest = key.strip_prefix(&prefix(namespace, name))?;
    let hex = rest
        .strip_prefix("read/")
        .or_else(|| rest.strip_prefix("write/"))
        .unwrap_or(rest);
    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    // `{:x}` of an i64 is its two's complement: read it back as such.
    u64::from_str_radix(hex, 16).ok().map(|l| LeaseId(l as i64))
}

/// Whether `key`, a holder key of lock `name` with fencing token `token`,
/// still holds it: it exists, with that create revision, on the lease its
/// name says.
pub async fn still_held(
    client: &Client,
    namespace: &str,
    name: &str,
    key: &str,
    token: i64,
) -> Result<bool, LockError> {
    let Some(lease) = holder_lease(namespace, name, key) else {
        return Ok(false);
    };
    client
        .get(key)
        .await
        .map(|kv| kv.is_some_and(|kv| kv.create_revision == token && kv.lease == Some(lease)))
        .map_err(etcd_error(name))
}

/// Whether a key queued before ours keeps us waiting in `mode` (`dir`:
/// where the lock's keys live).
fn blocks(mode: Mode, dir: &str, other: &KeyValue) -> bool {
    match mode {
        Mode::Read => other.key.starts_with(&format!("{dir}write/")),
        _ => true,
    }
}

/// Takes the lock, waiting as long as it takes (see [`acquire_timeout`]
/// to bound the wait). On error our key is deleted; if the future is
/// dropped while it waits (a `tokio::time::timeout` around it, a
/// `select!` that took another branch), the delete is sent from the
/// runtime in the background, so the queue does not keep a key nobody
/// waits on until the lease ends.
///
/// One acquire per lease and lock at a time: two would share the holder
/// key (etcd's own mutex does the same). [`Locker`] keeps to that.
///
/// ```no_run
/// # async fn demo(client: coord::etcd::Client, lease: coord::etcd::LeaseId) -> Result<(), coord::lock::LockError> {
/// use coord::lock::{Holder, Mode, acquire};
/// let me = Holder { agent: "web-01".into(), host: "web-01".into(), pid: std::process::id() };
/// let guard = acquire(&client, lease, "/coord", "reports", Mode::Mutex, &me).await?;
/// println!("fencing token {}", guard.token);
/// guard.release(&client).await?;
/// # Ok(()) }
/// ```
pub async fn acquire(
    client: &Client,
    lease: LeaseId,
    namespace: &str,
    name: &str,
    mode: Mode,
    holder: &Holder,
) -> Result<Guard, LockError> {
    let queued = Queued::default();
    let dir = prefix(namespace, name);
    acquire_queued(client, lease, &dir, name, mode, holder, &queued).await
}

/// `<namespace>/gates/<name>/`: where the holders of fleet gate `name`
/// queue (apart from the locks, so a gate never contends with a lock or
/// `etcdctl lock` of the same name).
pub fn gate_prefix(namespace: &str, name: &str) -> String {
    format!("{}/gates/{name}/", namespace.trim_end_matches('/'))
}

/// Takes one of the `limit` places of fleet gate `name` — a semaphore at
/// [`gate_prefix`], so at most `limit` holders across the fleet pass at
/// once — waiting as [`acquire`] does (dropped mid-wait, it leaves the
/// queue the same way). Release it with [`Guard::release`].
pub async fn acquire_gate(
    client: &Client,
    lease: LeaseId,
    namespace: &str,
    name: &str,
    limit: u32,
    holder: &Holder,
) -> Result<Guard, LockError> {
    let queued = Queued::default();
    let dir = gate_prefix(namespace, name);
    let mode = Mode::Semaphore(limit);
    acquire_queued(client, lease, &dir, name, mode, holder, &queued).await
}

/// Like [`acquire`], giving up after `timeout` with [`LockError::Timeout`]
/// — and then only once our queue key is deleted, so nothing of this
/// attempt is left in etcd. (Should the time run out while the key is
/// still being created, that create may land after the delete; the key
/// then goes with the lease.)
pub async fn acquire_timeout(
    client: &Client,
    lease: LeaseId,
    namespace: &str,
    name: &str,
    mode: Mode,
    holder: &Holder,
    timeout: Duration,
) -> Result<Guard, LockError> {
    let queued = Queued::default();
    let dir = prefix(namespace, name);
    let attempt = acquire_queued(client, lease, &dir, name, mode, holder, &queued);
    tokio::pin!(attempt);
    match tokio::time::timeout(timeout, &mut attempt).await {
        Ok(result) => result,
        Err(_) => {
            // Taken before `attempt` is dropped, so its own clean-up finds
            // nothing to do and the delete is awaited here instead.
            if let Some((key, token)) = queued.take() {
                client
                    .delete_if_created(&key, token)
                    .await
                    .map_err(etcd_error(name))?;
            }
            Err(LockError::Timeout {
                name: name.to_owned(),
                timeout,
            })
        }
    }
}

/// The queue key of an acquire in progress (key, create revision), until
/// it holds or has given up.
#[derive(Debug, Default)]
struct Queued(std::sync::Mutex<Option<(String, i64)>>);

impl Queued {
    fn set(&self, key: &str, token: i64) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some((key.to_owned(), token));
    }

    fn take(&self) -> Option<(String, i64)> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// Deletes the queue key of an acquire dropped while it waited.
struct Dequeue<'a> {
    client: &'a Client,
    queued: &'a Queued,
}

impl Drop for Dequeue<'_> {
    fn drop(&mut self) {
        let Some((key, token)) = self.queued.take() else {
            return;
        };
        // Nobody awaits a dropped future: the delete runs on its own.
        // Outside a runtime it cannot, and the key goes with the lease.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            runtime.spawn(async move {
                if let Err(e) = client.delete_if_created(&key, token).await {
                    tracing::debug!(key, error = %e, "Could not leave the lock queue; the key goes with the lease.");
                }
            });
        }
    }
}

async fn acquire_queued(
    client: &Client,
    lease: LeaseId,
    dir: &str,
    name: &str,
    mode: Mode,
    holder: &Holder,
    queued: &Queued,
) -> Result<Guard, LockError> {
    let _dequeue = Dequeue { client, queued };
    let guard = enqueue(client, lease, dir, name, mode, holder).await?;
    queued.set(&guard.key, guard.token);
    let waited = wait_turn(client, dir, name, &guard).await;
    // Held or failed: either way no longer a waiter to clean up after.
    queued.take();
    match waited {
        Ok(()) => Ok(guard),
        Err(e) => {
            let _ = guard.release(client).await;
            Err(e)
        }
    }
}

/// Takes the lock only if that needs no waiting; `None` otherwise (and no
/// key is left behind).
pub async fn try_acquire(
    client: &Client,
    lease: LeaseId,
    namespace: &str,
    name: &str,
    mode: Mode,
    holder: &Holder,
) -> Result<Option<Guard>, LockError> {
    let dir = prefix(namespace, name);
    let guard = enqueue(client, lease, &dir, name, mode, holder).await?;
    let etcd = etcd_error(name);
    let (ahead, _) = client
        .created_before(&dir, guard.token)
        .await
        .map_err(etcd)?;
    if may_hold(mode, &dir, &ahead) {
        Ok(Some(guard))
    } else {
        guard.release(client).await?;
        Ok(None)
    }
}

async fn enqueue(
    client: &Client,
    lease: LeaseId,
    dir: &str,
    name: &str,
    mode: Mode,
    holder: &Holder,
) -> Result<Guard, LockError> {
    if name.is_empty() || name.contains('/') && !name.split('/').all(|s| !s.is_empty()) {
        return Err(LockError::Invalid {
            name: name.to_owned(),
            reason: "a lock name is non-empty, without empty path segments".into(),
        });
    }
    if mode == Mode::Semaphore(0) {
        return Err(LockError::Invalid {
            name: name.to_owned(),
            reason: "a semaphore needs a limit of at least 1".into(),
        });
    }
    let key = holder_key_in(dir, mode, lease);
    let value = serde_json::to_vec(holder).unwrap_or_default();
    let (kv, _) = client
        .create_or_get(&key, value, lease)
        .await
        .map_err(etcd_error(name))?;
    Ok(Guard {
        name: name.to_owned(),
        key,
        token: kv.create_revision,
        mode,
        lease,
    })
}

/// Whether the keys queued before ours (oldest first) let us hold.
fn may_hold(mode: Mode, dir: &str, ahead: &[KeyValue]) -> bool {
    match mode {
        Mode::Semaphore(limit) => ahead.len() < limit as usize,
        _ => !ahead.iter().any(|kv| blocks(mode, dir, kv)),
    }
}

/// Waits until the keys ahead of ours allow us to hold, watching one key
/// at a time.
async fn wait_turn(client: &Client, dir: &str, name: &str, guard: &Guard) -> Result<(), LockError> {
    let etcd = etcd_error(name);
    let ours = |own: &Option<KeyValue>| {
        own.as_ref()
            .is_some_and(|kv| kv.create_revision == guard.token)
    };
    loop {
        // A serializable read decides as safely as a linearizable one once
        // it shows our key (see `Client::queue_at`), and skips a round with
        // the leader: it is the one read between a predecessor's going and
        // our command's start.
        let (mut ahead, mut own, mut read_at) = client
            .queue_at(dir, guard.token, &guard.key, true)
            .await
            .map_err(etcd)?;
        if !ours(&own) {
            // The member may be behind our key's creation: only the
            // cluster's own answer tells that our key is gone.
            (ahead, own, read_at) = client
                .queue_at(dir, guard.token, &guard.key, false)
                .await
                .map_err(etcd)?;
        }
        // Our lease may have expired while we waited: then the key is gone
        // and the lock is not ours.
        if !ours(&own) {
            return Err(LockError::SessionExpired {
                name: name.to_owned(),
            });
        }
        if may_hold(guard.mode, dir, &ahead) {
            return Ok(());
        }
        match guard.mode {
            // Any holder's going frees a place: wait for the first delete.
            Mode::Semaphore(_) => client
                .wait_prefix_delete(dir, read_at)
                .await
                .map_err(etcd)?,
            // A mutex or writer waits for the key just before its own, a
            // reader for the last writer before it.
            mode => {
                if let Some(kv) = ahead.iter().rev().find(|kv| blocks(mode, dir, kv)) {
                    client
                        .wait_deleted(&kv.key, kv.create_revision, read_at)
                        .await
                        .map_err(etcd)?;
                }
            }
        }
    }
}

/// The holders and waiters of a lock, in queue order.
pub async fn queue(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Vec<KeyValue>, LockError> {
    client
        .created_before(&prefix(namespace, name), i64::MAX)
        .await
        .map(|(kvs, _)| kvs)
        .map_err(etcd_error(name))
}

/// Locks taken by one owner (one session lease), reentrant: taking a lock
/// the owner already holds only counts up, and it is released when the
/// count comes back to zero. One holder key per owner and lock, as etcd's
/// own mutex has.
///
/// Each lock name has its own slot: waiting in etcd for one lock holds up
/// only other calls for that same name (which must learn whether it was
/// taken), never a lock or unlock of another name.
///
/// ```no_run
/// # async fn demo(client: coord::etcd::Client, lease: coord::etcd::LeaseId) -> Result<(), coord::lock::LockError> {
/// use coord::lock::{Holder, Locker, Mode};
/// let me = Holder { agent: "web-01".into(), host: "web-01".into(), pid: std::process::id() };
/// let locker = Locker::new(client, lease, "/coord", me);
/// let outer = locker.lock("reports", Mode::Mutex).await?;
/// let inner = locker.lock("reports", Mode::Mutex).await?; // re-entered, same token
/// assert_eq!(outer.token, inner.token);
/// locker.unlock("reports").await?; // still held
/// locker.unlock("reports").await?; // released
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Locker {
    client: Client,
    lease: LeaseId,
    namespace: String,
    holder: Holder,
    held: std::sync::Mutex<HashMap<String, Slot>>,
}

/// One lock name's holding: the guard and how many times it is held.
type Slot = Arc<tokio::sync::Mutex<Option<(Guard, usize)>>>;

impl Locker {
    /// A locker for `holder`, taking locks under `namespace` on `lease`.
    pub fn new(client: Client, lease: LeaseId, namespace: &str, holder: Holder) -> Self {
        Locker {
            client,
            lease,
            namespace: namespace.to_owned(),
            holder,
            held: std::sync::Mutex::default(),
        }
    }

    fn slot(&self, name: &str) -> Slot {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Forgets `name`'s slot when it is empty and nobody else uses it.
    fn tidy(&self, name: &str, slot: &Slot) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        // The map's reference and the caller's: nobody waits on it.
        if Arc::strong_count(slot) == 2 && slot.try_lock().is_ok_and(|s| s.is_none()) {
            held.remove(name);
        }
    }

    /// Takes `name` (waiting as [`acquire`] does), or counts up if this
    /// owner holds it already.
    pub async fn lock(&self, name: &str, mode: Mode) -> Result<Guard, LockError> {
        self.lock_within(name, mode, None).await
    }

    /// Like [`Locker::lock`], giving up after `timeout` as
    /// [`acquire_timeout`] does (leaving no key behind).
    pub async fn lock_timeout(
        &self,
        name: &str,
        mode: Mode,
        timeout: Duration,
    ) -> Result<Guard, LockError> {
        self.lock_within(name, mode, Some(timeout)).await
    }

    async fn lock_within(
        &self,
        name: &str,
        mode: Mode,
        timeout: Option<Duration>,
    ) -> Result<Guard, LockError> {
        let slot = self.slot(name);
        let taken = {
            let mut held = slot.lock().await;
            if let Some((guard, count)) = held.as_mut() {
                *count += 1;
                return Ok(guard.clone());
            }
            let (c, ns, h) = (&self.client, self.namespace.as_str(), &self.holder);
            let taken = match timeout {
                None => acquire(c, self.lease, ns, name, mode, h).await,
                Some(t) => acquire_timeout(c, self.lease, ns, name, mode, h, t).await,
            };
            if let Ok(guard) = &taken {
                *held = Some((guard.clone(), 1));
            }
            taken
        };
        if taken.is_err() {
            self.tidy(name, &slot);
        }
        taken
    }

    /// Counts down; releases the lock when no holding is left. Unlocking
    /// a lock this owner does not hold does nothing.
    pub async fn unlock(&self, name: &str) -> Result<(), LockError> {
        let Some(slot) = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
        else {
            return Ok(());
        };
        let released = {
            let mut held = slot.lock().await;
            let Some((guard, count)) = held.as_mut() else {
                return Ok(());
            };
            *count -= 1;
            if *count > 0 {
                return Ok(());
            }
            let guard = guard.clone();
            *held = None;
            guard.release(&self.client).await
        };
        self.tidy(name, &slot);
        released
    }

    /// How many times this owner holds `name` (0 when it does not).
    pub async fn count(&self, name: &str) -> usize {
        let slot = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned();
        match slot {
            Some(slot) => slot.lock().await.as_ref().map_or(0, |(_, c)| *c),
            None => 0,
        }
    }
}
