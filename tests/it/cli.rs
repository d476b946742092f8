//! The `coord` command line as an operator uses it.

use nix::sys::signal::Signal;

use crate::support::{CoordProcess, coord, etcd, eventually, manifest, repo_root};

#[test]
fn check_accepts_the_example_manifest_and_summarises_it() {
    let example = repo_root().join("agent.toml.example");
    let (status, out, err) = coord(&["check", example.to_str().expect("utf-8")], None);
    assert!(status.success(), "{err}");
    assert!(out.contains("example-agent"), "{out}");
    assert!(out.contains("http://127.0.0.1:2379"), "{out}");
}

#[test]
fn check_reports_three_located_mistakes_and_exits_64() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "[agent]\nttl = \"10 parsecs\"\nnmae = \"x\"\n\n[etcd]\nendpoints = \"http://127.0.0.1:2379\"\n",
    )
    .expect("write");
    let (status, _, err) = coord(&["check", path.to_str().expect("utf-8")], None);
    assert_eq!(status.code(), Some(64), "{err}");
    let located: Vec<&str> = err.lines().filter(|l| l.contains("agent.toml:")).collect();
    assert_eq!(located.len(), 3, "{err}");
    assert!(located[0].contains("agent.toml:2:7: error:"), "{err}");
    assert!(located[1].contains("agent.toml:3:1: error:"), "{err}");
    assert!(located[2].contains("agent.toml:6:13: error:"), "{err}");
}

#[tokio::test]
async fn run_with_a_bad_manifest_exits_64_and_touches_nothing() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("agent.toml");
    let text = manifest("web-01", &[etcd.endpoint()], 10).replace("ttl = \"10s\"", "ttl = 10");
    std::fs::write(&path, text).expect("write");
    let (status, _, err) = coord(&["run", path.to_str().expect("utf-8")], None);
    assert_eq!(status.code(), Some(64), "{err}");
    let client = etcd.client().await;
    let everything = client.get_prefix("").await.expect("etcd answers");
    assert!(
        everything.kvs.is_empty(),
        "something was written: {everything:?}"
    );
}

#[tokio::test]
async fn agents_lists_the_fleet_from_flags_or_from_a_manifest() {
    let etcd = etcd().await;
    let agent = CoordProcess::run(&manifest("web-01", &[etcd.endpoint()], 10));
    let client = etcd.client().await;
    eventually("presence", || async {
        client.get("/coord/agents/web-01").await.ok().flatten()
    })
    .await;
    let (status, out, err) = coord(&["agents", "--endpoints", &etcd.endpoint()], None);
    assert!(status.success(), "{err}");
    assert!(out.lines().any(|l| l.starts_with("web-01 ")), "{out}");
    let from_env = std::process::Command::new(env!("CARGO_BIN_EXE_coord"))
        .arg("agents")
        .env("COORD_ENDPOINTS", etcd.endpoint())
        .output()
        .expect("run coord agents");
    let listed = String::from_utf8_lossy(&from_env.stdout);
    assert!(listed.lines().any(|l| l.starts_with("web-01 ")), "{listed}");
    let path = agent.manifest_path();
    let (status, out, err) = coord(
        &[
            "agents",
            "--json",
            "--manifest",
            path.to_str().expect("utf-8"),
        ],
        None,
    );
    assert!(status.success(), "{err}");
    let line: serde_json::Value =
        serde_json::from_str(out.lines().next().expect("one agent")).expect("JSON");
    assert_eq!(line["name"], "web-01");
    assert_eq!(line["record"]["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn dev_without_etcd_says_how_to_install_it() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::copy(
        repo_root().join("agent.toml.example"),
        dir.path().join("agent.toml.example"),
    )
    .expect("copy example");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_coord"))
        .arg("dev")
        .current_dir(dir.path())
        .env("PATH", dir.path())
        .env_remove("ETCD_BIN")
        .output()
        .expect("run coord dev");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("apt-get install etcd-server"), "{err}");
    assert!(err.contains("ETCD_BIN"), "{err}");
}

#[tokio::test]
async fn dev_runs_the_example_against_its_own_etcd_and_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::copy(
        repo_root().join("agent.toml.example"),
        dir.path().join("agent.toml.example"),
    )
    .expect("copy example");
    let log = dir.path().join("dev.log");
    let file = std::fs::File::create(&log).expect("log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_coord"))
        .arg("dev")
        .current_dir(dir.path())
        .stderr(file.try_clone().expect("log"))
        .stdout(file)
        .spawn()
        .expect("spawn coord dev");
    let endpoint = eventually("coord dev to start etcd", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("coord dev: etcd is up at "))
            .map(str::to_owned)
    })
    .await;
    eventually("the example agent in `coord agents`", || async {
        let (status, out, _) = coord(&["agents", "--endpoints", &endpoint], None);
        (status.success() && out.contains("example-agent")).then_some(())
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGINT,
    )
    .expect("SIGINT");
    let status = eventually("coord dev to exit", || {
        let status = child.try_wait().ok().flatten();
        async move { status }
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{text}");
    assert!(text.contains("Session lease revoked"), "{text}");
    assert!(
        dir.path().join(".coord-dev").is_dir(),
        "etcd data kept for the next run"
    );
}

#[test]
fn hook_runs_one_hook_by_hand_and_reports_a_veto() {
    let dir = tempfile::tempdir().expect("tmp");
    let manifest = dir.path().join("agent.toml");
    std::fs::write(
        &manifest,
        "[agent]\nname = \"web-01\"\n[etcd]\nendpoints = [\"http://127.0.0.1:1\"]\n\
         [[hook]]\nname = \"note\"\nexec = [\"sh\", \"-c\", \"cat > \\\"$OUT\\\"\"]\nenv = { OUT = \"out.json\" }\n\
         [[hook]]\nname = \"deny\"\nexec = [\"sh\", \"-c\", \"echo 'not today' >&2; exit 1\"]\n",
    )
    .expect("manifest");
    let event = dir.path().join("event.json");
    std::fs::write(
        &event,
        r#"{"type":"lock-acquired","lock":"reports","fencing_token":7}"#,
    )
    .expect("event");
    let m = manifest.to_str().expect("utf-8");
    let e = event.to_str().expect("utf-8");
    let (status, out, err) = coord(
        &["hook", "note", "--event", e, "--manifest", m],
        Some(dir.path()),
    );
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("hook `note`: done"), "{out}");
    let seen: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("out.json")).expect("hook output"),
    )
    .expect("JSON");
    assert_eq!(seen["agent"], "web-01");
    assert_eq!(seen["fencing_token"], 7);

    let validate = dir.path().join("validate.json");
    std::fs::write(
        &validate,
        r#"{"type":"validate-file","path":"/etc/x","staged_path":"/tmp/x","content":"x"}"#,
    )
    .expect("event");
    let v = validate.to_str().expect("utf-8");
    let (status, out, _) = coord(&["hook", "deny", "--event", v, "--manifest", m], None);
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("vetoed") && out.contains("not today"), "{out}");

    let (status, _, err) = coord(&["hook", "nope", "--event", v, "--manifest", m], None);
    assert!(!status.success());
    assert!(
        err.contains("no hook `nope`") && err.contains("did you mean `note`?"),
        "{err}"
    );
}

#[tokio::test]
async fn render_dry_run_shows_a_diff_and_once_renders_and_reports_failures() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/port", "8080", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let good = dir.path().join("good.conf");
    let bad = dir.path().join("bad.conf");
    std::fs::write(&good, "port = 80\n").expect("old content");
    let manifest = dir.path().join("agent.toml");
    std::fs::write(
        &manifest,
        format!(
            "[etcd]\nendpoints = [\"{}\"]\n\
             [[file]]\npath = \"{}\"\nsource = \"port = {{{{ key('/app/port') }}}}\\n\"\n\
             [[file]]\npath = \"{}\"\nkey = \"/app/missing\"\n",
            etcd.endpoint(),
            good.display(),
            bad.display()
        ),
    )
    .expect("manifest");
    let m = manifest.to_str().expect("utf-8");
    let (status, out, err) = coord(&["render", m, "--dry-run"], None);
    assert!(
        !status.success(),
        "a failed file fails the dry run too: {out}{err}"
    );
    assert!(
        out.contains("-port = 80") && out.contains("+port = 8080"),
        "{out}"
    );
    assert!(out.contains("key `/app/missing` is missing"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&good).expect("good"),
        "port = 80\n",
        "dry run wrote"
    );
    let (status, out, _) = coord(&["render", m, "--once"], None);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains(&format!("replaced   {}", good.display())),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(&good).expect("good"),
        "port = 8080\n"
    );
    assert!(!bad.exists());
    client.put("/app/missing", "x", None).await.expect("put");
    let (status, out, _) = coord(&["render", m, "--once"], None);
    assert!(status.success(), "{out}");
    assert!(
        out.contains(&format!("unchanged  {}", good.display())),
        "{out}"
    );
}

/// Needs `unshare` (util-linux) and the right to make a mount namespace
/// (root here).
#[tokio::test]
async fn a_bind_mounted_destination_is_written_in_place_and_says_so() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client
        .put("/app/v", "new content", None)
        .await
        .expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let source = dir.path().join("source.conf");
    let dest = dir.path().join("dest.conf");
    std::fs::write(&source, "old").expect("source");
    std::fs::write(&dest, "").expect("mount point");
    let manifest = dir.path().join("agent.toml");
    std::fs::write(
        &manifest,
        format!(
            "[etcd]\nendpoints = [\"{}\"]\n[[file]]\npath = \"{}\"\nkey = \"/app/v\"\n",
            etcd.endpoint(),
            dest.display()
        ),
    )
    .expect("manifest");
    let script = format!(
        "mount --bind '{}' '{}' && exec '{}' render '{}' --once",
        source.display(),
        dest.display(),
        env!("CARGO_BIN_EXE_coord"),
        manifest.display()
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux) must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("writing in place"), "{stderr}");
    // The bind mount shared the inode: the source now holds the new content.
    assert_eq!(
        std::fs::read_to_string(&source).expect("source"),
        "new content"
    );
}

#[test]
fn check_loads_wasm_plugins_and_locates_one_that_is_not_a_component() {
    let plugins = crate::support::plugins();
    let dir = tempfile::tempdir().expect("tmp");
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm at all").expect("junk");
    let manifest = dir.path().join("agent.toml");
    let text = |plugin: &std::path::Path| {
        format!(
            "[agent]\nstate_dir = \"{}\"\n[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n\n[[hook]]\nname = \"audit\"\nwasm = \"{}\"\n",
            dir.path().join("state").display(),
            plugin.display()
        )
    };
    std::fs::write(&manifest, text(&junk)).expect("manifest");
    let m = manifest.to_str().expect("utf-8");
    let (status, _, err) = coord(&["check", m], None);
    assert_eq!(status.code(), Some(64), "{err}");
    assert!(err.contains("agent.toml:8:8: error: hook `audit`"), "{err}");
    std::fs::write(&manifest, text(&plugins.log_events)).expect("manifest");
    let (status, out, err) = coord(&["check", m], None);
    assert!(status.success(), "{err}");
    assert!(out.contains("hook   audit: wasm"), "{out}");
}

#[test]
fn hook_runs_a_wasm_plugin_by_hand() {
    let plugins = crate::support::plugins();
    let dir = tempfile::tempdir().expect("tmp");
    let manifest = dir.path().join("agent.toml");
    std::fs::write(
        &manifest,
        format!(
            "[agent]\nname = \"web-01\"\nstate_dir = \"{}\"\n[etcd]\nendpoints = [\"http://127.0.0.1:1\"]\n\
             [[hook]]\nname = \"audit\"\nwasm = \"{}\"\n\
             [[hook]]\nname = \"json\"\nwasm = \"{}\"\n",
            dir.path().join("state").display(),
            plugins.log_events.display(),
            plugins.validate_config.display()
        ),
    )
    .expect("manifest");
    let m = manifest.to_str().expect("utf-8");
    let event = dir.path().join("event.json");
    std::fs::write(
        &event,
        r#"{"type":"lock-acquired","lock":"reports","fencing_token":7}"#,
    )
    .expect("event");
    let (status, out, err) = coord(
        &[
            "hook",
            "audit",
            "--event",
            event.to_str().expect("utf-8"),
            "--manifest",
            m,
        ],
        None,
    );
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("hook `audit`: done"), "{out}");
    assert!(
        err.contains("reports"),
        "the plugin's log line names the lock:\n{err}"
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"type":"validate-file","path":"/etc/app.json","staged_path":"/tmp/x","content":"{\"a\": }"}"#,
    )
    .expect("event");
    let (status, out, _) = coord(
        &[
            "hook",
            "json",
            "--event",
            bad.to_str().expect("utf-8"),
            "--manifest",
            m,
        ],
        None,
    );
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("vetoed"), "{out}");
}
