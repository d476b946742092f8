//! The layering of ARCHITECTURE.md, checked on the source tree: a
//! violation fails here before it spreads.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

fn offenders(dir: &str, needle: &str) -> Vec<String> {
    let root = super::support::repo_root().join(dir);
    rust_files(&root)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(p)
                .expect("read file")
                .contains(needle)
        })
        .map(|p| p.display().to_string())
        .collect()
}

#[test]
fn only_the_etcd_layer_imports_etcd_client() {
    for dir in [
        "src/agent",
        "src/cli",
        "src/presence.rs",
        "src/config.rs",
        "src/config",
        // coord-bench reaches etcd through the library, like the CLI.
        "src/bin",
    ] {
        let found = if dir.ends_with(".rs") {
            let text =
                std::fs::read_to_string(super::support::repo_root().join(dir)).expect("read");
            if text.contains("etcd_client") {
                vec![dir.to_owned()]
            } else {
                vec![]
            }
        } else {
            offenders(dir, "etcd_client")
        };
        assert!(
            found.is_empty(),
            "etcd_client used outside src/etcd: {found:?}"
        );
    }
}

#[test]
fn the_library_knows_nothing_of_the_agent() {
    let found = offenders("src/etcd", "crate::agent");
    assert!(
        found.is_empty(),
        "the etcd layer reaches into the agent: {found:?}"
    );
    let presence =
        std::fs::read_to_string(super::support::repo_root().join("src/presence.rs")).expect("read");
    assert!(!presence.contains("crate::agent"));
    let config =
        std::fs::read_to_string(super::support::repo_root().join("src/config.rs")).expect("read");
    assert!(!config.contains("crate::agent"));
    let found = offenders("src/config", "crate::agent");
    assert!(
        found.is_empty(),
        "the config center reaches into the agent: {found:?}"
    );
}
