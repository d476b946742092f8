//! Shell hooks and the hook runner: events in, timeouts, retries,
//! coalescing, vetoes — and the agent's side never breaks.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use coord::agent::hooks::{Envelope, Event, HookError, HookRunner, Outcome};
use coord::agent::manifest::{HookAction, HookSpec, Location};

use crate::support::eventually;

fn shell_hook(name: &str, script: &str, dir: &Path, timeout: Duration, retries: u32) -> HookSpec {
    HookSpec {
        name: name.to_owned(),
        action: HookAction::Exec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
        },
        timeout,
        env: BTreeMap::from([("OUT".to_owned(), dir.display().to_string())]),
        retries,
        fleet: None,
        location: Location { line: 1, column: 1 },
    }
}

fn lock_acquired(token: i64) -> Event {
    Event::LockAcquired {
        lock: "reports".into(),
        fencing_token: token,
    }
}

fn process_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

#[tokio::test]
async fn a_shell_hook_receives_the_event_on_stdin_and_in_its_environment() {
    let dir = tempfile::tempdir().expect("tmp");
    let spec = shell_hook(
        "record",
        "cat > \"$OUT/stdin.json\"; env > \"$OUT/env.txt\"",
        dir.path(),
        Duration::from_secs(10),
        0,
    );
    let runner = HookRunner::new("web-01", &[spec]).expect("hooks");
    let outcome = runner
        .run_now("record", lock_acquired(42))
        .await
        .expect("runs");
    assert_eq!(outcome, Outcome::Done);
    let stdin = std::fs::read_to_string(dir.path().join("stdin.json")).expect("stdin");
    let envelope: Envelope = serde_json::from_str(&stdin).expect("valid JSON on stdin");
    assert_eq!(envelope.event, lock_acquired(42));
    assert_eq!(envelope.agent, "web-01");
    assert_eq!(envelope.schema, 1);
    let env = std::fs::read_to_string(dir.path().join("env.txt")).expect("env");
    for line in [
        "COORD_EVENT=lock-acquired",
        "COORD_LOCK=reports",
        "COORD_FENCING_TOKEN=42",
        "COORD_AGENT=web-01",
        "COORD_SCHEMA=1",
    ] {
        assert!(env.lines().any(|l| l == line), "missing {line} in:\n{env}");
    }
}

#[tokio::test]
async fn a_hanging_shell_hook_and_what_it_started_are_killed_at_its_timeout() {
    let dir = tempfile::tempdir().expect("tmp");
    // Ignores TERM, and leaves a child behind: both must die.
    let spec = shell_hook(
        "hang",
        "trap '' TERM; sleep 1000 & echo $! > \"$OUT/child\"; echo $$ > \"$OUT/shell\"; wait",
        dir.path(),
        Duration::from_millis(500),
        0,
    );
    let runner = HookRunner::new("web-01", &[spec]).expect("hooks");
    let err = runner
        .run_now("hang", lock_acquired(1))
        .await
        .expect_err("must time out");
    assert!(matches!(err, HookError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("hook `hang`"), "{err}");
    for who in ["shell", "child"] {
        let pid: i32 = std::fs::read_to_string(dir.path().join(who))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        eventually(&format!("the hook's {who} to be gone"), || async move {
            (!process_alive(pid)).then_some(())
        })
        .await;
    }
    // The runner is fine afterwards.
    let spec_ok = shell_hook("ok", "true", dir.path(), Duration::from_secs(5), 0);
    let runner = HookRunner::new("web-01", &[spec_ok]).expect("hooks");
    assert_eq!(
        runner.run_now("ok", lock_acquired(2)).await.expect("runs"),
        Outcome::Done
    );
}

#[tokio::test]
async fn a_failing_hook_is_retried_with_backoff_then_given_up() {
    let dir = tempfile::tempdir().expect("tmp");
    let spec = shell_hook(
        "flaky",
        "echo run >> \"$OUT/runs\"; echo broken >&2; exit 3",
        dir.path(),
        Duration::from_secs(5),
        2,
    );
    let runner = Arc::new(
        HookRunner::new("web-01", &[spec])
            .expect("hooks")
            .with_retry_base(Duration::from_millis(20)),
    );
    let stats = runner.stats();
    runner.fire(&["flaky".to_owned()], &lock_acquired(1));
    eventually("three runs (one try and two retries)", || {
        let s = stats.borrow().get("flaky").copied().unwrap_or_default();
        async move { (s.runs == 3).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let runs = std::fs::read_to_string(dir.path().join("runs")).expect("runs");
    assert_eq!(runs.lines().count(), 3, "no fourth run after giving up");
    assert_eq!(stats.borrow()["flaky"].failures, 3);
}

#[tokio::test]
async fn a_burst_of_events_is_coalesced_and_runs_of_one_hook_never_overlap() {
    let dir = tempfile::tempdir().expect("tmp");
    let spec = shell_hook(
        "slow",
        "mkdir \"$OUT/running\" || echo overlap >> \"$OUT/log\"; sleep 0.2; \
         echo \"token $COORD_FENCING_TOKEN\" >> \"$OUT/log\"; rmdir \"$OUT/running\"",
        dir.path(),
        Duration::from_secs(10),
        0,
    );
    let runner = Arc::new(HookRunner::new("web-01", &[spec]).expect("hooks"));
    let stats = runner.stats();
    for token in 1..=20 {
        runner.fire(&["slow".to_owned()], &lock_acquired(token));
    }
    eventually("the latest event to have run", || {
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
        async move { log.lines().any(|l| l == "token 20").then_some(log) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = std::fs::read_to_string(dir.path().join("log")).expect("log");
    assert!(!log.contains("overlap"), "two runs overlapped:\n{log}");
    let runs = log.lines().count();
    assert!(
        runs <= 3,
        "20 events should coalesce into a few runs, got {runs}:\n{log}"
    );
    assert_eq!(
        log.lines().last(),
        Some("token 20"),
        "the last run has the latest event"
    );
    assert!(stats.borrow()["slow"].coalesced >= 17);
}

#[tokio::test]
async fn a_validate_hook_vetoes_with_the_reason_it_printed() {
    let dir = tempfile::tempdir().expect("tmp");
    let spec = shell_hook(
        "nginx-t",
        "grep -q ';' \"$COORD_STAGED_PATH\" || { echo \"line 1: missing ';'\" >&2; exit 1; }",
        dir.path(),
        Duration::from_secs(5),
        0,
    );
    let staged = dir.path().join("staged.conf");
    std::fs::write(&staged, "worker_processes 4\n").expect("staged");
    let runner = HookRunner::new("web-01", &[spec]).expect("hooks");
    let event = Event::ValidateFile {
        path: "/etc/nginx/nginx.conf".into(),
        staged_path: staged.display().to_string(),
        content: "worker_processes 4\n".into(),
    };
    let outcome = runner
        .run_now("nginx-t", event.clone())
        .await
        .expect("runs");
    match outcome {
        Outcome::Vetoed(reason) => assert!(reason.contains("line 1: missing ';'"), "{reason}"),
        other => panic!("expected a veto, got {other:?}"),
    }
    std::fs::write(&staged, "worker_processes 4;\n").expect("staged");
    assert_eq!(
        runner.run_now("nginx-t", event).await.expect("runs"),
        Outcome::Done
    );
}

#[tokio::test]
async fn values_from_etcd_never_reach_the_command_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let spec = HookSpec {
        action: HookAction::Exec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "printf '%s\\n' \"$@\" > \"$OUT/argv\"".into(),
                "hook".into(),
                "fixed-arg".into(),
            ],
        },
        ..shell_hook("args", "", dir.path(), Duration::from_secs(5), 0)
    };
    let runner = HookRunner::new("web-01", &[spec]).expect("hooks");
    let evil = Event::LockAcquired {
        lock: format!(
            "x; touch {}/pwned $(touch {}/pwned2)",
            dir.path().display(),
            dir.path().display()
        ),
        fencing_token: 1,
    };
    runner.run_now("args", evil).await.expect("runs");
    let argv = std::fs::read_to_string(dir.path().join("argv")).expect("argv");
    assert_eq!(argv, "fixed-arg\n", "only the manifest's arguments");
    assert!(!dir.path().join("pwned").exists() && !dir.path().join("pwned2").exists());
}

#[test]
fn a_nul_byte_in_an_event_value_still_lets_a_shell_hook_run() {
    // The environment cannot hold a NUL: the value arrives with U+FFFD in
    // its place, and exactly on stdin.
    let dir = tempfile::tempdir().expect("tmp");
    let manifest = dir.path().join("agent.toml");
    std::fs::write(
        &manifest,
        "[agent]\nname = \"web-01\"\n[etcd]\nendpoints = [\"http://127.0.0.1:1\"]\n\
         [[hook]]\nname = \"note\"\nexec = [\"sh\", \"-c\", \"printf %s \\\"$COORD_LOCK\\\" > lock.txt; cat > event.json\"]\n",
    )
    .expect("manifest");
    let event = dir.path().join("event.json.in");
    std::fs::write(
        &event,
        r#"{"type":"lock-acquired","lock":"a\u0000b\nc","fencing_token":7}"#,
    )
    .expect("event");
    let (status, out, err) = crate::support::coord(
        &[
            "hook",
            "note",
            "--event",
            event.to_str().expect("utf-8"),
            "--manifest",
            manifest.to_str().expect("utf-8"),
        ],
        Some(dir.path()),
    );
    assert!(status.success(), "the hook did not run: {out}{err}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("lock.txt")).expect("lock.txt"),
        "a\u{fffd}b\nc"
    );
    let seen: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("event.json")).expect("event.json"),
    )
    .expect("JSON");
    assert_eq!(seen["lock"], "a\u{0}b\nc");
}
