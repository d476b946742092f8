//! Fleet-safe change: agent labels and selectors, hooks gated across the
//! fleet, a failed reload reverted.

use std::path::Path;

use coord::agent::manifest::Manifest;

use crate::support::{CoordProcess, coord, etcd, eventually, manifest};

/// `manifest()` with `[agent] labels = { … }` added.
pub(crate) fn labelled(name: &str, endpoint: &str, labels: &str) -> String {
    manifest(name, &[endpoint.to_owned()], 10)
        .replace("[etcd]", &format!("labels = {{ {labels} }}\n\n[etcd]"))
}

#[tokio::test]
async fn labels_are_published_shown_and_pick_agents_by_selector() {
    let etcd = etcd().await;
    let endpoint = etcd.endpoint();
    let _edge = CoordProcess::run(&labelled(
        "edge-1",
        &endpoint,
        r#"zone = "eu-1", role = "edge""#,
    ));
    let _canary = CoordProcess::run(&labelled(
        "canary-1",
        &endpoint,
        r#"zone = "eu-1", role = "canary""#,
    ));
    let _other = CoordProcess::run(&labelled("us-1", &endpoint, r#"zone = "us-1""#));
    let client = etcd.client().await;
    eventually("three agents present", || async {
        let kvs = client.get_prefix("/coord/agents/").await.ok()?;
        (kvs.kvs.len() == 3).then_some(())
    })
    .await;

    let (status, out, err) = coord(&["agents", "--endpoints", &endpoint], None);
    assert!(status.success(), "{err}");
    let edge = out
        .lines()
        .find(|l| l.starts_with("edge-1 "))
        .unwrap_or_else(|| panic!("edge-1 listed: {out}"));
    assert!(edge.ends_with("role=edge,zone=eu-1"), "{out}");

    let names = |selector: &str| {
        let (status, out, err) = coord(
            &[
                "agents",
                "--json",
                "--endpoints",
                &endpoint,
                "--select",
                selector,
            ],
            None,
        );
        assert!(status.success(), "{selector}: {err}");
        let mut names: Vec<String> = out
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("JSON");
                v["name"].as_str().expect("name").to_owned()
            })
            .collect();
        names.sort();
        names
    };
    assert_eq!(names("zone=eu-1"), ["canary-1", "edge-1"]);
    assert_eq!(names("zone=eu-1,role!=canary"), ["edge-1"]);
    assert_eq!(names("role!=canary"), ["edge-1", "us-1"]);
    assert_eq!(names("role=db"), Vec::<String>::new());

    let (status, _, err) = coord(
        &[
            "agents",
            "--endpoints",
            &endpoint,
            "--select",
            "zone=eu-1,,role=edge",
        ],
        None,
    );
    assert!(!status.success());
    assert!(
        err.contains("column 11") && err.contains("empty term"),
        "{err}"
    );
}

#[test]
fn a_bad_label_is_reported_where_it_is() {
    let text = "[agent]\nname = \"a\"\nlabels = { zone = \"eu-1\", \"ro le\" = \"edge\", tier = \"\" }\n\n[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n";
    let err = Manifest::parse(Path::new("agent.toml"), text).expect_err("bad labels");
    let found: Vec<(usize, usize, String)> = err
        .diagnostics
        .into_iter()
        .map(|d| (d.line, d.column, d.message))
        .collect();
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!((found[0].0, found[0].1), (3, 27), "{found:?}");
    assert!(found[0].2.contains("`ro le` has ` `"), "{found:?}");
    assert_eq!((found[1].0, found[1].1), (3, 45), "{found:?}");
    assert!(
        found[1].2.contains("label value cannot be empty"),
        "{found:?}"
    );
}

/// The most runs going at once, read from a log of `start`/`end` lines
/// appended in the order they happened (`>>` appends whole lines).
fn most_at_once(log: &str) -> usize {
    let (mut now, mut most) = (0usize, 0usize);
    for line in log.lines() {
        if line.starts_with("start ") {
            now += 1;
            most = most.max(now);
        } else if line.starts_with("end ") {
            now = now.saturating_sub(1);
        }
    }
    most
}

fn count(log: &str, word: &str) -> usize {
    log.lines().filter(|l| l.starts_with(word)).count()
}

/// Five agents rendering `/app/v`, whose `on_change` hook (gated to
/// `at_most` at once) logs its start and end to one shared file and takes
/// 0.5 s. One change to the key: five runs, never more than `at_most` at
/// once.
async fn five_agents_gated(at_most: u32) {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/v", "one", None).await.expect("put");
    let shared = tempfile::tempdir().expect("tmp");
    let log = shared.path().join("runs.log");
    let agents: Vec<CoordProcess> = (1..=5)
        .map(|i| {
            let text = format!(
                "{}\n[[hook]]\nname = \"reload\"\nexec = [\"sh\", \"-c\", \"echo start $WHO >> \\\"$LOG\\\"; sleep 0.5; echo end $WHO >> \\\"$LOG\\\"\"]\nenv = {{ WHO = \"agent-{i}\", LOG = \"{}\" }}\nfleet = {{ at_most = {at_most}, splay = \"200ms\" }}\n\n[[file]]\npath = \"out.conf\"\nkey = \"/app/v\"\non_change = [\"reload\"]\n",
                manifest(&format!("agent-{i}"), &[etcd.endpoint()], 10),
                log.display()
            );
            CoordProcess::run(&text)
        })
        .collect();
    // Each agent's first render is a change too: five gated runs.
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("the five first runs to end", || async {
        (count(&read(), "end ") == 5).then_some(())
    })
    .await;
    let first = read();
    assert_eq!(count(&first, "start "), 5, "{first}");

    client.put("/app/v", "two", None).await.expect("put");
    for a in &agents {
        crate::support::file_is(&a.dir.path().join("out.conf"), "two").await;
    }
    eventually("five more runs to end", || async {
        (count(&read(), "end ") == 10).then_some(())
    })
    .await;
    let all = read();
    let second = &all[first.len()..];
    assert_eq!(count(second, "start "), 5, "one run per agent:\n{second}");
    for i in 1..=5 {
        assert!(
            second.contains(&format!("start agent-{i}\n")),
            "agent-{i} ran:\n{second}"
        );
    }
    assert!(
        most_at_once(&all) <= at_most as usize,
        "more than {at_most} runs at once:\n{all}"
    );
    eventually("every place at the gate given back", || async {
        let gates = client.get_prefix("/coord/gates/reload/").await.ok()?;
        gates.kvs.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn five_agents_gated_at_most_one_run_one_at_a_time() {
    five_agents_gated(1).await;
}

#[tokio::test]
async fn five_agents_gated_at_most_two_never_run_three_at_once() {
    five_agents_gated(2).await;
}

#[tokio::test]
async fn a_run_waiting_at_its_gate_shows_in_status_and_metrics_then_runs_when_a_place_frees() {
    use crate::status::{free_port, get};
    use coord::etcd::{Session, alive_lease};
    use coord::lock::{Holder, acquire_gate};

    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/v", "one", None).await.expect("put");
    // The test holds the gate's one place.
    let session = Session::start(client.clone(), std::time::Duration::from_secs(10));
    let lease = alive_lease(&mut session.subscribe()).await;
    let me = Holder {
        agent: "test".into(),
        host: "test".into(),
        pid: std::process::id(),
    };
    let held = acquire_gate(&client, lease, "/coord", "reload", 1, &me)
        .await
        .expect("take the gate");
    let port = free_port();
    let marks = tempfile::tempdir().expect("tmp");
    let ran = marks.path().join("ran");
    let agent = CoordProcess::run(&format!(
        "{}\n[status]\nlisten = \"127.0.0.1:{port}\"\n\n[[hook]]\nname = \"reload\"\nexec = [\"touch\", \"{}\"]\nfleet = {{ at_most = 1 }}\n\n[[file]]\npath = \"out.conf\"\nkey = \"/app/v\"\non_change = [\"reload\"]\n",
        manifest("web-01", &[etcd.endpoint()], 10),
        ran.display()
    ));
    let waiting = eventually("/status to show the run waiting at the gate", || async {
        let (_, body) = get(port, "/status")?;
        let report: serde_json::Value = serde_json::from_str(&body).ok()?;
        let gates = report["gates"].as_array()?.clone();
        (!gates.is_empty()).then_some(gates)
    })
    .await;
    assert_eq!(waiting[0]["hook"], "reload");
    let out = agent.dir.path().join("out.conf");
    assert_eq!(
        waiting[0]["resource"],
        format!("file:{}", out.display()),
        "{waiting:?}"
    );
    let (_, metrics) = get(port, "/metrics").expect("metrics");
    assert!(
        metrics.contains("coord_hook_gate_waiting{hook=\"reload\"} 1"),
        "{metrics}"
    );
    assert!(!ran.exists(), "the hook ran while the gate was full");

    held.release(&client).await.expect("release");
    eventually("the hook to run once the place is free", || async {
        ran.exists().then_some(())
    })
    .await;
    eventually("/status to show nothing waiting", || async {
        let (_, body) = get(port, "/status")?;
        let report: serde_json::Value = serde_json::from_str(&body).ok()?;
        report["gates"].as_array()?.is_empty().then_some(())
    })
    .await;
    let (_, metrics) = get(port, "/metrics").expect("metrics");
    assert!(
        metrics.contains("coord_hook_gate_wait_duration_seconds_count{hook=\"reload\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_fleet_gate_needs_at_most_within_bounds_and_nothing_else() {
    let text = "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n\n[[hook]]\nname = \"a\"\nexec = [\"true\"]\nfleet = { splay = \"1s\" }\n\n[[hook]]\nname = \"b\"\nexec = [\"true\"]\nfleet = { at_most = 0, spaly = \"1s\" }\n";
    let err = Manifest::parse(Path::new("agent.toml"), text).expect_err("bad fleets");
    let found: Vec<(usize, String)> = err
        .diagnostics
        .into_iter()
        .map(|d| (d.line, d.message))
        .collect();
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(
        found[0].0 == 7 && found[0].1.contains("missing `at_most`"),
        "{found:?}"
    );
    assert!(
        found[1].0 == 12 && found[1].1.contains("invalid `at_most`"),
        "{found:?}"
    );
    assert!(
        found[2].0 == 12 && found[2].1.contains("did you mean `splay`"),
        "{found:?}"
    );
    let good = "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n\n[[hook]]\nname = \"a\"\nexec = [\"true\"]\nfleet = { at_most = 3, splay = \"10s\" }\n";
    let m = Manifest::parse(Path::new("agent.toml"), good).expect("valid");
    let fleet = m.hooks[0].fleet.expect("a gate");
    assert_eq!((fleet.at_most, fleet.splay.as_secs()), (3, 10));
}

#[tokio::test]
async fn a_file_whose_reload_fails_gets_its_old_content_back_and_keeps_the_bad_one_aside() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/v", "good", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("out.conf");
    let runs = dir.path().join("runs.log");
    let event = dir.path().join("event.json");
    // The reload logs what it saw and fails on a "bad" file.
    let agent = CoordProcess::run(&format!(
        "{}\n[[hook]]\nname = \"reload\"\nexec = [\"sh\", \"-c\", \"echo run $(cat '{out}') >> '{runs}'; ! grep -q bad '{out}'\"]\nretries = 1\n\n[[hook]]\nname = \"alert\"\nexec = [\"sh\", \"-c\", \"cat > '{event}'\"]\n\n[[file]]\npath = \"{out}\"\nkey = \"/app/v\"\non_change = [\"reload\"]\nrevert = true\non_revert = [\"alert\"]\n",
        manifest("web-01", &[etcd.endpoint()], 10),
        out = out.display(),
        runs = runs.display(),
        event = event.display(),
    ));
    let read = || std::fs::read_to_string(&runs).unwrap_or_default();
    eventually("the first reload", || async {
        (read() == "run good\n").then_some(())
    })
    .await;

    client.put("/app/v", "bad", None).await.expect("put");
    let reverted = eventually("the file-reverted event", || async {
        let text = std::fs::read_to_string(&event).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()
    })
    .await;
    assert_eq!(reverted["type"], "file-reverted", "{reverted}");
    assert_eq!(reverted["path"], out.display().to_string());
    let rejected = dir.path().join("out.conf.rejected");
    assert_eq!(reverted["rejected_path"], rejected.display().to_string());
    assert_eq!(std::fs::read_to_string(&out).expect("the file"), "good");
    assert_eq!(
        std::fs::read_to_string(&rejected).expect("kept aside"),
        "bad"
    );
    // The failed run, its retry, then the reload of the old content.
    eventually("the reload to run again on the old content", || async {
        (read() == "run good\nrun bad\nrun bad\nrun good\n").then_some(())
    })
    .await;

    // The same bad content again is not written (nor reloaded).
    client.put("/app/v", "bad", None).await.expect("put");
    crate::support::log_says(&agent, "Render not written: it was rejected before.").await;
    assert_eq!(std::fs::read_to_string(&out).expect("the file"), "good");
    assert_eq!(read(), "run good\nrun bad\nrun bad\nrun good\n");

    // A different render goes through.
    client.put("/app/v", "better", None).await.expect("put");
    crate::support::file_is(&out, "better").await;
    eventually("the reload of the new content", || async {
        read().ends_with("run good\nrun better\n").then_some(())
    })
    .await;
}

#[test]
fn revert_needs_on_change_hooks_and_on_revert_needs_revert() {
    let text = "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n\n[[hook]]\nname = \"a\"\nexec = [\"true\"]\n\n[[file]]\npath = \"/tmp/x\"\nkey = \"/x\"\nrevert = true\n\n[[file]]\npath = \"/tmp/y\"\nkey = \"/y\"\non_change = [\"a\"]\non_revert = [\"a\"]\n";
    let err = Manifest::parse(Path::new("agent.toml"), text).expect_err("refused");
    let found: Vec<(usize, String)> = err
        .diagnostics
        .into_iter()
        .map(|d| (d.line, d.message))
        .collect();
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found[0].0 == 11 && found[0].1.contains("needs `on_change` hooks"),
        "{found:?}"
    );
    assert!(
        found[1].0 == 17 && found[1].1.contains("needs `revert = true`"),
        "{found:?}"
    );
}

#[tokio::test]
async fn changing_only_the_labels_rewrites_the_presence_record_on_the_same_lease() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let agent = CoordProcess::run(&labelled("web-01", &etcd.endpoint(), r#"role = "edge""#));
    let record = |want: &'static str| {
        let client = client.clone();
        async move {
            eventually(&format!("labels {want}"), || async {
                let kv = client.get("/coord/agents/web-01").await.ok()??;
                let v: serde_json::Value = serde_json::from_slice(&kv.value).ok()?;
                (v["labels"]["role"] == want).then_some(kv.lease)
            })
            .await
        }
    };
    let before = record("edge").await;
    std::fs::write(
        agent.manifest_path(),
        labelled("web-01", &etcd.endpoint(), r#"role = "canary""#),
    )
    .expect("rewrite the manifest");
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let after = record("canary").await;
    assert_eq!(before, after, "a new session was started for a label");
}

/// Each `hold` run of the `misbehave` plugin as logged by its agent: its
/// start and end on the wall clock (ns since the epoch), with the agent.
fn holds(agent: &str, log: &str) -> Vec<(u128, u128, String)> {
    let stamp = |line: &str, word: &str| -> Option<u128> {
        let at = line.find(word)? + word.len();
        let digits: String = line[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    let starts: Vec<u128> = log.lines().filter_map(|l| stamp(l, "start=")).collect();
    let ends: Vec<u128> = log.lines().filter_map(|l| stamp(l, "end=")).collect();
    starts
        .into_iter()
        .zip(ends)
        .map(|(s, e)| (s, e, agent.to_owned()))
        .collect()
}

/// A WASM hook gated to one agent at once: five agents run it (the
/// plugin logs its start and end and takes 0.5 s in between), one change
/// gives five runs, and on the one wall clock of the host no run starts
/// before the one before it ended.
#[tokio::test]
async fn five_agents_gated_at_most_one_run_their_wasm_hook_one_at_a_time() {
    let plugin = crate::support::plugins().misbehave.clone();
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/v", "one", None).await.expect("put");
    let agents: Vec<CoordProcess> = (1..=5)
        .map(|i| {
            let text = format!(
                "{}\n[[hook]]\nname = \"hold\"\nwasm = '{}'\nconfig = {{ mode = \"hold\", who = \"agent-{i}\", ms = 500 }}\ntimeout = \"10s\"\nfleet = {{ at_most = 1, splay = \"200ms\" }}\n\n[[file]]\npath = \"out.conf\"\nkey = \"/app/v\"\non_change = [\"hold\"]\n",
                manifest(&format!("agent-{i}"), &[etcd.endpoint()], 10),
                plugin.display()
            );
            CoordProcess::run(&text)
        })
        .collect();
    let runs = || -> Vec<(u128, u128, String)> {
        let mut all: Vec<_> = agents
            .iter()
            .enumerate()
            .flat_map(|(i, a)| holds(&format!("agent-{}", i + 1), &a.log()))
            .collect();
        all.sort();
        all
    };
    // Each agent's first render is a change too: five gated runs.
    eventually("the five first runs to end", || async {
        (runs().len() == 5).then_some(())
    })
    .await;
    client.put("/app/v", "two", None).await.expect("put");
    eventually("five more runs to end", || async {
        (runs().len() == 10).then_some(())
    })
    .await;
    let all = runs();
    for i in 1..=5 {
        let mine = all.iter().filter(|r| r.2 == format!("agent-{i}")).count();
        assert_eq!(mine, 2, "agent-{i} ran twice: {all:?}");
    }
    for pair in all.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "{} started before {} ended: {all:?}",
            pair[1].2,
            pair[0].2
        );
    }
    eventually("every place at the gate given back", || async {
        let gates = client.get_prefix("/coord/gates/hold/").await.ok()?;
        gates.kvs.is_empty().then_some(())
    })
    .await;
}
