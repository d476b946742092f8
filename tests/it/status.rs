//! The local status endpoint, `coord status`, metrics and systemd notify,
//! against a real etcd and the real binary.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::{CoordProcess, LocalEtcd, PATIENCE, coord, etcd, eventually};

/// A loopback port nobody listens on right now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn manifest(etcd: &LocalEtcd, state_dir: &Path, port: u16, rest: &str) -> String {
    format!(
        "[agent]\nname = \"status-01\"\nttl = \"2s\"\nstate_dir = \"{}\"\n\
         [etcd]\nendpoints = [\"{}\"]\ndial_timeout = \"1s\"\nrequest_timeout = \"1s\"\n\
         [status]\nlisten = \"127.0.0.1:{port}\"\n{rest}",
        state_dir.display(),
        etcd.endpoint()
    )
}

/// `GET path` on the endpoint: (status code, body), or `None` when nothing
/// answers.
pub(crate) fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

async fn health_is(port: u16, want: u16) -> String {
    eventually(&format!("/health to answer {want}"), || async move {
        get(port, "/health").and_then(|(code, body)| (code == want).then_some(body))
    })
    .await
}

#[tokio::test]
async fn health_turns_503_while_etcd_is_down_and_200_again_when_it_returns() {
    let mut etcd = etcd().await;
    let state = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let _agent = CoordProcess::run(&manifest(&etcd, state.path(), port, ""));
    assert_eq!(health_is(port, 200).await, "ok\n");

    etcd.member().kill();
    let why = health_is(port, 503).await;
    assert!(why.contains("session"), "503 without the reason: {why:?}");

    etcd.member().restart().expect("etcd restarts");
    health_is(port, 200).await;
}

/// The samples of an exposition, after checking it line by line: every
/// line is a comment or `name{labels} value`, and it ends with `# EOF`.
fn parse_metrics(text: &str) -> prometheus_parse::Scrape {
    assert_eq!(text.lines().last(), Some("# EOF"), "no `# EOF`:\n{text}");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad value in {line:?}"
        );
        let name = series.split('{').next().unwrap_or_default();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(
                labels.starts_with('{') && labels.ends_with('}'),
                "bad labels in {line:?}"
            );
        }
    }
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("prometheus text parses")
}

fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

async fn metric_reaches(port: u16, metric: &str, labels: &[(&str, &str)], at_least: f64) {
    let what = format!("{metric}{labels:?} to reach {at_least}");
    eventually(&what, || async move {
        let (code, body) = get(port, "/metrics")?;
        assert_eq!(code, 200);
        (value(&parse_metrics(&body), metric, labels) >= at_least).then_some(())
    })
    .await;
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_count_renders_and_hook_runs() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/v", "one", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("v.txt");
    let port = free_port();
    let _agent = CoordProcess::run(&manifest(
        &etcd,
        dir.path(),
        port,
        &format!(
            "[[file]]\npath = \"{}\"\nkey = \"/app/v\"\non_change = [\"noted\"]\n\
             [[hook]]\nname = \"noted\"\nexec = [\"true\"]\n",
            out.display()
        ),
    ));
    metric_reaches(
        port,
        "coord_file_renders_total",
        &[("result", "replaced")],
        1.0,
    )
    .await;
    let (_, body) = get(port, "/metrics").expect("metrics");
    let first = parse_metrics(&body);
    for family in [
        "coord_session_state",
        "coord_session_lease_renewals_total",
        "coord_watch_reconnects_total",
        "coord_watch_relists_total",
        "coord_file_render_duration_seconds_count",
        "coord_services",
        "coord_locks_held",
        "coord_instance_ids_held",
        "coord_reconcile_queue_depth",
    ] {
        assert!(
            first.samples.iter().any(|s| s.metric == family),
            "{family} missing from:\n{body}"
        );
    }
    assert_eq!(
        value(&first, "coord_session_state", &[("state", "alive")]),
        1.0
    );
    let renders = value(&first, "coord_file_renders_total", &[]);
    let hook_runs = value(&first, "coord_hook_runs_total", &[("hook", "noted")]);

    client.put("/app/v", "two", None).await.expect("put");
    metric_reaches(port, "coord_file_renders_total", &[], renders + 1.0).await;
    metric_reaches(
        port,
        "coord_hook_runs_total",
        &[("hook", "noted"), ("result", "ok")],
        hook_runs + 1.0,
    )
    .await;
    let (_, body) = get(port, "/metrics").expect("metrics");
    assert!(
        value(
            &parse_metrics(&body),
            "coord_hook_run_duration_seconds_count",
            &[("hook", "noted")]
        ) >= 1.0,
        "{body}"
    );
}

#[tokio::test]
async fn the_endpoint_refuses_a_non_loopback_address_unless_the_manifest_asks_for_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("agent.toml");
    let text =
        "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n\n[status]\nlisten = \"0.0.0.0:9180\"\n";
    std::fs::write(&path, text).expect("manifest");
    let p = path.to_str().expect("utf-8 path");
    for args in [vec!["check", p], vec!["run", p]] {
        let (status, _, stderr) = coord(&args, None);
        assert_eq!(status.code(), Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("{p}:5:10: error:")) && stderr.contains("loopback"),
            "{args:?}: the error should point at the address: {stderr}"
        );
    }

    std::fs::write(&path, format!("{text}allow_non_loopback = true\n")).expect("manifest");
    let (status, stdout, stderr) = coord(&["check", p], None);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("status http://0.0.0.0:9180"), "{stdout}");
}

#[tokio::test]
async fn coord_status_prints_the_state_of_a_running_agent_and_fails_when_none_answers() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("v.txt");
    etcd.client()
        .await
        .put("/app/v", "one", None)
        .await
        .expect("put");
    let port = free_port();
    let agent = CoordProcess::run(&manifest(
        &etcd,
        dir.path(),
        port,
        &format!("[[file]]\npath = \"{}\"\nkey = \"/app/v\"\n", out.display()),
    ));
    let path = agent.manifest_path();
    let m = path.to_str().expect("utf-8 path");
    let stdout = eventually("coord status to report a healthy agent", || async {
        let (status, stdout, _) = coord(&["status", "--manifest", m], None);
        status.success().then_some(stdout)
    })
    .await;
    assert!(stdout.contains("agent    status-01"), "{stdout}");
    assert!(stdout.contains("health   ok"), "{stdout}");
    assert!(stdout.contains("session  alive, lease "), "{stdout}");
    assert!(stdout.contains("presence status-01"), "{stdout}");
    assert!(
        stdout.contains(&format!("file {}", out.display())),
        "{stdout}"
    );

    let (status, stdout, _) = coord(
        &["status", "--addr", &format!("127.0.0.1:{port}"), "--json"],
        None,
    );
    assert!(status.success());
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(report["session"]["state"], "alive");

    let closed = free_port();
    let (status, _, stderr) = coord(&["status", "--addr", &format!("127.0.0.1:{closed}")], None);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("no coord agent reachable at 127.0.0.1:{closed}")),
        "{stderr}"
    );
}

/// Waits for a datagram on `socket` with the line `word`.
async fn receive(socket: &tokio::net::UnixDatagram, word: &str) -> String {
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(PATIENCE, socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {word} on the notify socket within {PATIENCE:?}"))
            .expect("notify socket");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.lines().any(|l| l == word) {
            return msg;
        }
    }
}

#[tokio::test]
async fn ready_arrives_on_the_notify_socket_after_the_first_reconcile_then_watchdog_pings_and_stopping_on_sigterm()
 {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let dir = tempfile::tempdir().expect("tmp");
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).expect("bind notify socket");
    let manifest_path = dir.path().join("agent.toml");
    std::fs::write(&manifest_path, manifest(&etcd, dir.path(), free_port(), "")).expect("manifest");
    let mut child = Command::new(env!("CARGO_BIN_EXE_coord"))
        .arg("run")
        .arg(&manifest_path)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn coord");
    let ready = receive(&socket, "READY=1").await;
    // READY=1 comes after the first reconcile: the presence key is there.
    assert!(
        client
            .get("/coord/agents/status-01")
            .await
            .expect("etcd answers")
            .is_some(),
        "READY=1 before presence was registered: {ready}"
    );
    // With a watchdog asked for, the alive session is reported.
    receive(&socket, "WATCHDOG=1").await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    )
    .expect("SIGTERM");
    receive(&socket, "STOPPING=1").await;
    let status = child.wait().expect("coord exits");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_fields_beside_the_message() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let manifest_path = dir.path().join("agent.toml");
    let port = free_port();
    std::fs::write(&manifest_path, manifest(&etcd, dir.path(), port, "")).expect("manifest");
    let log = dir.path().join("coord.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_coord"))
        .arg("run")
        .arg(&manifest_path)
        .arg("--log-format")
        .arg("json")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn coord");
    let line = eventually("the endpoint's log line", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move {
            text.lines()
                .find(|l| l.contains("Status endpoint listening."))
                .map(str::to_owned)
        }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).expect("log");
    for l in text.lines().filter(|l| !l.is_empty()) {
        serde_json::from_str::<serde_json::Value>(l)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {l}"));
    }
    let entry: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    assert_eq!(entry["level"], "INFO");
    assert_eq!(entry["message"], "Status endpoint listening.");
    assert_eq!(entry["addr"], format!("127.0.0.1:{port}"));
}

#[tokio::test]
async fn coord_status_says_a_critical_service_and_a_maintenance_reason_with_why() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let agent = CoordProcess::run(&manifest(
        &etcd,
        dir.path(),
        port,
        "[[service]]\nname = \"api\"\naddress = \"127.0.0.1:1\"\ncheck = { tcp = \"127.0.0.1:1\", interval = \"1s\" }\n\n\
         [[service]]\nname = \"db\"\naddress = \"127.0.0.1:2\"\n",
    ));
    let path = agent.manifest_path();
    let m = path.to_str().expect("utf-8 path");
    let stdout = eventually("coord status to say api is critical", || async {
        let (_, stdout, _) = coord(&["status", "--manifest", m], None);
        stdout
            .contains("1 service instance critical")
            .then_some(stdout)
    })
    .await;
    assert!(!stdout.contains("health   ok"), "{stdout}");
    let why = stdout
        .lines()
        .find(|l| l.contains("- api/status-01-api: "))
        .unwrap_or_else(|| panic!("the critical instance with why:\n{stdout}"));
    assert!(
        why.len() > "         - api/status-01-api: ".len(),
        "{stdout}"
    );

    let ep = etcd.endpoint();
    let (status, out, err) = coord(
        &[
            "maint",
            "on",
            "status-01/db",
            "--reason",
            "disk swap",
            "--endpoints",
            &ep,
        ],
        None,
    );
    assert!(status.success(), "{out}{err}");
    let stdout = eventually("coord status to show the reason", || async {
        let (_, stdout, _) = coord(&["status", "--manifest", m], None);
        stdout.contains("maintenance: disk swap").then_some(stdout)
    })
    .await;
    assert!(stdout.contains("service db/status-01-db"), "{stdout}");
}
