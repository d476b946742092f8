//! Reading a set of keys and prefixes at one revision, in pages, whatever
//! their size — so a reader never mixes two states of etcd and never needs
//! more of the keyspace than it reads.

use std::collections::BTreeSet;

use etcd_client::{GetOptions, GetResponse, Txn, TxnOp, TxnOpResponse};

use super::mvcc::is_compacted;
use super::{BATCH, CacheSnapshot, Client, Error, KeyValue};

/// The largest gRPC message coord accepts from etcd: what etcd itself may
/// send (its server's send limit is `math.MaxInt32`). tonic's default of
/// 4 MiB refuses a prefix holding a few large values.
pub(crate) const MAX_MESSAGE: usize = i32::MAX as usize;

/// Keys per page of a prefix read: bounds one response (values are at most
/// etcd's request limit, 1.5 MiB by default) without many round trips for
/// the usual prefix of a few hundred keys.
const PAGE: i64 = 500;

/// gRPC's PERMISSION_DENIED.
const GRPC_PERMISSION_DENIED: i32 = 7;

/// One key, or every key under a prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Range {
    /// One key.
    Key(String),
    /// Every key under a prefix.
    Prefix(String),
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Range::Key(k) => write!(f, "key `{k}`"),
            Range::Prefix(p) => write!(f, "prefix `{p}`"),
        }
    }
}

impl Range {
    /// Whether a change to `key` falls in this range.
    pub fn touches(&self, key: &str) -> bool {
        match self {
            Range::Key(k) => k == key,
            Range::Prefix(p) => key.starts_with(p.as_str()),
        }
    }
}

/// Keys and prefixes read together, at one revision.
///
/// ```
/// use coord::etcd::ReadSet;
/// let mut set = ReadSet::default();
/// set.add_prefix("/app/");
/// set.add_key("/app/x");          // already under /app/
/// set.add_key("/other");
/// assert!(set.covers_key("/app/x"));
/// assert_eq!(set.ranges().len(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadSet {
    keys: BTreeSet<String>,
    prefixes: BTreeSet<String>,
}

impl ReadSet {
    /// Adds `key`; true if it was not in the set.
    pub fn add_key(&mut self, key: &str) -> bool {
        self.keys.insert(key.to_owned())
    }

    /// Adds every key under `prefix`; true if it was not in the set.
    pub fn add_prefix(&mut self, prefix: &str) -> bool {
        self.prefixes.insert(prefix.to_owned())
    }

    /// Adds everything `other` reads.
    pub fn extend(&mut self, other: &ReadSet) {
        self.keys.extend(other.keys.iter().cloned());
        self.prefixes.extend(other.prefixes.iter().cloned());
    }

    /// The single keys of the set.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(String::as_str)
    }

    /// The prefixes of the set.
    pub fn prefixes(&self) -> impl Iterator<Item = &str> {
        self.prefixes.iter().map(String::as_str)
    }

    /// Whether the set reads nothing.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.prefixes.is_empty()
    }

    /// Whether a change to `key` concerns a reader of this set.
    pub fn touches(&self, key: &str) -> bool {
        self.covers_key(key)
    }

    /// Whether reading the set also reads `key`.
    pub fn covers_key(&self, key: &str) -> bool {
        self.keys.contains(key) || self.covered_by_prefix(key)
    }

    /// Whether reading the set also reads every key under `prefix`.
    pub fn covers_prefix(&self, prefix: &str) -> bool {
        self.covered_by_prefix(prefix)
    }

    fn covered_by_prefix(&self, s: &str) -> bool {
        // Prefixes sort before everything they cover, so only those up to
        // `s` can cover it.
        self.prefixes
            .range::<str, _>((std::ops::Bound::Unbounded, std::ops::Bound::Included(s)))
            .any(|p| s.starts_with(p.as_str()))
    }

    /// The fewest ranges that read the whole set: prefixes not inside
    /// another one, and keys under none of them.
    pub fn ranges(&self) -> Vec<Range> {
        let mut out = Vec::new();
        let mut kept: Vec<&str> = Vec::new();
        for p in &self.prefixes {
            if !kept.iter().any(|k| p.starts_with(k)) {
                kept.push(p);
                out.push(Range::Prefix(p.clone()));
            }
        }
        out.extend(
            self.keys
                .iter()
                .filter(|k| !kept.iter().any(|p| k.starts_with(p)))
                .map(|k| Range::Key(k.clone())),
        );
        out
    }
}

/// The first key after every key starting with `prefix` (etcd's range end
/// for a prefix); `"\0"` means "to the end of the keyspace".
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn range_options(range: &Range, revision: Option<i64>) -> (Vec<u8>, GetOptions) {
    let mut opts = GetOptions::new();
    if let Some(rev) = revision {
        opts = opts.with_revision(rev);
    }
    match range {
        Range::Key(k) => (k.as_bytes().to_vec(), opts),
        Range::Prefix(p) => (p.as_bytes().to_vec(), opts.with_prefix().with_limit(PAGE)),
    }
}

fn is_denied(e: &Error) -> bool {
    matches!(e, Error::Request { source: etcd_client::Error::GRpcStatus(s), .. }
        if i32::from(s.code()) == GRPC_PERMISSION_DENIED)
}

impl Client {
    /// Reads every key and prefix of `set` at one revision — `at`, or the
    /// current one — in as few round trips as etcd allows: one transaction
    /// of ranges per [`BATCH`] ranges, then further pages of any prefix
    /// longer than a page, pinned to the same revision. A range the user
    /// may not read fails with [`Error::Denied`] naming it.
    pub async fn read(&self, set: &ReadSet, at: Option<i64>) -> Result<CacheSnapshot, Error> {
        match self.read_once(set, at).await {
            // The revision fixed by the first batch was compacted before
            // the last page was read: start again at a newer one.
            Err(Error::Request { source, .. }) if at.is_none() && is_compacted(&source) => {
                self.read_once(set, None).await
            }
            other => other,
        }
    }

    async fn read_once(&self, set: &ReadSet, at: Option<i64>) -> Result<CacheSnapshot, Error> {
        let ranges = set.ranges();
        let mut revision = at.filter(|r| *r > 0);
        let mut kvs: Vec<KeyValue> = Vec::new();
        for chunk in ranges.chunks(BATCH) {
            let result = self
                .unary("read", |c| {
                    let ops: Vec<TxnOp> = chunk
                        .iter()
                        .map(|r| {
                            let (key, opts) = range_options(r, revision);
                            TxnOp::get(key, Some(opts))
                        })
                        .collect();
                    async move {
                        c.kv_client()
                            .max_decoding_message_size(MAX_MESSAGE)
                            .txn(Txn::new().and_then(ops))
                            .await
                    }
                })
                .await;
            let resp = match result {
                Ok(resp) => resp,
                Err(e) if is_denied(&e) => return Err(self.find_denied(chunk, revision).await),
                Err(e) => return Err(e),
            };
            let rev = *revision.get_or_insert(resp.header().map_or(0, |h| h.revision()));
            for (range, op) in chunk.iter().zip(resp.op_responses()) {
                let TxnOpResponse::Get(get) = op else {
                    continue;
                };
                let more = get.more();
                let last = get.kvs().last().map(|kv| kv.key().to_vec());
                kvs.extend(get.kvs().iter().map(KeyValue::from_raw));
                if let (true, Some(last), Range::Prefix(p)) = (more, last, range) {
                    self.rest_of_prefix(p, last, rev, &mut kvs).await?;
                }
            }
        }
        Ok(CacheSnapshot::from_parts(revision.unwrap_or(0), kvs))
    }

    /// Reads the keys of `prefix` after `last`, a page at a time, at
    /// `revision`.
    async fn rest_of_prefix(
        &self,
        prefix: &str,
        mut last: Vec<u8>,
        revision: i64,
        kvs: &mut Vec<KeyValue>,
    ) -> Result<(), Error> {
        let end = prefix_end(prefix);
        loop {
            let mut from = last.clone();
            from.push(0);
            let resp: GetResponse = self
                .unary("read page", |c| {
                    let (from, end) = (from.clone(), end.clone());
                    async move {
                        c.kv_client()
                            .max_decoding_message_size(MAX_MESSAGE)
                            .get(
                                from,
                                Some(
                                    GetOptions::new()
                                        .with_range(end)
                                        .with_revision(revision)
                                        .with_limit(PAGE),
                                ),
                            )
                            .await
                    }
                })
                .await
                .map_err(|e| {
                    if is_denied(&e) {
                        Error::Denied {
                            range: Range::Prefix(prefix.to_owned()).to_string(),
                        }
                    } else {
                        e
                    }
                })?;
            kvs.extend(resp.kvs().iter().map(KeyValue::from_raw));
            match resp.kvs().last() {
                Some(kv) if resp.more() => last = kv.key().to_vec(),
                _ => return Ok(()),
            }
        }
    }

    /// etcd refuses a whole transaction without saying which range was
    /// forbidden: ask for each alone (one key of it) to name it.
    async fn find_denied(&self, ranges: &[Range], revision: Option<i64>) -> Error {
        for range in ranges {
            let result = self
                .unary("read", |c| {
                    let (key, opts) = range_options(range, revision);
                    async move {
                        c.kv_client()
                            .max_decoding_message_size(MAX_MESSAGE)
                            .get(key, Some(opts.with_limit(1)))
                            .await
                    }
                })
                .await;
            match result {
                Err(e) if is_denied(&e) => {
                    return Error::Denied {
                        range: range.to_string(),
                    };
                }
                Err(e) => return e,
                Ok(_) => {}
            }
        }
        Error::Denied {
            range: ranges
                .iter()
                .map(Range::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_drop_what_another_prefix_already_reads() {
        let mut set = ReadSet::default();
        set.add_prefix("/app/");
        set.add_prefix("/app/db/");
        set.add_prefix("/apple/");
        set.add_key("/app/x");
        set.add_key("/ap");
        assert_eq!(
            set.ranges(),
            [
                Range::Prefix("/app/".into()),
                Range::Prefix("/apple/".into()),
                Range::Key("/ap".into()),
            ]
        );
        assert!(set.covers_prefix("/app/db/x/"));
        assert!(!set.covers_key("/apps"));
    }

    #[test]
    fn prefix_end_carries_past_0xff_and_empty_means_everything() {
        assert_eq!(prefix_end("/a/"), b"/a0");
        assert_eq!(prefix_end(""), b"\0");
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80");
    }
}
