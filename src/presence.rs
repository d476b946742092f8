//! Agent presence: one key per running agent under `<namespace>/agents/`,
//! attached to the agent's session lease so it disappears with the agent.

use serde::{Deserialize, Serialize};

use crate::etcd::{Client, Error, KeyValue, LeaseId};

/// What an agent says about itself in its presence key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// coord's version.
    pub version: String,
    /// SHA-256 of the manifest the agent is running, in hex.
    pub manifest_hash: String,
    /// When the agent started, RFC 3339.
    pub started_at: String,
}

/// A presence key as read back from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    pub name: String,
    /// `None` when the value is not a record coord wrote.
    pub record: Option<AgentRecord>,
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
        // Serialising a struct of strings cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl Agent {
    /// Reads a presence key back; `None` for keys that are not directly
    /// under the prefix.
    pub fn from_kv(namespace: &str, kv: &KeyValue) -> Option<Agent> {
        let name = kv.key.strip_prefix(&prefix(namespace))?;
        if name.is_empty() || name.contains('/') {
            return None;
        }
        Some(Agent {
            name: name.to_owned(),
            record: serde_json::from_slice(&kv.value).ok(),
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
