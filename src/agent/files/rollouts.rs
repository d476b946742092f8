//! What a staged agent says of the rollouts that name it, and the `auto`
//! rollouts it ends: its report on the files that read the key (rendered,
//! checked, hooks) with its services' health kept current, or "not
//! affected" when none of its files reads the key; an `auto` rollout is
//! aborted as soon as the report fails (a critical service included) and
//! promoted after its soak when no staged agent still running is left
//! without a clean report.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::agent::services::ServiceStats;
use crate::etcd::{Client, Subscription};
use crate::registry::Health;
use crate::rollout::{self, Report, Staged};

/// The agent's side of staged rollouts.
pub(super) struct Rollouts {
    namespace: String,
    agent: String,
    /// What this agent reports of the rollouts staged for it, by key.
    reports: BTreeMap<String, Report>,
    /// `auto` rollouts this agent reported clean on: when their soak ends.
    soaks: BTreeMap<String, (i64, Instant)>,
    /// Every rollout record of the namespace, to find those that name this
    /// agent although none of its files reads their key.
    records: Option<Subscription>,
    /// The health of the agent's service instances, from its services
    /// controller.
    services: Option<watch::Receiver<ServiceStats>>,
}

impl Rollouts {
    pub(super) fn new(namespace: &str) -> Self {
        Rollouts {
            namespace: namespace.to_owned(),
            agent: String::new(),
            reports: BTreeMap::new(),
            soaks: BTreeMap::new(),
            records: None,
            services: None,
        }
    }

    pub(super) fn set_agent(&mut self, agent: &str) {
        self.agent = agent.to_owned();
    }

    /// Follows the rollout records and the services' health.
    pub(super) fn follow(
        &mut self,
        records: Subscription,
        services: watch::Receiver<ServiceStats>,
    ) {
        self.records = Some(records);
        self.services = Some(services);
    }

    /// When the next soak ends.
    pub(super) fn next_soak(&self) -> Option<Instant> {
        self.soaks.values().map(|(_, at)| *at).min()
    }

    /// Resolves when a rollout record or a service's health changed
    /// (never, when not following them).
    pub(super) async fn changed(&mut self) {
        let records = async {
            match self.records.as_mut() {
                // Its first full read brings no event of its own.
                Some(r) if !r.is_ready() => r.ready().await,
                Some(r) => {
                    r.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        let services = async {
            let Some(s) = self.services.as_mut() else {
                return std::future::pending().await;
            };
            if s.changed().await.is_err() {
                // The services controller ended: nothing more to follow.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = records => {}
            () = services => {}
        }
    }

    fn health(&self) -> BTreeMap<String, Health> {
        self.services
            .as_ref()
            .map(|s| s.borrow().health.clone())
            .unwrap_or_default()
    }

    /// The rollouts whose record names this agent, by key (none until the
    /// records are read).
    fn staged_here(&self) -> BTreeMap<String, Staged> {
        let Some(records) = self.records.as_ref().filter(|r| r.is_ready()) else {
            return BTreeMap::new();
        };
        let base = rollout::records_prefix(&self.namespace);
        records
            .list()
            .into_iter()
            .filter_map(|kv| {
                let key = kv.key.strip_prefix(&base)?.to_owned();
                let r = rollout::Rollout::from_value(&key, &kv.value).ok()?;
                if !r.stages(&self.agent) {
                    return None;
                }
                let id = kv.create_revision;
                Some((key, Staged { rollout: r, id }))
            })
            .collect()
    }

    /// Reports "not affected" on the rollouts naming this agent that none
    /// of its files reads (`reads(record)`: `Some(true)` when a file's
    /// last render read it, `None` while a file has not rendered yet), and
    /// puts the services' health into the reports of rollouts still
    /// staged — aborting an `auto` one whose report now fails.
    pub(super) async fn refresh(&mut self, client: &Client, reads: impl Fn(&str) -> Option<bool>) {
        let staged = self.staged_here();
        let health = self.health();
        let at = now();
        let mut write = false;
        for (key, s) in &staged {
            let record = rollout::record_key(&self.namespace, key);
            let current = self.reports.get(key).filter(|r| r.rollout == s.id);
            if current.is_none() && reads(&record) == Some(false) {
                debug!(key = %key, "None of this agent's files reads the staged key; reported not affected.");
                self.reports
                    .insert(key.clone(), Report::unaffected(s.id, at.clone()));
                self.soak(key, s);
                write = true;
                continue;
            }
            let Some(report) = self.reports.get_mut(key).filter(|r| r.rollout == s.id) else {
                continue;
            };
            if report.unaffected || report.services == health {
                continue;
            }
            let was_failed = report.failed();
            report.services = health.clone();
            report.at = at.clone();
            write = true;
            if report.failed() && !was_failed && s.rollout.auto {
                let critical = report.critical().join(", ");
                self.soaks.remove(key);
                self.abort(client, key, s.id, &format!("critical: {critical}"))
                    .await;
            }
        }
        if write {
            self.write(client).await;
        }
    }

    /// Reports how a render carrying staged rollouts went; with `auto`, a
    /// failure aborts the rollout at once and a clean report waits for
    /// the soak to end.
    pub(super) async fn report(
        &mut self,
        client: &Client,
        staged: &[(String, Staged)],
        rendered: bool,
        checked: bool,
        hooks: Option<bool>,
        error: Option<String>,
    ) {
        if staged.is_empty() {
            return;
        }
        let at = now();
        let services = self.health();
        for (key, s) in staged {
            let report = Report {
                rollout: s.id,
                rendered,
                checked,
                hooks,
                error: error.clone(),
                at: at.clone(),
                unaffected: false,
                services: services.clone(),
            };
            // A failure stands for the rollout: a later good render of
            // another file does not wash it out.
            if self
                .reports
                .get(key)
                .is_some_and(|old| old.rollout == s.id && old.failed())
            {
                continue;
            }
            if report.clean() {
                self.soak(key, s);
            }
            let failed = report.failed();
            let why = error
                .clone()
                .unwrap_or_else(|| format!("critical: {}", report.critical().join(", ")));
            self.reports.insert(key.clone(), report);
            if failed && s.rollout.auto {
                self.soaks.remove(key);
                self.abort(client, key, s.id, &why).await;
            }
        }
        self.write(client).await;
    }

    /// Counts the soak of an `auto` rollout from when it was staged.
    fn soak(&mut self, key: &str, s: &Staged) {
        if !s.rollout.auto {
            return;
        }
        let staged_at = humantime::parse_rfc3339(&s.rollout.staged_at)
            .unwrap_or_else(|_| std::time::SystemTime::now());
        let ends = staged_at + Duration::from_millis(s.rollout.soak_ms);
        let left = ends
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        self.soaks
            .insert(key.to_owned(), (s.id, Instant::now() + left));
    }

    async fn abort(&self, client: &Client, key: &str, id: i64, why: &str) {
        match rollout::end_if(client, &self.namespace, key, id, false).await {
            Ok(true) => {
                warn!(key = %key, error = %why, "Staged rollout failed on this agent; aborted it for everyone.")
            }
            Ok(false) => {}
            Err(e) => warn!(key = %key, error = %e, "Could not abort the failed rollout."),
        }
    }

    async fn write(&self, client: &Client) {
        if let Err(e) = rollout::report(client, &self.namespace, &self.agent, &self.reports).await {
            warn!(error = %e, "Could not write this agent's rollout reports.");
        }
    }

    /// `auto` rollouts whose soak ended: promoted when every staged agent
    /// still running reported clean (or not affected), aborted when one
    /// failed, looked at again a second later while a running one has not
    /// reported clean. A staged agent with no presence record (none of
    /// that name runs) is not waited for.
    pub(super) async fn soaked(&mut self, client: &Client) {
        let now = Instant::now();
        let due: Vec<(String, i64)> = self
            .soaks
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(k, (id, _))| (k.clone(), *id))
            .collect();
        for (key, id) in due {
            self.soaks.remove(&key);
            let again = now + Duration::from_secs(1);
            let staged = match rollout::staged(client, &self.namespace, &key).await {
                Ok(Some(s)) if s.id == id => s,
                Ok(_) => continue,
                Err(e) => {
                    debug!(key = %key, error = %e, "Could not read the rollout after its soak; looking again.");
                    self.soaks.insert(key, (id, again));
                    continue;
                }
            };
            let all = &staged.rollout.agents;
            let looked = match rollout::reports(client, &self.namespace, &key, id).await {
                Ok(reports) => rollout::absent(client, &self.namespace, &key, all)
                    .await
                    .map(|absent| (reports, absent)),
                Err(e) => Err(e),
            };
            let (reports, absent) = match looked {
                Ok(r) => r,
                Err(e) => {
                    debug!(key = %key, error = %e, "Could not read the rollout's reports or agents; looking again.");
                    self.soaks.insert(key, (id, again));
                    continue;
                }
            };
            let failed: Vec<&String> = all
                .iter()
                .filter(|a| reports.get(*a).is_some_and(Report::failed))
                .collect();
            let waiting = all
                .iter()
                .any(|a| !absent.contains(a) && !reports.get(a).is_some_and(Report::clean));
            if failed.is_empty() && waiting {
                self.soaks.insert(key, (id, again));
                continue;
            }
            let promote = failed.is_empty();
            match rollout::end_if(client, &self.namespace, &key, id, promote).await {
                Ok(true) if promote => {
                    let absent: Vec<&str> = absent.iter().map(String::as_str).collect();
                    info!(key = %key, absent = %absent.join(", "), "Staged rollout soaked clean on every staged agent running; promoted.")
                }
                Ok(true) => {
                    let failed: Vec<&str> = failed.iter().map(|a| a.as_str()).collect();
                    warn!(key = %key, failed = %failed.join(", "), "Staged rollout failed on a staged agent; aborted.")
                }
                Ok(false) => {}
                Err(e) => warn!(key = %key, error = %e, "Could not end the soaked rollout."),
            }
        }
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
