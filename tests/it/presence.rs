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

#[tokio::test]
async fn a_second_agent_with_the_same_name_holds_nothing_until_the_first_stops() {
    const LISTED: &str = "/coord/services/api/web-01-api";
    let etcd = etcd().await;
    let client = etcd.client().await;
    let with_service = |address: &str| {
        format!(
            "{}\n[[service]]\nname = \"api\"\naddress = \"{address}\"\n",
            manifest("web-01", &[etcd.endpoint()], 30)
        )
    };
    let listed_at = |address: &'static str| {
        let c = client.clone();
        eventually("the service listed at the agent's address", move || {
            let c = c.clone();
            async move {
                c.get(LISTED)
                    .await
                    .ok()
                    .flatten()
                    .filter(|kv| kv.value_str().contains(address))
            }
        })
    };
    let mut first = CoordProcess::run(&with_service("10.0.0.1:80"));
    listed_at("10.0.0.1:80").await;
    let second = CoordProcess::run(&with_service("10.0.0.2:80"));
    eventually("the second agent to report the name clash", || {
        let clashed = second
            .log()
            .contains("Another agent already uses this name");
        async move { clashed.then_some(()) }
    })
    .await;
    let before = client.get_prefix("/coord/").await.expect("etcd");
    // Long enough for two agents that fight over the key to rewrite it
    // thousands of times; what is compared is revisions, not time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = client.get_prefix("/coord/").await.expect("etcd");
    let listed = after
        .kvs
        .iter()
        .find(|kv| kv.key == LISTED)
        .expect("the service stays listed");
    assert!(
        listed.value_str().contains("10.0.0.1:80"),
        "the first agent's address must stay the one listed: {}",
        listed.value_str()
    );
    assert_eq!(
        after.revision, before.revision,
        "nothing may be written while the second agent lacks its name; keys now: {:#?}",
        after.kvs
    );
    let second_log = second.log();
    assert_eq!(
        second_log
            .matches("Another agent already uses this name")
            .count(),
        1,
        "the clash is told once:\n{second_log}"
    );
    assert!(
        second_log.contains("holder_pid"),
        "the other holder is named:\n{second_log}"
    );

    // When the first goes, the second takes the name and registers.
    first.signal(Signal::SIGTERM);
    first.wait().await;
    listed_at("10.0.0.2:80").await;
}

#[tokio::test]
async fn an_agent_whose_name_is_taken_while_it_held_it_gives_up_its_lease_and_holds_nothing() {
    const LISTED: &str = "/coord/services/api/web-01-api";
    let etcd = etcd().await;
    let client = etcd.client().await;
    let with_service = |address: &str| {
        format!(
            "{}\n[[service]]\nname = \"api\"\naddress = \"{address}\"\n\n\
             [[instance_id]]\npool = \"worker\"\nsize = 1\n",
            manifest("web-01", &[etcd.endpoint()], 10)
        )
    };
    let first = CoordProcess::run(&with_service("10.0.0.1:80"));
    let held = present(&client).await;
    let second = CoordProcess::run(&with_service("10.0.0.2:80"));
    eventually("the second agent to report the name clash", || {
        let clashed = second
            .log()
            .contains("Another agent already uses this name");
        async move { clashed.then_some(()) }
    })
    .await;
    // The first agent cannot answer while an operator deletes its presence
    // key by hand: the second one writes it first.
    first.signal(Signal::SIGSTOP);
    client.delete(KEY).await.expect("etcd");
    let c = client.clone();
    let taken = eventually("the second agent to take the name", move || {
        let c = c.clone();
        async move {
            c.get(KEY)
                .await
                .ok()
                .flatten()
                .filter(|kv| kv.lease.is_some() && kv.lease != held.lease)
        }
    })
    .await;
    first.signal(Signal::SIGCONT);
    eventually("the first agent to give up its lease", || {
        let gave_up = first.log().contains("giving up the session lease");
        async move { gave_up.then_some(()) }
    })
    .await;
    let c = client.clone();
    eventually("the second agent's address listed", move || {
        let c = c.clone();
        async move {
            c.get(LISTED)
                .await
                .ok()
                .flatten()
                .filter(|kv| kv.value_str().contains("10.0.0.2:80"))
        }
    })
    .await;
    // The only id of the pool was the first agent's; the lease it was on
    // is given up, so it expires (10 s TTL) and the id moves.
    let c = client.clone();
    eventually(
        "the pool's one id claimed by the name's holder",
        move || {
            let c = c.clone();
            async move {
                c.get("/coord/ids/worker/0")
                    .await
                    .ok()
                    .flatten()
                    .filter(|kv| kv.lease == taken.lease)
            }
        },
    )
    .await;
    // After that, nothing is rewritten: the two no longer fight.
    let c = client.clone();
    eventually("the first agent's old lease to expire", move || {
        let c = c.clone();
        async move {
            let kvs = c.get_prefix("/coord/").await.ok()?.kvs;
            kvs.iter().all(|kv| kv.lease != held.lease).then_some(())
        }
    })
    .await;
    let before = client.get_prefix("/coord/").await.expect("etcd");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = client.get_prefix("/coord/").await.expect("etcd");
    assert_eq!(
        after.revision, before.revision,
        "nothing may be written once the name moved; keys now: {:#?}",
        after.kvs
    );
    let listed = after
        .kvs
        .iter()
        .find(|kv| kv.key == LISTED)
        .expect("listed");
    assert!(listed.value_str().contains("10.0.0.2:80"));
}
