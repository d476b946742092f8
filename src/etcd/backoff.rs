use std::time::Duration;

/// Retry pacing: a doubling delay with a cap, reset after a success.
///
/// Full jitter would matter for thousands of clients retrying in step; one
/// agent's handful of retries only needs to stay gentle on a struggling
/// cluster.
///
/// ```
/// use std::time::Duration;
/// let mut b = coord::etcd::Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
/// assert_eq!(b.next_delay(), Duration::from_millis(100));
/// assert_eq!(b.next_delay(), Duration::from_millis(200));
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    base: Duration,
    max: Duration,
}

impl Backoff {
    /// Delays from `base`, doubling up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            next: base,
            base,
            max,
        }
    }

    /// The delay before the next attempt (and doubles the one after).
    pub fn next_delay(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    /// Back to `base`, after a success.
    pub fn reset(&mut self) {
        self.next = self.base;
    }
}
