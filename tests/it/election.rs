//! Elections in etcd's own layout: coord and `etcdctl elect` (Go's
//! `concurrency.Election`) see and follow each other's leaders.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use coord::Coord;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::coordinator::options;
use crate::support::{PATIENCE, etcd};

/// An `etcdctl` child whose stdout lines arrive on a channel; killed on
/// drop.
struct Etcdctl {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Etcdctl {
    fn start(endpoint: &str, args: &[&str]) -> Etcdctl {
        let mut child = Command::new("etcdctl")
            .arg(format!("--endpoints={endpoint}"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcdctl (apt-get install etcd-client) must run");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Etcdctl { child, lines }
    }

    /// Waits for a line equal to `wanted`.
    async fn expect_line(&mut self, wanted: &str) {
        let mut seen = Vec::new();
        let found = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = self.lines.recv().await {
                if line == wanted {
                    return true;
                }
                seen.push(line);
            }
            false
        })
        .await;
        assert_eq!(
            found,
            Ok(true),
            "etcdctl never printed `{wanted}`; it printed {seen:?}"
        );
    }
}

impl Drop for Etcdctl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn an_etcdctl_observer_sees_coords_leader_and_coord_follows_an_etcdctl_leader() {
    let etcd = etcd().await;
    let ep = etcd.endpoint();
    let coord = Coord::connect(options(&etcd)).await.expect("connect");
    let elections = coord.elections();
    let mut observed = Box::pin(elections.observe("pick"));

    let leading = elections
        .campaign("pick", "coord-a")
        .await
        .expect("elected");
    assert_eq!(
        leading.key(),
        format!("/coord/elections/pick/{:x}", leading.lease().0),
        "etcd layout"
    );
    let mut observer = Etcdctl::start(&ep, &["elect", "-l", "/coord/elections/pick"]);
    observer.expect_line("coord-a").await;
    leading.proclaim("coord-a2").await.expect("proclaim");
    observer.expect_line("coord-a2").await;

    // An etcdctl candidate waits behind coord's leader, then leads.
    let _candidate = Etcdctl::start(&ep, &["elect", "/coord/elections/pick", "etcd-b"]);
    let next = async {
        loop {
            let leader = observed.next().await.expect("the stream goes on");
            if leader.value == b"etcd-b" {
                return leader;
            }
        }
    };
    // Give the candidate time to queue; then step down.
    crate::support::eventually("etcdctl to stand as a candidate", || async {
        let keys = coord
            .client()
            .keys("/coord/elections/pick/")
            .await
            .expect("keys");
        (keys.len() == 2).then_some(())
    })
    .await;
    let first_revision = leading.revision();
    leading.resign().await.expect("resign");
    let leader = tokio::time::timeout(PATIENCE, next)
        .await
        .expect("coord's observer follows the etcdctl leader");
    assert!(
        leader.revision > first_revision,
        "a new leader, a larger token"
    );
    observer.expect_line("etcd-b").await;
    let now = elections
        .leader("pick")
        .await
        .expect("leader")
        .expect("one");
    assert_eq!(now.value_str(), "etcd-b");
    // coord stands again and waits behind etcdctl's leader.
    let waiting = tokio::time::timeout(
        Duration::from_millis(500),
        elections.campaign("pick", "coord-c"),
    )
    .await;
    assert!(waiting.is_err(), "etcdctl's leader still leads");
    coord.close().await;
}
