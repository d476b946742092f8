//! The agent's state directory (`[agent] state_dir`): what it remembers
//! across restarts — each pool's last instance id, so a restarted agent
//! asks for the same one (the WASM compilation cache, which copes on its
//! own, lives there too).
//!
//! Nothing the agent promises needs it: when it cannot be written (read
//! only, full, a file where the directory should be), ids are still
//! claimed, only not remembered. That is said once for the whole agent,
//! with the reason, the write is retried by its caller, and the recovery is
//! said once too.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

/// The state directory, shared by the agent's controllers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
    /// Why the last write failed, while writes fail.
    failing: Arc<Mutex<Option<String>>>,
}

impl StateDir {
    pub fn new(root: &Path) -> StateDir {
        StateDir {
            root: root.to_owned(),
            failing: Arc::default(),
        }
    }

    /// Where `relative` lives.
    pub fn path(&self, relative: &Path) -> PathBuf {
        self.root.join(relative)
    }

    /// Writes `text` to `relative` whole (directories created as needed);
    /// `false` if it could not be, which is logged only when the directory
    /// was writable before.
    pub fn write(&self, relative: &Path, text: &str, losing: &str) -> bool {
        let path = self.path(relative);
        let result = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| write_atomically(&path, text));
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => {
                super::fd_limit::available();
                if failing.take().is_some() {
                    info!(dir = %self.root.display(), "The state directory is writable again.");
                }
                true
            }
            Err(e) => {
                super::fd_limit::note(&e);
                if failing.is_none() {
                    warn!(dir = %self.root.display(), path = %path.display(), error = %e, "Cannot write to the state directory; {losing} Retrying until it can be written.");
                }
                *failing = Some(e.to_string());
                false
            }
        }
    }
}

/// Writes `text` to a temporary file beside `path`, syncs it and renames
/// it over `path`: readers see the old content or the new, never half.
pub(crate) fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
