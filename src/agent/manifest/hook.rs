//! `[[hook]]`: named actions that resources run on events.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Location;
use super::diagnostics::Diagnostics;
use super::reader::TableReader;

/// Default time a shell hook may run.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a WASM hook call may run.
pub const DEFAULT_WASM_TIMEOUT: Duration = Duration::from_secs(1);
/// Default memory a WASM hook instance may grow to.
pub const DEFAULT_WASM_MEMORY_MIB: u64 = 64;
/// Default number of retries after a failed run.
pub const DEFAULT_RETRIES: u32 = 3;
/// A hook's `timeout`.
pub const HOOK_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(24 * 3600);
/// `max_memory_mib`: a 32-bit WebAssembly memory cannot pass 4 GiB.
pub const MEMORY_MIB_RANGE: RangeInclusive<u64> = 1..=4096;

/// `fleet = { at_most }`: how many agents may run the hook at once.
pub const AT_MOST_RANGE: RangeInclusive<u32> = 1..=100_000;
/// `fleet = { splay }`.
pub const SPLAY_RANGE: RangeInclusive<Duration> = Duration::ZERO..=Duration::from_secs(24 * 3600);

/// `fleet = { at_most = N, splay = "10s" }`: the hook's runs across the
/// fleet go through a gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetGate {
    /// At most this many agents run the hook at once.
    pub at_most: u32,
    /// Before queueing at the gate, wait a random time up to this.
    pub splay: Duration,
}

/// One `[[hook]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSpec {
    pub name: String,
    pub action: HookAction,
    pub timeout: Duration,
    /// Extra environment: for a shell hook added to the agent's, for a WASM
    /// hook the only environment it sees.
    pub env: BTreeMap<String, String>,
    /// Retries after a failed run (with backoff) before giving up on an event.
    pub retries: u32,
    /// The fleet-wide gate its event-driven runs pass through, if any.
    pub fleet: Option<FleetGate>,
    /// Where the hook is declared, for errors found after parsing.
    pub location: Location,
}

/// What a hook does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookAction {
    /// Run a program (argv, no shell).
    Exec { argv: Vec<String> },
    /// Call a WASM component.
    Wasm(WasmSpec),
}

/// A WASM hook's component and what it is granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmSpec {
    /// The component file (`.wasm`), relative paths from the manifest's
    /// directory.
    pub path: PathBuf,
    /// The plugin's own configuration, as JSON text.
    pub config: String,
    /// Key prefixes the plugin may read from the agent's cache, by key
    /// segment: `/app` grants `/app` and `/app/…`, not `/apple`.
    pub read_prefixes: Vec<String>,
    /// The most linear memory one instance may have, in bytes.
    pub max_memory: u64,
    /// Host directories the plugin may read (preopened read-only, at the same path).
    pub dirs: Vec<PathBuf>,
    /// Whether the plugin may open network connections.
    pub network: bool,
}

pub(super) fn hook(
    d: &mut Diagnostics<'_>,
    mut t: TableReader<'_, '_>,
    base: &Path,
) -> Option<HookSpec> {
    let before = d.len();
    let name = t.required::<String>(d, "name", "give the hook a name to refer to it by");
    if let Some(n) = &name
        && (n.is_empty()
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    {
        d.error(
            t.span_of("name"),
            format!("invalid hook name `{n}`: use letters, digits, `-` and `_`"),
        );
    }
    let exec = t.optional::<Vec<String>>(d, "exec");
    let wasm = t.optional::<PathBuf>(d, "wasm");
    let timeout = t.within(d, "timeout", HOOK_TIMEOUT_RANGE);
    let env = t
        .optional::<BTreeMap<String, String>>(d, "env")
        .unwrap_or_default();
    let retries = t.optional::<u32>(d, "retries").unwrap_or(DEFAULT_RETRIES);
    let config = t.optional::<serde_json::Value>(d, "config");
    let read_prefixes = t.optional::<Vec<String>>(d, "read_prefixes");
    if let Some(prefixes) = &read_prefixes {
        for p in prefixes.iter().filter(|p| !p.starts_with('/')) {
            d.error(
                t.span_of("read_prefixes"),
                format!("invalid prefix `{p}` in `read_prefixes`: keys start with `/`"),
            );
        }
    }
    let max_memory_mib = t.within(d, "max_memory_mib", MEMORY_MIB_RANGE);
    let dirs = t.optional::<Vec<PathBuf>>(d, "dirs");
    let network = t.optional::<bool>(d, "network");
    let fleet = t.table(d, "fleet").and_then(|mut f| {
        let before = d.len();
        if !f.has("at_most") {
            d.error(
                f.span(),
                "missing `at_most` in [hook.fleet]: say how many agents may run the hook at once, e.g. at_most = 1",
            );
        }
        let at_most = f.within(d, "at_most", AT_MOST_RANGE);
        let splay = f.within(d, "splay", SPLAY_RANGE);
        f.finish(d);
        (d.len() == before).then(|| FleetGate {
            at_most: at_most.unwrap_or(1),
            splay: splay.unwrap_or(Duration::ZERO),
        })
    });
    let action = match (exec, wasm) {
        (Some(argv), None) => {
            if argv.is_empty() || argv[0].is_empty() {
                d.error(
                    t.span_of("exec"),
                    "`exec` is empty: give the program and its arguments",
                );
            }
            for (key, given) in [
                ("config", config.is_some()),
                ("read_prefixes", read_prefixes.is_some()),
                ("max_memory_mib", max_memory_mib.is_some()),
                ("dirs", dirs.is_some()),
                ("network", network.is_some()),
            ] {
                if given {
                    d.error(
                        t.span_of(key),
                        format!("`{key}` is for `wasm` hooks, not `exec` ones"),
                    );
                }
            }
            Some(HookAction::Exec { argv })
        }
        (None, Some(path)) => Some(HookAction::Wasm(WasmSpec {
            path: base.join(path),
            config: config.map_or_else(|| "{}".to_owned(), |c| c.to_string()),
            read_prefixes: read_prefixes.unwrap_or_default(),
            max_memory: max_memory_mib.unwrap_or(DEFAULT_WASM_MEMORY_MIB) * 1024 * 1024,
            dirs: dirs
                .unwrap_or_default()
                .into_iter()
                .map(|p| base.join(p))
                .collect(),
            network: network.unwrap_or(false),
        })),
        (Some(_), Some(_)) => {
            d.error(
                t.span_of("wasm"),
                "a hook is either `exec` or `wasm`, not both",
            );
            None
        }
        (None, None) => {
            d.error(
                t.span(),
                "missing `exec` or `wasm` in [[hook]]: say what the hook runs",
            );
            None
        }
    };
    let location = d.locate(t.span());
    t.finish(d);
    let default_timeout = match &action {
        Some(HookAction::Wasm(_)) => DEFAULT_WASM_TIMEOUT,
        _ => DEFAULT_EXEC_TIMEOUT,
    };
    (d.len() == before).then(|| HookSpec {
        name: name.unwrap_or_default(),
        action: action.unwrap_or(HookAction::Exec { argv: Vec::new() }),
        timeout: timeout.unwrap_or(default_timeout),
        env,
        retries,
        fleet,
        location,
    })
}
