//! Agents pointed at `etcd grpc-proxy` (README, "Past one cluster's watch
//! capacity"): the proxy closes the connection of a client that sends
//! HTTP/2 pings more often than every 5 minutes ("too many pings"), so
//! an agent behind it needs `[etcd] ping_interval` above that, and then
//! stays connected and follows changes.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{CoordProcess, etcd, eventually, file_is, manifest};

/// `etcd grpc-proxy start` in front of `member`, killed on drop.
struct GrpcProxy {
    child: std::process::Child,
    endpoint: String,
}

impl GrpcProxy {
    fn start(member: &str, dir: &std::path::Path) -> GrpcProxy {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let etcd = coord::etcd::local::etcd_binary()
            .expect("etcd is not installed: bash deploy/install-deps.sh --tests");
        let child = Command::new(etcd)
            .args(["grpc-proxy", "start"])
            .arg(format!("--endpoints={}", member.trim_start_matches("http://")))
            .arg(format!("--listen-addr=127.0.0.1:{port}"))
            .arg(format!("--data-dir={}", dir.join("proxy").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd grpc-proxy");
        GrpcProxy {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for GrpcProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn an_agent_behind_grpc_proxy_with_a_ping_interval_it_accepts_stays_connected() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let dir = tempfile::tempdir().expect("tmp");
    let proxy = GrpcProxy::start(&etcd.endpoint(), dir.path());
    client.put("/px/a", "one", None).await.expect("put");
    let out = dir.path().join("out.txt");
    let text = manifest("behind-proxy", std::slice::from_ref(&proxy.endpoint), 3).replace(
        "[etcd]\n",
        "[etcd]\nping_interval = \"6m\"\n",
    ) + &format!(
        "\n[[file]]\npath = \"{}\"\nsource = \"{{{{ key('/px/a') }}}}\"\n",
        out.display()
    );
    assert!(text.contains("ping_interval"), "{text}");
    let mut agent = CoordProcess::run(&text);
    file_is(&out, "one").await;
    // Past the proxy's three strikes of pings every 10 s (the default).
    tokio::time::sleep(Duration::from_secs(40)).await;
    client.put("/px/a", "two", None).await.expect("put");
    file_is(&out, "two").await;
    assert!(agent.is_running(), "{}", agent.log());
    let log = agent.log();
    for trouble in ["unreachable", "did not answer", "Session lost", "lease"] {
        assert!(
            !log.contains(trouble),
            "the agent lost its connection through the proxy ({trouble}):\n{log}"
        );
    }
    eventually("", || async { Some(()) }).await;
}
