//! A warm WASM hook call against a shell hook doing the same work.
//!
//! `cargo bench --bench hooks` builds the plugins (release, wasm32-wasip2),
//! loads `log-events` and prints a table of median and p99 latencies:
//!
//! - **wasm**: `WasmPlugin::call` with `log-events`: a fresh instance from
//!   the pre-instantiated template, the event converted to WIT, the plugin
//!   formats its one-line summary and logs it through the host.
//! - **shell, /bin/cat**: what the shell-hook runner does for the same event
//!   (argv, no shell): spawn the program with the event's `COORD_*`
//!   environment, write the JSON to its stdin, collect its stdout (the line
//!   the agent would log) and wait for it. `cat` is the cheapest program
//!   that reads the event and says something about it, so this is the
//!   fairest equivalent of `log-events`.
//! - **shell, /bin/true**: spawning alone, no I/O: the floor for any shell
//!   hook.
//!
//! The three are measured in alternating rounds after a warm-up, so all
//! see the same machine. No tracing subscriber is installed, for either:
//! the plugin's log line and cat's output are produced but not printed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coord::agent::hooks::{Envelope, Event, KeyReader, WasmHost};
use coord::agent::manifest::{HookSpec, Manifest};
use tokio::io::AsyncWriteExt;

const ROUNDS: usize = 100;
const WASM_PER_ROUND: usize = 20;
const SHELL_PER_ROUND: usize = 3;
const WARM_UP: usize = 50;
const TIMEOUT: Duration = Duration::from_secs(5);

struct NoKeys;

impl KeyReader for NoKeys {
    fn get(&self, _key: &str) -> Option<Vec<u8>> {
        None
    }
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let wasm = build_plugins(&root).join("log_events.wasm");
    let spec = hook_spec(&wasm);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(spec, &wasm));
}

async fn run(spec: HookSpec, wasm_file: &Path) {
    let cache = tempfile::tempdir().expect("temp dir");
    let host = WasmHost::new(Some(cache.path())).expect("wasm host");
    let keys: Arc<dyn KeyReader> = Arc::new(NoKeys);
    let started = Instant::now();
    host.load(&spec, keys.clone()).expect("load (compile)");
    let compile = started.elapsed();
    let started = Instant::now();
    let plugin = host.load(&spec, keys).expect("load (cache)");
    let from_cache = started.elapsed();
    assert!(plugin.from_cache(), "second load from the cache");

    let envelope = Envelope::new(
        "web-01",
        Event::LockAcquired {
            lock: "reports".into(),
            fencing_token: 42,
        },
    );
    for _ in 0..WARM_UP {
        plugin.call(&envelope, TIMEOUT).await.expect("wasm call");
        shell("/bin/cat", &envelope).await;
        shell("/bin/true", &envelope).await;
    }

    let mut wasm = Vec::with_capacity(ROUNDS * WASM_PER_ROUND);
    let mut cat = Vec::with_capacity(ROUNDS * SHELL_PER_ROUND);
    let mut tru = Vec::with_capacity(ROUNDS * SHELL_PER_ROUND);
    for _ in 0..ROUNDS {
        for _ in 0..WASM_PER_ROUND {
            let t = Instant::now();
            plugin.call(&envelope, TIMEOUT).await.expect("wasm call");
            wasm.push(t.elapsed());
        }
        for _ in 0..SHELL_PER_ROUND {
            let t = Instant::now();
            shell("/bin/cat", &envelope).await;
            cat.push(t.elapsed());
            let t = Instant::now();
            shell("/bin/true", &envelope).await;
            tru.push(t.elapsed());
        }
    }

    println!("{:<58} {:>6} {:>10} {:>10}", "hook", "n", "median", "p99");
    row("wasm: log-events, fresh instance per call", &mut wasm);
    row(
        "shell: /bin/cat, COORD_* env + JSON on stdin, stdout read",
        &mut cat,
    );
    row("shell: /bin/true, spawn and wait only (floor)", &mut tru);
    let ratio = |s: &[Duration]| s[s.len() / 2].as_secs_f64() / wasm[wasm.len() / 2].as_secs_f64();
    println!(
        "\nmedian ratio: /bin/cat {:.1}x, /bin/true {:.1}x the wasm call",
        ratio(&cat),
        ratio(&tru)
    );
    println!(
        "loading log-events ({} bytes): compile {}, from the cache {}",
        std::fs::metadata(wasm_file).map(|m| m.len()).unwrap_or(0),
        fmt(compile),
        fmt(from_cache)
    );
}

/// Runs `program` the way the shell-hook runner does.
async fn shell(program: &str, envelope: &Envelope) {
    let mut child = tokio::process::Command::new(program)
        .envs(envelope.env())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let json = envelope.to_json();
    if let Some(mut stdin) = child.stdin.take() {
        // `true` exits without reading: a broken pipe is expected there.
        let _ = stdin.write_all(json.as_bytes()).await;
    }
    let out = child.wait_with_output().await.expect("wait");
    assert!(out.status.success(), "{program} failed");
}

fn row(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let n = samples.len();
    let p99 = samples[(n * 99).div_ceil(100) - 1];
    println!(
        "{what:<58} {n:>6} {:>10} {:>10}",
        fmt(samples[n / 2]),
        fmt(p99)
    );
}

fn fmt(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    }
}

fn hook_spec(wasm: &Path) -> HookSpec {
    let text = format!(
        "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n\n[[hook]]\nname = \"audit\"\nwasm = '{}'\ntimeout = \"5s\"\n",
        wasm.display()
    );
    let manifest = Manifest::parse(Path::new("bench.toml"), &text).expect("bench manifest");
    manifest.hooks.into_iter().next().expect("one hook")
}

/// Builds the plugins workspace and returns its output directory.
fn build_plugins(root: &Path) -> PathBuf {
    let target = root.join("plugins/target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--locked",
            "--release",
            "--target",
            "wasm32-wasip2",
        ])
        .arg("--manifest-path")
        .arg(root.join("plugins/Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .expect("run cargo");
    assert!(
        status.success(),
        "building the plugins failed; is the target installed? rustup target add wasm32-wasip2"
    );
    target.join("wasm32-wasip2/release")
}
