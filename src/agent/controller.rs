//! What the agent's controllers share: the [`Context`] they all take, and
//! one loop per item (a task, an instance-id pool, a service's checker),
//! started, cancelled and joined by [`Loops`] — never detached, so a stop
//! or a reload waits for what each loop holds to be let go. Retries are
//! paced by [`crate::etcd::Backoff`] everywhere.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::error;

use super::hooks::HookRunner;
use super::status::Status;
use crate::etcd::{Backoff, Cache, Client, SessionState};

/// What every controller of one connected agent takes. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Context {
    pub client: Client,
    pub cache: Cache,
    /// The session's state: the lease everything is held on — shown only
    /// while the agent holds its name on it (`presence::gate`), `Pending`
    /// otherwise.
    pub session: watch::Receiver<SessionState>,
    /// The current hooks (replaced by a reload that changes them).
    pub hooks: watch::Receiver<Arc<HookRunner>>,
    pub status: Status,
    /// Cancelled when the agent stops or reconnects.
    pub cancel: CancellationToken,
    pub namespace: String,
    pub agent: String,
}

/// When a failed local write (a file, the state directory) is tried again:
/// with backoff, from 200 ms to 10 s, until it works.
#[derive(Debug)]
pub struct RetryAt {
    backoff: Backoff,
    at: Option<Instant>,
}

impl Default for RetryAt {
    fn default() -> Self {
        RetryAt {
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(10)),
            at: None,
        }
    }
}

impl RetryAt {
    /// Records the outcome of a try: `false` schedules the next one.
    pub fn tried(&mut self, ok: bool) -> bool {
        if ok {
            self.at = None;
            self.backoff.reset();
        } else {
            self.at = Some(Instant::now() + self.backoff.next_delay());
        }
        ok
    }

    /// Completes when the next try is due; never while none is.
    pub async fn due(&self) {
        match self.at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }
}

/// One loop per key. A loop that replaces another for the same key (a
/// changed task, a pool removed and added again) starts only once the old
/// one has returned: what the old one held is let go first.
#[derive(Debug)]
pub struct Loops<K> {
    set: JoinSet<()>,
    running: BTreeMap<K, Entry>,
    /// Loops stopped and not yet returned, by key.
    stopping: BTreeMap<K, CancellationToken>,
    parent: CancellationToken,
}

#[derive(Debug)]
struct Entry {
    stop: CancellationToken,
    /// Cancelled when the loop has returned.
    done: CancellationToken,
}

impl<K: Ord + Clone + std::fmt::Debug> Loops<K> {
    /// Loops stopped with `parent` (each gets a child token).
    pub fn new(parent: &CancellationToken) -> Loops<K> {
        Loops {
            set: JoinSet::new(),
            running: BTreeMap::new(),
            stopping: BTreeMap::new(),
            parent: parent.clone(),
        }
    }

    /// Starts the loop `make(stop)` for `key`, after the one it replaces (if
    /// any) has been stopped and has returned.
    pub fn start<F>(&mut self, key: K, make: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.stop(&key);
        let before = self.stopping.remove(&key);
        let stop = self.parent.child_token();
        let done = CancellationToken::new();
        let finished = done.clone().drop_guard();
        let work = make(stop.clone());
        self.set.spawn(async move {
            let _finished = finished;
            if let Some(before) = before {
                before.cancelled().await;
            }
            work.await;
        });
        self.running.insert(key, Entry { stop, done });
        self.reap();
    }

    /// Stops the loop for `key`, if any (it returns in its own time; a
    /// loop started for the same key waits for it).
    pub fn stop(&mut self, key: &K) {
        if let Some(entry) = self.running.remove(key) {
            entry.stop.cancel();
            self.stopping.insert(key.clone(), entry.done);
        }
        self.reap();
    }

    /// Makes the loops follow `wanted`, with `current` the specs they run
    /// on: a loop whose spec is gone or changed is stopped, and one is
    /// started for each new or changed spec (after the old one returned).
    pub fn follow<S, F>(
        &mut self,
        current: &mut BTreeMap<K, S>,
        wanted: impl IntoIterator<Item = (K, S)>,
        mut make: impl FnMut(S, CancellationToken) -> F,
    ) where
        S: PartialEq + Clone,
        F: Future<Output = ()> + Send + 'static,
    {
        let wanted: BTreeMap<K, S> = wanted.into_iter().collect();
        current.retain(|key, spec| {
            let keep = wanted.get(key) == Some(spec);
            if !keep {
                self.stop(key);
            }
            keep
        });
        for (key, spec) in wanted {
            if current.contains_key(&key) {
                continue;
            }
            current.insert(key.clone(), spec.clone());
            self.start(key, |stop| make(spec, stop));
        }
    }

    /// Stops every loop and waits until all have returned.
    pub async fn shutdown(mut self) {
        for entry in self.running.values() {
            entry.stop.cancel();
        }
        while let Some(joined) = self.set.join_next().await {
            report(joined);
        }
    }

    /// Collects loops that have returned; forgets stopped ones that have.
    fn reap(&mut self) {
        while let Some(joined) = self.set.try_join_next() {
            report(joined);
        }
        self.stopping.retain(|_, done| !done.is_cancelled());
    }
}

fn report(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined
        && e.is_panic()
    {
        error!(error = %e, "A controller loop panicked; it is not restarted until the manifest changes.");
    }
}
