//! The events hooks receive: one closed set, serialised as versioned JSON.
//!
//! Schema version 1. Every event is a JSON object with `schema` (1),
//! `agent` (the agent's name), `time` (RFC 3339, UTC), `type` (one of the
//! kebab-case names below) and the fields of that type. New fields may be
//! added within a schema version; removing or changing one bumps it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The schema version of [`Envelope`].
pub const SCHEMA_VERSION: u32 = 1;

pub use crate::registry::Health;

/// Something that happened to one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Event {
    /// A rendered file was replaced.
    FileChanged {
        path: String,
        /// SHA-256 of the previous content; absent when the file is new.
        old_hash: Option<String>,
        new_hash: String,
    },
    /// A file's `on_change` hook failed through its retries, so its
    /// previous content was put back (`[[file]] revert = true`).
    FileReverted {
        path: String,
        /// SHA-256 of the render that was put aside.
        rejected_hash: String,
        /// Where the rejected content is kept: `<path>.rejected`.
        rejected_path: String,
        /// SHA-256 of the content put back.
        restored_hash: String,
        /// The hook's last error.
        error: String,
    },
    /// A file is about to be replaced: a hook may veto it.
    ValidateFile {
        /// The destination.
        path: String,
        /// Where the candidate content is staged on disk.
        staged_path: String,
        /// The candidate content.
        content: String,
    },
    ServiceHealthChanged {
        service: String,
        instance: String,
        old: Option<Health>,
        new: Health,
    },
    LockAcquired {
        lock: String,
        fencing_token: i64,
    },
    LockLost {
        lock: String,
        fencing_token: i64,
    },
    TaskFinished {
        task: String,
        fencing_token: i64,
        /// The exit code, when the command exited.
        exit_code: Option<i32>,
        /// The signal that ended it, when one did.
        signal: Option<i32>,
    },
    InstanceIdClaimed {
        pool: String,
        id: u32,
        /// The claim's create revision: larger for every new claim.
        generation: i64,
    },
    InstanceIdLost {
        pool: String,
        id: u32,
    },
}

impl Event {
    /// The kebab-case name, as in the JSON `type` field.
    pub fn name(&self) -> &'static str {
        match self {
            Event::FileChanged { .. } => "file-changed",
            Event::FileReverted { .. } => "file-reverted",
            Event::ValidateFile { .. } => "validate-file",
            Event::ServiceHealthChanged { .. } => "service-health-changed",
            Event::LockAcquired { .. } => "lock-acquired",
            Event::LockLost { .. } => "lock-lost",
            Event::TaskFinished { .. } => "task-finished",
            Event::InstanceIdClaimed { .. } => "instance-id-claimed",
            Event::InstanceIdLost { .. } => "instance-id-lost",
        }
    }

    /// The resource the event is about. Runs of one hook for one resource
    /// never overlap, and a burst of events for it is coalesced.
    pub fn resource(&self) -> String {
        match self {
            Event::FileChanged { path, .. } | Event::ValidateFile { path, .. } => {
                format!("file:{path}")
            }
            // Not `file:`: a hook both on_change and on_revert of one file
            // must get both events, not the latest of the two.
            Event::FileReverted { path, .. } => format!("file-reverted:{path}"),
            Event::ServiceHealthChanged {
                service, instance, ..
            } => format!("service:{service}/{instance}"),
            Event::LockAcquired { lock, .. } | Event::LockLost { lock, .. } => {
                format!("lock:{lock}")
            }
            Event::TaskFinished { task, .. } => format!("task:{task}"),
            Event::InstanceIdClaimed { pool, .. } | Event::InstanceIdLost { pool, .. } => {
                format!("instance-id:{pool}")
            }
        }
    }
}

/// An event with its schema version, agent and time: what hooks receive.
///
/// ```
/// use coord::agent::hooks::{Envelope, Event};
/// let e = Envelope::new("web-01", Event::LockAcquired { lock: "reports".into(), fencing_token: 42 });
/// let json = serde_json::to_value(&e).unwrap();
/// assert_eq!(json["type"], "lock-acquired");
/// assert_eq!(json["fencing_token"], 42);
/// assert_eq!(json["schema"], 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub schema: u32,
    pub agent: String,
    pub time: String,
    #[serde(flatten)]
    pub event: Event,
}

impl Envelope {
    /// Stamps `event` with the schema version, `agent` and the current time.
    pub fn new(agent: impl Into<String>, event: Event) -> Self {
        Envelope {
            schema: SCHEMA_VERSION,
            agent: agent.into(),
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            event,
        }
    }

    /// The JSON a hook reads on stdin.
    pub fn to_json(&self) -> String {
        // A struct of strings, numbers and options always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The event as `COORD_*` environment variables: `COORD_EVENT` (the
    /// type), `COORD_SCHEMA`, `COORD_AGENT`, `COORD_TIME`, and one
    /// `COORD_<FIELD>` per field (absent fields are left out). The staged
    /// content of a validate event is not copied into the environment; read
    /// it from `COORD_STAGED_PATH` or stdin. A process's environment cannot
    /// hold a NUL byte, so each one in a value (names and paths may carry
    /// any character) becomes U+FFFD there; stdin has the exact value.
    /// Left as is, one NUL kept the hook from starting at all.
    pub fn env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(self) else {
            return env;
        };
        for (key, value) in fields {
            let name = match key.as_str() {
                "type" => "COORD_EVENT".to_owned(),
                "content" => continue,
                other => format!("COORD_{}", other.to_ascii_uppercase()),
            };
            let text = match value {
                serde_json::Value::Null => continue,
                serde_json::Value::String(s) => s.replace('\0', "\u{fffd}"),
                other => other.to_string(),
            };
            env.insert(name, text);
        }
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_every_field_and_leaves_out_absent_ones_and_content() {
        let e = Envelope::new(
            "web-01",
            Event::ValidateFile {
                path: "/etc/x".into(),
                staged_path: "/etc/.x.tmp".into(),
                content: "secret body".into(),
            },
        );
        let env = e.env();
        assert_eq!(env["COORD_EVENT"], "validate-file");
        assert_eq!(env["COORD_PATH"], "/etc/x");
        assert_eq!(env["COORD_STAGED_PATH"], "/etc/.x.tmp");
        assert_eq!(env["COORD_SCHEMA"], "1");
        assert!(!env.contains_key("COORD_CONTENT"));
        let lost = Envelope::new(
            "a",
            Event::TaskFinished {
                task: "t".into(),
                fencing_token: 7,
                exit_code: Some(0),
                signal: None,
            },
        );
        let env = lost.env();
        assert_eq!(env["COORD_FENCING_TOKEN"], "7");
        assert!(!env.contains_key("COORD_SIGNAL"));
    }

    #[test]
    fn events_round_trip_through_json() {
        let e = Envelope::new(
            "a",
            Event::ServiceHealthChanged {
                service: "api".into(),
                instance: "a-api".into(),
                old: Some(Health::Passing),
                new: Health::Critical,
            },
        );
        let back: Envelope = serde_json::from_str(&e.to_json()).expect("parses");
        assert_eq!(back, e);
    }
}
