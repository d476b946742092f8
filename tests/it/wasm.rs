//! WASM hooks with the real plugins of `plugins/`, compiled for
//! `wasm32-wasip2` once per test process. No etcd is involved: the agent's
//! cache is stood in for by a map, which is all a plugin can see of it.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use coord::agent::hooks::{
    Envelope, Event, Health, HookError, KeyReader, Outcome, WasmHost, WasmPlugin, World,
};
use coord::agent::manifest::{HookSpec, Manifest};

use super::support::{CoordProcess, PATIENCE, etcd, eventually, manifest, plugins};

/// The cache over which plugins read keys.
struct Keys(HashMap<String, Vec<u8>>);

impl KeyReader for Keys {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.0.get(key).cloned()
    }
}

fn no_keys() -> Arc<dyn KeyReader> {
    Arc::new(Keys(HashMap::new()))
}

/// The `[[hook]]` written as `hook_toml`, through the manifest parser like
/// an agent would read it.
fn spec(hook_toml: &str) -> HookSpec {
    let text =
        format!("[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n\n[[hook]]\n{hook_toml}\n");
    let manifest = Manifest::parse(Path::new("/nowhere/agent.toml"), &text)
        .unwrap_or_else(|e| panic!("test manifest is invalid: {e}\n{text}"));
    manifest.hooks.into_iter().next().expect("one hook")
}

/// A `[[hook]]` for `wasm` with `extra` lines.
fn wasm_hook(name: &str, wasm: &Path, extra: &str) -> HookSpec {
    spec(&format!(
        "name = \"{name}\"\nwasm = '{}'\n{extra}",
        wasm.display()
    ))
}

/// One host for the whole test process, with a compilation cache kept
/// between runs: as in the agent, a plugin compiles once.
fn host() -> &'static WasmHost {
    static HOST: OnceLock<WasmHost> = OnceLock::new();
    HOST.get_or_init(|| {
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("wasm-cache");
        WasmHost::new(Some(&cache)).expect("wasm host")
    })
}

fn load(spec: &HookSpec) -> WasmPlugin {
    host()
        .load(spec, no_keys())
        .unwrap_or_else(|e| panic!("loading `{}` failed: {e}", spec.name))
}

fn misbehave(name: &str, config: &str, extra: &str) -> WasmPlugin {
    load(&wasm_hook(
        name,
        &plugins().misbehave,
        &format!("config = {config}\n{extra}"),
    ))
}

fn lock_event(lock: &str) -> Envelope {
    Envelope::new(
        "web-01",
        Event::LockAcquired {
            lock: lock.into(),
            fencing_token: 42,
        },
    )
}

fn validate_event(path: &str, content: &str) -> Envelope {
    Envelope::new(
        "web-01",
        Event::ValidateFile {
            path: path.into(),
            staged_path: format!("{path}.coord-staged"),
            content: content.into(),
        },
    )
}

/// Calls `plugin`, bounded so that a broken sandbox fails the test instead
/// of hanging it.
async fn call(
    plugin: &WasmPlugin,
    event: &Envelope,
    timeout: Duration,
) -> Result<Outcome, HookError> {
    tokio::time::timeout(PATIENCE, plugin.call(event, timeout))
        .await
        .unwrap_or_else(|_| panic!("`{}` was not stopped within {PATIENCE:?}", plugin.name()))
}

/// Everything logged on this thread while the guard lives.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .without_time()
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }

    fn lines_with(&self, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_plugin_in_an_infinite_loop_is_stopped_at_its_deadline_and_the_agent_keeps_running() {
    let plugin = misbehave("spinner", r#"{ mode = "by-lock" }"#, "");
    let timeout = Duration::from_millis(200);
    for _ in 0..2 {
        match call(&plugin, &lock_event("loop"), timeout).await {
            Err(HookError::Timeout { hook, timeout: t }) => {
                assert_eq!(hook, "spinner");
                assert_eq!(t, timeout);
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        // The same loaded plugin takes the next event as if nothing happened.
        assert_eq!(
            call(&plugin, &lock_event("ok"), timeout)
                .await
                .expect("ok call"),
            Outcome::Done
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_stuck_in_loops_on_every_worker_thread_are_all_stopped() {
    // More spinning calls than worker threads: each must still be stopped,
    // which needs the epoch thread (tokio's timers alone could not run).
    let plugin = misbehave("spinners", r#"{ mode = "loop" }"#, "");
    let calls = (0..4).map(|_| {
        let p = plugin.clone();
        tokio::spawn(async move { p.call(&lock_event("x"), Duration::from_millis(200)).await })
    });
    for c in calls {
        let r = tokio::time::timeout(PATIENCE, c)
            .await
            .expect("stopped in time")
            .expect("task joined");
        assert!(matches!(r, Err(HookError::Timeout { .. })), "{r:?}");
    }
}

#[tokio::test]
async fn a_plugin_that_allocates_without_bound_is_stopped_by_its_memory_limit() {
    let plugin = misbehave("hoarder", r#"{ mode = "by-lock" }"#, "max_memory_mib = 16");
    match call(&plugin, &lock_event("alloc"), PATIENCE).await {
        Err(e @ HookError::MemoryLimit { .. }) => {
            let HookError::MemoryLimit { hook, limit } = &e else {
                unreachable!()
            };
            assert_eq!(hook, "hoarder");
            assert_eq!(*limit, 16 * 1024 * 1024);
            assert!(e.to_string().contains("hoarder"), "{e}");
        }
        other => panic!("expected the memory limit, got {other:?}"),
    }
    assert_eq!(
        call(&plugin, &lock_event("ok"), PATIENCE)
            .await
            .expect("ok call"),
        Outcome::Done
    );
}

#[tokio::test]
async fn a_trap_is_reported_with_the_hook_name_and_the_panic_message() {
    let plugin = misbehave("trapper", r#"{ mode = "trap" }"#, "");
    let err = call(&plugin, &lock_event("x"), PATIENCE)
        .await
        .expect_err("a trap");
    let HookError::Trap { hook, message } = &err else {
        panic!("expected a trap, got {err:?}");
    };
    assert_eq!(hook, "trapper");
    assert!(
        message.contains("misbehave: trapping as configured"),
        "the plugin's panic message is in the trap: {message}"
    );
    assert!(
        err.to_string().starts_with("hook `trapper` trapped"),
        "{err}"
    );
}

#[tokio::test]
async fn an_error_returned_by_a_plugin_is_reported_as_its_own() {
    let plugin = misbehave("grumpy", r#"{ mode = "error" }"#, "");
    match call(&plugin, &lock_event("x"), PATIENCE).await {
        Err(HookError::Plugin { hook, message }) => {
            assert_eq!(hook, "grumpy");
            assert_eq!(message, "misbehave: failing as configured");
        }
        other => panic!("expected the plugin's error, got {other:?}"),
    }
}

#[tokio::test]
async fn validate_config_vetoes_bad_json_with_line_and_column_and_accepts_good_json() {
    let plugin = load(&wasm_hook("json-check", &plugins().validate_config, ""));
    assert_eq!(plugin.world(), World::Validator);
    let bad = validate_event("/etc/app/settings.json", "{\n  \"a\": 1,\n  \"b\": \n}\n");
    match call(&plugin, &bad, PATIENCE).await.expect("validated") {
        Outcome::Vetoed(reason) => {
            assert!(
                reason.starts_with("invalid JSON at line 4, column 1"),
                "{reason}"
            );
        }
        Outcome::Done => panic!("bad JSON was accepted"),
    }
    let good = validate_event("/etc/app/settings.json", r#"{"a": 1, "b": [true, null]}"#);
    assert_eq!(
        call(&plugin, &good, PATIENCE).await.expect("validated"),
        Outcome::Done
    );
}

#[tokio::test]
async fn validate_config_vetoes_bad_nginx_naming_the_line_and_accepts_good_nginx() {
    let plugin = load(&wasm_hook("nginx-check", &plugins().validate_config, ""));
    let good = "# upstreams\nupstream api {\n    server 10.0.0.1:8080;  # first\n    server 10.0.0.2:8080;\n}\nserver { listen 80; location / { return 200 \"{;#\"; } }\n";
    let cases = [
        (
            "upstream api {\n    server 10.0.0.1:8080\n}\n",
            "line 2: directive does not end with `;`",
        ),
        (
            "upstream api {\n    server 10.0.0.1:8080;\n",
            "line 1: `{` is never closed",
        ),
        ("server 10.0.0.1;\n}\n", "line 2: `}` closes nothing"),
        ("return 200 \"oops;\n", "line 1: unterminated quote"),
    ];
    for (content, expected) in cases {
        let event = validate_event("/etc/nginx/conf.d/upstreams.conf", content);
        match call(&plugin, &event, PATIENCE).await.expect("validated") {
            Outcome::Vetoed(reason) => assert!(
                reason.starts_with(expected),
                "for {content:?}: expected {expected:?}, got {reason:?}"
            ),
            Outcome::Done => panic!("accepted bad nginx: {content:?}"),
        }
    }
    let event = validate_event("/etc/nginx/conf.d/upstreams.conf", good);
    assert_eq!(
        call(&plugin, &event, PATIENCE).await.expect("validated"),
        Outcome::Done
    );
}

#[tokio::test]
async fn validate_config_takes_its_format_from_config_before_the_file_name() {
    let as_json = load(&wasm_hook(
        "forced-json",
        &plugins().validate_config,
        r#"config = { format = "json" }"#,
    ));
    let event = validate_event("/etc/nginx/nginx.conf", "server { listen 80; }\n");
    assert!(matches!(
        call(&as_json, &event, PATIENCE).await.expect("validated"),
        Outcome::Vetoed(r) if r.starts_with("invalid JSON")
    ));
    let unknown = load(&wasm_hook("guess", &plugins().validate_config, ""));
    match call(&unknown, &validate_event("/etc/motd", "hi"), PATIENCE).await {
        Err(HookError::Plugin { message, .. }) => {
            assert!(message.contains("cannot tell the format"), "{message}");
        }
        other => panic!("expected an error for an unknown format, got {other:?}"),
    }
}

#[tokio::test]
async fn log_events_handles_every_event_variant_with_a_one_line_summary() {
    let plugin = load(&wasm_hook("audit", &plugins().log_events, ""));
    assert_eq!(plugin.world(), World::EventHook);
    let events = [
        Event::FileChanged {
            path: "/etc/x.conf".into(),
            old_hash: None,
            new_hash: "ab12".into(),
        },
        Event::ServiceHealthChanged {
            service: "api".into(),
            instance: "web-01-api".into(),
            old: Some(Health::Passing),
            new: Health::Critical,
        },
        Event::LockAcquired {
            lock: "reports".into(),
            fencing_token: 42,
        },
        Event::LockLost {
            lock: "reports".into(),
            fencing_token: 42,
        },
        Event::TaskFinished {
            task: "nightly report".into(),
            fencing_token: 43,
            exit_code: Some(0),
            signal: None,
        },
        Event::InstanceIdClaimed {
            pool: "worker".into(),
            id: 7,
            generation: 1234,
        },
        Event::InstanceIdLost {
            pool: "worker".into(),
            id: 7,
        },
    ];
    let expected = [
        "event=file-changed agent=web-01 path=/etc/x.conf old_hash=- new_hash=ab12",
        "event=service-health-changed agent=web-01 service=api instance=web-01-api old=passing new=critical",
        "event=lock-acquired agent=web-01 lock=reports fencing_token=42",
        "event=lock-lost agent=web-01 lock=reports fencing_token=42",
        "event=task-finished agent=web-01 task=\"nightly report\" fencing_token=43 exit_code=0 signal=-",
        "event=instance-id-claimed agent=web-01 pool=worker id=7 generation=1234",
        "event=instance-id-lost agent=web-01 pool=worker id=7",
    ];
    let (logs, _guard) = Logs::capture();
    for event in events {
        let envelope = Envelope::new("web-01", event);
        assert_eq!(
            call(&plugin, &envelope, PATIENCE).await.expect("handled"),
            Outcome::Done
        );
    }
    for line in expected {
        let found = logs.lines_with(line);
        assert_eq!(
            found.len(),
            1,
            "one log line with {line:?} in:\n{}",
            logs.text()
        );
        assert!(
            found[0].contains("INFO") && found[0].contains("hook=\"audit\""),
            "{}",
            found[0]
        );
    }
}

#[tokio::test]
async fn a_validator_refuses_other_events_and_an_event_hook_refuses_validate_file() {
    let validator = load(&wasm_hook("checker", &plugins().validate_config, ""));
    match call(&validator, &lock_event("x"), PATIENCE).await {
        Err(e @ HookError::WrongEvent { .. }) => {
            assert!(e.to_string().contains("checker"), "{e}");
            assert!(e.to_string().contains("`lock-acquired`"), "{e}");
        }
        other => panic!("expected a wrong-event error, got {other:?}"),
    }
    let hook = load(&wasm_hook("audit2", &plugins().log_events, ""));
    let event = validate_event("/etc/x.json", "{}");
    assert!(
        matches!(
            call(&hook, &event, PATIENCE).await,
            Err(HookError::WrongEvent { .. })
        ),
        "an event hook must not be asked to validate"
    );
}

#[tokio::test]
async fn get_key_returns_values_only_within_the_granted_prefixes() {
    let keys: Arc<dyn KeyReader> = Arc::new(Keys(HashMap::from([
        ("/app/db/url".to_owned(), b"postgres://db".to_vec()),
        ("/app-secrets/token".to_owned(), b"hunter2".to_vec()),
        ("/other/x".to_owned(), b"nope".to_vec()),
    ])));
    let read = |name: &str, key: &str| {
        let spec = wasm_hook(
            name,
            &plugins().misbehave,
            &format!(
                "config = {{ mode = \"read\", key = \"{key}\" }}\nread_prefixes = [\"/app/\"]"
            ),
        );
        host().load(&spec, keys.clone()).expect("load reader")
    };
    let (logs, _guard) = Logs::capture();
    for (name, key) in [
        ("reader-1", "/app/db/url"),
        ("reader-2", "/app/missing"),
        ("reader-3", "/app-secrets/token"),
        ("reader-4", "/other/x"),
    ] {
        assert_eq!(
            call(&read(name, key), &lock_event("x"), PATIENCE)
                .await
                .expect("read"),
            Outcome::Done
        );
    }
    let text = logs.text();
    assert!(
        text.contains("key=/app/db/url value=postgres://db"),
        "{text}"
    );
    assert!(text.contains("key=/app/missing absent"), "{text}");
    // Present in the cache, but outside the grant: exactly like absent.
    assert!(text.contains("key=/app-secrets/token absent"), "{text}");
    assert!(text.contains("key=/other/x absent"), "{text}");
    assert!(
        !text.contains("hunter2") && !text.contains("nope"),
        "{text}"
    );
}

#[tokio::test]
async fn a_prefix_without_a_trailing_slash_grants_that_key_and_below_it_not_its_neighbours() {
    let keys: Arc<dyn KeyReader> = Arc::new(Keys(HashMap::from([
        ("/app".to_owned(), b"the-app-key".to_vec()),
        ("/app/db/url".to_owned(), b"postgres://db".to_vec()),
        ("/apple/pie".to_owned(), b"apple-secret".to_vec()),
        ("/app-secrets/token".to_owned(), b"hunter2".to_vec()),
    ])));
    let read = |name: &str, key: &str| {
        let spec = wasm_hook(
            name,
            &plugins().misbehave,
            &format!("config = {{ mode = \"read\", key = \"{key}\" }}\nread_prefixes = [\"/app\"]"),
        );
        host().load(&spec, keys.clone()).expect("load reader")
    };
    let (logs, _guard) = Logs::capture();
    for (name, key) in [
        ("segment-1", "/app"),
        ("segment-2", "/app/db/url"),
        ("segment-3", "/apple/pie"),
        ("segment-4", "/app-secrets/token"),
    ] {
        assert_eq!(
            call(&read(name, key), &lock_event("x"), PATIENCE)
                .await
                .expect("read"),
            Outcome::Done
        );
    }
    let text = logs.text();
    assert!(text.contains("key=/app value=the-app-key"), "{text}");
    assert!(
        text.contains("key=/app/db/url value=postgres://db"),
        "{text}"
    );
    assert!(text.contains("key=/apple/pie absent"), "{text}");
    assert!(text.contains("key=/app-secrets/token absent"), "{text}");
    assert!(
        !text.contains("apple-secret") && !text.contains("hunter2"),
        "{text}"
    );
}

#[tokio::test]
async fn a_plugin_sees_no_files_unless_a_directory_is_granted_and_then_only_to_read() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("motd");
    std::fs::write(&file, "hello from the host").expect("write file");
    let config = format!("{{ mode = \"file\", path = '{}' }}", file.display());
    let denied = misbehave("reader-nodir", &config, "");
    match call(&denied, &lock_event("x"), PATIENCE).await {
        Err(HookError::Plugin { message, .. }) => {
            assert!(message.starts_with("cannot read"), "{message}");
        }
        other => panic!("expected the read to fail without a grant, got {other:?}"),
    }
    let granted = misbehave(
        "reader-dir",
        &config,
        &format!("dirs = ['{}']", dir.path().display()),
    );
    let (logs, _guard) = Logs::capture();
    assert_eq!(
        call(&granted, &lock_event("x"), PATIENCE)
            .await
            .expect("read"),
        Outcome::Done
    );
    assert!(
        logs.text().contains("content=hello from the host"),
        "{}",
        logs.text()
    );
}

#[tokio::test]
async fn a_plugin_sees_only_the_environment_the_manifest_gives_it() {
    let plugin = misbehave(
        "env-reader",
        r#"{ mode = "env" }"#,
        "env = { GREETING = \"hi\" }",
    );
    let (logs, _guard) = Logs::capture();
    call(&plugin, &lock_event("x"), PATIENCE)
        .await
        .expect("env call");
    let lines = logs.lines_with("env=");
    assert_eq!(lines.len(), 1, "{}", logs.text());
    assert!(
        lines[0].contains("env=GREETING=hi hook="),
        "only GREETING: {}",
        lines[0]
    );
}

#[test]
fn loading_a_file_that_is_not_a_component_fails_at_load() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases: [(&str, &[u8], &str); 3] = [
        ("text.wasm", b"hello, world", "not a WebAssembly file"),
        (
            "core.wasm",
            b"\0asm\x01\0\0\0",
            "a core WebAssembly module, not a component",
        ),
        ("missing.wasm", b"", "No such file"),
    ];
    for (file, bytes, expected) in cases {
        let path = dir.path().join(file);
        if !bytes.is_empty() {
            std::fs::write(&path, bytes).expect("write");
        }
        match host().load(&wasm_hook("bad", &path, ""), no_keys()) {
            Err(HookError::Load {
                hook,
                path: p,
                message,
            }) => {
                assert_eq!(hook, "bad");
                assert_eq!(p, path.display().to_string());
                assert!(message.contains(expected), "{file}: {message}");
            }
            other => panic!("{file}: expected a load error, got {other:?}"),
        }
    }
}

#[test]
fn loading_a_component_of_neither_world_fails_at_load_naming_what_it_exports() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The smallest component: magic, version 0x0d, layer 1, nothing else.
    let path = dir.path().join("empty.wasm");
    std::fs::write(&path, b"\0asm\x0d\0\x01\0").expect("write");
    match host().load(&wasm_hook("empty", &path, ""), no_keys()) {
        Err(HookError::Load { message, .. }) => {
            assert!(
                message.contains("neither world of coord:hooks@0.1.0"),
                "{message}"
            );
            assert!(message.contains("exports nothing"), "{message}");
        }
        other => panic!("expected a load error, got {other:?}"),
    }
}

#[test]
fn a_granted_directory_that_does_not_exist_fails_at_load() {
    let spec = wasm_hook(
        "lost-dir",
        &plugins().log_events,
        "dirs = ['/nonexistent/coord-test-dir']",
    );
    match host().load(&spec, no_keys()) {
        Err(HookError::Load { message, .. }) => {
            assert!(message.contains("/nonexistent/coord-test-dir"), "{message}");
        }
        other => panic!("expected a load error, got {other:?}"),
    }
}

#[tokio::test]
async fn the_compilation_cache_serves_the_second_load() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("wasm-cache");
    let spec = wasm_hook("cached", &plugins().log_events, "");
    let cached_files = || -> Vec<String> {
        std::fs::read_dir(&cache)
            .expect("cache dir exists")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    };

    let first = WasmHost::new(Some(&cache)).expect("host");
    assert!(cached_files().is_empty());
    let plugin = first.load(&spec, no_keys()).expect("first load");
    assert!(!plugin.from_cache(), "nothing was cached yet");
    let files = cached_files();
    assert_eq!(files.len(), 1, "one compiled component cached: {files:?}");
    assert!(files[0].ends_with(".cwasm"), "{files:?}");
    drop((plugin, first));

    // A new host, as after an agent restart.
    let second = WasmHost::new(Some(&cache)).expect("host");
    let plugin = second.load(&spec, no_keys()).expect("second load");
    assert!(
        plugin.from_cache(),
        "the second load is served from the cache"
    );
    assert_eq!(cached_files(), files);
    assert_eq!(
        call(&plugin, &lock_event("x"), PATIENCE)
            .await
            .expect("call"),
        Outcome::Done
    );

    // A corrupt cache file is recompiled, not trusted.
    std::fs::write(cache.join(&files[0]), b"garbage").expect("corrupt");
    let plugin = second
        .load(&spec, no_keys())
        .expect("load after corruption");
    assert!(!plugin.from_cache());
    assert_eq!(
        call(&plugin, &lock_event("x"), PATIENCE)
            .await
            .expect("call"),
        Outcome::Done
    );
}

#[tokio::test]
async fn the_agent_compiles_a_plugin_in_a_child_process_into_a_cache_any_host_loads() {
    let etcd = etcd().await;
    let state = tempfile::tempdir().expect("temp dir");
    let out = state.path().join("out.txt");
    let log_events = &plugins().log_events;
    let body = manifest("wasm-child", &[etcd.endpoint()], 5).replace(
        "ttl = \"5s\"\n",
        &format!("ttl = \"5s\"\nstate_dir = '{}'\n", state.path().display()),
    ) + &format!(
        "\n[[file]]\npath = '{}'\nkey = \"/wasm-child/x\"\non_change = [\"audit\"]\n\n\
         [[hook]]\nname = \"audit\"\nwasm = '{}'\n",
        out.display(),
        log_events.display()
    );
    let agent = CoordProcess::run(&body);
    let loaded = eventually("the agent loads its plugin", || async {
        agent
            .log()
            .lines()
            .find(|l| l.contains("Plugin loaded."))
            .map(str::to_owned)
    })
    .await;
    assert!(loaded.contains("from_cache=false"), "{loaded}");
    assert!(
        agent.log().contains("Plugin compiled in a child process."),
        "{}",
        agent.log()
    );
    let cache = state.path().join("wasm-cache");
    let files: Vec<_> = std::fs::read_dir(&cache)
        .expect("the cache exists")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    // What the child compiled is what an agent's own engine loads.
    let host = WasmHost::new(Some(&cache)).expect("host");
    let plugin = host
        .load(&wasm_hook("audit", log_events, ""), no_keys())
        .expect("load");
    assert!(plugin.from_cache(), "the child's compilation is usable");
}

#[test]
fn a_compilation_cache_others_could_have_written_is_never_loaded_as_code() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("cache");
    let host = WasmHost::new(Some(&cache)).expect("wasm host");
    // The smallest plugin: every load that is not from the cache compiles.
    let spec = wasm_hook("cached", &plugins().log_events, "");
    let from_cache = || {
        host.load(&spec, no_keys())
            .expect("load (compiling again if need be)")
            .from_cache()
    };
    let chmod = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    assert!(!from_cache(), "the first load compiles");
    assert!(from_cache(), "the second comes from the cache");
    let file = std::fs::read_dir(&cache)
        .expect("cache dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .expect("a cached compilation");

    // A file its group may write: compiled again (and replaced by a safe one).
    chmod(&file, 0o664);
    assert!(
        !from_cache(),
        "a group-writable cache file was loaded as code"
    );
    assert!(from_cache(), "the file was replaced by a private one");
    chmod(&file, 0o606);
    assert!(
        !from_cache(),
        "a world-writable cache file was loaded as code"
    );

    // A directory others may write to: no cache at all.
    chmod(&cache, 0o777);
    assert!(
        !from_cache(),
        "a file in a world-writable cache directory was loaded"
    );
    assert!(!from_cache(), "a world-writable cache directory was used");
    chmod(&cache, 0o700);
    assert!(from_cache(), "a private cache directory is used again");

    // Owned by someone else (only root can make it so; CI runs as root).
    if nix::unistd::geteuid().is_root() {
        let other = Some(nix::unistd::Uid::from_raw(4242));
        nix::unistd::chown(&file, other, None).expect("chown");
        assert!(
            !from_cache(),
            "a cache file owned by another user was loaded"
        );
    }
}
