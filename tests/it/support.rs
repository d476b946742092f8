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

/// Waits until the file at `path` holds exactly `want`.
pub async fn file_is(path: &Path, want: &str) {
    let what = format!("`{}` to read {want:?}", path.display());
    eventually(&what, || async {
        (std::fs::read_to_string(path).ok()? == want).then_some(())
    })
    .await;
}

/// Waits until `agent` has logged `words`; its whole log then.
pub async fn log_says(agent: &CoordProcess, words: &str) -> String {
    eventually(&format!("the agent to log {words:?}"), || {
        let log = agent.log();
        async move { log.contains(words).then_some(log) }
    })
    .await
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
        Self::run_with_env(manifest, &[])
    }

    /// Like [`CoordProcess::run`], with `env` added to its environment.
    pub fn run_with_env(manifest: &str, env: &[(&str, &std::ffi::OsStr)]) -> CoordProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("agent.toml"), manifest).expect("write manifest");
        let path = dir.path().join("agent.toml");
        Self::spawn(dir, &["run".as_ref(), path.as_os_str()], env)
    }

    /// `coord run <dir>/agent.toml` in a mount namespace of its own, after
    /// the shell commands `setup` ran in it (mounts only it sees; the test
    /// reaches them through `/proc/<pid>/root`). Needs `unshare`
    /// (util-linux) and the right to make a mount namespace (root here).
    pub fn run_in_mount_namespace(manifest: &str, setup: &str) -> CoordProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, manifest).expect("write manifest");
        let script = format!(
            "{setup} && exec '{}' run '{}'",
            env!("CARGO_BIN_EXE_coord"),
            path.display()
        );
        Self::spawn_program(
            dir,
            "unshare",
            &[
                "--mount".as_ref(),
                "--propagation".as_ref(),
                "private".as_ref(),
                "sh".as_ref(),
                "-c".as_ref(),
                script.as_ref(),
            ],
            &[],
        )
    }

    /// `coord ARGS…` (`{manifest}` in them stands for `<dir>/agent.toml`)
    /// with its stdout and stderr both on `output`, as with `2>&1 | …`;
    /// [`CoordProcess::log`] is then empty.
    pub fn run_with_output(
        manifest: &str,
        args: &[&str],
        output: std::io::PipeWriter,
    ) -> CoordProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, manifest).expect("write manifest");
        let args: Vec<std::ffi::OsString> = args
            .iter()
            .map(|a| {
                if *a == "{manifest}" {
                    path.clone().into_os_string()
                } else {
                    a.into()
                }
            })
            .collect();
        let err = output.try_clone().expect("dup the output pipe");
        let child = Command::new(env!("CARGO_BIN_EXE_coord"))
            .args(&args)
            .current_dir(dir.path())
            .env("COORD_LOG", "debug,h2=info,tower=info,hyper=info")
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(err)
            .spawn()
            .expect("spawn coord");
        CoordProcess {
            child: Some(child),
            log: dir.path().join("coord.log"),
            dir,
        }
    }

    fn spawn(
        dir: tempfile::TempDir,
        args: &[&std::ffi::OsStr],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> CoordProcess {
        Self::spawn_program(dir, env!("CARGO_BIN_EXE_coord"), args, env)
    }

    fn spawn_program(
        dir: tempfile::TempDir,
        program: &str,
        args: &[&std::ffi::OsStr],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> CoordProcess {
        let log = dir.path().join("coord.log");
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .env("COORD_LOG", "debug,h2=info,tower=info,hyper=info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{program}`: {e}"));
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

    /// The process id, while it runs.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).expect("signal coord");
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

/// Runs a tool, failing with how to install it when it is not there.
pub fn run_tool(program: &str, args: &[&str], install: &str) -> std::process::Output {
    match Command::new(program).args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{program}` is not installed; {install}")
        }
        Err(e) => panic!("cannot run `{program}`: {e}"),
    }
}

/// The repository root (where `agent.toml.example` lives).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The compiled plugins of `plugins/` (components for `wasm32-wasip2`).
pub struct Plugins {
    pub log_events: PathBuf,
    pub validate_config: PathBuf,
    pub misbehave: PathBuf,
}

/// Builds the plugins workspace once per test process (release, for
/// `wasm32-wasip2`) and returns the components, or fails saying how to get
/// what is missing.
pub fn plugins() -> &'static Plugins {
    static PLUGINS: std::sync::OnceLock<Result<Plugins, String>> = std::sync::OnceLock::new();
    match PLUGINS.get_or_init(build_plugins) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn build_plugins() -> Result<Plugins, String> {
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("cannot run rustc to find the wasm32-wasip2 target: {e}"))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/wasm32-wasip2").is_dir() {
        return Err(
            "the wasm32-wasip2 Rust target is not installed; install it with:\n    rustup target add wasm32-wasip2"
                .to_owned(),
        );
    }
    let root = repo_root();
    let target_dir = root.join("plugins/target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "--locked",
            "--release",
            "--target",
            "wasm32-wasip2",
        ])
        .arg("--manifest-path")
        .arg(root.join("plugins/Cargo.toml"))
        // Whatever target dir the tests were built in, the plugins have theirs.
        .env("CARGO_TARGET_DIR", &target_dir)
        .output()
        .map_err(|e| format!("cannot run cargo to build the plugins: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the plugins failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let dir = target_dir.join("wasm32-wasip2/release");
    Ok(Plugins {
        log_events: dir.join("log_events.wasm"),
        validate_config: dir.join("validate_config.wasm"),
        misbehave: dir.join("misbehave.wasm"),
    })
}
