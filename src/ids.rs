//! Instance ids: small unique integers from a pool, held on a session
//! lease (snowflake worker ids, shard numbers).
//!
//! A claim is `<namespace>/ids/<pool>/<n>` on the claimer's lease. Claiming
//! reads which ids are taken (keys only), picks a free one — the one the
//! claimer had before if it is free, else one at random, so concurrent
//! claimers rarely collide — and creates it in a transaction guarded by
//! `create_revision == 0`. A collision only marks that id taken and tries
//! another: expected O(1) round trips whatever the pool size, and never a
//! loop of blocking lock calls.
//!
//! A pool's size is stored at `<namespace>/id-pools/<pool>` (`{"size": N}`,
//! on no lease) by its first claim, and a claim asking for another size is
//! refused ([`IdError::SizeMismatch`]): two claimers with different sizes
//! would hand out ids the other side thinks cannot exist. The stored size
//! is read in the same transaction as the taken ids.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::etcd::{Client, Error as EtcdError, KeyValue, LeaseId, ReadSet};

/// Who holds an id, stored as the claim's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRecord {
    /// The agent (or `Coord` name) that holds it.
    pub agent: String,
    /// RFC 3339.
    pub claimed_at: String,
}

/// A held id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The pool.
    pub pool: String,
    /// The id.
    pub id: u32,
    /// The claim key.
    pub key: String,
    /// The claim's create revision: larger for every new claim of the pool.
    pub generation: i64,
    /// The session lease it is held on.
    pub lease: LeaseId,
    /// Round trips the claim took (reads and transactions).
    pub round_trips: u32,
}

/// Why an id could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum IdError {
    #[error("pool `{pool}` is full: all {size} ids are claimed")]
    /// Every id of the pool is claimed.
    Exhausted {
        /// The pool.
        pool: String,
        /// Its size.
        size: u32,
    },
    #[error("failed to claim an id in pool `{pool}`: {source}")]
    /// etcd could not be reached or refused the request.
    Etcd {
        /// The pool.
        pool: String,
        #[source]
        /// What etcd said.
        source: EtcdError,
    },
    #[error(
        "pool `{pool}` has size {stored} (stored at `{key}` by its first claimer), not {asked}; claim with --size {stored}, or, if the pool was resized on purpose and no claim is held, delete that key first; nothing was claimed"
    )]
    /// The size asked for is not the one stored for the pool.
    SizeMismatch {
        /// The pool.
        pool: String,
        /// The size asked for.
        asked: u32,
        /// The size stored.
        stored: u32,
        /// Where it is stored.
        key: String,
    },
    #[error("invalid pool `{pool}`: {reason}")]
    /// The pool or its size cannot be.
    Invalid {
        /// The pool.
        pool: String,
        /// Why not.
        reason: String,
    },
}

/// Maps an etcd failure in `pool` to an [`IdError`].
fn etcd_error(pool: &str) -> impl Fn(EtcdError) -> IdError + Copy + '_ {
    move |source| IdError::Etcd {
        pool: pool.to_owned(),
        source,
    }
}

/// `<namespace>/ids/<pool>/`.
pub fn prefix(namespace: &str, pool: &str) -> String {
    format!("{}/ids/{pool}/", namespace.trim_end_matches('/'))
}

/// `<namespace>/id-pools/<pool>`: where the pool's size is stored. Outside
/// the pool's prefix, so whatever lists or watches the claims never sees it.
pub fn size_key(namespace: &str, pool: &str) -> String {
    format!("{}/id-pools/{pool}", namespace.trim_end_matches('/'))
}

/// A pool's stored size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct PoolSize {
    size: u32,
}

fn key(namespace: &str, pool: &str, id: u32) -> String {
    format!("{}{id}", prefix(namespace, pool))
}

/// The id a claim key names.
pub fn id_of(key: &str) -> Option<u32> {
    key.rsplit('/').next()?.parse().ok()
}

/// Claims a free id in `0..size` on `lease`, preferring `preferred`.
///
/// ```no_run
/// # async fn demo(client: coord::etcd::Client, lease: coord::etcd::LeaseId) -> Result<(), coord::ids::IdError> {
/// use coord::ids::{ClaimRecord, claim};
/// let me = ClaimRecord { agent: "web-01".into(), claimed_at: "2026-01-01T00:00:00Z".into() };
/// let c = claim(&client, "/coord", "worker", 1024, lease, None, &me).await?;
/// println!("worker id {} (generation {})", c.id, c.generation);
/// # Ok(()) }
/// ```
pub async fn claim(
    client: &Client,
    namespace: &str,
    pool: &str,
    size: u32,
    lease: LeaseId,
    preferred: Option<u32>,
    record: &ClaimRecord,
) -> Result<Claim, IdError> {
    if size == 0 || pool.is_empty() || pool.contains('/') {
        return Err(IdError::Invalid {
            pool: pool.to_owned(),
            reason: "a pool has a name without `/` and a size of at least 1".into(),
        });
    }
    let etcd = etcd_error(pool);
    let value = serde_json::to_vec(record).unwrap_or_default();
    let mut round_trips = 1;
    let claims = prefix(namespace, pool);
    let sizes = size_key(namespace, pool);
    let mut set = ReadSet::default();
    set.add_prefix(&claims);
    set.add_key(&sizes);
    let read = client.read(&set, None).await.map_err(etcd)?;
    let stored = read
        .get(&sizes)
        .and_then(|kv| serde_json::from_slice::<PoolSize>(&kv.value).ok());
    match stored {
        Some(PoolSize { size: stored }) if stored != size => {
            return Err(IdError::SizeMismatch {
                pool: pool.to_owned(),
                asked: size,
                stored,
                key: sizes,
            });
        }
        Some(_) => {}
        None => {
            // The first claim of the pool says how big it is. Two first
            // claimers race on the create; the loser reads the winner's.
            round_trips += 1;
            let mine = serde_json::to_vec(&PoolSize { size }).unwrap_or_default();
            if let Some(theirs) = client
                .put_if_absent(&sizes, mine, None)
                .await
                .map_err(etcd)?
                && let Ok(PoolSize { size: stored }) = serde_json::from_slice(&theirs.value)
                && stored != size
            {
                return Err(IdError::SizeMismatch {
                    pool: pool.to_owned(),
                    asked: size,
                    stored,
                    key: sizes,
                });
            }
        }
    }
    let mut taken: HashSet<u32> = read
        .under(&claims)
        .filter_map(|kv| id_of(&kv.key))
        .collect();
    let mut preferred = preferred.filter(|p| *p < size);
    loop {
        // The preferred id is tried even when it looks taken: it may be
        // ours already (same lease), which the create tells.
        let Some(id) = preferred.take().or_else(|| pick(size, &taken)) else {
            return Err(IdError::Exhausted {
                pool: pool.to_owned(),
                size,
            });
        };
        let k = key(namespace, pool, id);
        round_trips += 1;
        match client
            .put_if_absent(&k, value.clone(), Some(lease))
            .await
            .map_err(etcd)?
        {
            None => {
                let kv = client.get(&k).await.map_err(etcd)?;
                round_trips += 1;
                let generation = kv.as_ref().map_or(0, |kv| kv.create_revision);
                return Ok(Claim {
                    pool: pool.to_owned(),
                    id,
                    key: k,
                    generation,
                    lease,
                    round_trips,
                });
            }
            Some(existing) if existing.lease == Some(lease) => {
                // Ours already (a retry after a lost answer).
                return Ok(Claim {
                    pool: pool.to_owned(),
                    id,
                    key: k,
                    generation: existing.create_revision,
                    lease,
                    round_trips,
                });
            }
            Some(_) => {
                taken.insert(id);
            }
        }
    }
}

/// A free id: a random probe, else a scan.
fn pick(size: u32, taken: &HashSet<u32>) -> Option<u32> {
    if taken.len() >= size as usize {
        return None;
    }
    // Random probes find a free id in O(1) expected tries unless the pool
    // is nearly full; then scan from a random start.
    for _ in 0..16 {
        let id = rand::random_range(0..size);
        if !taken.contains(&id) {
            return Some(id);
        }
    }
    let start = rand::random_range(0..size);
    (0..size)
        .map(|i| (start + i) % size)
        .find(|id| !taken.contains(id))
}

/// Releases a claim (deletes its key) if it is still this claim.
pub async fn release(client: &Client, claim: &Claim) -> Result<(), IdError> {
    match client.get(&claim.key).await {
        Ok(Some(kv)) if kv.create_revision == claim.generation => client
            .delete(&claim.key)
            .await
            .map(|_| ())
            .map_err(etcd_error(&claim.pool)),
        Ok(_) => Ok(()),
        Err(source) => Err(etcd_error(&claim.pool)(source)),
    }
}

/// Every claim in a pool, by id.
pub async fn list(
    client: &Client,
    namespace: &str,
    pool: &str,
) -> Result<Vec<(u32, KeyValue)>, IdError> {
    let snapshot = client
        .get_prefix(&prefix(namespace, pool))
        .await
        .map_err(etcd_error(pool))?;
    let mut out: Vec<(u32, KeyValue)> = snapshot
        .kvs
        .into_iter()
        .filter_map(|kv| id_of(&kv.key).map(|id| (id, kv)))
        .collect();
    out.sort_by_key(|(id, _)| *id);
    Ok(out)
}

/// Claims an id, waiting for one to be freed while the pool is full.
pub async fn claim_waiting(
    client: &Client,
    namespace: &str,
    pool: &str,
    size: u32,
    lease: LeaseId,
    preferred: Option<u32>,
    record: &ClaimRecord,
) -> Result<Claim, IdError> {
    loop {
        // Read the revision first: a release after it wakes the wait below,
        // even one that lands between the failed claim and the watch.
        let before = client.current_revision().await.map_err(etcd_error(pool))?;
        match claim(client, namespace, pool, size, lease, preferred, record).await {
            Err(IdError::Exhausted { .. }) => {
                client
                    .wait_prefix_delete(&prefix(namespace, pool), before)
                    .await
                    .map_err(etcd_error(pool))?;
            }
            other => return other,
        }
    }
}
