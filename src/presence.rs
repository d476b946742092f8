//! Agent presence: one key per running agent under `<namespace>/agents/`,
//! attached to the agent's session lease so it disappears with the agent.

use serde::{Deserialize, Serialize};

use crate::etcd::{Client, Error, KeyValue, LeaseId};
use crate::untrusted::Untrusted;

/// What an agent says about itself in its presence key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// coord's version.
    pub version: String,
    /// SHA-256 of the manifest the agent is running, in hex.
    pub manifest_hash: String,
    /// When the agent started, RFC 3339.
    pub started_at: String,
    /// The host the agent runs on.
    pub host: String,
    /// The agent's process id on that host.
    pub pid: u32,
    /// The IP address other hosts reach the agent's host at (absent in
    /// records of older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The agent's labels (`[agent] labels`), which selectors pick it by.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: crate::labels::Labels,
}

/// A presence key as read back from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// The agent's name.
    pub name: String,
    /// `None` when the value is not a record coord wrote.
    pub record: Option<AgentRecord>,
    /// The session lease the record is on.
    pub lease: Option<LeaseId>,
}

/// `<namespace>/agents/`.
pub fn prefix(namespace: &str) -> String {
    format!("{}/agents/", namespace.trim_end_matches('/'))
}

/// `<namespace>/agents/<name>`.
pub fn key(namespace: &str, name: &str) -> String {
    format!("{}{name}", prefix(namespace))
}

impl AgentRecord {
    /// The bytes stored in etcd.
    pub fn to_value(&self) -> Vec<u8> {
        // Serialising a struct of strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Whether `other` was written by the same agent process.
    pub fn same_process(&self, other: &AgentRecord) -> bool {
        (&self.host, self.pid, &self.started_at) == (&other.host, other.pid, &other.started_at)
    }
}

/// What [`register`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// The key already held this record on this lease.
    Unchanged,
    /// The key was written.
    Written,
    /// The key is held on another lease by this same process: an older
    /// session whose lease is being revoked or is expiring. It will go.
    HeldByOldSession,
    /// Another agent process holds the name (two hosts share a name).
    HeldByOther(Agent),
}

/// Makes `<namespace>/agents/<name>` hold `record` on `lease`, without ever
/// taking the name from another live agent: the key is created only if
/// absent, and overwritten only if it is already on `lease`.
///
/// `observed` is what the caller last saw at the key (from a cache), so that
/// nothing is written when nothing changed.
pub async fn register(
    client: &Client,
    namespace: &str,
    name: &str,
    record: &AgentRecord,
    lease: LeaseId,
    observed: Option<&KeyValue>,
) -> Result<Registration, Error> {
    let key = key(namespace, name);
    let value = record.to_value();
    let holder = match observed {
        Some(kv) if kv.lease == Some(lease) && kv.value == value => {
            return Ok(Registration::Unchanged);
        }
        Some(kv) if kv.lease == Some(lease) => {
            client.put(&key, value, Some(lease)).await?;
            return Ok(Registration::Written);
        }
        Some(kv) => kv.clone(),
        None => match client.put_if_absent(&key, value, Some(lease)).await? {
            None => return Ok(Registration::Written),
            Some(existing) => existing,
        },
    };
    let other = Agent::from_kv(namespace, &holder).unwrap_or(Agent {
        name: name.to_owned(),
        record: None,
        lease: holder.lease,
    });
    Ok(match &other.record {
        Some(r) if r.same_process(record) => Registration::HeldByOldSession,
        _ => Registration::HeldByOther(other),
    })
}

impl Agent {
    /// Reads a presence key back; `None` for keys that are not directly
    /// under the prefix.
    pub fn from_kv(namespace: &str, kv: &KeyValue) -> Option<Agent> {
        let name = kv.key.strip_prefix(&prefix(namespace))?;
        if name.is_empty() || name.contains('/') {
            return None;
        }
        let record = serde_json::from_slice::<AgentRecord>(&kv.value)
            .ok()
            .map(|r| AgentRecord {
                // Anyone may write the key, and the host is logged: a
                // newline in it must not start a forged log line.
                host: Untrusted(&r.host).to_string(),
                // A label that is not one (anyone may write the key) is
                // dropped rather than shown or matched.
                labels: r
                    .labels
                    .into_iter()
                    .filter(|(k, v)| crate::labels::check(k, v).is_ok())
                    .collect(),
                ..r
            });
        Some(Agent {
            name: name.to_owned(),
            record,
            lease: kv.lease,
        })
    }
}

/// Every agent currently present, by name.
pub async fn list(client: &Client, namespace: &str) -> Result<Vec<Agent>, Error> {
    let snapshot = client.get_prefix(&prefix(namespace)).await?;
    Ok(snapshot
        .kvs
        .iter()
        .filter_map(|kv| Agent::from_kv(namespace, kv))
        .collect())
}
