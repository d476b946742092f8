//! The files in `deploy/` that run coord elsewhere: the systemd unit, the
//! container image, the Kubernetes objects and the compose demo. They are
//! not run here (no systemd as PID 1, no container runtime), so what can be
//! checked without them is: systemd's own verifier, that every YAML
//! document parses and the objects refer to each other correctly, and that
//! every manifest they carry passes `coord check`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;
use serde_norway::Value;

use crate::support::{repo_root, run_tool};

const UNIT: &str = "deploy/systemd/coord.service";
/// Where the unit expects the binary; the tests swap in the built one.
const INSTALLED_COORD: &str = "/usr/local/bin/coord";

fn deploy(path: &str) -> PathBuf {
    repo_root().join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn systemd_analyze(args: &[&str]) -> Output {
    run_tool(
        "systemd-analyze",
        args,
        "install systemd (apt-get install systemd)",
    )
}

/// The unit copied into a fresh directory with the built coord in place
/// of the installed one, so that systemd can check that what it would
/// start exists. Returns the directory and the unit's path in it.
fn unit_with_built_coord() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tmp");
    let text = read(UNIT).replace(INSTALLED_COORD, env!("CARGO_BIN_EXE_coord"));
    let path = dir.path().join("coord.service");
    std::fs::write(&path, text).expect("write unit");
    (dir, path)
}

/// `key=value` settings of a unit file, every assignment of a key in order.
fn unit_settings(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            settings
                .entry(key.trim().to_owned())
                .or_default()
                .push(value.trim().to_owned());
        }
    }
    settings
}

/// Every document of a YAML file.
fn yaml_documents(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .enumerate()
        .map(|(i, doc)| {
            Value::deserialize(doc).unwrap_or_else(|e| panic!("{path}, document {}: {e}", i + 1))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn kubernetes_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(deploy("deploy/kubernetes"))
        .expect("deploy/kubernetes")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    files.sort();
    files
}

/// The Kubernetes objects (everything but kustomization.yaml), by kind.
fn kubernetes_objects() -> BTreeMap<String, Value> {
    let mut objects = BTreeMap::new();
    for file in kubernetes_files() {
        if file == "kustomization.yaml" {
            continue;
        }
        for doc in yaml_documents(&format!("deploy/kubernetes/{file}")) {
            let kind = str_at(&doc, &["kind"]).to_owned();
            assert!(
                objects.insert(kind.clone(), doc).is_none(),
                "two objects of kind {kind}"
            );
        }
    }
    objects
}

/// The value at `path` (mapping keys, or sequence indices written as
/// numbers), failing with the path when it is missing.
fn at<'v>(value: &'v Value, path: &[&str]) -> &'v Value {
    let mut v = value;
    for (i, step) in path.iter().enumerate() {
        let next = match step.parse::<usize>() {
            Ok(n) if v.is_sequence() => v.get(n),
            _ => v.get(*step),
        };
        v = next.unwrap_or_else(|| panic!("no `{}` in {value:?}", path[..=i].join(".")));
    }
    v
}

fn str_at<'v>(value: &'v Value, path: &[&str]) -> &'v str {
    at(value, path)
        .as_str()
        .unwrap_or_else(|| panic!("`{}` is not a string", path.join(".")))
}

/// Runs `coord check` on manifest text written to a fresh file, with
/// `env` added, and returns (success, stdout, stderr).
fn coord_check(text: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).expect("write manifest");
    coord_check_file(&path, env)
}

fn coord_check_file(path: &Path, env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_coord"))
        .arg("check")
        .arg(path)
        // The test's own environment must not name the agent.
        .env_remove("COORD_AGENT_NAME")
        .envs(env.iter().copied())
        .output()
        .expect("run coord check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The DaemonSet's one coord container.
fn coord_container(daemonset: &Value) -> &Value {
    let containers = at(daemonset, &["spec", "template", "spec", "containers"])
        .as_sequence()
        .expect("containers");
    containers
        .iter()
        .find(|c| c.get("name").and_then(Value::as_str) == Some("coord"))
        .expect("a container named coord")
}

fn configmap_manifest(objects: &BTreeMap<String, Value>) -> String {
    str_at(&objects["ConfigMap"], &["data", "agent.toml"]).to_owned()
}

#[test]
fn systemd_analyze_verify_accepts_the_unit_with_the_built_binary_in_place() {
    // Verified as installed, /usr/local/bin/coord would be reported missing
    // on a machine without it: that is the one complaint the copy removes.
    let (_dir, unit) = unit_with_built_coord();
    let out = systemd_analyze(&["verify", unit.to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    assert_eq!(stderr.trim(), "", "systemd-analyze verify warned");
}

#[test]
fn the_unit_is_a_hardened_notify_service_that_stops_its_commands_in_order() {
    let settings = unit_settings(&read(UNIT));
    let one = |key: &str| -> &str {
        match settings.get(key).map(Vec::as_slice) {
            Some([value]) => value,
            other => panic!("{key}= should be set once, found {other:?}"),
        }
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "main");
    assert!(!one("WatchdogSec").is_empty());
    assert_eq!(one("KillMode"), "mixed");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("SyslogIdentifier"), "coord");
    assert_eq!(one("StateDirectory"), "coord");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("ProtectHome"), "yes");
    assert_eq!(one("PrivateTmp"), "yes");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("SystemCallFilter"), "@system-service");
    assert_eq!(one("RestrictAddressFamilies"), "AF_UNIX AF_INET AF_INET6");
    assert_eq!(
        settings["ExecReload"].last().map(String::as_str),
        Some("/bin/kill -HUP $MAINPID")
    );
    // wasmtime needs memory it can make executable.
    assert!(
        !settings.contains_key("MemoryDenyWriteExecute"),
        "MemoryDenyWriteExecute would stop WASM hooks from loading"
    );
}

#[test]
fn systemd_analyze_security_rates_the_unit_ok() {
    let (_dir, unit) = unit_with_built_coord();
    let out = systemd_analyze(&[
        "security",
        "--offline=yes",
        "--no-pager",
        unit.to_str().expect("utf-8"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let overall = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no overall exposure level:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let mut words = overall
        .rsplit(':')
        .next()
        .expect("level")
        .split_whitespace();
    let score: f64 = words.next().and_then(|s| s.parse().ok()).expect("a score");
    assert_eq!(words.next(), Some("OK"), "{overall}");
    assert!(score < 2.0, "{overall}");
}

#[test]
fn every_deploy_file_starts_coord_run_with_the_manifest_as_its_one_argument() {
    let help = Command::new(env!("CARGO_BIN_EXE_coord"))
        .args(["run", "--help"])
        .output()
        .expect("coord run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("coord run [OPTIONS] <FILE>"), "{help}");

    let settings = unit_settings(&read(UNIT));
    assert_eq!(
        settings["ExecStart"],
        ["/usr/local/bin/coord run /etc/coord/agent.toml $COORD_RUN_ARGS"]
    );

    let dockerfile = read("deploy/container/Dockerfile");
    assert!(
        dockerfile
            .lines()
            .any(|l| l == r#"CMD ["run", "/etc/coord/agent.toml"]"#),
        "{dockerfile}"
    );

    let objects = kubernetes_objects();
    let args = at(coord_container(&objects["DaemonSet"]), &["args"]);
    assert_eq!(
        serde_norway::to_string(args).expect("yaml").trim(),
        "- run\n- /etc/coord/agent.toml"
    );

    let compose = &yaml_documents("deploy/compose.yaml")[0];
    for agent in ["agent-a", "agent-b"] {
        let command = at(compose, &["services", agent, "command"]);
        assert_eq!(
            serde_norway::to_string(command).expect("yaml").trim(),
            format!("- run\n- /etc/coord/{agent}.toml")
        );
    }
}

#[test]
fn the_dockerfile_builds_coord_locked_in_one_stage_and_runs_it_unprivileged_in_another() {
    let dockerfile = read("deploy/container/Dockerfile");
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms[0].starts_with("FROM rust:") && froms[0].ends_with(" AS build"));
    // etcd-client's build needs protoc and the well-known .proto files.
    assert!(dockerfile.contains("protobuf-compiler libprotobuf-dev"));
    assert!(dockerfile.contains("cargo build --profile dist --locked --bin coord"));
    assert!(dockerfile.contains("COPY --from=build "));
    let user = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .expect("a USER");
    assert!(
        !user.starts_with("0") && !user.starts_with("root"),
        "USER {user}"
    );
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/usr/bin/tini", "--", "coord"]"#));

    let ignored: Vec<String> = std::fs::read_to_string(repo_root().join(".dockerignore"))
        .expect(".dockerignore at the repository root")
        .lines()
        .map(|l| l.trim().trim_end_matches('/').to_owned())
        .collect();
    for needed in ["target", "plugins/target", ".git", ".coord-dev"] {
        assert!(
            ignored.iter().any(|l| l == needed),
            ".dockerignore lacks {needed}"
        );
    }
}

#[test]
fn every_yaml_document_in_deploy_parses() {
    let mut files: Vec<String> = kubernetes_files()
        .into_iter()
        .map(|f| format!("deploy/kubernetes/{f}"))
        .collect();
    files.push("deploy/compose.yaml".to_owned());
    for file in files {
        assert!(!yaml_documents(&file).is_empty(), "{file} has no documents");
    }
}

#[test]
fn the_kubernetes_objects_are_named_and_refer_to_each_other() {
    let objects = kubernetes_objects();
    assert_eq!(
        objects.keys().map(String::as_str).collect::<Vec<_>>(),
        ["ConfigMap", "DaemonSet", "ServiceAccount"]
    );
    for (kind, object) in &objects {
        assert!(!str_at(object, &["apiVersion"]).is_empty(), "{kind}");
        assert!(!str_at(object, &["metadata", "name"]).is_empty(), "{kind}");
    }
    assert_eq!(str_at(&objects["DaemonSet"], &["apiVersion"]), "apps/v1");

    let ds = &objects["DaemonSet"];
    let pod = at(ds, &["spec", "template", "spec"]);
    assert_eq!(
        str_at(pod, &["serviceAccountName"]),
        str_at(&objects["ServiceAccount"], &["metadata", "name"])
    );
    let selector = at(ds, &["spec", "selector", "matchLabels"]);
    let labels = at(ds, &["spec", "template", "metadata", "labels"]);
    assert_eq!(selector, labels, "the selector must match the pod's labels");

    // The manifest comes from the ConfigMap, mounted where `coord run` reads it.
    let volumes = at(pod, &["volumes"]).as_sequence().expect("volumes");
    let manifest_volume = volumes
        .iter()
        .find(|v| v.get("configMap").is_some())
        .expect("a ConfigMap volume");
    assert_eq!(
        str_at(manifest_volume, &["configMap", "name"]),
        str_at(&objects["ConfigMap"], &["metadata", "name"])
    );
    let container = coord_container(ds);
    let mounts = at(container, &["volumeMounts"])
        .as_sequence()
        .expect("mounts");
    let manifest_mount = mounts
        .iter()
        .find(|m| m.get("name") == manifest_volume.get("name"))
        .expect("the ConfigMap mounted");
    assert_eq!(str_at(manifest_mount, &["mountPath"]), "/etc/coord");
    assert!(
        manifest_mount.get("subPath").is_none(),
        "a subPath mount never sees ConfigMap updates"
    );

    // The agent is named after the node.
    let env = at(container, &["env"]).as_sequence().expect("env");
    let name = env
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some("COORD_AGENT_NAME"))
        .expect("COORD_AGENT_NAME in the container's env");
    assert_eq!(
        str_at(name, &["valueFrom", "fieldRef", "fieldPath"]),
        "spec.nodeName"
    );
    let manifest: toml::Table = configmap_manifest(&objects).parse().expect("toml");
    assert!(
        manifest["agent"].get("name").is_none(),
        "a name in the shared manifest would give every node the same one"
    );

    assert_eq!(
        at(pod, &["securityContext", "runAsNonRoot"]).as_bool(),
        Some(true)
    );
    assert_eq!(
        at(container, &["securityContext", "readOnlyRootFilesystem"]).as_bool(),
        Some(true)
    );
}

#[test]
fn kustomization_lists_every_kubernetes_file() {
    let k = &yaml_documents("deploy/kubernetes/kustomization.yaml")[0];
    assert_eq!(str_at(k, &["kind"]), "Kustomization");
    let mut listed: Vec<&str> = at(k, &["resources"])
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("a file name"))
        .collect();
    listed.sort_unstable();
    let files: Vec<String> = kubernetes_files()
        .into_iter()
        .filter(|f| f != "kustomization.yaml")
        .collect();
    assert_eq!(listed, files);
}

#[test]
fn the_daemonset_probes_health_on_the_port_the_configmap_manifest_listens_on() {
    let objects = kubernetes_objects();
    let manifest: toml::Table = configmap_manifest(&objects).parse().expect("toml");
    let status = manifest["status"].as_table().expect("[status]");
    let listen = status["listen"].as_str().expect("listen");
    let port: i64 = listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("listen = host:port");
    assert_eq!(
        status
            .get("allow_non_loopback")
            .and_then(toml::Value::as_bool),
        Some(true),
        "the kubelet probes the pod's IP: {listen} needs the explicit opt-in"
    );

    let container = coord_container(&objects["DaemonSet"]);
    let ports = at(container, &["ports"]).as_sequence().expect("ports");
    let resolve = |port: &Value| -> i64 {
        match port.as_str() {
            Some(name) => ports
                .iter()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
                .and_then(|p| p.get("containerPort"))
                .and_then(Value::as_i64)
                .unwrap_or_else(|| panic!("no container port named {name}")),
            None => port.as_i64().expect("a port number or name"),
        }
    };
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = at(container, &[probe, "httpGet"]);
        assert_eq!(str_at(get, &["path"]), "/health", "{probe}");
        assert_eq!(resolve(at(get, &["port"])), port, "{probe}");
    }
    let annotations = at(
        &objects["DaemonSet"],
        &["spec", "template", "metadata", "annotations"],
    );
    assert_eq!(
        str_at(annotations, &["prometheus.io/port"]),
        port.to_string()
    );
    assert_eq!(str_at(annotations, &["prometheus.io/path"]), "/metrics");
}

#[test]
fn the_configmap_manifest_passes_coord_check_with_the_node_as_agent_name() {
    let objects = kubernetes_objects();
    let (ok, out, err) = coord_check(
        &configmap_manifest(&objects),
        &[("COORD_AGENT_NAME", "node-7")],
    );
    assert!(ok, "coord check refused the ConfigMap's agent.toml:\n{err}");
    assert!(out.contains("agent  node-7 "), "{out}");
}

#[test]
fn without_a_name_in_the_manifest_the_agent_takes_coord_agent_name() {
    let text = "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n";
    let (ok, out, err) = coord_check(text, &[("COORD_AGENT_NAME", "node-7")]);
    assert!(ok, "{err}");
    assert!(out.contains("agent  node-7 "), "{out}");

    let named = format!("[agent]\nname = \"web-01\"\n{text}");
    let (ok, out, err) = coord_check(&named, &[("COORD_AGENT_NAME", "node-7")]);
    assert!(ok, "{err}");
    assert!(
        out.contains("agent  web-01 "),
        "the manifest's name wins: {out}"
    );

    let (ok, _, err) = coord_check(text, &[("COORD_AGENT_NAME", "a/b")]);
    assert!(!ok, "a name with `/` was accepted");
    assert!(err.contains("$COORD_AGENT_NAME"), "{err}");
}

#[test]
fn the_compose_file_runs_one_three_member_etcd_cluster_that_every_agent_reaches() {
    let compose = &yaml_documents("deploy/compose.yaml")[0];
    let members = ["etcd-1", "etcd-2", "etcd-3"];
    let expected_cluster = members
        .iter()
        .map(|m| format!("{m}=http://{m}:2380"))
        .collect::<Vec<_>>()
        .join(",");
    for member in members {
        let service = at(compose, &["services", member]);
        let image = str_at(service, &["image"]);
        assert!(
            image.starts_with("quay.io/coreos/etcd:v3.5."),
            "{member}: {image} is not a pinned etcd v3.5.x"
        );
        let flags: Vec<&str> = at(service, &["command"])
            .as_sequence()
            .expect("command")
            .iter()
            .map(|f| f.as_str().expect("a string"))
            .collect();
        for flag in [
            format!("--name={member}"),
            format!("--initial-cluster={expected_cluster}"),
            format!("--advertise-client-urls=http://{member}:2379"),
            format!("--initial-advertise-peer-urls=http://{member}:2380"),
            "--initial-cluster-state=new".to_owned(),
        ] {
            assert!(flags.contains(&flag.as_str()), "{member} lacks {flag}");
        }
    }
    for agent in ["agent-a", "agent-b"] {
        let service = at(compose, &["services", agent]);
        assert_eq!(
            str_at(service, &["build", "dockerfile"]),
            "deploy/container/Dockerfile"
        );
        let manifest = deploy(&format!("deploy/compose/{agent}.toml"));
        let manifest: toml::Table = std::fs::read_to_string(&manifest)
            .expect("the agent's manifest")
            .parse()
            .expect("toml");
        let endpoints: Vec<&str> = manifest["etcd"]["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .map(|e| e.as_str().expect("a string"))
            .collect();
        let all: Vec<String> = members.iter().map(|m| format!("http://{m}:2379")).collect();
        assert_eq!(
            endpoints, all,
            "{agent} must know every member to fail over"
        );
    }
}

#[test]
fn the_compose_agents_manifests_pass_coord_check() {
    let compose = &yaml_documents("deploy/compose.yaml")[0];
    for agent in ["agent-a", "agent-b"] {
        let volume = str_at(compose, &["services", agent, "volumes", "0"]);
        assert_eq!(volume, "./compose:/etc/coord:ro", "{agent}");
        let path = deploy(&format!("deploy/compose/{agent}.toml"));
        let (ok, out, err) = coord_check_file(&path, &[]);
        assert!(ok, "{agent}: {err}");
        assert!(out.contains(&format!("agent  {agent} ")), "{out}");
        assert!(
            out.lines()
                .any(|l| l.contains("singleton") && l.contains("leader")),
            "{agent} has no leader task: {out}"
        );
        let manifest: toml::Table = std::fs::read_to_string(&path)
            .expect("read")
            .parse()
            .expect("toml");
        assert!(manifest.contains_key("file"), "{agent} renders no file");
    }
}
