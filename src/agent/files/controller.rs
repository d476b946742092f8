//! Keeps every `[[file]]` rendered: renders only the files a change
//! touches, debounced, from one consistent snapshot, and fires their hooks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::render::{Deps, Renderer};
use super::write::{WriteError, WriteOutcome, write};
use crate::agent::hooks::{Event, HookRunner};
use crate::agent::manifest::{FileSource, FileSpec};
use crate::agent::reload::PathWatcher;
use crate::agent::status::report::QueueName;
use crate::agent::status::{RenderOutcome, Status};
use crate::etcd::{Cache, CacheEvent, CacheSnapshot};

/// The whole keyspace: templates may read any key, and which keys they
/// read is only known by rendering them. One watch over everything also
/// means one revision for every read of a render.
const ROOT: &str = "";

/// After an I/O failure (disk full, permissions), when to try again.
const IO_RETRY: Duration = Duration::from_secs(5);

/// Counters for status, tests and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileStats {
    /// Renders attempted, per file.
    pub renders: BTreeMap<PathBuf, u64>,
    /// Files actually replaced.
    pub replaced: u64,
    /// Renders or writes that failed (the old file stayed).
    pub failures: u64,
    /// The last error per file, cleared by a good render.
    pub errors: BTreeMap<PathBuf, String>,
}

impl FileStats {
    /// Renders of all files together.
    pub fn total_renders(&self) -> u64 {
        self.renders.values().sum()
    }
}

#[derive(Debug, Default)]
struct FileState {
    /// What the last render read; `None` until a render got that far, and
    /// then any change may concern the file.
    deps: Option<Deps>,
    /// First and latest trigger since the last render.
    dirty: Option<(Instant, Instant)>,
    /// The revision the last render read; older events are already in it.
    revision: i64,
    retry_at: Option<Instant>,
}

/// The files resource kind.
pub struct FilesController {
    namespace: String,
    specs: Vec<FileSpec>,
    states: BTreeMap<PathBuf, FileState>,
    renderer: Renderer,
    stats: watch::Sender<FileStats>,
    status: Status,
}

impl std::fmt::Debug for FilesController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilesController")
            .field("files", &self.specs.len())
            .finish_non_exhaustive()
    }
}

impl FilesController {
    /// Files of an agent in `namespace` (templates' `service()` reads
    /// there); `with_agent` names it for `instance_id()`.
    pub fn new(namespace: &str) -> Self {
        FilesController {
            namespace: namespace.to_owned(),
            specs: Vec::new(),
            states: BTreeMap::new(),
            renderer: Renderer::new(namespace),
            stats: watch::Sender::new(FileStats::default()),
            status: Status::default(),
        }
    }

    /// Reports renders and the dirty files to `status`.
    pub fn with_status(mut self, status: Status) -> Self {
        self.status = status;
        self
    }

    /// Names the agent whose instance ids templates see.
    pub fn with_agent(mut self, agent: &str) -> Self {
        self.renderer = Renderer::new(&self.namespace).with_agent(agent);
        self
    }

    /// The engine, to add template functions.
    pub fn renderer_mut(&mut self) -> &mut Renderer {
        &mut self.renderer
    }

    pub fn stats(&self) -> watch::Receiver<FileStats> {
        self.stats.subscribe()
    }

    /// Runs until `cancel`. `specs` and `hooks` follow manifest reloads.
    pub async fn run(
        mut self,
        cache: Cache,
        mut specs: watch::Receiver<Vec<FileSpec>>,
        mut hooks: watch::Receiver<Arc<HookRunner>>,
        cancel: CancellationToken,
    ) {
        let mut sub = None;
        let mut templates = None;
        self.apply(specs.borrow_and_update().clone(), &mut templates);
        loop {
            // Watch only while there are files: an agent without them
            // should not cache the whole keyspace.
            if self.specs.is_empty() {
                sub = None;
            } else if sub.is_none() {
                sub = Some(cache.subscribe(ROOT));
            }
            let ready = sub.as_ref().is_some_and(|s| s.is_ready());
            if ready && let Some(s) = &sub {
                let runner = hooks.borrow().clone();
                self.render_due(&s.snapshot(), &runner).await;
            }
            let next = if ready { self.next_due() } else { None };
            let waiting = self
                .states
                .values()
                .filter(|s| s.dirty.is_some() || s.retry_at.is_some())
                .count();
            self.status.set_queue(QueueName::Files, waiting);
            let became_ready = sub.as_ref().map(|s| s.ready());
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = specs.changed() => {
                    if changed.is_err() { return; }
                    let next = specs.borrow_and_update().clone();
                    self.apply(next, &mut templates);
                }
                _ = hooks.changed() => {}
                _ = async {
                    match became_ready {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                }, if !ready => {}
                event = async {
                    match sub.as_mut() {
                        Some(s) => s.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.on_cache(&event),
                _ = async { sleep_until(next.unwrap_or_else(Instant::now)).await }, if next.is_some() => {}
                changed = async {
                    match templates.as_mut() {
                        Some(w) => w.changed().await,
                        None => std::future::pending::<BTreeSet<PathBuf>>().await,
                    }
                } => self.on_templates(&changed),
            }
        }
    }

    /// Takes a new set of files: new and changed ones render, removed ones
    /// are forgotten (their last content stays on disk).
    fn apply(&mut self, specs: Vec<FileSpec>, templates: &mut Option<PathWatcher>) {
        let now = Instant::now();
        let old: BTreeMap<PathBuf, FileSpec> =
            self.specs.drain(..).map(|s| (s.path.clone(), s)).collect();
        for gone in old.keys().filter(|p| !specs.iter().any(|s| &s.path == *p)) {
            self.states.remove(gone);
            self.renderer.forget(gone);
        }
        for spec in &specs {
            if old.get(&spec.path) != Some(spec) {
                let state = self.states.entry(spec.path.clone()).or_default();
                state.dirty = Some((now, now));
            }
        }
        self.specs = specs;
        let paths: Vec<PathBuf> = self
            .specs
            .iter()
            .filter_map(|s| match &s.source {
                FileSource::Template(p) => Some(p.clone()),
                _ => None,
            })
            .collect();
        *templates = if paths.is_empty() {
            None
        } else {
            match PathWatcher::start(&paths, Duration::from_millis(100)) {
                Ok(w) => Some(w),
                Err(e) => {
                    warn!(error = %e, "Cannot watch template files; edits will not re-render.");
                    None
                }
            }
        };
    }

    fn on_cache(&mut self, event: &CacheEvent) {
        let now = Instant::now();
        for state in self.states.values_mut() {
            let touched = match (event, &state.deps) {
                (CacheEvent::Lagged, _) => true,
                (CacheEvent::Changed { revision, .. }, _) if *revision <= state.revision => false,
                (_, None) => true,
                (CacheEvent::Changed { changes, .. }, Some(deps)) => {
                    changes.iter().any(|c| deps.touches(c.key()))
                }
            };
            if touched {
                let first = state.dirty.map_or(now, |(first, _)| first);
                state.dirty = Some((first, now));
            }
        }
    }

    fn on_templates(&mut self, changed: &BTreeSet<PathBuf>) {
        let now = Instant::now();
        for spec in &self.specs {
            if let FileSource::Template(t) = &spec.source
                && changed.contains(t)
                && let Some(state) = self.states.get_mut(&spec.path)
            {
                debug!(template = %t.display(), path = %spec.path.display(), "Template edited.");
                state.dirty = Some((now, now));
            }
        }
    }

    /// When the next file is due: after its quiet time, but no later than
    /// its longest hold-back.
    fn next_due(&self) -> Option<Instant> {
        self.specs.iter().filter_map(|spec| self.due_at(spec)).min()
    }

    fn due_at(&self, spec: &FileSpec) -> Option<Instant> {
        let state = self.states.get(&spec.path)?;
        let dirty = state
            .dirty
            .map(|(first, last)| (last + spec.debounce_min).min(first + spec.debounce_max));
        match (dirty, state.retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    async fn render_due(&mut self, snapshot: &CacheSnapshot, hooks: &Arc<HookRunner>) {
        let now = Instant::now();
        let due: Vec<FileSpec> = self
            .specs
            .iter()
            .filter(|s| self.due_at(s).is_some_and(|at| at <= now))
            .cloned()
            .collect();
        for spec in due {
            self.render_one(&spec, snapshot, hooks).await;
        }
    }

    async fn render_one(
        &mut self,
        spec: &FileSpec,
        snapshot: &CacheSnapshot,
        hooks: &Arc<HookRunner>,
    ) {
        let state = self.states.entry(spec.path.clone()).or_default();
        state.dirty = None;
        state.retry_at = None;
        state.revision = snapshot.revision();
        let previous = state.deps.clone();
        let started = std::time::Instant::now();
        self.stats
            .send_modify(|s| *s.renders.entry(spec.path.clone()).or_default() += 1);
        let rendered = match self.renderer.render(spec, snapshot, previous.as_ref()) {
            Ok(r) => r,
            Err(e) => {
                warn!(path = %spec.path.display(), error = %e, "Render failed; the file keeps its old content.");
                self.failed(spec, e.to_string(), started);
                return;
            }
        };
        if let Some(state) = self.states.get_mut(&spec.path) {
            state.deps = Some(rendered.deps.clone());
        }
        match write(spec, &rendered.content, Some(hooks)).await {
            Ok(WriteOutcome::Unchanged) => {
                debug!(path = %spec.path.display(), revision = rendered.revision, "Rendered file unchanged.");
                self.stats.send_modify(|s| {
                    s.errors.remove(&spec.path);
                });
                self.status.file_rendered(
                    &spec.path,
                    started.elapsed(),
                    RenderOutcome::Unchanged,
                    None,
                );
            }
            Ok(WriteOutcome::Replaced {
                old_hash,
                new_hash,
                in_place,
            }) => {
                info!(path = %spec.path.display(), revision = rendered.revision, in_place, "Rendered file replaced.");
                self.stats.send_modify(|s| {
                    s.replaced += 1;
                    s.errors.remove(&spec.path);
                });
                self.status.file_rendered(
                    &spec.path,
                    started.elapsed(),
                    RenderOutcome::Replaced,
                    None,
                );
                if !spec.on_change.is_empty() {
                    hooks.fire(
                        &spec.on_change,
                        &Event::FileChanged {
                            path: spec.path.display().to_string(),
                            old_hash,
                            new_hash,
                        },
                    );
                }
            }
            Err(e) => {
                warn!(path = %spec.path.display(), error = %e, "File not replaced; it keeps its old content.");
                if matches!(e, WriteError::Io { .. } | WriteError::Owner { .. })
                    && let Some(state) = self.states.get_mut(&spec.path)
                {
                    state.retry_at = Some(Instant::now() + IO_RETRY);
                }
                self.failed(spec, e.to_string(), started);
            }
        }
    }

    fn failed(&mut self, spec: &FileSpec, error: String, started: std::time::Instant) {
        self.status.file_rendered(
            &spec.path,
            started.elapsed(),
            RenderOutcome::Failed,
            Some(error.clone()),
        );
        self.stats.send_modify(|s| {
            s.failures += 1;
            s.errors.insert(spec.path.clone(), error);
        });
    }
}
