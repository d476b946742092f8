//! The config center: typed values in etcd, compare-and-set by version,
//! watches with the old and new value, and a key's history read back
//! through etcd's MVCC.
//!
//! Keys are used as given (no namespace): config lives wherever its owners
//! put it, and templates read any key.
//!
//! # How values are typed
//!
//! Values are JSON, except plain strings, which are stored as they are so
//! that other tools (etcdctl, templates) see `debug`, not `"debug"`:
//!
//! ```
//! use coord::config::{decode, encode};
//!
//! assert_eq!(encode(&"debug").expect("encodes"), b"debug");
//! assert_eq!(encode(&8080).expect("encodes"), b"8080");
//! assert_eq!(encode(&vec!["a", "b"]).expect("encodes"), br#"["a","b"]"#);
//!
//! // A `String` gets the raw text when the value is not a JSON string…
//! let s: String = decode("/k", b"debug").expect("decodes");
//! assert_eq!(s, "debug");
//! let s: String = decode("/k", b"8080").expect("decodes");
//! assert_eq!(s, "8080");
//! // …and the string itself when it is one.
//! let s: String = decode("/k", br#""quoted""#).expect("decodes");
//! assert_eq!(s, "quoted");
//! // Anything else is parsed as JSON.
//! let port: u16 = decode("/k", b"8080").expect("decodes");
//! assert_eq!(port, 8080);
//! assert!(decode::<u16>("/k", b"eighty").is_err());
//! ```
//!
//! The rule behind it: a value is parsed as JSON for the type asked; when
//! that fails, it is offered to the type as a string of its raw text (so a
//! type that deserialises from a string, like `String` or `IpAddr`, gets the
//! text). One consequence: a string that is itself valid JSON text, like
//! `"x"` with its quotes, reads back without them.
//!
//! # Time
//!
//! etcd keeps no wall-clock time for a revision, and the history here is
//! read from etcd alone, so it has revisions and versions but no times.

mod schema;

use std::borrow::Cow;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::etcd::{self, ChangeWatcher, Client, Guarded, KeyValue};

pub use schema::{Schema, Violation};

/// What went wrong with a config operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key does not exist.
    #[error("`{key}` does not exist")]
    /// The key does not exist.
    NotFound {
        /// The key.
        key: String,
    },
    /// The key had no value at that revision (it did not exist then).
    #[error("`{key}` had no value at revision {revision}")]
    AbsentAt {
        /// The key.
        key: String,
        /// The revision asked for.
        revision: i64,
    },
    /// A guarded write was refused: the key is not at the expected version.
    /// Nothing was written. `current` is 0 when the key does not exist.
    #[error("refused to {op} `{key}`: {}", conflict(*expected, *current))]
    VersionConflict {
        /// What was refused (`set`, `delete`).
        op: &'static str,
        /// The key.
        key: String,
        /// The version the write expected (0: absent).
        expected: i64,
        /// The version found (0: absent).
        current: i64,
    },
    /// The revision asked for is older than etcd's compaction point.
    #[error(
        "revision {revision} of `{key}` is compacted away (the oldest revision etcd keeps is {compacted})"
    )]
    Compacted {
        /// The key.
        key: String,
        /// The revision asked for.
        revision: i64,
        /// The oldest revision etcd keeps.
        compacted: i64,
    },
    /// The revision asked for is newer than any etcd has written.
    #[error(
        "`{key}` has no value at revision {revision}: that revision is in the future (etcd is at revision {current}; `coord kv history {key}` lists the key's revisions)"
    )]
    FutureRevision {
        /// The key.
        key: String,
        /// The revision asked for.
        revision: i64,
        /// etcd's current revision.
        current: i64,
    },
    /// etcd could not be reached or refused the request.
    #[error("etcd failed on `{key}`: {source}")]
    Unavailable {
        /// The key.
        key: String,
        #[source]
        /// What etcd said.
        source: etcd::Error,
    },
    /// The value cannot be read or written as asked (bad JSON, wrong type).
    #[error("invalid value for `{key}`: {reason}")]
    Invalid {
        /// The key.
        key: String,
        /// What is wrong with the value.
        reason: String,
    },
    /// A fenced write was refused: the lock holder key it was fenced on
    /// is gone (or is another holding of it). Nothing was written.
    #[error(
        "refused to set `{key}`: the lock is no longer held by `{holder_key}` (fencing token {token}); nothing was written"
    )]
    Fenced {
        /// The key that was not written.
        key: String,
        /// The lock holder key the write was fenced on.
        holder_key: String,
        /// The fencing token it was fenced on.
        token: i64,
    },
    /// The value does not match its JSON Schema; nothing was written.
    #[error(
        "the value for `{key}` does not match the schema: {}",
        schema::list(violations)
    )]
    SchemaViolation {
        /// The key.
        key: String,
        /// Where the value breaks the schema.
        violations: Vec<Violation>,
    },
}

fn conflict(expected: i64, current: i64) -> String {
    let wanted = match expected {
        0 => "expected it not to exist".to_owned(),
        v => format!("expected version {v}"),
    };
    let found = match current {
        0 => "it does not exist".to_owned(),
        v => format!("it is at version {v}"),
    };
    format!("{wanted}, but {found}")
}

fn unavailable(key: &str) -> impl FnOnce(etcd::Error) -> Error + '_ {
    move |e| match e {
        etcd::Error::Compacted {
            requested,
            compacted,
            ..
        } => Error::Compacted {
            key: key.to_owned(),
            revision: requested,
            compacted,
        },
        etcd::Error::FutureRevision {
            requested, current, ..
        } => Error::FutureRevision {
            key: key.to_owned(),
            revision: requested,
            current,
        },
        source => Error::Unavailable {
            key: key.to_owned(),
            source,
        },
    }
}

/// A key's value as stored, with its version and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The stored bytes.
    pub raw: Vec<u8>,
    /// 1 when created, +1 on each write; it restarts after a delete.
    pub version: i64,
    /// The revision of the write that gave this value.
    pub mod_revision: i64,
    /// The revision that created the key (this incarnation of it).
    pub create_revision: i64,
}

impl Entry {
    fn from_kv(kv: KeyValue) -> Entry {
        Entry {
            key: kv.key,
            raw: kv.value,
            version: kv.version,
            mod_revision: kv.mod_revision,
            create_revision: kv.create_revision,
        }
    }

    /// The value, typed by the rule in the [module docs](self).
    pub fn value<T: DeserializeOwned>(&self) -> Result<T, Error> {
        decode(&self.key, &self.raw)
    }

    /// The value as text (lossy for bytes that are not UTF-8).
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.raw)
    }

    /// The value as JSON: parsed if it is JSON, else a JSON string of its
    /// text. What `--json` output and schemas see.
    pub fn json(&self) -> serde_json::Value {
        to_json(&self.raw)
    }
}

/// A typed value with its version and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The value, typed.
    pub value: T,
    /// 1 when created, +1 on each write.
    pub version: i64,
    /// The revision of the write that gave this value.
    pub mod_revision: i64,
    /// The revision that created the key.
    pub create_revision: i64,
}

/// The outcome of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The revision of the write.
    pub revision: i64,
    /// The key's version after it.
    pub version: i64,
}

/// What a write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Write whatever is there.
    Any,
    /// Write only if the key is at this version (0: does not exist).
    Version(i64),
}

impl Expect {
    /// Only if the key does not exist yet.
    pub const ABSENT: Expect = Expect::Version(0);

    fn version(self) -> Option<i64> {
        match self {
            Expect::Any => None,
            Expect::Version(v) => Some(v),
        }
    }
}

/// Serialises a value: JSON, except a plain string, which is its own text.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    match serde_json::to_value(value)? {
        serde_json::Value::String(s) => Ok(s.into_bytes()),
        other => serde_json::to_vec(&other),
    }
}

/// Stored bytes as JSON: parsed if they are JSON, else a JSON string of
/// their text (lossy for bytes that are not UTF-8).
pub fn to_json(raw: &[u8]) -> serde_json::Value {
    serde_json::from_slice(raw)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(raw).into_owned()))
}

/// Parses a stored value for `key` (named in the error): JSON for `T`,
/// else `T` from the raw text as a string. See the [module docs](self).
pub fn decode<T: DeserializeOwned>(key: &str, raw: &[u8]) -> Result<T, Error> {
    match serde_json::from_slice::<T>(raw) {
        Ok(v) => Ok(v),
        Err(json_error) => {
            let text = std::str::from_utf8(raw).map_err(|e| Error::Invalid {
                key: key.to_owned(),
                reason: format!("not UTF-8: {e}"),
            })?;
            serde_json::from_value(serde_json::Value::String(text.to_owned())).map_err(|_| {
                Error::Invalid {
                    key: key.to_owned(),
                    reason: json_error.to_string(),
                }
            })
        }
    }
}

/// Reads `key` with its version; [`Error::NotFound`] if it does not exist.
pub async fn get_entry(client: &Client, key: &str) -> Result<Entry, Error> {
    client
        .get(key)
        .await
        .map_err(unavailable(key))?
        .map(Entry::from_kv)
        .ok_or_else(|| Error::NotFound {
            key: key.to_owned(),
        })
}

/// Reads and parses `key`.
pub async fn get<T: DeserializeOwned>(client: &Client, key: &str) -> Result<T, Error> {
    get_entry(client, key).await?.value()
}

/// Reads and parses `key`, with the version to pass to
/// [`compare_and_set`].
pub async fn get_versioned<T: DeserializeOwned>(
    client: &Client,
    key: &str,
) -> Result<Versioned<T>, Error> {
    let entry = get_entry(client, key).await?;
    Ok(Versioned {
        value: entry.value()?,
        version: entry.version,
        mod_revision: entry.mod_revision,
        create_revision: entry.create_revision,
    })
}

/// Every key under `prefix`, in key order, read at one revision.
pub async fn list(client: &Client, prefix: &str) -> Result<Vec<Entry>, Error> {
    let snapshot = client
        .get_prefix(prefix)
        .await
        .map_err(unavailable(prefix))?;
    Ok(snapshot.kvs.into_iter().map(Entry::from_kv).collect())
}

/// Writes `value` at `key`, whatever is there.
pub async fn set<T: Serialize + ?Sized>(
    client: &Client,
    key: &str,
    value: &T,
) -> Result<Written, Error> {
    set_raw(client, key, &encoded(key, value)?, Expect::Any).await
}

/// Writes `value` at `key` only if it is at version `expected`; otherwise
/// [`Error::VersionConflict`] names the current version and nothing is
/// written.
pub async fn compare_and_set<T: Serialize + ?Sized>(
    client: &Client,
    key: &str,
    value: &T,
    expected: i64,
) -> Result<Written, Error> {
    set_raw(
        client,
        key,
        &encoded(key, value)?,
        Expect::Version(expected),
    )
    .await
}

/// Writes `value` at `key` only if the key does not exist.
pub async fn create<T: Serialize + ?Sized>(
    client: &Client,
    key: &str,
    value: &T,
) -> Result<Written, Error> {
    set_raw(client, key, &encoded(key, value)?, Expect::ABSENT).await
}

fn encoded<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<Vec<u8>, Error> {
    encode(value).map_err(|e| Error::Invalid {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// Writes bytes as they are, if `expect` holds.
pub async fn set_raw(
    client: &Client,
    key: &str,
    raw: &[u8],
    expect: Expect,
) -> Result<Written, Error> {
    let outcome = client
        .put_guarded(key, raw, expect.version())
        .await
        .map_err(unavailable(key))?;
    match outcome {
        Guarded::Applied { revision, kv } => Ok(Written {
            revision,
            version: kv.map_or(0, |kv| kv.version),
        }),
        Guarded::Refused { current } => Err(refused("set", key, expect, current)),
    }
}

/// Writes bytes at `key` only while `fence` holds (a lock's
/// [`crate::lock::Guard::is_owner`]) and `expect` does: one transaction,
/// so a holder that lost its lock — lease gone, key deleted, lock taken
/// by someone else — never writes. [`Error::Fenced`] when the fence did
/// not hold, [`Error::VersionConflict`] when only the version did not.
pub async fn set_fenced(
    client: &Client,
    key: &str,
    raw: &[u8],
    expect: Expect,
    fence: &etcd::Condition,
) -> Result<Written, Error> {
    let mut when = vec![fence.clone()];
    if let Some(version) = expect.version() {
        when.push(etcd::Condition::Version {
            key: key.to_owned(),
            version,
        });
    }
    match client
        .put_if(key, raw, &when)
        .await
        .map_err(unavailable(key))?
    {
        etcd::Conditional::Applied { revision, kv } => Ok(Written {
            revision,
            version: kv.map_or(0, |kv| kv.version),
        }),
        etcd::Conditional::Refused { current, failed } => {
            if failed.contains(fence) {
                let (holder_key, token) = match fence {
                    etcd::Condition::CreatedAt { key, revision } => (key.clone(), *revision),
                    other => (other.key().to_owned(), 0),
                };
                Err(Error::Fenced {
                    key: key.to_owned(),
                    holder_key,
                    token,
                })
            } else {
                Err(refused("set", key, expect, current))
            }
        }
    }
}

fn refused(op: &'static str, key: &str, expect: Expect, current: Option<KeyValue>) -> Error {
    Error::VersionConflict {
        op,
        key: key.to_owned(),
        expected: expect.version().unwrap_or(0),
        current: current.map_or(0, |kv| kv.version),
    }
}

/// Deletes `key` if `expect` holds. Returns whether there was a key to
/// delete.
pub async fn delete(client: &Client, key: &str, expect: Expect) -> Result<bool, Error> {
    let outcome = client
        .delete_guarded(key, expect.version())
        .await
        .map_err(unavailable(key))?;
    match outcome {
        Guarded::Applied { kv, .. } => Ok(kv.is_some()),
        Guarded::Refused { current } => Err(refused("delete", key, expect, current)),
    }
}

/// A key's values, newest first, read back through etcd's MVCC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// The key.
    pub key: String,
    /// The current value first, then each earlier one, back to the write
    /// that created the key (or as far as `limit` or compaction allowed).
    pub entries: Vec<Entry>,
    /// `Some(oldest revision kept)` when earlier values exist but were
    /// compacted away: `entries` is then known to be incomplete.
    pub truncated_by_compaction: Option<i64>,
}

/// The values `key` has had since it was last created, newest first, at
/// most `limit` of them.
///
/// Each step reads the key at the revision just before the value it has,
/// until the write that created it. Earlier incarnations (before a delete)
/// are not followed: a read just before `create_revision` finds nothing. A
/// key that does not exist now has no history here ([`Error::NotFound`]).
/// When a step falls below etcd's compaction point the entries found so far
/// are returned with `truncated_by_compaction` set, never as if complete.
pub async fn history(client: &Client, key: &str, limit: Option<usize>) -> Result<History, Error> {
    let limit = limit.unwrap_or(usize::MAX);
    let mut entries = vec![get_entry(client, key).await?];
    let mut truncated_by_compaction = None;
    while entries.len() < limit {
        let last = entries.last().expect("starts with the current value");
        if last.mod_revision <= last.create_revision {
            break;
        }
        match client.get_at(key, last.mod_revision - 1).await {
            Ok(Some(kv)) => entries.push(Entry::from_kv(kv)),
            // Cannot happen between create_revision and now, unless the
            // store was replaced underneath; stop rather than guess.
            Ok(None) => break,
            Err(etcd::Error::Compacted { compacted, .. }) => {
                truncated_by_compaction = Some(compacted);
                break;
            }
            Err(e) => return Err(unavailable(key)(e)),
        }
    }
    Ok(History {
        key: key.to_owned(),
        entries,
        truncated_by_compaction,
    })
}

/// `key` as it was at `revision`.
pub async fn get_at(client: &Client, key: &str, revision: i64) -> Result<Entry, Error> {
    client
        .get_at(key, revision)
        .await
        .map_err(unavailable(key))?
        .map(Entry::from_kv)
        .ok_or_else(|| Error::AbsentAt {
            key: key.to_owned(),
            revision,
        })
}

/// Writes back the value `key` had at `revision`, as a compare-and-set:
/// against `expected` if given (the version the caller saw, say in
/// [`history`]), else against the version read just before the write. If
/// the key moved in between, [`Error::VersionConflict`] and nothing is
/// written.
pub async fn rollback(
    client: &Client,
    key: &str,
    revision: i64,
    expected: Option<i64>,
) -> Result<Written, Error> {
    let old = get_at(client, key, revision).await?;
    let expected = match expected {
        Some(v) => v,
        None => match client.get(key).await.map_err(unavailable(key))? {
            Some(kv) => kv.version,
            None => 0,
        },
    };
    set_raw(client, key, &old.raw, Expect::Version(expected)).await
}

/// One change seen by a [`Watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The key.
    pub key: String,
    /// The revision of the change.
    pub revision: i64,
    /// Before the change: `None` if the key did not exist.
    pub old: Option<Entry>,
    /// After the change: `None` if it was deleted.
    pub new: Option<Entry>,
}

/// What a change did to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// The key was created (version 1).
    Created,
    /// An existing key got a new value.
    Updated,
    /// The key was deleted.
    Deleted,
}

/// One change with its values typed, as [`watch_typed`] yields it.
#[derive(Debug, Clone, PartialEq)]
pub struct TypedChange<T> {
    /// The key.
    pub key: String,
    /// The revision of the change.
    pub revision: i64,
    /// Created, updated or deleted.
    pub kind: ChangeKind,
    /// The value before (`None` if there was none, or if that revision was
    /// compacted away before etcd sent the change).
    pub old: Option<T>,
    /// The value after (`None` for a delete).
    pub new: Option<T>,
    /// The key's version after the change (0 after a delete).
    pub version: i64,
}

impl Change {
    /// Created, updated or deleted.
    pub fn kind(&self) -> ChangeKind {
        match &self.new {
            None => ChangeKind::Deleted,
            Some(e) if e.version == 1 => ChangeKind::Created,
            Some(_) => ChangeKind::Updated,
        }
    }

    /// The change with its values parsed as `T`.
    pub fn typed<T: DeserializeOwned>(&self) -> Result<TypedChange<T>, Error> {
        Ok(TypedChange {
            key: self.key.clone(),
            revision: self.revision,
            kind: self.kind(),
            old: self.old.as_ref().map(Entry::value).transpose()?,
            new: self.new.as_ref().map(Entry::value).transpose()?,
            version: self.new.as_ref().map_or(0, |e| e.version),
        })
    }
}

/// Changes to one key or a prefix, from the moment the watch was made.
#[derive(Debug)]
pub struct Watch {
    inner: ChangeWatcher,
    key: String,
}

/// Watches `key` from now on.
pub async fn watch(client: &Client, key: &str) -> Result<Watch, Error> {
    start_watch(client, key, false).await
}

/// Watches every key under `prefix` from now on.
pub async fn watch_prefix(client: &Client, prefix: &str) -> Result<Watch, Error> {
    start_watch(client, prefix, true).await
}

async fn start_watch(client: &Client, key: &str, prefix: bool) -> Result<Watch, Error> {
    let now = client.current_revision().await.map_err(unavailable(key))?;
    Ok(Watch {
        inner: ChangeWatcher::new(client.clone(), key, prefix, now + 1),
        key: key.to_owned(),
    })
}

/// Typed changes to `key` (every key under it if `prefix`) from now on,
/// as a `Stream`, one change per item, in order. A value that does not
/// parse as `T` is an [`Error::Invalid`] item and the stream goes on.
/// Compaction is reported, never hidden: when the watch fell behind one
/// (changes were lost) it yields [`Error::Compacted`] and ends — read the
/// key again and watch anew.
pub async fn watch_typed<T: DeserializeOwned + Send + 'static>(
    client: &Client,
    key: &str,
    prefix: bool,
) -> Result<impl futures_core::Stream<Item = Result<TypedChange<T>, Error>> + Send + use<T>, Error>
{
    let watch = start_watch(client, key, prefix).await?;
    let changes = watch.into_stream();
    Ok(futures_util::StreamExt::map(changes, |c| {
        c.and_then(|c| c.typed::<T>())
    }))
}

impl Watch {
    /// The changes one at a time, as a `Stream`; after an error (only
    /// [`Error::Compacted`]: changes were lost) it ends.
    pub fn into_stream(self) -> impl futures_core::Stream<Item = Result<Change, Error>> + Send {
        let pending: std::collections::VecDeque<Change> = Default::default();
        futures_util::stream::unfold(Some((self, pending)), |state| async move {
            let (mut watch, mut pending) = state?;
            loop {
                if let Some(change) = pending.pop_front() {
                    return Some((Ok(change), Some((watch, pending))));
                }
                match watch.next().await {
                    Ok(changes) => pending.extend(changes),
                    Err(e) => return Some((Err(e), None)),
                }
            }
        })
    }

    /// The next changes, in order. It survives disconnects; if it fell
    /// behind a compaction (changes were lost) it fails with
    /// [`Error::Compacted`].
    pub async fn next(&mut self) -> Result<Vec<Change>, Error> {
        let changes = self.inner.next().await.map_err(unavailable(&self.key))?;
        Ok(changes
            .into_iter()
            .map(|c| Change {
                key: c.key,
                revision: c.revision,
                old: c.prev.map(Entry::from_kv),
                new: c.kv.map(Entry::from_kv),
            })
            .collect())
    }
}
