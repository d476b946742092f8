//! The agent's main loop: connect, keep a session, reconcile, reload.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::controller::Context;
use super::dns::{DnsError, DnsServer, RegistryView};
use super::files::FilesController;
use super::hooks::{AmbientEnv, CacheKeys, Gates, HookError, HookRunner, KeyReader};
use super::instance_ids::InstanceIdsController;
use super::manifest::{
    FileSpec, InstanceIdSpec, Manifest, PasswordError, Runner, ServiceSpec, TaskSpec,
};
use super::presence::{Desired, PresenceController};
use super::reload::{PathWatcher, ReloadRequest};
use super::services::ServicesController;
use super::state_dir::StateDir;
use super::status::{Notifier, ServeError, Status, StatusServer};
use super::tasks::TasksController;
use crate::etcd::{Cache, Client, Session, SessionState};
use crate::presence::AgentRecord;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Password(#[from] PasswordError),
    #[error("failed to connect to etcd at {endpoints}: {source}")]
    Connect {
        endpoints: String,
        #[source]
        source: crate::etcd::Error,
    },
    #[error("{path}:{location}: {source}")]
    Hook {
        path: PathBuf,
        location: super::manifest::Location,
        #[source]
        source: HookError,
    },
    #[error(transparent)]
    Status(#[from] ServeError),
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error("failed to watch the manifest `{path}` for changes: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// How the agent is told to stop or reload.
#[derive(Debug)]
pub struct Control {
    /// Cancelled on SIGINT/SIGTERM: stop and revoke the lease.
    pub shutdown: CancellationToken,
    /// A message per SIGHUP (or any other reason to re-read the manifest).
    pub reload: mpsc::Receiver<ReloadRequest>,
}

/// Settings that are not in the manifest.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Use these endpoints instead of the manifest's (`coord dev`).
    pub endpoints: Option<Vec<String>>,
    /// Watch the manifest file and reload it when it changes.
    pub watch_manifest: bool,
}

/// One connected incarnation of the agent: what an `[agent]` or `[etcd]`
/// change has to rebuild.
struct Connected {
    session: Session,
    cache: Cache,
    desired: watch::Sender<Desired>,
    reconciler: tokio::task::JoinHandle<()>,
    files: tokio::task::JoinHandle<()>,
    services: tokio::task::JoinHandle<()>,
    tasks: tokio::task::JoinHandle<()>,
    ids: tokio::task::JoinHandle<()>,
    follower: tokio::task::JoinHandle<()>,
    gate: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
    /// What the presence record publishes as the agent's address.
    address: Option<String>,
}

/// What the resource controllers follow across reloads.
struct Shared {
    hooks: watch::Sender<Arc<HookRunner>>,
    files: watch::Sender<Vec<FileSpec>>,
    services: watch::Sender<Vec<ServiceSpec>>,
    tasks: watch::Sender<Vec<TaskSpec>>,
    instance_ids: watch::Sender<Vec<InstanceIdSpec>>,
    /// What WASM hooks read, re-pointed at each connection's cache.
    keys: Arc<CacheKeys>,
    /// The agent's instance ids for shell hooks' environment.
    ambient: AmbientEnv,
    /// Where gated hooks take their place, re-pointed at each connection.
    gates: Arc<Gates>,
    /// What `/status`, `/health` and `/metrics` show.
    status: Status,
    /// What the DNS server answers from, re-pointed at each connection's
    /// cache.
    dns_view: Arc<RegistryView>,
}

impl Connected {
    async fn start(
        manifest: &Manifest,
        started_at: &str,
        shared: &Shared,
    ) -> Result<Connected, AgentError> {
        let opts = manifest.connect_options()?;
        let client = Client::connect(&opts)
            .await
            .map_err(|source| AgentError::Connect {
                endpoints: opts.endpoints.join(","),
                source,
            })?;
        let status = &shared.status;
        let session =
            Session::start_counted(client.clone(), manifest.agent.ttl, status.session_stats());
        let cache = Cache::counted(client.clone(), status.watch_stats());
        let address =
            super::presence::advertised_address(manifest.agent.address, &manifest.etcd.endpoints)
                .await
                .map(|a| a.to_string());
        let (desired, desired_rx) =
            watch::channel(desired_state(manifest, started_at, address.clone()));
        let reconciler = PresenceController::new(
            client.clone(),
            cache.clone(),
            session.subscribe(),
            desired_rx,
        )
        .with_status(status.clone())
        .with_abandoner(session.abandoner());
        let stop = CancellationToken::new();
        // The services, tasks and instance-id controllers see the lease
        // only while the agent holds its name on it.
        let (gated, gated_rx) = watch::channel(SessionState::Pending);
        let gate = tokio::spawn(super::presence::gate(
            session.subscribe(),
            reconciler.name(),
            gated,
        ));
        // What the services, tasks and instance-id controllers take.
        shared.gates.follow(
            client.clone(),
            gated_rx.clone(),
            &manifest.agent.namespace,
            &manifest.agent.name,
        );
        let ctx = Context {
            client: client.clone(),
            cache: cache.clone(),
            session: gated_rx,
            hooks: shared.hooks.subscribe(),
            status: status.clone(),
            cancel: stop.clone(),
            namespace: manifest.agent.namespace.clone(),
            agent: manifest.agent.name.clone(),
        };
        let follower = tokio::spawn(follow_session(
            session.subscribe(),
            status.clone(),
            stop.clone(),
        ));
        let reconciler = tokio::spawn(reconciler.run(stop.clone()));
        let services_controller = ServicesController::new(&ctx);
        let health = services_controller.stats();
        let services = tokio::spawn(services_controller.run(shared.services.subscribe()));
        let ids_controller =
            InstanceIdsController::new(&ctx, StateDir::new(&manifest.agent.state_dir))
                .with_ambient(shared.ambient.clone());
        let held_ids = ids_controller.held();
        let coord = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("coord"));
        let tasks = tokio::spawn(
            TasksController::new(&ctx, coord)
                .with_ids(held_ids)
                .run(shared.tasks.subscribe()),
        );
        let ids = tokio::spawn(ids_controller.run(shared.instance_ids.subscribe()));
        shared.keys.follow(&cache, &manifest.wasm_read_prefixes());
        // The whole registry is watched only for the DNS server.
        if manifest.dns.is_some() {
            shared.dns_view.follow(&cache, &manifest.agent.namespace);
        } else {
            shared.dns_view.unfollow();
        }
        let files = tokio::spawn(
            FilesController::new(&manifest.agent.namespace)
                .with_agent(&manifest.agent.name)
                .with_status(status.clone())
                .with_state_dir(&manifest.agent.state_dir)
                .with_rollouts(
                    cache.subscribe(&crate::rollout::records_prefix(&manifest.agent.namespace)),
                    health,
                )
                .run(
                    client.clone(),
                    shared.files.subscribe(),
                    shared.hooks.subscribe(),
                    stop.clone(),
                ),
        );
        Ok(Connected {
            session,
            cache,
            desired,
            reconciler,
            files,
            services,
            tasks,
            ids,
            follower,
            gate,
            stop,
            address,
        })
    }

    /// Stops reconciling and every loop — each guarded command stopped
    /// (TERM, its grace, KILL) and its lock released once nothing of it
    /// runs — then revokes the lease so everything the agent held goes at
    /// once.
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.reconciler.await;
        let _ = self.files.await;
        let _ = self.services.await;
        let _ = self.tasks.await;
        let _ = self.ids.await;
        let _ = self.follower.await;
        self.session.close().await;
        // Returns once the session has ended.
        let _ = self.gate.await;
    }
}

/// Mirrors the session's state into the status (the session is replaced
/// when `[agent]` or `[etcd]` change; the status stays).
async fn follow_session(
    mut session: watch::Receiver<SessionState>,
    status: Status,
    stop: CancellationToken,
) {
    loop {
        status.set_session(*session.borrow_and_update());
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = session.changed() => if changed.is_err() { return },
        }
    }
}

fn desired_state(manifest: &Manifest, started_at: &str, address: Option<String>) -> Desired {
    Desired {
        namespace: manifest.agent.namespace.clone(),
        agent: manifest.agent.name.clone(),
        record: AgentRecord {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest_hash: manifest.hash.clone(),
            started_at: started_at.to_owned(),
            host: super::manifest::host_name(),
            pid: std::process::id(),
            address,
            labels: manifest.agent.labels.clone(),
        },
    }
}

/// What every hook runner of the agent shares.
struct HookShared<'a> {
    keys: &'a Arc<CacheKeys>,
    ambient: &'a AmbientEnv,
    status: &'a Status,
    gates: &'a Arc<Gates>,
}

/// Prepares the manifest's hooks (WASM components are compiled and checked
/// here, on a blocking thread, so a bad plugin is found when the manifest is
/// loaded).
async fn hook_runner(
    manifest: &Manifest,
    shared: &HookShared<'_>,
) -> Result<Arc<HookRunner>, AgentError> {
    let m = manifest.clone();
    let keys: Arc<dyn KeyReader> = shared.keys.clone();
    let ambient = shared.ambient.clone();
    let status = shared.status.clone();
    let gates = shared.gates.clone();
    let built = tokio::task::spawn_blocking(move || {
        HookRunner::for_manifest(&m, keys, Runner::Agent).map(|r| {
            r.with_ambient(ambient)
                .with_status(status)
                .with_gates(gates)
        })
    })
    .await
    .unwrap_or_else(|e| {
        Err(HookError::Load {
            hook: String::new(),
            path: manifest.path.display().to_string(),
            message: format!("loading the hooks panicked: {e}"),
        })
    });
    built.map(Arc::new).map_err(|source| {
        let location = hook_location(manifest, &source);
        AgentError::Hook {
            path: manifest.path.clone(),
            location,
            source,
        }
    })
}

fn hook_location(manifest: &Manifest, e: &HookError) -> super::manifest::Location {
    manifest
        .hook(e.hook())
        .map_or(super::manifest::Location { line: 1, column: 1 }, |h| {
            h.location
        })
}

/// The variable holding the etcd password reaches no child.
fn withhold_password_env(manifest: &Manifest) {
    if let Some(super::manifest::PasswordSource::Env(var)) = &manifest.etcd.password {
        super::process::withhold_env(var);
    }
}

fn apply_options(mut manifest: Manifest, opts: &RunOptions) -> Manifest {
    if let Some(endpoints) = &opts.endpoints {
        manifest.etcd.endpoints = endpoints.clone();
    }
    manifest
}

/// Runs the agent until `control.shutdown` is cancelled.
pub async fn run(
    manifest: Manifest,
    opts: RunOptions,
    mut control: Control,
) -> Result<(), AgentError> {
    let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let mut manifest = apply_options(manifest, &opts);
    let path = manifest.path.clone();
    let mut file_watcher = if opts.watch_manifest {
        Some(
            PathWatcher::start(std::slice::from_ref(&path), Duration::from_millis(300)).map_err(
                |source| AgentError::Watch {
                    path: path.clone(),
                    source,
                },
            )?,
        )
    } else {
        None
    };
    info!(
        agent = %manifest.agent.name,
        endpoints = %manifest.etcd.endpoints.join(","),
        manifest = %path.display(),
        "Agent starting."
    );
    withhold_password_env(&manifest);
    let status = Status::new(&manifest.agent.name);
    status.declare(&manifest);
    // Bound before connecting, so /health answers (503) while etcd does not.
    let mut server = match &manifest.status {
        Some(s) => Some(StatusServer::start(s.listen, status.clone()).await?),
        None => None,
    };
    let dns_view = Arc::new(RegistryView::new());
    // Bound before connecting too: it answers SERVFAIL until the cache has
    // read the registry.
    let mut dns = match &manifest.dns {
        Some(s) => Some(DnsServer::start(s, dns_view.clone(), status.clone()).await?),
        None => None,
    };
    let notifier = Notifier::start(status.clone());
    let keys = Arc::new(CacheKeys::new());
    let ambient = AmbientEnv::default();
    let gates = Arc::new(Gates::default());
    let first = HookShared {
        keys: &keys,
        ambient: &ambient,
        status: &status,
        gates: &gates,
    };
    let shared = Shared {
        hooks: watch::Sender::new(hook_runner(&manifest, &first).await?),
        keys,
        ambient,
        gates,
        status,
        dns_view,
        files: watch::Sender::new(manifest.files.clone()),
        services: watch::Sender::new(manifest.services.clone()),
        tasks: watch::Sender::new(manifest.tasks.clone()),
        instance_ids: watch::Sender::new(manifest.instance_ids.clone()),
    };
    let mut connected = Connected::start(&manifest, &started_at, &shared).await?;
    loop {
        let request = tokio::select! {
            _ = control.shutdown.cancelled() => break,
            r = control.reload.recv() => match r {
                Some(r) => r,
                None => { control.shutdown.cancelled().await; break }
            },
            _ = async {
                match file_watcher.as_mut() {
                    Some(w) => w.changed().await,
                    None => std::future::pending().await,
                }
            } => ReloadRequest::FileChanged,
        };
        let next = match Manifest::load(&path) {
            Ok(m) => apply_options(m, &opts),
            Err(e) => {
                // The operator must fix the file; until then the last good
                // manifest keeps running.
                error!(manifest = %path.display(), reason = request.name(), "Manifest reload rejected; keeping the last good one.\n{e}");
                continue;
            }
        };
        if next == manifest {
            info!(manifest = %path.display(), reason = request.name(), "Manifest unchanged.");
            continue;
        }
        withhold_password_env(&next);
        let next_hooks = if next.hooks == manifest.hooks {
            None
        } else {
            let with = HookShared {
                keys: &shared.keys,
                ambient: &shared.ambient,
                status: &shared.status,
                gates: &shared.gates,
            };
            match hook_runner(&next, &with).await {
                Ok(h) => Some(h),
                Err(e) => {
                    error!(manifest = %path.display(), reason = request.name(), "Manifest reload rejected; keeping the last good one.\n{e}");
                    continue;
                }
            }
        };
        if next.agent.needs_new_session(&manifest.agent) || next.etcd != manifest.etcd {
            info!(manifest = %path.display(), "[agent] or [etcd] changed; reconnecting with a new session.");
            match Connected::start(&next, &started_at, &shared).await {
                Ok(fresh) => {
                    let old = std::mem::replace(&mut connected, fresh);
                    old.stop().await;
                    // The old session's follower may have written last.
                    shared.status.set_session(connected.session.state());
                }
                Err(e) => {
                    warn!(manifest = %path.display(), error = %e, "Manifest reload rejected; keeping the last good one.");
                    continue;
                }
            }
        } else {
            connected.desired.send_replace(desired_state(
                &next,
                &started_at,
                connected.address.clone(),
            ));
        }
        if let Some(h) = next_hooks {
            // Runs in progress on the old hooks are stopped; new events go
            // to the new ones.
            shared.hooks.send_replace(h).shutdown().await;
            shared
                .keys
                .follow(&connected.cache, &next.wasm_read_prefixes());
        }
        if next.files != manifest.files {
            shared.files.send_replace(next.files.clone());
        }
        if next.services != manifest.services {
            shared.services.send_replace(next.services.clone());
        }
        if next.tasks != manifest.tasks {
            shared.tasks.send_replace(next.tasks.clone());
        }
        if next.instance_ids != manifest.instance_ids {
            shared.instance_ids.send_replace(next.instance_ids.clone());
        }
        if next.status != manifest.status {
            // The old port is freed first: the new one may be the same.
            if let Some(old) = server.take() {
                old.stop().await;
            }
            if let Some(s) = &next.status {
                match StatusServer::start(s.listen, shared.status.clone()).await {
                    Ok(started) => server = Some(started),
                    Err(e) => {
                        warn!(error = %e, "Status endpoint not restarted; it stays off until the next reload or start.")
                    }
                }
            }
        }
        if next.dns != manifest.dns {
            // The old port is freed first: the new one may be the same.
            if let Some(old) = dns.take() {
                old.stop().await;
            }
            if next.dns.is_none() {
                shared.dns_view.unfollow();
            } else if manifest.dns.is_none() {
                shared
                    .dns_view
                    .follow(&connected.cache, &next.agent.namespace);
            }
            if let Some(s) = &next.dns {
                match DnsServer::start(s, shared.dns_view.clone(), shared.status.clone()).await {
                    Ok(started) => dns = Some(started),
                    Err(e) => {
                        warn!(error = %e, "DNS server not restarted; it stays off until the next reload or start.")
                    }
                }
            }
        }
        shared.status.declare(&next);
        info!(manifest = %path.display(), hash = %next.hash, "Manifest reloaded.");
        manifest = next;
    }
    notifier.stopping().await;
    if let Some(dns) = dns.take() {
        dns.stop().await;
    }
    let hooks = shared.hooks.borrow().clone();
    hooks.shutdown().await;
    info!("Shutting down: revoking the session lease.");
    connected.stop().await;
    if let Some(server) = server.take() {
        server.stop().await;
    }
    info!("Agent stopped.");
    Ok(())
}
