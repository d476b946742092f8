//! `[[instance_id]]`: a unique small integer this host holds from a pool.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use super::Location;
use super::diagnostics::Diagnostics;
use super::file::{HookNames, hook_refs};
use super::reader::{TableReader, check_range};

/// A pool's `size`: ids are `0..size`.
pub const POOL_SIZE_RANGE: RangeInclusive<u32> = 1..=1_000_000;

/// One `[[instance_id]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceIdSpec {
    pub pool: String,
    /// Ids are `0..size`.
    pub size: u32,
    /// A file that holds the id while it is claimed (written atomically,
    /// removed when the claim is lost).
    pub file: Option<PathBuf>,
    /// Hooks for instance-id-claimed and instance-id-lost.
    pub on_change: Vec<String>,
    pub location: Location,
}

pub(super) fn instance_id(
    d: &mut Diagnostics<'_>,
    mut t: TableReader<'_, '_>,
    base: &Path,
    hooks: &HookNames,
) -> Option<InstanceIdSpec> {
    let before = d.len();
    let pool = t.required::<String>(d, "pool", "name the pool, e.g. pool = \"worker\"");
    if let Some(p) = &pool
        && (p.is_empty() || p.contains('/'))
    {
        d.error(
            t.span_of("pool"),
            format!("invalid pool name `{p}`: non-empty, without `/`"),
        );
    }
    let size = t.required::<u32>(d, "size", "say how many ids the pool has, e.g. size = 1024");
    if let Some(n) = size
        && let Err(why) = check_range(&n, &POOL_SIZE_RANGE)
    {
        d.error(
            t.span_of("size"),
            format!("invalid `size` in [[instance_id]]: {why}"),
        );
    }
    let file = t.optional::<PathBuf>(d, "file");
    let on_change = hook_refs(d, &mut t, "on_change", hooks);
    let location = d.locate(t.span());
    t.finish(d);
    (d.len() == before).then(|| InstanceIdSpec {
        pool: pool.unwrap_or_default(),
        size: size.unwrap_or(1),
        file: file.map(|f| base.join(f)),
        on_change,
        location,
    })
}
