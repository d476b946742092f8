//! Noticing that files the agent reads (the manifest, templates) changed:
//! file events after a quiet period, and SIGHUP.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tracing::warn;

/// Why the manifest is being read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadRequest {
    /// SIGHUP.
    Signal,
    /// The file changed and then stayed quiet.
    FileChanged,
}

impl ReloadRequest {
    /// What asked for the reload, as logs say it.
    pub fn name(self) -> &'static str {
        match self {
            ReloadRequest::Signal => "SIGHUP",
            ReloadRequest::FileChanged => "file changed",
        }
    }
}

/// Watches a set of files through their directories (editors and config
/// management replace files by rename, which a watch on the file itself
/// would miss) and reports which changed once writes have stopped for the
/// quiet period.
pub struct PathWatcher {
    _watcher: Box<dyn Watcher + Send>,
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

/// The link a Kubernetes ConfigMap or Secret volume swaps on an update.
const KUBERNETES_DATA: &str = "..data";

/// How often files are looked at when inotify is out of reach.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// Starts watching `dirs` with `watcher`.
fn watch_dirs<W: Watcher>(
    watcher: notify::Result<W>,
    dirs: &BTreeSet<PathBuf>,
) -> notify::Result<W> {
    let mut watcher = watcher?;
    for dir in dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}

/// Whether `e` says the host's inotify instances or watches are used up.
fn out_of_inotify(e: &notify::Error) -> bool {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => true,
        notify::ErrorKind::Io(io) => matches!(
            io.raw_os_error(),
            Some(nix::libc::EMFILE | nix::libc::ENFILE | nix::libc::ENOSPC)
        ),
        _ => false,
    }
}

/// Turns file events into the wanted paths that changed.
#[derive(Clone)]
struct Router {
    wanted: BTreeSet<PathBuf>,
    tx: mpsc::UnboundedSender<PathBuf>,
}

impl notify::EventHandler for Router {
    fn handle_event(&mut self, event: notify::Result<notify::Event>) {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        for path in event.paths {
            // Kubernetes mounts a ConfigMap as links through `..data`,
            // which it swaps by rename on every update: then the files'
            // own names see no event, and any of them in that directory
            // may have changed.
            if path.file_name().is_some_and(|n| n == KUBERNETES_DATA) {
                for hit in self.wanted.iter().filter(|w| dir_of(w) == dir_of(&path)) {
                    let _ = self.tx.send(hit.clone());
                }
                continue;
            }
            // Events name paths inside the watched directory; match by
            // directory and file name, however the path was given.
            if let Some(hit) = self.wanted.iter().find(|w| {
                w.file_name() == path.file_name()
                    && (dir_of(w) == dir_of(&path) || path.ends_with(w))
            }) {
                let _ = self.tx.send(hit.clone());
            }
        }
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
        let router = Router { wanted, tx };
        let watcher: Box<dyn Watcher + Send> = match watch_dirs(
            notify::recommended_watcher(router.clone()),
            &dirs,
        ) {
            Ok(w) => Box::new(w),
            // A host out of inotify instances or watches (a busy
            // Kubernetes node, other agents) must not stop the agent: it
            // looks at the files itself instead.
            Err(e) if out_of_inotify(&e) => {
                warn!(error = %e, poll_every = ?POLL_EVERY, "Cannot watch files with inotify; polling them instead. Raise fs.inotify.max_user_instances or max_user_watches to have changes noticed at once.");
                Box::new(watch_dirs(
                    notify::PollWatcher::new(
                        router,
                        notify::Config::default().with_poll_interval(POLL_EVERY),
                    ),
                    &dirs,
                )?)
            }
            Err(e) => return Err(e),
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// What the kubelet's atomic writer does on a ConfigMap update: the new
    /// content in a new timestamped directory, `..data` swapped to it by
    /// rename, the old directory removed.
    fn kubelet_update(dir: &Path, generation: u32, content: &str) {
        let data = dir.join(format!("..2026_11_24_{generation:02}"));
        std::fs::create_dir(&data).expect("data dir");
        std::fs::write(data.join("agent.toml"), content).expect("write");
        let tmp = dir.join("..data_tmp");
        symlink(data.file_name().expect("name"), &tmp).expect("link");
        std::fs::rename(&tmp, dir.join(KUBERNETES_DATA)).expect("swap");
        if generation > 1 {
            let old = dir.join(format!("..2026_11_24_{:02}", generation - 1));
            std::fs::remove_dir_all(old).expect("remove the old generation");
        }
    }

    #[tokio::test]
    async fn a_configmap_update_through_its_data_link_counts_as_a_change_of_its_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        kubelet_update(dir.path(), 1, "# one");
        let manifest = dir.path().join("agent.toml");
        symlink("..data/agent.toml", &manifest).expect("link");
        let mut watcher =
            PathWatcher::start(std::slice::from_ref(&manifest), Duration::from_millis(50))
                .expect("watch");
        kubelet_update(dir.path(), 2, "# two");
        let changed = tokio::time::timeout(Duration::from_secs(10), watcher.changed())
            .await
            .expect("the update is noticed");
        assert_eq!(changed, BTreeSet::from([manifest.clone()]));
        assert_eq!(std::fs::read_to_string(&manifest).expect("read"), "# two");
    }
}
