//! Noticing that files the agent reads (the manifest, templates) changed:
//! file events after a quiet period, and SIGHUP.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

/// Why the manifest is being read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadRequest {
    /// SIGHUP.
    Signal,
    /// The file changed and then stayed quiet.
    FileChanged,
}

/// Watches a set of files through their directories (editors and config
/// management replace files by rename, which a watch on the file itself
/// would miss) and reports which changed once writes have stopped for the
/// quiet period.
pub struct PathWatcher {
    _watcher: notify::RecommendedWatcher,
    events: mpsc::UnboundedReceiver<PathBuf>,
    quiet: Duration,
}

impl std::fmt::Debug for PathWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PathWatcher")
            .field("quiet", &self.quiet)
            .finish_non_exhaustive()
    }
}

fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

impl PathWatcher {
    pub fn start(paths: &[PathBuf], quiet: Duration) -> Result<Self, notify::Error> {
        let wanted: BTreeSet<PathBuf> = paths.iter().cloned().collect();
        let dirs: BTreeSet<PathBuf> = paths.iter().map(|p| dir_of(p)).collect();
        let (tx, events) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if event.kind.is_access() {
                    return;
                }
                for path in event.paths {
                    // Events name paths inside the watched directory; match
                    // by directory and file name, however the path was given.
                    if let Some(hit) = wanted.iter().find(|w| {
                        w.file_name() == path.file_name()
                            && (dir_of(w) == dir_of(&path) || path.ends_with(w))
                    }) {
                        let _ = tx.send(hit.clone());
                    }
                }
            })?;
        for dir in &dirs {
            watcher.watch(dir, RecursiveMode::NonRecursive)?;
        }
        Ok(PathWatcher {
            _watcher: watcher,
            events,
            quiet,
        })
    }

    /// Waits for changes followed by the quiet period; returns the files
    /// that changed.
    pub async fn changed(&mut self) -> BTreeSet<PathBuf> {
        let mut changed = BTreeSet::new();
        match self.events.recv().await {
            Some(p) => changed.insert(p),
            None => std::future::pending().await,
        };
        let mut deadline = Instant::now() + self.quiet;
        loop {
            tokio::select! {
                _ = sleep_until(deadline) => return changed,
                e = self.events.recv() => match e {
                    Some(p) => {
                        changed.insert(p);
                        deadline = Instant::now() + self.quiet;
                    }
                    None => return changed,
                },
            }
        }
    }
}
