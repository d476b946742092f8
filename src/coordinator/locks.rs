//! Locks through a [`Coord`]: guards that know their lease.

use std::future::Future;
use std::time::Duration;

use super::{Coord, Lost, Tie};
use crate::etcd::{Committed, Condition, Error as EtcdError, KeyValue, LeaseId, Op};
use crate::lock::{self, Guard, Holder, LockError, Mode};

/// Locks under a [`Coord`]'s namespace (`<namespace>/locks/<name>/`, the
/// layout `etcdctl lock` and Go's `concurrency.Mutex` use), held on its
/// session lease.
///
/// ```no_run
/// # async fn demo(coord: coord::Coord) -> Result<(), coord::lock::LockError> {
/// let guard = coord.locks().lock("reports").await?;
/// println!("fencing token {}", guard.token());
/// tokio::select! {
///     why = guard.lost() => println!("lost the lock: {why}"),
///     _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
/// }
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Locks {
    coord: Coord,
}

impl Locks {
    pub(super) fn new(coord: Coord) -> Self {
        Locks { coord }
    }

    fn holder(&self) -> Holder {
        Holder {
            agent: self.coord.name().to_owned(),
            host: self.coord.host().to_owned(),
            pid: std::process::id(),
        }
    }

    async fn lease(&self, name: &str) -> Result<LeaseId, LockError> {
        self.coord.lease().await.map_err(|source| LockError::Etcd {
            name: name.to_owned(),
            source,
        })
    }

    fn guard(&self, guard: Guard) -> LockGuard {
        LockGuard {
            tie: self.coord.tie(guard.lease),
            guard,
            released: false,
        }
    }

    /// Takes the mutex `name`, waiting as long as it takes.
    pub async fn lock(&self, name: &str) -> Result<LockGuard, LockError> {
        self.acquire(name, Mode::Mutex).await
    }

    /// Takes `name` as a reader (shared with readers, not with writers).
    pub async fn read(&self, name: &str) -> Result<LockGuard, LockError> {
        self.acquire(name, Mode::Read).await
    }

    /// Takes `name` as a writer (alone, queued with readers in order).
    pub async fn write(&self, name: &str) -> Result<LockGuard, LockError> {
        self.acquire(name, Mode::Write).await
    }

    /// Takes `name` in `mode`, waiting as long as it takes. Dropping the
    /// future while it waits gives up our place in the queue.
    pub async fn acquire(&self, name: &str, mode: Mode) -> Result<LockGuard, LockError> {
        let lease = self.lease(name).await?;
        let ns = self.coord.namespace();
        let guard =
            lock::acquire(self.coord.client(), lease, ns, name, mode, &self.holder()).await?;
        Ok(self.guard(guard))
    }

    /// Takes `name` in `mode` within `timeout`, or gives up with
    /// [`LockError::Timeout`] leaving no key behind.
    pub async fn acquire_timeout(
        &self,
        name: &str,
        mode: Mode,
        timeout: Duration,
    ) -> Result<LockGuard, LockError> {
        let started = tokio::time::Instant::now();
        let lease = tokio::time::timeout(timeout, self.lease(name))
            .await
            .map_err(|_| LockError::Timeout {
                name: name.to_owned(),
                timeout,
            })??;
        let left = timeout.saturating_sub(started.elapsed());
        let ns = self.coord.namespace();
        let holder = self.holder();
        let client = self.coord.client();
        match lock::acquire_timeout(client, lease, ns, name, mode, &holder, left).await {
            Ok(guard) => Ok(self.guard(guard)),
            Err(LockError::Timeout { name, .. }) => Err(LockError::Timeout { name, timeout }),
            Err(e) => Err(e),
        }
    }

    /// Takes `name` only if that needs no waiting.
    pub async fn try_acquire(
        &self,
        name: &str,
        mode: Mode,
    ) -> Result<Option<LockGuard>, LockError> {
        let lease = self.lease(name).await?;
        let ns = self.coord.namespace();
        let taken =
            lock::try_acquire(self.coord.client(), lease, ns, name, mode, &self.holder()).await?;
        Ok(taken.map(|g| self.guard(g)))
    }

    /// The holders and waiters of `name`, in queue order.
    pub async fn queue(&self, name: &str) -> Result<Vec<KeyValue>, LockError> {
        lock::queue(self.coord.client(), self.coord.namespace(), name).await
    }
}

/// A held lock that knows its session lease.
///
/// [`LockGuard::lost`] resolves when the lock is gone from under us (the
/// lease expired or was revoked, or the holder key was deleted). A lock
/// is never taken again by itself after a loss: the holder must learn it
/// lost it. Dropping the guard releases it in the background;
/// [`LockGuard::release`] does so and waits.
#[derive(Debug)]
pub struct LockGuard {
    guard: Guard,
    tie: Tie,
    released: bool,
}

impl LockGuard {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.guard.name
    }

    /// The holder key.
    pub fn key(&self) -> &str {
        &self.guard.key
    }

    /// The fencing token: the holder key's create revision, larger for
    /// every new holder of the lock.
    pub fn token(&self) -> i64 {
        self.guard.token
    }

    /// How the lock is held.
    pub fn mode(&self) -> Mode {
        self.guard.mode
    }

    /// The session lease it is held on.
    pub fn lease(&self) -> LeaseId {
        self.guard.lease
    }

    /// The plain guard of [`crate::lock`].
    pub fn raw(&self) -> &Guard {
        &self.guard
    }

    /// Resolves when the lock is lost: its lease gone, or its key deleted.
    /// Owns what it needs, so it may outlive a borrow of the guard.
    pub fn lost(&self) -> impl Future<Output = Lost> + Send + use<> {
        self.tie.lost(self.guard.key.clone(), self.guard.token)
    }

    /// The condition that this guard still holds the lock, to add to a
    /// transaction (Go's `IsOwner()`): see [`crate::etcd::Client::commit`].
    pub fn fence(&self) -> Condition {
        self.guard.is_owner()
    }

    /// Applies `ops` in one transaction only while this guard holds the
    /// lock; `succeeded` is false (and nothing written) once it does not.
    pub async fn commit(&self, ops: &[Op]) -> Result<Committed, EtcdError> {
        self.tie.client.commit(&[self.fence()], ops).await
    }

    /// Whether the holder key is still there, this holding of it.
    pub async fn is_held(&self) -> Result<bool, LockError> {
        self.guard.is_held(&self.tie.client).await
    }

    /// Releases the lock and waits for etcd to say so.
    pub async fn release(mut self) -> Result<(), LockError> {
        self.released = true;
        self.guard.release(&self.tie.client).await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if !self.released {
            self.tie
                .delete_in_background(self.guard.key.clone(), self.guard.token);
        }
    }
}
