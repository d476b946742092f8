//! Services, measured: `cargo bench --bench services`.
//!
//! 1. One agent registers 1,000 instances: time until all are listed.
//! 2. A watching client (its own connection and cache) sees a change:
//!    time from the write being sent to `ServiceWatch` reporting it.
//!
//! It starts its own etcd on free loopback ports.

use std::sync::Arc;
use std::time::{Duration, Instant};

use coord::agent::hooks::HookRunner;
use coord::agent::manifest::Manifest;
use coord::agent::services::ServicesController;
use coord::etcd::local::LocalEtcd;
use coord::etcd::{Cache, Client, Session};
use coord::registry::{self, Endpoint, ServiceWatch};
use tokio::sync::watch;

mod common;
use common::{ms, percentile};
use tokio_util::sync::CancellationToken;

const INSTANCES: usize = 1_000;
const ROUNDS: usize = 200;

async fn registration(etcd: &LocalEtcd, client: &Client) {
    let mut text = format!(
        "[agent]\nname = \"bench\"\n[etcd]\nendpoints = [\"{}\"]\n",
        etcd.endpoint()
    );
    for i in 0..INSTANCES {
        text.push_str(&format!(
            "[[service]]\nname = \"api\"\nid = \"i{i:04}\"\naddress = \"10.0.{}.{}:8080\"\n",
            i / 256,
            i % 256
        ));
    }
    let dir = tempfile::tempdir().expect("tmp");
    let m = Manifest::parse(&dir.path().join("agent.toml"), &text).expect("manifest");
    let session = Session::start(client.clone(), Duration::from_secs(10));
    session.wait_alive().await;
    let controller = ServicesController::new(
        client.clone(),
        Cache::new(client.clone()),
        "/coord",
        "bench",
    );
    let (specs_tx, specs) = watch::channel(Vec::new());
    let (_hooks_tx, hooks) =
        watch::channel(Arc::new(HookRunner::new("bench", &[]).expect("hooks")));
    let cancel = CancellationToken::new();
    let started = Instant::now();
    specs_tx.send_replace(m.services.clone());
    tokio::spawn(controller.run(session.subscribe(), specs, hooks, cancel.clone()));
    loop {
        let listed = client
            .get_prefix(&registry::services_prefix("/coord"))
            .await
            .expect("read")
            .kvs
            .len();
        if listed == INSTANCES {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = started.elapsed();
    println!(
        "\nRegistration: one agent, {INSTANCES} instances (health record + listing each, batched in transactions)"
    );
    println!(
        "all listed after {}  ({:.1} µs per instance)",
        ms(took),
        took.as_secs_f64() * 1e6 / INSTANCES as f64
    );
    cancel.cancel();
    session.close().await;
}

async fn watch_latency(etcd: &LocalEtcd) {
    let writer = etcd.client().await;
    let reader = etcd.client().await;
    let session = Session::start(writer.clone(), Duration::from_secs(10));
    let lease = session.wait_alive().await;
    let endpoint = Endpoint {
        addr: "10.1.0.1:80".into(),
        metadata: Default::default(),
    };
    let cache = Cache::new(reader);
    let mut watch = ServiceWatch::new(&cache, "/coord", "watched");
    watch.next().await;
    let mut samples = Vec::new();
    for round in 0..ROUNDS + 20 {
        let sent = Instant::now();
        if round % 2 == 0 {
            registry::list(&writer, "/coord", "watched", "x", &endpoint, lease)
                .await
                .expect("list");
        } else {
            registry::unlist(&writer, "/coord", "watched", "x")
                .await
                .expect("unlist");
        }
        let update = watch.next().await;
        assert!(!update.changes.is_empty());
        if round >= 20 {
            samples.push(sent.elapsed());
        }
    }
    println!(
        "\nWatch: a client with its own connection sees an instance listed or withdrawn ({ROUNDS} rounds)"
    );
    println!(
        "median {}  p99 {}",
        ms(percentile(&mut samples, 0.5)),
        ms(percentile(&mut samples, 0.99))
    );
    session.close().await;
}

fn main() {
    common::with_etcd("services", |etcd| async move {
        let client = etcd.client().await;
        registration(&etcd, &client).await;
        watch_latency(&etcd).await;
    });
}
