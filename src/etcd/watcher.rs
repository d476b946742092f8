//! Get-then-watch over one prefix (or one key), resuming after disconnects
//! and re-listing after compaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchStream};
use tracing::{debug, info, warn};

use super::connection::Served;
use super::{Backoff, Client, KeyValue, Range, ReadSet, Snapshot};

/// One change to one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The key as written.
    Put(KeyValue),
    /// The key was deleted at `revision`.
    Delete {
        /// The key.
        key: String,
        /// The revision of the delete.
        revision: i64,
    },
}

impl Change {
    /// The key changed.
    pub fn key(&self) -> &str {
        match self {
            Change::Put(kv) => &kv.key,
            Change::Delete { key, .. } => key,
        }
    }
}

/// What a [`PrefixWatcher`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A complete listing of the prefix: the first read, or a re-list after
    /// the watch fell behind a compaction. Replaces everything known before.
    Reset(Snapshot),
    /// Changes at `revision`, in order.
    Changes {
        /// etcd's revision of the changes.
        revision: i64,
        /// The changes, in order.
        changes: Vec<Change>,
    },
}

/// Counters a watcher keeps about its own health (the library exports no
/// metrics itself: whoever monitors reads these).
#[derive(Debug, Default)]
pub struct WatchStats {
    reconnects: AtomicU64,
    relists: AtomicU64,
    events: AtomicU64,
}

impl WatchStats {
    /// Watch streams opened again after an error, a disconnect or a
    /// re-list.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Full re-lists after the watch fell behind a compaction (or saw
    /// etcd's revision go backwards).
    pub fn relists(&self) -> u64 {
        self.relists.load(Ordering::Relaxed)
    }

    /// Changed keys received from etcd's watch streams (each put or
    /// delete, not counting first reads and re-lists): the work others'
    /// writes cost this watcher.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
}

/// Follows every key under a prefix, or one key, without ever missing a
/// change.
///
/// It reads the prefix (or key), then watches from the next revision; after a
/// disconnect it resumes from the last revision it saw, so nothing is missed
/// or repeated; when that revision has been compacted away it reads the
/// prefix again and yields a [`WatchEvent::Reset`].
#[derive(Debug)]
pub struct PrefixWatcher {
    client: Client,
    range: Range,
    /// Last revision fully seen; `None` until the first listing.
    revision: Option<i64>,
    /// The stream and the endpoint it is on.
    stream: Option<(WatchStream, Served)>,
    /// Whether a watch stream was ever opened (later opens are reconnects).
    opened: bool,
    backoff: Backoff,
    stats: Arc<WatchStats>,
    /// Counted as well as `stats`: totals over many watchers (a cache's).
    totals: Option<Arc<WatchStats>>,
}

impl PrefixWatcher {
    /// A watcher of `prefix`, reading nothing until first polled.
    pub fn new(client: Client, prefix: impl Into<String>) -> Self {
        Self::for_range(client, Range::Prefix(prefix.into()))
    }

    /// A watcher of `range`: a prefix, or exactly one key (which, unlike a
    /// prefix of the same text, sees nothing of `key-10` when it is `key-1`).
    pub fn for_range(client: Client, range: Range) -> Self {
        PrefixWatcher {
            client,
            range,
            revision: None,
            stream: None,
            opened: false,
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(3)),
            stats: Arc::default(),
            totals: None,
        }
    }

    /// Also counts into `totals`, shared with other watchers.
    pub fn with_totals(mut self, totals: Arc<WatchStats>) -> Self {
        self.totals = Some(totals);
        self
    }

    fn count(&self, counter: fn(&WatchStats) -> &AtomicU64) {
        self.count_n(counter, 1);
    }

    fn count_n(&self, counter: fn(&WatchStats) -> &AtomicU64, n: u64) {
        counter(&self.stats).fetch_add(n, Ordering::Relaxed);
        if let Some(t) = &self.totals {
            counter(t).fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The prefix watched (or the key, for a one-key watcher).
    pub fn prefix(&self) -> &str {
        match &self.range {
            Range::Key(k) | Range::Prefix(k) => k,
        }
    }

    /// The range watched.
    pub fn range(&self) -> &Range {
        &self.range
    }

    /// Reads the whole range at one revision.
    async fn list(&self) -> Result<Snapshot, super::Error> {
        let mut set = ReadSet::default();
        match &self.range {
            Range::Key(k) => set.add_key(k),
            Range::Prefix(p) => set.add_prefix(p),
        };
        let view = self.client.read(&set, None).await?;
        Ok(Snapshot {
            revision: view.revision(),
            kvs: view.into_kvs(),
        })
    }

    /// Its reconnect and re-list counters.
    pub fn stats(&self) -> Arc<WatchStats> {
        self.stats.clone()
    }

    /// The next event. Retries forever on errors: it returns only with
    /// something to apply. Cancel-safe only between events (drop the watcher
    /// to stop it).
    pub async fn next(&mut self) -> WatchEvent {
        loop {
            let Some(revision) = self.revision else {
                match self.list().await {
                    Ok(snapshot) => {
                        self.revision = Some(snapshot.revision);
                        self.stream = None;
                        self.backoff.reset();
                        return WatchEvent::Reset(snapshot);
                    }
                    Err(e) => {
                        let wait = self.backoff.next_delay();
                        if e.unreachable().is_some() {
                            // Said once per endpoint by the client.
                            debug!(range = %self.range, error = %e, retry_in = ?wait, "Could not list the watched range.");
                        } else {
                            warn!(range = %self.range, error = %e, retry_in = ?wait, "Could not list the watched range.");
                        }
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
            };
            let stream = match self.stream.as_mut() {
                Some(s) => s,
                None => match self.open(revision + 1).await {
                    Ok(s) => {
                        if self.opened {
                            self.count(|s| &s.reconnects);
                        }
                        self.opened = true;
                        self.stream.insert(s)
                    }
                    Err(e) => {
                        let wait = self.backoff.next_delay();
                        debug!(range = %self.range, error = %e, retry_in = ?wait, "Could not open the watch.");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                },
            };
            let (stream, served) = (&mut stream.0, stream.1.clone());
            let message = tokio::select! {
                m = stream.message() => m,
                _ = served.suspected() => {
                    // A member stopped or hung keeps the connection open
                    // and sends nothing: resume from another endpoint.
                    debug!(range = %self.range, "The watch's endpoint is not answering; resuming elsewhere.");
                    self.stream = None;
                    continue;
                }
            };
            match message {
                Ok(Some(resp)) => {
                    if resp.compact_revision() > 0 {
                        info!(range = %self.range, from = revision + 1, compacted = resp.compact_revision(), "Watch fell behind a compaction; listing again.");
                        self.count(|s| &s.relists);
                        self.revision = None;
                        self.stream = None;
                        continue;
                    }
                    let current = resp.header().map_or(0, |h| h.revision());
                    if current > 0 && current < revision {
                        // The store went backwards: the cluster was restored
                        // from a backup or replaced. A watch from our revision
                        // would wait for a future that never comes while the
                        // cache shows keys that are gone, so list again.
                        warn!(range = %self.range, seen = revision, now = current, "etcd's revision went backwards (cluster restored or replaced); listing again.");
                        self.count(|s| &s.relists);
                        self.revision = None;
                        self.stream = None;
                        continue;
                    }
                    if resp.canceled() {
                        debug!(range = %self.range, reason = resp.cancel_reason(), "Watch canceled by etcd; reopening.");
                        self.reconnect().await;
                        continue;
                    }
                    self.backoff.reset();
                    if resp.events().is_empty() {
                        // Creation or progress notice. The creation header's
                        // revision may run ahead of events still to come, so
                        // it is not a safe resume point.
                        continue;
                    }
                    let mut last = revision;
                    let changes = resp
                        .events()
                        .iter()
                        .filter_map(|ev| {
                            let kv = ev.kv()?;
                            last = last.max(kv.mod_revision());
                            Some(match ev.event_type() {
                                EventType::Put => Change::Put(KeyValue::from_raw(kv)),
                                EventType::Delete => Change::Delete {
                                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                                    revision: kv.mod_revision(),
                                },
                            })
                        })
                        .collect::<Vec<_>>();
                    self.revision = Some(last);
                    self.count_n(|s| &s.events, changes.len() as u64);
                    return WatchEvent::Changes {
                        revision: last,
                        changes,
                    };
                }
                Ok(None) => {
                    debug!(range = %self.range, "Watch stream ended; resuming.");
                    self.reconnect().await;
                }
                Err(e) => {
                    debug!(range = %self.range, error = %e, "Watch stream failed; resuming.");
                    self.reconnect().await;
                }
            }
        }
    }

    async fn reconnect(&mut self) {
        self.stream = None;
        tokio::time::sleep(self.backoff.next_delay()).await;
    }

    async fn open(&self, start: i64) -> Result<(WatchStream, Served), super::Error> {
        let (key, prefix) = match &self.range {
            Range::Key(k) => (k.as_str(), false),
            Range::Prefix(p) => (p.as_str(), true),
        };
        self.client
            .stream_within("watch", self.client.request_timeout(), |c| async move {
                let mut options = WatchOptions::new()
                    .with_start_revision(start)
                    .with_progress_notify();
                if prefix {
                    options = options.with_prefix();
                }
                c.watch_client()
                    .max_decoding_message_size(super::reads::MAX_MESSAGE)
                    .watch(key, Some(options))
                    .await
            })
            .await
    }
}
