//! `[[service]]`: instances this host registers, with their health checks.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::time::Duration;

use super::Location;
use super::diagnostics::Diagnostics;
use super::file::{HookNames, hook_refs};
use super::reader::TableReader;
use crate::registry::Health;

/// One `[[service]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub name: String,
    /// The instance id, unique within the service (default `<agent>-<name>`).
    pub id: String,
    /// `host:port` clients connect to.
    pub address: String,
    pub metadata: BTreeMap<String, serde_json::Value>,
    pub check: Option<CheckSpec>,
    /// Hooks run when the instance's health changes.
    pub on_change: Vec<String>,
    pub location: Location,
}

/// How an instance's health is found out.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckSpec {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive good results before the instance counts as passing.
    pub successes: u32,
    /// Consecutive failed results before it counts as critical.
    pub failures: u32,
    /// The status before the first results are in.
    pub initial: Health,
}

/// The closed set of check kinds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// GET the URL: 2xx passes.
    Http(String),
    /// Connect to `host:port`.
    Tcp(String),
    /// Run a program: exit 0 passing, 1 warning, anything else critical.
    Exec(Vec<String>),
    /// Something outside reports (`coord services pass`) at least this often.
    Ttl(Duration),
}

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// A check's `interval`: a zero one would run the check in a hot loop.
pub const INTERVAL_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(24 * 3600);
/// A check's `timeout`.
pub const CHECK_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(3600);
/// A TTL check's `ttl`: how long a report counts.
pub const CHECK_TTL_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(24 * 3600);
/// `successes` and `failures`: results in a row before the status moves.
pub const THRESHOLD_RANGE: RangeInclusive<u32> = 1..=1000;

pub(super) fn service(
    d: &mut Diagnostics<'_>,
    mut t: TableReader<'_, '_>,
    agent: &str,
    hooks: &HookNames,
) -> Option<ServiceSpec> {
    let before = d.len();
    let name = t.required::<String>(d, "name", "give the service a name");
    if let Some(n) = &name
        && (n.is_empty() || n.contains('/'))
    {
        d.error(
            t.span_of("name"),
            format!("invalid service name `{n}`: non-empty, without `/`"),
        );
    }
    let id = t.optional::<String>(d, "id");
    if let Some(i) = &id
        && (i.is_empty() || i.contains('/'))
    {
        d.error(
            t.span_of("id"),
            format!("invalid instance id `{i}`: non-empty, without `/`"),
        );
    }
    let address = t.required::<String>(
        d,
        "address",
        "say where clients connect, e.g. \"10.0.0.5:8080\"",
    );
    if let Some(a) = &address
        && !a
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
    {
        d.error(
            t.span_of("address"),
            format!("invalid `address` \"{a}\": write it as host:port"),
        );
    }
    let mut metadata = t
        .optional::<serde_json::Value>(d, "metadata")
        .and_then(|m| match m {
            serde_json::Value::Object(map) => Some(map.into_iter().collect::<BTreeMap<_, _>>()),
            _ => {
                d.error(t.span_of("metadata"), "`metadata` must be a table");
                None
            }
        })
        .unwrap_or_default();
    if let Some(weight) = t.optional::<u32>(d, "weight") {
        metadata.insert("weight".to_owned(), weight.into());
    }
    let check = t.table(d, "check").and_then(|c| check(d, c));
    let on_change = hook_refs(d, &mut t, "on_change", hooks);
    let location = d.locate(t.span());
    t.finish(d);
    let name = name?;
    (d.len() == before).then(|| ServiceSpec {
        id: id.unwrap_or_else(|| format!("{agent}-{name}")),
        name,
        address: address.unwrap_or_default(),
        metadata,
        check,
        on_change,
        location,
    })
}

fn check(d: &mut Diagnostics<'_>, mut t: TableReader<'_, '_>) -> Option<CheckSpec> {
    let before = d.len();
    let http = t.optional::<String>(d, "http");
    let tcp = t.optional::<String>(d, "tcp");
    let exec = t.optional::<Vec<String>>(d, "exec");
    let ttl = t.within(d, "ttl", CHECK_TTL_RANGE);
    let interval = t.within(d, "interval", INTERVAL_RANGE);
    let timeout = t.within(d, "timeout", CHECK_TIMEOUT_RANGE);
    let successes = t.within(d, "successes", THRESHOLD_RANGE).unwrap_or(1);
    let failures = t.within(d, "failures", THRESHOLD_RANGE).unwrap_or(1);
    let initial = match t.optional::<String>(d, "initial").as_deref() {
        None | Some("critical") => Health::Critical,
        Some("passing") => Health::Passing,
        Some("warning") => Health::Warning,
        Some(other) => {
            d.error(
                t.span_of("initial"),
                format!("unknown `initial` status \"{other}\": use passing, warning or critical"),
            );
            Health::Critical
        }
    };
    // Given, even if invalid (that was reported): not a missing kind.
    let kinds = ["http", "tcp", "exec", "ttl"].map(|k| t.has(k));
    let kind = match (http, tcp, exec, ttl) {
        _ if kinds.iter().filter(|k| **k).count() > 1 => {
            d.error(t.span(), "a check is one of `http`, `tcp`, `exec` or `ttl`");
            None
        }
        (Some(url), None, None, None) => {
            if !url.starts_with("http://") {
                d.error(
                    t.span_of("http"),
                    format!("invalid `http` check \"{url}\": only http:// URLs are checked (health endpoints are local)"),
                );
            }
            Some(CheckKind::Http(url))
        }
        (None, Some(addr), None, None) => Some(CheckKind::Tcp(addr)),
        (None, None, Some(argv), None) => {
            if argv.is_empty() {
                d.error(
                    t.span_of("exec"),
                    "`exec` is empty: give the program and its arguments",
                );
            }
            Some(CheckKind::Exec(argv))
        }
        (None, None, None, Some(ttl)) => Some(CheckKind::Ttl(ttl)),
        _ if kinds.iter().any(|k| *k) => None,
        _ => {
            d.error(
                t.span(),
                "missing check kind: give `http`, `tcp`, `exec` or `ttl`",
            );
            None
        }
    };
    t.finish(d);
    (d.len() == before).then(|| CheckSpec {
        kind: kind.unwrap_or(CheckKind::Ttl(Duration::ZERO)),
        interval: interval.unwrap_or(DEFAULT_INTERVAL),
        timeout: timeout.unwrap_or(DEFAULT_CHECK_TIMEOUT),
        successes,
        failures,
        initial,
    })
}
