//! Fleet-safe change: agent labels and selectors, hooks gated across the
//! fleet, a failed reload reverted.

use std::path::Path;

use coord::agent::manifest::Manifest;

use crate::support::{CoordProcess, coord, etcd, eventually, manifest};

/// `manifest()` with `[agent] labels = { … }` added.
fn labelled(name: &str, endpoint: &str, labels: &str) -> String {
    manifest(name, &[endpoint.to_owned()], 10)
        .replace("[etcd]", &format!("labels = {{ {labels} }}\n\n[etcd]"))
}

#[tokio::test]
async fn labels_are_published_shown_and_pick_agents_by_selector() {
    let etcd = etcd().await;
    let endpoint = etcd.endpoint();
    let _edge = CoordProcess::run(&labelled(
        "edge-1",
        &endpoint,
        r#"zone = "eu-1", role = "edge""#,
    ));
    let _canary = CoordProcess::run(&labelled(
        "canary-1",
        &endpoint,
        r#"zone = "eu-1", role = "canary""#,
    ));
    let _other = CoordProcess::run(&labelled("us-1", &endpoint, r#"zone = "us-1""#));
    let client = etcd.client().await;
    eventually("three agents present", || async {
        let kvs = client.get_prefix("/coord/agents/").await.ok()?;
        (kvs.kvs.len() == 3).then_some(())
    })
    .await;

    let (status, out, err) = coord(&["agents", "--endpoints", &endpoint], None);
    assert!(status.success(), "{err}");
    let edge = out
        .lines()
        .find(|l| l.starts_with("edge-1 "))
        .unwrap_or_else(|| panic!("edge-1 listed: {out}"));
    assert!(edge.ends_with("role=edge,zone=eu-1"), "{out}");

    let names = |selector: &str| {
        let (status, out, err) = coord(
            &[
                "agents",
                "--json",
                "--endpoints",
                &endpoint,
                "--select",
                selector,
            ],
            None,
        );
        assert!(status.success(), "{selector}: {err}");
        let mut names: Vec<String> = out
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("JSON");
                v["name"].as_str().expect("name").to_owned()
            })
            .collect();
        names.sort();
        names
    };
    assert_eq!(names("zone=eu-1"), ["canary-1", "edge-1"]);
    assert_eq!(names("zone=eu-1,role!=canary"), ["edge-1"]);
    assert_eq!(names("role!=canary"), ["edge-1", "us-1"]);
    assert_eq!(names("role=db"), Vec::<String>::new());

    let (status, _, err) = coord(
        &[
            "agents",
            "--endpoints",
            &endpoint,
            "--select",
            "zone=eu-1,,role=edge",
        ],
        None,
    );
    assert!(!status.success());
    assert!(
        err.contains("column 11") && err.contains("empty term"),
        "{err}"
    );
}

#[test]
fn a_bad_label_is_reported_where_it_is() {
    let text = "[agent]\nname = \"a\"\nlabels = { zone = \"eu-1\", \"ro le\" = \"edge\", tier = \"\" }\n\n[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n";
    let err = Manifest::parse(Path::new("agent.toml"), text).expect_err("bad labels");
    let found: Vec<(usize, usize, String)> = err
        .diagnostics
        .into_iter()
        .map(|d| (d.line, d.column, d.message))
        .collect();
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!((found[0].0, found[0].1), (3, 27), "{found:?}");
    assert!(found[0].2.contains("`ro le` has ` `"), "{found:?}");
    assert_eq!((found[1].0, found[1].1), (3, 45), "{found:?}");
    assert!(
        found[1].2.contains("label value cannot be empty"),
        "{found:?}"
    );
}
