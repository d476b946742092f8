//! Staged rollouts: a new value on the agents a selector picks first,
//! their reports (render, check, hooks, services; or not affected), then
//! everyone (promote) or no one (abort), by hand or by `--auto`.

use crate::fleet::labelled;
use crate::support::{CoordProcess, coord, etcd, eventually};

#[tokio::test]
async fn a_staged_rollout_reaches_the_selected_agents_first_then_everyone_or_no_one() {
    let etcd = etcd().await;
    let endpoint = etcd.endpoint();
    let client = etcd.client().await;
    client.put("/app/v", "old", None).await.expect("put");
    let files = tempfile::tempdir().expect("tmp");
    let out = |i: usize| files.path().join(format!("agent-{i}.conf"));
    let text = |i: usize| {
        let role = if i <= 2 { "canary" } else { "edge" };
        format!(
            "{}\n[[file]]\npath = \"{}\"\nkey = \"/app/v\"\n",
            labelled(
                &format!("agent-{i}"),
                &endpoint,
                &format!("role = \"{role}\"")
            ),
            out(i).display()
        )
    };
    let mut agents = five_agents(&client, text, out).await;
    let kv = |args: &[&str]| run(&endpoint, args);

    let (status, printed, err) = kv(&["kv", "set", "/app/v", "new", "--stage", "role=canary"]);
    assert!(status.success(), "{err}");
    assert!(printed.contains("staged /app/v to 2 agents"), "{printed}");
    for i in 1..=2 {
        crate::support::file_is(&out(i), "new").await;
    }
    let (status, _, err) = kv(&["kv", "set", "/app/v", "other", "--stage", "role=edge"]);
    assert_eq!(status.code(), Some(3), "a second rollout is refused: {err}");
    let (status, printed, _) = kv(&["rollout", "status", "/app/v"]);
    assert!(status.success());
    assert!(printed.contains("agent-1, agent-2"), "{printed}");
    for i in 3..=5 {
        assert_eq!(std::fs::read_to_string(out(i)).expect("file"), "old");
    }

    // A staged agent restarted mid-rollout comes back on the staged value.
    agents[0].signal(nix::sys::signal::Signal::SIGTERM);
    agents[0].wait().await;
    std::fs::write(out(1), "gone").expect("scribble");
    agents[0] = CoordProcess::run(&text(1));
    crate::support::file_is(&out(1), "new").await;

    let (status, _, err) = kv(&["rollout", "abort", "/app/v"]);
    assert!(status.success(), "{err}");
    for i in 1..=5 {
        crate::support::file_is(&out(i), "old").await;
    }
    assert_eq!(
        client.get("/app/v").await.expect("get").expect("key").value,
        b"old"
    );

    let (status, _, err) = kv(&["kv", "set", "/app/v", "new", "--stage", "role=canary"]);
    assert!(status.success(), "{err}");
    for i in 1..=2 {
        crate::support::file_is(&out(i), "new").await;
    }
    let (status, _, err) = kv(&["rollout", "promote", "/app/v"]);
    assert!(status.success(), "{err}");
    for i in 1..=5 {
        crate::support::file_is(&out(i), "new").await;
    }
    let (status, _, _) = kv(&["rollout", "status", "/app/v"]);
    assert_eq!(status.code(), Some(3), "no rollout left");

    // Promoting after the key moved is refused and writes nothing.
    let (status, _, err) = kv(&["kv", "set", "/app/v", "newer", "--stage", "role=canary"]);
    assert!(status.success(), "{err}");
    client.put("/app/v", "by hand", None).await.expect("put");
    let (status, _, err) = kv(&["rollout", "promote", "/app/v"]);
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(
        err.contains("changed since its rollout was staged"),
        "{err}"
    );
    assert_eq!(
        client.get("/app/v").await.expect("get").expect("key").value,
        b"by hand"
    );
}

#[tokio::test]
async fn an_auto_rollout_aborts_on_a_failing_check_and_promotes_after_a_clean_soak() {
    let etcd = etcd().await;
    let endpoint = etcd.endpoint();
    let client = etcd.client().await;
    client.put("/app/v", "old", None).await.expect("put");
    let files = tempfile::tempdir().expect("tmp");
    let out = |i: usize| files.path().join(format!("agent-{i}.conf"));
    let text = |i: usize| {
        let role = if i <= 2 { "canary" } else { "edge" };
        // agent-2 refuses a render holding "bad".
        let check = if i == 2 {
            "check = [\"sh\", \"-c\", \"! grep -q bad {staged}\"]\n"
        } else {
            ""
        };
        format!(
            "{}\n[[hook]]\nname = \"reload\"\nexec = [\"true\"]\n\n[[file]]\npath = \"{}\"\nkey = \"/app/v\"\non_change = [\"reload\"]\n{check}",
            labelled(
                &format!("agent-{i}"),
                &endpoint,
                &format!("role = \"{role}\"")
            ),
            out(i).display()
        )
    };
    let mut agents = five_agents(&client, text, out).await;
    let run = |args: &[&str]| self::run(&endpoint, args);

    // A failing check on one staged agent aborts the rollout by itself.
    let (status, _, err) = run(&[
        "kv",
        "set",
        "/app/v",
        "bad",
        "--stage",
        "role=canary",
        "--soak",
        "30s",
        "--auto",
    ]);
    assert!(status.success(), "{err}");
    eventually("the failed rollout to be aborted", || async {
        let (status, _, _) = run(&["rollout", "status", "/app/v"]);
        (status.code() == Some(3)).then_some(())
    })
    .await;
    for i in 1..=5 {
        crate::support::file_is(&out(i), "old").await;
    }
    assert_eq!(
        client.get("/app/v").await.expect("get").expect("key").value,
        b"old"
    );

    // A clean one promotes itself once the soak is over; status shows
    // each staged agent's report meanwhile.
    let (status, _, err) = run(&[
        "kv",
        "set",
        "/app/v",
        "good",
        "--stage",
        "role=canary",
        "--soak",
        "5s",
        "--auto",
    ]);
    assert!(status.success(), "{err}");
    for i in 1..=2 {
        crate::support::file_is(&out(i), "good").await;
    }
    let shown = eventually("both staged agents to report clean", || async {
        let (status, printed, _) = run(&["rollout", "status", "/app/v"]);
        (status.success()
            && printed.contains("agent-1  rendered, check passed, hooks passed")
            && printed.contains("agent-2  rendered, check passed, hooks passed"))
        .then_some(printed)
    })
    .await;
    assert!(
        shown.contains("soak 5s, promoted or aborted by itself"),
        "{shown}"
    );
    // A staged agent restarted mid-soak picks the rollout up again.
    agents[0].signal(nix::sys::signal::Signal::SIGTERM);
    agents[0].wait().await;
    agents[0] = CoordProcess::run(&text(1));
    for i in 1..=5 {
        crate::support::file_is(&out(i), "good").await;
    }
    assert_eq!(
        client.get("/app/v").await.expect("get").expect("key").value,
        b"good"
    );
}

#[tokio::test]
async fn an_auto_rollout_whose_staged_agent_has_a_critical_service_after_the_soak_is_aborted() {
    let etcd = etcd().await;
    let endpoint = etcd.endpoint();
    let client = etcd.client().await;
    client.put("/app/v", "ok", None).await.expect("put");
    let files = tempfile::tempdir().expect("tmp");
    let out = files.path().join("canary.conf");
    // The service turns critical as soon as the file says "sick".
    let _canary = CoordProcess::run(&format!(
        "{}\n[[service]]\nname = \"api\"\naddress = \"127.0.0.1:8080\"\ncheck = {{ exec = [\"sh\", \"-c\", \"! grep -q sick '{out}' || exit 2\"], interval = \"200ms\", failures = 1 }}\n\n[[file]]\npath = \"{out}\"\nkey = \"/app/v\"\n",
        labelled("canary-1", &endpoint, r#"role = "canary""#),
        out = out.display()
    ));
    crate::support::file_is(&out, "ok").await;
    eventually("the canary's service passing", || async {
        let kv = client.get("/coord/health/api/canary-1-api").await.ok()??;
        String::from_utf8_lossy(&kv.value)
            .contains("\"passing\"")
            .then_some(())
    })
    .await;
    let (status, _, err) = coord(
        &[
            "kv",
            "set",
            "/app/v",
            "sick",
            "--stage",
            "role=canary",
            "--soak",
            "3s",
            "--auto",
            "--endpoints",
            &endpoint,
        ],
        None,
    );
    assert!(status.success(), "{err}");
    crate::support::file_is(&out, "sick").await;
    eventually("the rollout to be aborted after its soak", || async {
        let (status, _, _) = coord(
            &["rollout", "status", "/app/v", "--endpoints", &endpoint],
            None,
        );
        (status.code() == Some(3)).then_some(())
    })
    .await;
    crate::support::file_is(&out, "ok").await;
    assert_eq!(
        client.get("/app/v").await.expect("get").expect("key").value,
        b"ok"
    );
}

/// `coord … --endpoints ENDPOINT`.
/// Five agents on `text(1..=5)`, once each has rendered "old" into
/// `out(i)` and all five are present.
async fn five_agents(
    client: &coord::etcd::Client,
    text: impl Fn(usize) -> String,
    out: impl Fn(usize) -> std::path::PathBuf,
) -> Vec<CoordProcess> {
    let agents: Vec<CoordProcess> = (1..=5).map(|i| CoordProcess::run(&text(i))).collect();
    for i in 1..=5 {
        crate::support::file_is(&out(i), "old").await;
    }
    eventually("five agents present", || async {
        let kvs = client.get_prefix("/coord/agents/").await.ok()?;
        (kvs.kvs.len() == 5).then_some(())
    })
    .await;
    agents
}

fn run(endpoint: &str, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--endpoints", endpoint]);
    coord(&all, None)
}

/// `coord rollout status KEY --json`, parsed; `None` when no rollout is
/// staged.
fn status_json(endpoint: &str, key: &str) -> Option<serde_json::Value> {
    let (status, out, _) = run(endpoint, &["rollout", "status", key, "--json"]);
    status
        .success()
        .then(|| serde_json::from_str(&out).expect("status JSON"))
}

/// Waits until `coord rollout status KEY` prints `words`; returns what it
/// printed.
async fn status_says(endpoint: &str, key: &str, words: &str) -> String {
    eventually(&format!("rollout status to say {words:?}"), || async {
        let (status, out, _) = run(endpoint, &["rollout", "status", key]);
        (status.success() && out.contains(words)).then_some(out)
    })
    .await
}

async fn value_is(client: &coord::etcd::Client, key: &str, want: &str) {
    eventually(&format!("`{key}` to be {want:?}"), || async {
        let kv = client.get(key).await.ok()??;
        (kv.value == want.as_bytes()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_staged_agents_report_carries_its_services_and_a_critical_one_aborts_an_auto_rollout_mid_soak()
 {
    let etcd = etcd().await;
    let endpoint = etcd.endpoint();
    let client = etcd.client().await;
    client.put("/app/v", "ok", None).await.expect("put");
    let files = tempfile::tempdir().expect("tmp");
    let out = files.path().join("canary.conf");
    // The service turns critical as soon as the file says "sick".
    let _canary = CoordProcess::run(&format!(
        "{}\n[[service]]\nname = \"api\"\naddress = \"127.0.0.1:8080\"\ncheck = {{ exec = [\"sh\", \"-c\", \"! grep -q sick '{out}' || exit 2\"], interval = \"200ms\", failures = 1 }}\n\n[[file]]\npath = \"{out}\"\nkey = \"/app/v\"\n",
        labelled("canary-1", &endpoint, r#"role = "canary""#),
        out = out.display()
    ));
    let _edge = CoordProcess::run(&labelled("edge-1", &endpoint, r#"role = "edge""#));
    crate::support::file_is(&out, "ok").await;
    let passing = || async {
        eventually("the canary's service passing", || async {
            let kv = client.get("/coord/health/api/canary-1-api").await.ok()??;
            String::from_utf8_lossy(&kv.value)
                .contains("\"passing\"")
                .then_some(())
        })
        .await;
    };
    passing().await;
    let stage = |value: &str, more: &[&str]| {
        let mut args = vec!["kv", "set", "/app/v", value, "--stage", "role=canary"];
        args.extend_from_slice(more);
        let (status, _, err) = run(&endpoint, &args);
        assert!(status.success(), "{err}");
    };

    // By hand: the report shows the services as they are, and as they
    // change while the rollout is staged.
    stage("fine", &[]);
    status_says(
        &endpoint,
        "/app/v",
        "canary-1  rendered, check passed, hooks passed, services: api/canary-1-api passing",
    )
    .await;
    let json = status_json(&endpoint, "/app/v").expect("staged");
    assert_eq!(
        json["reports"]["canary-1"]["services"]["api/canary-1-api"], "passing",
        "{json}"
    );
    let (status, _, err) = run(&endpoint, &["rollout", "abort", "/app/v"]);
    assert!(status.success(), "{err}");
    crate::support::file_is(&out, "ok").await;

    stage("sick", &[]);
    status_says(&endpoint, "/app/v", "services: api/canary-1-api critical").await;
    let json = status_json(&endpoint, "/app/v").expect("staged");
    assert_eq!(
        json["reports"]["canary-1"]["services"]["api/canary-1-api"], "critical",
        "{json}"
    );
    let (status, _, err) = run(&endpoint, &["rollout", "abort", "/app/v"]);
    assert!(status.success(), "{err}");
    crate::support::file_is(&out, "ok").await;
    passing().await;

    // With --auto a service turning critical aborts the rollout during a
    // soak far longer than the test waits.
    stage("sick", &["--soak", "1h", "--auto"]);
    eventually("the sick rollout to be aborted mid-soak", || async {
        let (status, _, _) = run(&endpoint, &["rollout", "status", "/app/v"]);
        (status.code() == Some(3)).then_some(())
    })
    .await;
    crate::support::file_is(&out, "ok").await;
    assert_eq!(
        client.get("/app/v").await.expect("get").expect("key").value,
        b"ok"
    );
    passing().await;

    // A clean soak promotes.
    stage("fine", &["--soak", "2s", "--auto"]);
    value_is(&client, "/app/v", "fine").await;
    crate::support::file_is(&out, "fine").await;
}

#[tokio::test]
async fn a_staged_agent_whose_files_do_not_read_the_key_reports_not_affected_and_an_absent_one_is_not_waited_for()
 {
    let etcd = etcd().await;
    let endpoint = etcd.endpoint();
    let client = etcd.client().await;
    client.put("/app/v", "old", None).await.expect("put");
    client.put("/app/other", "x", None).await.expect("put");
    let files = tempfile::tempdir().expect("tmp");
    let out = |i: usize| files.path().join(format!("agent-{i}.conf"));
    // agent-2 (a canary) renders another key only; agent-4 is no canary.
    let text = |i: usize| {
        let role = if i <= 3 { "canary" } else { "edge" };
        let key = if i == 2 { "/app/other" } else { "/app/v" };
        format!(
            "{}\n[[file]]\npath = \"{}\"\nkey = \"{key}\"\n",
            labelled(
                &format!("agent-{i}"),
                &endpoint,
                &format!("role = \"{role}\"")
            ),
            out(i).display()
        )
    };
    let mut agents: Vec<CoordProcess> = (1..=4).map(|i| CoordProcess::run(&text(i))).collect();
    let present = |n: usize| {
        let client = client.clone();
        async move {
            eventually(&format!("{n} agents present"), || async {
                let kvs = client.get_prefix("/coord/agents/").await.ok()?;
                (kvs.kvs.len() == n).then_some(())
            })
            .await
        }
    };
    present(4).await;
    crate::support::file_is(&out(2), "x").await;

    let (status, _, err) = run(
        &endpoint,
        &["kv", "set", "/app/v", "new", "--stage", "role=canary"],
    );
    assert!(status.success(), "{err}");
    crate::support::file_is(&out(1), "new").await;
    status_says(
        &endpoint,
        "/app/v",
        "agent-2  not affected (none of its files reads the key)",
    )
    .await;
    let json = status_json(&endpoint, "/app/v").expect("staged");
    assert_eq!(json["reports"]["agent-2"]["unaffected"], true, "{json}");
    // A staged agent that stops running is shown absent.
    agents[2].signal(nix::sys::signal::Signal::SIGTERM);
    agents[2].wait().await;
    status_says(&endpoint, "/app/v", "agent-3  absent").await;
    let json = status_json(&endpoint, "/app/v").expect("staged");
    assert_eq!(json["absent"], serde_json::json!(["agent-3"]), "{json}");
    let (status, _, err) = run(&endpoint, &["rollout", "abort", "/app/v"]);
    assert!(status.success(), "{err}");
    crate::support::file_is(&out(1), "old").await;

    // --auto waits neither for the agent the key does not concern nor for
    // one that went away.
    agents[2] = CoordProcess::run(&text(3));
    present(4).await;
    let (status, _, err) = run(
        &endpoint,
        &[
            "kv",
            "set",
            "/app/v",
            "newer",
            "--stage",
            "role=canary",
            "--soak",
            "3s",
            "--auto",
        ],
    );
    assert!(status.success(), "{err}");
    agents[2].signal(nix::sys::signal::Signal::SIGTERM);
    agents[2].wait().await;
    value_is(&client, "/app/v", "newer").await;
    for i in [1, 4] {
        crate::support::file_is(&out(i), "newer").await;
    }
    assert_eq!(std::fs::read_to_string(out(2)).expect("file"), "x");
}

/// `labelled()` with a 3 s session TTL, so a killed agent's presence
/// record goes soon.
fn short_lived(name: &str, endpoint: &str, labels: &str) -> String {
    labelled(name, endpoint, labels).replace("ttl = \"10s\"", "ttl = \"3s\"")
}

#[tokio::test]
async fn the_only_staged_agent_killed_mid_soak_resumes_after_a_restart_and_promote_ends_a_rollout_left_alone()
 {
    let etcd = etcd().await;
    let endpoint = etcd.endpoint();
    let client = etcd.client().await;
    client.put("/app/v", "old", None).await.expect("put");
    let files = tempfile::tempdir().expect("tmp");
    let out = |i: usize| files.path().join(format!("agent-{i}.conf"));
    // One canary of three: no other staged agent can end its rollout.
    let text = |i: usize| {
        let role = if i == 1 { "canary" } else { "edge" };
        format!(
            "{}\n[[hook]]\nname = \"reload\"\nexec = [\"true\"]\n\n[[file]]\npath = \"{}\"\nkey = \"/app/v\"\non_change = [\"reload\"]\n",
            short_lived(
                &format!("agent-{i}"),
                &endpoint,
                &format!("role = \"{role}\"")
            ),
            out(i).display()
        )
    };
    let mut agents: Vec<CoordProcess> = (1..=3).map(|i| CoordProcess::run(&text(i))).collect();
    for i in 1..=3 {
        crate::support::file_is(&out(i), "old").await;
    }
    eventually("three agents present", || async {
        let kvs = client.get_prefix("/coord/agents/").await.ok()?;
        (kvs.kvs.len() == 3).then_some(())
    })
    .await;

    let (status, printed, err) = run(
        &endpoint,
        &[
            "kv",
            "set",
            "/app/v",
            "new",
            "--stage",
            "role=canary",
            "--soak",
            "20s",
            "--auto",
        ],
    );
    assert!(status.success(), "{err}");
    assert!(
        printed.contains("to 1 agent (role=canary): agent-1"),
        "{printed}"
    );
    crate::support::file_is(&out(1), "new").await;
    status_says(
        &endpoint,
        "/app/v",
        "agent-1  rendered, check passed, hooks passed",
    )
    .await;

    // Killed mid-soak: the rollout stays staged, its agent shown absent
    // once its presence record went with its lease.
    agents[0].signal(nix::sys::signal::Signal::SIGKILL);
    agents[0].wait().await;
    status_says(&endpoint, "/app/v", "agent-1  absent").await;
    std::fs::write(out(1), "gone").expect("scribble");

    // Restarted, it reads the rollout back from etcd: the staged value
    // again while the rollout is still staged, a fresh report, and after
    // the soak its promote.
    agents[0] = CoordProcess::run(&text(1));
    crate::support::file_is(&out(1), "new").await;
    let json = status_json(&endpoint, "/app/v").expect("still staged after the restart");
    assert_eq!(json["absent"], serde_json::json!([]), "{json}");
    value_is(&client, "/app/v", "new").await;
    for i in 1..=3 {
        crate::support::file_is(&out(i), "new").await;
    }

    // The staged agents drive an --auto rollout (the `kv set` that staged
    // it has returned). With every one of them gone the rollout waits in
    // etcd past its soak; status shows it and promote ends it by hand.
    let (status, _, err) = run(
        &endpoint,
        &[
            "kv",
            "set",
            "/app/v",
            "newer",
            "--stage",
            "role=canary",
            "--soak",
            "6s",
            "--auto",
        ],
    );
    assert!(status.success(), "{err}");
    let staged = std::time::Instant::now();
    crate::support::file_is(&out(1), "newer").await;
    agents[0].signal(nix::sys::signal::Signal::SIGKILL);
    agents[0].wait().await;
    status_says(&endpoint, "/app/v", "agent-1  absent").await;
    let soak_left = std::time::Duration::from_secs(7).saturating_sub(staged.elapsed());
    tokio::time::sleep(soak_left).await;
    let json = status_json(&endpoint, "/app/v").expect("still staged past its soak");
    assert_eq!(json["value"], "newer", "{json}");
    assert_eq!(
        client.get("/app/v").await.expect("get").expect("key").value,
        b"new"
    );
    let (status, printed, err) = run(&endpoint, &["rollout", "promote", "/app/v"]);
    assert!(status.success(), "{err}");
    assert!(printed.contains("promoted /app/v"), "{printed}");
    for i in 2..=3 {
        crate::support::file_is(&out(i), "newer").await;
    }
    agents[0] = CoordProcess::run(&text(1));
    crate::support::file_is(&out(1), "newer").await;
}
