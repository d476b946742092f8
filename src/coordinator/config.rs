//! The config center through a [`Coord`].

use futures_core::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Coord;
use crate::config::{self, Entry, Error, Expect, History, TypedChange, Versioned, Written};

/// The config center under a [`Coord`]'s namespace.
///
/// A key starting with `/` is used as given (config lives wherever its
/// owners put it, and templates read any key); any other key lives under
/// `<namespace>/config/`, so a [scope](Coord::scope) has config of its
/// own — what the Go seeds' module-level config center does.
///
/// ```no_run
/// # async fn demo(coord: coord::Coord) -> Result<(), coord::config::Error> {
/// use futures_util::StreamExt;
/// let config = coord.scope("billing").config(); // keys under /coord/billing/config/
/// config.set("max_batch", &64).await?;
/// let batch: u32 = config.get("max_batch").await?;
/// let mut changes = Box::pin(config.watch::<u32>("max_batch").await?);
/// while let Some(change) = changes.next().await {
///     let change = change?; // a compaction is an error here, not a silent gap
///     println!("{:?}: {:?} -> {:?}", change.kind, change.old, change.new);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ConfigCenter {
    coord: Coord,
}

impl ConfigCenter {
    pub(super) fn new(coord: Coord) -> Self {
        ConfigCenter { coord }
    }

    /// The etcd key `key` stands for.
    pub fn key(&self, key: &str) -> String {
        if key.starts_with('/') {
            key.to_owned()
        } else {
            format!("{}/config/{key}", self.coord.namespace())
        }
    }

    fn client(&self) -> &crate::etcd::Client {
        self.coord.client()
    }

    /// Reads and parses `key`; [`Error::NotFound`] if it does not exist.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<T, Error> {
        config::get(self.client(), &self.key(key)).await
    }

    /// Reads `key` as stored, with its version and revisions.
    pub async fn get_entry(&self, key: &str) -> Result<Entry, Error> {
        config::get_entry(self.client(), &self.key(key)).await
    }

    /// Reads and parses `key` with the version to compare-and-set against.
    pub async fn get_versioned<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Versioned<T>, Error> {
        config::get_versioned(self.client(), &self.key(key)).await
    }

    /// Writes `value` at `key`, whatever is there.
    pub async fn set<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<Written, Error> {
        config::set(self.client(), &self.key(key), value).await
    }

    /// Writes `value` only if `key` is at version `expected` (0: absent);
    /// [`Error::VersionConflict`] otherwise, and nothing is written.
    pub async fn compare_and_set<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        expected: i64,
    ) -> Result<Written, Error> {
        config::compare_and_set(self.client(), &self.key(key), value, expected).await
    }

    /// Writes `value` only if `key` does not exist.
    pub async fn create<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<Written, Error> {
        config::create(self.client(), &self.key(key), value).await
    }

    /// Deletes `key` if `expect` holds; whether there was a key.
    pub async fn delete(&self, key: &str, expect: Expect) -> Result<bool, Error> {
        config::delete(self.client(), &self.key(key), expect).await
    }

    /// Every key under `prefix`, in key order, at one revision.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Entry>, Error> {
        config::list(self.client(), &self.key(prefix)).await
    }

    /// `key`'s values since it was created, newest first (see
    /// [`config::history`]).
    pub async fn history(&self, key: &str, limit: Option<usize>) -> Result<History, Error> {
        config::history(self.client(), &self.key(key), limit).await
    }

    /// Writes back the value `key` had at `revision`, as a compare-and-set.
    pub async fn rollback(
        &self,
        key: &str,
        revision: i64,
        expected: Option<i64>,
    ) -> Result<Written, Error> {
        config::rollback(self.client(), &self.key(key), revision, expected).await
    }

    /// Typed changes to `key` from now on, each with its kind (see
    /// [`config::watch_typed`]: a compaction ends the stream with
    /// [`Error::Compacted`]).
    pub async fn watch<T: DeserializeOwned + Send + 'static>(
        &self,
        key: &str,
    ) -> Result<impl Stream<Item = Result<TypedChange<T>, Error>> + Send + use<T>, Error> {
        config::watch_typed(self.client(), &self.key(key), false).await
    }

    /// Typed changes to every key under `prefix` from now on.
    pub async fn watch_prefix<T: DeserializeOwned + Send + 'static>(
        &self,
        prefix: &str,
    ) -> Result<impl Stream<Item = Result<TypedChange<T>, Error>> + Send + use<T>, Error> {
        config::watch_typed(self.client(), &self.key(prefix), true).await
    }
}
