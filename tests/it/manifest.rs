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
            &["invalid `ttl`", "at least 2"],
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
