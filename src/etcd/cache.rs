//! A read cache fed by one watcher per distinct prefix (or single key),
//! shared by every consumer of it.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, RwLock, Weak};

use imbl::OrdMap;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use super::watcher::WatchStats;
use super::{Change, Client, KeyValue, PrefixWatcher, Range, WatchEvent};

/// Changes under one prefix at one revision, as a subscriber sees them.
#[derive(Debug, Clone)]
pub enum CacheEvent {
    /// These keys changed (after a re-list: the difference to what was
    /// cached before).
    Changed {
        /// etcd's revision of the changes.
        revision: i64,
        /// The changed keys, in order.
        changes: Arc<[Change]>,
    },
    /// The subscriber fell behind and missed events: read the whole prefix
    /// again from the cache.
    Lagged,
}

/// A shared, watch-fed view of etcd.
///
/// ```no_run
/// # async fn demo(client: coord::etcd::Client) {
/// let cache = coord::etcd::Cache::new(client);
/// let mut sub = cache.subscribe("/coord/agents/");
/// sub.ready().await;                       // first full read done
/// let agents = sub.list();                 // served locally
/// let _next = sub.recv().await;            // wait for a change
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: Client,
    prefixes: Mutex<HashMap<Range, Weak<Entry>>>,
    /// Reconnects and re-lists of every watcher this cache ever ran.
    totals: Arc<WatchStats>,
}

/// The state of one watched prefix or key.
#[derive(Debug)]
struct Shared {
    range: Range,
    store: RwLock<Store>,
    ready: watch::Sender<bool>,
    events: broadcast::Sender<CacheEvent>,
    stats: Arc<WatchStats>,
}

/// Keys as they were at one revision: a watched prefix of the cache, or
/// what [`Client::read`] read. Cloning is O(1) (a persistent map), so a
/// reader takes a snapshot and reads at leisure while the watcher applies
/// newer changes: every read of one snapshot sees one revision.
#[derive(Debug, Clone, Default)]
pub struct CacheSnapshot {
    revision: i64,
    kvs: OrdMap<String, KeyValue>,
}

impl CacheSnapshot {
    /// A view of `kvs` as they were at `revision`.
    pub fn from_parts(revision: i64, kvs: impl IntoIterator<Item = KeyValue>) -> Self {
        CacheSnapshot {
            revision,
            kvs: kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect(),
        }
    }

    /// The revision the snapshot is at.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&KeyValue> {
        self.kvs.get(key)
    }

    /// Every key starting with `prefix`, in key order.
    pub fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a KeyValue> + 'a {
        self.kvs
            .range::<_, str>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv)
    }

    /// Adds what `other` read: both must be views of one revision (or
    /// `self` of none yet).
    pub fn merge(&mut self, other: CacheSnapshot) {
        if self.revision == 0 {
            self.revision = other.revision;
        }
        self.kvs.extend(other.kvs);
    }

    /// The part of the view inside `range`, at the same revision.
    pub fn slice(&self, range: &Range) -> CacheSnapshot {
        let kvs = match range {
            Range::Key(k) => self
                .kvs
                .get(k)
                .map(|kv| (k.clone(), kv.clone()))
                .into_iter()
                .collect(),
            Range::Prefix(p) => self
                .under(p)
                .map(|kv| (kv.key.clone(), kv.clone()))
                .collect(),
        };
        CacheSnapshot {
            revision: self.revision,
            kvs,
        }
    }

    /// Applies changes made at `revision` (a watch's, in order).
    pub fn apply(&mut self, revision: i64, changes: &[Change]) {
        for change in changes {
            match change {
                Change::Put(kv) => {
                    self.kvs.insert(kv.key.clone(), kv.clone());
                }
                Change::Delete { key, .. } => {
                    self.kvs.remove(key);
                }
            }
        }
        self.revision = self.revision.max(revision);
    }

    /// Every key, in key order.
    pub(crate) fn into_kvs(self) -> Vec<KeyValue> {
        self.kvs.into_iter().map(|(_, kv)| kv).collect()
    }

    /// How many keys the snapshot holds.
    pub fn len(&self) -> usize {
        self.kvs.len()
    }

    /// Whether the snapshot holds no key.
    pub fn is_empty(&self) -> bool {
        self.kvs.is_empty()
    }
}

type Store = CacheSnapshot;

#[derive(Debug)]
struct Entry {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        // The last subscriber is gone: stop watching this prefix.
        self.task.abort();
    }
}

impl Cache {
    /// A cache over `client`, watching nothing until subscribed to.
    pub fn new(client: Client) -> Self {
        Self::counted(client, Arc::default())
    }

    /// A cache whose watchers all count into `totals` (which may outlive
    /// it and be handed to the next one).
    pub fn counted(client: Client, totals: Arc<WatchStats>) -> Self {
        Cache {
            inner: Arc::new(Inner {
                client,
                prefixes: Mutex::default(),
                totals,
            }),
        }
    }

    /// Watch reconnects, re-lists and events over every prefix and key,
    /// past and present.
    pub fn stats(&self) -> Arc<WatchStats> {
        self.inner.totals.clone()
    }

    /// Subscribes to every key under `prefix`. The first subscriber starts
    /// the watch; later ones share it. The watch stops when the last
    /// subscription is dropped.
    pub fn subscribe(&self, prefix: &str) -> Subscription {
        self.subscribe_range(Range::Prefix(prefix.to_owned()))
    }

    /// Subscribes to exactly one key: unlike [`Cache::subscribe`] with the
    /// same text, it sees nothing of the keys that merely start with it
    /// (`.../web-10` for `.../web-1`), so others' writes wake no one here.
    pub fn subscribe_key(&self, key: &str) -> Subscription {
        self.subscribe_range(Range::Key(key.to_owned()))
    }

    /// Subscribes to `range`, sharing the watch of an equal one.
    pub fn subscribe_range(&self, range: Range) -> Subscription {
        let mut prefixes = self
            .inner
            .prefixes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = prefixes.get(&range).and_then(Weak::upgrade) {
            let events = entry.shared.events.subscribe();
            return Subscription { entry, events };
        }
        let watcher = PrefixWatcher::for_range(self.inner.client.clone(), range.clone())
            .with_totals(self.inner.totals.clone());
        let (events, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            range: range.clone(),
            store: RwLock::default(),
            ready: watch::Sender::new(false),
            events,
            stats: watcher.stats(),
        });
        let task = tokio::spawn(feed(watcher, shared.clone()));
        let entry = Arc::new(Entry { shared, task });
        prefixes.retain(|_, weak| weak.strong_count() > 0);
        prefixes.insert(range, Arc::downgrade(&entry));
        let events = entry.shared.events.subscribe();
        Subscription { entry, events }
    }

    /// How many distinct prefixes and keys are being watched (each is one
    /// etcd watcher).
    pub fn watched_prefixes(&self) -> usize {
        self.inner
            .prefixes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

/// A consumer's handle on one watched prefix.
#[derive(Debug)]
pub struct Subscription {
    entry: Arc<Entry>,
    events: broadcast::Receiver<CacheEvent>,
}

impl Subscription {
    /// The prefix subscribed to (the key, for [`Cache::subscribe_key`]).
    pub fn prefix(&self) -> &str {
        match &self.entry.shared.range {
            Range::Key(k) | Range::Prefix(k) => k,
        }
    }

    /// The prefix or key subscribed to.
    pub fn range(&self) -> &Range {
        &self.entry.shared.range
    }

    /// Whether the first full read of the prefix has completed.
    pub fn is_ready(&self) -> bool {
        *self.entry.shared.ready.borrow()
    }

    /// Waits for the first full read of the prefix.
    ///
    /// The future does not borrow the subscription, so it can be awaited
    /// alongside [`Subscription::recv`].
    pub fn ready(&self) -> impl Future<Output = ()> + Send + use<> {
        let mut rx = self.entry.shared.ready.subscribe();
        async move {
            let _ = rx.wait_for(|ready| *ready).await;
        }
    }

    /// The cached value of `key` (which must be under the prefix, or be
    /// the key subscribed to).
    pub fn get(&self, key: &str) -> Option<KeyValue> {
        self.store().kvs.get(key).cloned()
    }

    /// Every cached key under the prefix, in key order.
    pub fn list(&self) -> Vec<KeyValue> {
        self.store().kvs.values().cloned().collect()
    }

    /// The revision the cache has caught up to.
    pub fn revision(&self) -> i64 {
        self.store().revision
    }

    /// A consistent view of the prefix at one revision.
    pub fn snapshot(&self) -> CacheSnapshot {
        self.store().clone()
    }

    /// Watch stream reconnects and compaction re-lists so far.
    pub fn stats(&self) -> &WatchStats {
        &self.entry.shared.stats
    }

    /// The next change under the prefix.
    pub async fn recv(&mut self) -> CacheEvent {
        match self.events.recv().await {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(_)) => CacheEvent::Lagged,
            // The sender lives as long as this subscription's entry.
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }

    fn store(&self) -> std::sync::RwLockReadGuard<'_, Store> {
        self.entry
            .shared
            .store
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }
}

async fn feed(mut watcher: PrefixWatcher, shared: Arc<Shared>) {
    loop {
        let event = watcher.next().await;
        let (revision, changes) = {
            let mut store = shared.store.write().unwrap_or_else(|p| p.into_inner());
            match event {
                WatchEvent::Reset(snapshot) => {
                    let fresh: OrdMap<String, KeyValue> = snapshot
                        .kvs
                        .into_iter()
                        .map(|kv| (kv.key.clone(), kv))
                        .collect();
                    let changes = diff(&store.kvs, &fresh, snapshot.revision);
                    store.kvs = fresh;
                    store.revision = snapshot.revision;
                    (snapshot.revision, changes)
                }
                WatchEvent::Changes { revision, changes } => {
                    for change in &changes {
                        match change {
                            Change::Put(kv) => {
                                store.kvs.insert(kv.key.clone(), kv.clone());
                            }
                            Change::Delete { key, .. } => {
                                store.kvs.remove(key);
                            }
                        }
                    }
                    store.revision = revision;
                    (revision, changes)
                }
            }
        };
        shared.ready.send_replace(true);
        if !changes.is_empty() {
            // No receivers is fine: nobody is listening right now.
            let _ = shared.events.send(CacheEvent::Changed {
                revision,
                changes: changes.into(),
            });
        }
    }
}

/// What changed between two listings, as puts and deletes.
fn diff(
    old: &OrdMap<String, KeyValue>,
    new: &OrdMap<String, KeyValue>,
    revision: i64,
) -> Vec<Change> {
    let deleted = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .map(|key| Change::Delete {
            key: key.clone(),
            revision,
        });
    let put = new
        .iter()
        .filter(|(k, kv)| old.get(*k) != Some(kv))
        .map(|(_, kv)| Change::Put(kv.clone()));
    deleted.chain(put).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, rev: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: None,
        }
    }

    #[test]
    fn relist_diff_reports_deleted_changed_and_new_keys_only() {
        let old: OrdMap<_, _> = [kv("a", "1", 1), kv("b", "1", 2), kv("c", "1", 3)]
            .into_iter()
            .map(|kv| (kv.key.clone(), kv))
            .collect();
        let new: OrdMap<_, _> = [kv("b", "1", 2), kv("c", "2", 5), kv("d", "1", 6)]
            .into_iter()
            .map(|kv| (kv.key.clone(), kv))
            .collect();
        let changes = diff(&old, &new, 6);
        let keys: Vec<_> = changes.iter().map(|c| c.key().to_owned()).collect();
        assert_eq!(keys, ["a", "c", "d"]);
        assert!(matches!(changes[0], Change::Delete { .. }));
    }
}
