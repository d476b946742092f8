//! What WASM plugins read through `get-key`: the agent's cache, limited
//! (by the host) to each plugin's `read_prefixes`.

use std::sync::RwLock;

use super::KeyReader;
use crate::etcd::{Cache, CacheSnapshot, Subscription};

/// Live reads from the agent's cache, one subscription per granted prefix.
/// Empty until the agent is connected; re-pointed at each new connection.
#[derive(Debug, Default)]
pub struct CacheKeys {
    subs: RwLock<Vec<Subscription>>,
}

impl CacheKeys {
    pub fn new() -> Self {
        Self::default()
    }

    /// Follows `prefixes` in `cache` from now on.
    pub fn follow(&self, cache: &Cache, prefixes: &[String]) {
        let subs = prefixes.iter().map(|p| cache.subscribe(p)).collect();
        *self.subs.write().unwrap_or_else(|p| p.into_inner()) = subs;
    }
}

impl KeyReader for CacheKeys {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let subs = self.subs.read().unwrap_or_else(|p| p.into_inner());
        subs.iter()
            .filter(|s| key.starts_with(s.prefix()))
            .find_map(|s| s.get(key))
            .map(|kv| kv.value)
    }
}

/// Reads from one snapshot (`coord render`, `coord hook`).
impl KeyReader for CacheSnapshot {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        CacheSnapshot::get(self, key).map(|kv| kv.value.clone())
    }
}
