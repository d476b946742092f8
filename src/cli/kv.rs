//! `coord kv`: the config center from the command line.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use super::connection::EtcdArgs;
use coord::config::{self, Entry, Expect, Schema};
use coord::etcd::Client;

/// Exit status when a guarded write was refused because the key is not at
/// the expected version (nothing was written; re-read and retry).
pub const EXIT_CONFLICT: u8 = 3;
/// Exit status when the key (or its value at a revision) does not exist.
pub const EXIT_NOT_FOUND: u8 = 4;
/// Exit status when a `--fence`d write was refused because the lock is no
/// longer held by the caller's holder key (nothing was written).
pub const EXIT_FENCED: u8 = 5;

#[derive(Debug, Args)]
#[command(
    after_help = "Exit status: 0 done, 1 error, 3 refused (version conflict: nothing written), 4 key not found (also `del` of a missing key, and a revision in the future), 5 refused (--fence: the lock is no longer ours; nothing written)."
)]
pub struct KvArgs {
    #[command(subcommand)]
    command: KvCommand,
    /// Print JSON (one object per line for ls, watch and history). For
    /// `set`, also refuse a value that is not valid JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    etcd: EtcdArgs,
}

#[derive(Debug, Subcommand)]
enum KvCommand {
    /// Print a key's value (with --json: also its version and revisions).
    Get {
        /// The etcd key, as given (no namespace is added), e.g. `/app/db`.
        #[arg(id = "KEY", value_name = "KEY")]
        key: String,
    },
    /// Write a key: the value from the argument (as given), --file, or stdin
    /// (one trailing newline dropped unless --raw).
    Set(SetArgs),
    /// Delete a key.
    Del {
        /// The etcd key, as given (no namespace is added), e.g. `/app/db`.
        #[arg(id = "KEY", value_name = "KEY")]
        key: String,
        /// Only if the key is at this version.
        #[arg(long, value_name = "N")]
        if_version: Option<i64>,
    },
    /// List the keys under a prefix with their versions and values.
    Ls {
        /// The key prefix, as given; empty lists every key.
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Print each change to a key (or every key under it, with --prefix)
    /// with its old and new value, until interrupted.
    Watch {
        /// The etcd key, as given (no namespace is added), e.g. `/app/db`.
        #[arg(id = "KEY", value_name = "KEY")]
        key: String,
        /// Watch every key under KEY.
        #[arg(long)]
        prefix: bool,
    },
    /// A key's values since it was created, newest first.
    History {
        /// The etcd key, as given (no namespace is added), e.g. `/app/db`.
        #[arg(id = "KEY", value_name = "KEY")]
        key: String,
        /// At most this many values.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// Write back the value a key had at a revision (see `history`), as a
    /// compare-and-set: refused if the key moves meanwhile.
    Rollback {
        /// The etcd key, as given (no namespace is added), e.g. `/app/db`.
        #[arg(id = "KEY", value_name = "KEY")]
        key: String,
        /// The revision whose value to restore.
        #[arg(long, value_name = "R")]
        to_revision: i64,
        /// Only if the key is still at this version (default: the version
        /// read just before writing).
        #[arg(long, value_name = "N")]
        if_version: Option<i64>,
    },
}

#[derive(Debug, Args)]
struct SetArgs {
    /// The etcd key, as given (no namespace is added), e.g. `/app/db`.
    #[arg(id = "KEY", value_name = "KEY")]
    key: String,
    /// The value, written as given (without it: --file, else stdin).
    #[arg(conflicts_with = "file")]
    value: Option<String>,
    /// Read the value from this file (`-` for stdin). One trailing newline
    /// is dropped, as from stdin (see --raw).
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Keep a value read from --file or stdin byte for byte: without it,
    /// one trailing newline (`\n` or `\r\n`), the one `echo` and editors
    /// add, is dropped.
    #[arg(long)]
    raw: bool,
    /// Only if the key is at this version.
    #[arg(long, value_name = "N", conflicts_with = "create")]
    if_version: Option<i64>,
    /// Only if the key does not exist yet.
    #[arg(long)]
    create: bool,
    /// Check the value against this JSON Schema first.
    #[arg(long, value_name = "FILE")]
    schema: Option<PathBuf>,
    /// Write only while lock LOCK is held by this command's holder key
    /// (`COORD_LOCK_KEY` and `COORD_FENCING_TOKEN`, which `coord lock` and
    /// tasks set): checked in the same transaction as the write, so a
    /// holder that lost the lock never writes (exit 5).
    #[arg(long, value_name = "LOCK", conflicts_with = "stage")]
    fence: Option<String>,
    /// Do not write the key: stage the value for the agents whose labels
    /// match SELECTOR (`role=canary`); their templates see it, everyone
    /// else keeps the current value. Then `coord rollout status|promote|abort KEY`.
    #[arg(long, value_name = "SELECTOR", conflicts_with_all = ["if_version", "create"])]
    stage: Option<coord::labels::Selector>,
    /// With --stage: how long the staged agents soak before --auto
    /// promotes (e.g. 2m).
    #[arg(long, value_name = "DURATION", requires = "stage", value_parser = humantime::parse_duration)]
    soak: Option<std::time::Duration>,
    /// With --stage: promote by itself after a clean soak (every staged
    /// agent rendered, checked and ran its hooks), abort at the first failure.
    #[arg(long, requires = "stage")]
    auto: bool,
}

pub async fn kv(args: KvArgs) -> anyhow::Result<ExitCode> {
    match run(args).await {
        Ok(code) => Ok(code),
        Err(e) => match e.downcast_ref::<config::Error>() {
            Some(config::Error::VersionConflict { .. }) => {
                eprintln!("error: {}", super::errors::describe(&e));
                Ok(ExitCode::from(EXIT_CONFLICT))
            }
            Some(
                config::Error::NotFound { .. }
                | config::Error::AbsentAt { .. }
                | config::Error::FutureRevision { .. },
            ) => {
                eprintln!("error: {}", super::errors::describe(&e));
                Ok(ExitCode::from(EXIT_NOT_FOUND))
            }
            Some(config::Error::Fenced { .. }) => {
                eprintln!("error: {}", super::errors::describe(&e));
                Ok(ExitCode::from(EXIT_FENCED))
            }
            _ => Err(e),
        },
    }
}

async fn run(args: KvArgs) -> anyhow::Result<ExitCode> {
    let json = args.json;
    // Read and check the value before connecting: a bad value touches
    // nothing, whether or not etcd is up.
    let prepared = match &args.command {
        KvCommand::Set(set) => Some(prepare(set, json)?),
        _ => None,
    };
    let (client, namespace) = args.etcd.connect().await?;
    match args.command {
        KvCommand::Get { key } => get(&client, &key, json).await?,
        KvCommand::Set(set) => {
            let expect = match (set.if_version, set.create) {
                (Some(v), _) => Expect::Version(v),
                (None, true) => Expect::ABSENT,
                (None, false) => Expect::Any,
            };
            let raw = prepared.expect("prepared above for set");
            if let Some(selector) = &set.stage {
                let how = super::rollout::How {
                    soak: set.soak.unwrap_or_default(),
                    auto: set.auto,
                };
                return super::rollout::stage(
                    &client, &namespace, &set.key, raw, selector, how, json,
                )
                .await;
            }
            let written = match &set.fence {
                None => config::set_raw(&client, &set.key, &raw, expect).await?,
                Some(lock_name) => {
                    let fence = holder_fence(&namespace, lock_name)?;
                    config::set_fenced(&client, &set.key, &raw, expect, &fence).await?
                }
            };
            print_written("set", &set.key, written, json);
        }
        KvCommand::Del { key, if_version } => {
            let expect = if_version.map_or(Expect::Any, Expect::Version);
            let existed = config::delete(&client, &key, expect).await?;
            if json {
                println!("{}", json!({"key": key, "deleted": existed}));
            } else if existed {
                println!("deleted {key}");
            }
            if !existed {
                // A script deleting what it thinks is there learns it was not.
                eprintln!("error: `{key}` does not exist; nothing was deleted");
                return Ok(ExitCode::from(EXIT_NOT_FOUND));
            }
        }
        KvCommand::Ls { prefix } => {
            for entry in config::list(&client, &prefix).await? {
                if json {
                    println!("{}", entry_json(&entry));
                } else {
                    println!("{}  v{}  {}", entry.key, entry.version, one_line(&entry));
                }
            }
        }
        KvCommand::Watch { key, prefix } => watch(&client, &key, prefix, json).await?,
        KvCommand::History { key, limit } => history(&client, &key, limit, json).await?,
        KvCommand::Rollback {
            key,
            to_revision,
            if_version,
        } => {
            let written = config::rollback(&client, &key, to_revision, if_version).await?;
            if json {
                println!(
                    "{}",
                    json!({"key": key, "restored_from": to_revision, "version": written.version, "revision": written.revision})
                );
            } else {
                println!(
                    "rolled {key} back to its value at revision {to_revision}: now version {} (revision {})",
                    written.version, written.revision
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The fence of lock `name` from this process's environment: its holder
/// key and fencing token, as `coord lock` hands them to its command.
fn holder_fence(namespace: &str, name: &str) -> anyhow::Result<coord::etcd::Condition> {
    let Ok(key) = std::env::var("COORD_LOCK_KEY") else {
        bail!(
            "--fence {name}: COORD_LOCK_KEY is not set; run this under `coord lock {name} -- …` (or a task holding `{name}`); nothing was written"
        );
    };
    if coord::lock::holder_lease(namespace, name, &key).is_none() {
        bail!(
            "--fence {name}: COORD_LOCK_KEY `{key}` is not a holder key of lock `{name}` (in namespace `{namespace}`); nothing was written"
        );
    }
    let token: i64 = std::env::var("COORD_FENCING_TOKEN")
        .ok()
        .and_then(|t| t.parse().ok())
        .with_context(|| {
            format!("--fence {name}: COORD_FENCING_TOKEN is missing or not a number; nothing was written")
        })?;
    Ok(coord::lock::fence(&key, token))
}

/// The bytes to write, read from where the arguments say and checked.
fn prepare(set: &SetArgs, json: bool) -> anyhow::Result<Vec<u8>> {
    let read = match (&set.value, &set.file) {
        (Some(_), _) => None,
        (None, Some(path)) if path.as_os_str() != "-" => Some(
            std::fs::read(path)
                .with_context(|| format!("cannot read the value from `{}`", path.display()))?,
        ),
        (None, _) => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read the value from stdin")?;
            Some(buf)
        }
    };
    let raw = match (read, &set.value) {
        (Some(bytes), _) if set.raw => bytes,
        (Some(bytes), _) => drop_one_newline(bytes),
        (None, v) => v.clone().unwrap_or_default().into_bytes(),
    };
    if json && let Err(e) = serde_json::from_slice::<serde_json::Value>(&raw) {
        bail!(
            "refused to set `{}`: the value is not valid JSON ({e}); nothing was written",
            set.key
        );
    }
    if let Some(path) = &set.schema {
        let text = std::fs::read(path)
            .with_context(|| format!("failed to read the schema `{}`", path.display()))?;
        let schema: serde_json::Value = serde_json::from_slice(&text)
            .with_context(|| format!("the schema `{}` is not JSON", path.display()))?;
        let schema = Schema::new(&schema)
            .map_err(|e| anyhow::anyhow!("`{}` is not a valid JSON Schema: {e}", path.display()))?;
        schema.check(&set.key, &raw)?;
    }
    Ok(raw)
}

/// `bytes` without one trailing `\n` (or `\r\n`): what `echo` or an
/// editor added, so `kv get` gives back what was typed.
fn drop_one_newline(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.ends_with(b"\r\n") {
        bytes.truncate(bytes.len() - 2);
    } else if bytes.ends_with(b"\n") {
        bytes.pop();
    }
    bytes
}

async fn get(client: &Client, key: &str, json: bool) -> anyhow::Result<()> {
    let entry = config::get_entry(client, key).await?;
    if json {
        println!("{}", entry_json(&entry));
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&entry.raw)?;
    if !entry.raw.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    Ok(())
}

async fn history(
    client: &Client,
    key: &str,
    limit: Option<usize>,
    json: bool,
) -> anyhow::Result<()> {
    let history = config::history(client, key, limit).await?;
    if json {
        for entry in &history.entries {
            println!("{}", entry_json(entry));
        }
        if let Some(compacted) = history.truncated_by_compaction {
            println!(
                "{}",
                json!({"key": key, "truncated_by_compaction": compacted})
            );
        }
    } else {
        println!("{:>10}  {:>7}  VALUE", "REVISION", "VERSION");
        for entry in &history.entries {
            println!(
                "{:>10}  {:>7}  {}",
                entry.mod_revision,
                entry.version,
                one_line(entry)
            );
        }
        if let Some(compacted) = history.truncated_by_compaction {
            println!(
                "(incomplete: older values were compacted away; etcd keeps revisions from {compacted} on)"
            );
        }
    }
    if let Some(compacted) = history.truncated_by_compaction {
        eprintln!(
            "warning: the history of `{key}` is incomplete: values before revision {compacted} were compacted away"
        );
    }
    Ok(())
}

async fn watch(client: &Client, key: &str, prefix: bool, json: bool) -> anyhow::Result<()> {
    let mut watch = if prefix {
        config::watch_prefix(client, key).await?
    } else {
        config::watch(client, key).await?
    };
    if !json {
        eprintln!(
            "watching {key}{}; Ctrl-C to stop",
            if prefix { "*" } else { "" }
        );
    }
    loop {
        let changes = tokio::select! {
            changes = watch.next() => changes?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        for c in changes {
            if json {
                println!(
                    "{}",
                    json!({
                        "key": c.key,
                        "revision": c.revision,
                        "type": if c.new.is_some() { "set" } else { "delete" },
                        "version": c.new.as_ref().map_or(0, |e| e.version),
                        "old": c.old.as_ref().map(Entry::json),
                        "new": c.new.as_ref().map(Entry::json),
                    })
                );
            } else {
                let show = |e: &Option<Entry>| e.as_ref().map_or("(none)".into(), one_line);
                match &c.new {
                    Some(new) => println!(
                        "{}  set  {}  v{}: {} -> {}",
                        c.revision,
                        c.key,
                        new.version,
                        show(&c.old),
                        show(&c.new)
                    ),
                    None => println!("{}  del  {}: {}", c.revision, c.key, show(&c.old)),
                }
            }
        }
    }
}

fn print_written(what: &str, key: &str, written: config::Written, json: bool) {
    if json {
        println!(
            "{}",
            json!({"key": key, "version": written.version, "revision": written.revision})
        );
    } else {
        println!(
            "{what} {key}: version {} (revision {})",
            written.version, written.revision
        );
    }
}

fn entry_json(entry: &Entry) -> serde_json::Value {
    json!({
        "key": entry.key,
        "value": entry.json(),
        "version": entry.version,
        "revision": entry.mod_revision,
        "create_revision": entry.create_revision,
    })
}

/// A value on one line, for listings: newlines shown as `\n`.
fn one_line(entry: &Entry) -> String {
    entry.text().replace('\n', "\\n")
}
