//! Reads at a past revision and writes guarded by a key's version: the raw
//! operations behind compare-and-set and key history.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, TxnOp, TxnOpResponse, WatchOptions};

use super::{Client, Error, KeyValue, Op};

/// gRPC's OUT_OF_RANGE, which etcd answers for a read at a compacted (or
/// future) revision.
const GRPC_OUT_OF_RANGE: i32 = 11;

/// What a guarded write ([`Client::put_guarded`], [`Client::delete_guarded`])
/// did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guarded {
    /// The write happened at `revision`. `kv` is the key as written (for a
    /// put) or as it was before (for a delete; `None` if it did not exist).
    Applied {
        /// The revision of the write.
        revision: i64,
        /// The key as written (put) or as it was (delete).
        kv: Option<KeyValue>,
    },
    /// The key was not at the expected version; nothing was written.
    /// `current` is the key as it is (`None` if it does not exist).
    Refused {
        /// The key as it is (`None`: absent).
        current: Option<KeyValue>,
    },
}

/// A condition a transaction holds to: what makes a write conditional
/// (on a lock still being held, on a key's version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// `key` exists as the incarnation created at `revision`. With a lock's
    /// holder key and fencing token this is Go's `Mutex.IsOwner()`: the
    /// lock is still held by that holding.
    CreatedAt {
        /// The key.
        key: String,
        /// Its create revision.
        revision: i64,
    },
    /// `key` is at `version` (0: it does not exist).
    Version {
        /// The key.
        key: String,
        /// Its version.
        version: i64,
    },
}

impl Condition {
    /// The key the condition looks at.
    pub fn key(&self) -> &str {
        match self {
            Condition::CreatedAt { key, .. } | Condition::Version { key, .. } => key,
        }
    }

    fn compare(&self) -> Compare {
        match self {
            Condition::CreatedAt { key, revision } => {
                Compare::create_revision(key.as_str(), CompareOp::Equal, *revision)
            }
            Condition::Version { key, version } => {
                Compare::version(key.as_str(), CompareOp::Equal, *version)
            }
        }
    }

    /// Whether it holds for `kv` as read (`None`: absent).
    pub fn holds_for(&self, kv: Option<&KeyValue>) -> bool {
        match self {
            Condition::CreatedAt { revision, .. } => {
                kv.is_some_and(|kv| kv.create_revision == *revision)
            }
            Condition::Version { version, .. } => kv.map_or(0, |kv| kv.version) == *version,
        }
    }
}

/// What [`Client::commit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Whether every condition held, so the writes were applied.
    pub succeeded: bool,
    /// etcd's revision after the transaction.
    pub revision: i64,
}

/// What [`Client::put_if`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conditional {
    /// Written at `revision`; `kv` is the key as written.
    Applied {
        /// The revision of the write.
        revision: i64,
        /// The key as written.
        kv: Option<KeyValue>,
    },
    /// A condition did not hold; nothing was written.
    Refused {
        /// The key as it is (`None`: absent).
        current: Option<KeyValue>,
        /// The conditions that did not hold, as given.
        failed: Vec<Condition>,
    },
}

impl Client {
    /// Reads `key` as it was at `revision` (0: as it is now). A read below
    /// the compaction point fails with [`Error::Compacted`], naming the
    /// oldest revision etcd still keeps.
    pub async fn get_at(&self, key: &str, revision: i64) -> Result<Option<KeyValue>, Error> {
        let result = self
            .unary("get at revision", |mut c| async move {
                c.get(key, Some(GetOptions::new().with_revision(revision)))
                    .await
            })
            .await;
        match result {
            Ok(resp) => Ok(resp.kvs().first().map(KeyValue::from_raw)),
            Err(Error::Request { source, .. }) if is_compacted(&source) => {
                let compacted = self.compact_revision(key, revision).await?;
                Err(Error::Compacted {
                    key: key.to_owned(),
                    requested: revision,
                    compacted,
                })
            }
            Err(Error::Request { source, .. }) if is_future(&source) => {
                Err(Error::FutureRevision {
                    key: key.to_owned(),
                    requested: revision,
                    current: self.current_revision().await?,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// The store's current revision.
    pub async fn current_revision(&self) -> Result<i64, Error> {
        let resp = self
            .unary("current revision", |mut c| async move {
                c.get("\0", Some(GetOptions::new().with_count_only())).await
            })
            .await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Writes `value` at `key` if its version is `expected` (0: the key
    /// does not exist), or unconditionally when `expected` is `None`. The
    /// compare, the write and the read of the result are one transaction.
    pub async fn put_guarded(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        expected: Option<i64>,
    ) -> Result<Guarded, Error> {
        let value = value.into();
        let resp = self
            .unary("guarded put", |mut c| {
                let txn = etcd_client::Txn::new()
                    .when(guard(key, expected))
                    .and_then([TxnOp::put(key, value.clone(), None), TxnOp::get(key, None)])
                    .or_else([TxnOp::get(key, None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut kv = None;
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(get) = op {
                kv = get.kvs().first().map(KeyValue::from_raw);
            }
        }
        Ok(if resp.succeeded() {
            Guarded::Applied { revision, kv }
        } else {
            Guarded::Refused { current: kv }
        })
    }

    /// Applies `then` in one transaction only if every condition in
    /// `when` holds (a lock guard's [`Condition::CreatedAt`] fences it).
    pub async fn commit(&self, when: &[Condition], then: &[Op]) -> Result<Committed, Error> {
        let resp = self
            .unary("conditional transaction", |mut c| {
                let txn = etcd_client::Txn::new()
                    .when(when.iter().map(Condition::compare).collect::<Vec<_>>())
                    .and_then(then.iter().map(op).collect::<Vec<_>>());
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(Committed {
            succeeded: resp.succeeded(),
            revision: resp.header().map_or(0, |h| h.revision()),
        })
    }

    /// Writes `value` at `key` only if every condition holds; when one
    /// does not, says which (read in the same transaction).
    pub async fn put_if(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        when: &[Condition],
    ) -> Result<Conditional, Error> {
        let value = value.into();
        let resp = self
            .unary("conditional put", |mut c| {
                let mut otherwise = vec![TxnOp::get(key, None)];
                otherwise.extend(when.iter().map(|w| TxnOp::get(w.key(), None)));
                let txn = etcd_client::Txn::new()
                    .when(when.iter().map(Condition::compare).collect::<Vec<_>>())
                    .and_then([TxnOp::put(key, value.clone(), None), TxnOp::get(key, None)])
                    .or_else(otherwise);
                async move { c.txn(txn).await }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let succeeded = resp.succeeded();
        let mut reads = resp.op_responses().into_iter().filter_map(|op| match op {
            TxnOpResponse::Get(get) => Some(get.kvs().first().map(KeyValue::from_raw)),
            _ => None,
        });
        if succeeded {
            return Ok(Conditional::Applied {
                revision,
                kv: reads.next().flatten(),
            });
        }
        let current = reads.next().flatten();
        let failed = when
            .iter()
            .zip(reads)
            .filter(|(w, kv)| !w.holds_for(kv.as_ref()))
            .map(|(w, _)| w.clone())
            .collect();
        Ok(Conditional::Refused { current, failed })
    }

    /// Deletes `key` if its version is `expected` (0: succeeds, deleting
    /// nothing, if the key does not exist), or unconditionally when
    /// `expected` is `None`.
    pub async fn delete_guarded(&self, key: &str, expected: Option<i64>) -> Result<Guarded, Error> {
        let resp = self
            .unary("guarded delete", |mut c| {
                let txn = etcd_client::Txn::new()
                    .when(guard(key, expected))
                    .and_then([TxnOp::delete(
                        key,
                        Some(etcd_client::DeleteOptions::new().with_prev_key()),
                    )])
                    .or_else([TxnOp::get(key, None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut kv = None;
        for op in resp.op_responses() {
            match op {
                TxnOpResponse::Get(get) => kv = get.kvs().first().map(KeyValue::from_raw),
                TxnOpResponse::Delete(del) => kv = del.prev_kvs().first().map(KeyValue::from_raw),
                _ => {}
            }
        }
        Ok(if resp.succeeded() {
            Guarded::Applied { revision, kv }
        } else {
            Guarded::Refused { current: kv }
        })
    }

    /// The oldest revision etcd keeps, learnt by watching `key` from
    /// `revision`: a range read refused as compacted does not say where the
    /// compaction point is, but a watch that starts below it does.
    async fn compact_revision(&self, key: &str, revision: i64) -> Result<i64, Error> {
        let start = revision.max(1);
        self.unary_within(
            "find compaction point",
            self.request_timeout().min(Duration::from_secs(5)),
            |mut c| async move {
                let mut stream = c
                    .watch(key, Some(WatchOptions::new().with_start_revision(start)))
                    .await?;
                loop {
                    match stream.message().await? {
                        Some(resp) if resp.compact_revision() > 0 => {
                            return Ok(resp.compact_revision());
                        }
                        Some(resp) if resp.canceled() || !resp.events().is_empty() => {
                            // Not compacted after all (a compaction can only
                            // move forward, so this is a race with a restored
                            // store): the requested revision is still there.
                            return Ok(start);
                        }
                        Some(_) => {}
                        None => {
                            return Err(etcd_client::Error::WatchError(
                                "watch ended before saying where the compaction point is".into(),
                            ));
                        }
                    }
                }
            },
        )
        .await
    }
}

fn op(op: &Op) -> TxnOp {
    match op {
        Op::Put { key, value, lease } => TxnOp::put(
            key.as_str(),
            value.clone(),
            lease.map(|l| etcd_client::PutOptions::new().with_lease(l.0)),
        ),
        Op::Delete { key } => TxnOp::delete(key.as_str(), None),
    }
}

fn guard(key: &str, expected: Option<i64>) -> Vec<Compare> {
    // etcd reports version 0 for a key that does not exist, so "absent" is
    // just "version == 0".
    expected
        .map(|v| Compare::version(key, CompareOp::Equal, v))
        .into_iter()
        .collect()
}

/// etcd's "required revision is a future revision".
fn is_future(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            i32::from(status.code()) == GRPC_OUT_OF_RANGE && status.message().contains("future")
        }
        _ => false,
    }
}

pub(crate) fn is_compacted(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            i32::from(status.code()) == GRPC_OUT_OF_RANGE && status.message().contains("compacted")
        }
        _ => false,
    }
}
