//! The watcher and the cache: first full read, resume, re-list, sharing.

use std::collections::BTreeMap;

use coord::etcd::{Cache, Client, ConnectOptions, Subscription};

use crate::support::{cluster, etcd, eventually};

fn contents(sub: &Subscription) -> BTreeMap<String, String> {
    sub.list()
        .into_iter()
        .map(|kv| (kv.key.clone(), kv.value_str().into_owned()))
        .collect()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[tokio::test]
async fn the_cache_is_ready_only_after_the_first_full_read_and_follows_changes() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/a", "1", None).await.expect("put");
    client.put("/app/b", "2", None).await.expect("put");
    client.put("/other/x", "9", None).await.expect("put");
    let cache = Cache::new(client.clone());
    let sub = cache.subscribe("/app/");
    sub.ready().await;
    assert_eq!(contents(&sub), map(&[("/app/a", "1"), ("/app/b", "2")]));
    client.put("/app/a", "3", None).await.expect("put");
    client.delete("/app/b").await.expect("delete");
    eventually("the cache to follow the changes", || {
        let done = contents(&sub) == map(&[("/app/a", "3")]);
        async move { done.then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn consumers_of_one_prefix_share_one_watch_which_stops_with_the_last() {
    let etcd = etcd().await;
    let cache = Cache::new(etcd.client().await);
    let a = cache.subscribe("/app/");
    let b = cache.subscribe("/app/");
    let c = cache.subscribe("/other/");
    assert_eq!(cache.watched_prefixes(), 2);
    drop(a);
    assert_eq!(cache.watched_prefixes(), 2);
    drop(b);
    drop(c);
    assert_eq!(cache.watched_prefixes(), 0);
}

/// A one-key subscription sees its key and nothing of the keys that only
/// start with it (`web-1` → `web-10`), which a prefix of the same text
/// would; and it is a watch of its own, apart from that prefix's.
#[tokio::test]
async fn a_subscription_on_one_key_never_sees_the_keys_it_is_a_prefix_of() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/svc/web-10", "other", None).await.expect("put");
    let cache = Cache::new(client.clone());
    let mut key = cache.subscribe_key("/svc/web-1");
    let prefix = cache.subscribe("/svc/web-1");
    assert_eq!(cache.watched_prefixes(), 2);
    key.ready().await;
    prefix.ready().await;
    assert!(key.list().is_empty(), "{:?}", contents(&key));
    for i in 0..20 {
        client
            .put(&format!("/svc/web-1{i}"), "other", None)
            .await
            .expect("put");
    }
    client.put("/svc/web-1", "mine", None).await.expect("put");
    eventually("the prefix to see all of it", || {
        let n = prefix.list().len();
        async move { (n == 21).then_some(()) }
    })
    .await;
    // The first event the key's subscription receives is its own put.
    match tokio::time::timeout(crate::support::PATIENCE, key.recv()).await {
        Ok(coord::etcd::CacheEvent::Changed { changes, .. }) => {
            let keys: Vec<_> = changes.iter().map(|c| c.key().to_owned()).collect();
            assert_eq!(keys, ["/svc/web-1"]);
        }
        other => panic!("no change to the key itself: {other:?}"),
    }
    assert_eq!(contents(&key), map(&[("/svc/web-1", "mine")]));
    assert_eq!(key.stats().events(), 1);
}

/// A client that talks to member 0 only, so killing it disconnects the
/// watch while the other two members keep taking writes.
async fn member0_client(cluster: &mut crate::support::LocalCluster) -> Client {
    Client::connect(&ConnectOptions::new(vec![cluster.member(0).endpoint()]))
        .await
        .expect("connect")
}

#[tokio::test]
async fn the_watcher_resumes_after_a_disconnect_without_missing_a_change() {
    let mut cluster = cluster().await;
    let writer = cluster.client().await;
    writer.put("/app/a", "1", None).await.expect("put");
    let cache = Cache::new(member0_client(&mut cluster).await);
    let sub = cache.subscribe("/app/");
    sub.ready().await;
    // A change seen through the watch proves the watch stream is open.
    writer.put("/app/live", "1", None).await.expect("put");
    eventually("the watch to deliver a change", || {
        let seen = sub.get("/app/live").is_some();
        async move { seen.then_some(()) }
    })
    .await;
    writer.delete("/app/live").await.expect("delete");
    cluster.member(0).kill();
    // The writer's balanced channel may still pick the dead member first.
    for (k, v) in [("/app/a", "2"), ("/app/b", "1")] {
        eventually("a write to the remaining members", || async {
            writer.put(k, v, None).await.ok()
        })
        .await;
    }
    eventually("a delete on the remaining members", || async {
        writer.delete("/app/a").await.ok()
    })
    .await;
    cluster.member(0).restart().expect("restart");
    eventually("the cache to catch up", || {
        let done = contents(&sub) == map(&[("/app/b", "1")]);
        async move { done.then_some(()) }
    })
    .await;
    assert_eq!(sub.stats().relists(), 0, "no compaction, so no re-list");
    assert!(sub.stats().reconnects() >= 1);
}

#[tokio::test]
async fn the_watcher_relists_after_compaction_and_drops_keys_deleted_meanwhile() {
    let mut cluster = cluster().await;
    let writer = cluster.client().await;
    for k in ["a", "b", "c"] {
        writer
            .put(&format!("/app/{k}"), "1", None)
            .await
            .expect("put");
    }
    let cache = Cache::new(member0_client(&mut cluster).await);
    let sub = cache.subscribe("/app/");
    sub.ready().await;
    assert_eq!(contents(&sub).len(), 3);
    cluster.member(0).kill();
    eventually("a delete on the remaining members", || async {
        writer.delete("/app/a").await.ok()
    })
    .await;
    let mut revision = 0;
    for i in 0..20 {
        revision = eventually("a write", || async {
            writer.put("/app/c", i.to_string(), None).await.ok()
        })
        .await;
    }
    writer.put("/app/d", "1", None).await.expect("put");
    writer.compact(revision).await.expect("compact");
    cluster.member(0).restart().expect("restart");
    eventually("the cache to re-list", || {
        let done = contents(&sub) == map(&[("/app/b", "1"), ("/app/c", "19"), ("/app/d", "1")]);
        async move { done.then_some(()) }
    })
    .await;
    assert!(
        sub.stats().relists() >= 1,
        "the gap was compacted: a re-list was needed"
    );
}

#[tokio::test]
async fn the_cache_lists_again_when_etcd_comes_back_with_less_history() {
    let mut etcd = etcd().await;
    let client = etcd.client().await;
    for k in ["a", "b", "c"] {
        client
            .put(&format!("/app/{k}"), "old", None)
            .await
            .expect("put");
    }
    let cache = Cache::new(client.clone());
    let sub = cache.subscribe("/app/");
    sub.ready().await;
    // Restored from nothing: a lower revision and none of the old keys.
    etcd.member().wipe_data().expect("wipe");
    etcd.member().restart().expect("restart");
    etcd.member().wait_healthy().await.expect("healthy");
    client.put("/app/new", "1", None).await.expect("put");
    eventually("the cache to forget the keys that are gone", || {
        let done = contents(&sub) == map(&[("/app/new", "1")]);
        async move { done.then_some(()) }
    })
    .await;
    assert!(sub.stats().relists() >= 1);
}
