//! `service(name)` in templates: the fleet's instances of a service.

use minijinja::value::{Kwargs, Value};
use minijinja::{ErrorKind, State};

use crate::agent::files::RenderData;
use crate::etcd::KeyValue;
use crate::registry::{self, Health};

/// `service("api")` → the instances listed for discovery, each a map with
/// the manifest's names — `id`, `address`, `weight` (1 unless set),
/// `metadata` — and `host`, `port`, `health` and `agent`, sorted by id.
/// `addr` is `address` again, for templates written before it matched the
/// manifest. Keyword arguments filter: `health="any"` (or a list such as
/// `["passing"]`) chooses by health instead of discovery; any other keyword
/// must equal that metadata value (`zone="eu-1"`).
pub fn template_service(
    state: &State<'_, '_>,
    name: &str,
    filters: Kwargs,
) -> Result<Value, minijinja::Error> {
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
        let mut matches = true;
        for key in filters.args().filter(|k| *k != "health") {
            let want: Value = filters.get(key)?;
            let have = metadata.get(key).map(|v| match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            });
            if have.as_deref() != Some(&want.to_string()) {
                matches = false;
            }
        }
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
