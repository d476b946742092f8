//! The agent at its open-file limit (`RLIMIT_NOFILE`), or the host's file
//! table full: every new file, socket, pipe and process fails. Each
//! failure is already reported and retried where it happens (a render
//! keeps the old file, a hook is retried, a check reports critical, etcd
//! calls back off); this says the cause once for the whole process, with
//! the limit and what to do, and once more when descriptors can be had
//! again.
//!
//! A process-wide flag, since the limit is the process's.

use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::sys::resource::{Resource, getrlimit};
use tracing::{info, warn};

static AT_LIMIT: AtomicBool = AtomicBool::new(false);

/// Looks at a failed operation's error: if it is for want of a file
/// descriptor, says so (once until [`available`] is called). Returns
/// whether it was.
pub fn note(e: &std::io::Error) -> bool {
    let errno = e.raw_os_error().map(Errno::from_raw);
    let process = match errno {
        Some(Errno::EMFILE) => true,
        Some(Errno::ENFILE) => false,
        _ => return false,
    };
    if AT_LIMIT.swap(true, Ordering::Relaxed) {
        return true;
    }
    if process {
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((0, 0));
        warn!(
            limit = soft,
            hard_limit = hard,
            "The agent has reached its open-file limit: new files, connections and processes fail until descriptors free up (renders keep the old file and are retried, hooks are retried, checks report critical). Raise the limit: LimitNOFILE= in the systemd unit, or ulimit -n."
        );
    } else {
        warn!(
            "The host's file table is full (ENFILE): new files, connections and processes fail until descriptors free up (renders keep the old file and are retried, hooks are retried, checks report critical). Raise fs.file-max or find what holds them."
        );
    }
    true
}

/// An operation that needed a new descriptor succeeded: if the limit was
/// reported, says that it no longer binds.
pub fn available() {
    if AT_LIMIT.load(Ordering::Relaxed) && AT_LIMIT.swap(false, Ordering::Relaxed) {
        info!("File descriptors can be had again; failed work is being retried.");
    }
}
