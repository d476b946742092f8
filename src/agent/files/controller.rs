//! Keeps every `[[file]]` rendered: renders only the files a change
//! touches, debounced, each from one revision of etcd, and fires their
//! hooks. It reads and watches only what the files' templates read: the
//! rest of the cluster — its size, its writes, what the agent's etcd user
//! may not read — never reaches it.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::render::{Deps, Render, Renderer};
use super::rollouts::Rollouts;
use super::write::{WriteError, WriteOutcome, hash, keep_rejected, rejected_path, write};
use crate::agent::hooks::{Event, HookRunner, Verdict};
use crate::agent::manifest::{FileSource, FileSpec};
use crate::agent::reload::PathWatcher;
use crate::agent::services::ServiceStats;
use crate::agent::status::report::QueueName;
use crate::agent::status::{RenderOutcome, Status};
use crate::etcd::{Backoff, CacheSnapshot, Client, Range, ReadSet, WatchSet, WatchSetEvent};
use crate::rollout::{self, Staged};

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
    /// Files put back to their previous content (`revert = true`).
    pub reverted: u64,
}

impl FileStats {
    /// Renders of all files together.
    pub fn total_renders(&self) -> u64 {
        self.renders.values().sum()
    }
}

#[derive(Debug)]
struct FileState {
    /// What the last render read (good or not: a file waiting for a
    /// missing key watches it); `None` until a render read anything.
    deps: Option<Deps>,
    /// Prefixes the last good render found keys in, kept in `state_dir`
    /// so that a restart while one is empty does not blank the file;
    /// `None` until loaded.
    nonempty: Option<BTreeSet<String>>,
    /// First and latest trigger since the last render.
    dirty: Option<(Instant, Instant)>,
    /// The revision the last render read; older events are already in it.
    revision: i64,
    retry_at: Option<Instant>,
    /// Paces retries of renders that could not read etcd.
    backoff: Backoff,
    /// What failed the last render, while renders fail.
    failing: Option<String>,
    /// A replacement whose `on_change` hooks are still running, for
    /// `revert`.
    awaiting: Option<Awaiting>,
    /// Counts replacements, so a verdict on an older one is ignored.
    generation: u64,
    /// The hash of a rejected render that could not be kept on disk (the
    /// file `<path>.rejected` is the record otherwise).
    rejected: Option<String>,
}

/// A replacement of a `revert` file waiting for its hooks' verdict.
#[derive(Debug)]
struct Awaiting {
    generation: u64,
    /// What to put back: the content before the first replacement not yet
    /// judged (`None`: the file was new).
    good: Option<Vec<u8>>,
    /// What was written.
    bad: Vec<u8>,
    /// The staged rollouts the render carried, to report the hooks on.
    rollouts: Vec<(String, Staged)>,
}

/// The hooks' verdict on one replacement of a file.
type VerdictFuture = Pin<Box<dyn Future<Output = (PathBuf, u64, Verdict)> + Send>>;

impl Default for FileState {
    fn default() -> Self {
        FileState {
            deps: None,
            nonempty: None,
            dirty: None,
            revision: 0,
            retry_at: None,
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            failing: None,
            awaiting: None,
            generation: 0,
            rejected: None,
        }
    }
}

/// What `state_dir` keeps of one file: the prefixes its last good render
/// found keys in.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct GuardRecord {
    file: PathBuf,
    nonempty: BTreeSet<String>,
}

/// What a good render produced, ready to write.
struct Rendered {
    content: Vec<u8>,
    revision: i64,
}

/// The files resource kind.
pub struct FilesController {
    namespace: String,
    specs: Vec<FileSpec>,
    states: BTreeMap<PathBuf, FileState>,
    renderer: Renderer,
    stats: watch::Sender<FileStats>,
    status: Status,
    state_dir: Option<PathBuf>,
    /// Each watched range as of the revision its watch has delivered: a
    /// file whose reads are all here at one revision renders without a
    /// round trip to etcd.
    views: BTreeMap<Range, CacheSnapshot>,
    /// Verdicts of `revert` files' `on_change` hooks, as they come.
    verdicts: FuturesUnordered<VerdictFuture>,
    /// The agent's name (staged rollouts name the agents they reach).
    agent: String,
    /// What the agent reports of the rollouts staged for it.
    rollouts: Rollouts,
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
            state_dir: None,
            views: BTreeMap::new(),
            verdicts: FuturesUnordered::new(),
            agent: String::new(),
            rollouts: Rollouts::new(namespace),
        }
    }

    /// Keeps what must survive a restart (the emptied-prefix guard) in
    /// `<dir>/files/`.
    pub fn with_state_dir(mut self, dir: &Path) -> Self {
        self.state_dir = Some(dir.join("files"));
        self
    }

    /// Reports renders and the dirty files to `status`.
    pub fn with_status(mut self, status: Status) -> Self {
        self.status = status;
        self
    }

    /// Names the agent whose instance ids templates see.
    pub fn with_agent(mut self, agent: &str) -> Self {
        self.renderer = Renderer::new(&self.namespace).with_agent(agent);
        self.agent = agent.to_owned();
        self.rollouts.set_agent(agent);
        self
    }

    /// Follows every rollout record (`records`: a subscription to
    /// `<namespace>/rollouts/keys`) so that a staged agent none of whose
    /// files reads the key reports "not affected", and puts the services'
    /// health into the agent's rollout reports.
    pub fn with_rollouts(
        mut self,
        records: crate::etcd::Subscription,
        services: watch::Receiver<ServiceStats>,
    ) -> Self {
        self.rollouts.follow(records, services);
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
        client: Client,
        mut specs: watch::Receiver<Vec<FileSpec>>,
        mut hooks: watch::Receiver<Arc<HookRunner>>,
        cancel: CancellationToken,
    ) {
        let mut watches = WatchSet::new(client.clone());
        let mut templates = None;
        self.apply(specs.borrow_and_update().clone(), &mut templates);
        loop {
            let runner = hooks.borrow().clone();
            self.render_due(&client, &mut watches, &runner).await;
            let (specs_now, states) = (&self.specs, &self.states);
            self.rollouts
                .refresh(&client, |record| reads_record(specs_now, states, record))
                .await;
            self.rollouts.soaked(&client).await;
            let soak = self.rollouts.next_soak();
            let next = match (self.next_due(), soak) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let waiting = self
                .states
                .values()
                .filter(|s| s.dirty.is_some() || s.retry_at.is_some())
                .count();
            self.status.set_queue(QueueName::Files, waiting);
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = specs.changed() => {
                    if changed.is_err() { return; }
                    let next = specs.borrow_and_update().clone();
                    self.apply(next, &mut templates);
                    self.watch_only_deps(&mut watches);
                }
                _ = hooks.changed() => {}
                () = self.rollouts.changed() => {}
                event = watches.next() => self.on_watch(&event),
                Some((path, generation, verdict)) = self.verdicts.next(), if !self.verdicts.is_empty() => {
                    self.on_verdict(&path, generation, verdict, &runner, &client).await;
                }
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

    /// Stops watching (and keeping) what no file reads any more.
    fn watch_only_deps(&mut self, watches: &mut WatchSet) {
        let wanted: BTreeSet<Range> = self
            .states
            .values()
            .filter_map(|s| s.deps.as_ref())
            .flat_map(|d| d.reads.ranges())
            .collect();
        watches.retain(|r| wanted.contains(r));
        self.views.retain(|r, _| wanted.contains(r));
    }

    /// `reads` as one view, if every range of it is kept at one revision
    /// (then each holds every change up to it, and none after).
    fn local_view(&self, reads: &ReadSet) -> Option<CacheSnapshot> {
        let ranges = reads.ranges();
        let mut views = ranges.iter().map(|r| self.views.get(r));
        let mut view = views.next()??.clone();
        for other in views {
            let other = other?;
            if other.revision() != view.revision() {
                return None;
            }
            view.merge(other.clone());
        }
        Some(view)
    }

    /// Keeps what a render read as the views of its ranges, where nothing
    /// newer is kept already.
    fn keep_views(&mut self, reads: &ReadSet, view: &CacheSnapshot) {
        for range in reads.ranges() {
            let newer = self
                .views
                .get(&range)
                .is_some_and(|v| v.revision() >= view.revision());
            if !newer {
                let slice = view.slice(&range);
                self.views.insert(range, slice);
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

    fn on_watch(&mut self, event: &WatchSetEvent) {
        match event {
            WatchSetEvent::Lost => self.views.clear(),
            WatchSetEvent::Changed {
                range,
                revision,
                changes,
            } => {
                if let Some(view) = self.views.get_mut(range)
                    && *revision > view.revision()
                {
                    view.apply(*revision, changes);
                }
            }
        }
        let now = Instant::now();
        for state in self.states.values_mut() {
            let touched = match (event, &state.deps) {
                (WatchSetEvent::Lost, _) => true,
                (WatchSetEvent::Changed { revision, .. }, _) if *revision <= state.revision => {
                    false
                }
                (_, None) => false,
                (WatchSetEvent::Changed { changes, .. }, Some(deps)) => {
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

    async fn render_due(
        &mut self,
        client: &Client,
        watches: &mut WatchSet,
        hooks: &Arc<HookRunner>,
    ) {
        let now = Instant::now();
        let due: Vec<FileSpec> = self
            .specs
            .iter()
            .filter(|s| self.due_at(s).is_some_and(|at| at <= now))
            .cloned()
            .collect();
        if due.is_empty() {
            return;
        }
        for spec in due {
            self.render_one(&spec, client, watches, hooks).await;
        }
        self.watch_only_deps(watches);
    }

    async fn render_one(
        &mut self,
        spec: &FileSpec,
        client: &Client,
        watches: &mut WatchSet,
        hooks: &Arc<HookRunner>,
    ) {
        let stored = self.load_nonempty(&spec.path);
        let state = self.states.entry(spec.path.clone()).or_default();
        state.dirty = None;
        state.retry_at = None;
        if state.nonempty.is_none() {
            state.nonempty = stored;
        }
        let hint = state
            .deps
            .as_ref()
            .map(|d| d.reads.clone())
            .unwrap_or_default();
        let previous = state.nonempty.clone();
        let local = self.local_view(&hint);
        let started = std::time::Instant::now();
        self.stats
            .send_modify(|s| *s.renders.entry(spec.path.clone()).or_default() += 1);
        let Render {
            result,
            deps,
            revision,
            view,
        } = self
            .renderer
            .render(spec, client, &hint, local, previous.as_ref())
            .await;
        // A failed read has no view (revision 0): nothing to keep.
        if view.revision() > 0 {
            self.keep_views(&deps.reads, &view);
        }
        let staged = self.staged_in(&deps.reads, &view);
        let state = self.states.entry(spec.path.clone()).or_default();
        if revision > 0 {
            // Watch from the revision read: nothing after it is missed.
            for range in deps.reads.ranges() {
                watches.watch(range, revision);
            }
            state.revision = revision;
            state.deps = Some(deps.clone());
        }
        let content = match result {
            Ok(content) => content,
            Err(e) => {
                if e.is_transient() {
                    state.retry_at = Some(Instant::now() + state.backoff.next_delay());
                }
                let error = e.to_string();
                if crate::etcd::unreachable_in(&e).is_some() {
                    // The client says an unreachable endpoint once; this
                    // render's failure then goes to DEBUG, as the other
                    // loops' do (marked as already said).
                    state.failing = Some(error.clone());
                }
                self.rollouts
                    .report(client, &staged, false, false, None, Some(error.clone()))
                    .await;
                self.failed(
                    spec,
                    "Render failed; the file keeps its old content.",
                    error.clone(),
                    error,
                    started,
                );
                return;
            }
        };
        state.backoff.reset();
        if state.nonempty.as_ref() != Some(&deps.nonempty) {
            state.nonempty = Some(deps.nonempty.clone());
            self.store_nonempty(&spec.path, &deps.nonempty);
        }
        let rendered = Rendered { content, revision };
        if spec.revert && self.was_rejected(spec, &rendered.content) {
            let error = format!(
                "this render was rejected before (its on_change hooks failed; kept at `{}`); the file keeps its content until the render changes",
                rejected_path(&spec.path).display()
            );
            self.failed(
                spec,
                "Render not written: it was rejected before.",
                error.clone(),
                error,
                started,
            );
            return;
        }
        match write(spec, &rendered.content, Some(hooks)).await {
            Ok(WriteOutcome::Unchanged) => {
                self.rollouts
                    .report(client, &staged, true, true, Some(true), None)
                    .await;
                debug!(path = %spec.path.display(), revision = rendered.revision, "Rendered file unchanged.");
                self.recovered(spec);
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
                previous,
            }) => {
                info!(path = %spec.path.display(), revision = rendered.revision, in_place, "Rendered file replaced.");
                self.recovered(spec);
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
                let event = Event::FileChanged {
                    path: spec.path.display().to_string(),
                    old_hash,
                    new_hash,
                };
                if spec.on_change.is_empty() {
                    self.rollouts
                        .report(client, &staged, true, true, Some(true), None)
                        .await;
                } else if spec.revert || !staged.is_empty() {
                    self.rollouts
                        .report(client, &staged, true, true, None, None)
                        .await;
                    self.await_verdict(spec, previous, rendered.content, &event, hooks, staged);
                } else {
                    hooks.fire(&spec.on_change, &event);
                }
            }
            Err(e) => {
                self.rollouts
                    .report(client, &staged, true, false, None, Some(e.to_string()))
                    .await;
                if matches!(e, WriteError::Io { .. } | WriteError::Owner { .. })
                    && let Some(state) = self.states.get_mut(&spec.path)
                {
                    state.retry_at = Some(Instant::now() + IO_RETRY);
                }
                // The same fault again names another staging file: compare
                // what failed, not the message.
                let same = match &e {
                    WriteError::Io { action, source, .. } => {
                        format!("{action}: {:?}", source.kind())
                    }
                    other => other.to_string(),
                };
                self.failed(
                    spec,
                    "File not replaced; it keeps its old content.",
                    e.to_string(),
                    same,
                    started,
                );
            }
        }
    }

    /// Whether `content` is a render of `spec` that `revert` put aside: the
    /// same bytes as `<path>.rejected` (or, when that could not be written,
    /// as the one remembered).
    fn was_rejected(&self, spec: &FileSpec, content: &[u8]) -> bool {
        let remembered = self
            .states
            .get(&spec.path)
            .and_then(|s| s.rejected.as_deref());
        if remembered == Some(hash(content).as_str()) {
            return true;
        }
        std::fs::read(rejected_path(&spec.path)).is_ok_and(|kept| kept == content)
    }

    /// Fires the `on_change` hooks of a `revert` file and keeps what to put
    /// back should they fail.
    fn await_verdict(
        &mut self,
        spec: &FileSpec,
        previous: Option<Vec<u8>>,
        written: Vec<u8>,
        event: &Event,
        hooks: &Arc<HookRunner>,
        rollouts: Vec<(String, Staged)>,
    ) {
        let state = self.states.entry(spec.path.clone()).or_default();
        state.generation += 1;
        let generation = state.generation;
        // A replacement not judged yet is not known good: go back to what
        // was there before it.
        let good = match state.awaiting.take() {
            Some(older) => older.good,
            None => previous,
        };
        state.awaiting = Some(Awaiting {
            generation,
            good,
            bad: written,
            rollouts,
        });
        let path = spec.path.clone();
        let verdict = hooks.fire_tracked(&spec.on_change, event);
        self.verdicts
            .push(Box::pin(async move { (path, generation, verdict.await) }));
    }

    /// A `revert` file's hooks are done with a replacement: if they failed,
    /// the previous content goes back (checked and validated as any
    /// render), the failed one is kept at `<path>.rejected`, the hooks run
    /// again and `file-reverted` fires.
    async fn on_verdict(
        &mut self,
        path: &Path,
        generation: u64,
        verdict: Verdict,
        hooks: &Arc<HookRunner>,
        client: &Client,
    ) {
        let Some(spec) = self.specs.iter().find(|s| s.path == path).cloned() else {
            return;
        };
        let Some(state) = self.states.get_mut(path) else {
            return;
        };
        if state.awaiting.as_ref().map(|a| a.generation) != Some(generation) {
            return;
        }
        let Some(awaiting) = state.awaiting.take() else {
            return;
        };
        match &verdict {
            Verdict::Ran => {
                self.rollouts
                    .report(client, &awaiting.rollouts, true, true, Some(true), None)
                    .await;
            }
            Verdict::Failed(e) => {
                let error = Some(format!("on_change hooks failed: {e}"));
                self.rollouts
                    .report(client, &awaiting.rollouts, true, true, Some(false), error)
                    .await;
            }
            Verdict::Superseded | Verdict::Stopped => {}
        }
        if !spec.revert {
            return;
        }
        let Some(state) = self.states.get_mut(path) else {
            return;
        };
        let error = match verdict {
            Verdict::Failed(e) => e,
            Verdict::Ran => return,
            Verdict::Superseded | Verdict::Stopped => {
                debug!(path = %path.display(), "The hooks' verdict on this render will not come (newer event, or hooks reloaded); nothing is reverted.");
                return;
            }
        };
        let started = std::time::Instant::now();
        let bad_hash = hash(&awaiting.bad);
        let kept = rejected_path(path);
        let Some(good) = awaiting.good else {
            let why = format!(
                "its on_change hooks failed ({error}), but the file was new: there is no previous content to put back"
            );
            error!(path = %path.display(), error = %error, "Rendered file not reverted: there was no previous content.");
            self.status
                .file_rendered(path, started.elapsed(), RenderOutcome::Failed, Some(why));
            return;
        };
        match keep_rejected(&spec, &awaiting.bad).await {
            Ok(()) => state.rejected = None,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "Could not keep the rejected render beside the file; it is remembered until the agent restarts.");
                state.rejected = Some(bad_hash.clone());
            }
        }
        match write(&spec, &good, Some(hooks)).await {
            Ok(WriteOutcome::Replaced {
                old_hash, new_hash, ..
            }) => {
                warn!(path = %path.display(), error = %error, rejected = %kept.display(), "on_change hooks failed; the previous content is back and the failed render is kept beside the file.");
                self.stats.send_modify(|s| s.reverted += 1);
                self.status.file_rendered(
                    path,
                    started.elapsed(),
                    RenderOutcome::Reverted,
                    Some(format!(
                        "reverted: its on_change hooks failed ({error}); the failed render is at `{}`",
                        kept.display()
                    )),
                );
                let shown = path.display().to_string();
                hooks.fire(
                    &spec.on_change,
                    &Event::FileChanged {
                        path: shown.clone(),
                        old_hash,
                        new_hash: new_hash.clone(),
                    },
                );
                hooks.fire(
                    &spec.on_revert,
                    &Event::FileReverted {
                        path: shown,
                        rejected_hash: bad_hash,
                        rejected_path: kept.display().to_string(),
                        restored_hash: new_hash,
                        error,
                    },
                );
            }
            Ok(WriteOutcome::Unchanged) => {
                debug!(path = %path.display(), "The previous content was already back.");
            }
            Err(e) => {
                error!(path = %path.display(), error = %e, hook_error = %error, "on_change hooks failed and the previous content could not be put back; the failed render stays.");
                self.status.file_rendered(
                    path,
                    started.elapsed(),
                    RenderOutcome::Failed,
                    Some(e.to_string()),
                );
            }
        }
    }

    /// The rollouts staged for this agent among what a render read.
    fn staged_in(&self, reads: &ReadSet, view: &CacheSnapshot) -> Vec<(String, Staged)> {
        let base = rollout::records_prefix(&self.namespace);
        let mut records: Vec<&crate::etcd::KeyValue> =
            reads.keys().filter_map(|k| view.get(k)).collect();
        for p in reads.prefixes().filter(|p| p.starts_with(&base)) {
            records.extend(view.under(p));
        }
        let mut out: Vec<(String, Staged)> = records
            .into_iter()
            .filter_map(|kv| {
                let key = kv.key.strip_prefix(&base)?;
                let r = rollout::Rollout::from_value(key, &kv.value).ok()?;
                r.stages(&self.agent).then(|| {
                    (
                        key.to_owned(),
                        Staged {
                            rollout: r,
                            id: kv.create_revision,
                        },
                    )
                })
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.dedup_by(|a, b| a.0 == b.0);
        out
    }

    /// Where the emptied-prefix guard of `file` is kept.
    fn guard_path(&self, file: &Path) -> Option<PathBuf> {
        let name = super::hash(file.as_os_str().as_encoded_bytes());
        Some(
            self.state_dir
                .as_ref()?
                .join(format!("{}.nonempty", &name[..32])),
        )
    }

    fn load_nonempty(&self, file: &Path) -> Option<BTreeSet<String>> {
        let path = self.guard_path(file)?;
        let text = std::fs::read(&path).ok()?;
        match serde_json::from_slice::<GuardRecord>(&text) {
            Ok(record) if record.file == file => Some(record.nonempty),
            Ok(_) => None,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "Ignoring an unreadable emptied-prefix record.");
                None
            }
        }
    }

    /// Best effort: without it a restart while a prefix is empty may blank
    /// the file, which is worth a warning, not a failed render.
    fn store_nonempty(&self, file: &Path, nonempty: &BTreeSet<String>) {
        let Some(path) = self.guard_path(file) else {
            return;
        };
        let record = GuardRecord {
            file: file.to_owned(),
            nonempty: nonempty.clone(),
        };
        let stored =
            std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).and_then(|()| {
                let dir = path.parent().unwrap_or(Path::new("."));
                let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
                serde_json::to_writer(&mut tmp, &record)?;
                tmp.as_file().sync_all()?;
                tmp.persist(&path).map_err(|e| e.error)?;
                Ok(())
            });
        if let Err(e) = stored {
            warn!(file = %file.display(), path = %path.display(), error = %e, "Could not keep which prefixes had keys; a restart while one is empty may blank the file.");
        }
    }

    /// Counts and reports a failure. It is logged as a warning once: the
    /// same error again (retries while a disk stays full, etcd stays
    /// unreachable) goes to debug, so the log says what is wrong without
    /// repeating it every few seconds.
    fn failed(
        &mut self,
        spec: &FileSpec,
        what: &'static str,
        error: String,
        same: String,
        started: std::time::Instant,
    ) {
        let state = self.states.entry(spec.path.clone()).or_default();
        if state.failing.as_deref() == Some(same.as_str()) {
            debug!(path = %spec.path.display(), error = %error, "{what} (again)");
        } else {
            warn!(path = %spec.path.display(), error = %error, "{what}");
            state.failing = Some(same);
        }
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

    /// A good render after failures: says so once.
    fn recovered(&mut self, spec: &FileSpec) {
        if let Some(state) = self.states.get_mut(&spec.path)
            && let Some(error) = state.failing.take()
        {
            info!(path = %spec.path.display(), failed_with = %error, "File rendered again after failing.");
        }
    }
}

/// Whether a file's last render read `record`; `None` while a file has
/// not rendered yet (what it reads is not known).
fn reads_record(
    specs: &[FileSpec],
    states: &BTreeMap<PathBuf, FileState>,
    record: &str,
) -> Option<bool> {
    let mut unknown = false;
    for spec in specs {
        match states.get(&spec.path).and_then(|s| s.deps.as_ref()) {
            Some(deps) if deps.touches(record) => return Some(true),
            Some(_) => {}
            None => unknown = true,
        }
    }
    (!unknown).then_some(false)
}
