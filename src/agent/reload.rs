//! Noticing that the manifest changed: file events (after a quiet period)
//! and SIGHUP.

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

/// Watches the manifest's directory (editors and config management replace
/// files by rename, which a watch on the file itself would miss) and reports
/// a change once writes have stopped for the quiet period.
pub struct ManifestWatcher {
    _watcher: notify::RecommendedWatcher,
    events: mpsc::UnboundedReceiver<()>,
    quiet: Duration,
}

impl std::fmt::Debug for ManifestWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManifestWatcher")
            .field("quiet", &self.quiet)
            .finish_non_exhaustive()
    }
}

impl ManifestWatcher {
    pub fn start(path: &Path, quiet: Duration) -> Result<Self, notify::Error> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().map(|n| n.to_owned());
        let (tx, events) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if event.kind.is_access() {
                    return;
                }
                if event.paths.iter().any(|p| p.file_name() == name.as_deref()) {
                    let _ = tx.send(());
                }
            })?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        Ok(ManifestWatcher {
            _watcher: watcher,
            events,
            quiet,
        })
    }

    /// Waits for a change followed by the quiet period.
    pub async fn changed(&mut self) -> ReloadRequest {
        if self.events.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
        let mut deadline = Instant::now() + self.quiet;
        loop {
            tokio::select! {
                _ = sleep_until(deadline) => return ReloadRequest::FileChanged,
                e = self.events.recv() => match e {
                    Some(()) => deadline = Instant::now() + self.quiet,
                    None => return ReloadRequest::FileChanged,
                },
            }
        }
    }
}
