//! The registry as a library: watch, picking, and a gRPC channel that
//! follows discovery.

use std::time::Duration;

use coord::etcd::{Cache, Session};
use coord::registry::{
    self, Endpoint, Health, HealthRecord, Instance, Picker, ServiceChange, ServiceWatch,
};

use crate::support::{cluster, etcd, eventually};

fn record(status: Health, addr: &str) -> HealthRecord {
    HealthRecord {
        status,
        output: String::new(),
        agent: "test".into(),
        addr: addr.into(),
        metadata: Default::default(),
        since: "2026-01-01T00:00:00Z".into(),
    }
}

fn endpoint(addr: &str) -> Endpoint {
    Endpoint {
        addr: addr.into(),
        metadata: Default::default(),
    }
}

#[tokio::test]
async fn a_service_watch_reports_instances_joining_leaving_and_changing_health() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let session = Session::start(client.clone(), Duration::from_secs(10));
    let lease = session.wait_alive().await;
    registry::list(
        &client,
        "/coord",
        "api",
        "a",
        &endpoint("10.0.0.1:80"),
        lease,
    )
    .await
    .expect("list");
    registry::report(
        &client,
        "/coord",
        "api",
        "a",
        &record(Health::Passing, "10.0.0.1:80"),
        lease,
    )
    .await
    .expect("report");
    let cache = Cache::new(client.clone());
    let mut watch = ServiceWatch::new(&cache, "/coord", "api");
    let first = watch.next().await;
    assert!(
        matches!(&first.changes[..], [ServiceChange::Added(i), ServiceChange::HealthChanged { old: None, .. }] if i.id == "a"),
        "{first:?}"
    );
    registry::list(
        &client,
        "/coord",
        "api",
        "b",
        &endpoint("10.0.0.2:80"),
        lease,
    )
    .await
    .expect("list");
    let update = watch.next().await;
    assert!(
        matches!(&update.changes[..], [ServiceChange::Added(i)] if i.id == "b"),
        "{update:?}"
    );
    assert_eq!(update.current.len(), 2);
    registry::unlist(&client, "/coord", "api", "a")
        .await
        .expect("unlist");
    registry::report(
        &client,
        "/coord",
        "api",
        "a",
        &record(Health::Critical, "10.0.0.1:80"),
        lease,
    )
    .await
    .expect("report");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.extend(watch.next().await.changes);
    }
    assert!(
        seen.iter()
            .any(|c| matches!(c, ServiceChange::Removed(i) if i.id == "a")),
        "{seen:?}"
    );
    assert!(seen.iter().any(|c| matches!(c, ServiceChange::HealthChanged { instance, old: Some(Health::Passing) } if instance.id == "a")), "{seen:?}");
    session.close().await;
}

fn listed(id: &str, weight: u32) -> Instance {
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert("weight".to_owned(), weight.into());
    Instance {
        service: "api".into(),
        id: id.into(),
        endpoint: Some(Endpoint {
            addr: format!("{id}:80"),
            metadata,
        }),
        health: None,
    }
}

#[test]
fn pickers_choose_only_listed_instances_and_weighted_follows_the_weights() {
    let mut withdrawn = listed("down", 1);
    withdrawn.endpoint = None;
    let all = [
        listed("light", 1),
        listed("heavy", 9),
        listed("off", 0),
        withdrawn,
    ];
    let weighted = Picker::Weighted;
    let mut heavy = 0;
    for _ in 0..10_000 {
        let pick = weighted.pick(&all).expect("one is listed");
        assert!(pick.id != "off" && pick.id != "down", "picked {}", pick.id);
        if pick.id == "heavy" {
            heavy += 1;
        }
    }
    // Expected 9,000; the bound is many standard deviations wide.
    assert!(
        (8_500..=9_500).contains(&heavy),
        "heavy picked {heavy} times"
    );
    let random = Picker::Random;
    for _ in 0..1_000 {
        assert_ne!(random.pick(&all).expect("listed").id, "down");
    }
    assert!(Picker::round_robin().pick(&[]).is_none());
}

/// etcd members serve gRPC's health service, so they stand in for the
/// instances of a gRPC service here.
#[tokio::test]
async fn a_grpc_channel_follows_instances_as_they_are_listed_and_withdrawn() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let mut cluster = cluster().await;
    let client = cluster.client().await;
    let session = Session::start(client.clone(), Duration::from_secs(10));
    let lease = session.wait_alive().await;
    let addr = |i: usize, c: &mut coord::etcd::local::LocalCluster| {
        c.member(i)
            .endpoint()
            .trim_start_matches("http://")
            .to_owned()
    };
    let (a0, a1) = (addr(0, &mut cluster), addr(1, &mut cluster));
    registry::list(&client, "/coord", "etcd", "m0", &endpoint(&a0), lease)
        .await
        .expect("list");
    let cache = Cache::new(client.clone());
    let (channel, _follow) = registry::grpc_channel(&cache, "/coord", "etcd");
    let check = |channel: tonic::transport::Channel| async move {
        let mut health = HealthClient::new(channel);
        tokio::time::timeout(
            Duration::from_secs(1),
            health.check(HealthCheckRequest {
                service: String::new(),
            }),
        )
        .await
        .ok()
        .and_then(|r| r.ok())
    };
    eventually("a call through the channel", || check(channel.clone())).await;
    registry::unlist(&client, "/coord", "etcd", "m0")
        .await
        .expect("unlist");
    eventually("calls to fail with no instance listed", || {
        let c = channel.clone();
        async move { check(c).await.is_none().then_some(()) }
    })
    .await;
    registry::list(&client, "/coord", "etcd", "m1", &endpoint(&a1), lease)
        .await
        .expect("list");
    eventually("calls to reach the new instance", || check(channel.clone())).await;
    session.close().await;
}
