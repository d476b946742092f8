//! Elections through a [`Coord`]: leadership that knows its lease.

use std::future::Future;

use futures_core::Stream;

use super::{Coord, Lost, Tie};
use crate::election::{self, ElectionError, Leader, Leadership};
use crate::etcd::{Condition, LeaseId};

/// Elections under a [`Coord`]'s namespace, in etcd's own layout
/// (`<namespace>/elections/<name>/<lease-hex>`): Go's
/// `concurrency.Election` and `etcdctl elect` take part in the same ones.
///
/// ```no_run
/// # async fn demo(coord: coord::Coord) -> Result<(), coord::election::ElectionError> {
/// let elections = coord.elections();
/// let leading = elections.campaign("scheduler", "10.0.0.5:7000").await?;
/// println!("leading with token {}", leading.revision());
/// leading.proclaim("10.0.0.5:7001").await?;
/// leading.resign().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Elections {
    coord: Coord,
}

impl Elections {
    pub(super) fn new(coord: Coord) -> Self {
        Elections { coord }
    }

    /// Stands in `name` with `value` on the session lease and waits until
    /// elected. Dropping the future withdraws the candidacy.
    pub async fn campaign(
        &self,
        name: &str,
        value: impl Into<Vec<u8>>,
    ) -> Result<Leading, ElectionError> {
        let lease = self
            .coord
            .lease()
            .await
            .map_err(|source| ElectionError::Etcd {
                name: name.to_owned(),
                source,
            })?;
        let client = self.coord.client();
        let leadership =
            election::campaign(client, lease, self.coord.namespace(), name, value).await?;
        Ok(Leading {
            tie: self.coord.tie(lease),
            leadership,
            resigned: false,
        })
    }

    /// The leader of `name` now, if any.
    pub async fn leader(&self, name: &str) -> Result<Option<Leader>, ElectionError> {
        election::leader(self.coord.client(), self.coord.namespace(), name).await
    }

    /// Every leader of `name` in turn and each of its proclamations (see
    /// [`election::observe`]).
    pub fn observe(&self, name: &str) -> impl Stream<Item = Leader> + Send + use<> {
        election::observe(self.coord.client(), self.coord.namespace(), name)
    }
}

/// Leadership of an election, tied to the session lease.
///
/// [`Leading::lost`] resolves when it is gone from under us (lease gone,
/// key deleted); it is never won back by itself. Dropping it resigns in
/// the background; [`Leading::resign`] does so and waits.
#[derive(Debug)]
pub struct Leading {
    leadership: Leadership,
    tie: Tie,
    resigned: bool,
}

impl Leading {
    /// The election.
    pub fn name(&self) -> &str {
        &self.leadership.name
    }

    /// The leader key.
    pub fn key(&self) -> &str {
        &self.leadership.key
    }

    /// The leader key's create revision: a fencing token, larger for every
    /// new leader.
    pub fn revision(&self) -> i64 {
        self.leadership.revision
    }

    /// The session lease it is held on.
    pub fn lease(&self) -> LeaseId {
        self.leadership.lease
    }

    /// The plain leadership of [`crate::election`].
    pub fn raw(&self) -> &Leadership {
        &self.leadership
    }

    /// The condition that this is still the leadership, for transactions.
    pub fn fence(&self) -> Condition {
        self.leadership.is_leader()
    }

    /// Tells followers a new value without another election.
    pub async fn proclaim(&self, value: impl Into<Vec<u8>>) -> Result<(), ElectionError> {
        election::proclaim(&self.tie.client, &self.leadership, value).await
    }

    /// Resolves when the leadership is lost: its lease gone, or its key
    /// deleted.
    pub fn lost(&self) -> impl Future<Output = Lost> + Send + use<> {
        self.tie
            .lost(self.leadership.key.clone(), self.leadership.revision)
    }

    /// Steps down and waits for etcd to say so; the next candidate is
    /// elected.
    pub async fn resign(mut self) -> Result<(), ElectionError> {
        self.resigned = true;
        election::resign(&self.tie.client, &self.leadership).await
    }
}

impl Drop for Leading {
    fn drop(&mut self) {
        if !self.resigned {
            self.tie
                .delete_in_background(self.leadership.key.clone(), self.leadership.revision);
        }
    }
}
