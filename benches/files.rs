//! Rendered files, measured: `cargo bench --bench files`.
//!
//! 1. Reaction: a put is sent → the file holds the new value, durably
//!    replaced (coord) — side by side, alternating, with
//!    `etcdctl watch … -- sh -c 'printf … > tmp && mv tmp file'`, and with
//!    the bare put's acknowledgement as the floor.
//! 2. Scale: 1,000 files over 10,000 keys — first full render, peak RSS,
//!    and the cost of one key change (renders counted).
//!
//! It starts its own etcd on free loopback ports; etcd and etcdctl must be
//! installed (`bash deploy/install-deps.sh`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coord::agent::files::{FileStats, FilesController};
use coord::agent::hooks::HookRunner;
use coord::agent::manifest::Manifest;
use coord::etcd::local::LocalEtcd;
use coord::etcd::{Cache, Client};
use tokio::sync::watch;

mod common;
use common::{ms, percentile};
use tokio_util::sync::CancellationToken;

const WARMUP: usize = 20;
const ROUNDS: usize = 300;

/// Waits until `path` holds exactly `want`, polling finely.
fn wait_for(path: &Path, want: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if std::fs::read(path).is_ok_and(|b| b == want.as_bytes()) {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{} never read {want}",
            path.display()
        );
        std::thread::sleep(Duration::from_micros(20));
    }
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

struct Controller {
    stats: watch::Receiver<FileStats>,
    cancel: CancellationToken,
    _specs: watch::Sender<Vec<coord::agent::manifest::FileSpec>>,
    _hooks: watch::Sender<Arc<HookRunner>>,
}

fn start_controller(client: &Client, manifest_text: &str, dir: &Path) -> Controller {
    let m = Manifest::parse(&dir.join("agent.toml"), manifest_text).expect("bench manifest");
    let controller = FilesController::new("/coord");
    let stats = controller.stats();
    let (specs_tx, specs) = watch::channel(m.files.clone());
    let (hooks_tx, hooks) = watch::channel(Arc::new(HookRunner::new("bench", &[]).expect("hooks")));
    let cancel = CancellationToken::new();
    tokio::spawn(controller.run(Cache::new(client.clone()), specs, hooks, cancel.clone()));
    Controller {
        stats,
        cancel,
        _specs: specs_tx,
        _hooks: hooks_tx,
    }
}

fn header(etcd: &LocalEtcd) -> String {
    format!(
        "[agent]\nname = \"bench\"\n[etcd]\nendpoints = [\"{}\"]\n",
        etcd.endpoint()
    )
}

async fn reaction(etcd: &LocalEtcd, client: &Client) {
    let dir = tempfile::tempdir().expect("tmp");
    let coord_out = dir.path().join("coord.out");
    let peer_out = dir.path().join("peer.out");
    client
        .put("/bench/coord", "start", None)
        .await
        .expect("put");
    let text = format!(
        "{}[[file]]\npath = \"{}\"\nkey = \"/bench/coord\"\n",
        header(etcd),
        coord_out.display()
    );
    let controller = start_controller(client, &text, dir.path());
    wait_for(&coord_out, "start");
    let mut peer = spawn_peer(&etcd.endpoint(), &peer_out);
    // The watch prints nothing until it is set up; give it a moment, then
    // prove it works.
    std::thread::sleep(Duration::from_millis(300));
    client.put("/bench/peer", "start", None).await.expect("put");
    wait_for(&peer_out, "start");

    let (mut put_ack, mut coord_t, mut peer_t) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..WARMUP + ROUNDS {
        let value = format!("v{round}");
        let sent = Instant::now();
        client
            .put("/bench/coord", value.clone(), None)
            .await
            .expect("put");
        let acked = Instant::now();
        let done = wait_for(&coord_out, &value);
        let sent_peer = Instant::now();
        client
            .put("/bench/peer", value.clone(), None)
            .await
            .expect("put");
        let acked_peer = Instant::now();
        let done_peer = wait_for(&peer_out, &value);
        if round >= WARMUP {
            put_ack.push(acked - sent);
            put_ack.push(acked_peer - sent_peer);
            coord_t.push(done - sent);
            peer_t.push(done_peer - sent_peer);
        }
    }
    let _ = peer.kill();
    let _ = peer.wait();
    controller.cancel.cancel();
    let (put_med, put_p99) = (
        percentile(&mut put_ack, 0.5),
        percentile(&mut put_ack, 0.99),
    );
    let (c_med, c_p99) = (
        percentile(&mut coord_t, 0.5),
        percentile(&mut coord_t, 0.99),
    );
    let (p_med, p_p99) = (percentile(&mut peer_t, 0.5), percentile(&mut peer_t, 0.99));
    println!(
        "\nReaction: put sent -> file replaced ({ROUNDS} rounds each, alternating, after {WARMUP} warm-up)"
    );
    println!("{:<46} {:>10} {:>10}", "", "median", "p99");
    println!(
        "{:<46} {:>10} {:>10}",
        "bare put acknowledged (floor)",
        ms(put_med),
        ms(put_p99)
    );
    println!(
        "{:<46} {:>10} {:>10}",
        "coord (fsync + rename + fsync dir)",
        ms(c_med),
        ms(c_p99)
    );
    println!(
        "{:<46} {:>10} {:>10}",
        "etcdctl watch -- sh -c 'printf > tmp; mv'",
        ms(p_med),
        ms(p_p99)
    );
    println!(
        "coord median - bare put median = {}  (target: at most 1 ms);  etcdctl/coord median = {:.2}x",
        ms(c_med.saturating_sub(put_med)),
        p_med.as_secs_f64() / c_med.as_secs_f64()
    );
}

fn spawn_peer(endpoint: &str, out: &Path) -> Child {
    let tmp = out.with_extension("tmp");
    // etcdctl 3.4 puts the value in double quotes; strip them.
    let script = format!(
        "v=${{ETCD_WATCH_VALUE#\\\"}}; printf '%s' \"${{v%\\\"}}\" > '{}' && mv '{}' '{}'",
        tmp.display(),
        tmp.display(),
        out.display()
    );
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            endpoint,
            "watch",
            "--prefix",
            "/bench/peer",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl must be installed: bash deploy/install-deps.sh")
}

async fn scale(etcd: &LocalEtcd, client: &Client) {
    const KEYS: usize = 10_000;
    const FILES: usize = 1_000;
    let per_file = KEYS / FILES;
    for i in 0..KEYS {
        client
            .put(&format!("/scale/k{i:05}"), format!("value-{i}"), None)
            .await
            .expect("put");
    }
    let dir = tempfile::tempdir().expect("tmp");
    let mut text = header(etcd);
    let files: Vec<PathBuf> = (0..FILES)
        .map(|f| dir.path().join(format!("f{f:04}.conf")))
        .collect();
    for (f, path) in files.iter().enumerate() {
        let body: String = (0..per_file)
            .map(|j| format!("{{{{ key('/scale/k{:05}') }}}}\\n", f * per_file + j))
            .collect();
        text.push_str(&format!(
            "[[file]]\npath = \"{}\"\nsource = \"{body}\"\n",
            path.display()
        ));
    }
    let rss_before = peak_rss_kib();
    let started = Instant::now();
    let controller = start_controller(client, &text, dir.path());
    let mut stats = controller.stats.clone();
    let _ = stats.wait_for(|s| s.replaced as usize == FILES).await;
    let first = started.elapsed();
    let rss = peak_rss_kib();
    let renders_before = stats.borrow().total_renders();
    let mut change = Vec::new();
    for round in 0..50 {
        let value = format!("changed-{round}");
        let sent = Instant::now();
        client
            .put("/scale/k04242", value.clone(), None)
            .await
            .expect("put");
        let target = &files[4242 / per_file];
        let expected: String = (0..per_file)
            .map(|j| {
                let k = (4242 / per_file) * per_file + j;
                if k == 4242 {
                    format!("{value}\n")
                } else {
                    format!("value-{k}\n")
                }
            })
            .collect();
        wait_for(target, &expected);
        change.push(sent.elapsed());
    }
    let renders_after = stats.borrow().total_renders();
    controller.cancel.cancel();
    println!("\nScale: {FILES} files over {KEYS} keys ({per_file} keys each)");
    println!(
        "first full render (start -> all {FILES} written)   {}",
        ms(first)
    );
    println!(
        "peak RSS of this process                          {} MiB (before the files: {} MiB)",
        rss / 1024,
        rss_before / 1024
    );
    println!(
        "one key changed -> its file replaced              median {}  p99 {}",
        ms(percentile(&mut change.clone(), 0.5)),
        ms(percentile(&mut change, 0.99))
    );
    println!(
        "renders for 50 single-key changes                 {} (1 per change means only the dependent file re-rendered)",
        renders_after - renders_before
    );
}

fn main() {
    common::with_etcd("files", |etcd| async move {
        let client = etcd.client().await;
        reaction(&etcd, &client).await;
        scale(&etcd, &client).await;
    });
}
