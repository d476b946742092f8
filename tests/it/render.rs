//! What a render reads and what it refuses: the template functions behave
//! the same whatever the data, and the emptied-prefix guard holds across
//! restarts.

use std::path::Path;

use crate::support::{CoordProcess, LocalEtcd, etcd, file_is, log_says};

fn manifest(etcd: &LocalEtcd, state: &Path, rest: &str) -> String {
    format!(
        "[agent]\nname = \"render\"\nttl = \"5s\"\nstate_dir = \"{}\"\n[etcd]\nendpoints = [\"{}\"]\nrequest_timeout = \"2s\"\n{rest}",
        state.display(),
        etcd.endpoint()
    )
}

/// Invariant: a prefix that had keys and is empty when the agent starts
/// again does not blank the file (the guard is kept in `state_dir`).
#[tokio::test]
async fn a_restart_while_a_prefix_is_empty_keeps_the_file() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    client.put("/app/env/A", "1", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state");
    let out = dir.path().join("app.env");
    let text = manifest(
        &etcd,
        &state,
        &format!(
            "[[file]]\npath = \"{}\"\nprefix = \"/app/env/\"\nformat = \"env\"\n",
            out.display()
        ),
    );
    let mut agent = CoordProcess::run(&text);
    file_is(&out, "A='1'\n").await;
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    agent.wait().await;
    client.delete_prefix("/app/env/").await.expect("delete");
    let agent = CoordProcess::run(&text);
    log_says(&agent, "had keys and is now empty").await;
    assert_eq!(std::fs::read_to_string(&out).expect("file"), "A='1'\n");
    // The guard lets go once the prefix has keys again.
    client.put("/app/env/B", "2", None).await.expect("put");
    file_is(&out, "B='2'\n").await;
}

/// The README's nginx example: `service("api", zone="eu-1")` renders an
/// empty upstream while no instance is listed, then the instances.
#[tokio::test]
async fn a_service_filter_renders_with_no_instance_listed_and_then_with_one() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("upstream.conf");
    let _agent = CoordProcess::run(&manifest(
        &etcd,
        &dir.path().join("state"),
        &format!(
            "[[file]]\npath = \"{}\"\nsource = \"{{% for i in service('api', zone='eu-1') %}}server {{{{ i.address }}}};{{% endfor %}}.\"\n",
            out.display()
        ),
    ));
    file_is(&out, ".").await;
    let dir2 = tempfile::tempdir().expect("tmp");
    let _api = CoordProcess::run(&format!(
        "[agent]\nname = \"api-host\"\nttl = \"5s\"\nstate_dir = \"{}\"\n[etcd]\nendpoints = [\"{}\"]\n\
         [[service]]\nname = \"api\"\nid = \"api-1\"\naddress = \"10.0.0.1:80\"\nmetadata = {{ zone = \"eu-1\" }}\n\
         [[service]]\nname = \"api\"\nid = \"api-2\"\naddress = \"10.0.0.2:80\"\nmetadata = {{ zone = \"us-1\" }}\n",
        dir2.path().join("state").display(),
        etcd.endpoint()
    ));
    file_is(&out, "server 10.0.0.1:80;.").await;
}

/// A misspelt function is named with what it was probably meant to be.
#[tokio::test]
async fn a_misspelt_template_function_gets_a_did_you_mean() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("out");
    let agent = CoordProcess::run(&manifest(
        &etcd,
        &dir.path().join("state"),
        &format!(
            "[[file]]\npath = \"{}\"\nsource = \"{{{{ key_ro('/app/x', 'd') }}}}\"\n",
            out.display()
        ),
    ));
    let log = log_says(&agent, "Render failed").await;
    assert!(
        log.contains("did you mean `key_or`?"),
        "the error suggests key_or:\n{log}"
    );
}
