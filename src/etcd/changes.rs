//! A watch that reports each change with the value before it.

use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchStream};
use tracing::debug;

use super::{Backoff, Client, Error, KeyValue};

/// One change to one key, with the key before and after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueChange {
    /// The key.
    pub key: String,
    /// The revision of the change.
    pub revision: i64,
    /// The key before the change: `None` if it did not exist (or if that
    /// revision was already compacted away when etcd sent the event).
    pub prev: Option<KeyValue>,
    /// The key after the change: `None` for a delete.
    pub kv: Option<KeyValue>,
}

/// Follows one key, or every key under a prefix, from a given revision,
/// resuming after a disconnect from the last revision seen so that nothing
/// is missed or repeated.
///
/// Unlike [`super::PrefixWatcher`] it keeps no listing and never re-lists:
/// when the revision to resume from has been compacted away the changes in
/// between are lost, and [`ChangeWatcher::next`] says so with
/// [`Error::Compacted`].
#[derive(Debug)]
pub struct ChangeWatcher {
    client: Client,
    key: String,
    prefix: bool,
    /// The first revision not yet reported.
    next: i64,
    stream: Option<WatchStream>,
    backoff: Backoff,
}

impl ChangeWatcher {
    /// Watches `key` (every key under it if `prefix`) from revision `start`.
    pub fn new(client: Client, key: impl Into<String>, prefix: bool, start: i64) -> Self {
        ChangeWatcher {
            client,
            key: key.into(),
            prefix,
            next: start.max(1),
            stream: None,
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(3)),
        }
    }

    /// The next changes, in revision order. Transient errors are retried
    /// forever; the only error is [`Error::Compacted`].
    pub async fn next(&mut self) -> Result<Vec<ValueChange>, Error> {
        loop {
            let stream = match self.stream.as_mut() {
                Some(s) => s,
                None => match self.open().await {
                    Ok(s) => self.stream.insert(s),
                    Err(e) => {
                        let wait = self.backoff.next_delay();
                        debug!(key = %self.key, error = %e, retry_in = ?wait, "Could not open the watch.");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                },
            };
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.compact_revision() > 0 {
                        self.stream = None;
                        return Err(Error::Compacted {
                            key: self.key.clone(),
                            requested: self.next,
                            compacted: resp.compact_revision(),
                        });
                    }
                    if resp.canceled() {
                        debug!(key = %self.key, reason = resp.cancel_reason(), "Watch canceled by etcd; reopening.");
                        self.reconnect().await;
                        continue;
                    }
                    self.backoff.reset();
                    let changes: Vec<ValueChange> = resp
                        .events()
                        .iter()
                        .filter_map(|ev| {
                            let kv = ev.kv()?;
                            let prev = ev.prev_kv().map(KeyValue::from_raw);
                            Some(ValueChange {
                                key: String::from_utf8_lossy(kv.key()).into_owned(),
                                revision: kv.mod_revision(),
                                prev,
                                kv: match ev.event_type() {
                                    EventType::Put => Some(KeyValue::from_raw(kv)),
                                    EventType::Delete => None,
                                },
                            })
                        })
                        .collect();
                    if let Some(last) = changes.iter().map(|c| c.revision).max() {
                        self.next = last + 1;
                        return Ok(changes);
                    }
                }
                Ok(None) => {
                    debug!(key = %self.key, "Watch stream ended; resuming.");
                    self.reconnect().await;
                }
                Err(e) => {
                    debug!(key = %self.key, error = %e, "Watch stream failed; resuming.");
                    self.reconnect().await;
                }
            }
        }
    }

    async fn reconnect(&mut self) {
        self.stream = None;
        tokio::time::sleep(self.backoff.next_delay()).await;
    }

    async fn open(&self) -> Result<WatchStream, Error> {
        let key = self.key.as_str();
        let mut options = WatchOptions::new()
            .with_start_revision(self.next)
            .with_prev_key();
        if self.prefix {
            options = options.with_prefix();
        }
        self.client
            .unary("watch", |mut c| {
                let options = options.clone();
                async move { c.watch(key, Some(options)).await }
            })
            .await
    }
}
