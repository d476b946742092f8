//! Replacing a file only whole: stage beside it, check, validate, fsync,
//! rename, fsync the directory. Nothing is written when nothing changed.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;
use tracing::warn;

use crate::agent::hooks::{Event, HookRunner, Outcome};
use crate::agent::manifest::FileSpec;
use crate::agent::process::{self, Job};

/// How long a `check` command may run.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// What [`write`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The file already had this content: not touched at all.
    Unchanged,
    /// The file was replaced.
    Replaced {
        old_hash: Option<String>,
        new_hash: String,
        /// Rename was refused (a bind-mounted file) and the content was
        /// written in place instead.
        in_place: bool,
    },
}

/// Why a file was not replaced. The old file is untouched.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("`{file}` was not replaced: its check `{command}` failed: {output}")]
    Check {
        file: PathBuf,
        command: String,
        output: String,
    },
    #[error("`{file}` was not replaced: hook `{hook}` vetoed it: {reason}")]
    Vetoed {
        file: PathBuf,
        hook: String,
        reason: String,
    },
    #[error("`{file}` was not replaced: its validate hook failed: {source}")]
    Hook {
        file: PathBuf,
        #[source]
        source: crate::agent::hooks::HookError,
    },
    #[error("`{file}` was not replaced: failed to {action}: {source}")]
    Io {
        file: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("`{file}` was not replaced: {message}")]
    Owner { file: PathBuf, message: String },
}

/// Maps an I/O error on `file` while doing `action` to a [`WriteError`].
fn io_error(file: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> WriteError {
    let file = file.to_owned();
    move |source| {
        crate::agent::fd_limit::note(&source);
        WriteError::Io {
            file,
            action,
            source,
        }
    }
}

/// SHA-256 of `bytes`, in hex.
pub fn hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Replaces `spec.path` with `content` if it differs, after the file's
/// check command and validate hooks accept it.
pub async fn write(
    spec: &FileSpec,
    content: &[u8],
    hooks: Option<&HookRunner>,
) -> Result<WriteOutcome, WriteError> {
    let io = |action| io_error(&spec.path, action);
    let current = match std::fs::read(&spec.path) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io("read the current file")(e)),
    };
    if current.as_deref() == Some(content) {
        return Ok(WriteOutcome::Unchanged);
    }
    let staged = {
        let spec = spec.clone();
        let content = content.to_vec();
        tokio::task::spawn_blocking(move || stage(&spec, &content))
            .await
            .map_err(|e| io("stage the new content")(std::io::Error::other(e)))??
    };
    if let Some(argv) = &spec.check {
        check(spec, argv, staged.path()).await?;
    }
    if let Some(hooks) = hooks {
        for name in &spec.validate {
            let event = Event::ValidateFile {
                path: spec.path.display().to_string(),
                staged_path: staged.path().display().to_string(),
                content: String::from_utf8_lossy(content).into_owned(),
            };
            match hooks.run_now(name, event).await {
                Ok(Outcome::Done) => {}
                Ok(Outcome::Vetoed(reason)) => {
                    return Err(WriteError::Vetoed {
                        file: spec.path.clone(),
                        hook: name.clone(),
                        reason,
                    });
                }
                Err(source) => {
                    return Err(WriteError::Hook {
                        file: spec.path.clone(),
                        source,
                    });
                }
            }
        }
    }
    let old_hash = current.as_deref().map(hash);
    let new_hash = hash(content);
    let in_place = {
        let spec = spec.clone();
        let content = content.to_vec();
        tokio::task::spawn_blocking(move || commit(&spec, staged, &content, current.as_deref()))
            .await
            .map_err(|e| io("replace the file")(std::io::Error::other(e)))??
    };
    crate::agent::fd_limit::available();
    Ok(WriteOutcome::Replaced {
        old_hash,
        new_hash,
        in_place,
    })
}

/// Writes `content` to a temporary file in the destination's directory,
/// with the file's mode and owner, synced to disk.
fn stage(spec: &FileSpec, content: &[u8]) -> Result<NamedTempFile, WriteError> {
    let io = |action| io_error(&spec.path, action);
    let dir = parent(&spec.path);
    if !dir.is_dir() {
        if spec.create_dirs {
            std::fs::create_dir_all(dir).map_err(io("create its directory"))?;
        } else {
            return Err(io(
                "find its directory (set create_dirs = true to create it)",
            )(std::io::Error::from(
                std::io::ErrorKind::NotFound,
            )));
        }
    }
    let name = spec
        .path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let mut staged = tempfile::Builder::new()
        .prefix(&format!(".{name}.coord-"))
        .tempfile_in(dir)
        .map_err(io("create a staging file beside it"))?;
    staged
        .write_all(content)
        .map_err(io("write the staging file"))?;
    staged
        .as_file()
        .set_permissions(std::fs::Permissions::from_mode(spec.mode))
        .map_err(io("set the mode"))?;
    chown(spec, staged.as_file())?;
    staged
        .as_file()
        .sync_all()
        .map_err(io("sync the staging file"))?;
    Ok(staged)
}

fn chown(spec: &FileSpec, file: &File) -> Result<(), WriteError> {
    if spec.owner.is_none() && spec.group.is_none() {
        return Ok(());
    }
    let owner_err = |message: String| WriteError::Owner {
        file: spec.path.clone(),
        message,
    };
    let uid = match &spec.owner {
        Some(name) => Some(
            nix::unistd::User::from_name(name)
                .map_err(|e| owner_err(format!("cannot look up user `{name}`: {e}")))?
                .ok_or_else(|| owner_err(format!("no user `{name}`")))?
                .uid,
        ),
        None => None,
    };
    let gid = match &spec.group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .map_err(|e| owner_err(format!("cannot look up group `{name}`: {e}")))?
                .ok_or_else(|| owner_err(format!("no group `{name}`")))?
                .gid,
        ),
        None => None,
    };
    nix::unistd::fchown(file, uid, gid).map_err(|e| owner_err(format!("cannot set its owner: {e}")))
}

/// Runs the file's check on the staged copy.
async fn check(spec: &FileSpec, argv: &[String], staged: &Path) -> Result<(), WriteError> {
    let staged = staged.display().to_string();
    let argv: Vec<String> = argv
        .iter()
        .map(|a| a.replace("{staged}", &staged))
        .collect();
    let command = argv.join(" ");
    let fail = |output: String| WriteError::Check {
        file: spec.path.clone(),
        command: command.clone(),
        output,
    };
    if argv.is_empty() {
        return Err(fail("empty command".into()));
    }
    let out = match process::run(Job {
        argv: &argv,
        env: Vec::new(),
        stdin: None,
        timeout: CHECK_TIMEOUT,
        grace: Duration::from_secs(2),
        log_as: None,
    })
    .await
    {
        Err(e) => return Err(fail(e.to_string())),
        Ok(out) => out,
    };
    let Some(status) = out.status else {
        return Err(fail(format!("still running after {CHECK_TIMEOUT:?}")));
    };
    if status.success() {
        return Ok(());
    }
    let mut output = out.stderr.joined(" | ");
    let stdout = out.stdout.joined(" | ");
    if !stdout.is_empty() {
        if !output.is_empty() {
            output.push_str(" | ");
        }
        output.push_str(&stdout);
    }
    Err(fail(format!("{status}: {output}")))
}

/// Makes the staged file the real one: backup, rename, sync the directory.
/// Returns whether the content had to be written in place.
fn commit(
    spec: &FileSpec,
    staged: NamedTempFile,
    content: &[u8],
    current: Option<&[u8]>,
) -> Result<bool, WriteError> {
    let io = |action| io_error(&spec.path, action);
    if spec.backup
        && let Some(old) = current
    {
        let mut backup = spec.path.clone().into_os_string();
        backup.push(".bak");
        std::fs::write(&backup, old).map_err(io("keep a backup of the old content"))?;
    }
    let dir = parent(&spec.path).to_owned();
    let in_place = match staged.persist(&spec.path) {
        Ok(_) => false,
        Err(e) if e.error.raw_os_error() == Some(nix::libc::EBUSY) => {
            // A bind-mounted file (a container's config) cannot be renamed
            // over; writing in place is the only way, and is not atomic.
            warn!(path = %spec.path.display(), "Rename refused (EBUSY, a bind mount?); writing in place.");
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&spec.path)
                .map_err(io("open it for an in-place write"))?;
            file.write_all(content).map_err(io("write it in place"))?;
            file.sync_all().map_err(io("sync it"))?;
            true
        }
        Err(e) => return Err(io("rename the staging file over it")(e.error)),
    };
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync its directory"))?;
    Ok(in_place)
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}
