//! Agents pointed at `etcd grpc-proxy`, as the README says to when a
//! cluster's watchers or keepalives are too many: an agent listing two
//! proxies holds one session, stays connected and follows changes.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{CoordProcess, etcd, file_is, manifest};

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
            .arg(format!(
                "--endpoints={}",
                member.trim_start_matches("http://")
            ))
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
async fn an_agent_listing_two_grpc_proxies_holds_one_session_and_follows_changes() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let dir = tempfile::tempdir().expect("tmp");
    // Two proxies, as a fleet would list them: the agent's connection to
    // the one it is not using is idle, and pings there count against it.
    let proxy = GrpcProxy::start(&etcd.endpoint(), &dir.path().join("1"));
    let other = GrpcProxy::start(&etcd.endpoint(), &dir.path().join("2"));
    client.put("/px/a", "one", None).await.expect("put");
    let out = dir.path().join("out.txt");
    let text = manifest(
        "behind-proxy",
        &[proxy.endpoint.clone(), other.endpoint.clone()],
        60,
    ) + &format!(
        "\n[[file]]\npath = \"{}\"\nsource = \"{{{{ key('/px/a') }}}}\"\n",
        out.display()
    );
    let mut agent = CoordProcess::run(&text);
    file_is(&out, "one").await;
    // Several rounds of HTTP/2 pings (every 10 s) and lease keepalives.
    tokio::time::sleep(Duration::from_secs(25)).await;
    client.put("/px/a", "two", None).await.expect("put");
    file_is(&out, "two").await;
    assert!(agent.is_running(), "{}", agent.log());
    let log = agent.log();
    assert!(
        !log.contains("WARN") && log.matches("Session lease granted").count() == 1,
        "the agent lost its connection through the proxy:\n{log}"
    );
}
