//! Agents pointed at `etcd grpc-proxy`, as the README says to when a
//! cluster's watchers or keepalives are too many: an agent listing two
//! proxies holds one session, stays connected and follows changes.

use std::process::{Command, Stdio};
use std::time::Duration;

use std::sync::Arc;

use coord::etcd::{Client, ConnectOptions, Session, SessionStats};

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

/// A peer process, killed on drop.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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

/// etcd's grpc-proxy does not pass a client's keepalive on: it answers
/// it when its own keepalive for the lease (every TTL / 3, checked on a
/// 500 ms tick) comes back, up to TTL / 3 + 0.5 s later. A session that
/// took that wait for a stopped endpoint moved its stream between the
/// proxies every few renewals — with a fleet behind them, churn that cut
/// agents off.
#[tokio::test]
async fn a_session_through_grpc_proxies_keeps_its_keepalive_stream_on_one_proxy() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let one = GrpcProxy::start(&etcd.endpoint(), &dir.path().join("1"));
    let two = GrpcProxy::start(&etcd.endpoint(), &dir.path().join("2"));
    let client = Client::connect(&ConnectOptions::new(vec![
        one.endpoint.clone(),
        two.endpoint.clone(),
    ]))
    .await
    .expect("connect");
    let stats = Arc::new(SessionStats::default());
    // A short TTL gives many renewals, and with them many chances for the
    // session's renewal times and the proxy's own to fall out of step.
    let session = Session::start_counted(client, Duration::from_secs(4), stats.clone());
    session.wait_alive().await;
    tokio::time::sleep(Duration::from_secs(24)).await;
    let (moved, lost, granted, renewals) = (
        stats.moved(),
        stats.lost(),
        stats.granted(),
        stats.renewals(),
    );
    session.close().await;
    assert!(
        renewals >= 12,
        "only {renewals} renewals in 24 s at TTL 4 s"
    );
    assert_eq!(
        (moved, lost, granted),
        (0, 0, 1),
        "(keepalive streams moved, leases lost, leases granted) through a healthy proxy"
    );
}

/// etcd's grpc-proxy numbers the watches of a stream itself, ignoring the
/// id a client asks for, and answers a create that joins a watch it
/// already has before one it must open on etcd. An agent that trusted its
/// own ids read every change under the wrong watch, and some under none:
/// through a proxy, one file in eight of a fleet never followed its keys.
#[tokio::test]
async fn an_agent_through_a_grpc_proxy_follows_every_key_of_every_file() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let dir = tempfile::tempdir().expect("tmp");
    let proxy = GrpcProxy::start(&etcd.endpoint(), &dir.path().join("1"));
    // Another client of the proxy already watches two of the keys, so
    // the agent's creates for them join those watches and are answered
    // before the ones the proxy must open on etcd.
    let _peer = KilledOnDrop(
        Command::new("etcdctl")
            .args(["watch", "--prefix", "/pw/k"])
            .arg(format!("--endpoints={}", proxy.endpoint))
            .env("ETCDCTL_API", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcdctl is not installed: bash deploy/install-deps.sh --tests"),
    );
    let keys = ["/pw/k1", "/pw/k2", "/pw/m1", "/pw/m2"];
    let mut text = manifest("through-proxy", std::slice::from_ref(&proxy.endpoint), 60);
    let mut outs = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        client.put(key, "v0", None).await.expect("put");
        let out = dir.path().join(format!("out{i}.txt"));
        text += &format!(
            "\n[[file]]\npath = \"{}\"\nsource = \"{{{{ key('{key}') }}}}\"\n",
            out.display()
        );
        outs.push(out);
    }
    text += &format!(
        "\n[[file]]\npath = \"{}\"\nsource = \"{{% for k, v in keys('/pw/') | items %}}{{{{ v }}}}{{% endfor %}}\"\n",
        dir.path().join("all.txt").display()
    );
    let mut agent = CoordProcess::run(&text);
    for out in &outs {
        file_is(out, "v0").await;
    }
    file_is(&dir.path().join("all.txt"), "v0v0v0v0").await;
    for (round, key) in keys.iter().enumerate() {
        let value = format!("v{}", round + 1);
        client.put(key, value.as_str(), None).await.expect("put");
        file_is(&outs[round], &value).await;
    }
    file_is(&dir.path().join("all.txt"), "v1v2v3v4").await;
    assert!(agent.is_running(), "{}", agent.log());
}
