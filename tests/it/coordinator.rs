//! The `Coord` handle: connect, scope, ping, close and drop, and the
//! handles tied to its session lease.

use std::time::Duration;

use coord::etcd::{Client, LeaseId};
use coord::{Coord, Options};

use crate::support::{LocalEtcd, etcd, eventually};

pub fn options(etcd: &LocalEtcd) -> Options {
    Options::from(etcd.connect_options())
        .session_ttl(Duration::from_secs(2))
        .name("test")
}

pub async fn lease_alive(client: &Client, lease: LeaseId) -> bool {
    client.lease_ttl(lease).await.expect("lease ttl").is_some()
}

#[tokio::test]
async fn a_coord_dropped_without_close_stops_renewing_and_its_keys_go_after_the_ttl() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let coord = Coord::connect(options(&etcd)).await.expect("connect");
    let lease = coord.lease().await.expect("lease");
    client
        .put("/coord/held", "x", Some(lease))
        .await
        .expect("put on the lease");
    let scoped = coord.scope("billing");
    drop(coord);
    // A scope shares the session: it keeps it alive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        lease_alive(&client, lease).await,
        "a scope still in use keeps the lease renewed"
    );
    drop(scoped);
    eventually(
        "the lease and its key to end once nothing renews it",
        || async {
            let gone = !lease_alive(&client, lease).await
                && client.get("/coord/held").await.expect("get").is_none();
            gone.then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_coord_pings_scopes_its_namespace_and_close_revokes_its_lease_at_once() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let coord = Coord::connect(options(&etcd).session_ttl(Duration::from_secs(60)))
        .await
        .expect("connect");
    let ping = coord.ping().await.expect("ping");
    assert!(ping.revision > 0);
    let lease = ping.lease.expect("a lease right after connect");
    assert_eq!(coord.namespace(), "/coord");
    let billing = coord.scope("billing");
    assert_eq!(billing.namespace(), "/coord/billing");
    assert_eq!(billing.scope("eu").namespace(), "/coord/billing/eu");
    assert_eq!(billing.lease().await.expect("lease"), lease, "one session");
    billing.close().await;
    // 60 s TTL: gone now only because it was revoked.
    assert!(!lease_alive(&client, lease).await, "revoked at once");
    assert!(matches!(
        coord.lease().await,
        Err(coord::etcd::Error::SessionClosed)
    ));
}

#[tokio::test]
async fn connect_fails_when_no_endpoint_answers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let err = Coord::connect(
        Options::new([format!("http://127.0.0.1:{port}")])
            .dial_timeout(Duration::from_millis(200))
            .request_timeout(Duration::from_millis(200))
            .connect_timeout(Duration::from_secs(1)),
    )
    .await
    .expect_err("nobody listens");
    assert!(err.to_string().contains("first session lease"), "{err}");
}
