//! Instance ids through a [`Coord`]: claims that know their lease.

use std::future::Future;

use super::{Coord, Lost, Tie};
use crate::etcd::{KeyValue, LeaseId};
use crate::ids::{self, Claim, ClaimRecord, IdError};

/// The ids `0..size` of one pool under a [`Coord`]'s namespace
/// (`<namespace>/ids/<pool>/<n>`), claimed on its session lease.
///
/// ```no_run
/// # async fn demo(coord: coord::Coord) -> Result<(), coord::ids::IdError> {
/// let claim = coord.ids("worker", 1024).claim().await?;
/// println!("worker id {}", claim.id());
/// claim.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Ids {
    coord: Coord,
    pool: String,
    size: u32,
}

impl Ids {
    pub(super) fn new(coord: Coord, pool: &str, size: u32) -> Self {
        Ids {
            coord,
            pool: pool.to_owned(),
            size,
        }
    }

    fn record(&self) -> ClaimRecord {
        ClaimRecord {
            agent: self.coord.name().to_owned(),
            claimed_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        }
    }

    async fn lease(&self) -> Result<LeaseId, IdError> {
        self.coord.lease().await.map_err(|source| IdError::Etcd {
            pool: self.pool.clone(),
            source,
        })
    }

    fn claimed(&self, claim: Claim) -> IdClaim {
        IdClaim {
            tie: self.coord.tie(claim.lease),
            claim,
            released: false,
        }
    }

    /// Claims a free id; [`IdError::Exhausted`] when the pool is full.
    pub async fn claim(&self) -> Result<IdClaim, IdError> {
        self.claim_preferring(None).await
    }

    /// Claims `preferred` if it is free (the id this process had before),
    /// else any free id.
    pub async fn claim_preferring(&self, preferred: Option<u32>) -> Result<IdClaim, IdError> {
        let lease = self.lease().await?;
        let (c, ns) = (self.coord.client(), self.coord.namespace());
        let claim = ids::claim(
            c,
            ns,
            &self.pool,
            self.size,
            lease,
            preferred,
            &self.record(),
        )
        .await?;
        Ok(self.claimed(claim))
    }

    /// Claims an id, waiting for one to be freed while the pool is full.
    pub async fn claim_waiting(&self) -> Result<IdClaim, IdError> {
        let lease = self.lease().await?;
        let (c, ns) = (self.coord.client(), self.coord.namespace());
        let claim =
            ids::claim_waiting(c, ns, &self.pool, self.size, lease, None, &self.record()).await?;
        Ok(self.claimed(claim))
    }

    /// Every claim in the pool, by id.
    pub async fn list(&self) -> Result<Vec<(u32, KeyValue)>, IdError> {
        ids::list(self.coord.client(), self.coord.namespace(), &self.pool).await
    }
}

/// A claimed id that knows its session lease.
///
/// [`IdClaim::lost`] resolves when the id is no longer ours (lease gone,
/// or the claim key deleted). It is never claimed again by itself: the
/// holder must stop using the id, then claim again. Dropping the claim
/// releases it in the background; [`IdClaim::release`] does so and waits.
#[derive(Debug)]
pub struct IdClaim {
    claim: Claim,
    tie: Tie,
    released: bool,
}

impl IdClaim {
    /// The id.
    pub fn id(&self) -> u32 {
        self.claim.id
    }

    /// The pool.
    pub fn pool(&self) -> &str {
        &self.claim.pool
    }

    /// The claim key.
    pub fn key(&self) -> &str {
        &self.claim.key
    }

    /// The claim's create revision: larger for every new claim of the pool.
    pub fn generation(&self) -> i64 {
        self.claim.generation
    }

    /// The session lease it is held on.
    pub fn lease(&self) -> LeaseId {
        self.claim.lease
    }

    /// The plain claim of [`crate::ids`].
    pub fn raw(&self) -> &Claim {
        &self.claim
    }

    /// Resolves when the id is no longer ours: its lease gone, or its key
    /// deleted.
    pub fn lost(&self) -> impl Future<Output = Lost> + Send + use<> {
        self.tie.lost(self.claim.key.clone(), self.claim.generation)
    }

    /// Releases the id and waits for etcd to say so.
    pub async fn release(mut self) -> Result<(), IdError> {
        self.released = true;
        self.tie
            .client
            .delete_if_created(&self.claim.key, self.claim.generation)
            .await
            .map(|_| ())
            .map_err(|source| IdError::Etcd {
                pool: self.claim.pool.clone(),
                source,
            })
    }
}

impl Drop for IdClaim {
    fn drop(&mut self) {
        if !self.released {
            self.tie
                .delete_in_background(self.claim.key.clone(), self.claim.generation);
        }
    }
}
