//! Instance-id claims, measured: `cargo bench --bench ids`.
//!
//! For 1, 64 and 256 concurrent claimers (each with its own session) and
//! pools of 256 and 1,024 ids: claim latency (median, p99) and round trips
//! per claim.

use std::time::{Duration, Instant};

use coord::etcd::Session;
use coord::ids::{self, ClaimRecord};

mod common;
use common::{ms, percentile, with_etcd};

fn main() {
    with_etcd("instance ids", |etcd| async move {
        let client = etcd.client().await;
        println!("\nClaims: each claimer has its own session; all start together");
        println!(
            "{:>9} {:>6} {:>12} {:>12} {:>12} {:>14}",
            "claimers", "pool", "median", "p99", "all done", "round trips"
        );
        for size in [256u32, 1024] {
            for claimers in [1usize, 64, 256] {
                let pool = format!("p{size}-{claimers}");
                let mut sessions = Vec::new();
                for _ in 0..claimers {
                    let s = Session::start(client.clone(), Duration::from_secs(30));
                    let lease = s.wait_alive().await;
                    sessions.push((s, lease));
                }
                let started = Instant::now();
                let mut tasks = Vec::new();
                for (i, (_, lease)) in sessions.iter().enumerate() {
                    let (client, pool, lease) = (client.clone(), pool.clone(), *lease);
                    tasks.push(tokio::spawn(async move {
                        let me = ClaimRecord {
                            agent: format!("c{i}"),
                            claimed_at: String::new(),
                        };
                        let t = Instant::now();
                        let c = ids::claim(&client, "/coord", &pool, size, lease, None, &me)
                            .await
                            .expect("claim");
                        (t.elapsed(), c.round_trips)
                    }));
                }
                let mut latencies = Vec::new();
                let mut trips = 0u32;
                for t in tasks {
                    let (d, r) = t.await.expect("claimer");
                    latencies.push(d);
                    trips += r;
                }
                let all = started.elapsed();
                println!(
                    "{claimers:>9} {size:>6} {:>12} {:>12} {:>12} {:>14.2}",
                    ms(percentile(&mut latencies, 0.5)),
                    ms(percentile(&mut latencies, 0.99)),
                    ms(all),
                    f64::from(trips) / claimers as f64
                );
                for (s, _) in sessions {
                    s.close().await;
                }
            }
        }
    });
}
