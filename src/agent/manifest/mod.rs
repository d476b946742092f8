//! `agent.toml`: what a host wants, parsed and validated as a whole.
//!
//! Every problem is collected and reported with `file:line:col`; a manifest
//! with any problem is rejected whole, so nothing is ever applied from a
//! half-valid file.

mod diagnostics;
mod dns;
mod file;
mod hook;
mod host;
mod instance_id;
mod reader;
mod service;
mod status;
mod task;

use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use toml::de::{DeTable, DeValue};

use diagnostics::Diagnostics;
pub use diagnostics::{Diagnostic, ManifestError};
pub use dns::DnsSettings;
use file::HookNames;
pub use file::{AutoEscape, FileSource, FileSpec, MissingKeys, PrefixFormat};
pub use hook::{FleetGate, HookAction, HookSpec, WasmSpec};
pub use host::{HostReport, Problem, Step};
pub use instance_id::InstanceIdSpec;
use reader::TableReader;
pub use reader::suggest;
pub use service::{CheckKind, CheckSpec, ServiceSpec};
pub use status::StatusSettings;
pub use task::{Schedule, TaskSpec};

use crate::etcd::{ConnectOptions, Password, TlsFiles};

/// Sections a manifest may have. Others are rejected.
const SECTIONS: &[&str] = &[
    "agent",
    "etcd",
    "hook",
    "file",
    "service",
    "task",
    "instance_id",
    "status",
    "dns",
];

/// A validated manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Where it was read from (relative paths inside resolve against its
    /// directory).
    pub path: PathBuf,
    /// SHA-256 of the file's bytes, in hex.
    pub hash: String,
    pub agent: AgentSettings,
    pub etcd: EtcdSettings,
    /// `[[hook]]`s, in file order, names unique.
    pub hooks: Vec<HookSpec>,
    /// `[[file]]`s, in file order, paths unique.
    pub files: Vec<FileSpec>,
    /// `[[service]]`s, in file order, (name, id) unique.
    pub services: Vec<ServiceSpec>,
    /// `[[task]]`s, in file order, names unique.
    pub tasks: Vec<TaskSpec>,
    /// `[[instance_id]]`s, in file order, pools unique.
    pub instance_ids: Vec<InstanceIdSpec>,
    /// `[status]`: the local status endpoint, off when absent.
    pub status: Option<StatusSettings>,
    /// `[dns]`: discovery over DNS, off when absent.
    pub dns: Option<DnsSettings>,
}

/// A place in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// `[agent]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSettings {
    /// The agent's name in etcd; defaults to the host name.
    pub name: String,
    /// The key prefix everything coord writes lives under.
    pub namespace: String,
    /// The session lease's TTL.
    pub ttl: Duration,
    /// Where the agent keeps what must survive a restart (compiled plugins,
    /// the last instance ids).
    pub state_dir: PathBuf,
    /// Whether the manifest names `state_dir` (else it is the default).
    pub state_dir_given: bool,
    /// The address other hosts reach this one at, published in the
    /// presence record (`<agent>.agent.<domain>` answers it). `None`: the
    /// local address of the route to the first etcd endpoint.
    pub address: Option<std::net::IpAddr>,
    /// `labels = { zone = "eu-1" }`: published in the presence record,
    /// for selectors to pick the agent by.
    pub labels: crate::labels::Labels,
}

/// `[etcd]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    pub dial_timeout: Duration,
    pub request_timeout: Duration,
    pub username: Option<String>,
    pub password: Option<PasswordSource>,
    pub tls: Option<TlsFiles>,
}

/// Where the etcd password comes from. The manifest never holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    File(PathBuf),
    Env(String),
}

/// The password could not be read from where the manifest says.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("failed to read the etcd password from `{path}`: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the etcd password variable `{0}` is not set")]
    Env(String),
}

pub const DEFAULT_NAMESPACE: &str = "/coord";
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// `[agent] ttl`: etcd's minimum lease, up to an hour (what a crashed
/// agent's locks and ids are held for).
pub const TTL_RANGE: RangeInclusive<Duration> = Duration::from_secs(2)..=Duration::from_secs(3600);
/// `[etcd] dial_timeout` and `request_timeout`.
pub const ETCD_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(600);
pub const DEFAULT_STATE_DIR: &str = "/var/lib/coord";

impl Manifest {
    /// Every prefix a WASM hook may read, sorted.
    pub fn wasm_read_prefixes(&self) -> Vec<String> {
        let mut prefixes: Vec<String> = self
            .hooks
            .iter()
            .filter_map(|h| match &h.action {
                HookAction::Wasm(w) => Some(w.read_prefixes.clone()),
                HookAction::Exec { .. } => None,
            })
            .flatten()
            .collect();
        prefixes.sort();
        prefixes.dedup();
        prefixes
    }

    /// Reads and validates the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ManifestError::unreadable(path, &e))?;
        Manifest::parse(path, &text)
    }

    /// Validates manifest text; `path` names it in errors and anchors
    /// relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Manifest, ManifestError> {
        let mut d = Diagnostics::new(text);
        let (root, syntax) = DeTable::parse_recoverable(text);
        for e in syntax {
            d.error(e.span().unwrap_or(0..0), e.message().to_owned());
        }
        if !d.is_empty() {
            // The tree is partial after a syntax error; checking it further
            // would only add confusing follow-on errors.
            return Err(d.into_error(path));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let root = root.get_ref();
        for (key, _) in root.iter() {
            if !SECTIONS.contains(&key.get_ref().as_ref()) {
                d.error(
                    key.span(),
                    format!(
                        "unknown section `[{}]`{}",
                        key.get_ref(),
                        suggest(key.get_ref(), SECTIONS)
                    ),
                );
            }
        }
        let agent = match section(&mut d, root, "agent") {
            Some(t) => agent_settings(&mut d, t, base),
            None => Some(AgentSettings::defaults()),
        };
        let etcd = match section(&mut d, root, "etcd") {
            Some(t) => etcd_settings(&mut d, t, base),
            None => {
                d.error(
                    0..0,
                    "missing section `[etcd]`: say where etcd is, e.g. endpoints = [\"http://127.0.0.1:2379\"]",
                );
                None
            }
        };
        let (hooks, hook_names) = hooks(&mut d, root, base);
        let files = files(&mut d, root, base, &hook_names);
        if let Some(a) = &agent
            && !valid_agent_name(&a.name)
        {
            // Only a name from the environment gets here: one written in
            // [agent] was refused above, and host names have no `/` or spaces.
            d.error(
                0..0,
                format!(
                    "invalid agent name `{}` from ${AGENT_NAME_ENV}: it must be non-empty, without `/` or spaces",
                    a.name
                ),
            );
        }
        let agent_name = agent.as_ref().map_or_else(default_name, |a| a.name.clone());
        let services = services(&mut d, root, &agent_name, &hook_names);
        let tasks = tasks(&mut d, root, &hook_names);
        let instance_ids = instance_ids(&mut d, root, base, &hook_names);
        let status = section(&mut d, root, "status").and_then(|t| status::status(&mut d, t));
        let dns = section(&mut d, root, "dns").and_then(|t| dns::dns(&mut d, t));
        match (agent, etcd) {
            (Some(agent), Some(etcd)) if d.is_empty() => {
                let mut m = Manifest {
                    path: path.to_owned(),
                    hash: hex(&Sha256::digest(text.as_bytes())),
                    agent,
                    etcd,
                    hooks,
                    files,
                    services,
                    tasks,
                    instance_ids,
                    status,
                    dns,
                };
                m.programs_beside_the_manifest(base);
                Ok(m)
            }
            _ => Err(d.into_error(path)),
        }
    }

    /// A program named by a relative path (`./check-api.sh`,
    /// `bin/report`) is the one beside the manifest, as every other
    /// relative path in it is, wherever the agent runs from; a bare name
    /// (`nginx`) is still looked up on the agent's `PATH`.
    fn programs_beside_the_manifest(&mut self, base: &Path) {
        let resolve = |argv: &mut Vec<String>| {
            if let Some(program) = argv.first_mut()
                && program.contains('/')
                && !program.starts_with('/')
            {
                let relative = Path::new(program.as_str());
                let relative = relative.strip_prefix("./").unwrap_or(relative);
                let joined = base.join(relative);
                let absolute = std::path::absolute(&joined).unwrap_or(joined);
                *program = absolute.to_string_lossy().into_owned();
            }
        };
        for h in &mut self.hooks {
            if let HookAction::Exec { argv } = &mut h.action {
                resolve(argv);
            }
        }
        for t in &mut self.tasks {
            resolve(&mut t.run);
        }
        for s in &mut self.services {
            if let Some(CheckSpec {
                kind: CheckKind::Exec(argv),
                ..
            }) = &mut s.check
            {
                resolve(argv);
            }
        }
        for f in &mut self.files {
            if let Some(argv) = &mut f.check {
                resolve(argv);
            }
        }
    }

    /// Connection options for `[etcd]`, reading the password if one is set.
    pub fn connect_options(&self) -> Result<ConnectOptions, PasswordError> {
        self.etcd.connect_options()
    }

    /// The hook named `name`.
    pub fn hook(&self, name: &str) -> Option<&HookSpec> {
        self.hooks.iter().find(|h| h.name == name)
    }

    /// A human summary of what the manifest declares, for `coord check`.
    pub fn summary(&self) -> Summary<'_> {
        Summary(self)
    }
}

impl AgentSettings {
    fn defaults() -> Self {
        AgentSettings {
            name: default_name(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            ttl: DEFAULT_TTL,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            state_dir_given: false,
            address: None,
            labels: crate::labels::Labels::new(),
        }
    }

    /// Where `who` keeps compiled WASM plugins; `None`: nowhere, compile
    /// in memory. The agent uses `<state_dir>/wasm-cache`. A one-shot
    /// command (`coord check`, `coord hook`, `coord render`) uses it when
    /// the manifest names `state_dir`, or when it is already there and
    /// this user's (`coord check` as systemd's `ExecReload`, run as the
    /// agent's user); else the user's cache directory: run by hand from a
    /// project directory (as root, too), it must not create a system
    /// directory nobody asked for.
    pub fn wasm_cache_dir(&self, who: Runner) -> Option<PathBuf> {
        let agents = self.state_dir.join("wasm-cache");
        let ours = || {
            use std::os::unix::fs::MetadataExt;
            std::fs::symlink_metadata(&agents)
                .is_ok_and(|m| m.is_dir() && m.uid() == nix::unistd::geteuid().as_raw())
        };
        match who {
            Runner::Agent => Some(agents),
            Runner::OneShot if self.state_dir_given || ours() => Some(agents),
            Runner::OneShot => user_cache_dir().map(|d| d.join("wasm-cache")),
        }
    }

    /// Whether going from `old` to these settings needs a new connection
    /// and session: anything but the labels, which only rewrite the
    /// presence record (a new session would let go of every lock and id).
    pub fn needs_new_session(&self, old: &AgentSettings) -> bool {
        let same_labels = AgentSettings {
            labels: old.labels.clone(),
            ..self.clone()
        };
        same_labels != *old
    }
}

/// Who runs with a manifest: what decides where its caches go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    /// `coord run`, `coord dev`: the long-lived agent.
    Agent,
    /// A command run by hand that exits when done.
    OneShot,
}

/// `$XDG_CACHE_HOME/coord`, else `~/.cache/coord` (the XDG base directory
/// rules: a relative `XDG_CACHE_HOME` is ignored). *Why not the `dirs`
/// crate:* coord runs on Linux only, where this is all it would do.
fn user_cache_dir() -> Option<PathBuf> {
    let absolute = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    std::env::var_os("XDG_CACHE_HOME")
        .and_then(absolute)
        .or_else(|| {
            std::env::var_os("HOME")
                .and_then(absolute)
                .map(|h| h.join(".cache"))
        })
        .map(|d| d.join("coord"))
}

impl EtcdSettings {
    /// Connection options, reading the password if one is set.
    pub fn connect_options(&self) -> Result<ConnectOptions, PasswordError> {
        let mut opts = ConnectOptions::new(self.endpoints.clone());
        opts.dial_timeout = self.dial_timeout;
        opts.request_timeout = self.request_timeout;
        opts.tls = self.tls.clone();
        opts.username = self.username.clone();
        opts.password = match &self.password {
            None => None,
            Some(source) => Some(source.read()?),
        };
        Ok(opts)
    }
}

impl PasswordSource {
    /// Reads the password; a trailing newline (as `echo` writes) is dropped.
    pub fn read(&self) -> Result<Password, PasswordError> {
        match self {
            PasswordSource::File(path) => std::fs::read_to_string(path)
                .map(|s| Password::new(s.trim_end_matches(['\r', '\n'])))
                .map_err(|source| PasswordError::File {
                    path: path.clone(),
                    source,
                }),
            PasswordSource::Env(var) => std::env::var(var)
                .map(Password::new)
                .map_err(|_| PasswordError::Env(var.clone())),
        }
    }
}

/// The host name (the default agent name), or `coord` when it cannot be had.
/// The variable that names the agent when `[agent]` does not.
pub const AGENT_NAME_ENV: &str = "COORD_AGENT_NAME";

/// The agent's name when `[agent]` gives none: `$COORD_AGENT_NAME`, else
/// the host name. The variable exists for Kubernetes, where one manifest
/// serves a whole DaemonSet and the host name is the pod's: the downward
/// API passes the node's name instead.
pub fn default_name() -> String {
    std::env::var(AGENT_NAME_ENV)
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(host_name)
}

fn valid_agent_name(name: &str) -> bool {
    !(name.is_empty() || name.contains('/') || name.chars().any(char::is_whitespace))
}

pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "coord".to_owned())
}

fn section<'a, 'i>(
    d: &mut Diagnostics<'_>,
    root: &'a DeTable<'i>,
    name: &'static str,
) -> Option<TableReader<'a, 'i>> {
    let value = root.get(name)?;
    match value.get_ref() {
        DeValue::Table(t) => Some(TableReader::new(format!("[{name}]"), t, value.span())),
        other => {
            d.error(
                value.span(),
                format!(
                    "`{name}` must be a table `[{name}]`, not {}",
                    other.type_str()
                ),
            );
            None
        }
    }
}

/// The tables of an array of tables (`[[name]]`).
fn tables<'a, 'i>(
    d: &mut Diagnostics<'_>,
    root: &'a DeTable<'i>,
    name: &'static str,
) -> Vec<TableReader<'a, 'i>> {
    let Some(value) = root.get(name) else {
        return Vec::new();
    };
    let DeValue::Array(items) = value.get_ref() else {
        d.error(
            value.span(),
            format!("`{name}` must be written as `[[{name}]]` tables"),
        );
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| match item.get_ref() {
            DeValue::Table(t) => Some(TableReader::new(format!("[[{name}]]"), t, item.span())),
            other => {
                d.error(
                    item.span(),
                    format!(
                        "each `{name}` must be a `[[{name}]]` table, not {}",
                        other.type_str()
                    ),
                );
                None
            }
        })
        .collect()
}

/// The `[[hook]]`s, and every name a `[[hook]]` was given — valid or not:
/// a hook whose definition has a mistake is still defined for the
/// resources that name it, so one mistake is one error, not one more per
/// reference.
fn hooks(d: &mut Diagnostics<'_>, root: &DeTable<'_>, base: &Path) -> (Vec<HookSpec>, HookNames) {
    let mut hooks: Vec<HookSpec> = Vec::new();
    let mut names = HookNames::default();
    for t in tables(d, root, "hook") {
        let span = t.span_of("name");
        names.declare(t.name_as_written("name"));
        let Some(h) = hook::hook(d, t, base) else {
            continue;
        };
        if let Some(first) = hooks.iter().find(|o| o.name == h.name) {
            d.error(
                span,
                format!(
                    "hook `{}` is defined twice (first at line {})",
                    h.name, first.location.line
                ),
            );
            continue;
        }
        hooks.push(h);
    }
    (hooks, names)
}

fn files(
    d: &mut Diagnostics<'_>,
    root: &DeTable<'_>,
    base: &Path,
    names: &HookNames,
) -> Vec<FileSpec> {
    let mut files: Vec<FileSpec> = Vec::new();
    for t in tables(d, root, "file") {
        let span = t.span_of("path");
        let Some(f) = file::file(d, t, base, names) else {
            continue;
        };
        if let Some(first) = files.iter().find(|o| o.path == f.path) {
            d.error(
                span,
                format!(
                    "file `{}` is declared twice (first at line {}): two sources would fight over it",
                    f.path.display(),
                    first.location.line
                ),
            );
            continue;
        }
        files.push(f);
    }
    files
}

fn services(
    d: &mut Diagnostics<'_>,
    root: &DeTable<'_>,
    agent: &str,
    names: &HookNames,
) -> Vec<ServiceSpec> {
    let mut services: Vec<ServiceSpec> = Vec::new();
    for t in tables(d, root, "service") {
        let span = t.span_of("name");
        let Some(s) = service::service(d, t, agent, names) else {
            continue;
        };
        if let Some(first) = services.iter().find(|o| o.name == s.name && o.id == s.id) {
            d.error(
                span,
                format!(
                    "instance `{}` of service `{}` is declared twice (first at line {}); give one an `id`",
                    s.id, s.name, first.location.line
                ),
            );
            continue;
        }
        services.push(s);
    }
    services
}

fn tasks(d: &mut Diagnostics<'_>, root: &DeTable<'_>, names: &HookNames) -> Vec<TaskSpec> {
    let mut tasks: Vec<TaskSpec> = Vec::new();
    for t in tables(d, root, "task") {
        let span = t.span_of("name");
        let Some(task) = task::task(d, t, names) else {
            continue;
        };
        if let Some(first) = tasks.iter().find(|o| o.name == task.name) {
            d.error(
                span,
                format!(
                    "task `{}` is defined twice (first at line {})",
                    task.name, first.location.line
                ),
            );
            continue;
        }
        tasks.push(task);
    }
    tasks
}

fn instance_ids(
    d: &mut Diagnostics<'_>,
    root: &DeTable<'_>,
    base: &Path,
    names: &HookNames,
) -> Vec<InstanceIdSpec> {
    let mut out: Vec<InstanceIdSpec> = Vec::new();
    for t in tables(d, root, "instance_id") {
        let span = t.span_of("pool");
        let Some(spec) = instance_id::instance_id(d, t, base, names) else {
            continue;
        };
        if let Some(first) = out.iter().find(|o| o.pool == spec.pool) {
            d.error(
                span,
                format!(
                    "pool `{}` is claimed twice (first at line {}): one id per pool",
                    spec.pool, first.location.line
                ),
            );
            continue;
        }
        out.push(spec);
    }
    out
}

fn agent_settings(
    d: &mut Diagnostics<'_>,
    mut t: TableReader<'_, '_>,
    base: &Path,
) -> Option<AgentSettings> {
    let before = d.len();
    let name = t.optional::<String>(d, "name");
    if let Some(name) = &name
        && !valid_agent_name(name)
    {
        d.error(
            t.span_of("name"),
            format!("invalid `name` in [agent]: `{name}` must be non-empty, without `/` or spaces"),
        );
    }
    let namespace = t.optional::<String>(d, "namespace");
    if let Some(ns) = &namespace
        && (!ns.starts_with('/') || ns.len() < 2 || ns.ends_with('/'))
    {
        d.error(
            t.span_of("namespace"),
            format!("invalid `namespace` in [agent]: `{ns}` must start with `/` and not end with one, like \"/coord\""),
        );
    }
    let state_dir = t.optional::<PathBuf>(d, "state_dir");
    let address = t.optional::<String>(d, "address").and_then(|a| {
        match a.parse::<std::net::IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                d.error(
                    t.span_of("address"),
                    format!("invalid `address` in [agent]: `{a}` is not an IP address like \"10.0.0.5\" or \"fd00::5\""),
                );
                None
            }
        }
    });
    let labels = t
        .optional::<std::collections::BTreeMap<String, String>>(d, "labels")
        .unwrap_or_default();
    for (key, value) in &labels {
        if let Err(why) = crate::labels::check(key, value) {
            d.error(
                t.entry_span("labels", key),
                format!("invalid label in [agent] `labels`: {why}"),
            );
        }
    }
    let ttl = t.within(d, "ttl", TTL_RANGE);
    if let Some(ttl) = ttl
        && ttl.subsec_nanos() != 0
    {
        d.error(
            t.span_of("ttl"),
            "invalid `ttl` in [agent]: etcd leases count whole seconds (e.g. \"10s\")",
        );
    }
    t.finish(d);
    (d.len() == before).then(|| AgentSettings {
        name: name.unwrap_or_else(default_name),
        namespace: namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
        ttl: ttl.unwrap_or(DEFAULT_TTL),
        state_dir_given: state_dir.is_some(),
        state_dir: state_dir.map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), |p| base.join(p)),
        address,
        labels,
    })
}

fn etcd_settings(
    d: &mut Diagnostics<'_>,
    mut t: TableReader<'_, '_>,
    base: &Path,
) -> Option<EtcdSettings> {
    let before = d.len();
    let endpoints = t.required::<Vec<String>>(
        d,
        "endpoints",
        "say where etcd is, e.g. endpoints = [\"http://127.0.0.1:2379\"]",
    );
    if let Some(eps) = &endpoints {
        if eps.is_empty() {
            d.error(
                t.span_of("endpoints"),
                "`endpoints` in [etcd] is empty: list at least one",
            );
        }
        for ep in eps {
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                d.error(
                    t.span_of("endpoints"),
                    format!("invalid endpoint `{ep}` in [etcd]: write it as http://host:port or https://host:port"),
                );
            }
        }
    }
    let dial_timeout = t.within(d, "dial_timeout", ETCD_TIMEOUT_RANGE);
    let request_timeout = t.within(d, "request_timeout", ETCD_TIMEOUT_RANGE);
    let username = t.optional::<String>(d, "username");
    let password_file = t.optional::<PathBuf>(d, "password_file");
    let password_env = t.optional::<String>(d, "password_env");
    let password = match (password_file, password_env) {
        (Some(_), Some(_)) => {
            d.error(
                t.span_of("password_env"),
                "[etcd] has both `password_file` and `password_env`: keep one",
            );
            None
        }
        (Some(f), None) => Some(PasswordSource::File(base.join(f))),
        (None, Some(v)) => Some(PasswordSource::Env(v)),
        (None, None) => None,
    };
    match (&username, &password) {
        (Some(_), None) => d.error(
            t.span_of("username"),
            "missing `password_file` or `password_env` in [etcd]: a `username` needs a password",
        ),
        (None, Some(_)) => d.error(
            t.span(),
            "missing `username` in [etcd]: a password needs a user name",
        ),
        _ => {}
    }
    let tls = t.table(d, "tls").and_then(|tls| tls_files(d, tls, base));
    if let Some(eps) = &endpoints {
        let https = eps.iter().any(|e| e.starts_with("https://"));
        let http = eps.iter().any(|e| e.starts_with("http://"));
        match &tls {
            Some(_) if http => d.error(
                t.span_of("endpoints"),
                "[etcd.tls] is set but an endpoint is plain http://: use https:// endpoints",
            ),
            None if https => d.error(
                t.span_of("endpoints"),
                "missing [etcd.tls] for https:// endpoints: set at least `ca`",
            ),
            _ => {}
        }
    }
    t.finish(d);
    (d.len() == before).then(|| EtcdSettings {
        endpoints: endpoints.unwrap_or_default(),
        dial_timeout: dial_timeout.unwrap_or(crate::etcd::DEFAULT_DIAL_TIMEOUT),
        request_timeout: request_timeout.unwrap_or(crate::etcd::DEFAULT_REQUEST_TIMEOUT),
        username,
        password,
        tls,
    })
}

fn tls_files(d: &mut Diagnostics<'_>, mut t: TableReader<'_, '_>, base: &Path) -> Option<TlsFiles> {
    let ca = t.optional::<PathBuf>(d, "ca");
    let cert = t.optional::<PathBuf>(d, "cert");
    let key = t.optional::<PathBuf>(d, "key");
    match (&cert, &key) {
        (Some(_), None) => d.error(
            t.span_of("cert"),
            "missing `key` in [etcd.tls]: a client certificate needs its key",
        ),
        (None, Some(_)) => d.error(
            t.span_of("key"),
            "missing `cert` in [etcd.tls]: a client key needs its certificate",
        ),
        _ => {}
    }
    t.finish(d);
    Some(TlsFiles {
        ca: ca.map(|p| base.join(p)),
        cert: cert.map(|p| base.join(p)),
        key: key.map(|p| base.join(p)),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// See [`Manifest::summary`].
#[derive(Debug)]
pub struct Summary<'a>(&'a Manifest);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        writeln!(f, "{}: ok", m.path.display())?;
        writeln!(
            f,
            "  agent  {} (namespace {}, session ttl {})",
            m.agent.name,
            m.agent.namespace,
            humantime::format_duration(m.agent.ttl)
        )?;
        let auth = match &m.etcd.username {
            Some(u) => format!(", user {u}"),
            None => String::new(),
        };
        let tls = if m.etcd.tls.is_some() { ", TLS" } else { "" };
        write!(
            f,
            "  etcd   {} endpoint{}: {}{tls}{auth}",
            m.etcd.endpoints.len(),
            if m.etcd.endpoints.len() == 1 { "" } else { "s" },
            m.etcd.endpoints.join(", ")
        )?;
        if let Some(s) = &m.status {
            write!(
                f,
                "\n  status http://{} (/health, /status, /metrics)",
                s.listen
            )?;
        }
        if let Some(dns) = &m.dns {
            write!(
                f,
                "\n  dns    {} udp+tcp, *.service.{} and *.agent.{} (ttl {}s)",
                dns.listen,
                dns.domain,
                dns.domain,
                dns.ttl.as_secs()
            )?;
        }
        for s in &m.services {
            let check = match s.check.as_ref().map(|c| &c.kind) {
                None => "no check".to_owned(),
                Some(CheckKind::Http(u)) => format!("http {u}"),
                Some(CheckKind::Tcp(a)) => format!("tcp {a}"),
                Some(CheckKind::Exec(argv)) => format!("exec {}", argv.join(" ")),
                Some(CheckKind::Ttl(t)) => format!("ttl {}", humantime::format_duration(*t)),
            };
            write!(
                f,
                "\n  service {}/{} at {} ({check})",
                s.name, s.id, s.address
            )?;
        }
        for t in &m.tasks {
            let when = match &t.schedule {
                Schedule::Once => "once".to_owned(),
                Schedule::Every(d) => format!("every {}", humantime::format_duration(*d)),
                Schedule::Cron(c) if task::cron_has_seconds(c) => {
                    format!("cron {c}, seconds first")
                }
                Schedule::Cron(c) => format!("cron {c}"),
                Schedule::Leader => "leader".to_owned(),
            };
            // When it would run if the agent started now: a cron expression
            // that reads differently than meant shows here.
            let when = match t.schedule.next_round(std::time::SystemTime::now()) {
                Some((_, at)) => {
                    format!("{when}, next run {}", humantime::format_rfc3339_seconds(at))
                }
                None => when,
            };
            write!(
                f,
                "\n  task   {} under lock {} ({when}): {}",
                t.name,
                t.lock,
                t.run.join(" ")
            )?;
        }
        for i in &m.instance_ids {
            write!(f, "\n  id     from pool {} of {}", i.pool, i.size)?;
        }
        for file in &m.files {
            let from = match &file.source {
                FileSource::Template(p) => format!("template {}", p.display()),
                FileSource::Inline(_) => "inline template".to_owned(),
                FileSource::Key(k) => format!("key {k}"),
                FileSource::Prefix { prefix, format } => {
                    format!("prefix {prefix} as {}", format.name())
                }
            };
            write!(f, "\n  file   {} from {from}", file.path.display())?;
        }
        for h in &m.hooks {
            let what = match &h.action {
                HookAction::Exec { argv } => format!("exec {}", argv.join(" ")),
                HookAction::Wasm(w) => format!("wasm {}", w.path.display()),
            };
            write!(
                f,
                "\n  hook   {}: {what} (timeout {})",
                h.name,
                humantime::format_duration(h.timeout)
            )?;
        }
        Ok(())
    }
}
