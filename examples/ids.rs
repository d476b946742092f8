//! Instance ids: small unique integers from a pool, held on the session
//! lease (a snowflake worker id, a shard number).
//!
//! ```console
//! $ COORD_ENDPOINTS=http://127.0.0.1:2379 cargo run --example ids
//! ```

use coord::ids::IdError;
use coord::{Coord, Options};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let coord = Coord::connect(Options::from_env()).await?;
    let workers = coord.ids("worker", 2);

    let first = workers.claim().await?;
    println!(
        "claimed worker id {} (generation {})",
        first.id(),
        first.generation()
    );
    let second = workers.claim().await?;
    println!("claimed worker id {}", second.id());
    match workers.claim().await {
        Err(IdError::Exhausted { size, .. }) => println!("the pool of {size} is full"),
        other => println!("unexpected: {other:?}"),
    }
    let claimed: Vec<u32> = workers
        .list()
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    println!("claimed ids: {claimed:?}");

    let freed = first.id();
    first.release().await?;
    let again = workers.claim_preferring(Some(freed)).await?;
    println!("released {freed} and claimed it again: {}", again.id());

    // What this process holds goes with its lease: close revokes it.
    coord.close().await;
    println!("closed: every id released");
    drop((second, again));
    Ok(())
}
