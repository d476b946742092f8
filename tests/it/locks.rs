//! Locks against real etcd: exclusion (also with `etcdctl lock`),
//! semaphores, read/write, fencing, and commands that never outlive their
//! lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use coord::etcd::{Client, Session};
use coord::lock::{self, Holder, Mode};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::{cluster, etcd, eventually};

fn me() -> Holder {
    Holder {
        agent: "test".into(),
        host: "test".into(),
        pid: std::process::id(),
    }
}

async fn session(client: &Client) -> (Session, coord::etcd::LeaseId) {
    let s = Session::start(client.clone(), Duration::from_secs(10));
    let lease = s.wait_alive().await;
    (s, lease)
}

/// Checks a log of `start <token>` / `end <token>` lines: every end comes
/// right after its own start (no other holder in between), and tokens only
/// grow.
fn assert_exclusive(log: &str) -> usize {
    let lines: Vec<&str> = log.lines().collect();
    let mut last_token = 0i64;
    let mut starts = 0;
    for (i, line) in lines.iter().enumerate() {
        let (what, token) = line.split_once(' ').expect("`start N` or `end N`");
        let token: i64 = token.trim().parse().expect("a token");
        match what {
            "start" => {
                assert!(
                    token > last_token,
                    "token {token} after {last_token} (line {i}):\n{log}"
                );
                last_token = token;
                starts += 1;
            }
            "end" => {
                let prev = i.checked_sub(1).map(|p| lines[p]);
                assert_eq!(
                    prev,
                    Some(format!("start {token}").as_str()),
                    "overlap at line {i}:\n{log}"
                );
            }
            other => panic!("unexpected line `{other}`"),
        }
    }
    starts
}

#[tokio::test]
async fn coord_lock_and_etcdctl_lock_exclude_each_other() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("log");
    // etcdctl's ETCD_LOCK_REV is the revision it acquired at, not its
    // key's create revision, so tokens of the two tools do not compare:
    // this test checks exclusion only, with each command's pid as its id.
    let script = format!(
        "echo start $$ >> {0}; sleep 0.2; echo end $$ >> {0}",
        log.display()
    );
    let mut children = Vec::new();
    for i in 0..6 {
        let mut cmd = if i % 2 == 0 {
            let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_coord"));
            c.args([
                "lock",
                "x",
                "--endpoints",
                &etcd.endpoint(),
                "--",
                "sh",
                "-c",
            ])
            .arg(format!("TOKEN=$COORD_FENCING_TOKEN; {script}"));
            c
        } else {
            let mut c = std::process::Command::new("etcdctl");
            c.env("ETCDCTL_API", "3")
                .args([
                    "--endpoints",
                    &etcd.endpoint(),
                    "lock",
                    "/coord/locks/x",
                    "--",
                    "sh",
                    "-c",
                ])
                .arg(&script);
            c
        };
        children.push(
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("etcdctl (etcd-client) and coord must run"),
        );
    }
    for mut c in children {
        let status = tokio::task::spawn_blocking(move || c.wait())
            .await
            .expect("join")
            .expect("wait");
        assert!(status.success());
    }
    let text = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 12, "{text}");
    for pair in lines.chunks(2) {
        let id = pair[0].strip_prefix("start ").expect("a start");
        assert_eq!(
            pair[1],
            format!("end {id}"),
            "two holders overlapped:\n{text}"
        );
    }
}

#[tokio::test]
async fn a_semaphore_of_three_never_has_a_fourth_holder() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let holding = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, holding, most) = (client.clone(), holding.clone(), most.clone());
        tasks.push(tokio::spawn(async move {
            let (s, lease) = session(&client).await;
            let guard = lock::acquire(&client, lease, "/coord", "pool", Mode::Semaphore(3), &me())
                .await
                .expect("acquire");
            let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(150)).await;
            holding.fetch_sub(1, Ordering::SeqCst);
            guard.release(&client).await.expect("release");
            s.close().await;
        }));
    }
    for t in tasks {
        t.await.expect("holder");
    }
    assert_eq!(
        most.load(Ordering::SeqCst),
        3,
        "at most three at once, and three did share it"
    );
}

#[tokio::test]
async fn readers_share_a_writer_waits_for_them_and_later_readers_wait_for_the_writer() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let (_s1, l1) = session(&client).await;
    let (_s2, l2) = session(&client).await;
    let (_s3, l3) = session(&client).await;
    let (_s4, l4) = session(&client).await;
    let r1 = lock::acquire(&client, l1, "/coord", "db", Mode::Read, &me())
        .await
        .expect("r1");
    let r2 = lock::acquire(&client, l2, "/coord", "db", Mode::Read, &me())
        .await
        .expect("r2: readers share");
    let writer = {
        let client = client.clone();
        tokio::spawn(
            async move { lock::acquire(&client, l3, "/coord", "db", Mode::Write, &me()).await },
        )
    };
    // The writer is queued behind the readers.
    eventually("the writer to queue", || async {
        (lock::queue(&client, "/coord", "db").await.ok()?.len() == 3).then_some(())
    })
    .await;
    let reader3 = {
        let client = client.clone();
        tokio::spawn(
            async move { lock::acquire(&client, l4, "/coord", "db", Mode::Read, &me()).await },
        )
    };
    eventually("the late reader to queue", || async {
        (lock::queue(&client, "/coord", "db").await.ok()?.len() == 4).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !writer.is_finished(),
        "the writer must wait for the readers"
    );
    assert!(
        !reader3.is_finished(),
        "a reader behind a writer must wait for it"
    );
    r1.release(&client).await.expect("release");
    r2.release(&client).await.expect("release");
    let w = writer.await.expect("join").expect("writer gets it");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !reader3.is_finished(),
        "the late reader waits while the writer holds"
    );
    w.release(&client).await.expect("release");
    let r3 = reader3.await.expect("join").expect("reader gets it");
    assert!(
        r3.token > w.token && w.token > r2.token,
        "fencing tokens follow the queue"
    );
}

#[tokio::test]
async fn try_lock_does_not_wait_and_leaves_no_key_behind() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let (_s1, l1) = session(&client).await;
    let (_s2, l2) = session(&client).await;
    let held = lock::try_acquire(&client, l1, "/coord", "t", Mode::Mutex, &me())
        .await
        .expect("try");
    let held = held.expect("free lock is taken");
    assert!(
        lock::try_acquire(&client, l2, "/coord", "t", Mode::Mutex, &me())
            .await
            .expect("try")
            .is_none()
    );
    assert_eq!(
        lock::queue(&client, "/coord", "t")
            .await
            .expect("queue")
            .len(),
        1
    );
    assert!(held.is_held(&client).await.expect("held"));
    let left = held
        .remaining_ttl(&client)
        .await
        .expect("ttl")
        .expect("lease alive");
    assert!(
        left > Duration::ZERO && left <= Duration::from_secs(10),
        "{left:?}"
    );
    held.release(&client).await.expect("release");
    assert!(!held.is_held(&client).await.expect("held"));
}

/// The acceptance test of the lock: holders in separate processes, killed
/// with -9 at random, an etcd member restarted meanwhile; across 200 runs
/// no two commands overlap and tokens only grow.
#[tokio::test]
async fn guarded_commands_never_overlap_while_holders_are_killed_and_a_member_restarts() {
    let mut cluster = cluster().await;
    let endpoints = cluster.endpoints().join(",");
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("log");
    let script = format!(
        "echo start $COORD_FENCING_TOKEN >> {0}; sleep 0.01; echo end $COORD_FENCING_TOKEN >> {0}",
        log.display()
    );
    let runs = Arc::new(AtomicUsize::new(0));
    let pids = Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let mut workers = Vec::new();
    for _ in 0..3 {
        let (endpoints, script, runs, pids) = (
            endpoints.clone(),
            script.clone(),
            runs.clone(),
            pids.clone(),
        );
        workers.push(tokio::spawn(async move {
            while runs.load(Ordering::SeqCst) < 200 {
                let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_coord"))
                    .args([
                        "lock",
                        "x",
                        "--ttl",
                        "2s",
                        "--grace",
                        "500ms",
                        "--endpoints",
                        &endpoints,
                        "--",
                        "sh",
                        "-c",
                        &script,
                    ])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("spawn coord lock");
                if let Some(id) = child.id() {
                    pids.lock().expect("pids").push(id);
                }
                let _ = child.wait().await;
                runs.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // Kill a holder now and then, and restart one member once.
    let mut kills = 0;
    let mut restarted = false;
    while runs.load(Ordering::SeqCst) < 200 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        if kills < 6 {
            let victim = pids.lock().expect("pids").last().copied();
            if let Some(pid) = victim {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                kills += 1;
            }
        }
        if !restarted && runs.load(Ordering::SeqCst) > 60 {
            cluster.member(2).restart().expect("restart member");
            restarted = true;
        }
    }
    for w in workers {
        w.await.expect("worker");
    }
    let text = std::fs::read_to_string(&log).expect("log");
    let starts = assert_exclusive(&text);
    assert!(starts >= 150, "only {starts} commands started:\n{text}");
    assert!(kills >= 3 && restarted);
}

/// A stopped agent cannot renew; its command must be dead before anyone
/// else can hold the lock.
#[tokio::test]
async fn a_holder_stopped_with_sigstop_has_its_command_killed_before_the_next_holder_starts() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let beats = dir.path().join("beats");
    let next = dir.path().join("next");
    let mut holder = std::process::Command::new(env!("CARGO_BIN_EXE_coord"))
        .args([
            "lock",
            "x",
            "--ttl",
            "3s",
            "--grace",
            "1s",
            "--endpoints",
            &etcd.endpoint(),
            "--",
            "sh",
            "-c",
        ])
        .arg(format!(
            "while true; do date +%s%N >> {}; sleep 0.05; done",
            beats.display()
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn coord lock");
    eventually("the command to run", || async {
        beats.exists().then_some(())
    })
    .await;
    let pid = Pid::from_raw(holder.id() as i32);
    kill(pid, Signal::SIGSTOP).expect("stop the holder");
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_coord"))
        .args([
            "lock",
            "x",
            "--endpoints",
            &etcd.endpoint(),
            "--",
            "sh",
            "-c",
        ])
        .arg(format!("date +%s%N > {}", next.display()))
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .expect("second holder");
    assert!(status.success());
    let _ = kill(pid, Signal::SIGKILL);
    let _ = kill(pid, Signal::SIGCONT);
    let _ = holder.wait();
    let last_beat: u128 = std::fs::read_to_string(&beats)
        .expect("beats")
        .lines()
        .last()
        .expect("a beat")
        .parse()
        .expect("ns");
    let started: u128 = std::fs::read_to_string(&next)
        .expect("next")
        .trim()
        .parse()
        .expect("ns");
    assert!(
        last_beat < started,
        "the stopped holder's command ran after the next holder started"
    );
}

#[tokio::test]
async fn an_owner_re_enters_its_lock_and_releases_it_when_the_count_is_back_to_zero() {
    use coord::lock::Locker;
    let etcd = etcd().await;
    let client = etcd.client().await;
    let (_s1, l1) = session(&client).await;
    let (_s2, l2) = session(&client).await;
    let locker = Locker::new(client.clone(), l1, "/coord", me());
    let outer = locker.lock("r", Mode::Mutex).await.expect("outer");
    let inner = locker
        .lock("r", Mode::Mutex)
        .await
        .expect("re-entered, not deadlocked");
    assert_eq!(outer.token, inner.token, "one holder key per owner");
    assert_eq!(
        lock::queue(&client, "/coord", "r")
            .await
            .expect("queue")
            .len(),
        1
    );
    locker.unlock("r").await.expect("unlock");
    assert_eq!(locker.count("r").await, 1);
    assert!(
        lock::try_acquire(&client, l2, "/coord", "r", Mode::Mutex, &me())
            .await
            .expect("try")
            .is_none(),
        "still held after one unlock of two"
    );
    locker.unlock("r").await.expect("unlock");
    assert!(!outer.is_held(&client).await.expect("held"));
    assert!(
        lock::try_acquire(&client, l2, "/coord", "r", Mode::Mutex, &me())
            .await
            .expect("try")
            .is_some(),
        "free once the count is back to zero"
    );
}

#[tokio::test]
async fn a_waiter_whose_key_was_deleted_while_it_waited_does_not_take_the_lock() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let (_s1, l1) = session(&client).await;
    let (_s2, l2) = session(&client).await;
    let held = lock::acquire(&client, l1, "/coord", "gone", Mode::Mutex, &me())
        .await
        .expect("the free lock is taken");
    let waiter = {
        let client = client.clone();
        tokio::spawn(async move {
            lock::acquire(&client, l2, "/coord", "gone", Mode::Mutex, &me()).await
        })
    };
    let waiter_key = lock::holder_key("/coord", "gone", Mode::Mutex, l2);
    eventually("the waiter queues", || async {
        client.get(&waiter_key).await.expect("get").map(|_| ())
    })
    .await;
    // An operator removes the waiter's place (its lease lives on), then the
    // holder lets go: the waiter must find its key gone, not hold.
    client.delete(&waiter_key).await.expect("delete");
    held.release(&client).await.expect("release");
    let got = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("the waiter decides")
        .expect("join");
    assert!(
        matches!(got, Err(lock::LockError::SessionExpired { .. })),
        "{got:?}"
    );
    assert!(
        lock::queue(&client, "/coord", "gone")
            .await
            .expect("queue")
            .is_empty()
    );
}

#[tokio::test]
async fn a_waiter_takes_the_lock_when_the_holder_goes_right_after_it_queued() {
    // The waiter's watch starts from the revision it read the queue at, so a
    // release just after it queued is seen like any other.
    let etcd = etcd().await;
    let client = etcd.client().await;
    let (_s1, l1) = session(&client).await;
    let (_s2, l2) = session(&client).await;
    for round in 0..20 {
        let name = format!("quick-{round}");
        let held = lock::acquire(&client, l1, "/coord", &name, Mode::Mutex, &me())
            .await
            .expect("the free lock is taken");
        let waiter = {
            let (client, name) = (client.clone(), name.clone());
            tokio::spawn(async move {
                lock::acquire(&client, l2, "/coord", &name, Mode::Mutex, &me()).await
            })
        };
        let key = lock::holder_key("/coord", &name, Mode::Mutex, l2);
        eventually("the waiter queues", || async {
            client.get(&key).await.expect("get").map(|_| ())
        })
        .await;
        held.release(&client).await.expect("release");
        let next = tokio::time::timeout(Duration::from_secs(20), waiter)
            .await
            .expect("the waiter takes the lock")
            .expect("join")
            .expect("acquire");
        assert!(next.token > held.token, "fencing tokens only grow");
        next.release(&client).await.expect("release");
    }
}

#[tokio::test]
async fn an_acquire_dropped_by_a_timeout_leaves_no_key_in_the_queue() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let (_s1, l1) = session(&client).await;
    let (_s2, l2) = session(&client).await;
    let held = lock::acquire(&client, l1, "/coord", "busy", Mode::Mutex, &me())
        .await
        .expect("take the free lock");
    let waited = tokio::time::timeout(
        Duration::from_millis(300),
        lock::acquire(&client, l2, "/coord", "busy", Mode::Mutex, &me()),
    )
    .await;
    assert!(waited.is_err(), "the lock is held: the wait times out");
    // The dropped acquire deletes its key in the background.
    eventually("the given-up waiter's key to be gone", || async {
        let queue = lock::queue(&client, "/coord", "busy").await.expect("queue");
        (queue.len() == 1 && queue[0].key == held.key).then_some(())
    })
    .await;
}

#[tokio::test]
async fn acquire_timeout_gives_up_with_no_key_left_and_a_free_lock_is_still_taken() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let (_s1, l1) = session(&client).await;
    let (_s2, l2) = session(&client).await;
    let held = lock::acquire(&client, l1, "/coord", "busy", Mode::Write, &me())
        .await
        .expect("take the free lock");
    let err = lock::acquire_timeout(
        &client,
        l2,
        "/coord",
        "busy",
        Mode::Read,
        &me(),
        Duration::from_millis(300),
    )
    .await
    .expect_err("held by a writer: the reader times out");
    assert!(
        matches!(err, lock::LockError::Timeout { .. }),
        "a timeout, not {err:?}"
    );
    assert!(
        err.to_string().contains("`busy` was not ours within 300ms"),
        "{err}"
    );
    // Awaited before returning: no key of ours, right now.
    let queue = lock::queue(&client, "/coord", "busy").await.expect("queue");
    assert_eq!(
        queue.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
        [held.key.as_str()],
        "only the holder is left in the queue"
    );
    held.release(&client).await.expect("release");
    let taken = lock::acquire_timeout(
        &client,
        l2,
        "/coord",
        "busy",
        Mode::Read,
        &me(),
        Duration::from_secs(10),
    )
    .await
    .expect("a free lock is taken within the time");
    assert!(taken.is_held(&client).await.expect("held"));
}

/// The owner holds `a` and waits for `b`; the other side holds `b` and
/// waits for `a`. Unlocking `a` must not wait for `b`: that would be a
/// deadlock only the locker made.
#[tokio::test]
async fn a_locker_waiting_for_one_lock_still_unlocks_another() {
    use coord::lock::Locker;
    let etcd = etcd().await;
    let client = etcd.client().await;
    let (_s1, l1) = session(&client).await;
    let (_s2, l2) = session(&client).await;
    let locker = Arc::new(Locker::new(client.clone(), l1, "/coord", me()));
    locker.lock("a", Mode::Mutex).await.expect("a");
    let b = lock::acquire(&client, l2, "/coord", "b", Mode::Mutex, &me())
        .await
        .expect("b, by the other side");
    let waiting = {
        let locker = locker.clone();
        tokio::spawn(async move { locker.lock("b", Mode::Mutex).await })
    };
    eventually("the locker to queue for `b`", || async {
        let queue = lock::queue(&client, "/coord", "b").await.expect("queue");
        (queue.len() == 2).then_some(())
    })
    .await;
    let other = {
        let client = client.clone();
        tokio::spawn(
            async move { lock::acquire(&client, l2, "/coord", "a", Mode::Mutex, &me()).await },
        )
    };
    tokio::time::timeout(crate::support::PATIENCE, locker.unlock("a"))
        .await
        .expect("unlocking `a` does not wait for `b`")
        .expect("unlock a");
    let a = other
        .await
        .expect("join")
        .expect("the other side takes `a`");
    a.release(&client).await.expect("release a");
    b.release(&client).await.expect("release b");
    let got = waiting.await.expect("join").expect("the locker takes `b`");
    assert_eq!(locker.count("b").await, 1);
    assert!(got.is_held(&client).await.expect("held"));
}
