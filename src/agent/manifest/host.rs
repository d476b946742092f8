//! What a manifest asks of the host that the host does not have (yet):
//! warnings for `coord check`, never errors — the agent copes, retrying or
//! doing without — but an operator should know before it runs.

use std::path::Path;

use super::Manifest;

impl Manifest {
    /// One line per thing the host lacks, each naming where the manifest
    /// asks for it (`path:line:col: warning: …`).
    pub fn host_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some(problem) = not_a_directory(&self.agent.state_dir) {
            warnings.push(format!(
                "{}: warning: [agent] state_dir {}: {problem}; the agent runs, but does not remember instance ids across restarts (nor cache compiled WASM plugins) until it can be created",
                self.path.display(),
                self.agent.state_dir.display(),
            ));
        }
        for spec in &self.instance_ids {
            let Some(file) = &spec.file else { continue };
            if let Some(problem) = missing_directory(file) {
                warnings.push(format!(
                    "{}:{}: warning: [[instance_id]] `{}`: {problem}; the agent retries writing the id file until it can",
                    self.path.display(),
                    spec.location,
                    spec.pool,
                ));
            }
        }
        warnings
    }
}

/// Why `file` cannot be created in its directory, if the directory is not
/// there.
fn missing_directory(file: &Path) -> Option<String> {
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty())?;
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => None,
        Ok(_) => Some(format!(
            "{} (the directory of `file`) is not a directory",
            dir.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(format!(
            "the directory {} (of `file`) does not exist",
            dir.display()
        )),
        Err(e) => Some(format!(
            "the directory {} (of `file`) cannot be read: {e}",
            dir.display()
        )),
    }
}

/// Why `dir` cannot be a directory: it, or the nearest of its ancestors
/// that exists, is something else. (Permissions are not judged: `coord
/// check` may well run as another user than the agent.)
fn not_a_directory(dir: &Path) -> Option<String> {
    let existing = dir.ancestors().find(|a| a.symlink_metadata().is_ok())?;
    let is_dir = std::fs::metadata(existing).is_ok_and(|m| m.is_dir());
    match (is_dir, existing == dir) {
        (true, _) => None,
        (false, true) => Some("it is not a directory".to_owned()),
        (false, false) => Some(format!(
            "it cannot be created, since {} is not a directory",
            existing.display()
        )),
    }
}
