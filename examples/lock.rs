//! Locks: a mutex with its fencing token, read/write locks, a timed
//! acquire that leaves nothing behind, and a write fenced by the lock.
//!
//! ```console
//! $ COORD_ENDPOINTS=http://127.0.0.1:2379 cargo run --example lock
//! ```

use std::time::Duration;

use coord::etcd::Op;
use coord::lock::{LockError, Mode};
use coord::{Coord, Options};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let coord = Coord::connect(Options::from_env()).await?;
    let locks = coord.locks();

    // A mutex, in etcd's own layout: `etcdctl lock /coord/locks/report`
    // contends for the same lock.
    let guard = locks.lock("report").await?;
    println!("holding `report` with fencing token {}", guard.token());

    // A write fenced by the lock: applied only while the guard holds it.
    let write = |value: &str| Op::Put {
        key: "/demo/report/last".into(),
        value: value.into(),
        lease: None,
    };
    let done = guard.commit(&[write("run 1")]).await?;
    println!("fenced write while holding: applied = {}", done.succeeded);
    let fence = guard.fence();
    guard.release().await?;
    let stale = coord.client().commit(&[fence], &[write("late")]).await?;
    println!(
        "fenced write after release: applied = {} (refused)",
        stale.succeeded
    );

    // Read/write: readers share, a writer waits for them.
    let other = Coord::connect(Options::from_env()).await?;
    let reader_a = locks.read("catalog").await?;
    let reader_b = other.locks().read("catalog").await?;
    println!("two readers hold `catalog` at once");
    match other
        .locks()
        .acquire_timeout("catalog", Mode::Write, Duration::from_millis(300))
        .await
    {
        Err(LockError::Timeout { .. }) => {
            let queue = locks.queue("catalog").await?;
            println!(
                "a writer gave up after 300ms; {} keys left in the queue (the readers')",
                queue.len()
            );
        }
        other => println!("unexpected: {other:?}"),
    }
    drop(reader_b); // released in the background
    reader_a.release().await?;
    let writer = other.locks().write("catalog").await?;
    println!("the writer holds `catalog` (token {})", writer.token());
    writer.release().await?;

    other.close().await;
    coord.close().await;
    Ok(())
}
