//! Other programs reading what coord writes: a Go service's gRPC client,
//! with etcd's own resolver, finding coord-registered instances.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use nix::sys::signal::Signal;

use crate::support::{CoordProcess, cluster, eventually, manifest, repo_root};

/// The target README.md tells Go clients to dial, with `<service>` in it.
fn documented_grpc_target() -> String {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let start = readme
        .find("`etcd:")
        .expect("README.md names an etcd:// target for gRPC clients")
        + 1;
    let len = readme[start..].find('`').expect("closing backtick");
    let target = readme[start..start + len].to_owned();
    assert!(target.contains("<service>"), "{target}");
    target
}

/// `tests/interop/grpc-go` built once per test run, in GOPATH mode from
/// Debian's Go packages, with no network; or a failure saying how to get
/// them.
fn grpc_go_client() -> &'static PathBuf {
    static CLIENT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    match CLIENT.get_or_init(build_grpc_go_client) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn build_grpc_go_client() -> Result<PathBuf, String> {
    const INSTALL: &str = "install Go, etcd's resolver and grpc-go with `bash deploy/install-deps.sh` \
                           (apt-get install golang-go golang-etcd-server-dev golang-google-grpc-dev)";
    let root = repo_root();
    let dir = root.join("target/interop");
    let out = dir.join("grpc-go-client");
    let built = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg("./tests/interop/grpc-go")
        .current_dir(&root)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", dir.join("go-build"))
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .output()
        .map_err(|e| format!("cannot run `go` ({e}); {INSTALL}"))?;
    if !built.status.success() {
        return Err(format!(
            "building tests/interop/grpc-go failed ({}):\n{}\n{INSTALL}",
            built.status,
            String::from_utf8_lossy(&built.stderr)
        ));
    }
    Ok(out)
}

/// The Go client running, its output lines collected as they come.
struct GoClient {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl GoClient {
    fn start(endpoints: &[String], target: &str) -> GoClient {
        let mut child = Command::new(grpc_go_client())
            .args(["-endpoints", &endpoints.join(","), "-target", target])
            .args(["-interval", "20ms"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the grpc-go client");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("lines").push(line);
            }
        });
        GoClient {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// The addresses that answered the last `n` calls, when all `n` were
    /// answered.
    fn last_answers(&self, n: usize) -> Option<Vec<String>> {
        let lines = self.lines.lock().expect("lines");
        let last = lines.get(lines.len().checked_sub(n)?..)?;
        last.iter()
            .map(|l| l.strip_prefix("ok ").map(str::to_owned))
            .collect()
    }

    fn all_lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }
}

impl Drop for GoClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its stdout is closed now, so the reader ends.
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        if std::thread::panicking() {
            let lines = self.all_lines();
            let tail = &lines[lines.len().saturating_sub(5)..];
            eprintln!(
                "--- the grpc-go client's last lines ---\n{}",
                tail.join("\n")
            );
        }
    }
}

/// etcd members serve gRPC's health service, so they stand in for the
/// instances of a gRPC service. `api-v2`, whose name starts with `api`,
/// must stay out of `api`'s traffic.
#[tokio::test]
async fn a_grpc_go_client_reaches_the_instances_through_the_documented_target() {
    let target = documented_grpc_target().replace("<service>", "api");
    grpc_go_client();
    let mut etcd = cluster().await;
    let endpoints = etcd.endpoints();
    let mut backend = |i: usize| {
        etcd.member(i)
            .endpoint()
            .trim_start_matches("http://")
            .to_owned()
    };
    let (a, b, decoy) = (backend(0), backend(1), backend(2));
    let _web_01 = CoordProcess::run(&format!(
        "{}[[service]]\nname = \"api\"\naddress = \"{a}\"\n\
         [[service]]\nname = \"api-v2\"\naddress = \"{decoy}\"\n",
        manifest("web-01", &endpoints, 10)
    ));
    let mut web_02 = CoordProcess::run(&format!(
        "{}[[service]]\nname = \"api\"\naddress = \"{b}\"\n",
        manifest("web-02", &endpoints, 10)
    ));
    let client = GoClient::start(&endpoints, &target);

    let what = format!("calls to `{target}` to reach both {a} and {b}");
    eventually(&what, || async {
        let last = client.last_answers(20)?;
        (last.contains(&a) && last.contains(&b)).then_some(())
    })
    .await;

    web_02.signal(Signal::SIGTERM);
    web_02.wait().await;
    let what = format!("calls to `{target}` to reach only {a} once web-02 stopped");
    eventually(&what, || async {
        let last = client.last_answers(20)?;
        last.iter().all(|addr| *addr == a).then_some(())
    })
    .await;

    let lines = client.all_lines();
    assert!(
        !lines.iter().any(|l| l.contains(&decoy)),
        "`{target}` reached api-v2's instance {decoy}: {lines:?}"
    );
}
