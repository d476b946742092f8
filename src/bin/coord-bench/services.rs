//! Services, through the library: one agent's `ServicesController`
//! registers 1,000 instances (time until all are listed), and a client
//! with its own connection sees an instance listed or withdrawn (time from
//! the write being sent to `ServiceWatch` reporting it). No peer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use coord::agent::controller::Context;
use coord::agent::hooks::HookRunner;
use coord::agent::manifest::Manifest;
use coord::agent::services::ServicesController;
use coord::etcd::{Cache, Session};
use coord::registry::{self, Endpoint, ServiceWatch};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Ctx;
use crate::report::{Report, Row, Stat, Unit};

const INSTANCES: usize = 1_000;
const WARMUP: usize = 20;

pub async fn run(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let took = registration(ctx).await?;
    println!(
        "  {INSTANCES} instances: health record + listing each, batched in transactions ({:.1} µs per instance)",
        took * 1e3 / INSTANCES as f64
    );
    report.add(
        Row::new(
            "services",
            "1,000 instances registered → all listed",
            Unit::Ms,
        )
        .coord(Stat::one(took)),
    );
    let samples = watch_latency(ctx).await?;
    report.add(
        Row::new(
            "services",
            "instance listed/withdrawn → ServiceWatch sees it",
            Unit::Ms,
        )
        .coord(Stat::of(&samples)),
    );
    Ok(())
}

async fn registration(ctx: &Ctx) -> anyhow::Result<f64> {
    let client = &ctx.client;
    let mut text = format!(
        "[agent]\nname = \"bench\"\n[etcd]\nendpoints = [\"{}\"]\n",
        ctx.endpoint()
    );
    for i in 0..INSTANCES {
        text.push_str(&format!(
            "[[service]]\nname = \"api\"\nid = \"i{i:04}\"\naddress = \"10.0.{}.{}:8080\"\n",
            i / 256,
            i % 256
        ));
    }
    let dir = tempfile::tempdir()?;
    let m = Manifest::parse(&dir.path().join("agent.toml"), &text)
        .map_err(|e| anyhow::anyhow!("bench manifest: {e:?}"))?;
    let session = Session::start(client.clone(), Duration::from_secs(10));
    session.wait_alive().await;
    let (specs_tx, specs) = watch::channel(Vec::new());
    let (_hooks_tx, hooks) =
        watch::channel(Arc::new(HookRunner::new("bench", &[]).context("hooks")?));
    let cancel = CancellationToken::new();
    let ctx = Context {
        client: client.clone(),
        cache: Cache::new(client.clone()),
        session: session.subscribe(),
        hooks,
        status: Default::default(),
        cancel: cancel.clone(),
        namespace: "/coord".to_owned(),
        agent: "bench".to_owned(),
    };
    let started = Instant::now();
    specs_tx.send_replace(m.services.clone());
    let controller = tokio::spawn(ServicesController::new(&ctx).run(specs));
    loop {
        let listed = client
            .get_prefix(&registry::services_prefix("/coord"))
            .await?
            .kvs
            .len();
        if listed >= INSTANCES {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "only {listed} of {INSTANCES} listed after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = started.elapsed().as_secs_f64() * 1e3;
    cancel.cancel();
    let _ = controller.await;
    session.close().await;
    Ok(took)
}

async fn watch_latency(ctx: &Ctx) -> anyhow::Result<Vec<f64>> {
    let rounds = ctx.rounds(200, 50);
    let writer = ctx.etcd.client().await;
    let reader = ctx.etcd.client().await;
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
    for round in 0..rounds + WARMUP {
        let sent = Instant::now();
        if round % 2 == 0 {
            registry::list(&writer, "/coord", "watched", "x", &endpoint, lease).await?;
        } else {
            registry::unlist(&writer, "/coord", "watched", "x").await?;
        }
        let update = watch.next().await;
        anyhow::ensure!(!update.changes.is_empty(), "an update without changes");
        if round >= WARMUP {
            samples.push(sent.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!("  watch: {rounds} rounds after {WARMUP} warm-up");
    session.close().await;
    Ok(samples)
}
