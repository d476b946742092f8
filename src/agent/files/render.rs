//! Turning etcd data into a file's content: every read of one render at
//! one revision, discovering what the file depends on as it goes.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::Value;
use minijinja::{Environment, ErrorKind, UndefinedBehavior};

use super::functions::{self, Reads, RenderData, text};
use std::sync::Mutex;

use crate::agent::manifest::{AutoEscape, FileSource, FileSpec, MissingKeys, PrefixFormat};
use crate::etcd::{CacheSnapshot, Client, ReadSet};

/// Passes one render may take to discover what it reads: each pass reads
/// what the last one asked for and did not have (a key named by another
/// key's value needs two).
const MAX_PASSES: usize = 16;

/// What one render read: a change to any of it re-renders the file, a
/// change elsewhere does not — and nothing elsewhere is read or watched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deps {
    pub reads: ReadSet,
    /// Prefixes that had at least one key.
    pub nonempty: BTreeSet<String>,
}

impl Deps {
    /// Whether a change to `key` concerns this file.
    pub fn touches(&self, key: &str) -> bool {
        self.reads.touches(key)
    }
}

/// Why a file could not be rendered. The old file stays in place.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("failed to render `{file}`: key `{key}` is missing")]
    MissingKey { file: PathBuf, key: String },
    #[error(
        "refusing to render `{file}`: prefix `{prefix}` had keys and is now empty (set allow_empty = true if that is meant)"
    )]
    EmptiedPrefix { file: PathBuf, prefix: String },
    #[error("failed to render `{file}`: template error: {message}")]
    Template { file: PathBuf, message: String },
    #[error("failed to read the template `{template}` for `{file}`: {message}")]
    TemplateFile {
        file: PathBuf,
        template: PathBuf,
        message: String,
    },
    #[error("failed to render `{file}` as {format}: {message}")]
    Format {
        file: PathBuf,
        format: &'static str,
        message: String,
    },
    #[error("failed to render `{file}`: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: crate::etcd::Error,
    },
    #[error(
        "failed to render `{file}`: what it reads kept changing its own keys after {MAX_PASSES} passes (a chain of keys naming keys that long, or a loop)"
    )]
    Unsettled { file: PathBuf },
}

impl RenderError {
    /// Whether trying again later may succeed without anything in etcd or
    /// the template changing (etcd unreachable, permissions granted).
    pub fn is_transient(&self) -> bool {
        matches!(self, RenderError::Read { .. })
    }
}

/// One render: its content (or why there is none), what it read, and the
/// etcd revision all of it was read at.
#[derive(Debug)]
pub struct Render {
    pub result: Result<Vec<u8>, RenderError>,
    pub deps: Deps,
    pub revision: i64,
    /// What was read (empty if reading failed).
    pub view: CacheSnapshot,
}

/// The template engine with coord's functions. Templates are compiled once
/// and kept until their source changes.
pub struct Renderer {
    env: Environment<'static>,
    namespace: String,
    agent: String,
    /// Template source per destination, to recompile only on change.
    sources: HashMap<PathBuf, String>,
    /// Escaping per template name (the destination), which minijinja asks
    /// for when it compiles the template.
    escapes: Escapes,
}

type Escapes = Arc<Mutex<HashMap<String, AutoEscape>>>;

impl std::fmt::Debug for Renderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renderer")
            .field("templates", &self.sources.len())
            .finish_non_exhaustive()
    }
}

impl Renderer {
    /// An engine with coord's functions (see [`functions`]), for an agent
    /// in `namespace`.
    pub fn new(namespace: &str) -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // minijinja would pick escaping from the template's name, which is
        // the destination: a `.json` file would get JSON-quoted values
        // inside its template's own quotes. Only the manifest chooses.
        let escapes = Escapes::default();
        let known = escapes.clone();
        env.set_auto_escape_callback(move |name| {
            match known.lock().unwrap_or_else(|p| p.into_inner()).get(name) {
                Some(AutoEscape::Html) => minijinja::AutoEscape::Html,
                Some(AutoEscape::Json) => minijinja::AutoEscape::Json,
                Some(AutoEscape::None) | None => minijinja::AutoEscape::None,
            }
        });
        // Config files: a `{% for %}` on its own line leaves no blank line,
        // and the file ends with the newline its template ends with.
        if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(true)
            .build()
        {
            env.set_syntax(syntax);
        }
        functions::register(&mut env);
        Renderer {
            env,
            namespace: namespace.to_owned(),
            agent: String::new(),
            sources: HashMap::new(),
            escapes,
        }
    }

    /// Names the agent whose claims `instance_id(pool)` reports.
    pub fn with_agent(mut self, agent: &str) -> Self {
        self.agent = agent.to_owned();
        self
    }

    /// Adds a template function. Functions reach the data of the render
    /// they run in through [`RenderData::of`].
    pub fn env_mut(&mut self) -> &mut Environment<'static> {
        &mut self.env
    }

    /// Renders `spec` from etcd at one revision. `hint` is what the last
    /// render read: `local` when given (a view of exactly `hint` at one
    /// revision, kept by watches), else read up front in one round trip.
    /// Whatever this render reads beyond it is read at the same revision and
    /// the render runs again, until a pass reads nothing it did not have.
    /// `previous` are the prefixes the last good render found keys in (to
    /// refuse one emptied).
    pub async fn render(
        &mut self,
        spec: &FileSpec,
        client: &Client,
        hint: &ReadSet,
        local: Option<CacheSnapshot>,
        previous: Option<&BTreeSet<String>>,
    ) -> Render {
        self.set_escaping(spec);
        let failed = |source, reads: &ReadSet, revision| Render {
            result: Err(RenderError::Read {
                file: spec.path.clone(),
                source,
            }),
            deps: Deps {
                reads: reads.clone(),
                nonempty: BTreeSet::new(),
            },
            revision,
            view: CacheSnapshot::default(),
        };
        let mut covered = hint.clone();
        let mut view = match local {
            Some(view) => view,
            None => match client.read(&covered, None).await {
                Ok(v) => v,
                Err(e) => return failed(e, hint, 0),
            },
        };
        for _ in 0..MAX_PASSES {
            let data = Arc::new(RenderData::new(
                view.clone(),
                covered.clone(),
                &self.namespace,
                &self.agent,
                spec.missing,
            ));
            let result = self.produce(spec, &data);
            let Reads {
                set,
                nonempty,
                incomplete,
            } = data.take_reads();
            if incomplete {
                let mut extra = ReadSet::default();
                for k in set.keys().filter(|k| !covered.covers_key(k)) {
                    extra.add_key(k);
                }
                for p in set.prefixes().filter(|p| !covered.covers_prefix(p)) {
                    extra.add_prefix(p);
                }
                covered.extend(&extra);
                match client.read(&extra, Some(view.revision())).await {
                    Ok(more) => view.merge(more),
                    // The revision was compacted meanwhile (or etcd
                    // blipped): read everything again at a newer one.
                    Err(_) => match client.read(&covered, None).await {
                        Ok(v) => view = v,
                        Err(e) => return failed(e, &set, view.revision()),
                    },
                }
                continue;
            }
            let result = result.and_then(|content| {
                match previous.and_then(|p| {
                    p.iter()
                        .find(|p| set.prefixes().any(|r| r == p.as_str()) && !nonempty.contains(*p))
                }) {
                    Some(prefix) if !spec.allow_empty => Err(RenderError::EmptiedPrefix {
                        file: spec.path.clone(),
                        prefix: prefix.clone(),
                    }),
                    _ => Ok(content),
                }
            });
            return Render {
                result,
                deps: Deps {
                    reads: set,
                    nonempty,
                },
                revision: view.revision(),
                view,
            };
        }
        Render {
            result: Err(RenderError::Unsettled {
                file: spec.path.clone(),
            }),
            deps: Deps {
                reads: covered,
                nonempty: BTreeSet::new(),
            },
            revision: view.revision(),
            view,
        }
    }

    /// One pass: the content from what `data` holds.
    fn produce(&mut self, spec: &FileSpec, data: &Arc<RenderData>) -> Result<Vec<u8>, RenderError> {
        match &spec.source {
            FileSource::Template(template) => {
                let text =
                    std::fs::read_to_string(template).map_err(|e| RenderError::TemplateFile {
                        file: spec.path.clone(),
                        template: template.clone(),
                        message: e.to_string(),
                    })?;
                self.render_template(spec, text, data)
            }
            FileSource::Inline(text) => self.render_template(spec, text.clone(), data),
            FileSource::Key(k) => match data.read_key(k) {
                Some(v) => Ok(v),
                None if spec.missing == MissingKeys::Empty => Ok(Vec::new()),
                None => Err(RenderError::MissingKey {
                    file: spec.path.clone(),
                    key: k.clone(),
                }),
            },
            FileSource::Prefix { prefix, format } => {
                let entries = data.read_prefix(prefix);
                format_prefix(&spec.path, prefix, *format, &entries)
            }
        }
    }

    fn render_template(
        &mut self,
        spec: &FileSpec,
        text: String,
        data: &Arc<RenderData>,
    ) -> Result<Vec<u8>, RenderError> {
        let name = spec.path.display().to_string();
        if self.sources.get(&spec.path) != Some(&text) {
            self.env
                .add_template_owned(name.clone(), text.clone())
                .map_err(|e| template_error(&spec.path, &e))?;
            self.sources.insert(spec.path.clone(), text);
        }
        let template = self
            .env
            .get_template(&name)
            .map_err(|e| template_error(&spec.path, &e))?;
        let ctx = minijinja::context! { __coord_data => Value::from_dyn_object(data.clone()) };
        match template.render(ctx) {
            Ok(out) => Ok(out.into_bytes()),
            Err(e) => {
                // A missing key surfaces as a template error; name the key.
                if let Some(key) = data.take_missing_key() {
                    return Err(RenderError::MissingKey {
                        file: spec.path.clone(),
                        key,
                    });
                }
                Err(template_error(&spec.path, &e))
            }
        }
    }

    /// Forgets the compiled template of a file (it was removed).
    pub fn forget(&mut self, path: &Path) {
        let name = path.display().to_string();
        if self.sources.remove(path).is_some() {
            self.env.remove_template(&name);
        }
        self.escapes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name);
    }

    /// Records `spec`'s escaping for its template. minijinja fixes it at
    /// compile time, so a template whose escaping changed is recompiled.
    fn set_escaping(&mut self, spec: &FileSpec) {
        let name = spec.path.display().to_string();
        let known = self
            .escapes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            .copied();
        if known != Some(spec.autoescape) {
            self.forget(&spec.path);
            self.escapes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name, spec.autoescape);
        }
    }
}

/// A mistake in a template found without rendering it: 1-based line and
/// column in the template's text, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateProblem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl Renderer {
    /// What would fail in `text` whatever etcd holds: a syntax error, or a
    /// name that is neither one of coord's functions nor set in the
    /// template (`key_ro(…)`), with a "did you mean". For `coord check`.
    /// (A name used only behind `is defined` is reported too: templates
    /// render with strict undefined, where that is rare.)
    pub fn check_template(&self, text: &str) -> Vec<TemplateProblem> {
        let template = match self.env.template_from_str(text) {
            Ok(t) => t,
            Err(e) => {
                let (line, column) = match e.range() {
                    Some(r) => line_column(text, r.start),
                    None => (e.line().unwrap_or(1), 1),
                };
                let message = match e.detail() {
                    Some(detail) => format!("{}: {detail}", e.kind()),
                    None => e.kind().to_string(),
                };
                return vec![TemplateProblem {
                    line,
                    column,
                    message,
                }];
            }
        };
        let globals: Vec<&str> = self.env.globals().map(|(name, _)| name).collect();
        let mut unknown: Vec<String> = template
            .undeclared_variables(false)
            .into_iter()
            .filter(|name| name != "__coord_data" && !globals.contains(&name.as_str()))
            .collect();
        unknown.sort();
        unknown
            .into_iter()
            .map(|name| {
                let (line, column) =
                    first_use(text, &name).map_or((1, 1), |at| line_column(text, at));
                TemplateProblem {
                    line,
                    column,
                    message: format!(
                        "unknown function or variable `{name}`{}",
                        crate::agent::manifest::suggest(&name, functions::FUNCTIONS)
                    ),
                }
            })
            .collect()
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

/// Where `name` is first written as a whole identifier.
fn first_use(text: &str, name: &str) -> Option<usize> {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(name).map(|(at, _)| at).find(|&at| {
        let before = text[..at].chars().next_back();
        let after = text[at + name.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

fn template_error(file: &Path, e: &minijinja::Error) -> RenderError {
    let mut message = e.to_string();
    if e.kind() == ErrorKind::UnknownFunction
        && let Some(name) = e.detail().and_then(|d| d.strip_suffix(" is unknown"))
    {
        message.push_str(&crate::agent::manifest::suggest(name, functions::FUNCTIONS));
    }
    if let Some(line) = e.line() {
        message = format!("line {line}: {message}");
    }
    RenderError::Template {
        file: file.to_owned(),
        message,
    }
}

/// A prefix as a document: keys relative to the prefix; for JSON, YAML and
/// TOML a `/` in a key nests tables.
fn format_prefix(
    file: &Path,
    prefix: &str,
    format: PrefixFormat,
    entries: &[(String, Vec<u8>)],
) -> Result<Vec<u8>, RenderError> {
    let fail = |message: String| RenderError::Format {
        file: file.to_owned(),
        format: format.name(),
        message,
    };
    let relative = entries
        .iter()
        .map(|(k, v)| (&k[prefix.len()..], text(v.clone())));
    let text = match format {
        PrefixFormat::Env => env_lines(prefix, relative),
        PrefixFormat::Json | PrefixFormat::Yaml | PrefixFormat::Toml => {
            let mut tree = serde_json::Map::new();
            for (name, value) in relative {
                insert_nested(&mut tree, name, value).map_err(fail)?;
            }
            let tree = serde_json::Value::Object(tree);
            match format {
                PrefixFormat::Json => serde_json::to_string_pretty(&tree)
                    .map(|s| s + "\n")
                    .map_err(|e| e.to_string()),
                PrefixFormat::Yaml => serde_norway::to_string(&tree).map_err(|e| e.to_string()),
                _ => toml::to_string(&tree).map_err(|e| e.to_string()),
            }
        }
    }
    .map_err(fail)?;
    Ok(text.into_bytes())
}

/// `NAME='value'` lines; the name is the key below `prefix` with each `/`
/// as `_` (`nested/x` → `nested_x`), so keys in different folders do not
/// collide. Two keys that still map to one name fail the render: keeping
/// either value would hide the other.
fn env_lines<'a>(
    prefix: &str,
    entries: impl Iterator<Item = (&'a str, String)>,
) -> Result<String, String> {
    let mut out = String::new();
    let mut seen: HashMap<String, &'a str> = HashMap::new();
    for (relative, value) in entries {
        let name = relative.replace('/', "_");
        if name.is_empty()
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            || name.starts_with(|c: char| c.is_ascii_digit())
        {
            return Err(format!(
                "`{name}` (from key `{prefix}{relative}`) is not a valid environment variable name"
            ));
        }
        if let Some(first) = seen.insert(name.clone(), relative) {
            return Err(format!(
                "keys `{prefix}{first}` and `{prefix}{relative}` both become `{name}`"
            ));
        }
        // Single quotes keep every byte literal for shells and dotenv
        // parsers; a quote inside is closed, escaped and reopened.
        out.push_str(&format!("{name}='{}'\n", value.replace('\'', "'\\''")));
    }
    Ok(out)
}

/// Puts `value` at the `/`-separated `path` inside `tree`.
fn insert_nested(
    tree: &mut serde_json::Map<String, serde_json::Value>,
    path: &str,
    value: String,
) -> Result<(), String> {
    let mut parts = path.split('/').filter(|p| !p.is_empty()).peekable();
    let mut node = tree;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            if node.contains_key(part) {
                return Err(format!("`{path}` is both a value and a table"));
            }
            node.insert(part.to_owned(), serde_json::Value::String(value));
            return Ok(());
        }
        let child = node
            .entry(part.to_owned())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        node = match child {
            serde_json::Value::Object(map) => map,
            _ => return Err(format!("`{path}` is both a value and a table")),
        };
    }
    Ok(())
}
