//! Manifest validation: every problem at once, each located.

use std::path::Path;
use std::time::Duration;

use coord::agent::manifest::{Manifest, PasswordSource};

const GOOD_ETCD: &str = "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n";

fn errors(text: &str) -> Vec<(usize, usize, String)> {
    match Manifest::parse(Path::new("agent.toml"), text) {
        Ok(m) => panic!("expected errors, the manifest was accepted: {m:?}"),
        Err(e) => e
            .diagnostics
            .into_iter()
            .map(|d| (d.line, d.column, d.message))
            .collect(),
    }
}

#[test]
fn each_kind_of_mistake_is_reported_at_its_line_and_column() {
    // (what, manifest, line, column, words the message must contain)
    let cases: &[(&str, String, usize, usize, &[&str])] = &[
        (
            "unknown field",
            format!("[agent]\nname = \"a\"\nnmae = \"b\"\n{GOOD_ETCD}"),
            3,
            1,
            &["unknown field `nmae`", "[agent]", "did you mean `name`"],
        ),
        (
            "bad duration",
            format!("[agent]\nttl =   \"ten seconds\"\n{GOOD_ETCD}"),
            2,
            9,
            &["invalid `ttl`", "ten seconds", "\"10s\""],
        ),
        (
            "wrong type",
            "[etcd]\nendpoints = \"http://127.0.0.1:2379\"\n".to_owned(),
            2,
            13,
            &["invalid `endpoints`", "[etcd]"],
        ),
        (
            "missing required value",
            "[agent]\nname = \"a\"\n\n[etcd]\ndial_timeout = \"1s\"\n".to_owned(),
            4,
            1,
            &["missing `endpoints`", "[etcd]"],
        ),
        (
            "unknown section",
            format!("{GOOD_ETCD}\n[servce]\nname = \"x\"\n"),
            4,
            2,
            &["unknown section `[servce]`"],
        ),
        (
            "missing section",
            "[agent]\nname = \"a\"\n".to_owned(),
            1,
            1,
            &["missing section `[etcd]`"],
        ),
        (
            "ttl below etcd's minimum",
            format!("[agent]\nttl = \"1s\"\n{GOOD_ETCD}"),
            2,
            7,
            &["invalid `ttl`", "1s is below", "2s to 1h"],
        ),
        (
            "tls client cert without its key",
            "[etcd]\nendpoints = [\"https://e:2379\"]\n[etcd.tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\n"
                .to_owned(),
            5,
            8,
            &["missing `key`", "[etcd.tls]"],
        ),
        (
            "syntax error",
            "[agent\nname = 1\n".to_owned(),
            1,
            7,
            &[],
        ),
    ];
    for (what, text, line, column, words) in cases {
        let errs = errors(text);
        assert_eq!(errs.len(), 1, "{what}: expected one error, got {errs:#?}");
        let (l, c, msg) = &errs[0];
        assert_eq!(
            (*l, *c),
            (*line, *column),
            "{what}: wrong position for `{msg}`"
        );
        for w in *words {
            assert!(msg.contains(w), "{what}: `{msg}` should mention `{w}`");
        }
    }
}

#[test]
fn three_distinct_mistakes_are_all_reported_in_file_order() {
    let text = "[agent]\nttl = \"soon\"\ncolour = \"blue\"\n\n[etcd]\nendpoints = 5\n";
    let errs = errors(text);
    let positions: Vec<_> = errs.iter().map(|(l, c, _)| (*l, *c)).collect();
    assert_eq!(positions, [(2, 7), (3, 1), (6, 13)], "{errs:#?}");
}

#[test]
fn a_minimal_manifest_gets_sensible_defaults() {
    let m = Manifest::parse(Path::new("/etc/coord/agent.toml"), GOOD_ETCD).expect("valid");
    assert_eq!(m.agent.namespace, "/coord");
    assert_eq!(m.agent.ttl, Duration::from_secs(10));
    assert!(
        !m.agent.name.is_empty(),
        "the name defaults to the host name"
    );
    assert_eq!(m.etcd.endpoints, ["http://127.0.0.1:2379"]);
    assert_eq!(m.hash.len(), 64);
}

#[test]
fn relative_credential_paths_resolve_against_the_manifest_directory() {
    let text = "[etcd]\nendpoints = [\"https://e:2379\"]\nusername = \"u\"\npassword_file = \"secret\"\n[etcd.tls]\nca = \"ca.pem\"\n";
    let m = Manifest::parse(Path::new("/etc/coord/agent.toml"), text).expect("valid");
    assert_eq!(
        m.etcd.password,
        Some(PasswordSource::File("/etc/coord/secret".into()))
    );
    let tls = m.etcd.tls.expect("tls");
    assert_eq!(tls.ca.as_deref(), Some(Path::new("/etc/coord/ca.pem")));
}

#[test]
fn the_example_manifest_is_valid() {
    let path = super::support::repo_root().join("agent.toml.example");
    if let Err(e) = Manifest::load(&path) {
        panic!("agent.toml.example is invalid:\n{e}");
    }
}

#[test]
fn a_password_never_shows_in_debug_output() {
    let dir = tempfile::tempdir().expect("tmp");
    let secret = dir.path().join("pw");
    std::fs::write(&secret, "hunter2\n").expect("write");
    let text = format!(
        "[etcd]\nendpoints = [\"http://e:2379\"]\nusername = \"u\"\npassword_file = \"{}\"\n",
        secret.display()
    );
    let m = Manifest::parse(Path::new("agent.toml"), &text).expect("valid");
    let opts = m.connect_options().expect("password readable");
    let shown = format!("{opts:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("redacted"), "{shown}");
}

#[test]
fn hook_mistakes_are_each_reported_where_they_are() {
    let text = format!(
        "{GOOD_ETCD}
[[hook]]
name = \"reload\"
exec = [\"systemctl\", \"reload\", \"nginx\"]

[[hook]]
name = \"reload\"
exec = [\"true\"]

[[hook]]
name = \"both\"
exec = [\"true\"]
wasm = \"x.wasm\"

[[hook]]
name = \"neither\"

[[hook]]
name = \"shell\"
exec = [\"true\"]
max_memory_mib = 4
"
    );
    let errs = errors(&text);
    let found: Vec<(usize, &str)> = errs.iter().map(|(l, _, m)| (*l, m.as_str())).collect();
    assert_eq!(found.len(), 4, "{errs:#?}");
    assert_eq!(found[0].0, 9);
    assert!(
        found[0]
            .1
            .contains("hook `reload` is defined twice (first at line 4)"),
        "{errs:#?}"
    );
    assert_eq!(found[1].0, 15);
    assert!(found[1].1.contains("either `exec` or `wasm`"), "{errs:#?}");
    assert_eq!(found[2].0, 17);
    assert!(found[2].1.contains("missing `exec` or `wasm`"), "{errs:#?}");
    assert_eq!(found[3].0, 23);
    assert!(
        found[3].1.contains("`max_memory_mib` is for `wasm` hooks"),
        "{errs:#?}"
    );
}

#[test]
fn a_files_autoescape_is_none_html_or_json_defaults_to_none_and_goes_with_templates_only() {
    use coord::agent::manifest::AutoEscape;
    let text = format!(
        "{GOOD_ETCD}
[[file]]
path = \"a.json\"
source = \"{{{{ key('/a') }}}}\"
autoescape = \"jsno\"

[[file]]
path = \"b\"
key = \"/b\"
autoescape = \"html\"
"
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_eq!(
        (errs[0].0, errs[0].1),
        position(&text, "\"jsno\""),
        "{errs:#?}"
    );
    assert!(
        errs[0].2.contains("unknown `autoescape` \"jsno\"")
            && errs[0].2.contains("\"none\", \"html\" or \"json\""),
        "{errs:#?}"
    );
    assert_eq!(
        (errs[1].0, errs[1].1),
        position(&text, "\"html\""),
        "{errs:#?}"
    );
    assert!(
        errs[1]
            .2
            .contains("`autoescape` goes with `template` or `source` only"),
        "{errs:#?}"
    );
    let good = format!(
        "{GOOD_ETCD}
[[file]]
path = \"a.json\"
source = \"x\"

[[file]]
path = \"b.conf\"
source = \"x\"
autoescape = \"json\"
"
    );
    let m = Manifest::parse(Path::new("agent.toml"), &good).expect("valid");
    assert_eq!(m.files[0].autoescape, AutoEscape::None);
    assert_eq!(m.files[1].autoescape, AutoEscape::Json);
}

#[test]
fn a_hook_gets_defaults_by_kind_and_resolves_its_paths() {
    let text = format!(
        "{GOOD_ETCD}
[[hook]]
name = \"reload\"
exec = [\"systemctl\", \"reload\", \"nginx\"]

[[hook]]
name = \"audit\"
wasm = \"plugins/audit.wasm\"
config = {{ level = \"info\", limits = [1, 2] }}
read_prefixes = [\"/app/\"]
"
    );
    let m = Manifest::parse(Path::new("/etc/coord/agent.toml"), &text).expect("valid");
    let reload = m.hook("reload").expect("reload");
    assert_eq!(reload.timeout, Duration::from_secs(30));
    assert_eq!(reload.retries, 3);
    let audit = m.hook("audit").expect("audit");
    assert_eq!(audit.timeout, Duration::from_secs(1));
    let coord::agent::manifest::HookAction::Wasm(w) = &audit.action else {
        panic!("wasm hook")
    };
    assert_eq!(w.path, Path::new("/etc/coord/plugins/audit.wasm"));
    let config: serde_json::Value = serde_json::from_str(&w.config).expect("JSON config");
    assert_eq!(
        config,
        serde_json::json!({"level": "info", "limits": [1, 2]})
    );
    assert_eq!(w.max_memory, 64 * 1024 * 1024);
    assert!(
        !w.network && w.dirs.is_empty(),
        "nothing granted by default"
    );
}

/// Where `needle` starts in `text`, as (line, column), both from 1.
fn position(text: &str, needle: &str) -> (usize, usize) {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("`{needle}` not in the manifest"));
    let line = text[..at].matches('\n').count() + 1;
    let column = at - text[..at].rfind('\n').map_or(0, |n| n + 1) + 1;
    (line, column)
}

#[test]
fn absurd_durations_and_sizes_are_each_reported_where_they_are_never_a_panic() {
    let text = r#"[agent]
ttl = "100years"

[etcd]
endpoints = ["http://127.0.0.1:2379"]
dial_timeout = "0s"
request_timeout = "3000years"

[[service]]
name = "api"
address = "127.0.0.1:80"
check = { http = "http://127.0.0.1/", interval = "0s", timeout = "0ms", successes = 0, failures = 4000000000 }

[[service]]
name = "reported"
address = "127.0.0.1:81"
check = { ttl = "0ms" }

[[file]]
path = "out"
source = "x"
debounce = { max = "500000000years" }

[[task]]
name = "nightly"
run = ["true"]
schedule = "every 0s"
timeout = "-"
grace = "9000years"

[[task]]
name = "yearly"
run = ["true"]
schedule = "every 10000years"
timeout = "0s"

[[task]]
name = "pool"
run = ["true"]
mode = "semaphore"
limit = 0
schedule = "once"

[[hook]]
name = "plugin"
wasm = "p.wasm"
timeout = "0s"
max_memory_mib = 9223372036854775807

[[instance_id]]
pool = "workers"
size = 4294967295
"#;
    // (where the value starts, words its message must contain)
    let expected: &[(&str, &[&str])] = &[
        (
            r#""100years""#,
            &["invalid `ttl` in [agent]", "above", "2s to 1h"],
        ),
        (
            r#""0s"
request"#,
            &["invalid `dial_timeout` in [etcd]", "below", "10ms"],
        ),
        (r#""3000years""#, &["invalid `request_timeout`", "above"]),
        (
            r#""0s", timeout"#,
            &["invalid `interval`", "0s is below", "100ms to 1day"],
        ),
        (r#""0ms", succ"#, &["invalid `timeout`", "below"]),
        ("0, failures", &["invalid `successes`", "below"]),
        ("4000000000", &["invalid `failures`", "above", "1 to 1000"]),
        (
            r#""0ms" }"#,
            &["invalid `ttl` in [service.check]", "below", "1s"],
        ),
        (
            r#""500000000years""#,
            &["invalid `max` in [file.debounce]", "above", "1h"],
        ),
        (r#""every 0s""#, &["invalid `schedule`", "below", "1s"]),
        (r#""-""#, &["invalid `timeout`", "duration"]),
        (r#""9000years""#, &["invalid `grace`", "above", "1h"]),
        (r#""every 10000years""#, &["invalid `schedule`", "above"]),
        (
            r#""0s"

[[task]]"#,
            &["invalid `timeout`", "below", "1ms"],
        ),
        ("0\nschedule", &["invalid `limit`", "below"]),
        (
            r#""0s"
max_memory"#,
            &["invalid `timeout` in [[hook]]", "below"],
        ),
        (
            "9223372036854775807",
            &["invalid `max_memory_mib`", "above", "1 to 4096"],
        ),
        (
            "4294967295",
            &["invalid `size` in [[instance_id]]", "above", "1 to 1000000"],
        ),
    ];
    let found = errors(text);
    for (needle, words) in expected {
        let needle = needle.replace("\\n", "\n");
        let (line, column) = position(text, &needle);
        let at: Vec<&str> = found
            .iter()
            .filter(|(l, c, _)| (*l, *c) == (line, column))
            .map(|(_, _, m)| m.as_str())
            .collect();
        assert!(
            at.iter().any(|m| words.iter().all(|w| m.contains(w))),
            "no error at {line}:{column} ({needle}) saying {words:?}; there: {at:?}; all: {found:#?}"
        );
    }

    // And as the operator sees it: every problem at once, exit 64.
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).expect("write");
    let (status, _, stderr) =
        crate::support::coord(&["check", path.to_str().expect("utf-8")], None);
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("agent.toml:12:50: error: invalid `interval`"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("the manifest has {} problems", expected.len())),
        "one error per absurd value, no more: {stderr}"
    );
}
