//! Leader election in etcd's own layout: `etcdctl elect -l
//! /coord/elections/scheduler` follows the same election.
//!
//! ```console
//! $ COORD_ENDPOINTS=http://127.0.0.1:2379 cargo run --example election
//! ```

use std::time::Duration;

use coord::{Coord, Options};
use futures_util::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = Coord::connect(Options::from_env()).await?;
    let b = Coord::connect(Options::from_env()).await?;
    let mut leaders = Box::pin(a.elections().observe("scheduler"));

    let leading = a.elections().campaign("scheduler", "node-a").await?;
    println!(
        "node-a leads `scheduler` (key {}, token {})",
        leading.key(),
        leading.revision()
    );
    let seen = leaders.next().await.expect("a leader");
    println!("observer: leader is {}", seen.value_str());

    // node-b stands too and waits behind node-a.
    let b_elections = b.elections();
    let waiting = tokio::spawn(async move { b_elections.campaign("scheduler", "node-b").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    leading.proclaim("node-a (v2)").await?;
    let seen = leaders.next().await.expect("a proclamation");
    println!("observer: leader says {}", seen.value_str());

    leading.resign().await?;
    println!("node-a resigned");
    let b_leading = waiting.await??;
    println!("node-b leads (token {})", b_leading.revision());
    let seen = leaders.next().await.expect("the next leader");
    println!("observer: leader is {}", seen.value_str());

    b_leading.resign().await?;
    b.close().await;
    a.close().await;
    Ok(())
}
