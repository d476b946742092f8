//! Staged rollouts of one key: a new value that only some agents see
//! first, then everyone (promote) or no one (abort).
//!
//! The state lives in etcd under the namespace, so any host's CLI sees it
//! and an agent that restarts reads it again:
//! `<namespace>/rollouts/keys<key>` holds the [`Rollout`] (the key keeps
//! its own slashes, so a prefix read of `/app/` finds the rollouts of the
//! keys under it at `<namespace>/rollouts/keys/app/`). The key itself keeps
//! its current value until [`promote`] writes the new one — in one
//! transaction with the record's deletion, and only if the key is still at
//! the version it had when the rollout was staged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::etcd::{Client, Condition, Error as EtcdError, Op};
use crate::registry::Health;

/// One staged rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// The key rolled out.
    pub key: String,
    /// The new value.
    pub value: String,
    /// The selector the staged agents were picked by.
    pub selector: String,
    /// The agents that see the new value, as the selector matched them
    /// when the rollout was staged.
    pub agents: Vec<String>,
    /// The key's version when staged (0: absent); promoting is refused
    /// if the key moved since.
    pub base_version: i64,
    /// When it was staged, RFC 3339.
    pub staged_at: String,
    /// How long the staged agents soak before `auto` may promote, in ms.
    #[serde(default)]
    pub soak_ms: u64,
    /// Promote by itself after a clean soak; abort at the first failure.
    #[serde(default)]
    pub auto: bool,
}

/// What one staged agent says of a rollout (`<namespace>/rollouts/reports/<agent>`
/// holds its reports, by key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The rollout reported on: its record's create revision.
    pub rollout: i64,
    /// The files reading the key rendered.
    pub rendered: bool,
    /// Their `check` commands (and validate hooks) passed.
    pub checked: bool,
    /// Their `on_change` hooks passed; `None` while they run.
    pub hooks: Option<bool>,
    /// What failed, if anything did.
    pub error: Option<String>,
    /// When, RFC 3339.
    pub at: String,
    /// None of the agent's files reads the key: the staged value changes
    /// nothing on it (the other outcomes are then moot).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unaffected: bool,
    /// The health of each of the agent's service instances
    /// (`service/instance`), as its services controller knows it, kept
    /// up to date while the rollout is staged.
    #[serde(default)]
    pub services: BTreeMap<String, Health>,
}

impl Report {
    /// The report of an agent none of whose files reads the key.
    pub fn unaffected(rollout: i64, at: String) -> Report {
        Report {
            rollout,
            rendered: false,
            checked: false,
            hooks: None,
            error: None,
            at,
            unaffected: true,
            services: BTreeMap::new(),
        }
    }

    /// Whether everything passed (hooks included) and no service of the
    /// agent is critical — or the staged value does not concern the agent.
    pub fn clean(&self) -> bool {
        self.unaffected
            || (self.rendered && self.checked && self.hooks == Some(true) && !self.sick())
    }

    /// Whether something failed, a critical service included.
    pub fn failed(&self) -> bool {
        !self.unaffected
            && (!self.rendered || !self.checked || self.hooks == Some(false) || self.sick())
    }

    /// Whether one of the agent's service instances is critical.
    pub fn sick(&self) -> bool {
        self.services.values().any(|h| *h == Health::Critical)
    }

    /// The critical service instances, as `service/instance`.
    pub fn critical(&self) -> Vec<&str> {
        self.services
            .iter()
            .filter(|(_, h)| **h == Health::Critical)
            .map(|(s, _)| s.as_str())
            .collect()
    }
}

/// A staged rollout as read, with its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    /// The rollout.
    pub rollout: Rollout,
    /// Its record's create revision: the rollout's identity.
    pub id: i64,
}

/// `<namespace>/rollouts/reports/`.
pub fn reports_prefix(namespace: &str) -> String {
    format!("{}/rollouts/reports/", namespace.trim_end_matches('/'))
}

/// Writes `agent`'s reports (every key it reports on).
pub async fn report(
    client: &Client,
    namespace: &str,
    agent: &str,
    reports: &BTreeMap<String, Report>,
) -> Result<(), EtcdError> {
    let key = format!("{}{agent}", reports_prefix(namespace));
    if reports.is_empty() {
        return client.delete(&key).await.map(|_| ());
    }
    let value = serde_json::to_vec(reports).unwrap_or_default();
    client.put(&key, value, None).await.map(|_| ())
}

/// Every agent's report on rollout `id` of `key`, by agent.
pub async fn reports(
    client: &Client,
    namespace: &str,
    key: &str,
    id: i64,
) -> Result<BTreeMap<String, Report>, RolloutError> {
    let prefix = reports_prefix(namespace);
    let all = client
        .get_prefix(&prefix)
        .await
        .map_err(|source| RolloutError::Etcd {
            key: key.to_owned(),
            source,
        })?;
    Ok(all
        .kvs
        .iter()
        .filter_map(|kv| {
            let agent = kv.key.strip_prefix(&prefix)?;
            let mut map: BTreeMap<String, Report> = serde_json::from_slice(&kv.value).ok()?;
            let report = map.remove(key).filter(|r| r.rollout == id)?;
            Some((agent.to_owned(), report))
        })
        .collect())
}

/// The staged rollout of `key` with its identity.
pub async fn staged(
    client: &Client,
    namespace: &str,
    key: &str,
) -> Result<Option<Staged>, RolloutError> {
    let kv = client
        .get(&record_key(namespace, key))
        .await
        .map_err(|source| RolloutError::Etcd {
            key: key.to_owned(),
            source,
        })?;
    kv.map(|kv| {
        Rollout::from_value(key, &kv.value).map(|rollout| Staged {
            rollout,
            id: kv.create_revision,
        })
    })
    .transpose()
}

/// Ends rollout `id` of `key` — writing its value for everyone when
/// `promote` — only if that very rollout is still staged (and, to
/// promote, the key still at its base version). `false`: it was not.
pub async fn end_if(
    client: &Client,
    namespace: &str,
    key: &str,
    id: i64,
    promote: bool,
) -> Result<bool, RolloutError> {
    let etcd = |source| RolloutError::Etcd {
        key: key.to_owned(),
        source,
    };
    let Some(staged) = staged(client, namespace, key).await? else {
        return Ok(false);
    };
    if staged.id != id {
        return Ok(false);
    }
    let record = record_key(namespace, key);
    let mut when = vec![Condition::CreatedAt {
        key: record.clone(),
        revision: id,
    }];
    let mut then = vec![Op::Delete { key: record }];
    if promote {
        when.push(Condition::Version {
            key: key.to_owned(),
            version: staged.rollout.base_version,
        });
        then.push(Op::Put {
            key: key.to_owned(),
            value: staged.rollout.value.into_bytes(),
            lease: None,
        });
    }
    Ok(client.commit(&when, &then).await.map_err(etcd)?.succeeded)
}

/// Why a rollout could not be staged, promoted or aborted.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// etcd failed.
    #[error("rollout of `{key}`: {source}")]
    Etcd {
        /// The key.
        key: String,
        /// What etcd said.
        #[source]
        source: EtcdError,
    },
    /// Another rollout of the key is staged.
    #[error("a rollout of `{key}` is already staged (to {agents}); promote or abort it first")]
    AlreadyStaged {
        /// The key.
        key: String,
        /// Its staged agents.
        agents: String,
    },
    /// No rollout of the key is staged.
    #[error("no rollout of `{key}` is staged")]
    NotStaged {
        /// The key.
        key: String,
    },
    /// The key was written since the rollout was staged.
    #[error(
        "`{key}` changed since its rollout was staged (version {base} then); nothing was written: abort the rollout and stage again"
    )]
    KeyMoved {
        /// The key.
        key: String,
        /// Its version at staging time.
        base: i64,
    },
    /// A record that is not a rollout.
    #[error("the rollout record of `{key}` is not one coord wrote: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
}

/// `<namespace>/rollouts/keys`: the records' prefix (the rolled-out key
/// follows, with its own slashes).
pub fn records_prefix(namespace: &str) -> String {
    format!("{}/rollouts/keys", namespace.trim_end_matches('/'))
}

/// Where the rollout of `key` is recorded.
pub fn record_key(namespace: &str, key: &str) -> String {
    format!("{}{key}", records_prefix(namespace))
}

impl Rollout {
    /// Reads a record back.
    pub fn from_value(key: &str, value: &[u8]) -> Result<Rollout, RolloutError> {
        serde_json::from_slice(value).map_err(|e| RolloutError::Corrupt {
            key: key.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Whether `agent` sees the new value.
    pub fn stages(&self, agent: &str) -> bool {
        self.agents.iter().any(|a| a == agent)
    }
}

/// Stages `rollout`: refused when one of the same key is staged already.
pub async fn stage(
    client: &Client,
    namespace: &str,
    rollout: &Rollout,
) -> Result<(), RolloutError> {
    let key = &rollout.key;
    let etcd = |source| RolloutError::Etcd {
        key: key.clone(),
        source,
    };
    let value = serde_json::to_vec(rollout).unwrap_or_default();
    match client
        .put_if_absent(&record_key(namespace, key), value, None)
        .await
        .map_err(etcd)?
    {
        None => Ok(()),
        Some(existing) => {
            let agents = Rollout::from_value(key, &existing.value)
                .map(|r| r.agents.join(", "))
                .unwrap_or_else(|_| "?".to_owned());
            Err(RolloutError::AlreadyStaged {
                key: key.clone(),
                agents,
            })
        }
    }
}

/// The rollout of `key`, if one is staged.
pub async fn get(
    client: &Client,
    namespace: &str,
    key: &str,
) -> Result<Option<Rollout>, RolloutError> {
    Ok(staged(client, namespace, key).await?.map(|s| s.rollout))
}

/// Writes the staged value for everyone and ends the rollout, in one
/// transaction: only if the key is still at the version it had when the
/// rollout was staged, and the rollout still staged.
pub async fn promote(client: &Client, namespace: &str, key: &str) -> Result<Rollout, RolloutError> {
    let etcd = |source| RolloutError::Etcd {
        key: key.to_owned(),
        source,
    };
    let record = record_key(namespace, key);
    let Some(kv) = client.get(&record).await.map_err(etcd)? else {
        return Err(RolloutError::NotStaged {
            key: key.to_owned(),
        });
    };
    let rollout = Rollout::from_value(key, &kv.value)?;
    let committed = client
        .commit(
            &[
                Condition::Version {
                    key: key.to_owned(),
                    version: rollout.base_version,
                },
                Condition::Version {
                    key: record.clone(),
                    version: kv.version,
                },
            ],
            &[
                Op::Put {
                    key: key.to_owned(),
                    value: rollout.value.clone().into_bytes(),
                    lease: None,
                },
                Op::Delete { key: record },
            ],
        )
        .await
        .map_err(etcd)?;
    if committed.succeeded {
        return Ok(rollout);
    }
    // Which condition failed: the record gone (aborted meanwhile) or the
    // key moved.
    match get(client, namespace, key).await? {
        None => Err(RolloutError::NotStaged {
            key: key.to_owned(),
        }),
        Some(_) => Err(RolloutError::KeyMoved {
            key: key.to_owned(),
            base: rollout.base_version,
        }),
    }
}

/// Ends the rollout of `key` without writing it: the staged agents go
/// back to the key's current value.
pub async fn abort(client: &Client, namespace: &str, key: &str) -> Result<Rollout, RolloutError> {
    let Some(rollout) = get(client, namespace, key).await? else {
        return Err(RolloutError::NotStaged {
            key: key.to_owned(),
        });
    };
    client
        .delete(&record_key(namespace, key))
        .await
        .map_err(|source| RolloutError::Etcd {
            key: key.to_owned(),
            source,
        })?;
    Ok(rollout)
}

/// The agents among `agents` that have no presence record (no agent of
/// that name runs): `auto` does not wait for them, and status shows them
/// absent.
pub async fn absent(
    client: &Client,
    namespace: &str,
    key: &str,
    agents: &[String],
) -> Result<std::collections::BTreeSet<String>, RolloutError> {
    let present = crate::presence::list(client, namespace)
        .await
        .map_err(|source| RolloutError::Etcd {
            key: key.to_owned(),
            source,
        })?;
    Ok(agents
        .iter()
        .filter(|a| !present.iter().any(|p| &p.name == *a))
        .cloned()
        .collect())
}
