//! Hooks: what runs when something changes. Shell commands (`exec`) and
//! sandboxed WASM components (`wasm`), both fed the same [`Event`]s.
//!
//! A hook never stops the agent: every failure is an [`HookError`] that the
//! caller logs and retries with backoff.

mod event;
mod exec;
mod gate;
mod keys;
mod runner;
mod wasm;

use std::time::Duration;

pub use event::{Envelope, Event, Health, SCHEMA_VERSION};
pub use exec::ExecHook;
pub use gate::{Entered, Gates};
pub use keys::CacheKeys;
pub use runner::{HookRunner, HookStats, Plugins, Runnable, Verdict};
pub use wasm::{
    WIT_VERSION, WasmHost, WasmHostError, WasmPlugin, World, compile_in_child_processes,
    compile_to_file,
};

/// Environment every shell hook gets on top of its event (the agent's
/// instance ids), kept current by the agent.
pub type AmbientEnv = std::sync::Arc<std::sync::RwLock<std::collections::BTreeMap<String, String>>>;

/// What a successful hook run said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The hook ran (event hooks), or accepted the staged file (validators).
    Done,
    /// A validator refused the staged file, with its reason.
    Vetoed(String),
}

/// Why a hook run failed. Each names the hook.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("hook `{hook}` could not start `{program}`: {source}")]
    Spawn {
        hook: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("hook `{hook}` was stopped at its timeout of {}", humantime::format_duration(*timeout))]
    Timeout { hook: String, timeout: Duration },
    #[error("hook `{hook}` failed: {status}")]
    Failed { hook: String, status: String },
    #[error("hook `{hook}` trapped: {message}")]
    Trap { hook: String, message: String },
    #[error("hook `{hook}` hit its memory limit of {limit} bytes")]
    MemoryLimit { hook: String, limit: u64 },
    #[error("hook `{hook}` returned an error: {message}")]
    Plugin { hook: String, message: String },
    /// The event is not one this hook takes (a validator given anything
    /// but `validate-file`, or an event hook given `validate-file`): a
    /// wiring mistake that retrying cannot fix.
    #[error("hook `{hook}` takes {takes}, not `{event}`")]
    WrongEvent {
        hook: String,
        event: String,
        takes: &'static str,
    },
    #[error("hook `{hook}` could not be loaded from `{path}`: {message}")]
    Load {
        hook: String,
        path: String,
        message: String,
    },
}

impl HookError {
    /// The name of the hook that failed.
    pub fn hook(&self) -> &str {
        match self {
            HookError::Spawn { hook, .. }
            | HookError::Timeout { hook, .. }
            | HookError::Failed { hook, .. }
            | HookError::Trap { hook, .. }
            | HookError::MemoryLimit { hook, .. }
            | HookError::Plugin { hook, .. }
            | HookError::Load { hook, .. }
            | HookError::WrongEvent { hook, .. } => hook,
        }
    }
}

/// Read access to the agent's cache for WASM plugins, limited by the
/// caller to the prefixes the manifest grants.
pub trait KeyReader: Send + Sync {
    /// The value of `key`, if cached.
    fn get(&self, key: &str) -> Option<Vec<u8>>;
}
