//! Rendered files from an etcd shared with everything else a real cluster
//! holds: far more data than one gRPC message, an etcd user allowed to read
//! only what the templates read, other clients writing all the time. The
//! agent reads and watches only what its templates read.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use coord::agent::files::FilesController;
use coord::agent::hooks::HookRunner;
use coord::agent::manifest::Manifest;
use coord::etcd::{Client, ConnectOptions, Password};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::support::{CoordProcess, LocalEtcd, etcd, eventually, file_is, run_tool};

fn manifest(etcd: &LocalEtcd, state: &Path, etcd_extra: &str, rest: &str) -> String {
    format!(
        "[agent]\nname = \"shared\"\nttl = \"5s\"\nstate_dir = \"{}\"\n[etcd]\nendpoints = [\"{}\"]\nrequest_timeout = \"3s\"\n{etcd_extra}\n{rest}",
        state.display(),
        etcd.endpoint()
    )
}

/// Invariant: data a file does not read never stops it rendering, however
/// much of it there is (reads are paged and pinned to one revision).
#[tokio::test]
async fn a_file_renders_and_follows_changes_beside_64_mb_of_unrelated_data() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    // 64 MiB elsewhere in the keyspace: 48 values of 1 MiB, and 16 MiB in
    // 16,384 small keys (a page boundary's worth of work for a reader).
    let big = vec![b'x'; 1 << 20];
    for i in 0..48 {
        client
            .put(&format!("/other/big/{i:03}"), big.clone(), None)
            .await
            .expect("put 1 MiB");
    }
    let small = vec![b'y'; 1024];
    let ops: Vec<coord::etcd::Op> = (0..16_384)
        .map(|i| coord::etcd::Op::Put {
            key: format!("/other/small/{i:05}"),
            value: small.clone(),
            lease: None,
        })
        .collect();
    client.apply(&ops).await.expect("16 MiB of small keys");
    client.put("/app/db", "pg://one", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("app.conf");
    let agent = CoordProcess::run(&manifest(
        &etcd,
        &dir.path().join("state"),
        "",
        &format!(
            "[[file]]\npath = \"{}\"\nsource = \"db = {{{{ key('/app/db') }}}}\"\n",
            out.display()
        ),
    ));
    file_is(&out, "db = pg://one").await;
    client.put("/app/db", "pg://two", None).await.expect("put");
    file_is(&out, "db = pg://two").await;
    // A prefix of more than one page and more than one gRPC message (six
    // values of 1 MiB past the 4 MiB default) renders whole too.
    for i in 0..6 {
        client
            .put(&format!("/app/blobs/{i}"), big.clone(), None)
            .await
            .expect("put");
    }
    let sizes = dir.path().join("sizes");
    drop(agent);
    let _agent = CoordProcess::run(&manifest(
        &etcd,
        &dir.path().join("state"),
        "",
        &format!(
            "[[file]]\npath = \"{}\"\nsource = \"{{% for k, v in keys('/app/blobs/')|items %}}{{{{ k }}}}={{{{ v|length }}}} {{% endfor %}}\"\n",
            sizes.display()
        ),
    ));
    let want: String = (0..6).map(|i| format!("{i}=1048576 ")).collect();
    file_is(&sizes, &want).await;
}

/// Sets up etcd auth: `root`, and `agent` whose role may read `/app/` and
/// read and write `/coord/` — nothing else. Returns a client logged in as
/// root (auth is on: the anonymous one can do nothing any more).
async fn least_privilege(etcd: &LocalEtcd) -> Client {
    let endpoint = etcd.endpoint();
    let ctl = |args: &[&str]| {
        let mut all = vec!["--endpoints", endpoint.as_str()];
        all.extend_from_slice(args);
        let out = run_tool(
            "etcdctl",
            &all,
            "install it with `bash deploy/install-deps.sh --tests` (Debian package etcd-client)",
        );
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ctl(&["user", "add", "root:rootpw", "--interactive=false"]);
    ctl(&["user", "grant-role", "root", "root"]);
    ctl(&["role", "add", "agent"]);
    ctl(&[
        "role",
        "grant-permission",
        "agent",
        "--prefix=true",
        "read",
        "/app/",
    ]);
    ctl(&[
        "role",
        "grant-permission",
        "agent",
        "--prefix=true",
        "readwrite",
        "/coord/",
    ]);
    ctl(&["user", "add", "agent:agentpw", "--interactive=false"]);
    ctl(&["user", "grant-role", "agent", "agent"]);
    ctl(&["auth", "enable"]);
    let mut opts: ConnectOptions = etcd.connect_options();
    opts.username = Some("root".into());
    opts.password = Some(Password::new("rootpw"));
    Client::connect(&opts).await.expect("root client")
}

/// Invariant: an etcd user that may read only what the templates read
/// renders them; a template reading outside fails alone, naming the key.
#[tokio::test]
async fn an_agent_allowed_to_read_only_its_prefixes_renders_and_a_forbidden_read_fails_that_file_alone()
 {
    let etcd = etcd().await;
    let root = least_privilege(&etcd).await;
    root.put("/app/db", "pg://one", None).await.expect("put");
    root.put("/secret/token", "hunter2", None)
        .await
        .expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let password = dir.path().join("password");
    std::fs::write(&password, "agentpw").expect("password file");
    let allowed = dir.path().join("allowed");
    let forbidden = dir.path().join("forbidden");
    let agent = CoordProcess::run(&manifest(
        &etcd,
        &dir.path().join("state"),
        &format!(
            "username = \"agent\"\npassword_file = \"{}\"\n",
            password.display()
        ),
        &format!(
            "[[file]]\npath = \"{}\"\nsource = \"db = {{{{ key('/app/db') }}}}\"\n\
             [[file]]\npath = \"{}\"\nsource = \"token = {{{{ key('/secret/token') }}}}\"\n",
            allowed.display(),
            forbidden.display()
        ),
    ));
    file_is(&allowed, "db = pg://one").await;
    root.put("/app/db", "pg://two", None).await.expect("put");
    file_is(&allowed, "db = pg://two").await;
    let log = eventually("the forbidden file's error", || {
        let log = agent.log();
        async move { log.contains("/secret/token").then_some(log) }
    })
    .await;
    let line = log
        .lines()
        .find(|l| l.contains("/secret/token") && l.contains("Render failed"))
        .unwrap_or_else(|| panic!("no render error naming the key in:\n{log}"));
    assert!(
        line.contains(&forbidden.display().to_string()) && line.contains("permission denied"),
        "the error names the file, the key and the permission: {line}"
    );
    assert!(
        !forbidden.exists(),
        "nothing is written for the forbidden file"
    );
}

/// Invariant: a render reads every key at one revision, so a transaction
/// writing two prefixes a template reads never shows half applied.
#[tokio::test]
async fn a_transaction_across_two_prefixes_never_shows_in_a_file_half_applied() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let put = |i: u32| {
        ["/left/", "/right/"]
            .into_iter()
            .map(move |p| coord::etcd::Op::Put {
                key: format!("{p}v"),
                value: i.to_string().into_bytes(),
                lease: None,
            })
            .collect::<Vec<_>>()
    };
    client.apply(&put(0)).await.expect("txn");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("pair");
    let _agent = CoordProcess::run(&manifest(
        &etcd,
        &dir.path().join("state"),
        "",
        &format!(
            "[[file]]\npath = \"{}\"\nsource = \"{{{{ keys('/left/')['v'] }}}} {{{{ keys('/right/')['v'] }}}}\"\n\
             debounce = {{ min = \"0s\", max = \"0s\" }}\n",
            out.display()
        ),
    ));
    file_is(&out, "0 0").await;
    let rounds = 500;
    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            for i in 1..=rounds {
                client.apply(&put(i)).await.expect("txn");
            }
        })
    };
    let mut seen = 0;
    let mut last = String::new();
    while !writer.is_finished() {
        if let Ok(text) = std::fs::read_to_string(&out)
            && text != last
        {
            let (l, r) = text.split_once(' ').expect("two values");
            assert_eq!(l, r, "the file mixes two states of etcd: {text:?}");
            seen += 1;
            last = text;
        }
        tokio::task::yield_now().await;
    }
    writer.await.expect("writer");
    file_is(&out, &format!("{rounds} {rounds}")).await;
    assert!(
        seen > 1,
        "the file followed the writes ({seen} states seen)"
    );
}

/// A key naming another key: the render discovers the second read and
/// follows the pointer when it moves.
#[tokio::test]
async fn a_pointer_template_follows_a_change_of_the_pointer() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client
        .put("/app/ptr", "/app/blue", None)
        .await
        .expect("put");
    client.put("/app/blue", "blue-1", None).await.expect("put");
    client
        .put("/app/green", "green-1", None)
        .await
        .expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("live");
    let _agent = CoordProcess::run(&manifest(
        &etcd,
        &dir.path().join("state"),
        "",
        &format!(
            "[[file]]\npath = \"{}\"\nsource = \"{{{{ key(key('/app/ptr')) }}}}\"\n",
            out.display()
        ),
    ));
    file_is(&out, "blue-1").await;
    client.put("/app/blue", "blue-2", None).await.expect("put");
    file_is(&out, "blue-2").await;
    client
        .put("/app/ptr", "/app/green", None)
        .await
        .expect("put");
    file_is(&out, "green-1").await;
    client
        .put("/app/green", "green-2", None)
        .await
        .expect("put");
    file_is(&out, "green-2").await;
}

/// Invariant: writes the files do not read cause no render at all.
#[tokio::test]
async fn writes_elsewhere_in_etcd_never_render_a_file() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/v", "1", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("v");
    let text = manifest(
        &etcd,
        &dir.path().join("state"),
        "",
        &format!(
            "[[file]]\npath = \"{}\"\nsource = \"{{{{ key('/app/v') }}}} {{{{ keys('/app/list/')|length }}}}\"\n",
            out.display()
        ),
    );
    let m = Manifest::parse(&dir.path().join("agent.toml"), &text).expect("manifest");
    let controller = FilesController::new("/coord");
    let stats = controller.stats();
    let (_specs_tx, specs) = watch::channel(m.files.clone());
    let (_hooks_tx, hooks) =
        watch::channel(Arc::new(HookRunner::new("files", &[]).expect("hooks")));
    let cancel = CancellationToken::new();
    let task = tokio::spawn(controller.run(client.clone(), specs, hooks, cancel.clone()));
    file_is(&out, "1 0").await;
    let before = stats.borrow().total_renders();
    let ops: Vec<coord::etcd::Op> = (0..2_000)
        .map(|i| coord::etcd::Op::Put {
            key: format!("/app/listed/{i}"),
            value: b"unrelated: beside /app/list/, not under it".to_vec(),
            lease: None,
        })
        .collect();
    client.apply(&ops).await.expect("unrelated writes");
    for i in 0..200 {
        client
            .put(&format!("/elsewhere/{i}"), "x", None)
            .await
            .expect("put");
    }
    // A write the file does read, after all of those: once it shows, every
    // earlier event has been seen.
    client.put("/app/list/a", "1", None).await.expect("put");
    file_is(&out, "1 1").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        stats.borrow().total_renders(),
        before + 1,
        "only the write the file reads rendered it"
    );
    cancel.cancel();
    task.await.expect("controller stops");
}
