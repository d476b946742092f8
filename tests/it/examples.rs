//! The programs in `examples/` run against a real etcd (the endpoint in
//! `COORD_ENDPOINTS`, as a user would run them), exit 0 and print what
//! they did.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::support::{PATIENCE, etcd};

/// `target/<profile>/examples/`, beside the test binary's `deps/`, with
/// the examples built from the current sources: a plain `cargo test` has
/// built them already (then this is cargo's no-op check); with `cargo
/// test --test it` they are built here, once per run, so a stale binary
/// is never what runs.
fn examples_dir() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .ok_or("the test binary is not in target/<profile>/deps")?
            .to_owned();
        let dir = profile_dir.join("examples");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "--examples"])
            .current_dir(crate::support::repo_root())
            .output()
            .map_err(|e| format!("cannot run cargo to build the examples: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "building the examples failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(dir)
    });
    match built {
        Ok(dir) => dir.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// Runs example `name` against `endpoint`; returns its stdout.
fn run(name: &str, endpoint: &str) -> String {
    let path = examples_dir().join(name);
    let mut child = Command::new(&path)
        .env("COORD_ENDPOINTS", endpoint)
        .env_remove("COORD_NAMESPACE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > PATIENCE {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "example `{name}` failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn assert_says(name: &str, out: &str, lines: &[&str]) {
    for line in lines {
        assert!(
            out.contains(line),
            "example `{name}` did not say `{line}`:\n{out}"
        );
    }
}

#[tokio::test]
async fn every_example_runs_against_etcd_exits_0_and_says_what_it_did() {
    let etcd = etcd().await;
    let ep = etcd.endpoint();
    let client = etcd.client().await;
    let cases: [(&str, &[&str]); 5] = [
        (
            "service",
            &[
                "registered greeter/greeter-1",
                "discovered greeter-1",
                "greeter-1 withdrawn for maintenance",
                "greeter-1 listed again",
                "gRPC health check through the channel: status 1",
                "deregistered greeter-1",
            ],
        ),
        (
            "lock",
            &[
                "holding `report` with fencing token",
                "fenced write while holding: applied = true",
                "fenced write after release: applied = false",
                "two readers hold `catalog` at once",
                "a writer gave up after 300ms; 2 keys left in the queue",
                "the writer holds `catalog`",
            ],
        ),
        (
            "config",
            &[
                "set /coord/billing/config/db",
                "compare-and-set at version 1: done",
                "a stale compare-and-set is refused (the key is at version 2)",
                "history: revision",
                "watch: Created",
                "watch: Updated",
            ],
        ),
        (
            "ids",
            &[
                "claimed worker id",
                "the pool of 2 is full",
                "claimed ids: [0, 1]",
                "closed: every id released",
            ],
        ),
        (
            "election",
            &[
                "node-a leads `scheduler`",
                "observer: leader is node-a",
                "observer: leader says node-a (v2)",
                "node-b leads",
                "observer: leader is node-b",
            ],
        ),
    ];
    for (name, lines) in cases {
        let ep = ep.clone();
        let out = tokio::task::spawn_blocking(move || run(name, &ep))
            .await
            .expect("join");
        assert_says(name, &out, lines);
    }
    // They clean up after themselves: nothing held is left.
    for prefix in [
        "/coord/services/",
        "/coord/locks/",
        "/coord/ids/",
        "/coord/elections/",
    ] {
        let left = client.keys(prefix).await.expect("keys");
        assert!(left.is_empty(), "left under {prefix}: {left:?}");
    }
}

#[test]
fn the_readme_quotes_the_service_example_as_it_is() {
    let root = crate::support::repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    let example = std::fs::read_to_string(root.join("examples/service.rs")).expect("example");
    let marker = "<!-- quoted from examples/service.rs";
    let after = &readme[readme.find(marker).expect("the quote's marker")..];
    let block = after
        .split("```rust\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a rust block after the marker");
    let quoted: Vec<&str> = block.lines().map(str::trim).collect();
    let lines: Vec<&str> = example.lines().map(str::trim).collect();
    assert!(
        lines.windows(quoted.len()).any(|w| w == quoted.as_slice()),
        "the README's quote is not in examples/service.rs as it is:\n{block}"
    );
}
