//! Turning a snapshot of etcd into a file's content, recording what was read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use minijinja::value::{Object, Value};
use minijinja::{Environment, ErrorKind, State, UndefinedBehavior};

use crate::agent::manifest::{AutoEscape, FileSource, FileSpec, MissingKeys, PrefixFormat};
use crate::etcd::CacheSnapshot;

/// The keys and prefixes one render read: a change to any of them
/// re-renders the file, a change elsewhere does not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deps {
    pub keys: BTreeSet<String>,
    pub prefixes: BTreeSet<String>,
    /// Prefixes that had at least one key.
    pub nonempty: BTreeSet<String>,
}

impl Deps {
    /// Whether a change to `key` concerns this file.
    pub fn touches(&self, key: &str) -> bool {
        self.keys.contains(key) || self.prefixes.iter().any(|p| key.starts_with(p.as_str()))
    }
}

/// Why a file could not be rendered. The old file stays in place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
}

/// A rendered file, not yet written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub content: Vec<u8>,
    pub deps: Deps,
    /// The etcd revision every read came from.
    pub revision: i64,
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

/// The name under which the per-render data is passed to templates.
const DATA: &str = "__coord_data";

impl Renderer {
    /// An engine with `key`, `key_or`, `keys`, `ls`, `json` and
    /// `service`, for an agent in `namespace`.
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
        env.add_function("key", key);
        env.add_function("key_or", key_or);
        env.add_function("keys", keys);
        env.add_function("ls", ls);
        env.add_function("json", json);
        env.add_function("service", crate::agent::services::template_service);
        env.add_function("instance_id", instance_id);
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

    /// Renders `spec` from `snapshot`. `previous` is what the last good
    /// render read (to notice a prefix that was emptied).
    pub fn render(
        &mut self,
        spec: &FileSpec,
        snapshot: &CacheSnapshot,
        previous: Option<&Deps>,
    ) -> Result<Rendered, RenderError> {
        self.set_escaping(spec);
        let data = Arc::new(RenderData {
            snapshot: snapshot.clone(),
            namespace: self.namespace.clone(),
            agent: self.agent.clone(),
            missing: spec.missing,
            deps: Mutex::default(),
            missing_key: Mutex::default(),
        });
        let content = match &spec.source {
            FileSource::Template(template) => {
                let text =
                    std::fs::read_to_string(template).map_err(|e| RenderError::TemplateFile {
                        file: spec.path.clone(),
                        template: template.clone(),
                        message: e.to_string(),
                    })?;
                self.render_template(spec, text, &data)?
            }
            FileSource::Inline(text) => self.render_template(spec, text.clone(), &data)?,
            FileSource::Key(k) => match data.read_key(k) {
                Some(v) => v,
                None if spec.missing == MissingKeys::Empty => Vec::new(),
                None => {
                    return Err(RenderError::MissingKey {
                        file: spec.path.clone(),
                        key: k.clone(),
                    });
                }
            },
            FileSource::Prefix { prefix, format } => {
                let entries = data.read_prefix(prefix);
                format_prefix(&spec.path, prefix, *format, &entries)?
            }
        };
        let deps = data.deps.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !spec.allow_empty
            && let Some(previous) = previous
            && let Some(prefix) = previous
                .nonempty
                .iter()
                .find(|p| deps.prefixes.contains(*p) && !deps.nonempty.contains(*p))
        {
            return Err(RenderError::EmptiedPrefix {
                file: spec.path.clone(),
                prefix: prefix.clone(),
            });
        }
        Ok(Rendered {
            content,
            deps,
            revision: snapshot.revision(),
        })
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
                if let Some(key) = data
                    .missing_key
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                {
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

fn template_error(file: &Path, e: &minijinja::Error) -> RenderError {
    let mut message = e.to_string();
    if let Some(line) = e.line() {
        message = format!("line {line}: {message}");
    }
    RenderError::Template {
        file: file.to_owned(),
        message,
    }
}

/// What a render reads from, and what it has read.
#[derive(Debug)]
pub struct RenderData {
    snapshot: CacheSnapshot,
    namespace: String,
    agent: String,
    missing: MissingKeys,
    deps: Mutex<Deps>,
    missing_key: Mutex<Option<String>>,
}

impl Object for RenderData {}

impl RenderData {
    /// The data of the render `state` belongs to.
    pub fn of(state: &State<'_, '_>) -> Result<Arc<RenderData>, minijinja::Error> {
        state
            .lookup(DATA)
            .and_then(|v| v.downcast_object::<RenderData>())
            .ok_or_else(|| {
                minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "coord data is not available here",
                )
            })
    }

    /// The agent's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn deps(&self) -> std::sync::MutexGuard<'_, Deps> {
        self.deps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The raw value of `key`, recording the read.
    pub fn read_key(&self, key: &str) -> Option<Vec<u8>> {
        self.deps().keys.insert(key.to_owned());
        self.snapshot.get(key).map(|kv| kv.value.clone())
    }

    /// Every key under `prefix` with its value, recording the read.
    pub fn read_prefix(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let entries: Vec<(String, Vec<u8>)> = self
            .snapshot
            .under(prefix)
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect();
        let mut deps = self.deps();
        deps.prefixes.insert(prefix.to_owned());
        if !entries.is_empty() {
            deps.nonempty.insert(prefix.to_owned());
        }
        entries
    }
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn key(state: &State<'_, '_>, k: &str) -> Result<Value, minijinja::Error> {
    let data = RenderData::of(state)?;
    match data.read_key(k) {
        Some(v) => Ok(Value::from(text(v))),
        None if data.missing == MissingKeys::Empty => Ok(Value::from("")),
        None => {
            *data.missing_key.lock().unwrap_or_else(|p| p.into_inner()) = Some(k.to_owned());
            Err(minijinja::Error::new(
                ErrorKind::UndefinedError,
                format!("key `{k}` is missing"),
            ))
        }
    }
}

/// `instance_id("worker")` → the id this agent holds in the pool; a render
/// without one fails (or reads empty with `missing = "empty"`), and re-runs
/// when the claim changes.
fn instance_id(state: &State<'_, '_>, pool: &str) -> Result<Value, minijinja::Error> {
    let data = RenderData::of(state)?;
    let prefix = crate::ids::prefix(&data.namespace, pool);
    let mine = data
        .read_prefix(&prefix)
        .into_iter()
        .find_map(|(key, value)| {
            let record: crate::ids::ClaimRecord = serde_json::from_slice(&value).ok()?;
            (record.agent == data.agent)
                .then(|| crate::ids::id_of(&key))
                .flatten()
        });
    match mine {
        Some(id) => Ok(Value::from(id)),
        None if data.missing == MissingKeys::Empty => Ok(Value::from("")),
        None => {
            let what = format!("{prefix}<id of {}>", data.agent);
            *data.missing_key.lock().unwrap_or_else(|p| p.into_inner()) = Some(what.clone());
            Err(minijinja::Error::new(
                ErrorKind::UndefinedError,
                format!("no instance id held in pool `{pool}`"),
            ))
        }
    }
}

fn key_or(state: &State<'_, '_>, k: &str, default: Value) -> Result<Value, minijinja::Error> {
    let data = RenderData::of(state)?;
    Ok(data.read_key(k).map_or(default, |v| Value::from(text(v))))
}

/// `keys("/app/")` → `{"a": "1", "b/c": "2"}`: keys relative to the prefix.
fn keys(state: &State<'_, '_>, prefix: &str) -> Result<Value, minijinja::Error> {
    let data = RenderData::of(state)?;
    let map: BTreeMap<String, String> = data
        .read_prefix(prefix)
        .into_iter()
        .map(|(k, v)| (k[prefix.len()..].to_owned(), text(v)))
        .collect();
    Ok(Value::from(map))
}

/// `ls("/app/")` → the names directly under the prefix, like `ls`.
fn ls(state: &State<'_, '_>, prefix: &str) -> Result<Value, minijinja::Error> {
    let data = RenderData::of(state)?;
    let names: BTreeSet<String> = data
        .read_prefix(prefix)
        .into_iter()
        .filter_map(|(k, _)| {
            let rest = &k[prefix.len()..];
            rest.split('/')
                .next()
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        })
        .collect();
    Ok(Value::from(names.into_iter().collect::<Vec<_>>()))
}

fn json(text: &str) -> Result<Value, minijinja::Error> {
    serde_json::from_str::<serde_json::Value>(text)
        .map(|v| Value::from(minijinja::value::Serde(v)))
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("not JSON: {e}")))
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
