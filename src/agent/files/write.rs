//! Replacing a file only whole: stage beside it, check, validate, fsync,
//! rename, fsync the directory. When the content is unchanged, only its
//! mode and owner are brought back to the spec, in place.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::unistd::{Gid, Uid};
use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;
use tracing::{debug, info, warn};

use crate::agent::hooks::{Event, HookRunner, Outcome};
use crate::agent::manifest::FileSpec;
use crate::agent::process::{self, Job};

/// How long a `check` command may run.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// What [`write`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The file already had this content: not rewritten. Its mode, owner
    /// and group were set to the spec's if they differed (logged; no
    /// `file-changed` event, since what programs read did not change).
    Unchanged,
    /// The file was replaced.
    Replaced {
        old_hash: Option<String>,
        new_hash: String,
        /// Rename was refused (a bind-mounted file) and the content was
        /// written in place instead.
        in_place: bool,
        /// The content before, kept for `revert` (`None`: a new file).
        previous: Option<Vec<u8>>,
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
    let current = Current::read(&spec.path).map_err(io("read the current file"))?;
    if let Some(current) = &current
        && current.bytes == content
    {
        if current.through_symlink {
            // Changing the mode or owner would change the link's target, a
            // file the spec does not name.
            debug!(path = %spec.path.display(), "Destination is a symlink; its target's mode and owner are left alone.");
        } else if current.mode != spec.mode || spec.owner.is_some() || spec.group.is_some() {
            let spec = spec.clone();
            let file = current.file.try_clone().map_err(io("reopen the file"))?;
            tokio::task::spawn_blocking(move || fix_metadata(&spec, &file))
                .await
                .map_err(|e| io("set its mode and owner")(std::io::Error::other(e)))??;
        }
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
    let old_hash = current.as_ref().map(|c| hash(&c.bytes));
    let new_hash = hash(content);
    let (in_place, current) = {
        let spec = spec.clone();
        let content = content.to_vec();
        tokio::task::spawn_blocking(move || {
            commit(&spec, staged, &content, current.as_ref()).map(|p| (p, current))
        })
        .await
        .map_err(|e| io("replace the file")(std::io::Error::other(e)))??
    };
    crate::agent::fd_limit::available();
    Ok(WriteOutcome::Replaced {
        old_hash,
        new_hash,
        in_place,
        previous: spec.revert.then(|| current.map(|c| c.bytes)).flatten(),
    })
}

/// The destination as it is now.
struct Current {
    bytes: Vec<u8>,
    /// Permission bits (`0o7777`).
    mode: u32,
    /// Open on what was read, so metadata is fixed on that very file.
    file: File,
    /// The destination is a symlink and this is its target.
    through_symlink: bool,
}

impl Current {
    /// Reads `path`; `None` when there is no file.
    fn read(path: &Path) -> std::io::Result<Option<Current>> {
        let open = |follow: bool| {
            let mut options = std::fs::OpenOptions::new();
            options.read(true);
            if !follow {
                options.custom_flags(nix::libc::O_NOFOLLOW);
            }
            options.open(path)
        };
        let (mut file, through_symlink) = match open(false) {
            Ok(file) => (file, false),
            // ELOOP is how O_NOFOLLOW says "a symlink".
            Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => match open(true) {
                Ok(file) => (file, true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mode = file.metadata()?.mode() & 0o7777;
        Ok(Some(Current {
            bytes,
            mode,
            file,
            through_symlink,
        }))
    }
}

/// Sets `file`'s owner, group and mode to the spec's where they differ,
/// and says so in one line.
fn fix_metadata(spec: &FileSpec, file: &File) -> Result<(), WriteError> {
    let io = |action| io_error(&spec.path, action);
    let before = file.metadata().map_err(io("read its mode and owner"))?;
    let (uid, gid) = owner_ids(spec)?;
    let uid = uid.filter(|u| u.as_raw() != before.uid());
    let gid = gid.filter(|g| g.as_raw() != before.gid());
    let mut fixed = Vec::new();
    if uid.is_some() || gid.is_some() {
        nix::unistd::fchown(file, uid, gid).map_err(|e| WriteError::Owner {
            file: spec.path.clone(),
            message: format!("cannot set its owner: {e}"),
        })?;
        if let Some(uid) = uid {
            fixed.push(format!("owner {} -> {uid}", before.uid()));
        }
        if let Some(gid) = gid {
            fixed.push(format!("group {} -> {gid}", before.gid()));
        }
    }
    // A chown clears the set-id bits, so the mode is read again after it.
    let mode = file.metadata().map_err(io("read its mode"))?.mode() & 0o7777;
    if mode != spec.mode {
        file.set_permissions(std::fs::Permissions::from_mode(spec.mode))
            .map_err(io("set the mode"))?;
        if before.mode() & 0o7777 != spec.mode {
            fixed.push(format!(
                "mode {:04o} -> {:04o}",
                before.mode() & 0o7777,
                spec.mode
            ));
        }
    }
    if !fixed.is_empty() {
        info!(path = %spec.path.display(), fixed = %fixed.join(", "), "File metadata set to its spec; content unchanged, no hook fired.");
    }
    Ok(())
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
    // Owner first: a chown clears the set-id bits a mode may ask for.
    chown(spec, staged.as_file())?;
    staged
        .as_file()
        .set_permissions(std::fs::Permissions::from_mode(spec.mode))
        .map_err(io("set the mode"))?;
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
    let (uid, gid) = owner_ids(spec)?;
    nix::unistd::fchown(file, uid, gid).map_err(|e| WriteError::Owner {
        file: spec.path.clone(),
        message: format!("cannot set its owner: {e}"),
    })
}

/// The ids of the spec's `owner` and `group`, each `None` when not set.
fn owner_ids(spec: &FileSpec) -> Result<(Option<Uid>, Option<Gid>), WriteError> {
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
    Ok((uid, gid))
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
    current: Option<&Current>,
) -> Result<bool, WriteError> {
    let io = |action| io_error(&spec.path, action);
    let dir = parent(&spec.path).to_owned();
    if spec.backup
        && let Some(old) = current
    {
        keep_backup(spec, old)?;
    }
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

/// Keeps the old content as `<path>.bak` the way the file itself is
/// written: staged beside it, owned like the file and never more open than
/// the file was or is about to be, fsynced, renamed over `.bak` (a symlink
/// planted there is replaced, never followed), directory fsynced — before
/// the file is replaced, so a new file never shows without its backup.
fn keep_backup(spec: &FileSpec, old: &Current) -> Result<(), WriteError> {
    keep_beside(spec, Beside::Backup, &old.bytes, spec.mode & old.mode)
}

/// `<path>.rejected`: where `revert` keeps a render whose `on_change`
/// hooks failed.
pub fn rejected_path(path: &Path) -> PathBuf {
    let mut p = path.to_owned().into_os_string();
    p.push(".rejected");
    PathBuf::from(p)
}

/// Keeps `content`, a render put aside by `revert`, at `<path>.rejected`,
/// written as carefully as a backup (owned like the file, its mode).
pub async fn keep_rejected(spec: &FileSpec, content: &[u8]) -> Result<(), WriteError> {
    let path = spec.path.clone();
    let spec = spec.clone();
    let content = content.to_vec();
    tokio::task::spawn_blocking(move || keep_beside(&spec, Beside::Rejected, &content, spec.mode))
        .await
        .map_err(|e| io_error(&path, "keep the rejected render")(std::io::Error::other(e)))?
}

/// What is kept beside a file: a closed set.
#[derive(Debug, Clone, Copy)]
enum Beside {
    Backup,
    Rejected,
}

/// Writes `bytes` to `<path><suffix>`: staged beside the file, owned like
/// it, `mode`, fsynced, renamed over the name (a symlink planted there is
/// replaced, never followed), directory fsynced.
fn keep_beside(spec: &FileSpec, what: Beside, bytes: &[u8], mode: u32) -> Result<(), WriteError> {
    let io = |action| io_error(&spec.path, action);
    let (suffix, actions) = match what {
        Beside::Backup => (
            ".bak",
            [
                "create a staging file for its backup",
                "set its backup's mode",
                "write its backup",
                "sync its backup",
                "rename its backup into place",
            ],
        ),
        Beside::Rejected => (
            ".rejected",
            [
                "create a staging file for its rejected render",
                "set its rejected render's mode",
                "write its rejected render",
                "sync its rejected render",
                "rename its rejected render into place",
            ],
        ),
    };
    let dir = parent(&spec.path);
    let mut path = spec.path.clone().into_os_string();
    path.push(suffix);
    let name = spec
        .path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let mut staged = tempfile::Builder::new()
        .prefix(&format!(".{name}{suffix}.coord-"))
        .tempfile_in(dir)
        .map_err(io(actions[0]))?;
    chown(spec, staged.as_file())?;
    staged
        .as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io(actions[1]))?;
    staged.write_all(bytes).map_err(io(actions[2]))?;
    staged.as_file().sync_all().map_err(io(actions[3]))?;
    staged.persist(&path).map_err(|e| io(actions[4])(e.error))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync its directory"))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}
