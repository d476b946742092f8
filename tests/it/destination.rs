//! The filesystem a rendered file lives on misbehaving: full, read-only.
//! The old file stays, the agent says so once, retries, and recovers by
//! itself when the filesystem does. Each agent runs in a mount namespace of
//! its own with a small tmpfs as the destination directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::support::{CoordProcess, LocalEtcd, etcd, eventually};

fn manifest(etcd: &LocalEtcd, dest: &Path, state: &Path) -> String {
    format!(
        "[agent]\nname = \"dest\"\nttl = \"5s\"\nstate_dir = \"{}\"\n[etcd]\nendpoints = [\"{}\"]\n\
         [[file]]\npath = \"{}\"\nkey = \"/app/v\"\n",
        state.display(),
        etcd.endpoint(),
        dest.display()
    )
}

/// `path` as the agent (in its own mount namespace) sees it.
fn seen_by(agent: &CoordProcess, path: &Path) -> PathBuf {
    Path::new(&format!("/proc/{}/root", agent.pid()))
        .join(path.strip_prefix("/").expect("absolute"))
}

async fn agent_file_is(agent: &CoordProcess, path: &Path, want: &str) {
    let seen = seen_by(agent, path);
    eventually(
        &format!("`{}` to read {:.40?}", path.display(), want),
        || async { (std::fs::read_to_string(&seen).ok()? == want).then_some(()) },
    )
    .await;
}

fn count(log: &str, words: &str) -> usize {
    log.lines().filter(|l| l.contains(words)).count()
}

#[tokio::test]
async fn a_full_disk_keeps_the_old_file_says_so_once_and_recovers_when_space_returns() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/v", "small", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let dest_dir = dir.path().join("dest");
    std::fs::create_dir(&dest_dir).expect("dir");
    let dest = dest_dir.join("out");
    let agent = CoordProcess::run_in_mount_namespace(
        &manifest(&etcd, &dest, &dir.path().join("state")),
        &format!("mount -t tmpfs -o size=256k tmpfs '{}'", dest_dir.display()),
    );
    agent_file_is(&agent, &dest, "small").await;
    // Fill the filesystem to the last byte.
    let filler = seen_by(&agent, &dest_dir.join("filler"));
    {
        let mut f = std::fs::File::create(&filler).expect("filler");
        let block = vec![b'f'; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(b"f");
    }
    let big = "b".repeat(100 * 1024);
    client.put("/app/v", big.clone(), None).await.expect("put");
    eventually("the failed write to be logged", || {
        let log = agent.log();
        async move { log.contains("No space left on device").then_some(()) }
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(seen_by(&agent, &dest)).expect("file"),
        "small",
        "the old file stays whole"
    );
    // Retried (every few seconds) while full: still one warning.
    eventually("a retry while still full", || {
        let log = agent.log();
        async move { (count(&log, "No space left on device") >= 2).then_some(()) }
    })
    .await;
    std::fs::remove_file(&filler).expect("free the space");
    agent_file_is(&agent, &dest, &big).await;
    let log = agent.log();
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("No space left on device"))
        .count();
    assert_eq!(warnings, 1, "one warning while the disk was full:\n{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("INFO") && l.contains("rendered again after failing")),
        "the recovery is said:\n{log}"
    );
}

#[tokio::test]
async fn a_read_only_destination_keeps_the_old_file_and_recovers_when_writable_again() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/v", "one", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let dest_dir = dir.path().join("dest");
    std::fs::create_dir(&dest_dir).expect("dir");
    let dest = dest_dir.join("out");
    let agent = CoordProcess::run_in_mount_namespace(
        &manifest(&etcd, &dest, &dir.path().join("state")),
        &format!("mount -t tmpfs -o size=1m tmpfs '{}'", dest_dir.display()),
    );
    agent_file_is(&agent, &dest, "one").await;
    let remount = |how: &str| {
        let out = std::process::Command::new("nsenter")
            .args([
                "-t",
                &agent.pid().to_string(),
                "-m",
                "mount",
                "-o",
                &format!("remount,{how}"),
                &dest_dir.display().to_string(),
            ])
            .output()
            .expect("nsenter (util-linux) must be installed");
        assert!(
            out.status.success(),
            "remount {how}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    remount("ro");
    client.put("/app/v", "two", None).await.expect("put");
    eventually("the failed write to be logged", || {
        let log = agent.log();
        async move { log.contains("Read-only file system").then_some(()) }
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(seen_by(&agent, &dest)).expect("file"),
        "one"
    );
    remount("rw");
    agent_file_is(&agent, &dest, "two").await;
}
