//! Services against real etcd: registration in the gRPC resolver format,
//! health checks withdrawing and restoring, maintenance, lifecycle.

use std::time::Duration;

use coord::etcd::Client;
use nix::sys::signal::Signal;

use crate::support::{CoordProcess, LocalEtcd, coord, etcd, eventually, file_is};

const LISTED: &str = "/coord/services/api/web-01-api";
const HEALTH: &str = "/coord/health/api/web-01-api";

fn manifest(etcd_endpoints: &[String], ttl: u64, rest: &str) -> String {
    let eps = etcd_endpoints
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[agent]\nname = \"web-01\"\nttl = \"{ttl}s\"\n[etcd]\nendpoints = [{eps}]\nrequest_timeout = \"2s\"\n{rest}"
    )
}

async fn listed(client: &Client, key: &str, want: bool) {
    let what = format!(
        "`{key}` to be {}",
        if want { "listed" } else { "withdrawn" }
    );
    eventually(&what, || async {
        let present = client.get(key).await.ok()?.is_some();
        (present == want).then_some(())
    })
    .await;
}

async fn health_is(client: &Client, want: &str) -> serde_json::Value {
    eventually(&format!("health `{want}`"), || async {
        let kv = client.get(HEALTH).await.ok()??;
        let v: serde_json::Value = serde_json::from_slice(&kv.value).ok()?;
        (v["status"] == want).then_some(v)
    })
    .await
}

fn endpoint(etcd: &LocalEtcd) -> Vec<String> {
    vec![etcd.endpoint()]
}

#[tokio::test]
async fn an_instance_is_listed_in_the_grpc_resolver_format() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let _agent = CoordProcess::run(&manifest(
        &endpoint(&etcd),
        10,
        "[[service]]\nname = \"api\"\naddress = \"10.0.0.5:8080\"\nmetadata = { zone = \"eu-1\" }\nweight = 5\n",
    ));
    listed(&client, LISTED, true).await;
    let kv = client.get(LISTED).await.expect("etcd").expect("listed");
    let v: serde_json::Value = serde_json::from_slice(&kv.value).expect("JSON");
    assert_eq!(v["Addr"], "10.0.0.5:8080");
    assert_eq!(v["Metadata"]["zone"], "eu-1");
    assert_eq!(v["Metadata"]["weight"], 5);
    assert!(kv.lease.is_some(), "on the session lease");
    let h = health_is(&client, "passing").await;
    assert_eq!(h["agent"], "web-01");
}

#[tokio::test]
async fn a_failing_check_withdraws_the_instance_after_its_threshold_and_a_passing_one_restores_it()
{
    let etcd = etcd().await;
    let client = etcd.client().await;
    let dir = tempfile::tempdir().expect("tmp");
    let flag = dir.path().join("healthy");
    std::fs::write(&flag, "").expect("flag");
    let hook_log = dir.path().join("hook.log");
    let _agent = CoordProcess::run(&manifest(
        &endpoint(&etcd),
        10,
        &format!(
            "[[hook]]\nname = \"note\"\nexec = [\"sh\", \"-c\", \"echo $COORD_OLD-$COORD_NEW >> {}\"]\n\
             [[service]]\nname = \"api\"\naddress = \"127.0.0.1:1\"\non_change = [\"note\"]\n\
             check = {{ exec = [\"sh\", \"-c\", \"test -f {} || exit 2\"], interval = \"100ms\", failures = 3, successes = 2, initial = \"passing\" }}\n",
            hook_log.display(),
            flag.display()
        ),
    ));
    listed(&client, LISTED, true).await;
    std::fs::remove_file(&flag).expect("unhealthy");
    listed(&client, LISTED, false).await;
    let h = health_is(&client, "critical").await;
    assert_eq!(
        h["addr"], "127.0.0.1:1",
        "a withdrawn instance stays visible"
    );
    std::fs::write(&flag, "").expect("healthy again");
    listed(&client, LISTED, true).await;
    health_is(&client, "passing").await;
    let log = eventually("the hook to see both changes", || async {
        let l = std::fs::read_to_string(&hook_log).ok()?;
        l.contains("passing-critical").then_some(l)
    })
    .await;
    assert!(
        log.lines().any(|l| l == "-passing"),
        "first registration: {log}"
    );
}

/// A tiny HTTP server whose answer the test switches.
async fn http_server(status: std::sync::Arc<std::sync::atomic::AtomicU16>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let code = status.load(std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let reply =
                    format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn an_http_check_passes_on_2xx_and_withdraws_on_an_error_status() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let status = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(200));
    let port = http_server(status.clone()).await;
    let _agent = CoordProcess::run(&manifest(
        &endpoint(&etcd),
        10,
        &format!(
            "[[service]]\nname = \"api\"\naddress = \"127.0.0.1:{port}\"\n\
             check = {{ http = \"http://127.0.0.1:{port}/healthz\", interval = \"100ms\" }}\n"
        ),
    ));
    listed(&client, LISTED, true).await;
    status.store(503, std::sync::atomic::Ordering::Relaxed);
    listed(&client, LISTED, false).await;
    let h = health_is(&client, "critical").await;
    assert!(
        h["output"].as_str().is_some_and(|o| o.contains("503")),
        "{h}"
    );
}

#[tokio::test]
async fn maintenance_mode_withdraws_and_restores_from_anywhere() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let _agent = CoordProcess::run(&manifest(
        &endpoint(&etcd),
        10,
        "[[service]]\nname = \"api\"\naddress = \"127.0.0.1:1\"\n",
    ));
    listed(&client, LISTED, true).await;
    let ep = etcd.endpoint();
    let (status, out, err) = coord(
        &[
            "maint",
            "on",
            "web-01/api",
            "--reason",
            "deploy",
            "--endpoints",
            &ep,
        ],
        None,
    );
    assert!(status.success(), "{out}{err}");
    listed(&client, LISTED, false).await;
    health_is(&client, "maintenance").await;
    let (status, out, _) = coord(&["services", "api", "--all", "--endpoints", &ep], None);
    assert!(status.success());
    assert!(
        out.contains("web-01-api") && out.contains("maintenance"),
        "{out}"
    );
    let (status, out, _) = coord(&["services", "api", "--endpoints", &ep], None);
    assert!(status.success());
    assert!(
        !out.contains("web-01-api"),
        "withdrawn instances are hidden without --all: {out}"
    );
    coord(&["maint", "off", "web-01/api", "--endpoints", &ep], None);
    listed(&client, LISTED, true).await;
    // The whole agent.
    coord(&["maint", "on", "web-01", "--endpoints", &ep], None);
    listed(&client, LISTED, false).await;
    coord(&["maint", "off", "web-01", "--endpoints", &ep], None);
    listed(&client, LISTED, true).await;
    let h = health_is(&client, "passing").await;
    eprintln!(
        "DEBUG output len after restart {}",
        h["output"].as_str().map_or(0, str::len)
    );
}

#[tokio::test]
async fn a_ttl_check_follows_reports_and_goes_critical_without_them() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let _agent = CoordProcess::run(&manifest(
        &endpoint(&etcd),
        10,
        "[[service]]\nname = \"api\"\naddress = \"127.0.0.1:1\"\ncheck = { ttl = \"2s\" }\n",
    ));
    health_is(&client, "critical").await;
    let ep = etcd.endpoint();
    let (status, out, err) = coord(
        &[
            "services",
            "pass",
            "web-01-api",
            "--note",
            "batch ok",
            "--endpoints",
            &ep,
        ],
        None,
    );
    assert!(status.success(), "{out}{err}");
    listed(&client, LISTED, true).await;
    let h = health_is(&client, "passing").await;
    assert_eq!(h["output"], "batch ok");
    // No further report: the TTL runs out.
    listed(&client, LISTED, false).await;
    health_is(&client, "critical").await;
}

#[tokio::test]
async fn kill_9_leaves_the_instance_until_the_ttl_and_a_clean_stop_removes_it_at_once() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let text = manifest(
        &endpoint(&etcd),
        3,
        "[[service]]\nname = \"api\"\naddress = \"127.0.0.1:1\"\n",
    );
    let agent = CoordProcess::run(&text);
    listed(&client, LISTED, true).await;
    agent.signal(Signal::SIGKILL);
    // Still there right after: only the TTL removes it.
    assert!(client.get(LISTED).await.expect("etcd").is_some());
    listed(&client, LISTED, false).await;
    assert!(client.get(HEALTH).await.expect("etcd").is_none());

    let mut agent = CoordProcess::run(&text);
    listed(&client, LISTED, true).await;
    agent.signal(Signal::SIGTERM);
    agent.wait().await;
    assert!(
        client.get(LISTED).await.expect("etcd").is_none(),
        "gone at once on a clean stop"
    );
    assert!(client.get(HEALTH).await.expect("etcd").is_none());
}

#[tokio::test]
async fn an_instance_removed_from_the_manifest_is_deregistered_on_reload() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let with = manifest(
        &endpoint(&etcd),
        30,
        "[[service]]\nname = \"api\"\naddress = \"127.0.0.1:1\"\n",
    );
    let agent = CoordProcess::run(&with);
    listed(&client, LISTED, true).await;
    std::fs::write(agent.manifest_path(), manifest(&endpoint(&etcd), 30, "")).expect("rewrite");
    agent.signal(Signal::SIGHUP);
    listed(&client, LISTED, false).await;
    eventually("the health record to go too", || async {
        client.get(HEALTH).await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_instance_comes_back_after_etcd_loses_everything() {
    let mut etcd = etcd().await;
    let _agent = CoordProcess::run(&manifest(
        &endpoint(&etcd),
        2,
        "[[service]]\nname = \"api\"\naddress = \"127.0.0.1:1\"\n",
    ));
    listed(&etcd.client().await, LISTED, true).await;
    etcd.member().wipe_data().expect("wipe");
    etcd.member().restart().expect("restart");
    etcd.member().wait_healthy().await.expect("healthy");
    listed(&etcd.client().await, LISTED, true).await;
}

#[tokio::test]
async fn killing_one_member_of_three_never_deregisters_anything() {
    let mut cluster = crate::support::cluster().await;
    let _agent = CoordProcess::run(&manifest(
        &cluster.endpoints(),
        5,
        "[[service]]\nname = \"api\"\naddress = \"127.0.0.1:1\"\n",
    ));
    let client = cluster.client().await;
    listed(&client, LISTED, true).await;
    let before = client.get(LISTED).await.expect("etcd").expect("listed");
    cluster.member(0).kill();
    tokio::time::sleep(Duration::from_secs(11)).await;
    let after = client
        .get(LISTED)
        .await
        .expect("etcd")
        .expect("still listed");
    assert_eq!(
        after.create_revision, before.create_revision,
        "never withdrawn and re-listed"
    );
}

#[tokio::test]
async fn an_upstream_file_rendered_from_service_follows_instances_joining_and_leaving() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("upstreams.conf");
    let _lb = CoordProcess::run(&manifest(
        &endpoint(&etcd),
        10,
        &format!(
            "[[service]]\nname = \"api\"\naddress = \"10.0.0.1:80\"\nmetadata = {{ zone = \"eu\" }}\n\
             [[file]]\npath = \"{}\"\nallow_empty = true\nsource = \"\"\"\n\
             {{% for i in service('api', zone='eu') %}}server {{{{ i.addr }}}};\n{{% endfor %}}\"\"\"\n",
            out.display()
        ),
    ));
    file_is(&out, "server 10.0.0.1:80;\n").await;
    let other = "[agent]\nname = \"web-02\"\nttl = \"10s\"\n[etcd]\nendpoints = [\"EP\"]\n\
                 [[service]]\nname = \"api\"\naddress = \"10.0.0.2:80\"\nmetadata = { zone = \"eu\" }\n\
                 [[service]]\nname = \"api\"\nid = \"web-02-api-us\"\naddress = \"10.9.9.9:80\"\nmetadata = { zone = \"us\" }\n"
        .replace("EP", &etcd.endpoint());
    let mut second = CoordProcess::run(&other);
    file_is(&out, "server 10.0.0.1:80;\nserver 10.0.0.2:80;\n").await;
    second.signal(Signal::SIGTERM);
    second.wait().await;
    file_is(&out, "server 10.0.0.1:80;\n").await;
    let _ = client;
}

/// Someone writing a template or a script from the manifest in front of
/// them uses its names: `address`, `weight`, `id`.
#[tokio::test]
async fn templates_and_services_json_name_an_instance_as_the_manifest_does() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("upstreams.conf");
    let _agent = CoordProcess::run(&manifest(
        &endpoint(&etcd),
        10,
        &format!(
            "[[service]]\nname = \"api\"\naddress = \"10.0.0.5:8080\"\nweight = 5\n\
             [[file]]\npath = \"{}\"\nsource = \"\"\"\n\
             {{% for i in service('api') %}}server {{{{ i.address }}}} weight={{{{ i.weight }}}}; # {{{{ i.id }}}} {{{{ i.addr }}}}\n{{% endfor %}}\"\"\"\n",
            out.display()
        ),
    ));
    file_is(
        &out,
        "server 10.0.0.5:8080 weight=5; # web-01-api 10.0.0.5:8080\n",
    )
    .await;
    let (status, json, err) = coord(
        &["services", "api", "--json", "--endpoints", &etcd.endpoint()],
        None,
    );
    assert!(status.success(), "{err}");
    let line: serde_json::Value = serde_json::from_str(json.trim()).expect("one JSON line");
    assert_eq!(line["id"], "web-01-api", "{line}");
    assert_eq!(line["address"], "10.0.0.5:8080", "{line}");
    assert_eq!(line["weight"], 5, "{line}");
    assert_eq!(
        line["addr"], "10.0.0.5:8080",
        "the old name still answers: {line}"
    );
}

#[tokio::test]
async fn a_tcp_check_follows_whether_the_port_accepts_connections() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let _agent = CoordProcess::run(&manifest(
        &endpoint(&etcd),
        10,
        &format!(
            "[[service]]\nname = \"api\"\naddress = \"127.0.0.1:{port}\"\n\
             check = {{ tcp = \"127.0.0.1:{port}\", interval = \"100ms\" }}\n"
        ),
    ));
    listed(&client, LISTED, true).await;
    drop(listener);
    listed(&client, LISTED, false).await;
    let h = health_is(&client, "critical").await;
    assert!(
        h["output"]
            .as_str()
            .is_some_and(|o| o.contains("cannot connect")),
        "{h}"
    );
}

#[tokio::test]
async fn a_huge_ttl_note_is_cut_short_and_other_services_keep_registering() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let others: String = (0..20)
        .map(|i| {
            format!(
                "[[service]]\nname = \"other{i}\"\naddress = \"127.0.0.1:{}\"\n",
                2000 + i
            )
        })
        .collect();
    let text = manifest(
        &endpoint(&etcd),
        10,
        &format!(
            "[[service]]\nname = \"api\"\naddress = \"127.0.0.1:1\"\ncheck = {{ ttl = \"1h\" }}\n{others}"
        ),
    );
    let mut agent = CoordProcess::run(&text);
    listed(&client, "/coord/services/other19/web-01-other19", true).await;

    // Through the CLI: the note is cut before it is stored (argv itself
    // caps one argument at 128 KiB).
    let ep = etcd.endpoint();
    let long = "n".repeat(100_000);
    let (status, out, err) = coord(
        &[
            "services",
            "pass",
            "web-01-api",
            "--note",
            &long,
            "--endpoints",
            &ep,
        ],
        None,
    );
    assert!(status.success(), "{out}{err}");
    let check_key = coord::registry::check_key("/coord", "api", "web-01-api");
    let stored = client.get(&check_key).await.expect("get").expect("report");
    assert!(
        stored.value.len() < 2048,
        "`coord services pass` stored a {}-byte report",
        stored.value.len()
    );

    // Straight into etcd, as any client may: 1.4 MB of note.
    let report = serde_json::json!({ "status": "warning", "output": "x".repeat(1_400_000) });
    client
        .put(&check_key, serde_json::to_vec(&report).expect("JSON"), None)
        .await
        .expect("put the report");
    let h = health_is(&client, "warning").await;
    let output = h["output"].as_str().expect("output");
    assert!(
        output.len() <= 1024 && output.ends_with("[truncated]"),
        "the note is stored cut short, with a marker, not {} bytes",
        output.len()
    );

    // A restart registers everything again, the note with the rest.
    agent.signal(Signal::SIGTERM);
    agent.wait().await;
    listed(&client, LISTED, false).await;
    let _agent = CoordProcess::run(&text);
    for i in 0..20 {
        listed(
            &client,
            &format!("/coord/services/other{i}/web-01-other{i}"),
            true,
        )
        .await;
    }
    listed(&client, LISTED, true).await;
}

/// `coord maint` names a target as `coord services pass` and `coord
/// status` do — `service/instance`, or an instance id — and a whole agent
/// with `--agent`; the old `agent/service` still works, with a note.
#[tokio::test]
async fn maint_takes_service_slash_instance_like_services_pass_and_the_old_spelling_with_a_note() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let _agent = CoordProcess::run(&manifest(
        &endpoint(&etcd),
        10,
        "[[service]]\nname = \"api\"\naddress = \"127.0.0.1:1\"\n",
    ));
    listed(&client, LISTED, true).await;
    let ep = etcd.endpoint();
    let maint = |args: &[&str]| {
        let mut all = vec!["maint"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--endpoints", &ep]);
        coord(&all, None)
    };

    let (status, out, err) = maint(&["on", "api/web-01-api", "--reason", "deploy"]);
    assert!(status.success(), "{out}{err}");
    assert_eq!(
        out.trim(),
        "api/web-01-api (service api on agent web-01): maintenance on"
    );
    assert!(!err.contains("note"), "{err}");
    listed(&client, LISTED, false).await;
    let (status, out, err) = maint(&["off", "web-01-api"]);
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("maintenance off"), "{out}");
    listed(&client, LISTED, true).await;

    let (status, out, err) = maint(&["on", "web-01/api"]);
    assert!(status.success(), "{out}{err}");
    assert!(
        err.contains(
            "note: `web-01/api` read as agent/service (the old spelling); write it as `api/web-01-api`"
        ),
        "{err}"
    );
    listed(&client, LISTED, false).await;
    maint(&["off", "api/web-01-api"]);
    listed(&client, LISTED, true).await;

    let (status, out, err) = maint(&["on", "--agent", "web-01"]);
    assert!(status.success(), "{out}{err}");
    assert_eq!(out.trim(), "agent web-01: maintenance on");
    listed(&client, LISTED, false).await;
    let (_, _, err) = maint(&["off", "web-01"]);
    assert!(
        err.contains(
            "note: `web-01` read as an agent (the old spelling); write it as `--agent web-01`"
        ),
        "{err}"
    );
    listed(&client, LISTED, true).await;

    let (status, out, err) = maint(&["on", "nope/none"]);
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("no instance `nope/none` is registered"),
        "{err}"
    );
}

/// A reload that changes only what is registered (here the weight) is a
/// diff: the instance keeps its standing and its key, rewritten in place.
/// Before, it started over as a new instance: health back to `initial`,
/// withdrawn until its check passed again.
#[tokio::test]
async fn a_reload_that_changes_only_the_weight_rewrites_the_instance_in_place_never_withdrawn() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let dir = tempfile::tempdir().expect("tmp");
    let hook_log = dir.path().join("hook.log");
    let with_weight = |w: u32| {
        manifest(
            &endpoint(&etcd),
            10,
            &format!(
                "[[hook]]\nname = \"note\"\nexec = [\"sh\", \"-c\", \"echo $COORD_OLD-$COORD_NEW >> {}\"]\n\
                 [[service]]\nname = \"api\"\naddress = \"127.0.0.1:1\"\nweight = {w}\non_change = [\"note\"]\n\
                 check = {{ exec = [\"true\"], interval = \"100ms\", successes = 2, initial = \"critical\" }}\n",
                hook_log.display()
            ),
        )
    };
    let agent = CoordProcess::run(&with_weight(1));
    listed(&client, LISTED, true).await;
    let before = client.get(LISTED).await.expect("get").expect("listed");
    std::fs::write(agent.manifest_path(), with_weight(5)).expect("rewrite");
    agent.signal(Signal::SIGHUP);
    let after = eventually("the new weight to be registered", || async {
        let kv = client.get(LISTED).await.ok()??;
        let v: serde_json::Value = serde_json::from_slice(&kv.value).ok()?;
        (v["Metadata"]["weight"] == 5).then_some(kv)
    })
    .await;
    assert_eq!(
        after.create_revision, before.create_revision,
        "the endpoint key was rewritten in place, never deleted and listed again"
    );
    // A check of the old instance that had started over would first have
    // to pass twice: the health record would have said critical meanwhile.
    let health = health_is(&client, "passing").await;
    assert_eq!(health["metadata"]["weight"], 5, "{health}");
    let log = std::fs::read_to_string(&hook_log).expect("hook log");
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        ["-critical", "critical-passing"],
        "one start, one recovery; nothing from the reload"
    );
}

/// `exec = ["./check-api.sh"]` is the script beside the manifest, as every
/// other relative path in it is — not one in whatever directory the agent
/// was started from (here the test's, where there is none).
#[tokio::test]
async fn an_exec_check_named_by_a_relative_path_runs_the_program_beside_the_manifest() {
    use std::os::unix::fs::PermissionsExt;
    let etcd = etcd().await;
    let client = etcd.client().await;
    let agent = CoordProcess::run(&manifest(
        &endpoint(&etcd),
        10,
        "[[service]]\nname = \"api\"\naddress = \"127.0.0.1:1\"\n\
         check = { exec = [\"./check-api.sh\"], interval = \"100ms\", initial = \"critical\" }\n",
    ));
    let script = agent
        .manifest_path()
        .parent()
        .expect("manifest dir")
        .join("check-api.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    assert!(
        !std::env::current_dir()
            .expect("cwd")
            .join("check-api.sh")
            .exists(),
        "the agent's working directory has no such script"
    );
    listed(&client, LISTED, true).await;
    let health = health_is(&client, "passing").await;
    assert_eq!(health["status"], "passing", "{health}");
}

/// `coord_watch_events_total` on the agent's metrics.
fn watch_events(port: u16) -> Option<u64> {
    let (_, body) = crate::status::get(port, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix("coord_watch_events_total "))?
        .trim()
        .parse()
        .ok()
}

/// Issue 21: an agent watches its own instances' keys, never the fleet's.
/// Thirty other instances register and change health (their ids and
/// agent names start with this agent's, so a prefix watch on its own keys
/// would see them too), and the agent receives no watch event for any of
/// it — yet still puts back its own keys when they are deleted by hand.
#[tokio::test]
async fn other_instances_registering_and_changing_health_wake_no_other_agent() {
    const OWN_LISTED: &str = "/coord/services/api/web-1-api";
    const OWN_HEALTH: &str = "/coord/health/api/web-1-api";
    let etcd = etcd().await;
    let client = etcd.client().await;
    let port = crate::status::free_port();
    let _agent = CoordProcess::run(&format!(
        "[agent]\nname = \"web-1\"\nttl = \"10s\"\n[etcd]\nendpoints = [\"{}\"]\n\
         [status]\nlisten = \"127.0.0.1:{port}\"\n\
         [[service]]\nname = \"api\"\naddress = \"10.0.0.1:80\"\n",
        etcd.endpoint()
    ));
    listed(&client, OWN_LISTED, true).await;
    // Its own presence key, listing and health record: three events.
    let before = eventually("the agent's own writes to reach its watches", || async {
        watch_events(port).filter(|n| *n >= 3)
    })
    .await;

    let others = coord::Coord::connect(coord::Options::from(etcd.connect_options()).name("others"))
        .await
        .expect("connect");
    let mut registrations = Vec::new();
    for i in 0..30 {
        let service =
            coord::coordinator::Service::new("api", format!("web-1-api{i}"), "10.0.1.1:80");
        registrations.push(others.registry().register(service).await.expect("register"));
        let maint = serde_json::json!({ "reason": "drill", "since": "2025-01-01T00:00:00Z" });
        for key in [
            format!("/coord/maint/web-1{i}"),
            format!("/coord/maint/web-1{i}/api"),
        ] {
            client
                .put(&key, maint.to_string().as_bytes(), None)
                .await
                .expect("maint flag");
        }
        client
            .put(&format!("/coord/agents/web-1{i}"), b"{}", None)
            .await
            .expect("presence");
    }
    for (reason, want) in [(Some("drain"), "maintenance"), (None, "passing")] {
        for r in &registrations {
            r.set_maintenance(reason);
        }
        eventually(&format!("thirty instances {want}"), || async {
            let snapshot = client.get_prefix("/coord/health/api/").await.ok()?;
            let n = snapshot
                .kvs
                .iter()
                .filter(|kv| kv.key != OWN_HEALTH)
                .filter(|kv| {
                    serde_json::from_slice::<serde_json::Value>(&kv.value)
                        .is_ok_and(|v| v["status"] == want)
                })
                .count();
            (n == 30).then_some(())
        })
        .await;
    }

    // Its own keys deleted by hand come back: the agent still hears them.
    for key in [OWN_LISTED, OWN_HEALTH] {
        client.delete(key).await.expect("delete");
        listed(&client, key, true).await;
    }
    let after = watch_events(port).expect("metrics");
    // The two deletes, and at most its own two rewrites: none of the
    // ~300 changes the others made.
    assert!(
        after - before <= 4,
        "the agent received {} watch events, {before} before the others wrote",
        after - before
    );
}
