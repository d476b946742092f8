//! Every function a template can call, and the data of the render they
//! read from. A function reads through [`RenderData`], which records each
//! key and prefix read — what the file depends on — and answers only from
//! what was read from etcd at the render's one revision.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use minijinja::value::{Kwargs, Object, Value};
use minijinja::{Environment, ErrorKind, State};

use crate::agent::manifest::MissingKeys;
use crate::etcd::{CacheSnapshot, KeyValue, ReadSet};
use crate::registry::{self, Health};

/// The name under which the per-render data is passed to templates.
pub(super) const DATA: &str = "__coord_data";

/// coord's template functions, with the global functions minijinja brings,
/// for "did you mean" on a misspelt call.
pub(super) const FUNCTIONS: &[&str] = &[
    "key",
    "key_or",
    "keys",
    "ls",
    "json",
    "service",
    "instance_id",
    "range",
    "dict",
    "namespace",
    "debug",
];

/// Adds coord's functions to `env`.
pub(super) fn register(env: &mut Environment<'static>) {
    env.add_function("key", key);
    env.add_function("key_or", key_or);
    env.add_function("keys", keys);
    env.add_function("ls", ls);
    env.add_function("json", json);
    env.add_function("service", service);
    env.add_function("instance_id", instance_id);
}

/// What one pass of a render read.
#[derive(Debug, Default)]
pub(super) struct Reads {
    pub set: ReadSet,
    /// Prefixes that had at least one key.
    pub nonempty: BTreeSet<String>,
    /// Something was asked for that the view does not hold: the pass's
    /// output means nothing, read it and render again.
    pub incomplete: bool,
}

/// What a render reads from, and what it has read.
#[derive(Debug)]
pub struct RenderData {
    view: CacheSnapshot,
    /// What `view` holds; a read outside it is noted and answered as absent.
    covered: ReadSet,
    namespace: String,
    agent: String,
    missing: MissingKeys,
    reads: Mutex<Reads>,
    missing_key: Mutex<Option<String>>,
}

impl Object for RenderData {}

impl RenderData {
    pub(super) fn new(
        view: CacheSnapshot,
        covered: ReadSet,
        namespace: &str,
        agent: &str,
        missing: MissingKeys,
    ) -> Self {
        RenderData {
            view,
            covered,
            namespace: namespace.to_owned(),
            agent: agent.to_owned(),
            missing,
            reads: Mutex::default(),
            missing_key: Mutex::default(),
        }
    }

    /// The data of the render `state` belongs to.
    pub fn of(state: &State<'_, '_>) -> Result<Arc<RenderData>, minijinja::Error> {
        state
            .lookup(DATA)
            .and_then(|v| v.downcast_object::<RenderData>())
            .ok_or_else(|| {
                minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "coord data is not available here",
                )
            })
    }

    /// The agent's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn reads(&self) -> std::sync::MutexGuard<'_, Reads> {
        self.reads.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn take_reads(&self) -> Reads {
        std::mem::take(&mut *self.reads())
    }

    /// The key whose absence failed the render, if one did.
    pub(super) fn take_missing_key(&self) -> Option<String> {
        self.missing_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn note_missing(&self, what: String) {
        *self.missing_key.lock().unwrap_or_else(|p| p.into_inner()) = Some(what);
    }

    /// The raw value of `key`, recording the read. A staged rollout of
    /// the key that names this agent gives its new value instead (its
    /// record is read with the key, at the same revision).
    pub fn read_key(&self, key: &str) -> Option<Vec<u8>> {
        // etcd has no empty key; an empty name comes from a value not yet
        // read (a pointer in an incomplete pass) or a template's mistake.
        if key.is_empty() {
            return None;
        }
        let record = crate::rollout::record_key(&self.namespace, key);
        let mut reads = self.reads();
        reads.set.add_key(key);
        reads.set.add_key(&record);
        if !self.covered.covers_key(key) || !self.covered.covers_key(&record) {
            reads.incomplete = true;
            return None;
        }
        if let Some(staged) = self.staged(key, &record) {
            return Some(staged);
        }
        self.view.get(key).map(|kv| kv.value.clone())
    }

    /// The value a rollout staged for this agent, if one did.
    fn staged(&self, key: &str, record: &str) -> Option<Vec<u8>> {
        let kv = self.view.get(record)?;
        let rollout = crate::rollout::Rollout::from_value(key, &kv.value).ok()?;
        rollout
            .stages(&self.agent)
            .then(|| rollout.value.into_bytes())
    }

    /// Every key under `prefix` with its value, recording the read.
    pub fn read_prefix(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let records = crate::rollout::record_key(&self.namespace, prefix);
        let mut reads = self.reads();
        reads.set.add_prefix(prefix);
        reads.set.add_prefix(&records);
        if !self.covered.covers_prefix(prefix) || !self.covered.covers_prefix(&records) {
            reads.incomplete = true;
            return Vec::new();
        }
        // Staged values replace the current ones; a key staged but not yet
        // written appears too.
        let mut entries: std::collections::BTreeMap<String, Vec<u8>> = self
            .view
            .under(prefix)
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect();
        let base = crate::rollout::records_prefix(&self.namespace);
        for kv in self.view.under(&records) {
            if let Some(key) = kv.key.strip_prefix(&base)
                && let Some(value) = self.staged(key, &kv.key)
            {
                entries.insert(key.to_owned(), value);
            }
        }
        let entries: Vec<(String, Vec<u8>)> = entries.into_iter().collect();
        if !entries.is_empty() {
            reads.nonempty.insert(prefix.to_owned());
        }
        entries
    }
}

pub(super) fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// `key("/app/x")` → the value; a missing key fails the render (or reads
/// empty with `missing = "empty"`).
fn key(state: &State<'_, '_>, k: &str) -> Result<Value, minijinja::Error> {
    let data = RenderData::of(state)?;
    match data.read_key(k) {
        Some(v) => Ok(Value::from(text(v))),
        None if data.missing == MissingKeys::Empty => Ok(Value::from("")),
        None => {
            data.note_missing(k.to_owned());
            Err(minijinja::Error::new(
                ErrorKind::UndefinedError,
                format!("key `{k}` is missing"),
            ))
        }
    }
}

/// `key_or("/app/x", "default")`.
fn key_or(state: &State<'_, '_>, k: &str, default: Value) -> Result<Value, minijinja::Error> {
    let data = RenderData::of(state)?;
    Ok(data.read_key(k).map_or(default, |v| Value::from(text(v))))
}

/// `keys("/app/")` → `{"a": "1", "b/c": "2"}`: keys relative to the prefix.
fn keys(state: &State<'_, '_>, prefix: &str) -> Result<Value, minijinja::Error> {
    let data = RenderData::of(state)?;
    let map: BTreeMap<String, String> = data
        .read_prefix(prefix)
        .into_iter()
        .map(|(k, v)| (k[prefix.len()..].to_owned(), text(v)))
        .collect();
    Ok(Value::from(map))
}

/// `ls("/app/")` → the names directly under the prefix, like `ls`.
fn ls(state: &State<'_, '_>, prefix: &str) -> Result<Value, minijinja::Error> {
    let data = RenderData::of(state)?;
    let names: BTreeSet<String> = data
        .read_prefix(prefix)
        .into_iter()
        .filter_map(|(k, _)| {
            let rest = &k[prefix.len()..];
            rest.split('/')
                .next()
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        })
        .collect();
    Ok(Value::from(names.into_iter().collect::<Vec<_>>()))
}

/// `json(text)` → the parsed value.
fn json(text: &str) -> Result<Value, minijinja::Error> {
    serde_json::from_str::<serde_json::Value>(text)
        .map(|v| Value::from(minijinja::value::Serde(v)))
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("not JSON: {e}")))
}

/// `instance_id("worker")` → the id this agent holds in the pool; a render
/// without one fails (or reads empty with `missing = "empty"`), and re-runs
/// when the claim changes.
fn instance_id(state: &State<'_, '_>, pool: &str) -> Result<Value, minijinja::Error> {
    let data = RenderData::of(state)?;
    let prefix = crate::ids::prefix(&data.namespace, pool);
    let mine = data
        .read_prefix(&prefix)
        .into_iter()
        .find_map(|(key, value)| {
            let record: crate::ids::ClaimRecord = serde_json::from_slice(&value).ok()?;
            (record.agent == data.agent)
                .then(|| crate::ids::id_of(&key))
                .flatten()
        });
    match mine {
        Some(id) => Ok(Value::from(id)),
        None if data.missing == MissingKeys::Empty => Ok(Value::from("")),
        None => {
            data.note_missing(format!("{prefix}<id of {}>", data.agent));
            Err(minijinja::Error::new(
                ErrorKind::UndefinedError,
                format!("no instance id held in pool `{pool}`"),
            ))
        }
    }
}

/// `service("api")` → the instances listed for discovery, each a map with
/// the manifest's names — `id`, `address`, `weight` (1 unless set),
/// `metadata` — and `host`, `port`, `health` and `agent`, sorted by id.
/// `addr` is `address` again, for templates written before it matched the
/// manifest. Keyword arguments filter: `health="any"` (or a list such as
/// `["passing"]`) chooses by health instead of discovery; any other keyword
/// must equal that metadata value (`zone="eu-1"`).
fn service(state: &State<'_, '_>, name: &str, filters: Kwargs) -> Result<Value, minijinja::Error> {
    let data = RenderData::of(state)?;
    let ns = data.namespace().to_owned();
    let read = |prefix: String| -> Vec<KeyValue> {
        data.read_prefix(&prefix)
            .into_iter()
            .map(|(key, value)| KeyValue {
                key,
                value,
                create_revision: 0,
                mod_revision: 0,
                version: 0,
                lease: None,
            })
            .collect()
    };
    let endpoints = read(format!("{}{name}/", registry::services_prefix(&ns)));
    let health = read(format!("{}{name}/", registry::health_prefix(&ns)));
    let wanted_health: Option<Vec<String>> = match filters.get::<Option<Value>>("health")? {
        None => None,
        Some(v) if v.as_str() == Some("any") => Some(
            [
                Health::Passing,
                Health::Warning,
                Health::Critical,
                Health::Maintenance,
            ]
            .iter()
            .map(|h| h.name().to_owned())
            .collect(),
        ),
        Some(v) if v.as_str().is_some() => Some(vec![v.as_str().unwrap_or_default().to_owned()]),
        Some(v) => Some(
            v.try_iter()?
                .map(|h| h.as_str().map(str::to_owned).unwrap_or_default())
                .collect(),
        ),
    };
    // Every filter is read before any instance is looked at: with no
    // instance listed (maintenance, a new service) a filter left unread
    // would fail the render as an unknown keyword.
    let metadata_filters: Vec<(String, String)> = filters
        .args()
        .filter(|k| *k != "health")
        .map(|k| Ok((k.to_owned(), filters.get::<Value>(k)?.to_string())))
        .collect::<Result<_, minijinja::Error>>()?;
    let mut out = Vec::new();
    for inst in registry::instances(&ns, Some(name), endpoints, health) {
        let status = inst.health.as_ref().map(|h| h.status);
        let keep = match &wanted_health {
            None => inst.is_listed(),
            Some(list) => status.is_some_and(|s| list.iter().any(|w| w == s.name())),
        };
        if !keep {
            continue;
        }
        let metadata = inst.metadata().cloned().unwrap_or_default();
        let matches = metadata_filters.iter().all(|(key, want)| {
            metadata
                .get(key)
                .map(|v| match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .as_deref()
                == Some(want.as_str())
        });
        if !matches {
            continue;
        }
        let address = inst.addr().unwrap_or_default().to_owned();
        let weight = inst.weight();
        let (host, port) = address
            .rsplit_once(':')
            .map_or((address.clone(), String::new()), |(h, p)| {
                (h.to_owned(), p.to_owned())
            });
        out.push(minijinja::context! {
            id => inst.id,
            address => address.clone(),
            addr => address,
            host => host,
            port => port,
            weight => weight,
            health => status.map(Health::name),
            agent => inst.health.as_ref().map(|h| h.agent.clone()),
            metadata => Value::from(minijinja::value::Serde(metadata)),
        });
    }
    filters
        .assert_all_used()
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from(out))
}
