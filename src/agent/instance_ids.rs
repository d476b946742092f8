//! `[[instance_id]]`: hold one id per pool on the agent's session.
//!
//! A claim lives as long as the session lease. When the lease is lost, the
//! id may be someone else's soon: its file is removed and the lost hooks
//! fire at once; a new claim is made as soon as etcd answers — the same id
//! when it is still free, since the last id is remembered in the state
//! directory (and across restarts).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::controller::{Context, Loops, RetryAt};
use super::hold::key_gone;
use super::hooks::{AmbientEnv, Event, HookRunner};
use super::manifest::InstanceIdSpec;
use super::sleep_or_stop;
use super::state_dir::{StateDir, write_atomically};
use super::status::report::ResourceKind;
use crate::etcd::{Backoff, LeaseId, SessionState, alive_lease, unreachable_in};
use crate::ids::{self, ClaimRecord, IdError};

/// The ids this agent holds, by pool.
pub type HeldIds = watch::Receiver<BTreeMap<String, u32>>;

/// One loop per pool.
#[derive(Debug, Clone)]
pub struct InstanceIdsController {
    ctx: Context,
    state: StateDir,
    held: Arc<watch::Sender<BTreeMap<String, u32>>>,
    ambient: Option<AmbientEnv>,
}

impl InstanceIdsController {
    pub fn new(ctx: &Context, state: StateDir) -> Self {
        InstanceIdsController {
            ctx: ctx.clone(),
            state,
            held: Arc::new(watch::Sender::new(BTreeMap::new())),
            ambient: None,
        }
    }

    /// Publishes held ids as `COORD_INSTANCE_ID_<POOL>` in shell hooks'
    /// environment.
    pub fn with_ambient(mut self, ambient: AmbientEnv) -> Self {
        self.ambient = Some(ambient);
        self
    }

    fn publish(&self, pool: &str, id: Option<u32>) {
        let state = id.map_or_else(|| "claiming".to_owned(), |id| format!("held id {id}"));
        self.ctx
            .status
            .set(ResourceKind::InstanceId, pool, &state, None);
        self.held.send_modify(|h| match id {
            Some(id) => {
                h.insert(pool.to_owned(), id);
            }
            None => {
                h.remove(pool);
            }
        });
        if let Some(ambient) = &self.ambient {
            let name = format!(
                "COORD_INSTANCE_ID_{}",
                pool.to_uppercase().replace('-', "_")
            );
            let mut env = ambient.write().unwrap_or_else(|p| p.into_inner());
            match id {
                Some(id) => env.insert(name, id.to_string()),
                None => env.remove(&name),
            };
        }
    }

    /// The id is held but its file could not be written yet.
    fn publish_unwritten(&self, pool: &str, file: &IdFile) {
        if let (Some(path), Some(error)) = (&file.path, &file.error) {
            self.ctx.status.set(
                ResourceKind::InstanceId,
                pool,
                "held, file not written",
                Some(format!("cannot write {}: {error}", path.display())),
            );
        }
    }

    /// The ids held now, by pool.
    pub fn held(&self) -> HeldIds {
        self.held.subscribe()
    }

    pub async fn run(self, mut specs: watch::Receiver<Vec<InstanceIdSpec>>) {
        let (session, hooks, cancel) = (
            self.ctx.session.clone(),
            self.ctx.hooks.clone(),
            self.ctx.cancel.clone(),
        );
        let mut loops: Loops<String> = Loops::new(&cancel);
        let mut current: BTreeMap<String, InstanceIdSpec> = BTreeMap::new();
        loop {
            let wanted = specs.borrow_and_update().clone();
            // A removed or changed pool's loop releases its claim on the
            // way out; a new loop for it starts once that is done.
            loops.follow(
                &mut current,
                wanted.into_iter().map(|p| (p.pool.clone(), p)),
                |spec, stop| {
                    let this = self.clone();
                    this.pool_loop(spec, session.clone(), hooks.clone(), stop)
                },
            );
            tokio::select! {
                _ = cancel.cancelled() => break,
                changed = specs.changed() => if changed.is_err() { break },
            }
        }
        loops.shutdown().await;
    }

    async fn pool_loop(
        self,
        spec: InstanceIdSpec,
        mut session: watch::Receiver<SessionState>,
        hooks: watch::Receiver<Arc<HookRunner>>,
        stop: CancellationToken,
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        // A file left by an agent that died without releasing (kill -9, a
        // crash) names an id this one does not hold: once the dead lease
        // expires another host may claim it, and the programs here would
        // go on using it. It is written again when the id is claimed.
        if let Some(file) = &spec.file
            && std::fs::remove_file(file).is_ok()
        {
            info!(pool = %spec.pool, path = %file.display(), "Removed an id file left by an earlier run; claiming an id.");
        }
        loop {
            let lease = tokio::select! {
                _ = stop.cancelled() => return,
                l = alive_lease(&mut session) => l,
            };
            let preferred = std::fs::read_to_string(self.state.path(&remembered(&spec.pool)))
                .ok()
                .and_then(|s| s.trim().parse().ok());
            if let Some(p) = preferred {
                self.await_own_stale_claim(&spec.pool, p, lease).await;
            }
            let me = ClaimRecord {
                agent: self.ctx.agent.clone(),
                claimed_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            };
            let first = ids::claim(
                &self.ctx.client,
                &self.ctx.namespace,
                &spec.pool,
                spec.size,
                lease,
                preferred,
                &me,
            )
            .await;
            let claimed = match first {
                Err(e @ IdError::Exhausted { .. }) => {
                    // The operator must act (a bigger pool, fewer hosts);
                    // meanwhile the first id freed is ours.
                    error!(pool = %spec.pool, error = %e, "No free id; waiting for one.");
                    self.ctx.status.set(
                        ResourceKind::InstanceId,
                        &spec.pool,
                        "waiting for a free id",
                        Some(e.to_string()),
                    );
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        c = ids::claim_waiting(&self.ctx.client, &self.ctx.namespace, &spec.pool, spec.size, lease, preferred, &me) => c,
                    }
                }
                other => other,
            };
            let claim = match claimed {
                Ok(c) => c,
                Err(e) => {
                    let wait = backoff.next_delay();
                    self.ctx.status.set(
                        ResourceKind::InstanceId,
                        &spec.pool,
                        "claiming",
                        Some(e.to_string()),
                    );
                    match &e {
                        IdError::Exhausted { .. } => {
                            error!(pool = %spec.pool, error = %e, "No free id; waiting for one.")
                        }
                        IdError::SizeMismatch { .. } => {
                            // The operator must act: the manifest or the
                            // stored size is wrong.
                            error!(pool = %spec.pool, error = %e, "Pool size differs from the stored one; no id claimed.")
                        }
                        _ if unreachable_in(&e).is_some() => {
                            // Said once per endpoint by the client.
                            debug!(pool = %spec.pool, error = %e, retry_in = ?wait, "Could not claim an id.")
                        }
                        _ => {
                            warn!(pool = %spec.pool, error = %e, retry_in = ?wait, "Could not claim an id.")
                        }
                    }
                    if sleep_or_stop(wait, &stop).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            info!(pool = %spec.pool, id = claim.id, generation = claim.generation, "Instance id claimed.");
            let mut memo = RetryAt::default();
            memo.tried(self.remember(&spec.pool, claim.id));
            self.publish(&spec.pool, Some(claim.id));
            // The claimed hook waits for the id file, which it may read: a
            // file that cannot be written yet (its directory not created,
            // a full disk) is retried with backoff until it can.
            let mut file = IdFile::new(&spec, claim.id);
            if file.write() {
                fire_claimed(&hooks, &spec, &claim);
            } else {
                self.publish_unwritten(&spec.pool, &file);
            }
            // Hold it while the lease lives (and the key is ours).
            let gone = lease_gone(&mut session, lease);
            let taken = key_gone(&self.ctx.client, &claim.key, claim.generation);
            tokio::pin!(gone, taken);
            let stopped = loop {
                tokio::select! {
                    _ = stop.cancelled() => break true,
                    _ = &mut gone => break false,
                    _ = &mut taken => break false,
                    _ = memo.due() => {
                        memo.tried(self.remember(&spec.pool, claim.id));
                    }
                    _ = file.retry.due() => {
                        if file.write() {
                            self.publish(&spec.pool, Some(claim.id));
                            fire_claimed(&hooks, &spec, &claim);
                        } else {
                            self.publish_unwritten(&spec.pool, &file);
                        }
                    }
                }
            };
            self.publish(&spec.pool, None);
            if let Some(file) = &spec.file {
                let _ = std::fs::remove_file(file);
            }
            if stopped {
                let _ = ids::release(&self.ctx.client, &claim).await;
                // The id stays remembered: after a restart it is claimed
                // again if still free.
                info!(pool = %spec.pool, id = claim.id, "Instance id released.");
                return;
            }
            warn!(pool = %spec.pool, id = claim.id, "Instance id lost; claiming again.");
            fire(
                &hooks,
                &spec,
                Event::InstanceIdLost {
                    pool: spec.pool.clone(),
                    id: claim.id,
                },
            );
        }
    }

    /// If our remembered id is still held by this agent's previous session
    /// (its lease not yet revoked or expired), waits for it to go — at most
    /// that lease's remaining TTL — so the same id is claimed again.
    async fn await_own_stale_claim(&self, pool: &str, id: u32, lease: LeaseId) {
        let key = format!("{}{id}", ids::prefix(&self.ctx.namespace, pool));
        let Ok(Some(kv)) = self.ctx.client.get(&key).await else {
            return;
        };
        let ours = serde_json::from_slice::<ClaimRecord>(&kv.value)
            .is_ok_and(|r| r.agent == self.ctx.agent);
        if !ours || kv.lease == Some(lease) {
            return;
        }
        let left = match kv.lease {
            Some(old) => self
                .ctx
                .client
                .lease_ttl(old)
                .await
                .ok()
                .flatten()
                .unwrap_or(0),
            None => 0,
        };
        let wait = Duration::from_secs(left.max(0) as u64 + 1);
        let _ = tokio::time::timeout(
            wait,
            self.ctx
                .client
                .wait_deleted(&key, kv.create_revision, kv.mod_revision),
        )
        .await;
    }

    /// Remembers `pool`'s id for the next start; `false` if the state
    /// directory cannot take it (said once by [`StateDir`]).
    fn remember(&self, pool: &str, id: u32) -> bool {
        self.state.write(
            &remembered(pool),
            &id.to_string(),
            "instance ids are still claimed, but a restarted agent may get different ones.",
        )
    }
}

/// Where a pool's last id is remembered, in the state directory.
fn remembered(pool: &str) -> PathBuf {
    Path::new("ids").join(pool)
}

fn fire_claimed(
    hooks: &watch::Receiver<Arc<HookRunner>>,
    spec: &InstanceIdSpec,
    claim: &ids::Claim,
) {
    fire(
        hooks,
        spec,
        Event::InstanceIdClaimed {
            pool: spec.pool.clone(),
            id: claim.id,
            generation: claim.generation,
        },
    );
}

/// The id file of one claim: written once, or retried with backoff until
/// it can be — the failure said once, the recovery too.
struct IdFile {
    path: Option<PathBuf>,
    text: String,
    pool: String,
    retry: RetryAt,
    /// Why the last try failed.
    error: Option<String>,
}

impl IdFile {
    fn new(spec: &InstanceIdSpec, id: u32) -> IdFile {
        IdFile {
            path: spec.file.clone(),
            text: format!("{id}\n"),
            pool: spec.pool.clone(),
            retry: RetryAt::default(),
            error: None,
        }
    }

    /// Writes the file (true when there is none to write); a failure
    /// schedules the next try.
    fn write(&mut self) -> bool {
        let Some(path) = &self.path else { return true };
        let written = match write_atomically(path, &self.text) {
            Ok(()) => {
                if self.error.take().is_some() {
                    info!(pool = %self.pool, path = %path.display(), "Id file written at last.");
                }
                true
            }
            Err(e) => {
                super::fd_limit::note(&e);
                let error = e.to_string();
                if self.error.is_none() {
                    warn!(pool = %self.pool, path = %path.display(), error = %error, "Cannot write the id file; retrying until it can be written.");
                } else {
                    debug!(pool = %self.pool, path = %path.display(), error = %error, "Still cannot write the id file.");
                }
                self.error = Some(error);
                false
            }
        };
        self.retry.tried(written)
    }
}

fn fire(hooks: &watch::Receiver<Arc<HookRunner>>, spec: &InstanceIdSpec, event: Event) {
    if !spec.on_change.is_empty() {
        hooks.borrow().clone().fire(&spec.on_change, &event);
    }
}

/// Returns when the session no longer has `lease` alive.
async fn lease_gone(session: &mut watch::Receiver<SessionState>, lease: LeaseId) {
    loop {
        if session.borrow_and_update().lease() != Some(lease) {
            return;
        }
        if session.changed().await.is_err() {
            return;
        }
    }
}
