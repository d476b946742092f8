//! Test support: etcd processes, agent processes, bounded waiting.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

pub use coord::etcd::local::{LocalCluster, LocalEtcd};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Generous bound for anything that should happen "soon": it keeps a broken
/// test from hanging, it is not a performance assertion.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Starts a single-member etcd, or fails with install instructions.
pub async fn etcd() -> LocalEtcd {
    match LocalEtcd::start().await {
        Ok(e) => e,
        Err(e) => panic!("cannot start etcd for this test: {e}"),
    }
}

/// Starts a 3-member etcd cluster, or fails with install instructions.
pub async fn cluster() -> LocalCluster {
    match LocalCluster::start(3).await {
        Ok(c) => c,
        Err(e) => panic!("cannot start an etcd cluster for this test: {e}"),
    }
}

/// Polls `check` until it returns `Some`, or panics after `PATIENCE`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A manifest for an agent named `name` with the given endpoints and TTL.
pub fn manifest(name: &str, endpoints: &[String], ttl_secs: u64) -> String {
    let eps = endpoints
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[agent]\nname = \"{name}\"\nttl = \"{ttl_secs}s\"\n\n[etcd]\nendpoints = [{eps}]\ndial_timeout = \"1s\"\nrequest_timeout = \"2s\"\n"
    )
}

/// A `coord` process, killed on drop. Its log goes to a file that is
/// printed if the test panics while it runs.
pub struct CoordProcess {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    log: PathBuf,
}

impl CoordProcess {
    /// `coord run <dir>/agent.toml` with `manifest` as the file.
    pub fn run(manifest: &str) -> CoordProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("agent.toml"), manifest).expect("write manifest");
        let path = dir.path().join("agent.toml");
        Self::spawn(dir, &["run".as_ref(), path.as_os_str()])
    }

    fn spawn(dir: tempfile::TempDir, args: &[&std::ffi::OsStr]) -> CoordProcess {
        let log = dir.path().join("coord.log");
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_coord"))
            .args(args)
            .env("COORD_LOG", "debug,h2=info,tower=info,hyper=info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn coord");
        CoordProcess {
            child: Some(child),
            dir,
            log,
        }
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: Signal) {
        let pid = self.child.as_ref().expect("running").id();
        kill(Pid::from_raw(pid as i32), signal).expect("signal coord");
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits for the process to exit (bounded by `PATIENCE`).
    pub async fn wait(&mut self) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "coord did not exit; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for CoordProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- coord log ---\n{}\n--- end of coord log ---",
                self.log()
            );
        }
    }
}

/// Runs `coord ARGS…` to completion and returns (status, stdout, stderr).
pub fn coord(args: &[&str], cwd: Option<&Path>) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_coord"));
    cmd.args(args);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let out = cmd.output().expect("run coord");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The repository root (where `agent.toml.example` lives).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
