//! Retry pacing, on [`backon`]'s exponential backoff.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder, Retryable};

/// How retries are paced: the Go seeds' `RetryConfig` (`InitialInterval`,
/// `MaxInterval`, `Multiplier`, `RandomizationFactor`, `MaxRetries`).
///
/// A [`crate::Coord`] paces its own background retries with one (re-granting
/// the session lease, writing a registration again, watching a held key);
/// set it with [`crate::Options::retry`]. Those loops must not give up while
/// the handle lives, so for them `max_attempts` only ends the growth: they go
/// on at `max`. [`RetryPolicy::retry`] runs an operation of your own under
/// the policy, and there `max_attempts` is the limit.
///
/// ```
/// use std::time::Duration;
/// use coord::etcd::RetryPolicy;
///
/// let policy = RetryPolicy::new(Duration::from_millis(200), Duration::from_secs(10))
///     .multiplier(3.0)
///     .max_attempts(5);
/// let mut b = policy.backoff();
/// assert_eq!(b.next(), Some(Duration::from_millis(200)));
/// assert_eq!(b.next(), Some(Duration::from_millis(600)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// The first delay.
    pub initial: Duration,
    /// No delay is longer (before jitter).
    pub max: Duration,
    /// Each delay is the previous one times this.
    pub multiplier: f32,
    /// Adds a random part of up to the delay itself to each delay, so that
    /// many clients failing together do not retry in step.
    pub jitter: bool,
    /// How many retries at most; `None` for no limit.
    pub max_attempts: Option<usize>,
}

impl RetryPolicy {
    /// What the library's loops use unless told otherwise: 100 ms doubling
    /// to 5 s, without jitter or limit.
    pub const DEFAULT: RetryPolicy =
        RetryPolicy::new(Duration::from_millis(100), Duration::from_secs(5));

    /// Delays from `initial`, doubling up to `max`, without jitter or limit.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        RetryPolicy {
            initial,
            max,
            multiplier: 2.0,
            jitter: false,
            max_attempts: None,
        }
    }

    /// Each delay is the previous one times `multiplier` (at least 1).
    pub fn multiplier(mut self, multiplier: f32) -> Self {
        self.multiplier = multiplier.max(1.0);
        self
    }

    /// Random jitter on each delay (see [`RetryPolicy::jitter`] the field).
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// At most `attempts` retries.
    pub fn max_attempts(mut self, attempts: usize) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// The delays of one series of attempts.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            policy: *self,
            delays: self.builder().build(),
        }
    }

    /// Runs `op` until it succeeds, `retryable` says an error is final, or
    /// the attempts run out; the last error is returned. For operations
    /// that are safe to repeat (a read, a put of the same value, a
    /// compare-and-set).
    ///
    /// ```no_run
    /// # async fn f(coord: coord::Coord) -> Result<(), coord::config::Error> {
    /// use std::time::Duration;
    /// use coord::etcd::RetryPolicy;
    ///
    /// let policy = RetryPolicy::new(Duration::from_millis(200), Duration::from_secs(5)).max_attempts(5);
    /// let config = coord.config();
    /// let on: bool = policy
    ///     .retry(|| config.get("feature-x"), |e| {
    ///         matches!(e, coord::config::Error::Unavailable { .. })
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn retry<T, E, F, Fut>(
        &self,
        op: F,
        retryable: impl FnMut(&E) -> bool,
    ) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        op.retry(self.builder())
            .sleep(tokio::time::sleep)
            .when(retryable)
            .await
    }

    fn builder(&self) -> ExponentialBuilder {
        let mut builder = ExponentialBuilder::new()
            .with_min_delay(self.initial)
            .with_max_delay(self.max)
            .with_factor(self.multiplier);
        if self.jitter {
            builder = builder.with_jitter();
        }
        match self.max_attempts {
            Some(n) => builder.with_max_times(n),
            None => builder.without_max_times(),
        }
    }
}

/// The delays of one series of attempts under a [`RetryPolicy`]; back to
/// the first after a success ([`Backoff::reset`]).
///
/// ```
/// use std::time::Duration;
/// let mut b = coord::etcd::Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
/// assert_eq!(b.next_delay(), Duration::from_millis(100));
/// assert_eq!(b.next_delay(), Duration::from_millis(200));
/// ```
#[derive(Debug)]
pub struct Backoff {
    policy: RetryPolicy,
    delays: ExponentialBackoff,
}

impl Backoff {
    /// Delays from `base`, doubling up to `max`, without end.
    pub fn new(base: Duration, max: Duration) -> Self {
        RetryPolicy::new(base, max).backoff()
    }

    /// The delay before the next attempt, for a loop that never gives up:
    /// once the policy's attempts are spent it stays at `max`.
    pub fn next_delay(&mut self) -> Duration {
        self.next().unwrap_or(self.policy.max)
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.delays = self.policy.builder().build();
    }
}

/// The delays before each retry; ends when the policy's attempts are spent.
impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        // backon multiplies in f32 (200 ms becomes 200.000003 ms): whole
        // microseconds read better in logs and are as good a delay.
        self.delays
            .next()
            .map(|d| Duration::from_micros(d.as_secs_f64().mul_add(1e6, 0.5) as u64))
    }
}

impl Clone for Backoff {
    /// A fresh series under the same policy.
    fn clone(&self) -> Self {
        self.policy.backoff()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_by_the_multiplier_up_to_max_and_stop_after_max_attempts() {
        let policy = RetryPolicy::new(Duration::from_millis(100), Duration::from_millis(500))
            .multiplier(3.0)
            .max_attempts(4);
        let delays: Vec<_> = policy.backoff().collect();
        assert_eq!(
            delays,
            [100, 300, 500, 500].map(Duration::from_millis).to_vec()
        );
    }

    #[test]
    fn a_loop_that_never_gives_up_stays_at_max_after_the_attempts_and_reset_starts_over() {
        let mut b = RetryPolicy::new(Duration::from_millis(100), Duration::from_millis(400))
            .max_attempts(1)
            .backoff();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
        assert_eq!(b.next_delay(), Duration::from_millis(400));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_adds_at_most_the_delay_itself() {
        let mut b = RetryPolicy::new(Duration::from_millis(100), Duration::from_secs(1))
            .jitter(true)
            .backoff();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn retry_stops_at_max_attempts_and_returns_the_last_error() {
        let policy =
            RetryPolicy::new(Duration::from_millis(10), Duration::from_millis(10)).max_attempts(2);
        let mut calls = 0;
        let result: Result<(), u32> = policy
            .retry(
                || {
                    calls += 1;
                    let n = calls;
                    async move { Err(n) }
                },
                |_| true,
            )
            .await;
        assert_eq!(result, Err(3), "one try and two retries");
    }

    #[tokio::test]
    async fn retry_stops_at_an_error_said_to_be_final() {
        let policy = RetryPolicy::new(Duration::from_millis(1), Duration::from_millis(1));
        let mut calls = 0;
        let result: Result<(), &str> = policy
            .retry(
                || {
                    calls += 1;
                    async { Err("denied") }
                },
                |e| *e != "denied",
            )
            .await;
        assert_eq!((result, calls), (Err("denied"), 1));
    }
}
