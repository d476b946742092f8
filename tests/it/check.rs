//! `coord check` as a newcomer meets it: one mistake is one error, at its
//! place, with what was probably meant; and what would fail at run time
//! (templates, credentials, directories, plugins) fails the check instead.

use std::path::Path;

use coord::agent::manifest::Manifest;

use crate::support::coord;

const ETCD: &str = "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n";

/// Every error of a manifest text: (line, column, message).
fn errors(text: &str) -> Vec<(usize, usize, String)> {
    match Manifest::parse(Path::new("agent.toml"), text) {
        Ok(_) => panic!("expected errors, the manifest was accepted:\n{text}"),
        Err(e) => e
            .diagnostics
            .into_iter()
            .map(|d| (d.line, d.column, d.message))
            .collect(),
    }
}

/// Writes `text` as `agent.toml` in `dir` and runs `coord check
/// agent.toml` there, as one does in a project directory.
fn check_in(dir: &Path, text: &str) -> (Option<i32>, String, String) {
    std::fs::write(dir.join("agent.toml"), text).expect("write the manifest");
    let (status, out, err) = coord(&["check", "agent.toml"], Some(dir));
    (status.code(), out, err)
}

/// The stderr lines that are located errors.
fn located(err: &str) -> Vec<&str> {
    err.lines().filter(|l| l.contains(": error: ")).collect()
}

#[test]
fn one_misspelt_hook_name_is_one_located_error_not_a_cascade_of_unknown_hooks() {
    let text = format!(
        "{ETCD}
[[hook]]
nmae = \"notify\"
exec = [\"true\"]

[[file]]
path = \"out.txt\"
source = \"x\"
on_change = [\"notify\"]

[[service]]
name = \"api\"
address = \"127.0.0.1:8080\"
on_change = [\"notify\"]

[[task]]
name = \"t\"
run = [\"true\"]
schedule = \"once\"
on_change = [\"notify\"]

[[instance_id]]
pool = \"worker\"
size = 4
on_change = [\"notify\"]
"
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "one typo, one error: {errs:#?}");
    let (line, column, message) = &errs[0];
    assert_eq!((*line, *column), (5, 1), "{message}");
    assert!(
        message.contains("unknown field `nmae` in [[hook]]; did you mean `name`"),
        "{message}"
    );

    // As the operator sees it.
    let dir = tempfile::tempdir().expect("tmp");
    let (code, _, err) = check_in(dir.path(), &text);
    assert_eq!(code, Some(64), "{err}");
    let lines = located(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("agent.toml:5:1: error: unknown field `nmae`"),
        "{err}"
    );
    assert!(err.contains("the manifest has 1 problem;"), "{err}");
}

#[test]
fn a_hook_with_another_mistake_still_counts_as_defined_and_a_misspelt_reference_gets_a_did_you_mean()
 {
    let text = format!(
        "{ETCD}
[[hook]]
name = \"notify\"
exec = [\"true\"]
timeout = \"soon\"

[[file]]
path = \"out.txt\"
source = \"x\"
on_change = [\"notify\", \"notfy\"]
"
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].2.contains("invalid `timeout` in [[hook]]"),
        "{errs:#?}"
    );
    assert!(
        errs[1]
            .2
            .contains("unknown hook `notfy` in `on_change`; did you mean `notify`?"),
        "{errs:#?}"
    );
}

#[test]
fn cron_mistakes_name_the_field_and_its_range_and_the_dialect_is_said() {
    let task = |schedule: &str| {
        format!("{ETCD}\n[[task]]\nname = \"t\"\nrun = [\"true\"]\nschedule = \"{schedule}\"\n")
    };
    let cases: &[(&str, &[&str])] = &[
        ("61 * * * *", &["minute field", "61 is out of range 0–59"]),
        ("0 24 * * *", &["hour field", "24 is out of range 0–23"]),
        (
            "0 0 0 * *",
            &["day-of-month field", "0 is out of range 1–31"],
        ),
        ("0 0 1 13 *", &["month field", "13 is out of range 1–12"]),
        ("0 0 * * 8", &["day-of-week field", "8 is out of range 0–7"]),
        (
            "0 0 * * 1-9",
            &["day-of-week field", "9 is out of range 0–7"],
        ),
        ("*/0 * * * *", &["minute field", "step /0"]),
        ("0 0 * FOO *", &["month field", "`FOO`", "JAN"]),
        ("61 0 3 * * *", &["second field", "61 is out of range 0–59"]),
        ("0 61 3 * * *", &["minute field", "61 is out of range 0–59"]),
        (
            "0 0 3 * * * 2027",
            &[
                "5 fields: minute hour day-of-month month day-of-week, in UTC (or 6, with seconds first)",
                "this one has 7",
                "no year",
            ],
        ),
        ("0 3 * *", &["5 fields", "this has 4 fields"]),
    ];
    for (schedule, words) in cases {
        let errs = errors(&task(schedule));
        assert_eq!(errs.len(), 1, "{schedule}: {errs:#?}");
        let (line, column, message) = &errs[0];
        assert_eq!((*line, *column), (7, 12), "{schedule}: {message}");
        assert!(
            message.starts_with(&format!("invalid `schedule` \"{schedule}\": ")),
            "{message}"
        );
        for w in *words {
            assert!(
                message.contains(w),
                "{schedule}: `{message}` should say `{w}`"
            );
        }
        assert!(!message.contains("Component error"), "{message}");
    }
    for good in [
        "0 3 * * MON-FRI",
        "*/15 * * * *",
        "0 0 1 JAN,JUL *",
        "0 0 * * 7",
        "@daily",
    ] {
        Manifest::parse(Path::new("agent.toml"), &task(good))
            .unwrap_or_else(|e| panic!("`{good}` is a good cron expression: {e}"));
    }
}

#[test]
fn check_prints_the_next_run_of_each_scheduled_task() {
    let dir = tempfile::tempdir().expect("tmp");
    let text = format!(
        "[agent]\nstate_dir = \"state\"\n{ETCD}
[[task]]
name = \"nightly\"
run = [\"true\"]
schedule = \"30 3 * * *\"

[[task]]
name = \"hourly\"
run = [\"true\"]
schedule = \"every 1h\"

[[task]]
name = \"seconds\"
run = [\"true\"]
schedule = \"15 30 3 * * *\"

[[task]]
name = \"setup\"
run = [\"true\"]
schedule = \"once\"
"
    );
    let (code, out, err) = check_in(dir.path(), &text);
    assert_eq!(code, Some(0), "{err}");
    let line = |task: &str| {
        out.lines()
            .find(|l| l.contains(&format!("task   {task} ")))
            .unwrap_or_else(|| panic!("no line for task {task}:\n{out}"))
            .to_owned()
    };
    let nightly = line("nightly");
    assert!(nightly.contains("(cron 30 3 * * *, next run "), "{nightly}");
    assert!(nightly.contains("T03:30:00Z)"), "{nightly}");
    let seconds = line("seconds");
    assert!(
        seconds.contains("(cron 15 30 3 * * *, seconds first, next run "),
        "{seconds}"
    );
    assert!(seconds.contains("T03:30:15Z)"), "{seconds}");
    let hourly = line("hourly");
    assert!(hourly.contains("(every 1h, next run "), "{hourly}");
    assert!(hourly.contains(":00:00Z)"), "{hourly}");
    assert!(!line("setup").contains("next run"), "{out}");
}

/// A directory with every run-time failure `coord check` knows, each in a
/// [[file]], [[instance_id]], [[hook]] or [etcd] of its own.
fn broken_host(dir: &Path) -> String {
    std::fs::create_dir(dir.join("password")).expect("a directory where the password file goes");
    std::fs::write(dir.join("not-a-dir"), "x").expect("a file where a directory goes");
    std::fs::write(
        dir.join("syntax.j2"),
        "upstream api {\n{% for i in service(\"api\") %}\n  server {{ i.address }};\n{% endfor %\n}\n",
    )
    .expect("template");
    std::fs::write(
        dir.join("typo.j2"),
        "{% for k in ls(\"/app/\") %}{{ loop.index }} {{ k }}\n{% endfor %}\nport = {{ key_ro(\"/app/port\", \"80\") }}\n",
    )
    .expect("template");
    std::fs::write(dir.join("junk.wasm"), "not wasm").expect("junk");
    r#"[agent]
state_dir = "state"

[etcd]
endpoints = ["https://127.0.0.1:2379"]
username = "coord"
password_file = "password"

[etcd.tls]
ca = "ca.pem"

[[file]]
path = "a.conf"
template = "missing.j2"

[[file]]
path = "b.conf"
template = "syntax.j2"

[[file]]
path = "c.conf"
template = "typo.j2"

[[file]]
path = "d.conf"
source = """
{{ keyz("/app/x") }}
"""

[[file]]
path = "nowhere/e.conf"
source = "x"

[[instance_id]]
pool = "worker"
size = 4
file = "not-a-dir/run/worker-id"

[[hook]]
name = "one"
wasm = "junk.wasm"

[[hook]]
name = "two"
wasm = "absent.wasm"

[[hook]]
name = "three"
exec = ["/nonexistent/bin/reload", "now"]
"#
    .to_owned()
}

#[test]
fn check_reports_every_run_time_failure_each_located_and_exits_64() {
    let dir = tempfile::tempdir().expect("tmp");
    let text = broken_host(dir.path());
    let (code, out, err) = check_in(dir.path(), &text);
    assert_eq!(code, Some(64), "{out}{err}");
    let lines = located(&err);
    let expected: &[&str] = &[
        "agent.toml:7:17: error: [etcd] password_file password: cannot be read (Is a directory",
        "agent.toml:10:6: error: [etcd.tls] ca ca.pem: does not exist; the agent could not connect to etcd",
        "agent.toml:14:12: error: [[file]] `a.conf`: template missing.j2: does not exist; every render would fail",
        "agent.toml:26:10: error: [[file]] `d.conf`: line 1 of its `source`: unknown function or variable `keyz`; did you mean `key`?",
        "agent.toml:31:8: error: [[file]] `nowhere/e.conf`: the directory nowhere does not exist, so every render would fail; create it, or set `create_dirs = true`",
        "agent.toml:37:8: error: [[instance_id]] `worker`: the directory not-a-dir/run (of `file`) cannot be created, since not-a-dir is not a directory",
        "agent.toml:41:8: error: hook `one` could not be loaded from `junk.wasm`: not a WebAssembly file",
        "agent.toml:45:8: error: hook `two` could not be loaded from `absent.wasm`",
        "agent.toml:49:8: error: [[hook]] `three`: /nonexistent/bin/reload does not exist; every run would fail",
        "syntax.j2:4:11: error: syntax error: unexpected `%`, expected end of block (the template of [[file]] `b.conf`)",
        "typo.j2:3:11: error: unknown function or variable `key_ro`; did you mean `key_or`? (the template of [[file]] `c.conf`)",
    ];
    for (line, want) in lines.iter().zip(expected) {
        assert!(
            line.starts_with(want),
            "expected `{want}…`, got `{line}`\n{err}"
        );
    }
    assert_eq!(lines.len(), expected.len(), "{err}");
    assert!(
        err.contains("error: 11 problems would fail at run time on this host"),
        "{err}"
    );
    assert!(
        out.is_empty(),
        "no `ok` summary for a manifest that would fail: {out}"
    );

    // The same manifest checked for another host: the manifest itself is good.
    let path = dir.path().join("agent.toml");
    let (status, out, err) = coord(
        &["check", "--manifest-only", path.to_str().expect("utf-8")],
        Some(dir.path()),
    );
    assert!(status.success(), "{err}");
    assert!(out.contains("agent.toml: ok"), "{out}");
}

#[test]
fn what_the_agent_copes_with_is_a_warning_not_an_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let text = format!(
        "[agent]\nstate_dir = \"state\"\n{ETCD}\n[[instance_id]]\npool = \"worker\"\nsize = 4\nfile = \"later/worker-id\"\n\n[[file]]\npath = \"made/by/coord.conf\"\nsource = \"x\"\ncreate_dirs = true\n\n[[hook]]\nname = \"h\"\nexec = [\"no-such-program-for-coord\"]\n"
    );
    let (code, out, err) = check_in(dir.path(), &text);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        err.contains("agent.toml:9:8: warning: [[instance_id]] `worker`: the directory later (of `file`) does not exist; the agent retries"),
        "{err}"
    );
    assert!(
        err.contains("agent.toml:18:8: warning: [[hook]] `h`: `no-such-program-for-coord` is not found on this PATH; it must be on the agent's"),
        "{err}"
    );
    assert!(!err.contains("error"), "{err}");
}

/// Files anywhere below `dir`.
fn files_below(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| {
                if e.path().is_dir() {
                    files_below(&e.path())
                } else {
                    1
                }
            })
            .sum()
    })
}

/// `coord check` and `coord hook` by root from a project directory, with a
/// WASM hook and no `state_dir`: the compiled plugin goes to the user's
/// cache (`$XDG_CACHE_HOME/coord`, else `~/.cache/coord`), and nothing is
/// created under /var/lib. Each runs in a mount namespace of its own with
/// an empty tmpfs on /var/lib, so the test sees exactly what it created
/// whatever the machine already has there.
#[test]
fn one_shot_commands_keep_their_cache_in_the_users_cache_dir_never_in_var_lib() {
    let plugins = crate::support::plugins();
    let dir = tempfile::tempdir().expect("tmp");
    let xdg = dir.path().join("xdg");
    let home = dir.path().join("home");
    std::fs::write(
        dir.path().join("agent.toml"),
        format!(
            "{ETCD}\n[[hook]]\nname = \"audit\"\nwasm = \"{}\"\n",
            plugins.log_events.display()
        ),
    )
    .expect("manifest");
    std::fs::write(
        dir.path().join("event.json"),
        r#"{"type":"lock-acquired","lock":"reports","fencing_token":7}"#,
    )
    .expect("event");
    let in_namespace = |command: &str, env: &[(&str, &Path)]| {
        let script = format!(
            "mount -t tmpfs tmpfs /var/lib && '{}' {command} && echo '--- /var/lib:' && ls -A /var/lib",
            env!("CARGO_BIN_EXE_coord")
        );
        let out = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .current_dir(dir.path())
            .env_remove("XDG_CACHE_HOME")
            .envs(env.iter().copied())
            .output()
            .expect("unshare (util-linux) must be installed");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{command}: {stdout}{stderr}");
        let (_, var_lib) = stdout
            .split_once("--- /var/lib:\n")
            .unwrap_or_else(|| panic!("{stdout}"));
        assert_eq!(
            var_lib.trim(),
            "",
            "{command} created under /var/lib:\n{stdout}{stderr}"
        );
        assert!(!stderr.contains("No compilation cache"), "{stderr}");
        stdout
    };

    let out = in_namespace(
        "check agent.toml",
        &[("XDG_CACHE_HOME", &xdg), ("HOME", &home)],
    );
    assert!(out.contains("hook   audit: wasm"), "{out}");
    assert!(
        files_below(&xdg.join("coord/wasm-cache")) >= 1,
        "the compiled plugin is cached under $XDG_CACHE_HOME/coord"
    );
    assert_eq!(files_below(&home), 0, "XDG_CACHE_HOME comes first");

    let out = in_namespace(
        "hook audit --event event.json --manifest agent.toml",
        &[("HOME", &home)],
    );
    assert!(out.contains("hook `audit`: done"), "{out}");
    assert!(
        files_below(&home.join(".cache/coord/wasm-cache")) >= 1,
        "without XDG_CACHE_HOME, the cache is ~/.cache/coord"
    );
}

/// A ```toml block of a document: the line its text starts on, whether it
/// is marked `<!-- fragment -->` (the line before the fence), its text.
fn toml_blocks(doc: &str) -> Vec<(usize, bool, String)> {
    let lines: Vec<&str> = doc.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == "```toml" {
            let fragment = i > 0 && lines[i - 1].trim() == "<!-- fragment -->";
            let end = (i + 1..lines.len())
                .find(|&j| lines[j].trim() == "```")
                .unwrap_or_else(|| panic!("the ```toml block at line {} is not closed", i + 1));
            blocks.push((i + 2, fragment, lines[i + 1..end].join("\n") + "\n"));
            i = end;
        }
        i += 1;
    }
    blocks
}

/// A fragment made a manifest: an `[etcd]` section, and an exec hook for
/// every hook name it refers to but does not define.
fn wrap_fragment(text: &str) -> String {
    let table: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("the fragment is not TOML: {e}\n{text}"));
    let tables = |section: &str| -> Vec<toml::Table> {
        table
            .get(section)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|t| t.as_table().cloned()).collect())
            .unwrap_or_default()
    };
    let defined: Vec<String> = tables("hook")
        .iter()
        .filter_map(|h| h.get("name").and_then(|n| n.as_str()).map(str::to_owned))
        .collect();
    let mut named: Vec<String> = Vec::new();
    for section in ["file", "service", "task", "instance_id"] {
        for t in tables(section) {
            for key in ["on_change", "validate", "on_revert"] {
                for name in t.get(key).and_then(|v| v.as_array()).into_iter().flatten() {
                    let name = name.as_str().expect("hook names are strings").to_owned();
                    if !defined.contains(&name) && !named.contains(&name) {
                        named.push(name);
                    }
                }
            }
        }
    }
    let mut out = format!("{text}\n{ETCD}");
    for name in named {
        out.push_str(&format!(
            "\n[[hook]]\nname = \"{name}\"\nexec = [\"true\"]\n"
        ));
    }
    out
}

/// Every manifest snippet of the README, as written, passes `coord check`
/// — checked as a manifest (`--manifest-only`: the snippets name files of
/// a production host, `/etc/coord/ca.pem`, that this one has not). A
/// snippet that is only part of a manifest is marked `<!-- fragment -->`
/// and checked inside an `[etcd]` section and a hook per name it refers
/// to; none is skipped. The example manifest is checked whole, host and
/// all, from the repository's root, as `coord dev` runs it.
#[test]
fn every_toml_snippet_of_the_readme_and_the_example_manifest_passes_coord_check() {
    let root = crate::support::repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let fences = readme.lines().filter(|l| l.trim() == "```toml").count();
    let blocks = toml_blocks(&readme);
    assert_eq!(blocks.len(), fences, "every ```toml block is checked");
    assert!(blocks.len() >= 9, "found only {} blocks", blocks.len());
    let dir = tempfile::tempdir().expect("tmp");
    let mut failures = Vec::new();
    for (line, fragment, text) in &blocks {
        let manifest = if *fragment {
            wrap_fragment(text)
        } else {
            text.clone()
        };
        let path = dir.path().join(format!("readme-line-{line}.toml"));
        std::fs::write(&path, &manifest).expect("write");
        let (status, _, err) = coord(
            &["check", "--manifest-only", path.to_str().expect("utf-8")],
            None,
        );
        if !status.success() {
            failures.push(format!("README.md line {line}:\n{manifest}\n{err}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let (status, out, err) = coord(&["check", "agent.toml.example"], Some(&root));
    assert!(status.success(), "{out}{err}");
    assert!(out.starts_with("agent.toml.example: ok"), "{out}");
    assert!(err.trim().is_empty(), "no warnings for the example: {err}");
}

#[test]
fn coord_hook_with_a_misspelt_name_says_which_was_meant() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("agent.toml"),
        format!("{ETCD}\n[[hook]]\nname = \"reload-nginx\"\nexec = [\"true\"]\n"),
    )
    .expect("manifest");
    let (status, _, err) = coord(
        &[
            "hook",
            "reload-ngnix",
            "--event",
            "-",
            "--manifest",
            "agent.toml",
        ],
        Some(dir.path()),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("no hook `reload-ngnix` in `agent.toml`; did you mean `reload-nginx`?"),
        "{err}"
    );
}
