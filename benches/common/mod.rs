//! What the benchmark programs share: statistics and a local etcd.

#![allow(dead_code)] // Each benchmark uses a different part.

use std::future::Future;
use std::time::Duration;

use coord::etcd::local::LocalEtcd;

/// The `p`-quantile (0.5 median, 0.99 p99) of `samples`, sorting them.
pub fn percentile<T: PartialOrd + Copy>(samples: &mut [T], p: f64) -> T {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

/// `1.234 ms`.
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// Runs `bench` on a multi-threaded runtime against a fresh local etcd,
/// after a header line naming the machine.
pub fn with_etcd<F, Fut>(title: &str, bench: F)
where
    F: FnOnce(LocalEtcd) -> Fut,
    Fut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let etcd = LocalEtcd::start().await.unwrap_or_else(|e| panic!("{e}"));
        println!(
            "coord {title} benchmark — {} cores, etcd at {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            etcd.endpoint()
        );
        bench(etcd).await;
    });
}
