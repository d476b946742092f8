//! The agent's presence key: on the session lease, gone at once on a clean
//! stop, back by itself after etcd trouble, untouched by losing a member.

use std::time::Duration;

use coord::etcd::{Client, KeyValue};
use nix::sys::signal::Signal;

use crate::support::{CoordProcess, cluster, etcd, eventually, manifest};

const KEY: &str = "/coord/agents/web-01";

async fn present(client: &Client) -> KeyValue {
    let c = client.clone();
    eventually("the presence key to appear", move || {
        let c = c.clone();
        async move { c.get(KEY).await.ok().flatten() }
    })
    .await
}

#[tokio::test]
async fn sigterm_revokes_the_lease_so_presence_is_gone_at_once() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    // A long TTL: only a revocation can remove the key quickly.
    let mut agent = CoordProcess::run(&manifest("web-01", &[etcd.endpoint()], 60));
    let kv = present(&client).await;
    assert!(
        kv.lease.is_some(),
        "presence must hang off the session lease"
    );
    let record: serde_json::Value = serde_json::from_slice(&kv.value).expect("JSON record");
    assert_eq!(record["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(record["manifest_hash"].as_str().map(str::len), Some(64));

    let signalled = std::time::Instant::now();
    agent.signal(Signal::SIGTERM);
    let status = agent.wait().await;
    let exited = signalled.elapsed();
    assert!(status.success(), "clean stop should exit 0: {status}");
    assert_eq!(
        client.get(KEY).await.expect("etcd answers"),
        None,
        "presence still there after exit: the lease was not revoked"
    );
    eprintln!("SIGTERM -> agent exited, presence gone: {exited:?}");
}

#[tokio::test]
async fn a_second_signal_exits_at_once_even_when_etcd_is_unreachable() {
    let mut etcd = etcd().await;
    let mut agent = CoordProcess::run(&manifest("web-01", &[etcd.endpoint()], 30));
    present(&etcd.client().await).await;
    etcd.member().pause();
    agent.signal(Signal::SIGTERM);
    // The first signal is now trying to revoke the lease against a hung etcd.
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.signal(Signal::SIGTERM);
    let status = agent.wait().await;
    etcd.member().resume();
    assert_eq!(status.code(), Some(130), "{status}");
}

#[tokio::test]
async fn presence_and_session_survive_killing_any_one_member_of_three() {
    let mut cluster = cluster().await;
    // Killing the leader costs an election (about 1-2 s with etcd's
    // defaults) on top of up to TTL/3 since the last renewal: 5 s leaves room.
    let ttl = 5;
    let mut agent = CoordProcess::run(&manifest("web-01", &cluster.endpoints(), ttl));
    let client = cluster.client().await;
    let before = present(&client).await;
    for i in 0..cluster.len() {
        cluster.member(i).kill();
        // Longer than two TTLs: a lease not kept alive would be gone.
        tokio::time::sleep(Duration::from_secs(2 * ttl + 1)).await;
        let now = client
            .get(KEY)
            .await
            .expect("the two remaining members answer")
            .unwrap_or_else(|| panic!("presence lost after killing member {i}"));
        assert_eq!(
            (now.create_revision, now.lease),
            (before.create_revision, before.lease),
            "presence was re-created after killing member {i}: the session was lost"
        );
        assert!(
            agent.is_running(),
            "the agent died after killing member {i}"
        );
        cluster.member(i).restart().expect("restart member");
        cluster
            .member(i)
            .wait_healthy()
            .await
            .expect("member healthy again");
    }
    assert!(
        !agent.log().contains("Session lease lost"),
        "the session was lost:\n{}",
        agent.log()
    );
}

#[tokio::test]
async fn presence_returns_after_etcd_is_down_longer_than_the_ttl() {
    let mut etcd = etcd().await;
    let _agent = CoordProcess::run(&manifest("web-01", &[etcd.endpoint()], 2));
    let client = etcd.client().await;
    let before = present(&client).await;
    etcd.member().kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    etcd.member().restart().expect("restart etcd");
    etcd.member().wait_healthy().await.expect("etcd healthy");
    let c = client.clone();
    let after = eventually("presence on a new lease", move || {
        let c = c.clone();
        let old = before.lease;
        async move { c.get(KEY).await.ok().flatten().filter(|kv| kv.lease != old) }
    })
    .await;
    assert!(after.lease.is_some());
}

#[tokio::test]
async fn presence_returns_after_etcd_comes_back_with_no_data_at_all() {
    let mut etcd = etcd().await;
    let _agent = CoordProcess::run(&manifest("web-01", &[etcd.endpoint()], 2));
    present(&etcd.client().await).await;
    etcd.member().wipe_data().expect("wipe");
    etcd.member().restart().expect("restart etcd");
    etcd.member().wait_healthy().await.expect("etcd healthy");
    // A fresh cluster knows neither the key nor the lease.
    present(&etcd.client().await).await;
}

#[tokio::test]
async fn renaming_the_agent_in_the_manifest_moves_its_presence() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let mut agent = CoordProcess::run(&manifest("web-01", &[etcd.endpoint()], 30));
    present(&client).await;
    std::fs::write(
        agent.manifest_path(),
        manifest("web-02", &[etcd.endpoint()], 30),
    )
    .expect("rewrite manifest");
    let c = client.clone();
    eventually("web-02 present and web-01 gone", move || {
        let c = c.clone();
        async move {
            let new = c.get("/coord/agents/web-02").await.ok()??;
            let old = c.get(KEY).await.ok()?;
            (old.is_none()).then_some(new)
        }
    })
    .await;
    assert!(agent.is_running());
}

#[tokio::test]
async fn a_bad_manifest_on_reload_is_reported_and_the_last_good_one_keeps_running() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let mut agent = CoordProcess::run(&manifest("web-01", &[etcd.endpoint()], 30));
    let before = present(&client).await;
    std::fs::write(agent.manifest_path(), "[agent]\nname = 5\n").expect("break manifest");
    agent.signal(Signal::SIGHUP);
    let log = eventually("the reload to be rejected", || async {
        let log = agent.log();
        log.contains("Manifest reload rejected").then_some(log)
    })
    .await;
    assert!(
        log.contains("agent.toml:2:8"),
        "the error is located:\n{log}"
    );
    assert!(agent.is_running());
    let now = client.get(KEY).await.expect("etcd").expect("still present");
    assert_eq!(now.create_revision, before.create_revision);
}

#[tokio::test]
async fn sighup_applies_a_changed_manifest_without_a_new_session() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let text = manifest("web-01", &[etcd.endpoint()], 30);
    let agent = CoordProcess::run(&text);
    let before = present(&client).await;
    // A comment changes the manifest hash but nothing that needs a new session.
    std::fs::write(agent.manifest_path(), format!("# edited\n{text}")).expect("edit");
    agent.signal(Signal::SIGHUP);
    let c = client.clone();
    let old_hash = before.value.clone();
    let after = eventually("the new manifest hash in the presence record", move || {
        let c = c.clone();
        let old = old_hash.clone();
        async move { c.get(KEY).await.ok().flatten().filter(|kv| kv.value != old) }
    })
    .await;
    assert_eq!(
        after.lease, before.lease,
        "the diff must not restart the session"
    );
}

#[tokio::test]
async fn a_second_agent_with_the_same_name_never_takes_the_key_from_the_first() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let mut first = CoordProcess::run(&manifest("web-01", &[etcd.endpoint()], 30));
    let held = present(&client).await;
    let second = CoordProcess::run(&manifest("web-01", &[etcd.endpoint()], 30));
    eventually("the second agent to report the name clash", || {
        let clashed = second
            .log()
            .contains("Another agent already uses this name");
        async move { clashed.then_some(()) }
    })
    .await;
    let now = client.get(KEY).await.expect("etcd").expect("present");
    assert_eq!(
        (now.lease, now.mod_revision),
        (held.lease, held.mod_revision)
    );
    // When the first goes, the second takes over by itself.
    first.signal(Signal::SIGTERM);
    first.wait().await;
    let c = client.clone();
    eventually("the second agent to take the name", move || {
        let c = c.clone();
        async move {
            c.get(KEY)
                .await
                .ok()
                .flatten()
                .filter(|kv| kv.lease != held.lease)
        }
    })
    .await;
}
