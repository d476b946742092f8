//! The config center: the library against real etcd, and `coord kv` as an
//! operator or a script uses it.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use coord::config::{self, Error, Expect, Schema};

use crate::support::{coord, etcd, eventually};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Db {
    host: String,
    port: u16,
}

/// The value and version of `key` as etcd has it.
async fn stored(client: &coord::etcd::Client, key: &str) -> (String, i64) {
    let kv = client
        .get(key)
        .await
        .expect("etcd answers")
        .expect("the key exists");
    (kv.value_str().into_owned(), kv.version)
}

#[tokio::test]
async fn typed_values_are_json_and_plain_strings_are_stored_as_they_are() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let db = Db {
        host: "db-1".into(),
        port: 5432,
    };
    config::set(&client, "/app/db", &db).await.expect("set");
    assert_eq!(
        config::get::<Db>(&client, "/app/db").await.expect("get"),
        db
    );
    assert_eq!(
        stored(&client, "/app/db").await.0,
        r#"{"host":"db-1","port":5432}"#
    );

    config::set(&client, "/app/level", "debug")
        .await
        .expect("set");
    assert_eq!(stored(&client, "/app/level").await.0, "debug");
    let level: String = config::get(&client, "/app/level").await.expect("get");
    assert_eq!(level, "debug");

    config::set(&client, "/app/port", &8080).await.expect("set");
    let as_text: String = config::get(&client, "/app/port").await.expect("get");
    assert_eq!(as_text, "8080");
    let as_number: u16 = config::get(&client, "/app/port").await.expect("get");
    assert_eq!(as_number, 8080);

    let wrong = config::get::<Db>(&client, "/app/level").await;
    assert!(
        matches!(&wrong, Err(Error::Invalid { key, .. }) if key == "/app/level"),
        "{wrong:?}"
    );
    let missing = config::get::<String>(&client, "/app/nothing").await;
    assert!(
        matches!(&missing, Err(Error::NotFound { key }) if key == "/app/nothing"),
        "{missing:?}"
    );
}

#[tokio::test]
async fn a_stale_compare_and_set_is_refused_naming_the_current_version_and_writes_nothing() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    config::set(&client, "/app/x", "one").await.expect("set");
    let seen = config::get_versioned::<String>(&client, "/app/x")
        .await
        .expect("get");
    assert_eq!(seen.version, 1);
    config::set(&client, "/app/x", "two").await.expect("set");

    let err = config::compare_and_set(&client, "/app/x", "three", seen.version)
        .await
        .expect_err("the version moved on");
    assert!(
        matches!(
            &err,
            Error::VersionConflict { key, expected: 1, current: 2, .. } if key == "/app/x"
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "refused to set `/app/x`: expected version 1, but it is at version 2"
    );
    assert_eq!(stored(&client, "/app/x").await, ("two".to_owned(), 2));

    let written = config::compare_and_set(&client, "/app/x", "three", 2)
        .await
        .expect("the version is right");
    assert_eq!(written.version, 3);
}

#[tokio::test]
async fn create_only_if_absent_and_delete_with_a_version_are_refused_when_the_key_is_not_as_expected()
 {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let first = config::create(&client, "/app/id", "a")
        .await
        .expect("absent");
    assert_eq!(first.version, 1);
    let err = config::create(&client, "/app/id", "b")
        .await
        .expect_err("exists");
    assert!(
        matches!(
            err,
            Error::VersionConflict {
                expected: 0,
                current: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(stored(&client, "/app/id").await.0, "a");

    let err = config::delete(&client, "/app/id", Expect::Version(5))
        .await
        .expect_err("stale");
    assert!(
        err.to_string()
            .contains("refused to delete `/app/id`: expected version 5, but it is at version 1"),
        "{err}"
    );
    assert_eq!(stored(&client, "/app/id").await.0, "a");
    assert!(
        config::delete(&client, "/app/id", Expect::Version(1))
            .await
            .expect("right version")
    );
    assert!(
        !config::delete(&client, "/app/id", Expect::Any)
            .await
            .expect("nothing to delete")
    );
}

#[tokio::test]
async fn list_returns_the_keys_under_a_prefix_with_their_versions() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    config::set(&client, "/app/a", "1").await.expect("set");
    config::set(&client, "/app/b", "2").await.expect("set");
    config::set(&client, "/app/b", "3").await.expect("set");
    config::set(&client, "/other", "x").await.expect("set");
    let listed: Vec<(String, i64, String)> = config::list(&client, "/app/")
        .await
        .expect("list")
        .into_iter()
        .map(|e| (e.key.clone(), e.version, e.text().into_owned()))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("/app/a".to_owned(), 1, "1".to_owned()),
            ("/app/b".to_owned(), 2, "3".to_owned())
        ]
    );
}

#[tokio::test]
async fn history_lists_every_value_newest_first_with_its_revision_and_version() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let mut revisions = Vec::new();
    for v in ["v1", "v2", "v3"] {
        revisions.push(
            config::set(&client, "/app/h", v)
                .await
                .expect("set")
                .revision,
        );
        // Writes to other keys in between must not show up.
        config::set(&client, "/app/other", v).await.expect("set");
    }
    let history = config::history(&client, "/app/h", None)
        .await
        .expect("history");
    let seen: Vec<(String, i64, i64)> = history
        .entries
        .iter()
        .map(|e| (e.text().into_owned(), e.version, e.mod_revision))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("v3".to_owned(), 3, revisions[2]),
            ("v2".to_owned(), 2, revisions[1]),
            ("v1".to_owned(), 1, revisions[0]),
        ]
    );
    assert_eq!(history.truncated_by_compaction, None);

    let limited = config::history(&client, "/app/h", Some(2))
        .await
        .expect("history");
    assert_eq!(limited.entries.len(), 2);
    assert_eq!(limited.entries[1].text(), "v2");
}

#[tokio::test]
async fn history_past_a_compaction_is_marked_incomplete_instead_of_looking_complete() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let mut revisions = Vec::new();
    for v in ["v1", "v2", "v3", "v4"] {
        revisions.push(
            config::set(&client, "/app/c", v)
                .await
                .expect("set")
                .revision,
        );
    }
    // Keep v2's revision and later: v1 is gone.
    client.compact(revisions[1]).await.expect("compact");
    let history = config::history(&client, "/app/c", None)
        .await
        .expect("history");
    let values: Vec<String> = history
        .entries
        .iter()
        .map(|e| e.text().into_owned())
        .collect();
    assert_eq!(values, ["v4", "v3", "v2"]);
    assert_eq!(history.truncated_by_compaction, Some(revisions[1]));

    let err = config::get_at(&client, "/app/c", revisions[0])
        .await
        .expect_err("compacted");
    assert!(
        matches!(&err, Error::Compacted { key, revision, compacted }
            if key == "/app/c" && *revision == revisions[0] && *compacted == revisions[1]),
        "{err:?}"
    );
}

#[tokio::test]
async fn rollback_restores_an_earlier_value_and_is_refused_when_the_key_moved_meanwhile() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let good = config::set(&client, "/app/r", "good").await.expect("set");
    config::set(&client, "/app/r", "bad").await.expect("set");

    let restored = config::rollback(&client, "/app/r", good.revision, None)
        .await
        .expect("rollback");
    assert_eq!(restored.version, 3);
    assert_eq!(stored(&client, "/app/r").await, ("good".to_owned(), 3));

    // An operator read version 3 in the history; someone writes meanwhile.
    config::set(&client, "/app/r", "newer").await.expect("set");
    let err = config::rollback(&client, "/app/r", good.revision, Some(3))
        .await
        .expect_err("the key moved");
    assert!(
        matches!(
            err,
            Error::VersionConflict {
                expected: 3,
                current: 4,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(stored(&client, "/app/r").await, ("newer".to_owned(), 4));
}

#[tokio::test]
async fn watch_reports_each_change_with_its_old_and_new_value() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    config::set(&client, "/app/w/a", "1").await.expect("set");
    let mut watch = config::watch_prefix(&client, "/app/w/")
        .await
        .expect("watch");
    config::set(&client, "/app/w/a", "2").await.expect("set");
    config::delete(&client, "/app/w/a", Expect::Any)
        .await
        .expect("delete");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let changes = tokio::time::timeout(crate::support::PATIENCE, watch.next())
            .await
            .expect("changes arrive")
            .expect("watch");
        seen.extend(changes.into_iter().map(|c| {
            (
                c.key,
                c.old.map(|e| e.text().into_owned()),
                c.new.map(|e| e.text().into_owned()),
            )
        }));
    }
    assert_eq!(
        seen,
        vec![
            (
                "/app/w/a".to_owned(),
                Some("1".to_owned()),
                Some("2".to_owned())
            ),
            ("/app/w/a".to_owned(), Some("2".to_owned()), None),
        ]
    );
}

#[test]
fn a_schema_violation_names_the_failing_path_in_the_value() {
    let schema = Schema::new(&serde_json::json!({
        "type": "object",
        "properties": {
            "port": { "type": "integer", "maximum": 65535 },
            "hosts": { "type": "array", "items": { "type": "string" } }
        },
        "required": ["port"]
    }))
    .expect("a valid schema");
    schema
        .check("/app/db", br#"{"port": 5432, "hosts": ["a"]}"#)
        .expect("valid");
    let err = schema
        .check("/app/db", br#"{"port": 70000, "hosts": ["a", 3]}"#)
        .expect_err("two violations");
    let Error::SchemaViolation { key, violations } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(key, "/app/db");
    let mut paths: Vec<&str> = violations.iter().map(|v| v.path.as_str()).collect();
    paths.sort_unstable();
    assert_eq!(paths, ["/hosts/1", "/port"]);
    let message = err.to_string();
    assert!(
        message.contains("at /port: 70000 is greater than"),
        "{message}"
    );
    assert!(
        message.contains("at /hosts/1: 3 is not of type \"string\""),
        "{message}"
    );
}

// ---- `coord kv` ----

fn kv(endpoint: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["kv", "--endpoints", endpoint];
    all.extend_from_slice(args);
    let (status, out, err) = coord(&all, None);
    (status.code(), out, err)
}

#[tokio::test]
async fn kv_set_with_a_stale_if_version_exits_3_naming_the_current_version_and_writes_nothing() {
    let etcd = etcd().await;
    let ep = etcd.endpoint();
    let (code, out, err) = kv(&ep, &["set", "/app/x", "one"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("version 1"), "{out}");
    kv(&ep, &["set", "/app/x", "two"]);

    let (code, _, err) = kv(&ep, &["set", "/app/x", "three", "--if-version", "1"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("refused to set `/app/x`: expected version 1, but it is at version 2"),
        "{err}"
    );
    let (code, out, _) = kv(&ep, &["get", "/app/x", "--json"]);
    assert_eq!(code, Some(0));
    let got: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(got["value"], "two");
    assert_eq!(got["version"], 2);

    let (code, _, err) = kv(&ep, &["set", "/app/x", "again", "--create"]);
    assert_eq!(code, Some(3), "{err}");
    let (code, _, err) = kv(&ep, &["set", "/app/x", "three", "--if-version", "2"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, _) = kv(&ep, &["get", "/app/x"]);
    assert_eq!((code, out.as_str()), (Some(0), "three\n"));
}

#[tokio::test]
async fn kv_get_of_a_missing_key_exits_4() {
    let etcd = etcd().await;
    let (code, out, err) = kv(&etcd.endpoint(), &["get", "/nothing/here"]);
    assert_eq!(code, Some(4), "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("`/nothing/here` does not exist"), "{err}");
}

#[tokio::test]
async fn kv_history_lists_values_in_order_and_rollback_restores_one_unless_the_key_moved() {
    let etcd = etcd().await;
    let ep = etcd.endpoint();
    for v in ["v1", "v2", "v3"] {
        let (code, _, err) = kv(&ep, &["set", "/app/h", v]);
        assert_eq!(code, Some(0), "{err}");
    }
    let (code, out, err) = kv(&ep, &["history", "/app/h", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let values: Vec<&str> = lines
        .iter()
        .map(|l| l["value"].as_str().expect("a value"))
        .collect();
    assert_eq!(values, ["v3", "v2", "v1"]);
    let versions: Vec<i64> = lines
        .iter()
        .map(|l| l["version"].as_i64().expect("a version"))
        .collect();
    assert_eq!(versions, [3, 2, 1]);
    let v1_revision = lines[2]["revision"].as_i64().expect("a revision");

    let (_, out, _) = kv(&ep, &["history", "/app/h", "--limit", "2"]);
    assert_eq!(out.lines().count(), 3, "a header and two values: {out}");

    let (code, out, err) = kv(
        &ep,
        &[
            "rollback",
            "/app/h",
            "--to-revision",
            &v1_revision.to_string(),
            "--if-version",
            "3",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("now version 4"), "{out}");
    let (_, out, _) = kv(&ep, &["get", "/app/h"]);
    assert_eq!(out, "v1\n");

    // The key moves after the operator looked at version 4.
    kv(&ep, &["set", "/app/h", "v5"]);
    let (code, _, err) = kv(
        &ep,
        &[
            "rollback",
            "/app/h",
            "--to-revision",
            &v1_revision.to_string(),
            "--if-version",
            "4",
        ],
    );
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("expected version 4, but it is at version 5"),
        "{err}"
    );
    let (_, out, _) = kv(&ep, &["get", "/app/h"]);
    assert_eq!(out, "v5\n");
}

#[tokio::test]
async fn kv_history_past_a_compaction_says_it_is_incomplete() {
    let etcd = etcd().await;
    let ep = etcd.endpoint();
    let client = etcd.client().await;
    let mut revisions = Vec::new();
    for v in ["v1", "v2", "v3"] {
        revisions.push(
            config::set(&client, "/app/c", v)
                .await
                .expect("set")
                .revision,
        );
    }
    client.compact(revisions[1]).await.expect("compact");

    let (code, out, err) = kv(&ep, &["history", "/app/c", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0]["value"], "v3");
    assert_eq!(lines[1]["value"], "v2");
    assert_eq!(lines[2]["truncated_by_compaction"], revisions[1]);
    assert!(err.contains("incomplete"), "{err}");

    let (_, out, _) = kv(&ep, &["history", "/app/c"]);
    assert!(out.contains("incomplete"), "{out}");

    let (code, _, err) = kv(
        &ep,
        &[
            "rollback",
            "/app/c",
            "--to-revision",
            &revisions[0].to_string(),
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("compacted"), "{err}");
}

#[tokio::test]
async fn kv_set_checks_json_and_schemas_and_names_the_failing_path_before_writing() {
    let etcd = etcd().await;
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().expect("tmp");
    let schema = dir.path().join("db.schema.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"port": {"type": "integer"}}, "required": ["port"]}"#,
    )
    .expect("write schema");
    let schema = schema.to_str().expect("utf-8");

    let (code, _, err) = kv(&ep, &["set", "/app/db", "{\"port\": 5432", "--json"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not valid JSON"), "{err}");

    let (code, _, err) = kv(
        &ep,
        &["set", "/app/db", r#"{"port": "5432"}"#, "--schema", schema],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("at /port: \"5432\" is not of type \"integer\""),
        "{err}"
    );
    let client = etcd.client().await;
    assert_eq!(client.get("/app/db").await.expect("etcd answers"), None);

    let value = dir.path().join("db.json");
    std::fs::write(&value, r#"{"port": 5432}"#).expect("write value");
    let (code, _, err) = kv(
        &ep,
        &[
            "set",
            "/app/db",
            "--file",
            value.to_str().expect("utf-8"),
            "--schema",
            schema,
            "--json",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(stored(&client, "/app/db").await.0, r#"{"port": 5432}"#);
}

#[tokio::test]
async fn kv_reads_a_value_from_stdin_and_its_connection_from_a_manifest() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let manifest = dir.path().join("agent.toml");
    std::fs::write(
        &manifest,
        crate::support::manifest("web-01", &[etcd.endpoint()], 10),
    )
    .expect("write manifest");
    let mut child = Command::new(env!("CARGO_BIN_EXE_coord"))
        .args(["kv", "set", "/app/motd", "--manifest"])
        .arg(&manifest)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run coord kv set");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"hello\nworld\n")
        .expect("write stdin");
    let out = child.wait_with_output().expect("coord exits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = etcd.client().await;
    // One trailing newline (what `echo` adds) is dropped; the inner one stays.
    assert_eq!(stored(&client, "/app/motd").await.0, "hello\nworld");
    let (status, out, err) = coord(
        &[
            "kv",
            "ls",
            "/app/",
            "--json",
            "--manifest",
            manifest.to_str().expect("utf-8"),
        ],
        None,
    );
    assert!(status.success(), "{err}");
    let line: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(line["key"], "/app/motd");
    assert_eq!(line["value"], "hello\nworld");
}

#[tokio::test]
async fn kv_watch_prints_each_change_with_its_old_and_new_value() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    config::set(&client, "/app/w", "0").await.expect("set");
    let mut child = Command::new(env!("CARGO_BIN_EXE_coord"))
        .args(["kv", "watch", "/app/w", "--json", "--endpoints"])
        .arg(etcd.endpoint())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run coord kv watch");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The watch starts when the process has connected: keep writing until
    // it reports something, then check that change and the next.
    let mut n = 0;
    let first: serde_json::Value = eventually("the watch reports a change", || {
        n += 1;
        let client = client.clone();
        let value = n.to_string();
        let line = rx.try_recv().ok();
        async move {
            if let Some(line) = line {
                return Some(serde_json::from_str(&line).expect("JSON"));
            }
            config::set(&client, "/app/w", &value).await.expect("set");
            None
        }
    })
    .await;
    assert_eq!(first["key"], "/app/w");
    assert_eq!(first["type"], "set");
    let new = first["new"].as_i64().expect("a number");
    assert_eq!(first["old"].as_i64().expect("a number"), new - 1);

    while rx.try_recv().is_ok() {}
    config::delete(&client, "/app/w", Expect::Any)
        .await
        .expect("delete");
    let last = eventually("the delete is reported", || {
        let line = rx.try_recv().ok();
        async move { line }
    });
    let mut last: serde_json::Value = serde_json::from_str(&last.await).expect("JSON");
    // Lines for writes made before the drain may still come first.
    while last["type"] != "delete" {
        let line = tokio::time::timeout(crate::support::PATIENCE, rx.recv())
            .await
            .expect("a line")
            .expect("coord still runs");
        last = serde_json::from_str(&line).expect("JSON");
    }
    assert_eq!(last["new"], serde_json::Value::Null);
    assert!(last["old"].is_number(), "{last}");
    let _ = child.kill();
    let _ = child.wait();
}

fn kv_fenced(
    endpoint: &str,
    args: &[&str],
    lock_env: Option<(&str, i64)>,
) -> (Option<i32>, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_coord"));
    cmd.args(["kv", "--endpoints", endpoint])
        .args(args)
        .env_remove("COORD_LOCK_KEY")
        .env_remove("COORD_FENCING_TOKEN")
        .env_remove("COORD_LOCK_NAME");
    if let Some((key, token)) = lock_env {
        cmd.env("COORD_LOCK_KEY", key)
            .env("COORD_FENCING_TOKEN", token.to_string());
    }
    let out = cmd.output().expect("run coord kv");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_fenced_write_by_a_holder_whose_key_was_deleted_is_refused() {
    use coord::lock::{self, Holder, Mode};
    let etcd = etcd().await;
    let ep = etcd.endpoint();
    let client = etcd.client().await;

    // Under `coord lock`, the command's own holder key fences the write.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_coord"))
        .args(["lock", "--endpoints", &ep, "jobs", "--"])
        .arg(env!("CARGO_BIN_EXE_coord"))
        .args(["kv", "set", "/app/out", "first", "--fence", "jobs"])
        .env("COORD_ENDPOINTS", &ep)
        .output()
        .expect("run coord lock");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        client
            .get("/app/out")
            .await
            .expect("get")
            .expect("written")
            .value,
        b"first"
    );

    let session = coord::etcd::Session::start(client.clone(), std::time::Duration::from_secs(30));
    let lease = session.wait_alive().await;
    let me = Holder {
        agent: "test".into(),
        host: "test".into(),
        pid: std::process::id(),
    };
    let guard = lock::acquire(&client, lease, "/coord", "jobs", Mode::Mutex, &me)
        .await
        .expect("lock");
    let (code, err) = kv_fenced(
        &ep,
        &["set", "/app/out", "second", "--fence", "jobs"],
        Some((&guard.key, guard.token)),
    );
    assert_eq!(code, Some(0), "{err}");

    // The holder key is deleted (the lock broken by hand): refused.
    client
        .delete(&guard.key)
        .await
        .expect("delete the holder key");
    let (code, err) = kv_fenced(
        &ep,
        &["set", "/app/out", "third", "--fence", "jobs"],
        Some((&guard.key, guard.token)),
    );
    assert_eq!(code, Some(5), "{err}");
    assert!(
        err.contains("refused to set `/app/out`: the lock is no longer held by"),
        "{err}"
    );
    // Taken again on the same lease: same key, new token; the old one is
    // still refused.
    let again = lock::acquire(&client, lease, "/coord", "jobs", Mode::Mutex, &me)
        .await
        .expect("lock again");
    assert_eq!(again.key, guard.key);
    let (code, err) = kv_fenced(
        &ep,
        &["set", "/app/out", "stale", "--fence", "jobs"],
        Some((&guard.key, guard.token)),
    );
    assert_eq!(code, Some(5), "a stale token is refused: {err}");
    assert_eq!(
        client
            .get("/app/out")
            .await
            .expect("get")
            .expect("kept")
            .value,
        b"second",
        "nothing written by a holder that lost the lock"
    );
    // The library's own fence: a transaction with the guard's ownership
    // check applies nothing once the guard no longer holds.
    let ops = [coord::etcd::Op::Put {
        key: "/app/out".into(),
        value: b"lib".to_vec(),
        lease: None,
    }];
    let stale = client
        .commit(&[guard.is_owner()], &ops)
        .await
        .expect("commit");
    assert!(!stale.succeeded);
    let fresh = client
        .commit(&[again.is_owner()], &ops)
        .await
        .expect("commit");
    assert!(fresh.succeeded);

    // Outside any lock: a clear refusal, nothing written.
    let (code, err) = kv_fenced(&ep, &["set", "/app/out", "x", "--fence", "jobs"], None);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("COORD_LOCK_KEY is not set"), "{err}");
    session.close().await;
}
