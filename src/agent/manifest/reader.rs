//! Reads a spanned TOML table field by field, so that every problem in a
//! manifest is reported at once (serde stops at the first).

use std::ops::{Range, RangeInclusive};
use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::diagnostics::Diagnostics;

/// A table being read; what is not taken by the end is an unknown field.
pub(crate) struct TableReader<'a, 'i> {
    /// How the table is named in messages: `[agent]`, `[etcd.tls]`.
    name: String,
    table: &'a DeTable<'i>,
    span: Range<usize>,
    taken: Vec<&'static str>,
    /// Required fields found missing, with their hints: reported at
    /// `finish`, where a misspelt key that stands for one is reported
    /// instead (one typo, one error).
    missing: Vec<(&'static str, String)>,
}

impl<'a, 'i> TableReader<'a, 'i> {
    pub(crate) fn new(name: impl Into<String>, table: &'a DeTable<'i>, span: Range<usize>) -> Self {
        TableReader {
            name: name.into(),
            table,
            span,
            taken: Vec::new(),
            missing: Vec::new(),
        }
    }

    pub(crate) fn span(&self) -> Range<usize> {
        self.span.clone()
    }

    fn value(&mut self, key: &'static str) -> Option<&'a Spanned<DeValue<'i>>> {
        self.taken.push(key);
        self.table.get(key)
    }

    /// Whether `key` is given, valid or not.
    pub(crate) fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// The span of `key`'s value, or of the table when it is absent.
    pub(crate) fn span_of(&self, key: &str) -> Range<usize> {
        self.table
            .get(key)
            .map_or_else(|| self.span.clone(), |v| v.span())
    }

    /// The span of entry `entry` of the inline table at `key`, else of
    /// `key`'s value (so an error points at the one bad entry).
    pub(crate) fn entry_span(&self, key: &str, entry: &str) -> Range<usize> {
        match self.table.get(key).map(|v| (v.span(), v.get_ref())) {
            Some((_, DeValue::Table(t))) => t
                .iter()
                .find(|(k, _)| k.get_ref().as_ref() == entry)
                .map_or_else(|| self.span_of(key), |(k, _)| k.span()),
            Some((span, _)) => span,
            None => self.span.clone(),
        }
    }

    /// An optional field of any deserializable type.
    pub(crate) fn optional<T: FromToml>(
        &mut self,
        d: &mut Diagnostics<'_>,
        key: &'static str,
    ) -> Option<T> {
        let value = self.value(key)?;
        match T::from_toml(value) {
            Ok(v) => Some(v),
            Err((span, message)) => {
                d.error(
                    span.unwrap_or_else(|| value.span()),
                    format!("invalid `{key}` in {}: {message}", self.name),
                );
                None
            }
        }
    }

    /// An optional field that must lie within `range`: outside it is an
    /// error at the value that names the bounds. *Why bounds at all:* a
    /// zero interval hot-loops a checker, a huge duration overflows
    /// `Instant + d` (a panic), a huge size overflows what it is multiplied
    /// into; none of them is what anybody meant.
    pub(crate) fn within<T: Bounded>(
        &mut self,
        d: &mut Diagnostics<'_>,
        key: &'static str,
        range: RangeInclusive<T>,
    ) -> Option<T> {
        let value = self.optional::<T>(d, key)?;
        match check_range(&value, &range) {
            Ok(()) => Some(value),
            Err(why) => {
                d.error(
                    self.span_of(key),
                    format!("invalid `{key}` in {}: {why}", self.name),
                );
                None
            }
        }
    }

    /// A field that must be present. Its absence is reported by
    /// [`finish`](Self::finish).
    pub(crate) fn required<T: FromToml>(
        &mut self,
        d: &mut Diagnostics<'_>,
        key: &'static str,
        hint: &str,
    ) -> Option<T> {
        if !self.table.contains_key(key) {
            self.taken.push(key);
            self.missing.push((key, hint.to_owned()));
            return None;
        }
        self.optional(d, key)
    }

    /// The string value of `key` as written, or of the one unknown key
    /// that reads as a misspelling of it (`nmae` for `name`), without
    /// judging it: what a table that failed to parse is still called.
    pub(crate) fn name_as_written(&self, key: &str) -> Option<String> {
        let as_str = |v: &Spanned<DeValue<'_>>| match v.get_ref() {
            DeValue::String(s) => Some(s.to_string()),
            _ => None,
        };
        if let Some(v) = self.table.get(key) {
            return as_str(v);
        }
        let mut close = self
            .table
            .iter()
            .filter(|(k, _)| closest(k.get_ref(), &[key]).is_some());
        match (close.next(), close.next()) {
            (Some((_, v)), None) => as_str(v),
            _ => None,
        }
    }

    /// A sub-table (`[etcd.tls]` or `tls = { … }`).
    pub(crate) fn table(
        &mut self,
        d: &mut Diagnostics<'_>,
        key: &'static str,
    ) -> Option<TableReader<'a, 'i>> {
        let name = format!("[{}.{key}]", self.name.trim_matches(['[', ']']));
        let value = self.value(key)?;
        match value.get_ref() {
            DeValue::Table(t) => Some(TableReader::new(name, t, value.span())),
            other => {
                d.error(
                    value.span(),
                    format!("`{key}` must be a table, not {}", other.type_str()),
                );
                None
            }
        }
    }

    /// Reports every field nobody asked for, and every required one
    /// missing. A misspelt key that stands for a missing required one is
    /// one mistake, reported once, at the misspelling.
    pub(crate) fn finish(mut self, d: &mut Diagnostics<'_>) {
        for (key, _) in self.table.iter() {
            let key_name = key.get_ref().as_ref();
            if self.taken.contains(&key_name) {
                continue;
            }
            let meant = closest(key_name, &self.taken);
            let required = meant.is_some_and(|m| self.missing.iter().any(|(k, _)| *k == m));
            if let (Some(meant), true) = (meant, required) {
                self.missing.retain(|(k, _)| *k != meant);
                d.error(
                    key.span(),
                    format!(
                        "unknown field `{key_name}` in {}; did you mean `{meant}` (which is required)?",
                        self.name
                    ),
                );
                continue;
            }
            d.error(
                key.span(),
                format!(
                    "unknown field `{key_name}` in {}{}",
                    self.name,
                    suggest(key_name, &self.taken)
                ),
            );
        }
        for (key, hint) in &self.missing {
            d.error(
                self.span.clone(),
                format!("missing `{key}` in {}: {hint}", self.name),
            );
        }
    }
}

/// The known name `unknown` is most likely a misspelling of, if any is
/// close enough.
fn closest<'k>(unknown: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(unknown, k), *k))
        .filter(|(distance, k)| *distance <= (k.len() / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, k)| k)
}

/// "; did you mean `x`?" when a known name is close, else "; expected one
/// of: …" (nothing when none are known).
pub fn suggest(unknown: &str, known: &[&str]) -> String {
    match closest(unknown, known) {
        Some(k) => format!("; did you mean `{k}`?"),
        None if known.is_empty() => String::new(),
        None => format!("; expected one of: {}", known.join(", ")),
    }
}

/// A value with bounds a manifest must keep to, and how to show them.
pub(crate) trait Bounded: FromToml + PartialOrd {
    fn show(&self) -> String;
}

impl Bounded for Duration {
    fn show(&self) -> String {
        humantime::format_duration(*self).to_string()
    }
}

impl Bounded for u32 {
    fn show(&self) -> String {
        self.to_string()
    }
}

impl Bounded for u64 {
    fn show(&self) -> String {
        self.to_string()
    }
}

/// `Err` with the reason when `value` is outside `range`.
pub(crate) fn check_range<T: Bounded>(value: &T, range: &RangeInclusive<T>) -> Result<(), String> {
    if range.contains(value) {
        return Ok(());
    }
    let side = if value < range.start() {
        "below"
    } else {
        "above"
    };
    Err(format!(
        "{} is {side} the range this setting allows, {} to {}",
        value.show(),
        range.start().show(),
        range.end().show()
    ))
}

/// A value read from the manifest. The error carries a span when it can be
/// more precise than the whole value.
pub(crate) trait FromToml: Sized {
    fn from_toml(value: &Spanned<DeValue<'_>>) -> Result<Self, (Option<Range<usize>>, String)>;
}

fn deserialize<T: DeserializeOwned>(
    value: &Spanned<DeValue<'_>>,
) -> Result<T, (Option<Range<usize>>, String)> {
    T::deserialize(ValueDeserializer::from(value.clone()))
        .map_err(|e| (e.span(), e.message().to_owned()))
}

macro_rules! from_toml_by_serde {
    ($($t:ty),*) => {$(
        impl FromToml for $t {
            fn from_toml(value: &Spanned<DeValue<'_>>) -> Result<Self, (Option<Range<usize>>, String)> {
                deserialize(value)
            }
        }
    )*};
}

from_toml_by_serde!(
    String,
    bool,
    u32,
    u64,
    Vec<String>,
    Vec<std::path::PathBuf>,
    std::path::PathBuf,
    std::collections::BTreeMap<String, String>,
    serde_json::Value
);

impl FromToml for Duration {
    fn from_toml(value: &Spanned<DeValue<'_>>) -> Result<Self, (Option<Range<usize>>, String)> {
        let text: String = deserialize(value).map_err(|(span, _)| {
            (
                span,
                format!(
                    "expected a duration like \"10s\" or \"1m30s\", found {}",
                    value.get_ref().type_str()
                ),
            )
        })?;
        humantime::parse_duration(&text).map_err(|e| {
            (
                None,
                format!("`{text}` is not a duration ({e}); write it like \"10s\" or \"1m30s\""),
            )
        })
    }
}
