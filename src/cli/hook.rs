use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;

use coord::agent::hooks::{Envelope, HookRunner, KeyReader, Outcome, SCHEMA_VERSION};
use coord::agent::manifest::{HookAction, Manifest, Runner, suggest};
use coord::etcd::Client;

#[derive(Debug, Args)]
pub struct HookArgs {
    /// The hook's name in the manifest.
    name: String,
    /// The event as JSON (`-` for stdin): at least `type` and its fields;
    /// `agent`, `time` and `schema` are filled in when missing.
    #[arg(long, value_name = "FILE|-")]
    event: String,
    /// The manifest that declares the hook.
    #[arg(
        long,
        env = "COORD_MANIFEST",
        value_name = "FILE",
        default_value = "agent.toml"
    )]
    manifest: PathBuf,
}

pub async fn hook(args: HookArgs) -> anyhow::Result<ExitCode> {
    let manifest = Manifest::load(&args.manifest)?;
    if manifest.hook(&args.name).is_none() {
        let known: Vec<&str> = manifest.hooks.iter().map(|h| h.name.as_str()).collect();
        if known.is_empty() {
            bail!(
                "no hook `{}` in `{}`: it defines no [[hook]]",
                args.name,
                args.manifest.display()
            );
        }
        bail!(
            "no hook `{}` in `{}`{}",
            args.name,
            args.manifest.display(),
            suggest(&args.name, &known)
        );
    }
    let text = if args.event == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("failed to read the event from stdin")?;
        s
    } else {
        std::fs::read_to_string(&args.event)
            .with_context(|| format!("failed to read the event from `{}`", args.event))?
    };
    let envelope = parse_event(&text, &manifest.agent.name)
        .with_context(|| format!("invalid event in `{}`", args.event))?;
    let keys = fetch_keys(&manifest).await;
    let m = manifest.clone();
    let runner = tokio::task::spawn_blocking(move || {
        HookRunner::for_manifest(&m, Arc::new(keys), Runner::OneShot)
    })
    .await??;
    eprintln!(
        "coord hook: running `{}` on {}",
        args.name,
        envelope.to_json()
    );
    let started = Instant::now();
    let result = runner.run_now(&args.name, envelope.event).await;
    let took = humantime::format_duration(round_ms(started.elapsed()));
    match result {
        Ok(Outcome::Done) => {
            println!("hook `{}`: done in {took}", args.name);
            Ok(ExitCode::SUCCESS)
        }
        Ok(Outcome::Vetoed(reason)) => {
            println!("hook `{}`: vetoed in {took}: {reason}", args.name);
            Ok(ExitCode::from(2))
        }
        Err(e) => {
            println!("hook `{}`: failed in {took}: {e}", args.name);
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The keys WASM hooks may read, fetched once from etcd. Without etcd the
/// hook still runs, reading nothing.
async fn fetch_keys(manifest: &Manifest) -> Fetched {
    let mut keys = BTreeMap::new();
    let prefixes: Vec<&String> = manifest
        .hooks
        .iter()
        .filter_map(|h| match &h.action {
            HookAction::Wasm(w) => Some(&w.read_prefixes),
            HookAction::Exec { .. } => None,
        })
        .flatten()
        .collect();
    if prefixes.is_empty() {
        return Fetched(keys);
    }
    let client = match manifest.connect_options() {
        Ok(opts) => Client::connect(&opts).await.ok(),
        Err(_) => None,
    };
    for prefix in prefixes {
        let got = match &client {
            Some(c) => c.get_prefix(prefix).await,
            None => continue,
        };
        match got {
            Ok(snapshot) => keys.extend(snapshot.kvs.into_iter().map(|kv| (kv.key, kv.value))),
            Err(e) => eprintln!(
                "coord hook: cannot read `{prefix}` from etcd ({e}); the plugin reads nothing there"
            ),
        }
    }
    Fetched(keys)
}

struct Fetched(BTreeMap<String, Vec<u8>>);

impl KeyReader for Fetched {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.0.get(key).cloned()
    }
}

fn round_ms(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_millis(d.as_millis() as u64)
}

/// An event as JSON, with `agent`, `time` and `schema` filled in if absent.
fn parse_event(text: &str, agent: &str) -> anyhow::Result<Envelope> {
    let mut value: serde_json::Value = serde_json::from_str(text)?;
    let Some(fields) = value.as_object_mut() else {
        bail!("an event is a JSON object with a `type` field");
    };
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    fields.entry("schema").or_insert(SCHEMA_VERSION.into());
    fields.entry("agent").or_insert(agent.into());
    fields.entry("time").or_insert(now.into());
    if fields.get("schema") != Some(&SCHEMA_VERSION.into()) {
        bail!("this coord speaks event schema {SCHEMA_VERSION}");
    }
    Ok(serde_json::from_value(value)?)
}

#[derive(Debug, Args)]
pub struct CompileWasmArgs {
    /// Where to write the compiled component.
    #[arg(long)]
    out: std::path::PathBuf,
}

/// Compiles the component on stdin into `--out` (see
/// `coord::agent::hooks::compile_in_child_processes`); no runtime.
pub fn compile_wasm(args: &CompileWasmArgs) -> ! {
    let mut bytes = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut bytes) {
        eprintln!("coord compile-wasm: cannot read the component: {e}");
        std::process::exit(1);
    }
    match coord::agent::hooks::compile_to_file(&bytes, &args.out) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("coord compile-wasm: {e}");
            std::process::exit(1)
        }
    }
}
