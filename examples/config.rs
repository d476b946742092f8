//! The config center: typed get/set, compare-and-set, history, and a
//! typed watch.
//!
//! ```console
//! $ COORD_ENDPOINTS=http://127.0.0.1:2379 cargo run --example config
//! ```

use coord::config::Error;
use coord::{Coord, Options};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Database {
    host: String,
    port: u16,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let coord = Coord::connect(Options::from_env()).await?;
    // A scope: keys under /coord/billing/config/.
    let config = coord.scope("billing").config();

    let mut changes = Box::pin(config.watch::<Database>("db").await?);

    let db = Database {
        host: "db-1".into(),
        port: 5432,
    };
    let written = config.set("db", &db).await?;
    println!(
        "set {} = {db:?} (version {})",
        config.key("db"),
        written.version
    );
    let read: Database = config.get("db").await?;
    println!("get db = {read:?}");

    // Compare-and-set: only against the version read.
    let current = config.get_versioned::<Database>("db").await?;
    let moved = Database {
        host: "db-2".into(),
        ..current.value.clone()
    };
    config
        .compare_and_set("db", &moved, current.version)
        .await?;
    println!("compare-and-set at version {}: done", current.version);
    match config.compare_and_set("db", &db, current.version).await {
        Err(Error::VersionConflict { current, .. }) => {
            println!("a stale compare-and-set is refused (the key is at version {current})")
        }
        other => println!("unexpected: {other:?}"),
    }

    let history = config.history("db", None).await?;
    for entry in &history.entries {
        println!(
            "history: revision {} version {}: {}",
            entry.mod_revision,
            entry.version,
            entry.text()
        );
    }

    for _ in 0..2 {
        let change = changes.next().await.expect("the watch goes on")?;
        println!(
            "watch: {:?} at revision {}: {:?} -> {:?}",
            change.kind,
            change.revision,
            change.old.map(|d| d.host),
            change.new.map(|d| d.host)
        );
    }
    coord.close().await;
    Ok(())
}
