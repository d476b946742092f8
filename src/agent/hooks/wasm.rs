//! WASM hooks: WebAssembly components hosted with wasmtime, sandboxed.
//!
//! One [`WasmHost`] per agent owns the wasmtime `Engine`, the `Linker` with
//! the imports every plugin gets (WASI 0.2 and `coord:hooks/host`), the
//! epoch ticker and the compilation cache. [`WasmHost::load`] compiles a
//! component (or loads it from the cache), checks which world of
//! `plugins/wit/` it implements and pre-instantiates it;
//! [`WasmPlugin::call`] then runs each event in a fresh instance, bounded in
//! time (epoch deadline and a tokio timeout) and memory (a store limiter).
//!
//! Nothing a plugin does can panic the agent: every misbehaviour ends as a
//! [`HookError`].

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::{Envelope, Event, Health, HookError, KeyReader, Outcome};
use crate::agent::manifest::{HookAction, HookSpec, WasmSpec};
use crate::untrusted::Untrusted;

mod bindings {
    wasmtime::component::bindgen!({
        world: "event-hook",
        path: "plugins/wit/0.1.0",
        exports: { default: async },
    });

    pub mod validator {
        wasmtime::component::bindgen!({
            world: "validator",
            path: "plugins/wit/0.1.0",
            exports: { default: async },
            // Both worlds import the same `host` interface: one Rust trait.
            with: { "coord:hooks/host": super::coord::hooks::host },
        });
    }
}

use bindings::coord::hooks::{host, types as wit};
use bindings::validator::exports::coord::hooks::file_validator::Verdict;

/// The WIT package version the agent hosts.
pub const WIT_VERSION: &str = "0.1.0";

/// How often the epoch advances while a call runs; deadlines are checked at
/// this granularity.
const TICK: Duration = Duration::from_millis(1);
/// A plugin's log message is cut to this many bytes.
const MAX_LOG_MESSAGE: usize = 4096;
/// Log lines one call may write; the rest are dropped (a plugin looping
/// over `log` would otherwise flood the agent's log until its deadline).
const MAX_LOG_LINES: u32 = 1000;
/// Bytes of a plugin's stdout and stderr kept per call.
const MAX_CAPTURED_OUTPUT: usize = 16 * 1024;

/// Which world of `coord:hooks` a component implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum World {
    /// `event-hook`: exports `event-handler.handle`.
    EventHook,
    /// `validator`: exports `file-validator.validate`.
    Validator,
}

impl fmt::Display for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            World::EventHook => "event-hook",
            World::Validator => "validator",
        })
    }
}

/// Why the WASM host could not start.
#[derive(Debug, thiserror::Error)]
pub enum WasmHostError {
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(String),
    #[error("cannot use `{}` as the WASM compilation cache: {source}", path.display())]
    CacheDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The engine every host uses, and `coord compile-wasm` too: code compiled
/// by one loads in the other only if their settings are the same.
fn engine() -> Result<Engine, WasmHostError> {
    let mut config = Config::new();
    // Epochs rather than fuel: an atomic load per loop back-edge instead
    // of a counter update per basic block, and a deadline in time is
    // what the manifest's `timeout` means.
    config.epoch_interruption(true);
    // The on-demand allocator is the default; the pooling one would
    // reserve address space for every slot up front.
    Engine::new(&config).map_err(|e| WasmHostError::Engine(format!("{e:#}")))
}

/// The binary that compiles plugins in a child process, if set.
static CHILD_COMPILER: OnceLock<PathBuf> = OnceLock::new();

/// Makes every host of this process compile plugins that are not in its
/// cache in a child process, `<exe> compile-wasm --out <file>`, and load the
/// result from the cache. For long-lived processes (the agent): what
/// Cranelift leaves behind after compiling — some 8 MiB for a small plugin,
/// most of it not given back to the system — goes with the child. Hosts
/// without a cache, or a child that fails, compile in-process as before.
pub fn compile_in_child_processes(exe: PathBuf) {
    let _ = CHILD_COMPILER.set(exe);
}

/// `coord compile-wasm`: compiles the component `bytes` with the agent's
/// engine settings and writes it, whole or not at all, to `out`.
pub fn compile_to_file(bytes: &[u8], out: &Path) -> Result<(), String> {
    let engine = engine().map_err(|e| e.to_string())?;
    check_is_component(bytes)?;
    let component =
        Component::new(&engine, bytes).map_err(|e| format!("cannot compile it: {e:#}"))?;
    let serialized = component
        .serialize()
        .map_err(|e| format!("cannot serialise it: {e:#}"))?;
    write_atomically(out, &serialized).map_err(|e| format!("cannot write `{}`: {e}", out.display()))
}

/// Runs `exe compile-wasm --out out` on `bytes`.
fn compile_in_child(exe: &Path, bytes: &[u8], out: &Path) -> Result<(), String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(exe)
        .arg("compile-wasm")
        .arg("--out")
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start `{}`: {e}", exe.display()))?;
    // The child reads all of stdin before it writes anything, so writing
    // first and reading its output after cannot deadlock.
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(bytes)
            .map_err(|e| format!("cannot hand the plugin over: {e}"))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("lost the compiling process: {e}"))?;
    if output.status.success() && out.is_file() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

/// The agent's WebAssembly runtime: one engine, linker, epoch ticker and
/// compilation cache, shared by every plugin. Cheap to clone.
#[derive(Clone)]
pub struct WasmHost {
    inner: Arc<HostInner>,
}

struct HostInner {
    engine: Engine,
    linker: Linker<State>,
    cache_dir: Option<PathBuf>,
    /// Whether an unsafe cache directory was already warned about.
    cache_distrust_told: AtomicBool,
    ticker: Ticker,
}

impl fmt::Debug for WasmHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WasmHost")
            .field("cache_dir", &self.inner.cache_dir)
            .finish_non_exhaustive()
    }
}

impl WasmHost {
    /// Sets up the engine and, when `cache_dir` is given, a compilation
    /// cache there (created if missing).
    pub fn new(cache_dir: Option<&Path>) -> Result<WasmHost, WasmHostError> {
        let engine = engine()?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| WasmHostError::Engine(format!("{e:#}")))?;
        host::add_to_linker::<State, wasmtime::component::HasSelf<State>>(&mut linker, |s| s)
            .map_err(|e| WasmHostError::Engine(format!("{e:#}")))?;
        if let Some(dir) = cache_dir {
            create_private_dir(dir).map_err(|source| WasmHostError::CacheDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let ticker = Ticker::start(engine.clone())
            .map_err(|e| WasmHostError::Engine(format!("cannot start the epoch thread: {e}")))?;
        Ok(WasmHost {
            inner: Arc::new(HostInner {
                ticker,
                engine,
                linker,
                cache_dir: cache_dir.map(Path::to_owned),
                cache_distrust_told: AtomicBool::new(false),
            }),
        })
    }

    /// The compilation cache's directory, if there is one.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.inner.cache_dir.as_deref()
    }

    /// Compiles (or loads from the cache) the component of the WASM hook
    /// `spec`, links it and pre-instantiates it. Everything that can be
    /// checked before a call is checked here: that the file is a component,
    /// that it implements one of the worlds of `coord:hooks@0.1.0`, that its
    /// imports are ones the agent provides and that the granted directories
    /// exist. A component that exports both worlds' interfaces is taken as
    /// an event hook.
    ///
    /// Compiling takes tens of milliseconds (far more in a debug build):
    /// from async code, call it on a blocking thread.
    pub fn load(&self, spec: &HookSpec, keys: Arc<dyn KeyReader>) -> Result<WasmPlugin, HookError> {
        let HookAction::Wasm(wasm) = &spec.action else {
            return Err(HookError::Load {
                hook: spec.name.clone(),
                path: String::new(),
                message: "not a `wasm` hook".to_owned(),
            });
        };
        let load_error = |message: String| HookError::Load {
            hook: spec.name.clone(),
            path: wasm.path.display().to_string(),
            message,
        };
        let started = Instant::now();
        let bytes = std::fs::read(&wasm.path).map_err(|e| load_error(e.to_string()))?;
        check_is_component(&bytes).map_err(load_error)?;
        let (component, from_cache) = self.compile(&spec.name, &bytes).map_err(load_error)?;
        let pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .map_err(|e| load_error(format!("cannot link it: {e:#}")))?;
        let template = match bindings::EventHookPre::new(pre.clone()) {
            Ok(p) => Template::EventHook(p),
            Err(_) => match bindings::validator::ValidatorPre::new(pre) {
                Ok(p) => Template::Validator(p),
                Err(_) => {
                    return Err(load_error(format!(
                        "it implements neither world of coord:hooks@{WIT_VERSION}: it must export \
                         `coord:hooks/event-handler@{WIT_VERSION}` (world `event-hook`) or \
                         `coord:hooks/file-validator@{WIT_VERSION}` (world `validator`), and it \
                         exports {}",
                        export_names(&self.inner.engine, &component)
                    )));
                }
            },
        };
        for dir in &wasm.dirs {
            if !dir.is_dir() {
                return Err(load_error(format!(
                    "granted directory `{}` is not a directory on this host",
                    dir.display()
                )));
            }
        }
        let plugin = WasmPlugin {
            inner: Arc::new(PluginInner {
                host: self.inner.clone(),
                template,
                grants: Arc::new(Grants {
                    hook: spec.name.clone(),
                    config: wasm.config.clone(),
                    read_prefixes: wasm.read_prefixes.clone(),
                    keys,
                }),
                env: spec
                    .env
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                spec: wasm.clone(),
                from_cache,
            }),
        };
        info!(
            hook = %spec.name,
            world = %plugin.world(),
            path = %wasm.path.display(),
            from_cache,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Plugin loaded."
        );
        Ok(plugin)
    }

    /// The compiled component for `bytes`: from the cache when it has it,
    /// else compiled (and written to the cache). Says which.
    fn compile(&self, hook: &str, bytes: &[u8]) -> Result<(Component, bool), String> {
        let engine = &self.inner.engine;
        let Some(dir) = self.trusted_cache_dir(hook) else {
            return Component::new(engine, bytes)
                .map(|c| (c, false))
                .map_err(|e| format!("cannot compile it: {e:#}"));
        };
        let cached = dir.join(cache_file_name(engine, bytes));
        if cached.is_file() {
            match load_cached(engine, &cached) {
                Ok(component) => return Ok((component, true)),
                Err(e) => warn!(
                    hook,
                    file = %cached.display(),
                    error = %format!("{e:#}"),
                    "Cached compilation unusable; compiling again."
                ),
            }
        }
        if let Some(exe) = CHILD_COMPILER.get() {
            let compiled = compile_in_child(exe, bytes, &cached)
                .and_then(|()| load_cached(engine, &cached).map_err(|e| format!("{e:#}")));
            match compiled {
                Ok(component) => {
                    debug!(hook, file = %cached.display(), "Plugin compiled in a child process.");
                    return Ok((component, false));
                }
                // Compiling here tells what is wrong with the plugin, if
                // anything, in the usual words.
                Err(e) => {
                    debug!(hook, error = %e, "Compiling in a child process failed; compiling here.")
                }
            }
        }
        let component =
            Component::new(engine, bytes).map_err(|e| format!("cannot compile it: {e:#}"))?;
        match component.serialize() {
            Ok(serialized) => {
                if let Err(e) = write_atomically(&cached, &serialized) {
                    warn!(hook, file = %cached.display(), error = %e, "Cannot write the compilation cache; going on without it.");
                }
            }
            Err(e) => {
                warn!(hook, error = %format!("{e:#}"), "Cannot serialise the compiled plugin; going on without caching it.")
            }
        }
        Ok((component, false))
    }
}

impl WasmHost {
    /// The cache directory, if there is one and it is safe to run code
    /// from; else warns, once, and there is none: plugins compile in memory.
    fn trusted_cache_dir(&self, hook: &str) -> Option<&Path> {
        let dir = self.inner.cache_dir.as_deref()?;
        let distrust = match std::fs::metadata(dir) {
            Ok(meta) => distrust(&meta),
            Err(e) => Some(format!("it cannot be read: {e}")),
        };
        let Some(why) = distrust else {
            return Some(dir);
        };
        if !self.inner.cache_distrust_told.swap(true, Ordering::Relaxed) {
            warn!(hook, dir = %dir.display(), reason = %why, "The WASM compilation cache is not safe to load native code from; compiling plugins in memory instead.");
        }
        None
    }
}

/// Why a cache directory or file, as `meta` describes it, cannot be
/// trusted to hold code the agent will run: anyone who can write there
/// runs code as the agent. `None` when it is the current user's or root's
/// and nobody else may write to it.
fn distrust(meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let owner = meta.uid();
    if owner != nix::unistd::geteuid().as_raw() && owner != 0 {
        return Some(format!(
            "it is owned by uid {owner}, neither this user nor root"
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Some(format!(
            "its group or others may write to it (mode {mode:o})"
        ));
    }
    None
}

/// The cache file for `bytes` compiled by `engine`: the SHA-256 of the
/// component plus wasmtime's own hash of everything that makes compiled code
/// incompatible (its version, the target, the engine's settings), so an
/// upgraded agent never even tries a stale file.
fn cache_file_name(engine: &Engine, bytes: &[u8]) -> String {
    let content = Sha256::digest(bytes);
    let mut hasher = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    let mut name = String::with_capacity(64 + 1 + 16 + 6);
    for b in content {
        name.push_str(&format!("{b:02x}"));
    }
    name.push_str(&format!("-{:016x}.cwasm", hasher.finish()));
    name
}

/// Loads a compiled component the agent wrote to its cache.
///
/// This is the crate's only `unsafe`. *Why not wasmtime's `cache` feature,
/// which hides it:* it brings zstd (C code to build), a TOML config file
/// and a background cleanup worker; this is a dozen lines over `sha2`, which
/// the agent already has.
///
/// The file is read into memory rather than mapped
/// (`Component::deserialize_file`): a mapped file truncated in place by
/// someone else would crash the agent with SIGBUS.
#[allow(unsafe_code)]
fn load_cached(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    let bytes = read_trusted(path)?;
    // SAFETY: wasmtime requires that the bytes come from
    // `Component::serialize` of a compatible engine: it runs them as native
    // code. Files in the cache are only ever written by `compile` above,
    // from `Component::serialize`, complete (written to a temporary file and
    // renamed, so never seen half-written), and named by the engine's
    // compatibility hash, which covers the wasmtime version and settings;
    // wasmtime checks its header and settings again here. The directory is
    // created owner-only and must be as protected as the agent's binary:
    // anyone who can write there can run native code in the agent, so a
    // directory or file that others own or may write to is not read
    // (`trusted_cache_dir`, `read_trusted`).
    unsafe { Component::deserialize(engine, &bytes) }
}

/// The bytes of the cache file at `path`, if it can be trusted: not a
/// symbolic link, and (checked on the file opened, so it cannot be swapped
/// between the check and the read) owned by this user or root and writable
/// by nobody else.
fn read_trusted(path: &Path) -> wasmtime::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)?;
    if let Some(why) = distrust(&file.metadata()?) {
        wasmtime::bail!("not loaded as code: {why}");
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// A clear message for the common ways a file is not a component.
fn check_is_component(bytes: &[u8]) -> Result<(), String> {
    const MAGIC: &[u8] = b"\0asm";
    const COMPONENT_LAYER: [u8; 2] = [0x01, 0x00];
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err("not a WebAssembly file".to_owned());
    }
    if bytes[6..8] != COMPONENT_LAYER {
        return Err(
            "a core WebAssembly module, not a component: build the plugin for \
             `wasm32-wasip2` (or wrap the module with `wasm-tools component new`)"
                .to_owned(),
        );
    }
    Ok(())
}

fn export_names(engine: &Engine, component: &Component) -> String {
    let names: Vec<String> = component
        .component_type()
        .exports(engine)
        .map(|(name, _)| format!("`{name}`"))
        .collect();
    if names.is_empty() {
        "nothing".to_owned()
    } else {
        names.join(", ")
    }
}

/// A loaded WASM hook: the pre-instantiated component and what it is
/// granted. Cheap to clone; calls may run concurrently, each in its own
/// instance.
#[derive(Clone)]
pub struct WasmPlugin {
    inner: Arc<PluginInner>,
}

struct PluginInner {
    host: Arc<HostInner>,
    template: Template,
    grants: Arc<Grants>,
    env: Vec<(String, String)>,
    spec: WasmSpec,
    from_cache: bool,
}

enum Template {
    EventHook(bindings::EventHookPre<State>),
    Validator(bindings::validator::ValidatorPre<State>),
}

impl fmt::Debug for WasmPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WasmPlugin")
            .field("hook", &self.inner.grants.hook)
            .field("world", &self.world())
            .field("path", &self.inner.spec.path)
            .finish_non_exhaustive()
    }
}

/// What one call passes to the plugin.
enum Input {
    Event(wit::Envelope),
    Validate { path: String, staged: Vec<u8> },
}

impl WasmPlugin {
    /// The hook's name.
    pub fn name(&self) -> &str {
        &self.inner.grants.hook
    }

    /// The world the component implements.
    pub fn world(&self) -> World {
        match self.inner.template {
            Template::EventHook(_) => World::EventHook,
            Template::Validator(_) => World::Validator,
        }
    }

    /// Whether the compiled code came from the compilation cache.
    pub fn from_cache(&self) -> bool {
        self.inner.from_cache
    }

    /// Runs the plugin on `envelope` in a fresh instance, stopped at
    /// `timeout`. An event hook takes every event but `validate-file`; a
    /// validator takes only `validate-file`, whose content it receives as
    /// the staged bytes, and its veto is [`Outcome::Vetoed`].
    ///
    /// Runs on the calling task; it needs a tokio runtime with timers.
    pub async fn call(&self, envelope: &Envelope, timeout: Duration) -> Result<Outcome, HookError> {
        let input = match (&self.inner.template, &envelope.event) {
            (Template::Validator(_), Event::ValidateFile { path, content, .. }) => {
                Input::Validate {
                    path: path.clone(),
                    staged: content.as_bytes().to_vec(),
                }
            }
            (Template::Validator(_), other) => {
                return Err(HookError::WrongEvent {
                    hook: self.name().to_owned(),
                    event: other.name().to_owned(),
                    takes: "only `validate-file` events, being a validator",
                });
            }
            (Template::EventHook(_), Event::ValidateFile { .. }) => {
                return Err(HookError::WrongEvent {
                    hook: self.name().to_owned(),
                    event: envelope.event.name().to_owned(),
                    takes: "every event but `validate-file`, being an event hook (validators take that one)",
                });
            }
            (Template::EventHook(_), _) => match to_wit(envelope) {
                Some(event) => Input::Event(event),
                None => {
                    return Err(HookError::WrongEvent {
                        hook: self.name().to_owned(),
                        event: envelope.event.name().to_owned(),
                        takes: "the events of its WIT package, which has no such event (use an exec hook for it)",
                    });
                }
            },
        };
        // Ticks only while some call runs: an idle agent has no timer thread
        // waking up.
        let _ticking = self.inner.host.ticker.active();
        let now = Instant::now();
        // An absurd timeout must not overflow (and panic): a year is forever
        // for a hook.
        let deadline = now
            .checked_add(timeout)
            .unwrap_or(now + Duration::from_secs(365 * 24 * 3600));
        // The epoch deadline stops wasm code; the tokio timeout also stops a
        // plugin waiting in a host call (a WASI sleep or socket), where no
        // epoch check runs.
        match tokio::time::timeout(timeout, self.run(input, deadline, timeout)).await {
            Ok(result) => result,
            Err(_) => Err(self.timeout_error(timeout)),
        }
    }

    async fn run(
        &self,
        input: Input,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Outcome, HookError> {
        let (mut store, output) = self.store(deadline)?;
        let result: wasmtime::Result<Result<Outcome, String>> = async {
            match (&self.inner.template, &input) {
                (Template::EventHook(pre), Input::Event(envelope)) => {
                    let hook = pre.instantiate_async(&mut store).await?;
                    let r = hook
                        .coord_hooks_event_handler()
                        .call_handle(&mut store, envelope)
                        .await?;
                    Ok(r.map(|()| Outcome::Done))
                }
                (Template::Validator(pre), Input::Validate { path, staged }) => {
                    let hook = pre.instantiate_async(&mut store).await?;
                    let r = hook
                        .coord_hooks_file_validator()
                        .call_validate(&mut store, path, staged)
                        .await?;
                    Ok(r.map(|v| match v {
                        Verdict::Accept => Outcome::Done,
                        Verdict::Veto(reason) => Outcome::Vetoed(reason),
                    }))
                }
                // `call` pairs inputs with templates.
                _ => Err(wasmtime::format_err!(
                    "event does not fit the plugin's world"
                )),
            }
        }
        .await;
        let hook = self.name();
        let stdout = output.stdout.take();
        let stderr = output.stderr.take();
        for (stream, text) in [("stdout", &stdout), ("stderr", &stderr)] {
            if !text.is_empty() {
                debug!(hook, stream, output = %Untrusted(text.trim_end()), "Plugin wrote output.");
            }
        }
        match result {
            // What the plugin says goes into logs: escaped here, once.
            Ok(Ok(Outcome::Vetoed(reason))) => Ok(Outcome::Vetoed(Untrusted(&reason).to_string())),
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(message)) => Err(HookError::Plugin {
                hook: hook.to_owned(),
                message: Untrusted(&message).to_string(),
            }),
            Err(_) if store.data().limiter.hit => Err(HookError::MemoryLimit {
                hook: hook.to_owned(),
                limit: self.inner.spec.max_memory,
            }),
            Err(e) if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) => {
                Err(self.timeout_error(timeout))
            }
            Err(e) => {
                debug!(hook, error = %format!("{e:#}"), "Plugin trapped.");
                // The trap itself, not the wasm backtrace wasmtime wraps it
                // in (function indices of a stripped binary say little);
                // what a Rust plugin printed when it panicked says more.
                let mut message = match e.downcast_ref::<Trap>() {
                    Some(trap) => trap.to_string(),
                    None => format!("{e:#}"),
                };
                let said = stderr.trim();
                if !said.is_empty() {
                    let said: Vec<&str> = tail(said, 1024).lines().map(str::trim).collect();
                    message.push_str(" (stderr: ");
                    message.push_str(&Untrusted(&said.join(" / ")).to_string());
                    message.push(')');
                }
                Err(HookError::Trap {
                    hook: hook.to_owned(),
                    message,
                })
            }
        }
    }

    fn timeout_error(&self, timeout: Duration) -> HookError {
        HookError::Timeout {
            hook: self.name().to_owned(),
            timeout,
        }
    }

    /// A fresh store: the sandbox for one call.
    fn store(&self, deadline: Instant) -> Result<(Store<State>, Output), HookError> {
        let inner = &self.inner;
        let output = Output {
            stdout: Captured::default(),
            stderr: Captured::default(),
        };
        let mut wasi = WasiCtxBuilder::new();
        wasi.envs(&inner.env)
            .stdout(output.stdout.clone())
            .stderr(output.stderr.clone());
        for dir in &inner.spec.dirs {
            let guest = dir.to_string_lossy();
            wasi.preopened_dir(dir, guest, FsPerms::ReadOnly)
                .map_err(|e| HookError::Failed {
                    hook: self.name().to_owned(),
                    status: format!("cannot open granted directory `{}`: {e:#}", dir.display()),
                })?;
        }
        if inner.spec.network {
            wasi.inherit_network()
                .allow_ip_name_lookup(true)
                .allow_tcp(true)
                .allow_udp(true);
        } else {
            wasi.allow_tcp(false).allow_udp(false);
        }
        let state = State {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                max: usize::try_from(inner.spec.max_memory).unwrap_or(usize::MAX),
                used: 0,
                hit: false,
            },
            grants: inner.grants.clone(),
            log_lines: 0,
        };
        let mut store = Store::new(&inner.host.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(1);
        // Yield to tokio at every tick so a busy plugin shares its worker
        // thread, and trap once the deadline has passed.
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        Ok((store, output))
    }
}

/// The last `max` bytes of `s`, cut at a character boundary.
fn tail(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The first `max` bytes of `s`, cut at a character boundary.
fn head(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `None` for an event the WIT package has no case for.
fn to_wit(envelope: &Envelope) -> Option<wit::Envelope> {
    let health = |h: &Health| match h {
        Health::Passing => wit::Health::Passing,
        Health::Warning => wit::Health::Warning,
        Health::Critical => wit::Health::Critical,
        Health::Maintenance => wit::Health::Maintenance,
    };
    let event = match &envelope.event {
        Event::FileChanged {
            path,
            old_hash,
            new_hash,
        } => wit::Event::FileChanged(wit::FileChanged {
            path: path.clone(),
            old_hash: old_hash.clone(),
            new_hash: new_hash.clone(),
        }),
        // Added after WIT 0.1.0; a new case there would break every
        // plugin built against it.
        Event::FileReverted { .. } => return None,
        Event::ValidateFile {
            path,
            staged_path,
            content,
        } => wit::Event::ValidateFile(wit::ValidateFile {
            path: path.clone(),
            staged_path: staged_path.clone(),
            content: content.clone(),
        }),
        Event::ServiceHealthChanged {
            service,
            instance,
            old,
            new,
        } => wit::Event::ServiceHealthChanged(wit::ServiceHealthChanged {
            service: service.clone(),
            instance: instance.clone(),
            old: old.as_ref().map(health),
            new: health(new),
        }),
        Event::LockAcquired {
            lock,
            fencing_token,
        } => wit::Event::LockAcquired(wit::LockAcquired {
            lock: lock.clone(),
            fencing_token: *fencing_token,
        }),
        Event::LockLost {
            lock,
            fencing_token,
        } => wit::Event::LockLost(wit::LockLost {
            lock: lock.clone(),
            fencing_token: *fencing_token,
        }),
        Event::TaskFinished {
            task,
            fencing_token,
            exit_code,
            signal,
        } => wit::Event::TaskFinished(wit::TaskFinished {
            task: task.clone(),
            fencing_token: *fencing_token,
            exit_code: *exit_code,
            signal: *signal,
        }),
        Event::InstanceIdClaimed {
            pool,
            id,
            generation,
        } => wit::Event::InstanceIdClaimed(wit::InstanceIdClaimed {
            pool: pool.clone(),
            id: *id,
            generation: *generation,
        }),
        Event::InstanceIdLost { pool, id } => wit::Event::InstanceIdLost(wit::InstanceIdLost {
            pool: pool.clone(),
            id: *id,
        }),
    };
    Some(wit::Envelope {
        schema: envelope.schema,
        agent: envelope.agent.clone(),
        time: envelope.time.clone(),
        event,
    })
}

/// What the manifest grants a plugin, shared by its calls.
struct Grants {
    hook: String,
    config: String,
    read_prefixes: Vec<String>,
    keys: Arc<dyn KeyReader>,
}

/// A store's data: the sandbox of one call.
struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    grants: Arc<Grants>,
    log_lines: u32,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl host::Host for State {
    fn log(&mut self, level: host::Level, message: String) {
        let hook = self.grants.hook.as_str();
        self.log_lines = self.log_lines.saturating_add(1);
        if self.log_lines > MAX_LOG_LINES {
            if self.log_lines == MAX_LOG_LINES + 1 {
                warn!(
                    hook,
                    limit = MAX_LOG_LINES,
                    "Plugin logged too much in one call; dropping the rest."
                );
            }
            return;
        }
        let message = Untrusted(head(&message, MAX_LOG_MESSAGE));
        match level {
            host::Level::Trace => tracing::trace!(hook, "{message}"),
            host::Level::Debug => tracing::debug!(hook, "{message}"),
            host::Level::Info => tracing::info!(hook, "{message}"),
            host::Level::Warn => tracing::warn!(hook, "{message}"),
            host::Level::Error => tracing::error!(hook, "{message}"),
        }
    }

    fn get_key(&mut self, key: String) -> Option<Vec<u8>> {
        let granted = self.grants.read_prefixes.iter().any(|p| grants(p, &key));
        if !granted {
            debug!(hook = %self.grants.hook, key, "Plugin read a key outside its read_prefixes; it reads as absent.");
            return None;
        }
        self.grants.keys.get(&key)
    }

    fn config(&mut self) -> String {
        self.grants.config.clone()
    }
}

/// Whether `read_prefixes` entry `prefix` lets a plugin read `key`. A
/// prefix ending in `/` grants what starts with it; any other grants the
/// key itself and the keys below it, `/app` giving `/app` and `/app/db` but
/// not `/apple` nor `/app-secrets`: a grant follows key segments, as an
/// operator reads it, not bytes.
fn grants(prefix: &str, key: &str) -> bool {
    match key.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Bounds what one instance can make the host allocate: linear memories
/// and tables together, in bytes. Remembers whether the bound was hit, so
/// the trap that follows (a Rust plugin aborts when an allocation fails) is
/// reported as [`HookError::MemoryLimit`].
struct MemoryLimiter {
    max: usize,
    used: usize,
    hit: bool,
}

impl MemoryLimiter {
    fn grow(&mut self, current: usize, desired: usize) -> bool {
        let used = self.used.saturating_sub(current).saturating_add(desired);
        if used > self.max {
            self.hit = true;
            return false;
        }
        self.used = used;
        true
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(self.grow(current, desired))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Each table element is a pointer on the host.
        let size = std::mem::size_of::<usize>();
        Ok(self.grow(current.saturating_mul(size), desired.saturating_mul(size)))
    }
}

/// A plugin's stdout and stderr of one call.
struct Output {
    stdout: Captured,
    stderr: Captured,
}

/// An output stream that keeps the first [`MAX_CAPTURED_OUTPUT`] bytes and
/// silently drops the rest. (wasmtime's `MemoryOutputPipe` traps the guest
/// when full, which would turn a chatty plugin into a failing one.)
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn push(&self, bytes: &[u8]) {
        let mut buf = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let room = MAX_CAPTURED_OUTPUT.saturating_sub(buf.len());
        buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn take(&self) -> String {
        let buf = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl IsTerminal for Captured {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Captured {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for Captured {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(MAX_CAPTURED_OUTPUT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Captured {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for Captured {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Advances the engine's epoch every [`TICK`] while at least one call
/// runs, and sleeps (parked) otherwise. A thread rather than a tokio task:
/// a plugin spinning on a worker thread must not be able to delay its own
/// deadline.
struct Ticker {
    shared: Arc<TickerShared>,
    thread: JoinHandle<()>,
}

struct TickerShared {
    active: AtomicUsize,
    stop: AtomicBool,
}

/// Keeps the ticker running while held.
struct Ticking<'a>(&'a Ticker);

impl Ticker {
    fn start(engine: Engine) -> std::io::Result<Ticker> {
        let shared = Arc::new(TickerShared {
            active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let state = shared.clone();
        let thread = std::thread::Builder::new()
            .name("coord-wasm-epoch".to_owned())
            .spawn(move || {
                while !state.stop.load(Ordering::Acquire) {
                    if state.active.load(Ordering::Acquire) == 0 {
                        std::thread::park();
                        continue;
                    }
                    std::thread::sleep(TICK);
                    engine.increment_epoch();
                }
            })?;
        Ok(Ticker { shared, thread })
    }

    fn active(&self) -> Ticking<'_> {
        if self.shared.active.fetch_add(1, Ordering::AcqRel) == 0 {
            self.thread.thread().unpark();
        }
        Ticking(self)
    }
}

impl Drop for Ticking<'_> {
    fn drop(&mut self) {
        self.0.shared.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.thread.thread().unpark();
    }
}
