//! The session lease on its own: granted, kept, lost, replaced, revoked.

use std::time::Duration;

use coord::etcd::{Session, SessionState};

use crate::support::{PATIENCE, etcd};

async fn wait_for(
    rx: &mut tokio::sync::watch::Receiver<SessionState>,
    what: &str,
    f: impl Fn(&SessionState) -> bool,
) -> SessionState {
    match tokio::time::timeout(PATIENCE, rx.wait_for(|s| f(s))).await {
        Ok(Ok(s)) => *s,
        _ => panic!("timed out waiting for the session to be {what}"),
    }
}

#[tokio::test]
async fn a_session_is_lost_when_etcd_stops_answering_and_comes_back_with_a_new_lease() {
    let mut etcd = etcd().await;
    let session = Session::start(etcd.client().await, Duration::from_secs(2));
    let first = session.wait_alive().await;
    let mut rx = session.subscribe();
    etcd.member().kill();
    let lost = wait_for(&mut rx, "lost", |s| matches!(s, SessionState::Lost { .. })).await;
    assert_eq!(lost, SessionState::Lost { lease: first });
    etcd.member().restart().expect("restart");
    let alive = wait_for(&mut rx, "alive again", |s| s.lease().is_some()).await;
    assert_ne!(alive.lease(), Some(first), "a lost lease is never reused");
    session.close().await;
}

#[tokio::test]
async fn the_local_deadline_moves_forward_with_each_renewal_and_stays_within_the_ttl() {
    let etcd = etcd().await;
    let session = Session::start(etcd.client().await, Duration::from_secs(3));
    session.wait_alive().await;
    let mut rx = session.subscribe();
    let SessionState::Alive { deadline: d1, .. } = *rx.borrow_and_update() else {
        panic!("alive")
    };
    // A renewal comes about every TTL/3.
    let renewed = wait_for(
        &mut rx,
        "renewed",
        |s| matches!(s, SessionState::Alive { deadline, .. } if *deadline > d1),
    )
    .await;
    let SessionState::Alive { deadline: d2, .. } = renewed else {
        panic!("alive")
    };
    let now = coord::etcd::Clock::system().now();
    assert!(
        d2 <= now + Duration::from_secs(3),
        "the deadline must never be later than now + TTL"
    );
    session.close().await;
}

#[tokio::test]
async fn closing_a_session_revokes_its_lease_and_the_keys_on_it() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let session = Session::start(client.clone(), Duration::from_secs(60));
    let lease = session.wait_alive().await;
    client.put("/t/held", "x", Some(lease)).await.expect("put");
    session.close().await;
    assert_eq!(client.get("/t/held").await.expect("get"), None);
}

/// The lease keeps expiring on the server while the host is suspended; the
/// session's deadline counts that time too (CLOCK_BOOTTIME), so a suspend
/// past the deadline loses the lease at the resume, not a TTL later.
#[tokio::test]
async fn a_suspend_past_the_deadline_loses_the_lease_at_the_resume() {
    let etcd = etcd().await;
    let (clock, suspender) = coord::etcd::Clock::with_suspender();
    let session = Session::start_with_clock(
        etcd.client().await,
        Duration::from_secs(60),
        Default::default(),
        clock,
    );
    let first = session.wait_alive().await;
    let mut rx = session.subscribe();
    suspender.suspend_for(Duration::from_secs(61));
    tokio::time::timeout(
        Duration::from_secs(10),
        wait_for(&mut rx, "lost", |s| s.lease() != Some(first)),
    )
    .await
    .expect(
        "the lease is given up at the resume, long before the monotonic clock reaches its deadline",
    );
    assert_eq!(session.stats().lost(), 1);
    let again = wait_for(&mut rx, "a new lease", |s| s.lease().is_some()).await;
    assert_ne!(again.lease(), Some(first));
    session.close().await;
}

#[tokio::test]
async fn a_lease_granted_late_after_etcd_was_paused_is_kept_and_not_lost_again() {
    let mut etcd = etcd().await;
    // A TTL shorter than the request timeout: a grant sent while etcd is
    // frozen is answered when it thaws, with little of its TTL left.
    let ttl = Duration::from_secs(3);
    let session = Session::start(etcd.client().await, ttl);
    let stats = session.stats();
    let first = session.wait_alive().await;
    let mut rx = session.subscribe();
    etcd.member().pause();
    wait_for(&mut rx, "lost", |s| matches!(s, SessionState::Lost { .. })).await;
    tokio::time::sleep(Duration::from_secs(13)).await;
    etcd.member().resume();
    let alive = wait_for(&mut rx, "alive again", |s| s.lease().is_some()).await;
    let lease = alive.lease();
    assert_ne!(lease, Some(first), "a lost lease is never reused");
    // Several TTLs on the new lease: it must be renewed, not lost again.
    tokio::time::sleep(4 * ttl).await;
    assert_eq!(
        session.state().lease(),
        lease,
        "the session moved off the lease granted after the pause"
    );
    assert_eq!(
        stats.lost(),
        1,
        "only the lease frozen with etcd may be lost, not the one granted after it"
    );
    session.close().await;
}
