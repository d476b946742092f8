//! Rendered files against real etcd: whole replacements only, never a
//! blank or half file, only when the content changed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use coord::agent::files::FilesController;
use coord::agent::hooks::HookRunner;
use coord::agent::manifest::Manifest;
use coord::etcd::Client;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::support::{CoordProcess, LocalEtcd, etcd, eventually, file_is, log_says};

/// A manifest for agent `files` against `etcd` with `files` appended.
fn manifest(etcd: &LocalEtcd, rest: &str) -> String {
    format!(
        "[agent]\nname = \"files\"\nttl = \"5s\"\nstate_dir = \"{}\"\n[etcd]\nendpoints = [\"{}\"]\nrequest_timeout = \"2s\"\n{rest}",
        std::env::temp_dir().join("coord-test-state").display(),
        etcd.endpoint()
    )
}

#[tokio::test]
async fn a_key_change_updates_the_file() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/db", "pg://one", None).await.expect("put");
    client
        .put("/app/upstreams/a", "10.0.0.1:80", None)
        .await
        .expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("app.conf");
    let template = dir.path().join("app.conf.j2");
    std::fs::write(
        &template,
        "db = {{ key(\"/app/db\") }}\n{% for name in ls(\"/app/upstreams/\") %}\nserver {{ name }} {{ key(\"/app/upstreams/\" ~ name) }};\n{% endfor %}\n",
    )
    .expect("template");
    let agent = CoordProcess::run(&manifest(
        &etcd,
        &format!(
            "[[file]]\npath = \"{}\"\ntemplate = \"{}\"\n",
            out.display(),
            template.display()
        ),
    ));
    file_is(&out, "db = pg://one\nserver a 10.0.0.1:80;\n").await;
    client
        .put("/app/upstreams/b", "10.0.0.2:80", None)
        .await
        .expect("put");
    file_is(
        &out,
        "db = pg://one\nserver a 10.0.0.1:80;\nserver b 10.0.0.2:80;\n",
    )
    .await;
    client.put("/app/db", "pg://two", None).await.expect("put");
    file_is(
        &out,
        "db = pg://two\nserver a 10.0.0.1:80;\nserver b 10.0.0.2:80;\n",
    )
    .await;
    // Editing the template re-renders.
    std::fs::write(&template, "db={{ key(\"/app/db\") }}\n").expect("edit template");
    file_is(&out, "db=pg://two\n").await;
    drop(agent);
}

#[tokio::test]
async fn unchanged_content_leaves_the_inode_and_mtime_alone_and_fires_no_hook() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/x", "1", None).await.expect("put");
    client.put("/app/y", "unrelated", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("x.txt");
    let hook_log = dir.path().join("hook.log");
    let agent = CoordProcess::run(&manifest(
        &etcd,
        &format!(
            "[[hook]]\nname = \"note\"\nexec = [\"sh\", \"-c\", \"echo $COORD_NEW_HASH >> {}\"]\n\
             [[file]]\npath = \"{}\"\nsource = \"x={{{{ key('/app/x') }}}} y={{{{ key('/app/y')[:0] }}}}\"\non_change = [\"note\"]\n",
            hook_log.display(),
            out.display()
        ),
    ));
    file_is(&out, "x=1 y=").await;
    eventually("the hook's first run", || async {
        std::fs::read_to_string(&hook_log)
            .ok()
            .filter(|l| l.lines().count() == 1)
    })
    .await;
    let before = std::fs::metadata(&out).expect("stat");
    // Same value again, and a change that renders the same content.
    client.put("/app/x", "1", None).await.expect("put");
    client.put("/app/y", "changed", None).await.expect("put");
    log_says(&agent, "Rendered file unchanged").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = std::fs::metadata(&out).expect("stat");
    assert_eq!(
        (before.ino(), before.mtime_nsec(), before.mtime()),
        (after.ino(), after.mtime_nsec(), after.mtime())
    );
    let runs = std::fs::read_to_string(&hook_log).expect("hook log");
    assert_eq!(
        runs.lines().count(),
        1,
        "the hook ran again without a change:\n{runs}"
    );
    // A real change fires it again.
    client.put("/app/x", "2", None).await.expect("put");
    file_is(&out, "x=2 y=").await;
    eventually("the hook's second run", || async {
        std::fs::read_to_string(&hook_log)
            .ok()
            .filter(|l| l.lines().count() == 2)
    })
    .await;
}

#[tokio::test]
async fn a_failing_check_command_keeps_the_old_file() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/conf", "good;", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("conf");
    let agent = CoordProcess::run(&manifest(
        &etcd,
        &format!(
            "[[file]]\npath = \"{}\"\nkey = \"/app/conf\"\ncheck = [\"grep\", \"-q\", \";\", \"{{staged}}\"]\n",
            out.display()
        ),
    ));
    file_is(&out, "good;").await;
    client.put("/app/conf", "bad", None).await.expect("put");
    let log = log_says(&agent, "its check").await;
    assert!(log.contains(&out.display().to_string()), "{log}");
    assert_eq!(std::fs::read_to_string(&out).expect("file"), "good;");
    client.put("/app/conf", "fixed;", None).await.expect("put");
    file_is(&out, "fixed;").await;
    let leftovers: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".coord-"))
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "staging files left behind: {leftovers:?}"
    );
}

#[tokio::test]
async fn a_missing_key_keeps_the_old_file_and_names_file_and_key() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/a", "1", None).await.expect("put");
    client.put("/app/b", "2", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("ab");
    let agent = CoordProcess::run(&manifest(
        &etcd,
        &format!(
            "[[file]]\npath = \"{}\"\nsource = \"{{{{ key('/app/a') }}}}{{{{ key('/app/b') }}}}\"\n",
            out.display()
        ),
    ));
    file_is(&out, "12").await;
    client.delete("/app/b").await.expect("delete");
    let log = log_says(&agent, "key `/app/b` is missing").await;
    assert!(log.contains(&out.display().to_string()), "{log}");
    assert_eq!(std::fs::read_to_string(&out).expect("file"), "12");
    // When the key comes back, the file follows.
    client.put("/app/b", "3", None).await.expect("put");
    file_is(&out, "13").await;
}

#[tokio::test]
async fn etcd_stopped_and_restarted_leaves_the_file_intact_and_the_agent_catches_up() {
    let mut etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/v", "before", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("v");
    let agent = CoordProcess::run(&manifest(
        &etcd,
        &format!("[[file]]\npath = \"{}\"\nkey = \"/app/v\"\n", out.display()),
    ));
    file_is(&out, "before").await;
    etcd.member().kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(std::fs::read_to_string(&out).expect("file"), "before");
    etcd.member().restart().expect("restart");
    etcd.member().wait_healthy().await.expect("healthy");
    eventually("a write after the restart", || async {
        client.put("/app/v", "after", None).await.ok()
    })
    .await;
    file_is(&out, "after").await;
    drop(agent);
}

#[tokio::test]
async fn a_prefix_emptied_by_accident_does_not_blank_the_file_unless_allowed() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/env/A", "1", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let guarded = dir.path().join("guarded.env");
    let allowed = dir.path().join("allowed.env");
    let agent = CoordProcess::run(&manifest(
        &etcd,
        &format!(
            "[[file]]\npath = \"{}\"\nprefix = \"/app/env/\"\nformat = \"env\"\n\
             [[file]]\npath = \"{}\"\nprefix = \"/app/env/\"\nformat = \"env\"\nallow_empty = true\n",
            guarded.display(),
            allowed.display()
        ),
    ));
    file_is(&guarded, "A='1'\n").await;
    file_is(&allowed, "A='1'\n").await;
    client.delete_prefix("/app/env/").await.expect("delete");
    file_is(&allowed, "").await;
    log_says(&agent, "had keys and is now empty").await;
    assert_eq!(std::fs::read_to_string(&guarded).expect("file"), "A='1'\n");
}

#[tokio::test]
async fn the_four_prefix_formats_render_as_their_own_parsers_read_them_back() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let values = [
        ("/cfg/NAME", "web 01"),
        ("/cfg/QUOTE", "it's \"quoted\" $HOME `x`"),
        ("/cfg/UNICODE", "zürich ✓"),
        ("/cfg/EMPTY", ""),
    ];
    for (k, v) in values {
        client.put(k, v, None).await.expect("put");
    }
    client.put("/nested/db/host", "h", None).await.expect("put");
    client
        .put("/nested/db/port", "5432", None)
        .await
        .expect("put");
    client.put("/nested/name", "n", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let path = |ext: &str| dir.path().join(format!("out.{ext}"));
    let mut files = format!(
        "[[file]]\npath = \"{}\"\nprefix = \"/cfg/\"\nformat = \"env\"\n",
        path("env").display()
    );
    for ext in ["json", "yaml", "toml"] {
        files.push_str(&format!(
            "[[file]]\npath = \"{}\"\nprefix = \"/nested/\"\nformat = \"{ext}\"\n",
            path(ext).display()
        ));
    }
    let _agent = CoordProcess::run(&manifest(&etcd, &files));
    for ext in ["env", "json", "yaml", "toml"] {
        let p = path(ext);
        eventually(&format!("{} rendered", p.display()), || async {
            p.exists().then_some(())
        })
        .await;
    }
    let env: std::collections::BTreeMap<String, String> = dotenvy::from_path_iter(path("env"))
        .expect("dotenv parses")
        .map(|r| r.expect("dotenv entry"))
        .collect();
    for (k, v) in values {
        assert_eq!(env.get(&k[5..]).map(String::as_str), Some(v), "env {k}");
    }
    let want = serde_json::json!({"db": {"host": "h", "port": "5432"}, "name": "n"});
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path("json")).expect("json"))
            .expect("JSON parses");
    assert_eq!(json, want);
    let yaml: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string(path("yaml")).expect("yaml"))
            .expect("YAML parses");
    assert_eq!(yaml, want);
    let toml_value: serde_json::Value =
        toml::from_str(&std::fs::read_to_string(path("toml")).expect("toml")).expect("TOML parses");
    assert_eq!(toml_value, want);
}

#[tokio::test]
async fn a_validate_hook_veto_keeps_the_old_file() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client
        .put("/app/doc", "{\"ok\": true}", None)
        .await
        .expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("doc.json");
    let agent = CoordProcess::run(&manifest(
        &etcd,
        &format!(
            "[[hook]]\nname = \"starts-with-brace\"\nexec = [\"sh\", \"-c\", \"head -c1 \\\"$COORD_STAGED_PATH\\\" | grep -q '{{' || {{ echo 'not a JSON object' >&2; exit 1; }}\"]\n\
             [[file]]\npath = \"{}\"\nkey = \"/app/doc\"\nvalidate = [\"starts-with-brace\"]\n",
            out.display()
        ),
    ));
    file_is(&out, "{\"ok\": true}").await;
    client.put("/app/doc", "oops", None).await.expect("put");
    let log = log_says(&agent, "vetoed").await;
    assert!(log.contains("not a JSON object"), "{log}");
    assert_eq!(
        std::fs::read_to_string(&out).expect("file"),
        "{\"ok\": true}"
    );
}

/// Invariant: a change re-renders only the files that read it.
#[tokio::test]
async fn one_changed_key_re_renders_only_the_files_that_depend_on_it() {
    let etcd = etcd().await;
    let client: Client = etcd.client().await;
    let dir = tempfile::tempdir().expect("tmp");
    let mut text = manifest(&etcd, "");
    for i in 0..20 {
        client
            .put(&format!("/k/{i}"), "v", None)
            .await
            .expect("put");
        text.push_str(&format!(
            "[[file]]\npath = \"{}\"\nsource = \"{{{{ key('/k/{i}') }}}}\"\n",
            dir.path().join(format!("f{i}")).display()
        ));
    }
    let m = Manifest::parse(&dir.path().join("agent.toml"), &text).expect("manifest");
    let controller = FilesController::new("/coord");
    let stats = controller.stats();
    let (_specs_tx, specs) = watch::channel(m.files.clone());
    let runner = Arc::new(HookRunner::new("files", &[]).expect("hooks"));
    let (_hooks_tx, hooks) = watch::channel(runner);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(controller.run(client.clone(), specs, hooks, cancel.clone()));
    eventually("the first render of every file", || {
        let n = stats.borrow().replaced;
        async move { (n == 20).then_some(()) }
    })
    .await;
    let before = stats.borrow().clone();
    client.put("/k/7", "changed", None).await.expect("put");
    file_is(&dir.path().join("f7"), "changed").await;
    let after = stats.borrow().clone();
    assert_eq!(
        after.total_renders(),
        before.total_renders() + 1,
        "{after:?}"
    );
    assert_eq!(after.renders[&dir.path().join("f7")], 2);
    cancel.cancel();
    task.await.expect("controller stops");
}

#[tokio::test]
async fn a_file_gets_its_mode_owner_backup_and_directories() {
    use std::os::unix::fs::PermissionsExt;
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/secret", "one", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("deep/er/secret");
    let _agent = CoordProcess::run(&manifest(
        &etcd,
        &format!(
            "[[file]]\npath = \"{}\"\nsource = \"{{{{ key('/app/secret') }}}}{{{{ key('/app/optional') }}}}\"\n\
             mode = \"0600\"\nowner = \"nobody\"\nbackup = true\ncreate_dirs = true\nmissing = \"empty\"\n",
            out.display()
        ),
    ));
    file_is(&out, "one").await;
    let meta = std::fs::metadata(&out).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("lookup")
        .expect("user nobody");
    assert_eq!(meta.uid(), nobody.uid.as_raw());
    client.put("/app/secret", "two", None).await.expect("put");
    file_is(&out, "two").await;
    let backup = dir.path().join("deep/er/secret.bak");
    assert_eq!(std::fs::read_to_string(backup).expect("backup"), "one");
}

#[tokio::test]
async fn a_burst_of_changes_within_the_quiet_time_renders_once() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/burst/v", "0", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("v");
    let text = manifest(
        &etcd,
        &format!(
            "[[file]]\npath = \"{}\"\nkey = \"/burst/v\"\ndebounce = {{ min = \"700ms\", max = \"30s\" }}\n",
            out.display()
        ),
    );
    let m = Manifest::parse(&dir.path().join("agent.toml"), &text).expect("manifest");
    let controller = FilesController::new("/coord");
    let stats = controller.stats();
    let (_specs_tx, specs) = watch::channel(m.files.clone());
    let (_hooks_tx, hooks) =
        watch::channel(Arc::new(HookRunner::new("files", &[]).expect("hooks")));
    let cancel = CancellationToken::new();
    let task = tokio::spawn(controller.run(client.clone(), specs, hooks, cancel.clone()));
    file_is(&out, "0").await;
    let before = stats.borrow().total_renders();
    for i in 1..=10 {
        client
            .put("/burst/v", i.to_string(), None)
            .await
            .expect("put");
    }
    file_is(&out, "10").await;
    assert_eq!(
        stats.borrow().total_renders(),
        before + 1,
        "ten quick changes, one render"
    );
    cancel.cancel();
    task.await.expect("controller stops");
}

/// The agent end to end with a WASM validator: the `validate-config`
/// plugin vetoes bad JSON, so the file keeps its last good content.
#[tokio::test]
async fn a_wasm_validator_vetoes_bad_content_and_the_file_keeps_its_old_one() {
    let plugins = crate::support::plugins();
    let etcd = etcd().await;
    let client = etcd.client().await;
    client
        .put("/app/settings", "{\"port\": 80}", None)
        .await
        .expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("settings.json");
    let agent = CoordProcess::run(&manifest(
        &etcd,
        &format!(
            "[[hook]]\nname = \"json\"\nwasm = \"{}\"\ntimeout = \"2s\"\n\
             [[file]]\npath = \"{}\"\nkey = \"/app/settings\"\nvalidate = [\"json\"]\n",
            plugins.validate_config.display(),
            out.display()
        ),
    ));
    file_is(&out, "{\"port\": 80}").await;
    client
        .put("/app/settings", "{\"port\": 80,}", None)
        .await
        .expect("put");
    let log = log_says(&agent, "vetoed").await;
    assert!(log.contains("hook `json`"), "{log}");
    assert_eq!(
        std::fs::read_to_string(&out).expect("file"),
        "{\"port\": 80}"
    );
    client
        .put("/app/settings", "{\"port\": 8080}", None)
        .await
        .expect("put");
    file_is(&out, "{\"port\": 8080}").await;
}

/// `path`'s metadata once its mode is `mode` and its owner `uid`.
async fn metadata_is(path: &Path, mode: u32, uid: u32) -> std::fs::Metadata {
    use std::os::unix::fs::PermissionsExt;
    eventually(
        &format!("`{}` to be {mode:04o} owned by {uid}", path.display()),
        || async {
            let meta = std::fs::metadata(path).ok()?;
            (meta.permissions().mode() & 0o7777 == mode && meta.uid() == uid).then_some(meta)
        },
    )
    .await
}

/// The spec's mode and owner are applied even when the bytes are the
/// same: after a reload that tightens them, and after someone changed
/// them by hand. Neither rewrites the file nor fires `on_change`.
#[tokio::test]
async fn a_changed_mode_or_owner_is_applied_in_place_without_firing_the_hook() {
    use std::os::unix::fs::PermissionsExt;
    let etcd = etcd().await;
    let client = etcd.client().await;
    client
        .put("/app/secret", "s3cret", None)
        .await
        .expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("secret");
    let hook_log = dir.path().join("hook.log");
    let files = |extra: &str| {
        manifest(
            &etcd,
            &format!(
                "[[hook]]\nname = \"note\"\nexec = [\"sh\", \"-c\", \"echo $COORD_NEW_HASH >> {}\"]\n\
                 [[file]]\npath = \"{}\"\nkey = \"/app/secret\"\non_change = [\"note\"]\n{extra}",
                hook_log.display(),
                out.display()
            ),
        )
    };
    let agent = CoordProcess::run(&files("mode = \"0644\"\n"));
    file_is(&out, "s3cret").await;
    let first = metadata_is(&out, 0o644, 0).await;
    eventually("the hook's first run", || async {
        std::fs::read_to_string(&hook_log)
            .ok()
            .filter(|l| l.lines().count() == 1)
    })
    .await;
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("lookup")
        .expect("user nobody")
        .uid
        .as_raw();

    // A reload that tightens the mode and names an owner.
    std::fs::write(
        agent.manifest_path(),
        files("mode = \"0600\"\nowner = \"nobody\"\n"),
    )
    .expect("rewrite manifest");
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let tightened = metadata_is(&out, 0o600, nobody).await;
    assert_eq!(tightened.ino(), first.ino(), "the file was rewritten");
    log_says(&agent, "File metadata set to its spec").await;

    // Loosened by hand: the next render (same bytes) tightens it again.
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    nix::unistd::chown(&out, Some(nix::unistd::Uid::from_raw(0)), None).expect("chown");
    client
        .put("/app/secret", "s3cret", None)
        .await
        .expect("put");
    let again = metadata_is(&out, 0o600, nobody).await;
    assert_eq!(again.ino(), first.ino(), "the file was rewritten");
    assert_eq!(std::fs::read_to_string(&out).expect("file"), "s3cret");

    // Let a wrongly fired hook show before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let runs = std::fs::read_to_string(&hook_log).expect("hook log");
    assert_eq!(
        runs.lines().count(),
        1,
        "a metadata fix fired the hook:\n{runs}"
    );
}

/// The backup of a 0600 file holds secrets too: it is 0600 as well.
#[tokio::test]
async fn the_backup_of_a_private_file_is_as_private_as_the_file() {
    use std::os::unix::fs::PermissionsExt;
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/secret", "old", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("secret");
    let _agent = CoordProcess::run(&manifest(
        &etcd,
        &format!(
            "[[file]]\npath = \"{}\"\nkey = \"/app/secret\"\nmode = \"0600\"\nbackup = true\n",
            out.display()
        ),
    ));
    file_is(&out, "old").await;
    client.put("/app/secret", "new", None).await.expect("put");
    file_is(&out, "new").await;
    let backup = dir.path().join("secret.bak");
    assert_eq!(std::fs::read_to_string(&backup).expect("backup"), "old");
    let mode = std::fs::metadata(&backup)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o600, "the backup is {mode:04o}");
}

/// A symlink planted at `<path>.bak` is replaced by the backup; the file
/// it pointed at is never written.
#[tokio::test]
async fn a_symlink_planted_at_the_backup_path_is_replaced_and_its_target_left_alone() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/conf", "old", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("conf");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").expect("victim");
    let _agent = CoordProcess::run(&manifest(
        &etcd,
        &format!(
            "[[file]]\npath = \"{}\"\nkey = \"/app/conf\"\nbackup = true\n",
            out.display()
        ),
    ));
    file_is(&out, "old").await;
    let backup = dir.path().join("conf.bak");
    std::os::unix::fs::symlink(&victim, &backup).expect("plant the symlink");
    client.put("/app/conf", "new", None).await.expect("put");
    file_is(&out, "new").await;
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "precious"
    );
    let meta = std::fs::symlink_metadata(&backup).expect("stat the backup");
    assert!(meta.file_type().is_file(), "the backup is {meta:?}");
    assert_eq!(std::fs::read_to_string(&backup).expect("backup"), "old");
    let leftovers: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".coord-"))
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "staging files left behind: {leftovers:?}"
    );
}

/// `format = "env"` names a variable after the key's whole path below the
/// prefix (`a/x` → `a_x`), so keys in two folders both show; two keys that
/// still map to one name fail the render, naming both, and the file keeps
/// its content.
#[tokio::test]
async fn env_names_keep_the_keys_path_and_two_keys_for_one_name_fail_the_render() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/env/a/x", "1", None).await.expect("put");
    client.put("/app/env/b/x", "2", None).await.expect("put");
    client.put("/app/env/TOP", "3", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("app.env");
    let agent = CoordProcess::run(&manifest(
        &etcd,
        &format!(
            "[[file]]\npath = \"{}\"\nprefix = \"/app/env/\"\nformat = \"env\"\n",
            out.display()
        ),
    ));
    file_is(&out, "TOP='3'\na_x='1'\nb_x='2'\n").await;
    client.put("/app/env/a_x", "4", None).await.expect("put");
    let log = log_says(&agent, "both become `a_x`").await;
    assert!(
        log.contains("keys `/app/env/a/x` and `/app/env/a_x`"),
        "{log}"
    );
    assert!(log.contains(&out.display().to_string()), "{log}");
    assert_eq!(
        std::fs::read_to_string(&out).expect("file"),
        "TOP='3'\na_x='1'\nb_x='2'\n"
    );
    client.delete("/app/env/a_x").await.expect("delete");
    client.put("/app/env/b/x", "5", None).await.expect("put");
    file_is(&out, "TOP='3'\na_x='1'\nb_x='5'\n").await;
}

/// Escaping is the manifest's choice, never the destination's name: by
/// default `.json`, `.yaml` and `.html` files get values as they are;
/// `autoescape = "html"` or `"json"` escapes, and a reload that changes it
/// re-renders with the new escaping.
#[tokio::test]
async fn values_are_not_escaped_whatever_the_file_name_unless_autoescape_asks() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/name", "web-01", None).await.expect("put");
    client.put("/app/html", "<b>&", None).await.expect("put");
    client
        .put("/app/quoted", "say \"hi\"", None)
        .await
        .expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let path = |name: &str| dir.path().join(name);
    let files = |page_escape: &str| {
        let mut text = String::new();
        for (name, source, extra) in [
            ("out.json", r#"{"name": "{{ key('/app/name') }}"}"#, ""),
            ("out.yaml", "name: {{ key('/app/html') }}", ""),
            ("page.html", "<p>{{ key('/app/html') }}</p>", page_escape),
            (
                "asked.json",
                r#"{"q": {{ key('/app/quoted') }}}"#,
                "autoescape = \"json\"\n",
            ),
            (
                "asked.conf",
                "<p>{{ key('/app/html') }}</p>",
                "autoescape = \"html\"\n",
            ),
        ] {
            text.push_str(&format!(
                "[[file]]\npath = \"{}\"\nsource = '''{source}'''\n{extra}",
                path(name).display()
            ));
        }
        manifest(&etcd, &text)
    };
    let agent = CoordProcess::run(&files(""));
    file_is(&path("out.json"), r#"{"name": "web-01"}"#).await;
    file_is(&path("out.yaml"), "name: <b>&").await;
    file_is(&path("page.html"), "<p><b>&</p>").await;
    file_is(&path("asked.json"), r#"{"q": "say \"hi\""}"#).await;
    file_is(&path("asked.conf"), "<p>&lt;b&gt;&amp;</p>").await;
    std::fs::write(agent.manifest_path(), files("autoescape = \"html\"\n"))
        .expect("rewrite manifest");
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    file_is(&path("page.html"), "<p>&lt;b&gt;&amp;</p>").await;
}
