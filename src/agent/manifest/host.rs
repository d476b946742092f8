//! What a manifest asks of the host that the host does not have: for
//! `coord check`. *Errors* are what would fail at run time however long
//! the agent waited (a credential file it cannot read, a directory that
//! cannot be created); *warnings* are what the agent copes with, retrying
//! or doing without, but an operator should know before it runs.

use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

use super::{FileSource, Location, Manifest, PasswordSource};

/// What `coord check` found on this host.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HostReport {
    /// What would fail at run time.
    pub errors: Vec<Problem>,
    /// What the agent copes with.
    pub warnings: Vec<Problem>,
}

/// One thing found, located in the file that is its cause (the manifest,
/// or a template).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub file: PathBuf,
    pub location: Location,
    pub message: String,
}

impl Problem {
    /// `file:line:col: <severity>: message`, as compilers write it.
    pub fn show(&self, severity: &str) -> String {
        format!(
            "{}:{}: {severity}: {}",
            self.file.display(),
            self.location,
            self.message
        )
    }
}

/// One step of the way to a value in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step<'a> {
    /// A table's key.
    Key(&'a str),
    /// The n-th table of an array of tables (`[[file]]`), from 0.
    Item(usize),
}

impl Manifest {
    /// Checks what the manifest asks of this host, as the user running
    /// `coord check`: files it reads must be readable, directories it
    /// writes into present or creatable. (Permission bits of directories
    /// are not judged: the check may run as another user than the agent.)
    pub fn host_report(&self) -> HostReport {
        let mut report = HostReport::default();
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let at = |steps: &[Step<'_>], message: String| Problem {
            file: self.path.clone(),
            location: locate(&text, steps),
            message,
        };
        if let Some(problem) = not_a_directory(&self.agent.state_dir) {
            report.warnings.push(at(
                &[Step::Key("agent"), Step::Key("state_dir")],
                format!(
                    "[agent] state_dir {}: {problem}; the agent runs, but does not remember instance ids across restarts (nor cache compiled WASM plugins) until it can be created",
                    self.agent.state_dir.display(),
                ),
            ));
        }
        if let Some(PasswordSource::File(path)) = &self.etcd.password
            && let Some(why) = unreadable(path)
        {
            report.errors.push(at(
                &[Step::Key("etcd"), Step::Key("password_file")],
                format!(
                    "[etcd] password_file {}: {why}; the agent could not log in to etcd",
                    path.display()
                ),
            ));
        }
        if let Some(tls) = &self.etcd.tls {
            for (key, path) in [("ca", &tls.ca), ("cert", &tls.cert), ("key", &tls.key)] {
                let Some(path) = path else { continue };
                if let Some(why) = unreadable(path) {
                    report.errors.push(at(
                        &[Step::Key("etcd"), Step::Key("tls"), Step::Key(key)],
                        format!(
                            "[etcd.tls] {key} {}: {why}; the agent could not connect to etcd",
                            path.display()
                        ),
                    ));
                }
            }
        }
        for (i, spec) in self.instance_ids.iter().enumerate() {
            let Some(file) = &spec.file else { continue };
            let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) else {
                continue;
            };
            let here = [Step::Key("instance_id"), Step::Item(i), Step::Key("file")];
            match missing_directory(dir) {
                None => {}
                Some(Missing::Creatable) => report.warnings.push(at(
                    &here,
                    format!(
                        "[[instance_id]] `{}`: the directory {} (of `file`) does not exist; the agent retries writing the id file until it can",
                        spec.pool,
                        dir.display(),
                    ),
                )),
                Some(Missing::Impossible(why)) => report.errors.push(at(
                    &here,
                    format!(
                        "[[instance_id]] `{}`: the directory {} (of `file`) {why}; the id file could never be written",
                        spec.pool,
                        dir.display(),
                    ),
                )),
            }
        }
        for (i, spec) in self.files.iter().enumerate() {
            let here = |key| [Step::Key("file"), Step::Item(i), Step::Key(key)];
            let dir = spec.path.parent().filter(|d| !d.as_os_str().is_empty());
            match dir.and_then(missing_directory) {
                None => {}
                Some(Missing::Creatable) if spec.create_dirs => {}
                Some(Missing::Creatable) => report.errors.push(at(
                    &here("path"),
                    format!(
                        "[[file]] `{}`: the directory {} does not exist, so every render would fail; create it, or set `create_dirs = true`",
                        spec.path.display(),
                        dir.unwrap_or(Path::new(".")).display(),
                    ),
                )),
                Some(Missing::Impossible(why)) => report.errors.push(at(
                    &here("path"),
                    format!(
                        "[[file]] `{}`: the directory {} {why}; the file could never be written",
                        spec.path.display(),
                        dir.unwrap_or(Path::new(".")).display(),
                    ),
                )),
            }
            if let FileSource::Template(template) = &spec.source
                && let Some(why) = unreadable(template)
            {
                report.errors.push(at(
                    &here("template"),
                    format!(
                        "[[file]] `{}`: template {}: {why}; every render would fail",
                        spec.path.display(),
                        template.display(),
                    ),
                ));
            }
        }
        self.check_programs(&mut report, &text);
        report
    }

    /// Every program the manifest runs (hooks, tasks, exec checks, files'
    /// `check`): one named by an absolute path must be there and
    /// executable (an error); one found through `PATH` is only warned
    /// about when this `PATH` lacks it, since the agent's may differ.
    /// Relative paths were made absolute, beside the manifest, when it was
    /// read.
    fn check_programs(&self, report: &mut HostReport, text: &str) {
        use super::{CheckKind, CheckSpec, HookAction};
        let mut programs: Vec<(String, Vec<Step<'static>>, &str)> = Vec::new();
        for (i, h) in self.hooks.iter().enumerate() {
            if let HookAction::Exec { argv } = &h.action {
                let at = vec![Step::Key("hook"), Step::Item(i), Step::Key("exec")];
                programs.push((format!("[[hook]] `{}`", h.name), at, &argv[0]));
            }
        }
        for (i, t) in self.tasks.iter().enumerate() {
            let at = vec![Step::Key("task"), Step::Item(i), Step::Key("run")];
            programs.push((format!("[[task]] `{}`", t.name), at, &t.run[0]));
        }
        for (i, svc) in self.services.iter().enumerate() {
            if let Some(CheckSpec {
                kind: CheckKind::Exec(argv),
                ..
            }) = &svc.check
            {
                let at = vec![
                    Step::Key("service"),
                    Step::Item(i),
                    Step::Key("check"),
                    Step::Key("exec"),
                ];
                programs.push((
                    format!("[[service]] `{}/{}`", svc.name, svc.id),
                    at,
                    &argv[0],
                ));
            }
        }
        for (i, f) in self.files.iter().enumerate() {
            if let Some(argv) = &f.check {
                let at = vec![Step::Key("file"), Step::Item(i), Step::Key("check")];
                programs.push((format!("[[file]] `{}`", f.path.display()), at, &argv[0]));
            }
        }
        for (what, steps, program) in programs {
            let problem = |message| Problem {
                file: self.path.clone(),
                location: locate(text, &steps),
                message,
            };
            if program.starts_with('/') {
                if let Some(why) = not_executable(Path::new(program)) {
                    report.errors.push(problem(format!(
                        "{what}: {program} {why}; every run would fail"
                    )));
                }
            } else if !program.contains('/') && !on_path(program) {
                report.warnings.push(problem(format!(
                    "{what}: `{program}` is not found on this PATH; it must be on the agent's"
                )));
            }
        }
    }

    /// Where the value at `steps` is written in the manifest file (read
    /// again; the start of the file if it is not there): for problems found
    /// after parsing.
    pub fn locate(&self, steps: &[Step<'_>]) -> Location {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        locate(&text, steps)
    }
}

fn locate(text: &str, steps: &[Step<'_>]) -> Location {
    let start = Location { line: 1, column: 1 };
    let Ok(root) = DeTable::parse(text) else {
        return start;
    };
    let mut span = root.span();
    let mut table: Option<&DeTable<'_>> = Some(root.get_ref());
    let mut array: Option<&toml::de::DeArray<'_>> = None;
    for step in steps {
        let value = match (step, table, array) {
            (Step::Key(k), Some(t), _) => t.get(*k),
            (Step::Item(i), _, Some(a)) => a.get(*i),
            _ => None,
        };
        let Some(value) = value else { break };
        span = value.span();
        (table, array) = match value.get_ref() {
            DeValue::Table(t) => (Some(t), None),
            DeValue::Array(a) => (None, Some(a)),
            _ => (None, None),
        };
    }
    let (line, column) = super::diagnostics::position(text, span.start);
    Location { line, column }
}

/// Why `path` cannot be read by this process, if it cannot.
fn unreadable(path: &Path) -> Option<String> {
    match std::fs::File::open(path).and_then(|f| {
        // Opening a directory succeeds; reading it does not.
        let mut buf = [0u8; 1];
        std::io::Read::read(&mut &f, &mut buf).map(|_| ())
    }) {
        Ok(()) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("does not exist".to_owned()),
        Err(e) => Some(format!("cannot be read ({e})")),
    }
}

/// A directory that is not there.
enum Missing {
    /// Its nearest existing ancestor is a directory.
    Creatable,
    /// It, or an ancestor, is something else; why.
    Impossible(String),
}

/// Whether `dir` is missing, and whether it could be created.
fn missing_directory(dir: &Path) -> Option<Missing> {
    if std::fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
        return None;
    }
    Some(match not_a_directory(dir) {
        None => Missing::Creatable,
        Some(why) => Missing::Impossible(why),
    })
}

/// Why `dir` cannot be a directory: it, or the nearest of its ancestors
/// that exists, is something else. (Permissions are not judged: `coord
/// check` may well run as another user than the agent.)
fn not_a_directory(dir: &Path) -> Option<String> {
    let existing = dir.ancestors().find(|a| a.symlink_metadata().is_ok())?;
    let is_dir = std::fs::metadata(existing).is_ok_and(|m| m.is_dir());
    match (is_dir, existing == dir) {
        (true, _) => None,
        (false, true) => Some("is not a directory".to_owned()),
        (false, false) => Some(format!(
            "cannot be created, since {} is not a directory",
            existing.display()
        )),
    }
}

/// Why `program` cannot be run, if it cannot.
fn not_executable(program: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(program) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("does not exist".to_owned()),
        Err(e) => Some(format!("cannot be read ({e})")),
        Ok(m) if m.is_dir() => Some("is a directory".to_owned()),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Some("is not executable".to_owned()),
        Ok(_) => None,
    }
}

/// Whether `name` is an executable file in a directory of `PATH`.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| not_executable(&dir.join(name)).is_none())
    })
}
