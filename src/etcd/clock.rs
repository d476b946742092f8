//! Deadlines on `CLOCK_BOOTTIME`.
//!
//! A lease keeps expiring on the server while this host is suspended, but
//! `CLOCK_MONOTONIC` — what tokio's and std's `Instant` count — stops
//! then: a deadline kept on it would be seen passed only long after the
//! resume, while the lock is already someone else's. `CLOCK_BOOTTIME` counts
//! suspend, and is one clock for every process of the host, so a deadline
//! can be handed to another process (the supervisor) as a plain number.
//!
//! [`Clock`] is where "now" comes from; [`Clock::with_suspender`] makes one
//! that tests can move forward as a suspend would (time jumps, no code
//! runs in between), to show that a deadline is seen passed at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

/// A point on `CLOCK_BOOTTIME`: nanoseconds since boot, suspend included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootInstant(u64);

impl BootInstant {
    /// The instant `ns` nanoseconds after boot.
    pub fn from_nanos(ns: u64) -> BootInstant {
        BootInstant(ns)
    }

    /// Nanoseconds since boot.
    pub fn as_nanos(self) -> u64 {
        self.0
    }

    /// How long after `earlier` this is (zero if it is not after it).
    pub fn saturating_duration_since(self, earlier: BootInstant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// This instant moved back by `d` (not before boot).
    pub fn saturating_sub(self, d: Duration) -> BootInstant {
        BootInstant(self.0.saturating_sub(d.as_nanos() as u64))
    }
}

impl std::ops::Add<Duration> for BootInstant {
    type Output = BootInstant;

    fn add(self, d: Duration) -> BootInstant {
        BootInstant(self.0.saturating_add(d.as_nanos() as u64))
    }
}

/// `CLOCK_BOOTTIME` now, as the kernel tells it.
fn kernel_now() -> BootInstant {
    // Every Linux since 2.6.39 has it; else the clock that stops in
    // suspend rather than nothing.
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .or_else(|_| clock_gettime(ClockId::CLOCK_MONOTONIC))
        .map_or(BootInstant(0), |t| {
            BootInstant(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        })
}

/// Where "now" comes from: the kernel's `CLOCK_BOOTTIME`, possibly moved
/// forward by a [`Suspender`]. Cheap to clone; clones share the shift.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    shift: Option<Arc<Shift>>,
}

#[derive(Debug, Default)]
struct Shift {
    ahead_ns: AtomicU64,
    moved: tokio::sync::Notify,
}

/// Moves a [`Clock`] forward as a suspend of the host would.
#[derive(Debug, Clone)]
pub struct Suspender(Arc<Shift>);

impl Suspender {
    /// The host "sleeps" for `d`: the clock jumps by `d`, and sleepers on
    /// it wake to find their deadlines passed.
    pub fn suspend_for(&self, d: Duration) {
        self.0
            .ahead_ns
            .fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
        self.0.moved.notify_waiters();
    }
}

impl Clock {
    /// The kernel's `CLOCK_BOOTTIME`.
    pub fn system() -> Clock {
        Clock { shift: None }
    }

    /// A clock that follows `CLOCK_BOOTTIME` plus whatever the returned
    /// [`Suspender`] adds: what tests use to suspend a host.
    pub fn with_suspender() -> (Clock, Suspender) {
        let shift = Arc::new(Shift::default());
        (
            Clock {
                shift: Some(shift.clone()),
            },
            Suspender(shift),
        )
    }

    /// Now.
    pub fn now(&self) -> BootInstant {
        let ahead = self
            .shift
            .as_ref()
            .map_or(0, |s| s.ahead_ns.load(Ordering::SeqCst));
        BootInstant(kernel_now().0 + ahead)
    }

    /// Sleeps until `deadline` on this clock: right after a resume if the
    /// deadline passed during a suspend.
    pub async fn sleep_until(&self, deadline: BootInstant) {
        match &self.shift {
            None => kernel_sleep_until(deadline).await,
            Some(shift) => loop {
                let moved = shift.moved.notified();
                tokio::pin!(moved);
                moved.as_mut().enable();
                let left = deadline.saturating_duration_since(self.now());
                if left.is_zero() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(left) => {}
                    _ = moved => {}
                }
            },
        }
    }
}

/// Longest step of a sleep on the kernel's clock: tokio's timers count
/// `CLOCK_MONOTONIC`, which stops in suspend, so a sleep is cut into steps
/// that each look at the boot clock — a deadline that passed during a
/// suspend is seen at most this long after the resume. (The supervisor,
/// which stops a guarded command, looks every 50 ms.)
const STEP: Duration = Duration::from_secs(1);

async fn kernel_sleep_until(deadline: BootInstant) {
    loop {
        let left = deadline.saturating_duration_since(kernel_now());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(STEP)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_suspend_wakes_a_sleeper_whose_deadline_it_passed() {
        let (clock, suspender) = Clock::with_suspender();
        let deadline = clock.now() + Duration::from_secs(3600);
        let sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep_until(deadline).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!sleeper.is_finished(), "an hour is not up yet");
        suspender.suspend_for(Duration::from_secs(3600));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("woken right after the resume")
            .expect("join");
        assert!(clock.now() >= deadline);
    }

    #[tokio::test]
    async fn the_kernel_clock_sleeps_until_its_deadline() {
        let clock = Clock::system();
        let start = clock.now();
        clock.sleep_until(start + Duration::from_millis(30)).await;
        assert!(clock.now().saturating_duration_since(start) >= Duration::from_millis(30));
    }
}
