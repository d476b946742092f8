//! Leader elections in etcd's own layout, so coord, Go's
//! `concurrency.Election` and `etcdctl elect` take part in the same
//! elections.
//!
//! A candidate creates `<namespace>/elections/<name>/<lease-hex>` on its
//! session lease with its value (what followers learn about the leader:
//! an address, an id). The key created first leads; each candidate waits
//! for the keys created before its own to go, as a lock waiter does. The
//! leader may change its value without another election (*proclaim*) and
//! steps down by deleting its key (*resign*); its lease ending does the
//! same. `etcdctl elect <namespace>/elections/<name> VALUE` campaigns and
//! `etcdctl elect -l <namespace>/elections/<name>` observes.

use std::time::Duration;

use futures_core::Stream;
use serde::Serialize;

use crate::etcd::{Backoff, Client, Condition, Error as EtcdError, KeyValue, LeaseId, Op};

/// Why a campaign, proclamation or read failed.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    /// etcd could not be reached or refused the request.
    #[error("election `{name}` failed: {source}")]
    Etcd {
        /// The election.
        name: String,
        /// What etcd said.
        #[source]
        source: EtcdError,
    },
    /// The candidate's key went while it waited (its lease ended, or the
    /// key was deleted): it is not the leader.
    #[error("lost the campaign in election `{name}`: our candidate key is gone")]
    KeyGone {
        /// The election.
        name: String,
    },
    /// A proclamation or resignation by a leadership that is no longer the
    /// leader's (its key is gone or is another incarnation).
    #[error("not the leader of election `{name}` any more; nothing was written")]
    NotLeader {
        /// The election.
        name: String,
    },
    /// The name cannot be an election's.
    #[error("invalid election `{name}`: {reason}")]
    Invalid {
        /// The election.
        name: String,
        /// Why not.
        reason: String,
    },
}

fn etcd_error(name: &str) -> impl Fn(EtcdError) -> ElectionError + Copy + '_ {
    move |source| ElectionError::Etcd {
        name: name.to_owned(),
        source,
    }
}

/// `<namespace>/elections/<name>/`: what Go's
/// `concurrency.NewElection(session, "<namespace>/elections/<name>")` and
/// `etcdctl elect <namespace>/elections/<name>` use.
pub fn prefix(namespace: &str, name: &str) -> String {
    format!("{}/elections/{name}/", namespace.trim_end_matches('/'))
}

/// The leader of an election, as a follower sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Leader {
    /// The leader's key (`…/<lease-hex>`).
    pub key: String,
    /// What the leader proclaimed.
    pub value: Vec<u8>,
    /// The key's create revision: larger for every new leader (a fencing
    /// token for what the leader does).
    pub revision: i64,
    /// The revision of the last proclamation.
    pub mod_revision: i64,
}

impl Leader {
    fn from_kv(kv: KeyValue) -> Leader {
        Leader {
            key: kv.key,
            value: kv.value,
            revision: kv.create_revision,
            mod_revision: kv.mod_revision,
        }
    }

    /// The value as text (lossy for bytes that are not UTF-8).
    pub fn value_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.value)
    }
}

/// Leadership won by [`campaign`]: the leader's key and its create
/// revision (Go's `Election.Key()` and `Rev()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// The election.
    pub name: String,
    /// The leader key.
    pub key: String,
    /// Its create revision: the leadership's fencing token.
    pub revision: i64,
    /// The session lease it is held on.
    pub lease: LeaseId,
}

impl Leadership {
    /// The condition that this is still the leadership (Go's
    /// `IsOwner()`-style fence), to add to a transaction.
    pub fn is_leader(&self) -> Condition {
        Condition::CreatedAt {
            key: self.key.clone(),
            revision: self.revision,
        }
    }
}

fn check_name(name: &str) -> Result<(), ElectionError> {
    if name.is_empty() || name.split('/').any(str::is_empty) {
        return Err(ElectionError::Invalid {
            name: name.to_owned(),
            reason: "an election name is non-empty, without empty path segments".into(),
        });
    }
    Ok(())
}

/// Stands in election `name` with `value` on `lease` and waits until
/// elected, as Go's `Election.Campaign` does: a candidate already standing
/// on this lease keeps its place and proclaims `value`. If the future is
/// dropped while it waits, the candidacy is withdrawn in the background;
/// on an error it is withdrawn before returning.
pub async fn campaign(
    client: &Client,
    lease: LeaseId,
    namespace: &str,
    name: &str,
    value: impl Into<Vec<u8>>,
) -> Result<Leadership, ElectionError> {
    check_name(name)?;
    let etcd = etcd_error(name);
    let value = value.into();
    let pfx = prefix(namespace, name);
    let key = format!("{pfx}{:x}", lease.0);
    let (kv, created) = client
        .create_or_get(&key, value.clone(), lease)
        .await
        .map_err(etcd)?;
    let leadership = Leadership {
        name: name.to_owned(),
        key,
        revision: kv.create_revision,
        lease,
    };
    let mut withdraw = Withdraw {
        client,
        leadership: Some(&leadership),
    };
    if !created && kv.value != value {
        proclaim(client, &leadership, value).await?;
    }
    let waited = wait_elected(client, &pfx, &leadership).await;
    withdraw.leadership = None;
    drop(withdraw);
    match waited {
        Ok(()) => Ok(leadership),
        Err(e) => {
            let _ = client
                .delete_if_created(&leadership.key, leadership.revision)
                .await;
            Err(e)
        }
    }
}

/// Withdraws a candidacy whose campaign was dropped while it waited.
struct Withdraw<'a> {
    client: &'a Client,
    leadership: Option<&'a Leadership>,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        let Some(l) = self.leadership.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (client, key, revision) = (self.client.clone(), l.key.clone(), l.revision);
            runtime.spawn(async move {
                let _ = client.delete_if_created(&key, revision).await;
            });
        }
    }
}

/// Waits until no key created before ours is left under the prefix (Go's
/// `waitDeletes`), each time for the newest of them.
async fn wait_elected(
    client: &Client,
    pfx: &str,
    leadership: &Leadership,
) -> Result<(), ElectionError> {
    let etcd = etcd_error(&leadership.name);
    loop {
        let (ahead, own, read_at) = client
            .queue_at(pfx, leadership.revision, &leadership.key, false)
            .await
            .map_err(etcd)?;
        if own.is_none_or(|kv| kv.create_revision != leadership.revision) {
            return Err(ElectionError::KeyGone {
                name: leadership.name.clone(),
            });
        }
        let Some(before) = ahead.last() else {
            return Ok(());
        };
        client
            .wait_deleted(&before.key, before.create_revision, read_at)
            .await
            .map_err(etcd)?;
    }
}

/// Changes the leader's value without another election (Go's
/// `Proclaim`); [`ElectionError::NotLeader`] when `leadership` no longer
/// is the leader's.
pub async fn proclaim(
    client: &Client,
    leadership: &Leadership,
    value: impl Into<Vec<u8>>,
) -> Result<(), ElectionError> {
    let put = Op::Put {
        key: leadership.key.clone(),
        value: value.into(),
        lease: Some(leadership.lease),
    };
    let done = client
        .commit(&[leadership.is_leader()], &[put])
        .await
        .map_err(etcd_error(&leadership.name))?;
    if done.succeeded {
        Ok(())
    } else {
        Err(ElectionError::NotLeader {
            name: leadership.name.clone(),
        })
    }
}

/// Steps down (Go's `Resign`): deletes the leader key if it is still this
/// leadership's, so the next candidate is elected.
pub async fn resign(client: &Client, leadership: &Leadership) -> Result<(), ElectionError> {
    client
        .delete_if_created(&leadership.key, leadership.revision)
        .await
        .map(|_| ())
        .map_err(etcd_error(&leadership.name))
}

/// The leader now, if there is one (Go's `Leader`).
pub async fn leader(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<Leader>, ElectionError> {
    client
        .first_created(&prefix(namespace, name))
        .await
        .map(|kv| kv.map(Leader::from_kv))
        .map_err(etcd_error(name))
}

/// Every leader in turn and each of its proclamations, as Go's `Observe`:
/// the current leader first (once there is one), then each new value,
/// then the next leader when it steps down. Intermediate values may be
/// skipped (after a reconnect or a compaction), the latest never is.
/// Transient etcd errors are retried; the stream ends only when dropped.
pub fn observe(
    client: &Client,
    namespace: &str,
    name: &str,
) -> impl Stream<Item = Leader> + Send + use<> {
    let state = Observer {
        client: client.clone(),
        prefix: prefix(namespace, name),
        following: None,
        backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
    };
    futures_util::stream::unfold(state, |mut state| async move {
        let next = state.next().await;
        Some((next, state))
    })
}

struct Observer {
    client: Client,
    prefix: String,
    /// The leader last reported.
    following: Option<Leader>,
    backoff: Backoff,
}

impl Observer {
    async fn next(&mut self) -> Leader {
        loop {
            match self.step().await {
                Ok(Some(leader)) => {
                    self.backoff.reset();
                    self.following = Some(leader.clone());
                    return leader;
                }
                Ok(None) => {}
                Err(e) => {
                    let wait = self.backoff.next_delay();
                    tracing::debug!(prefix = %self.prefix, error = %e, retry_in = ?wait, "Election observer could not read; retrying.");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// One look: a leader to report, or `None` to look again.
    async fn step(&mut self) -> Result<Option<Leader>, EtcdError> {
        match self.following.clone() {
            None => {
                let (kvs, read_at) = self.client.created_before(&self.prefix, i64::MAX).await?;
                if let Some(kv) = kvs.into_iter().next() {
                    return Ok(Some(Leader::from_kv(kv)));
                }
                // No leader: wait for the first candidate, then read again.
                self.client.wait_put(&self.prefix, read_at).await?;
                Ok(None)
            }
            Some(current) => {
                match self
                    .client
                    .next_change(&current.key, current.mod_revision)
                    .await?
                {
                    Some(kv) if kv.create_revision == current.revision => {
                        Ok(Some(Leader::from_kv(kv)))
                    }
                    // Deleted (or replaced): find the next leader.
                    _ => {
                        self.following = None;
                        Ok(None)
                    }
                }
            }
        }
    }
}
