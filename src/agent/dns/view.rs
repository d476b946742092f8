//! The registry as the DNS server sees it: the agent's watch cache,
//! indexed once per change.

use std::sync::{Arc, Mutex, RwLock};

use super::answers::Index;
use crate::etcd::{Cache, Subscription};

/// What the server answers from. Empty until the agent is connected;
/// re-pointed at each new connection's cache (the server itself outlives
/// reconnects, so its port is never given up).
#[derive(Debug, Default)]
pub struct RegistryView {
    source: RwLock<Option<Source>>,
    built: Mutex<Option<Built>>,
}

#[derive(Debug)]
struct Source {
    namespace: String,
    /// Bumped by each `follow`, so an index of an older cache is never
    /// taken for a current one.
    generation: u64,
    services: Subscription,
    health: Subscription,
    agents: Subscription,
}

#[derive(Debug)]
struct Built {
    generation: u64,
    revisions: [i64; 3],
    index: Arc<Index>,
}

impl RegistryView {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads `namespace`'s services, health records and agents from `cache`
    /// from now on.
    pub fn follow(&self, cache: &Cache, namespace: &str) {
        let mut source = self.source.write().unwrap_or_else(|p| p.into_inner());
        let generation = source.as_ref().map_or(1, |s| s.generation + 1);
        *source = Some(Source {
            namespace: namespace.to_owned(),
            generation,
            services: cache.subscribe(&crate::registry::services_prefix(namespace)),
            health: cache.subscribe(&crate::registry::health_prefix(namespace)),
            agents: cache.subscribe(&crate::presence::prefix(namespace)),
        });
    }

    /// Stops reading: without `[dns]` nothing needs the whole registry,
    /// and watching it would wake this agent at every other agent's
    /// registration and health change.
    pub fn unfollow(&self) {
        *self.source.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The index of what the cache holds now, built again only when the
    /// cache changed since the last one. `None` until the cache has
    /// completed its first full read of all three prefixes: an empty cache
    /// must not answer "no such service".
    pub fn index(&self) -> Option<Arc<Index>> {
        let source = self.source.read().unwrap_or_else(|p| p.into_inner());
        let s = source.as_ref()?;
        if !(s.services.is_ready() && s.health.is_ready() && s.agents.is_ready()) {
            return None;
        }
        let snapshots = [
            s.services.snapshot(),
            s.health.snapshot(),
            s.agents.snapshot(),
        ];
        let revisions = snapshots.each_ref().map(|snap| snap.revision());
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = built.as_ref()
            && b.generation == s.generation
            && b.revisions == revisions
        {
            return Some(b.index.clone());
        }
        let [services, health, agents] = &snapshots;
        let index = Arc::new(Index::build(&s.namespace, services, health, agents));
        *built = Some(Built {
            generation: s.generation,
            revisions,
            index: index.clone(),
        });
        Some(index)
    }
}
