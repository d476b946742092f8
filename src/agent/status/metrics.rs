//! The agent's Prometheus metrics (prometheus-client, OpenMetrics text).
//!
//! Events the agent sees (renders, hook runs, task runs) are counted as they
//! happen; states (session, services, locks, ids, queues) and the library's
//! own counters (lease renewals, watch reconnects, re-lists and events, which
//! `coord::etcd` keeps as plain atomics) are read at scrape time by
//! [`Live`], so they can never drift from what `/status` shows.

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::board::Board;
use super::report::{QueueName, ResourceKind, SessionPhase};
use crate::etcd::{SessionStats, WatchStats};
use crate::registry::Health;

/// Label sets: a few fixed keys with values from the manifest.
pub(super) type Labels = Vec<(&'static str, String)>;

/// 1 ms to about 65 s: renders take milliseconds, hooks up to their timeout.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

pub(super) struct Metrics {
    registry: Registry,
    pub file_renders: Family<Labels, Counter>,
    pub file_render_seconds: Histogram,
    pub hook_runs: Family<Labels, Counter>,
    pub hook_run_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    pub hook_gate_wait_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    pub task_runs: Family<Labels, Counter>,
    pub dns_queries: Family<Labels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(live: Live) -> Metrics {
        let mut registry = Registry::default();
        let file_renders = Family::<Labels, Counter>::default();
        registry.register(
            "coord_file_renders",
            "Renders of [[file]]s, by result: replaced, unchanged or failed (the old file stays)",
            file_renders.clone(),
        );
        let file_render_seconds = duration_histogram();
        registry.register_with_unit(
            "coord_file_render_duration",
            "Time to render a file and write it (check command and validate hooks included)",
            Unit::Seconds,
            file_render_seconds.clone(),
        );
        let hook_runs = Family::<Labels, Counter>::default();
        registry.register(
            "coord_hook_runs",
            "Hook runs, by hook and result: ok, vetoed or failed (each retry is a run)",
            hook_runs.clone(),
        );
        let hook_run_seconds: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        registry.register_with_unit(
            "coord_hook_run_duration",
            "Time a hook run took, by hook",
            Unit::Seconds,
            hook_run_seconds.clone(),
        );
        let hook_gate_wait_seconds: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        registry.register_with_unit(
            "coord_hook_gate_wait_duration",
            "Time a gated hook run waited for a place at its fleet gate (after its splay), by hook",
            Unit::Seconds,
            hook_gate_wait_seconds.clone(),
        );
        let task_runs = Family::<Labels, Counter>::default();
        registry.register(
            "coord_task_runs",
            "Task runs ended, by task and exit: the exit code, signal_N, lock_lost or stopped",
            task_runs.clone(),
        );
        let dns_queries = Family::<Labels, Counter>::default();
        registry.register(
            "coord_dns_queries",
            "DNS queries answered, by type (A, AAAA, SRV, TXT, CNAME, ANY, SOA or other) and result: answer, empty, nxdomain, refused (outside the zone), servfail (cache not read yet) or formerr",
            dns_queries.clone(),
        );
        registry.register_collector(Box::new(live));
        Metrics {
            registry,
            file_renders,
            file_render_seconds,
            hook_runs,
            hook_run_seconds,
            hook_gate_wait_seconds,
            task_runs,
            dns_queries,
        }
    }

    /// The exposition, OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; a collector's error would be ours.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "Could not encode the metrics.");
        }
        out
    }
}

/// What is read at scrape time.
#[derive(Debug)]
pub(super) struct Live {
    pub board: Arc<Mutex<Board>>,
    pub session: Arc<SessionStats>,
    pub watch: Arc<WatchStats>,
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value);
    let m = encoder.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

fn gauges(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    for (labels, value) in values {
        let f = m.encode_family(&labels)?;
        ConstGauge::new(value).encode(f)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    let m = encoder.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

// prometheus-client ends the help of registered metrics with a period;
// these are written out whole, so they carry their own.
impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        counter(
            e,
            "coord_session_leases_granted",
            "Session leases granted (the first, and one after each loss).",
            self.session.granted(),
        )?;
        counter(
            e,
            "coord_session_lease_renewals",
            "Keepalives etcd answered, each moving the session's local deadline.",
            self.session.renewals(),
        )?;
        counter(
            e,
            "coord_session_leases_lost",
            "Session leases given up as lost (no keepalive answer before the local deadline, or etcd said expired).",
            self.session.lost(),
        )?;
        counter(
            e,
            "coord_session_keepalive_moves",
            "Keepalive streams moved to the next endpoint after one left a keepalive unanswered too long.",
            self.session.moved(),
        )?;
        counter(
            e,
            "coord_watch_reconnects",
            "Watch streams opened again after an error or disconnect.",
            self.watch.reconnects(),
        )?;
        counter(
            e,
            "coord_watch_relists",
            "Full re-reads of a watched prefix after a compaction (or etcd's revision going backwards).",
            self.watch.relists(),
        )?;
        counter(
            e,
            "coord_watch_events",
            "Changed keys received on the agent's cache watches (the work writes in etcd cost this agent; first reads and re-lists not counted).",
            self.watch.events(),
        )?;
        let b = self.board.lock().unwrap_or_else(|p| p.into_inner());
        let phase = b.session_phase();
        gauges(
            e,
            "coord_session_state",
            "1 for the session's current state, 0 for the others.",
            SessionPhase::ALL
                .iter()
                .map(|p| (vec![("state", p.name().to_owned())], i64::from(*p == phase))),
        )?;
        gauge(
            e,
            "coord_cache_ready",
            "1 once the reconciler's cache has completed its first full read.",
            i64::from(b.cache_ready),
        )?;
        gauge(
            e,
            "coord_healthy",
            "1 while /health answers 200 (session alive and cache ready).",
            i64::from(b.problems().is_empty()),
        )?;
        let healths = [
            Health::Passing,
            Health::Warning,
            Health::Critical,
            Health::Maintenance,
        ];
        gauges(
            e,
            "coord_services",
            "Service instances of this agent, by effective health.",
            healths.iter().map(|h| {
                let n = b.count(ResourceKind::Service, |state| state == h.name());
                (vec![("health", h.name().to_owned())], n as i64)
            }),
        )?;
        gauge(
            e,
            "coord_locks_held",
            "Task locks this agent holds now.",
            b.count(ResourceKind::Lock, |state| state.starts_with("held")) as i64,
        )?;
        gauge(
            e,
            "coord_instance_ids_held",
            "Instance ids this agent holds now.",
            b.count(ResourceKind::InstanceId, |state| state.starts_with("held")) as i64,
        )?;
        gauges(
            e,
            "coord_hook_gate_waiting",
            "Hook runs waiting at their fleet gate now (its splay, then a place), by hook.",
            b.gate_waits()
                .into_iter()
                .map(|(hook, n)| (vec![("hook", hook.to_owned())], n)),
        )?;
        gauges(
            e,
            "coord_reconcile_queue_depth",
            "Work waiting, by queue: presence = reconciler resources due or in backoff; files = files dirty (debouncing) or waiting to retry.",
            [QueueName::Presence, QueueName::Files]
                .iter()
                .map(|q| (vec![("queue", q.name().to_owned())], b.queue(*q) as i64)),
        )?;
        Ok(())
    }
}
