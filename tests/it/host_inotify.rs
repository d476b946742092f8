//! An agent on a host whose inotify instances are all in use (a busy
//! Kubernetes node, a hundred other watchers): it must start, and notice
//! manifest edits by looking at the file itself.
//!
//! The limit (`fs.inotify.max_user_instances`) is per user: the agent runs
//! as `nobody`, and `tail -f` processes, also as `nobody`, take every
//! instance first, so nothing else on the machine is starved.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::{etcd, eventually};

const NOBODY: u32 = 65534;

/// Whether `pid` has an inotify instance open.
fn has_inotify(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy().contains("inotify"))
        })
    })
}

/// Child processes killed on drop.
struct Reaped(Vec<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn manifest(endpoint: &str, dir: &Path, key: &str) -> String {
    format!(
        "[agent]\nname = \"inotify-starved\"\nttl = \"3s\"\nstate_dir = \"{state}\"\n\n\
         [etcd]\nendpoints = [\"{endpoint}\"]\n\n\
         [[file]]\npath = \"{out}\"\nsource = \"{{{{ key('{key}') }}}}\"\n",
        state = dir.join("state").display(),
        out = dir.join("out.txt").display(),
    )
}

#[tokio::test]
async fn an_agent_on_a_host_out_of_inotify_instances_starts_and_follows_manifest_edits() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs the agent as `nobody` and must itself run as root"
    );
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/starved/a", "first", None).await.expect("put");
    client.put("/starved/b", "second", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, manifest(&etcd.endpoint(), dir.path(), "/starved/a")).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");

    let limit: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .expect("inotify limit")
        .trim()
        .parse()
        .expect("a number");
    assert!(
        limit <= 4096,
        "max_user_instances is {limit}: too many to use up here"
    );
    let followed = dir.path().join("followed");
    std::fs::write(&followed, "").expect("write");
    let mut tails = Reaped(Vec::new());
    for _ in 0..limit {
        tails.0.push(
            Command::new("tail")
                .args(["-f"])
                .arg(&followed)
                .uid(NOBODY)
                .gid(NOBODY)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("tail (coreutils)"),
        );
    }
    let pids: Vec<u32> = tails.0.iter().map(Child::id).collect();
    eventually("every tail -f to hold an inotify instance", || async {
        pids.iter().all(|p| has_inotify(*p)).then_some(())
    })
    .await;

    let log = std::fs::File::create(dir.path().join("coord.log")).expect("log");
    let agent = Command::new(env!("CARGO_BIN_EXE_coord"))
        .arg("run")
        .arg(&path)
        .env("HOME", dir.path())
        .env_remove("XDG_CACHE_HOME")
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("coord run");
    let mut agent = Reaped(vec![agent]);
    let out = dir.path().join("out.txt");
    let log_text = || std::fs::read_to_string(dir.path().join("coord.log")).unwrap_or_default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&out).ok().as_deref() != Some("first") {
        if let Ok(Some(status)) = agent.0[0].try_wait() {
            panic!("the agent exited ({status}):\n{}", log_text());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the file was not rendered:\n{}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        log_text().contains("polling them instead"),
        "{}",
        log_text()
    );

    // An edit, noticed without inotify.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(&path, manifest(&etcd.endpoint(), dir.path(), "/starved/b")).expect("edit");
    eventually("the edit applied", || async {
        (std::fs::read_to_string(&out).ok()? == "second").then_some(())
    })
    .await;
    drop(agent);
    drop(tails);
}
