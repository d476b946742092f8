//! `[[file]]`: etcd data rendered into a file for programs that cannot talk
//! to etcd.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Location;
use super::diagnostics::Diagnostics;
use super::reader::TableReader;

/// One `[[file]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// The destination (relative paths from the manifest's directory).
    pub path: PathBuf,
    pub source: FileSource,
    /// Permission bits of the written file (default 0644).
    pub mode: u32,
    pub owner: Option<String>,
    pub group: Option<String>,
    /// A command that checks the staged file (`{staged}` is replaced by its
    /// path); a non-zero exit keeps the old file.
    pub check: Option<Vec<String>>,
    /// Hooks that may veto the staged file.
    pub validate: Vec<String>,
    /// Hooks run after the file was really replaced.
    pub on_change: Vec<String>,
    /// When an `on_change` hook fails through its retries, put the previous
    /// content back (keeping the failed one at `<path>.rejected`).
    pub revert: bool,
    /// Hooks that get `file-reverted` when that happens.
    pub on_revert: Vec<String>,
    pub missing: MissingKeys,
    /// How a template's `{{ … }}` output is escaped.
    pub autoescape: AutoEscape,
    /// Whether a prefix that had keys may render as empty.
    pub allow_empty: bool,
    /// Quiet time to wait for after a change before rendering.
    pub debounce_min: Duration,
    /// Longest a render may be held back by a stream of changes.
    pub debounce_max: Duration,
    /// Keep the previous content as `<path>.bak`.
    pub backup: bool,
    /// Create missing parent directories.
    pub create_dirs: bool,
    pub location: Location,
}

/// Where a file's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSource {
    /// A MiniJinja template file (watched: an edit re-renders).
    Template(PathBuf),
    /// A MiniJinja template written in the manifest.
    Inline(String),
    /// One key's raw value.
    Key(String),
    /// Every key under a prefix, in a standard format.
    Prefix {
        prefix: String,
        format: PrefixFormat,
    },
}

/// Formats a whole prefix can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixFormat {
    /// `NAME='value'` lines; the name is the key below the prefix with
    /// each `/` as `_`.
    Env,
    Json,
    Yaml,
    Toml,
}

impl PrefixFormat {
    /// The name used in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            PrefixFormat::Env => "env",
            PrefixFormat::Json => "json",
            PrefixFormat::Yaml => "yaml",
            PrefixFormat::Toml => "toml",
        }
    }
}

/// What a render does with a key that is not in etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingKeys {
    /// The render fails and the old file stays (the default).
    Error,
    /// The key reads as an empty string.
    Empty,
}

/// How a template's `{{ … }}` output is escaped (`autoescape`). Chosen in
/// the manifest, never from the destination's name: a `.json` file whose
/// template writes `"{{ key(…) }}"` wants the value, not a JSON string
/// inside its own quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoEscape {
    /// Values go in as they are (the default).
    None,
    /// `<`, `>`, `&` and quotes as HTML entities.
    Html,
    /// Each value as a JSON literal: a string comes with its quotes.
    Json,
}

impl AutoEscape {
    /// The name used in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            AutoEscape::None => "none",
            AutoEscape::Html => "html",
            AutoEscape::Json => "json",
        }
    }
}

pub const DEFAULT_MODE: u32 = 0o644;

pub(super) fn file(
    d: &mut Diagnostics<'_>,
    mut t: TableReader<'_, '_>,
    base: &Path,
    hooks: &HookNames,
) -> Option<FileSpec> {
    let before = d.len();
    let path = t.required::<PathBuf>(d, "path", "say where the file is written");
    let template = t.optional::<PathBuf>(d, "template");
    let inline = t.optional::<String>(d, "source");
    let key = t.optional::<String>(d, "key");
    let prefix = t.optional::<String>(d, "prefix");
    let format = t.optional::<String>(d, "format");
    let given: Vec<&str> = [
        ("template", template.is_some()),
        ("source", inline.is_some()),
        ("key", key.is_some()),
        ("prefix", prefix.is_some()),
    ]
    .iter()
    .filter(|(_, g)| *g)
    .map(|(k, _)| *k)
    .collect();
    let source = match (template, inline, key, prefix) {
        _ if given.len() > 1 => {
            d.error(
                t.span_of(given[1]),
                format!(
                    "a [[file]] has one source; `{}` and `{}` are both given",
                    given[0], given[1]
                ),
            );
            None
        }
        (Some(p), None, None, None) => Some(FileSource::Template(base.join(p))),
        (None, Some(s), None, None) => Some(FileSource::Inline(s)),
        (None, None, Some(k), None) => Some(FileSource::Key(k)),
        (None, None, None, Some(p)) => {
            let format = match format.as_deref() {
                Some("env") => Some(PrefixFormat::Env),
                Some("json") => Some(PrefixFormat::Json),
                Some("yaml") => Some(PrefixFormat::Yaml),
                Some("toml") => Some(PrefixFormat::Toml),
                Some(other) => {
                    d.error(
                        t.span_of("format"),
                        format!("unknown `format` \"{other}\": use env, json, yaml or toml"),
                    );
                    None
                }
                None => {
                    d.error(
                        t.span_of("prefix"),
                        "missing `format` in [[file]]: a `prefix` is written as env, json, yaml or toml",
                    );
                    None
                }
            };
            format.map(|format| FileSource::Prefix { prefix: p, format })
        }
        _ => {
            d.error(
                t.span(),
                "missing source in [[file]]: give `template`, `source`, `key` or `prefix`",
            );
            None
        }
    };
    if format.is_some() && !matches!(source, Some(FileSource::Prefix { .. }) | None) {
        d.error(t.span_of("format"), "`format` goes with `prefix` only");
    }
    let mode = t
        .optional::<String>(d, "mode")
        .and_then(|m| match u32::from_str_radix(&m, 8) {
            Ok(bits) if bits <= 0o7777 => Some(bits),
            _ => {
                d.error(
                    t.span_of("mode"),
                    format!("invalid `mode` \"{m}\": write octal permission bits like \"0644\""),
                );
                None
            }
        });
    let owner = t.optional::<String>(d, "owner");
    let group = t.optional::<String>(d, "group");
    let check = t.optional::<Vec<String>>(d, "check");
    if let Some(argv) = &check {
        if argv.is_empty() {
            d.error(
                t.span_of("check"),
                "`check` is empty: give the command and its arguments",
            );
        } else if !argv.iter().any(|a| a.contains("{staged}")) {
            d.error(
                t.span_of("check"),
                "`check` must name the staged file with `{staged}`, e.g. [\"nginx\", \"-t\", \"-c\", \"{staged}\"]",
            );
        }
    }
    let validate = hook_refs(d, &mut t, "validate", hooks);
    let on_change = hook_refs(d, &mut t, "on_change", hooks);
    let revert = t.optional::<bool>(d, "revert").unwrap_or(false);
    let on_revert = hook_refs(d, &mut t, "on_revert", hooks);
    if revert && on_change.is_empty() {
        d.error(
            t.span_of("revert"),
            "`revert = true` needs `on_change` hooks: a file is put back when they fail",
        );
    }
    if !on_revert.is_empty() && !revert {
        d.error(
            t.span_of("on_revert"),
            "`on_revert` needs `revert = true`: without it nothing is ever reverted",
        );
    }
    let missing = match t.optional::<String>(d, "missing").as_deref() {
        None | Some("error") => MissingKeys::Error,
        Some("empty") => MissingKeys::Empty,
        Some(other) => {
            d.error(
                t.span_of("missing"),
                format!("unknown `missing` policy \"{other}\": use \"error\" or \"empty\""),
            );
            MissingKeys::Error
        }
    };
    let autoescape = match t.optional::<String>(d, "autoescape").as_deref() {
        None | Some("none") => AutoEscape::None,
        Some("html") => AutoEscape::Html,
        Some("json") => AutoEscape::Json,
        Some(other) => {
            d.error(
                t.span_of("autoescape"),
                format!("unknown `autoescape` \"{other}\": use \"none\", \"html\" or \"json\""),
            );
            AutoEscape::None
        }
    };
    if t.has("autoescape") && matches!(source, Some(FileSource::Key(_) | FileSource::Prefix { .. }))
    {
        d.error(
            t.span_of("autoescape"),
            "`autoescape` goes with `template` or `source` only: a `key` or `prefix` is not a template",
        );
    }
    let allow_empty = t.optional::<bool>(d, "allow_empty").unwrap_or(false);
    let (debounce_min, debounce_max) = match t.table(d, "debounce") {
        Some(mut db) => {
            let min = db
                .within(d, "min", DEBOUNCE_RANGE)
                .unwrap_or(DEFAULT_DEBOUNCE_MIN);
            let max = db
                .within(d, "max", DEBOUNCE_RANGE)
                .unwrap_or(DEFAULT_DEBOUNCE_MAX);
            if max < min {
                d.error(db.span(), "`debounce.max` must not be below `debounce.min`");
            }
            db.finish(d);
            (min, max)
        }
        None => (DEFAULT_DEBOUNCE_MIN, DEFAULT_DEBOUNCE_MAX),
    };
    let backup = t.optional::<bool>(d, "backup").unwrap_or(false);
    let create_dirs = t.optional::<bool>(d, "create_dirs").unwrap_or(false);
    let location = d.locate(t.span());
    t.finish(d);
    (d.len() == before).then(|| FileSpec {
        path: base.join(path.unwrap_or_default()),
        source: source.unwrap_or(FileSource::Inline(String::new())),
        mode: mode.unwrap_or(DEFAULT_MODE),
        owner,
        group,
        check,
        validate,
        on_change,
        revert,
        on_revert,
        missing,
        autoescape,
        allow_empty,
        debounce_min,
        debounce_max,
        backup,
        create_dirs,
        location,
    })
}

/// Default quiet time before a render.
pub const DEFAULT_DEBOUNCE_MIN: Duration = Duration::ZERO;
/// Default longest hold-back of a render.
pub const DEFAULT_DEBOUNCE_MAX: Duration = Duration::from_secs(2);
/// `debounce.min` and `debounce.max`.
pub const DEBOUNCE_RANGE: RangeInclusive<Duration> = Duration::ZERO..=Duration::from_secs(3600);

/// The names the manifest's `[[hook]]`s were given, valid or not.
#[derive(Debug, Default)]
pub(super) struct HookNames {
    names: Vec<String>,
    /// Whether every `[[hook]]` has a name that could be read: when one has
    /// none, a reference to an unknown name may well be to that one, and
    /// is not judged (the hook's own error is what to fix).
    complete: bool,
    /// Whether any `[[hook]]` was seen.
    seen: bool,
}

impl HookNames {
    /// Records one `[[hook]]`'s name as written (`None`: unreadable).
    pub(super) fn declare(&mut self, name: Option<String>) {
        if !self.seen {
            self.seen = true;
            self.complete = true;
        }
        match name {
            Some(n) => self.names.push(n),
            None => self.complete = false,
        }
    }

    fn judge(&self, name: &str, key: &str) -> Option<String> {
        if self.names.iter().any(|n| n == name) || (self.seen && !self.complete) {
            return None;
        }
        let known: Vec<&str> = self.names.iter().map(String::as_str).collect();
        Some(if known.is_empty() {
            format!("unknown hook `{name}` in `{key}`: no [[hook]] is defined")
        } else {
            format!(
                "unknown hook `{name}` in `{key}`{}",
                super::suggest(name, &known)
            )
        })
    }
}

/// A list of hook names, each of which must be a `[[hook]]`.
pub(super) fn hook_refs(
    d: &mut Diagnostics<'_>,
    t: &mut TableReader<'_, '_>,
    key: &'static str,
    hooks: &HookNames,
) -> Vec<String> {
    let names = t.optional::<Vec<String>>(d, key).unwrap_or_default();
    for name in &names {
        if let Some(message) = hooks.judge(name, key) {
            d.error(t.span_of(key), message);
        }
    }
    names
}
