//! A warm WASM hook call against a shell hook doing the same work, through
//! the library (`WasmHost`, the agent's own hook host).
//!
//! - coord: `WasmPlugin::call` with `log-events`: a fresh instance from the
//!   pre-instantiated template, the event converted to WIT, the plugin
//!   formats its one-line summary and logs it through the host.
//! - peer: what the shell-hook runner does for the same event (argv, no
//!   shell): spawn `/bin/cat` with the event's `COORD_*` environment, write
//!   the JSON to its stdin, collect its stdout and wait. `/bin/true`
//!   (spawn and wait only) is the floor for any shell hook.
//!
//! Alternating rounds after a warm-up; no tracing subscriber is installed,
//! so the plugin's log line and cat's output are produced but not printed.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use coord::agent::hooks::{Envelope, Event, KeyReader, WasmHost};
use coord::agent::manifest::{HookSpec, Manifest};
use tokio::io::AsyncWriteExt;

use crate::Ctx;
use crate::harness::log_events_plugin;
use crate::report::{Report, Row, Stat, Unit};

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

pub async fn run(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let rounds = ctx.rounds(100, 30);
    let wasm_file = log_events_plugin(ctx)?;
    let spec = hook_spec(&wasm_file)?;
    let cache = tempfile::tempdir()?;
    let host = WasmHost::new(Some(cache.path())).context("wasm host")?;
    let keys: Arc<dyn KeyReader> = Arc::new(NoKeys);
    let started = Instant::now();
    host.load(&spec, keys.clone()).context("load (compile)")?;
    let compile = started.elapsed();
    let started = Instant::now();
    let plugin = host.load(&spec, keys).context("load (cache)")?;
    let from_cache = started.elapsed();

    let envelope = Envelope::new(
        "web-01",
        Event::LockAcquired {
            lock: "reports".into(),
            fencing_token: 42,
        },
    );
    for _ in 0..WARM_UP {
        plugin.call(&envelope, TIMEOUT).await.context("wasm call")?;
        shell("/bin/cat", &envelope).await?;
        shell("/bin/true", &envelope).await?;
    }
    let us = |t: Instant| t.elapsed().as_secs_f64() * 1e6;
    let (mut wasm, mut cat, mut tru) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        for _ in 0..WASM_PER_ROUND {
            let t = Instant::now();
            plugin.call(&envelope, TIMEOUT).await.context("wasm call")?;
            wasm.push(us(t));
        }
        for _ in 0..SHELL_PER_ROUND {
            let t = Instant::now();
            shell("/bin/cat", &envelope).await?;
            cat.push(us(t));
            let t = Instant::now();
            shell("/bin/true", &envelope).await?;
            tru.push(us(t));
        }
    }
    let (w, c, t) = (Stat::of(&wasm), Stat::of(&cat), Stat::of(&tru));
    println!(
        "  {} wasm calls, {} of each shell hook; /bin/true (spawn only, the floor) median {:.1} µs p99 {:.1} µs",
        wasm.len(),
        cat.len(),
        t.median,
        t.p99
    );
    println!(
        "  loading log-events ({} bytes): compile {:.1} ms, from the cache {:.1} ms",
        std::fs::metadata(&wasm_file).map(|m| m.len()).unwrap_or(0),
        compile.as_secs_f64() * 1e3,
        from_cache.as_secs_f64() * 1e3
    );
    report.add(
        Row::new("hooks", "warm WASM call vs shell hook (/bin/cat)", Unit::Us)
            .coord(w)
            .peer(c)
            .target("WASM median < 100 µs", w.median < 100.0),
    );
    Ok(())
}

/// Runs `program` the way the shell-hook runner does.
async fn shell(program: &str, envelope: &Envelope) -> anyhow::Result<()> {
    let mut child = tokio::process::Command::new(program)
        .envs(envelope.env())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {program}"))?;
    let json = envelope.to_json();
    if let Some(mut stdin) = child.stdin.take() {
        // `true` exits without reading: a broken pipe is expected there.
        let _ = stdin.write_all(json.as_bytes()).await;
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!("{program} failed: {}", out.status);
    }
    Ok(())
}

fn hook_spec(wasm: &Path) -> anyhow::Result<HookSpec> {
    let text = format!(
        "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n\n[[hook]]\nname = \"audit\"\nwasm = '{}'\ntimeout = \"5s\"\n",
        wasm.display()
    );
    let manifest = Manifest::parse(Path::new("bench.toml"), &text)
        .map_err(|e| anyhow::anyhow!("bench manifest: {e:?}"))?;
    manifest.hooks.into_iter().next().context("one hook")
}
