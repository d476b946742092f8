//! Many watches on one gRPC stream: a reader watches exactly the keys and
//! prefixes it read, whatever else the cluster holds or writes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchStream};
use tracing::{debug, warn};

use super::connection::Served;
use super::reads::MAX_MESSAGE;
use super::{Backoff, Change, Client, KeyValue, Range};

/// What a [`WatchSet`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchSetEvent {
    /// Changes to `range`, in order, through `revision` — every change to
    /// the range up to that revision has then been delivered (a watch
    /// delivers one range's changes in revision order, never a revision in
    /// part), so a copy of the range kept up to date with these is the
    /// range as it was at `revision`.
    Changed {
        /// The watched range.
        range: Range,
        /// etcd's revision of the changes.
        revision: i64,
        /// The changes, in order.
        changes: Vec<Change>,
    },
    /// Some changes may have been missed (a watch started below etcd's
    /// compaction point, or etcd cancelled one): read again whatever
    /// depends on the watched ranges.
    Lost,
}

#[derive(Debug, Clone, Copy)]
struct Watched {
    /// Changes after this revision are wanted (resume point).
    after: i64,
    /// The watch id on the current stream, once requested.
    id: Option<i64>,
}

#[derive(Debug)]
enum Request {
    Create(Range),
    Cancel(i64),
}

/// Watches a changing set of [`Range`]s on one stream.
///
/// Each range is watched from the revision after the one its reader read
/// ([`WatchSet::watch`]), so nothing between the read and the watch is
/// missed. After a disconnect every watch resumes where it stopped; only a
/// compacted resume point or a watch etcd cancels yields
/// [`WatchSetEvent::Lost`].
///
/// ```no_run
/// # async fn demo(client: coord::etcd::Client) -> Result<(), coord::etcd::Error> {
/// use coord::etcd::{Range, ReadSet, WatchSet};
/// let mut set = ReadSet::default();
/// set.add_prefix("/app/");
/// let view = client.read(&set, None).await?;
/// let mut watches = WatchSet::new(client);
/// watches.watch(Range::Prefix("/app/".into()), view.revision());
/// let _next = watches.next().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct WatchSet {
    client: Client,
    /// The stream, and the endpoint serving it (to move off one that
    /// stops answering).
    stream: Option<(WatchStream, Served)>,
    wanted: BTreeMap<Range, Watched>,
    /// Live watch ids of the current stream, as etcd assigned them.
    ids: HashMap<i64, Range>,
    pending: VecDeque<Request>,
    /// The create sent and not yet answered, with the revision it starts
    /// at. One at a time: a create's answer is the only thing that tells
    /// its watch id. etcd's grpc-proxy ignores an id the client asks for
    /// and numbers watches itself, and answers a create that joins a watch
    /// it already has before one it must open on etcd, so neither asked-for
    /// ids nor the order of answers can be trusted (etcd's own client also
    /// creates one watch at a time).
    creating: Option<(Range, i64)>,
    backoff: Backoff,
}

impl WatchSet {
    /// A set watching nothing yet.
    pub fn new(client: Client) -> Self {
        WatchSet {
            client,
            stream: None,
            wanted: BTreeMap::new(),
            ids: HashMap::new(),
            pending: VecDeque::new(),
            creating: None,
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(3)),
        }
    }

    /// Watches `range` for changes after revision `after` (what its reader
    /// last read). A range already watched from an earlier revision is
    /// left as it is; one watched only from a later revision is watched
    /// again from `after`.
    pub fn watch(&mut self, range: Range, after: i64) {
        match self.wanted.get_mut(&range) {
            Some(w) if w.after <= after => {}
            Some(w) => {
                w.after = after;
                if let Some(id) = w.id.take() {
                    self.ids.remove(&id);
                    self.pending.push_back(Request::Cancel(id));
                    self.pending.push_back(Request::Create(range));
                }
            }
            None => {
                self.wanted
                    .insert(range.clone(), Watched { after, id: None });
                if self.stream.is_some() {
                    self.pending.push_back(Request::Create(range));
                }
            }
        }
    }

    /// Stops watching every range for which `keep` is false.
    pub fn retain(&mut self, mut keep: impl FnMut(&Range) -> bool) {
        let pending = &mut self.pending;
        let ids = &mut self.ids;
        self.wanted.retain(|range, w| {
            let kept = keep(range);
            if !kept && let Some(id) = w.id {
                ids.remove(&id);
                pending.push_back(Request::Cancel(id));
            }
            kept
        });
        self.pending
            .retain(|r| !matches!(r, Request::Create(range) if !self.wanted.contains_key(range)));
    }

    /// How many ranges are watched.
    pub fn len(&self) -> usize {
        self.wanted.len()
    }

    /// Whether nothing is watched.
    pub fn is_empty(&self) -> bool {
        self.wanted.is_empty()
    }

    /// The next change. Waits forever while nothing is watched; retries
    /// etcd errors itself. Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> WatchSetEvent {
        loop {
            if self.wanted.is_empty() {
                self.stream = None;
                self.ids.clear();
                self.pending.clear();
                return std::future::pending().await;
            }
            if self.stream.is_none() {
                match self.open().await {
                    Ok(stream) => {
                        self.stream = Some(stream);
                        self.ids.clear();
                        self.creating = None;
                        self.pending = self
                            .wanted
                            .keys()
                            .map(|r| Request::Create(r.clone()))
                            .collect();
                        for w in self.wanted.values_mut() {
                            w.id = None;
                        }
                    }
                    Err(e) => {
                        let wait = self.backoff.next_delay();
                        debug!(error = %e, retry_in = ?wait, "Could not open the watch stream.");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
            }
            if let Err(e) = self.flush().await {
                debug!(error = %e, "Watch stream refused a request; reopening.");
                self.broken().await;
                continue;
            }
            let Some((stream, served)) = self.stream.as_mut() else {
                continue;
            };
            let served = served.clone();
            let message = tokio::select! {
                m = stream.message() => m,
                _ = served.suspected() => {
                    // A member stopped or hung keeps the connection open
                    // and sends nothing: resume from another endpoint.
                    debug!("The watch stream's endpoint is not answering; resuming elsewhere.");
                    self.stream = None;
                    continue;
                }
            };
            let resp = match message {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    debug!("Watch stream ended; resuming.");
                    self.broken().await;
                    continue;
                }
                Err(e) => {
                    debug!(error = %e, "Watch stream failed; resuming.");
                    self.broken().await;
                    continue;
                }
            };
            if resp.created() {
                self.created(resp.watch_id());
                if !resp.canceled() {
                    continue;
                }
            }
            let Some(range) = self.ids.get(&resp.watch_id()).cloned() else {
                // A watch cancelled since.
                continue;
            };
            if resp.compact_revision() > 0 || resp.canceled() {
                self.ids.remove(&resp.watch_id());
                if let Some(w) = self.wanted.get_mut(&range) {
                    w.id = None;
                    if resp.compact_revision() > 0 {
                        // Everything from the compaction point on is still
                        // there; what came before it is what was missed.
                        w.after = w.after.max(resp.compact_revision() - 1);
                        debug!(%range, compacted = resp.compact_revision(), "Watch fell behind a compaction.");
                    } else {
                        warn!(%range, reason = resp.cancel_reason(), "etcd cancelled a watch; reading again.");
                        tokio::time::sleep(self.backoff.next_delay()).await;
                    }
                }
                self.pending.push_back(Request::Create(range));
                return WatchSetEvent::Lost;
            }
            if resp.events().is_empty() {
                continue;
            }
            self.backoff.reset();
            let mut revision = 0;
            let changes = resp
                .events()
                .iter()
                .filter_map(|ev| {
                    let kv = ev.kv()?;
                    revision = revision.max(kv.mod_revision());
                    Some(match ev.event_type() {
                        EventType::Put => Change::Put(KeyValue::from_raw(kv)),
                        EventType::Delete => Change::Delete {
                            key: String::from_utf8_lossy(kv.key()).into_owned(),
                            revision: kv.mod_revision(),
                        },
                    })
                })
                .collect();
            if let Some(w) = self.wanted.get_mut(&range) {
                w.after = w.after.max(revision);
            }
            return WatchSetEvent::Changed {
                range,
                revision,
                changes,
            };
        }
    }

    /// etcd answered the create in flight with watch `id`.
    fn created(&mut self, id: i64) {
        let Some((range, start)) = self.creating.take() else {
            return;
        };
        match self.wanted.get_mut(&range) {
            // Wanted still, and from no earlier revision than the create
            // asked for: this is its watch.
            Some(w) if w.after + 1 >= start => {
                w.id = Some(id);
                self.ids.insert(id, range);
            }
            // Wanted from earlier since the create was sent: watch again.
            Some(_) => {
                self.pending.push_back(Request::Cancel(id));
                self.pending.push_back(Request::Create(range));
            }
            // Not wanted any more.
            None => self.pending.push_back(Request::Cancel(id)),
        }
    }

    async fn broken(&mut self) {
        self.stream = None;
        self.ids.clear();
        self.creating = None;
        self.pending.clear();
        tokio::time::sleep(self.backoff.next_delay()).await;
    }

    /// Opens a stream with no watch on it yet: watching a key nobody
    /// writes (etcd needs a first request), waiting for etcd to answer it,
    /// and cancelling it.
    async fn open(&mut self) -> Result<(WatchStream, Served), super::Error> {
        self.client
            .stream_within("watch", self.client.request_timeout(), |c| async move {
                let mut stream = c
                    .watch_client()
                    .max_decoding_message_size(MAX_MESSAGE)
                    .watch("\0coord-watch-open", None)
                    .await?;
                let Some(created) = stream.message().await? else {
                    return Err(etcd_client::Error::WatchError(
                        "the watch stream ended before its first answer".into(),
                    ));
                };
                stream.cancel(created.watch_id()).await?;
                Ok(stream)
            })
            .await
    }

    async fn flush(&mut self) -> Result<(), etcd_client::Error> {
        while let Some(request) = self.pending.front() {
            let Some((stream, _)) = self.stream.as_mut() else {
                return Ok(());
            };
            match request {
                Request::Cancel(id) => stream.cancel(*id).await?,
                Request::Create(range) => {
                    let Some(w) = self.wanted.get(range) else {
                        self.pending.pop_front();
                        continue;
                    };
                    if self.creating.is_some() {
                        // The next create waits for this one's answer.
                        return Ok(());
                    }
                    let start = w.after + 1;
                    // No `fragment`: a revision split over responses could
                    // not be applied whole (etcd-client does not say which
                    // response ends it), and the decode limit already takes
                    // what etcd sends unsplit.
                    let mut opts = WatchOptions::new().with_start_revision(start);
                    let key = match range {
                        Range::Key(k) => k.clone(),
                        Range::Prefix(p) => {
                            opts = opts.with_prefix();
                            p.clone()
                        }
                    };
                    stream.watch(key, Some(opts)).await?;
                    self.creating = Some((range.clone(), start));
                }
            }
            self.pending.pop_front();
        }
        Ok(())
    }
}
