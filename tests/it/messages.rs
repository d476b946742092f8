//! What a person reads: error messages that say the cause once and what to
//! do, refusals of what the CLI would do wrongly, and logs without Rust's
//! debug forms.
//!
//! `COORD_TEST_BIN=/path/to/an/older/coord` runs these against another
//! build, to see them fail on code from before a fix.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use coord::etcd::Session;
use coord::lock::{self, Holder, Mode};

use crate::support::{PATIENCE, etcd, eventually, manifest};

/// The binary under test.
fn bin() -> std::ffi::OsString {
    std::env::var_os("COORD_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_coord").into())
}

/// `coord ARGS…` with none of the caller's COORD_* settings, `env` added.
fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    for var in [
        "COORD_ENDPOINTS",
        "COORD_MANIFEST",
        "COORD_NAMESPACE",
        "COORD_LOG",
        "COORD_CACERT",
        "COORD_CERT",
        "COORD_KEY",
        "COORD_USER",
        "COORD_PASSWORD_FILE",
        "COORD_LOCK_NAME",
        "COORD_LOCK_KEY",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `coord ARGS…` to its end, which must come within [`PATIENCE`]
/// (a command waiting forever is a failure, not a hang of the suite).
async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let child = command(args, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn coord");
    let pid = child.id();
    let waited = tokio::task::spawn_blocking(move || child.wait_with_output());
    match tokio::time::timeout(PATIENCE, waited).await {
        Ok(out) => out.expect("join").expect("coord output"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("`coord {}` did not end within {PATIENCE:?}", args.join(" "));
        }
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An endpoint where nothing listens (a port just freed).
fn dead_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// The message for an unreachable etcd: where, from where, the cause once,
/// and none of tonic's inner forms.
fn says_unreachable(err: &str, at: &str, from: &str) {
    let want = format!("cannot reach etcd at {at} (from {from})");
    assert!(err.contains(&want), "want {want:?} in:\n{err}");
    assert_eq!(
        err.matches("Connection refused").count(),
        1,
        "the cause once:\n{err}"
    );
    assert!(err.contains("hint: "), "says what to do:\n{err}");
    for noise in ["tonic", "ConnectError", "Some(", "grpc request error"] {
        assert!(!err.contains(noise), "{noise} in:\n{err}");
    }
}

#[tokio::test]
async fn an_unreachable_etcd_is_named_with_where_its_address_came_from() {
    let dead = dead_endpoint();
    let args = ["kv", "get", "/x", "--request-timeout", "1s"];

    // Nothing said: the default. (Nothing may listen on 2379 here; the
    // tests' own etcds take free ports.)
    let out = run(&args, &[]).await;
    assert!(!out.status.success());
    says_unreachable(&stderr(&out), "http://127.0.0.1:2379", "the default");

    let out = run(&args, &[("COORD_ENDPOINTS", &dead)]).await;
    says_unreachable(&stderr(&out), &dead, "COORD_ENDPOINTS");

    let mut with_flag = args.to_vec();
    with_flag.extend(["--endpoints", &dead]);
    let out = run(&with_flag, &[]).await;
    says_unreachable(&stderr(&out), &dead, "--endpoints");
    // The flag wins over the variable, and says so.
    let other = dead_endpoint();
    let out = run(&with_flag, &[("COORD_ENDPOINTS", &other)]).await;
    says_unreachable(&stderr(&out), &dead, "--endpoints");

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, manifest("msg-1", std::slice::from_ref(&dead), 5)).expect("manifest");
    let path = path.display().to_string();
    let mut with_manifest = args.to_vec();
    with_manifest.extend(["--manifest", &path]);
    let out = run(&with_manifest, &[]).await;
    let err = stderr(&out);
    says_unreachable(&err, &dead, &format!("manifest {path}"));
    assert!(err.contains("[etcd] section"), "{err}");
}

#[tokio::test]
async fn lock_timeout_with_etcd_down_says_unreachable_and_with_a_holder_says_held() {
    let dead = dead_endpoint();
    let out = run(
        &[
            "lock",
            "x",
            "--timeout",
            "2s",
            "--endpoints",
            &dead,
            "--",
            "true",
        ],
        &[],
    )
    .await;
    let err = stderr(&out);
    assert!(!out.status.success());
    says_unreachable(&err, &dead, "--endpoints");
    assert!(!err.contains("was not ours"), "blames a holder:\n{err}");

    // The other case, for contrast: etcd answers and someone holds it.
    let etcd = etcd().await;
    let client = etcd.client().await;
    let session = Session::start(client.clone(), Duration::from_secs(10));
    let lease = session.wait_alive().await;
    let me = Holder {
        agent: "test".into(),
        host: "test".into(),
        pid: 1,
    };
    let _held = lock::acquire(&client, lease, "/coord", "x", Mode::Mutex, &me)
        .await
        .expect("hold the lock");
    let ep = etcd.endpoint();
    let out = run(
        &[
            "lock",
            "x",
            "--timeout",
            "1s",
            "--endpoints",
            &ep,
            "--",
            "true",
        ],
        &[],
    )
    .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains("`x` was not ours within 1s"), "{err}");
    assert!(!err.contains("cannot reach"), "{err}");
}

#[tokio::test]
async fn one_shot_commands_without_a_timeout_give_up_on_an_unreachable_etcd() {
    let dead = dead_endpoint();
    for args in [
        vec!["lock", "x", "--", "true"],
        vec!["ids", "claim", "worker", "--size", "4", "--", "true"],
    ] {
        let mut args = args.clone();
        // The wait is two request timeouts: short here.
        let dashes = args.len() - 2;
        args.splice(
            dashes..dashes,
            ["--request-timeout", "1s", "--endpoints", dead.as_str()],
        );
        let out = run(&args, &[]).await;
        assert!(!out.status.success(), "{args:?}");
        says_unreachable(&stderr(&out), &dead, "--endpoints");
    }
}

#[tokio::test]
async fn the_agent_with_etcd_down_warns_once_per_endpoint_not_per_loop_and_attempt() {
    let endpoints = [dead_endpoint(), dead_endpoint()];
    let dir = tempfile::tempdir().expect("temp dir");
    let text = format!(
        "{}\n[[service]]\nname = \"api\"\naddress = \"127.0.0.1:1\"\ncheck = {{ tcp = \"127.0.0.1:1\", interval = \"1s\" }}\n\n[[instance_id]]\npool = \"worker\"\nsize = 4\n\n[[file]]\npath = \"{}\"\nkey = \"/app/v\"\n\n[[task]]\nname = \"beat\"\nschedule = \"every 2s\"\nrun = [\"true\"]\n",
        manifest("down-1", &endpoints, 5),
        dir.path().join("out.txt").display()
    );
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).expect("manifest");
    let log_path = dir.path().join("coord.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut child = command(&["run", &path.display().to_string()], &[])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn coord run");
    // Session, watches, presence, services, ids, the file and the task
    // all retry meanwhile, several times each.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_path).expect("read log");
    let warns: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warns.len(), 2, "one WARN per endpoint:\n{log}");
    for ep in &endpoints {
        assert_eq!(
            warns.iter().filter(|l| l.contains(ep.as_str())).count(),
            1,
            "{ep} once:\n{log}"
        );
    }
    assert!(
        !log.contains("failed to connect"),
        "the agent does not give up:\n{log}"
    );
}

#[tokio::test]
async fn agent_json_logs_of_a_service_state_change_have_no_rust_debug_forms() {
    let etcd = etcd().await;
    let text = format!(
        "{}\n[[service]]\nname = \"api\"\naddress = \"127.0.0.1:1\"\ncheck = {{ tcp = \"127.0.0.1:1\", interval = \"1s\" }}\n",
        manifest("json-1", &[etcd.endpoint()], 5)
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).expect("manifest");
    let log_path = dir.path().join("coord.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut child = command(
        &["run", &path.display().to_string(), "--log-format", "json"],
        &[],
    )
    .stdout(log.try_clone().expect("log"))
    .stderr(log)
    .spawn()
    .expect("spawn coord run");
    let log = eventually("a service health change in the log", || async {
        let log = std::fs::read_to_string(&log_path).ok()?;
        log.contains("Service health changed.").then_some(log)
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let line = log
        .lines()
        .find(|l| l.contains("Service health changed."))
        .expect("the line");
    let json: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
    assert_eq!(json["old"], "pending", "{line}");
    assert_eq!(json["new"], "critical", "{line}");
    for noise in ["Some(", "\"None\"", ":None"] {
        assert!(!log.contains(noise), "{noise} in:\n{log}");
    }
}

#[tokio::test]
async fn the_cli_refuses_unknown_targets_a_limit_without_semaphore_and_a_wrong_pool_size() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let ep = etcd.endpoint();

    let out = run(&["services", "pass", "nope/none", "--endpoints", &ep], &[]).await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("no instance `nope/none` is registered"),
        "{err}"
    );

    for (target, says) in [
        (&["web-99"][..], "no instance `web-99` is registered"),
        (
            &["web-99/api"][..],
            "no instance `web-99/api` is registered",
        ),
        (&["--agent", "web-99"][..], "no agent `web-99` is present"),
    ] {
        let mut args = vec!["maint", "on"];
        args.extend_from_slice(target);
        args.extend_from_slice(&["--endpoints", &ep]);
        let out = run(&args, &[]).await;
        let err = stderr(&out);
        assert!(!out.status.success(), "{target:?}: {err}");
        assert!(err.contains(says), "{target:?}: {err}");
    }
    // Nothing was left behind, on no lease, for targets that do not exist.
    let left = client.get_prefix("/coord/").await.expect("read");
    assert!(
        left.kvs.iter().all(|kv| !kv.key.starts_with("/coord/checks/")
            && !kv.key.starts_with("/coord/maint/")),
        "{:?}",
        left.kvs.iter().map(|kv| &kv.key).collect::<Vec<_>>()
    );

    let out = run(
        &[
            "lock",
            "x",
            "--limit",
            "3",
            "--endpoints",
            &ep,
            "--",
            "true",
        ],
        &[],
    )
    .await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--mode semaphore"), "{err}");

    let claim = |size: &'static str| {
        let ep = ep.clone();
        async move {
            run(
                &[
                    "ids",
                    "claim",
                    "worker",
                    "--size",
                    size,
                    "--endpoints",
                    &ep,
                    "--",
                    "true",
                ],
                &[],
            )
            .await
        }
    };
    let out = claim("4").await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = claim("1024").await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("pool `worker` has size 4"), "{err}");
    assert!(err.contains("not 1024"), "{err}");
}

#[tokio::test]
async fn kv_says_a_future_revision_once_fails_a_missing_delete_and_drops_one_newline() {
    let etcd = etcd().await;
    let ep = etcd.endpoint();
    let out = run(&["kv", "set", "/a", "1", "--endpoints", &ep], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));

    let out = run(
        &[
            "kv",
            "rollback",
            "/a",
            "--to-revision",
            "999",
            "--endpoints",
            &ep,
        ],
        &[],
    )
    .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("revision 999"), "{err}");
    assert_eq!(err.matches("in the future").count(), 1, "{err}");
    assert!(!err.contains("mvcc"), "{err}");

    let out = run(&["kv", "del", "/nope", "--endpoints", &ep], &[]).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("`/nope` does not exist"), "{err}");

    for (extra, want) in [(None, "hi"), (Some("--raw"), "hi\n")] {
        let mut args = vec!["kv", "set", "/b", "--endpoints", &ep];
        args.extend(extra);
        let mut child = command(&args, &[])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(b"hi\n").expect("write");
        }
        assert!(child.wait().expect("wait").success());
        let value = etcd
            .client()
            .await
            .get("/b")
            .await
            .expect("get")
            .expect("set");
        assert_eq!(String::from_utf8_lossy(&value.value), want, "{extra:?}");
    }
}

#[tokio::test]
async fn a_command_without_dashes_and_dev_without_a_manifest_say_what_to_do() {
    let out = run(&["lock", "reports", "echo", "hi"], &[]).await;
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("goes after `--`"), "{err}");

    let dir = tempfile::tempdir().expect("temp dir");
    let out = command(&["dev"], &[])
        .current_dir(dir.path())
        .output()
        .expect("run coord dev");
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("agent.toml.example"), "{err}");
    assert!(err.contains("coord dev FILE"), "{err}");
    assert!(!Path::new(&dir.path().join(".coord-dev")).exists());
}

#[tokio::test]
async fn a_cause_is_printed_once_and_a_one_shot_command_is_quiet_unless_asked() {
    // A file that cannot be read: the io error once, not once more as
    // the source of the message that already says it.
    let dir = tempfile::tempdir().expect("temp dir");
    let as_file = dir.path().display().to_string();
    let out = run(&["kv", "get", "/x", "--cacert", &as_file], &[]).await;
    let err = stderr(&out);
    assert!(!out.status.success());
    assert_eq!(err.matches("Is a directory").count(), 1, "{err}");

    // A port already taken by something else: said once.
    let etcd = etcd().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "{}\n[status]\nlisten = \"127.0.0.1:{port}\"\n",
            manifest("clash-1", &[etcd.endpoint()], 5)
        ),
    )
    .expect("manifest");
    let out = run(&["run", &path.display().to_string()], &[]).await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");

    // A lock taken and given back: nothing on stderr but what matters
    // (no lease lines), unless -v asks.
    let ep = etcd.endpoint();
    let out = run(&["lock", "q", "--endpoints", &ep, "--", "true"], &[]).await;
    assert!(out.status.success());
    assert_eq!(stderr(&out), "", "quiet by default");
    let out = run(&["lock", "q", "-v", "--endpoints", &ep, "--", "true"], &[]).await;
    assert!(stderr(&out).contains("Session lease granted."), "-v");
}

#[tokio::test]
async fn an_agent_whose_pool_size_differs_from_the_stored_one_says_so_and_claims_nothing() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let session = Session::start(client.clone(), Duration::from_secs(10));
    let lease = session.wait_alive().await;
    let me = coord::ids::ClaimRecord {
        agent: "first".into(),
        claimed_at: "2026-01-01T00:00:00Z".into(),
    };
    coord::ids::claim(&client, "/coord", "worker", 4, lease, None, &me)
        .await
        .expect("the first claim stores size 4");
    let agent = crate::support::CoordProcess::run(&format!(
        "{}\n[[instance_id]]\npool = \"worker\"\nsize = 8\n",
        manifest("ids-1", &[etcd.endpoint()], 5)
    ));
    let log = crate::support::log_says(&agent, "Pool size differs from the stored one").await;
    assert!(log.contains("pool `worker` has size 4"), "{log}");
    assert!(log.contains("not 8"), "{log}");
    let claims = coord::ids::list(&client, "/coord", "worker")
        .await
        .expect("list");
    assert_eq!(claims.len(), 1, "only the first claim");
}
