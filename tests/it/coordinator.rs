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

#[tokio::test]
async fn a_lock_guards_lost_fires_when_its_lease_is_revoked_from_outside_and_the_lock_is_not_retaken()
 {
    let etcd = etcd().await;
    let outside = etcd.client().await;
    let coord = Coord::connect(options(&etcd)).await.expect("connect");
    let guard = coord.locks().lock("job").await.expect("lock");
    let lost = tokio::spawn(guard.lost());
    outside
        .lease_revoke(guard.lease())
        .await
        .expect("revoke from outside");
    let why = tokio::time::timeout(crate::support::PATIENCE, lost)
        .await
        .expect("lost() fires")
        .expect("join");
    assert!(
        matches!(
            why,
            coord::coordinator::Lost::Lease | coord::coordinator::Lost::Key
        ),
        "{why:?}"
    );
    // The session moves on to a new lease; the lock stays lost.
    let new_lease = eventually("a new lease", || async {
        coord.lease().await.ok().filter(|l| *l != guard.lease())
    })
    .await;
    assert!(!guard.is_held().await.expect("is_held"));
    assert!(
        coord.locks().queue("job").await.expect("queue").is_empty(),
        "nobody took the lock again on lease {new_lease}"
    );
}

#[tokio::test]
async fn a_registration_comes_back_by_itself_after_its_lease_is_revoked_from_outside() {
    use coord::coordinator::Service;
    let etcd = etcd().await;
    let outside = etcd.client().await;
    let coord = Coord::connect(options(&etcd)).await.expect("connect");
    let registry = coord.registry();
    let reg = registry
        .register(Service::new("api", "api-1", "127.0.0.1:9").metadata("zone", "eu-1"))
        .await
        .expect("register");
    let found = registry.discover("api").await.expect("discover");
    assert_eq!(found.len(), 1, "listed at once: {found:?}");
    assert_eq!(found[0].addr(), Some("127.0.0.1:9"));
    let first = reg.lease().expect("written");
    let lost = tokio::spawn(reg.lost());
    outside
        .lease_revoke(first)
        .await
        .expect("revoke from outside");
    assert_eq!(
        tokio::time::timeout(crate::support::PATIENCE, lost)
            .await
            .expect("lost() fires")
            .expect("join"),
        coord::coordinator::Lost::Lease
    );
    let key = "/coord/services/api/api-1";
    let back = eventually("the registration to be written again", || async {
        outside
            .get(key)
            .await
            .expect("get")
            .and_then(|kv| kv.lease)
            .filter(|l| *l != first)
    })
    .await;
    assert_eq!(reg.rewritten(first).await, Some(back));
    let health = outside
        .get("/coord/health/api/api-1")
        .await
        .expect("get")
        .expect("health record back too");
    assert_eq!(health.lease, Some(back));
    reg.release().await.expect("release");
    assert!(registry.instances("api").await.expect("read").is_empty());
}

#[tokio::test]
async fn dropped_guards_claims_and_registrations_are_released_and_a_deleted_claim_is_lost() {
    use coord::coordinator::{Lost, Service};
    let etcd = etcd().await;
    let outside = etcd.client().await;
    let coord = Coord::connect(options(&etcd).session_ttl(Duration::from_secs(60)))
        .await
        .expect("connect");
    let guard = coord.locks().write("dropped").await.expect("lock");
    let ids = coord.ids("worker", 4);
    let claim = ids.claim().await.expect("claim");
    let reg = coord
        .registry()
        .register(Service::new("web", "web-1", "127.0.0.1:10"))
        .await
        .expect("register");
    drop((guard, reg));
    eventually(
        "the dropped guard and registration to be deleted",
        || async {
            let lock_gone = coord
                .locks()
                .queue("dropped")
                .await
                .expect("queue")
                .is_empty();
            let reg_gone = coord
                .registry()
                .instances("web")
                .await
                .expect("read")
                .is_empty();
            (lock_gone && reg_gone).then_some(())
        },
    )
    .await;
    // A claim whose key is deleted by hand is lost, and not made again.
    let lost = tokio::spawn(claim.lost());
    assert_eq!(outside.delete(claim.key()).await.expect("delete"), 1);
    assert_eq!(
        tokio::time::timeout(crate::support::PATIENCE, lost)
            .await
            .expect("lost() fires")
            .expect("join"),
        Lost::Key
    );
    assert!(ids.list().await.expect("list").is_empty());
    let again = ids.claim().await.expect("claim again");
    drop(claim);
    let id = again.id();
    again.release().await.expect("release");
    assert!(
        ids.list().await.expect("list").is_empty(),
        "id {id} released at once"
    );
    coord.close().await;
}

#[tokio::test]
async fn a_typed_config_watch_yields_each_change_with_its_kind_and_reports_a_compaction() {
    use coord::config::{ChangeKind, Error, Expect};
    use futures_util::StreamExt;
    let etcd = etcd().await;
    let client = etcd.client().await;
    let coord = Coord::connect(options(&etcd)).await.expect("connect");
    let config = coord.scope("billing").config();
    assert_eq!(config.key("port"), "/coord/billing/config/port");
    assert_eq!(config.key("/app/port"), "/app/port");
    let mut changes = Box::pin(config.watch::<u16>("port").await.expect("watch"));
    config.set("port", &80).await.expect("set");
    config.set("port", &81).await.expect("set");
    config.delete("port", Expect::Any).await.expect("delete");
    client
        .put("/coord/billing/config/port", "eighty", None)
        .await
        .expect("a value that is no u16");
    let mut next = async || {
        tokio::time::timeout(crate::support::PATIENCE, changes.next())
            .await
            .expect("a change")
            .expect("the stream goes on")
    };
    let c = next().await.expect("typed");
    assert_eq!(
        (c.kind, c.old, c.new),
        (ChangeKind::Created, None, Some(80))
    );
    let c = next().await.expect("typed");
    assert_eq!(
        (c.kind, c.old, c.new),
        (ChangeKind::Updated, Some(80), Some(81))
    );
    let c = next().await.expect("typed");
    assert_eq!(
        (c.kind, c.old, c.new),
        (ChangeKind::Deleted, Some(81), None)
    );
    assert!(matches!(next().await, Err(Error::Invalid { .. })));

    // A watch that falls behind a compaction says so, then ends.
    let behind = config.watch::<u16>("limit").await.expect("watch");
    for n in 0..3 {
        config.set("limit", &n).await.expect("set");
    }
    let now = client.current_revision().await.expect("revision");
    client.compact(now).await.expect("compact");
    let mut behind = Box::pin(behind);
    let first = tokio::time::timeout(crate::support::PATIENCE, behind.next())
        .await
        .expect("an item");
    assert!(
        matches!(first, Some(Err(Error::Compacted { .. }))),
        "{first:?}"
    );
    assert!(behind.next().await.is_none(), "the stream ends after it");
}

#[tokio::test]
async fn a_service_watch_stream_follows_registrations() {
    use coord::coordinator::Service;
    use coord::registry::ServiceChange;
    use futures_util::StreamExt;
    let etcd = etcd().await;
    let coord = Coord::connect(options(&etcd)).await.expect("connect");
    let registry = coord.registry();
    let mut updates = Box::pin(registry.watch("api"));
    let first = updates.next().await.expect("first update");
    assert!(first.current.is_empty());
    let reg = registry
        .register(Service::new("api", "api-1", "127.0.0.1:9"))
        .await
        .expect("register");
    let added = loop {
        let update = updates.next().await.expect("update");
        if let Some(ServiceChange::Added(i)) = update.changes.first() {
            break i.clone();
        }
    };
    assert_eq!(added.id, "api-1");
    reg.set_maintenance(Some("upgrading"));
    loop {
        let update = updates.next().await.expect("update");
        if update
            .changes
            .iter()
            .any(|c| matches!(c, ServiceChange::Removed(i) if i.id == "api-1"))
        {
            assert_eq!(
                update.current[0].health.as_ref().map(|h| h.status),
                Some(coord::registry::Health::Maintenance)
            );
            break;
        }
    }
    reg.release().await.expect("release");
}

#[tokio::test]
async fn a_registration_runs_its_check_withdraws_a_failing_instance_and_lists_it_again() {
    use coord::coordinator::Service;
    use coord::registry::Health;
    use coord::registry::check::Check;
    let etcd = etcd().await;
    let coord = Coord::connect(options(&etcd)).await.expect("connect");
    let registry = coord.registry();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let reg = registry
        .register(
            Service::new("db", "db-1", addr.clone())
                .check(Check::tcp(addr.clone()).interval(Duration::from_millis(100))),
        )
        .await
        .expect("register");
    assert_eq!(registry.discover("db").await.expect("discover").len(), 1);
    // The port closes: critical, withdrawn, its health still visible.
    drop(listener);
    let down = eventually("the failing instance to be withdrawn", || async {
        let all = registry.instances("db").await.expect("read");
        all.into_iter().find(|i| {
            !i.is_listed() && i.health.as_ref().map(|h| h.status) == Some(Health::Critical)
        })
    })
    .await;
    let output = down.health.expect("health").output;
    assert!(output.contains("cannot connect"), "{output}");
    // It answers again: listed again.
    let _listener = std::net::TcpListener::bind(&addr).expect("bind the same port again");
    eventually("the instance to be listed again", || async {
        (registry.discover("db").await.expect("discover").len() == 1).then_some(())
    })
    .await;
    reg.release().await.expect("release");
}

#[tokio::test]
async fn an_instance_whose_first_check_fails_is_never_listed() {
    use coord::coordinator::Service;
    use coord::registry::Health;
    use coord::registry::check::{Check, CheckResult};
    let etcd = etcd().await;
    let coord = Coord::connect(options(&etcd)).await.expect("connect");
    let registry = coord.registry();
    let reg = registry
        .register(
            Service::new("q", "q-1", "127.0.0.1:1").check(Check::custom(|| async {
                CheckResult::new(Health::Critical, "not ready")
            })),
        )
        .await
        .expect("register");
    let all = registry.instances("q").await.expect("read");
    assert_eq!(all.len(), 1);
    assert!(!all[0].is_listed(), "withdrawn from the start: {all:?}");
    drop(reg);
}
