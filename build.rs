//! Names the commit `coord --version` reports, as `COORD_COMMIT`.
//!
//! `COORD_COMMIT` from the environment wins (builds without a git checkout,
//! such as the container image, whose context leaves out `.git`); else the
//! checkout's HEAD, shortened; else "unknown". Cargo reruns this — and so
//! recompiles the crate — only when that answer can change: the variable,
//! HEAD, or the ref HEAD points to. Never on a file edit, so incremental
//! builds pay nothing for it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=COORD_COMMIT");
    let commit = match std::env::var("COORD_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_owned(),
        _ => from_git().unwrap_or_else(|| "unknown".to_owned()),
    };
    println!("cargo:rustc-env=COORD_COMMIT={commit}");
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn from_git() -> Option<String> {
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    // A worktree has HEAD (and its log) of its own; refs live in the
    // repository they share.
    let git_dir = PathBuf::from(git(&["rev-parse", "--absolute-git-dir"])?);
    let common =
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]).map(PathBuf::from);
    let mut watch = vec![git_dir.join("HEAD"), git_dir.join("logs/HEAD")];
    if let Some(common) = common {
        if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch.push(common.join(head_ref));
        }
        watch.push(common.join("packed-refs"));
    }
    // A path that does not exist would make Cargo rerun this every build.
    for path in watch.iter().filter(|p| Path::exists(p)) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    Some(commit)
}
