//! Reads and waits ordered by create revision: what queue-like primitives
//! (locks, semaphores) are made of.

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};

use super::{Client, Error, KeyValue, LeaseId};

impl Client {
    /// Creates `key` on `lease` unless it exists, and returns it either way
    /// (with `true` when this call created it) — the first step of etcd's
    /// own mutex.
    pub async fn create_or_get(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Result<(KeyValue, bool), Error> {
        let value = value.into();
        let resp = self
            .unary("create or get", |mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                    .and_then([
                        TxnOp::put(
                            key,
                            value.clone(),
                            Some(PutOptions::new().with_lease(lease.0)),
                        ),
                        TxnOp::get(key, None),
                    ])
                    .or_else([TxnOp::get(key, None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        let created = resp.succeeded();
        let kv = resp
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().map(KeyValue::from_raw),
                _ => None,
            })
            .ok_or(Error::Config(format!(
                "etcd returned no key for `{key}` right after creating it"
            )))?;
        Ok((kv, created))
    }

    /// Deletes `key` only while it is the incarnation created at
    /// `created` (a key deleted and created again is someone else's);
    /// returns whether it deleted it.
    pub async fn delete_if_created(&self, key: &str, created: i64) -> Result<bool, Error> {
        let resp = self
            .unary("delete if created", |mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(key, CompareOp::Equal, created)])
                    .and_then([TxnOp::delete(key, None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(resp.succeeded())
    }

    /// The keys under `prefix`, without values (one cheap read).
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let opts = GetOptions::new().with_prefix().with_keys_only();
        self.get_with("keys", prefix, opts)
            .await
            .map(|kvs| kvs.into_iter().map(|kv| kv.key).collect())
    }

    /// The key under `prefix` created first, if any.
    pub async fn first_created(&self, prefix: &str) -> Result<Option<KeyValue>, Error> {
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        self.get_with("first created", prefix, opts)
            .await
            .map(|mut v| v.pop())
    }

    /// The key under `prefix` created last before `revision`, if any: the
    /// one a queued waiter at `revision` watches.
    pub async fn last_created_before(
        &self,
        prefix: &str,
        revision: i64,
    ) -> Result<Option<KeyValue>, Error> {
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_max_create_revision(revision - 1)
            .with_limit(1);
        self.get_with("last created before", prefix, opts)
            .await
            .map(|mut v| v.pop())
    }

    /// Every key under `prefix` created before `revision`, oldest first,
    /// and the revision of the read.
    pub async fn created_before(
        &self,
        prefix: &str,
        revision: i64,
    ) -> Result<(Vec<KeyValue>, i64), Error> {
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_max_create_revision(revision - 1);
        self.get_sorted("created before", prefix, opts).await
    }

    async fn get_with(
        &self,
        op: &'static str,
        key: &str,
        opts: GetOptions,
    ) -> Result<Vec<KeyValue>, Error> {
        self.get_sorted(op, key, opts).await.map(|(kvs, _)| kvs)
    }

    async fn get_sorted(
        &self,
        op: &'static str,
        key: &str,
        opts: GetOptions,
    ) -> Result<(Vec<KeyValue>, i64), Error> {
        let resp = self
            .unary(op, |mut c| {
                let opts = opts.clone();
                async move { c.get(key, Some(opts)).await }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok((
            resp.kvs().iter().map(KeyValue::from_raw).collect(),
            revision,
        ))
    }

    /// In one read: the keys under `prefix` created before `revision`
    /// (oldest first), `own` as it is now, and the revision of the read —
    /// what a queued waiter needs to decide, in one round trip.
    ///
    /// A `serializable` read is answered by the member from its own state,
    /// without a round of confirmation with the leader. It may be behind
    /// the cluster, but never
    /// before `own`'s creation when it shows `own`, and from then on the
    /// keys created before `own` can only go, never come: whatever such a
    /// read shows gone is gone for good.
    pub async fn queue_at(
        &self,
        prefix: &str,
        revision: i64,
        own: &str,
        serializable: bool,
    ) -> Result<(Vec<KeyValue>, Option<KeyValue>, i64), Error> {
        let mut ahead = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_max_create_revision(revision - 1);
        let mut own_opts = GetOptions::new();
        if serializable {
            ahead = ahead.with_serializable();
            own_opts = own_opts.with_serializable();
        }
        let resp = self
            .unary("queue", |mut c| {
                let txn = Txn::new().and_then([
                    TxnOp::get(prefix, Some(ahead.clone())),
                    TxnOp::get(own, Some(own_opts.clone())),
                ]);
                async move { c.txn(txn).await }
            })
            .await?;
        let read_at = resp.header().map_or(0, |h| h.revision());
        let mut gets = resp.op_responses().into_iter().filter_map(|op| match op {
            TxnOpResponse::Get(get) => {
                Some(get.kvs().iter().map(KeyValue::from_raw).collect::<Vec<_>>())
            }
            _ => None,
        });
        let ahead = gets.next().unwrap_or_default();
        let own = gets.next().and_then(|mut v| v.pop());
        Ok((ahead, own, read_at))
    }

    /// Waits for any key under `prefix` to be deleted after `revision`.
    /// Also returns when the watch is compacted, cancelled or broken: the
    /// caller reads again anyway.
    pub async fn wait_prefix_delete(&self, prefix: &str, revision: i64) -> Result<(), Error> {
        self.wait_event(prefix, revision, EventType::Delete).await
    }

    /// Waits for any key under `prefix` to be written after `revision`,
    /// returning early as [`Client::wait_prefix_delete`] does.
    pub async fn wait_put(&self, prefix: &str, revision: i64) -> Result<(), Error> {
        self.wait_event(prefix, revision, EventType::Put).await
    }

    async fn wait_event(&self, prefix: &str, revision: i64, kind: EventType) -> Result<(), Error> {
        let mut stream = self
            .unary("watch", |mut c| async move {
                c.watch(
                    prefix,
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(revision + 1),
                    ),
                )
                .await
            })
            .await?;
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.compact_revision() > 0
                        || resp.canceled()
                        || resp.events().iter().any(|e| e.event_type() == kind)
                    {
                        return Ok(());
                    }
                }
                Ok(None) | Err(_) => return Ok(()),
            }
        }
    }

    /// The next change to `key` after revision `after`: `Some` with the
    /// key as written, `None` once it is deleted. When changes in between
    /// were compacted away (or the watch broke), the key as it is now
    /// stands in for them.
    pub async fn next_change(&self, key: &str, after: i64) -> Result<Option<KeyValue>, Error> {
        let mut from = after + 1;
        loop {
            let mut stream = self
                .unary("watch", |mut c| async move {
                    c.watch(key, Some(WatchOptions::new().with_start_revision(from)))
                        .await
                })
                .await?;
            while let Ok(Some(resp)) = stream.message().await {
                if resp.compact_revision() > 0 || resp.canceled() {
                    break;
                }
                if let Some(event) = resp.events().first() {
                    return Ok(match event.event_type() {
                        EventType::Put => event.kv().map(KeyValue::from_raw),
                        EventType::Delete => None,
                    });
                }
            }
            let (kvs, read_at) = self.get_sorted("get", key, GetOptions::new()).await?;
            match kvs.into_iter().next() {
                None => return Ok(None),
                Some(kv) if kv.mod_revision > after => return Ok(Some(kv)),
                Some(_) => from = read_at + 1,
            }
        }
    }

    /// Waits until `key`, created at `created` and still there at `seen_at`,
    /// is deleted, resuming the watch after errors. Returns at once if it
    /// is already gone.
    ///
    /// Pass the latest `seen_at` known: etcd serves a watch that starts in
    /// the past from its history and catches it up only every 100 ms, so a
    /// deletion just after an old `seen_at` can arrive that much late.
    pub async fn wait_deleted(&self, key: &str, created: i64, seen_at: i64) -> Result<(), Error> {
        let mut from = seen_at.max(created) + 1;
        loop {
            let mut stream = self
                .unary("watch", |mut c| async move {
                    c.watch(key, Some(WatchOptions::new().with_start_revision(from)))
                        .await
                })
                .await?;
            while let Ok(Some(resp)) = stream.message().await {
                if resp.compact_revision() > 0 || resp.canceled() {
                    // History is gone or the watch was dropped: the key
                    // itself tells (below).
                    break;
                }
                if resp
                    .events()
                    .iter()
                    .any(|e| e.event_type() == EventType::Delete)
                {
                    return Ok(());
                }
            }
            // The stream ended: the key may have gone meanwhile.
            let (kvs, read_at) = self.get_sorted("get", key, GetOptions::new()).await?;
            match kvs.first() {
                Some(kv) if kv.create_revision == created => from = read_at + 1,
                _ => return Ok(()),
            }
        }
    }

    /// The seconds left on `lease`, or `None` when it no longer exists.
    pub async fn lease_ttl(&self, lease: LeaseId) -> Result<Option<i64>, Error> {
        let resp = self
            .unary("lease time to live", |mut c| async move {
                c.lease_time_to_live(lease.0, None).await
            })
            .await?;
        Ok((resp.ttl() > 0).then_some(resp.ttl()))
    }

    /// Revokes `lease`: every key on it is deleted at once. (What an
    /// operator's `etcdctl lease revoke` does; a session's own lease is
    /// revoked by [`super::Session::close`].)
    pub async fn lease_revoke(&self, lease: LeaseId) -> Result<(), Error> {
        self.unary("lease revoke", |mut c| async move {
            c.lease_revoke(lease.0).await
        })
        .await
        .map(|_| ())
    }
}
