//! Instance ids against real etcd.

use std::collections::BTreeSet;
use std::time::Duration;

use coord::etcd::Session;
use coord::ids::{self, ClaimRecord, IdError};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::{coord, etcd, eventually};

fn me(name: &str) -> ClaimRecord {
    ClaimRecord {
        agent: name.into(),
        claimed_at: "2026-01-01T00:00:00Z".into(),
    }
}

#[tokio::test]
async fn claimers_racing_for_a_full_pool_get_distinct_ids_and_one_more_waits_for_a_release() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let mut tasks = Vec::new();
    for i in 0..256 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let session = Session::start(client.clone(), Duration::from_secs(30));
            let lease = session.wait_alive().await;
            let claim = ids::claim(
                &client,
                "/coord",
                "worker",
                256,
                lease,
                None,
                &me(&format!("c{i}")),
            )
            .await
            .expect("a free id");
            (session, claim)
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        held.push(t.await.expect("claimer"));
    }
    let distinct: BTreeSet<u32> = held.iter().map(|(_, c)| c.id).collect();
    assert_eq!(distinct.len(), 256, "every claimer got its own id");
    assert_eq!(distinct.iter().max(), Some(&255));
    // The pool is full: a 257th fails at once, or waits when asked.
    let extra = Session::start(client.clone(), Duration::from_secs(30));
    let lease = extra.wait_alive().await;
    let full = ids::claim(&client, "/coord", "worker", 256, lease, None, &me("late")).await;
    assert!(
        matches!(full, Err(IdError::Exhausted { size: 256, .. })),
        "{full:?}"
    );
    let waiter = {
        let client = client.clone();
        tokio::spawn(async move {
            ids::claim_waiting(&client, "/coord", "worker", 256, lease, None, &me("late")).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "no id is free yet");
    let (session, freed) = held.remove(100);
    session.close().await;
    let got = waiter.await.expect("join").expect("the freed id");
    assert_eq!(got.id, freed.id);
    assert!(got.generation > freed.generation);
}

#[tokio::test]
async fn a_claimer_that_comes_back_gets_its_old_id_if_it_is_still_free() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let first = Session::start(client.clone(), Duration::from_secs(10));
    let lease = first.wait_alive().await;
    let before = ids::claim(&client, "/coord", "shard", 1024, lease, None, &me("a"))
        .await
        .expect("claim");
    first.close().await;
    let again = Session::start(client.clone(), Duration::from_secs(10));
    let lease = again.wait_alive().await;
    let after = ids::claim(
        &client,
        "/coord",
        "shard",
        1024,
        lease,
        Some(before.id),
        &me("a"),
    )
    .await
    .expect("claim");
    assert_eq!(after.id, before.id);
    assert!(
        after.round_trips <= 3,
        "one read, one create, one re-read: {}",
        after.round_trips
    );
}

#[tokio::test]
async fn coord_ids_claim_runs_with_an_id_and_kill_9_frees_it_after_the_ttl() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("id");
    let mut holder = std::process::Command::new(env!("CARGO_BIN_EXE_coord"))
        .args([
            "ids",
            "claim",
            "pool",
            "--size",
            "4",
            "--ttl",
            "2s",
            "--endpoints",
            &etcd.endpoint(),
            "--",
            "sh",
            "-c",
        ])
        .arg(format!(
            "echo $COORD_INSTANCE_ID > {}; exec sleep 1000",
            out.display()
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("coord ids claim");
    let id = eventually("the command to get its id", || async {
        std::fs::read_to_string(&out).ok().filter(|s| !s.is_empty())
    })
    .await;
    let key = format!("/coord/ids/pool/{}", id.trim());
    assert!(client.get(&key).await.expect("etcd").is_some());
    let (status, listed, _) = coord(&["ids", "pool", "--endpoints", &etcd.endpoint()], None);
    assert!(status.success());
    assert!(listed.contains("coord-ids@"), "{listed}");
    kill(Pid::from_raw(holder.id() as i32), Signal::SIGKILL).expect("kill -9");
    let _ = holder.wait();
    eventually("the id to be freed after the TTL", || async {
        client.get(&key).await.ok()?.is_none().then_some(())
    })
    .await;
}

fn agent_manifest(
    etcd: &crate::support::LocalEtcd,
    dir: &std::path::Path,
    with_id: bool,
) -> String {
    let mut m = format!(
        "[agent]\nname = \"web-01\"\nttl = \"3s\"\nstate_dir = \"{}\"\n[etcd]\nendpoints = [\"{}\"]\n",
        dir.join("state").display(),
        etcd.endpoint()
    );
    if with_id {
        m.push_str(&format!(
            "[[hook]]\nname = \"note\"\nexec = [\"sh\", \"-c\", \"echo $COORD_EVENT $COORD_ID $COORD_INSTANCE_ID_WORKER >> {}\"]\n\
             [[instance_id]]\npool = \"worker\"\nsize = 1024\nfile = \"{}\"\non_change = [\"note\"]\n\
             [[file]]\npath = \"{}\"\nsource = \"id={{{{ instance_id('worker') }}}}\"\n",
            dir.join("hooks.log").display(),
            dir.join("worker-id").display(),
            dir.join("rendered").display()
        ));
    }
    m
}

#[tokio::test]
async fn an_agent_writes_its_id_to_a_file_and_gets_the_same_one_after_a_restart() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("worker-id");
    let mut agent = crate::support::CoordProcess::run(&agent_manifest(&etcd, dir.path(), true));
    let first = eventually("the id file", || async {
        std::fs::read_to_string(&file)
            .ok()
            .filter(|s| s.ends_with('\n'))
    })
    .await;
    eventually("the claimed hook", || async {
        std::fs::read_to_string(dir.path().join("hooks.log"))
            .ok()
            // The event names the id, and shell hooks see the agent's ids too.
            .filter(|l| l.contains(&format!("instance-id-claimed {0} {0}", first.trim())))
    })
    .await;
    let rendered = dir.path().join("rendered");
    eventually("instance_id() in a template", || async {
        (std::fs::read_to_string(&rendered).ok()? == format!("id={}", first.trim())).then_some(())
    })
    .await;
    agent.signal(Signal::SIGTERM);
    agent.wait().await;
    assert!(!file.exists(), "a released id's file is removed");
    let _again = crate::support::CoordProcess::run(&agent_manifest(&etcd, dir.path(), true));
    let second = eventually("the id file again", || async {
        std::fs::read_to_string(&file).ok()
    })
    .await;
    assert_eq!(
        second, first,
        "the remembered id is claimed again (1 in 1024 by chance)"
    );
}

#[tokio::test]
async fn removing_an_instance_id_from_the_manifest_releases_it_on_reload() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("worker-id");
    let agent = crate::support::CoordProcess::run(&agent_manifest(&etcd, dir.path(), true));
    let id = eventually("the id file", || async {
        std::fs::read_to_string(&file)
            .ok()
            .filter(|s| s.ends_with('\n'))
    })
    .await;
    let key = format!("/coord/ids/worker/{}", id.trim());
    assert!(client.get(&key).await.expect("etcd").is_some());
    std::fs::write(
        agent.manifest_path(),
        agent_manifest(&etcd, dir.path(), false),
    )
    .expect("rewrite");
    agent.signal(Signal::SIGHUP);
    eventually("the claim to be released", || async {
        client.get(&key).await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(!file.exists());
}

#[tokio::test]
async fn a_lost_claim_removes_the_file_fires_the_hook_and_is_made_again_when_etcd_returns() {
    let mut etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("worker-id");
    let _agent = crate::support::CoordProcess::run(&agent_manifest(&etcd, dir.path(), true));
    let id = eventually("the id file", || async {
        std::fs::read_to_string(&file)
            .ok()
            .filter(|s| s.ends_with('\n'))
    })
    .await;
    etcd.member().kill();
    eventually("the file to go with the lease", || async {
        (!file.exists()).then_some(())
    })
    .await;
    etcd.member().restart().expect("restart");
    let again = eventually("the id back", || async {
        std::fs::read_to_string(&file)
            .ok()
            .filter(|s| s.ends_with('\n'))
    })
    .await;
    assert_eq!(again, id, "the same id, since it is free again");
    let hooks = std::fs::read_to_string(dir.path().join("hooks.log")).unwrap_or_default();
    assert!(
        hooks.contains(&format!("instance-id-lost {}", id.trim())),
        "{hooks}"
    );
}

#[tokio::test]
async fn an_id_file_whose_directory_is_missing_is_written_once_the_directory_appears() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let later = dir.path().join("later");
    let file = later.join("worker-id");
    let manifest = format!(
        "[agent]\nname = \"web-01\"\nttl = \"3s\"\nstate_dir = \"{}\"\n[etcd]\nendpoints = [\"{}\"]\n\
         [[hook]]\nname = \"note\"\nexec = [\"sh\", \"-c\", \"echo $COORD_EVENT $COORD_ID >> {}\"]\n\
         [[instance_id]]\npool = \"worker\"\nsize = 1024\nfile = \"{}\"\non_change = [\"note\"]\n",
        dir.path().join("state").display(),
        etcd.endpoint(),
        dir.path().join("hooks.log").display(),
        file.display()
    );
    let agent = crate::support::CoordProcess::run(&manifest);
    let (status, _, err) = coord(
        &["check", agent.manifest_path().to_str().expect("utf-8")],
        None,
    );
    assert!(status.success(), "a missing directory is no error: {err}");
    assert!(
        err.contains("warning")
            && err.contains(&format!("{} (of `file`) does not exist", later.display())),
        "`coord check` warns of the missing directory: {err}"
    );
    eventually("the agent to say it cannot write the id file", || {
        let said = agent.log().contains("Cannot write the id file");
        async move { said.then_some(()) }
    })
    .await;
    std::fs::create_dir(&later).expect("create the directory");
    let id = eventually("the id file", || async {
        std::fs::read_to_string(&file)
            .ok()
            .filter(|s| s.ends_with('\n'))
    })
    .await;
    let key = format!("/coord/ids/worker/{}", id.trim());
    let client = etcd.client().await;
    assert!(client.get(&key).await.expect("etcd").is_some());
    // The claimed hook, which may read the file, ran once it was there.
    let hooks = eventually("the claimed hook", || async {
        std::fs::read_to_string(dir.path().join("hooks.log"))
            .ok()
            .filter(|h| h.contains("instance-id-claimed"))
    })
    .await;
    assert_eq!(hooks, format!("instance-id-claimed {}", id), "{hooks}");
    let log = agent.log();
    assert_eq!(
        log.matches("Cannot write the id file").count(),
        1,
        "the failure is said once:\n{log}"
    );
    let (_, _, err) = coord(
        &["check", agent.manifest_path().to_str().expect("utf-8")],
        None,
    );
    assert!(!err.contains("warning"), "{err}");
}

#[tokio::test]
async fn a_pool_keeps_the_size_of_its_first_claim_and_refuses_another() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let session = Session::start(client.clone(), Duration::from_secs(10));
    let lease = session.wait_alive().await;
    ids::claim(&client, "/coord", "worker", 4, lease, None, &me("a"))
        .await
        .expect("the first claim sets the size");
    let stored = client
        .get(&ids::size_key("/coord", "worker"))
        .await
        .expect("read")
        .expect("the size is stored");
    assert_eq!(String::from_utf8_lossy(&stored.value), r#"{"size":4}"#);
    match ids::claim(&client, "/coord", "worker", 1024, lease, None, &me("b")).await {
        Err(IdError::SizeMismatch { asked, stored, .. }) => {
            assert_eq!((asked, stored), (1024, 4));
        }
        other => panic!("want a size mismatch, got {other:?}"),
    }
    // The same size is fine, and the size key is no claim.
    let c = ids::claim(&client, "/coord", "worker", 4, lease, None, &me("c"))
        .await
        .expect("same size");
    assert!(c.id < 4);
    assert_eq!(
        ids::list(&client, "/coord", "worker")
            .await
            .expect("list")
            .len(),
        2
    );
}

/// `kill -9` leaves the id file behind. Once the dead agent's lease is
/// gone and another claimer holds that id, the agent started again (the
/// pool full, so it waits) must not go on naming the id in its file: two
/// hosts' programs would use one id.
#[tokio::test]
async fn an_agent_started_after_kill_9_removes_the_id_file_it_left_before_claiming() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("worker-id");
    let manifest = format!(
        "[agent]\nname = \"web-01\"\nttl = \"2s\"\nstate_dir = \"{}\"\n[etcd]\nendpoints = [\"{}\"]\n\
         [[instance_id]]\npool = \"solo\"\nsize = 1\nfile = \"{}\"\n",
        dir.path().join("state").display(),
        etcd.endpoint(),
        file.display()
    );
    let mut first = crate::support::CoordProcess::run(&manifest);
    eventually("the id file", || async {
        (std::fs::read_to_string(&file).ok()? == "0\n").then_some(())
    })
    .await;
    first.signal(Signal::SIGKILL);
    first.wait().await;
    assert!(file.exists(), "kill -9 leaves the file behind");
    eventually("the id freed with the dead agent's lease", || async {
        client
            .get("/coord/ids/solo/0")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let other = Session::start(client.clone(), Duration::from_secs(30));
    let lease = other.wait_alive().await;
    let held = ids::claim(&client, "/coord", "solo", 1, lease, None, &me("web-02"))
        .await
        .expect("the freed id");
    assert_eq!(held.id, 0);
    let again = crate::support::CoordProcess::run(&manifest);
    crate::support::log_says(&again, "No free id").await;
    assert_eq!(
        std::fs::read_to_string(&file).ok(),
        None,
        "the file names id 0, which web-02 holds"
    );
}
