//! The clock `every` and cron task schedules read: the wall clock, except
//! that a step back is not followed.
//!
//! Rounds are numbered by wall time (so agents agree on them) and a round
//! is claimed only if its number is above the last one recorded. Read
//! plainly, a wall clock stepped back by an hour would make every round
//! of that hour look already run: the schedule would stop for an hour.
//! So steps are measured against `CLOCK_BOOTTIME` (which steps never move)
//! between readings: a step back is added to an offset the schedule keeps
//! ahead of the wall clock, so rounds go on at their pace, numbered as if
//! there had been no step; a step forward first cancels that offset (the
//! clock put right again), and beyond it is followed — the round then due
//! runs at once, one round, never a burst. Slewing (NTP's gradual
//! correction) is within the tolerance and followed as it is.
//!
//! An offset that is never cancelled (a clock that was an hour fast, put
//! right for good) keeps this agent's schedule that far ahead until it
//! restarts.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::etcd::{BootInstant, Clock};

/// Longest a schedule sleeps without looking at the wall clock again.
const LOOK: Duration = Duration::from_secs(1);

/// Shared by every task of an agent. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ScheduleClock {
    boot: Clock,
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// The last reading: the wall clock and the boot clock.
    last: Option<(SystemTime, BootInstant)>,
    /// How far the schedule is ahead of the wall clock, from steps back.
    ahead: Duration,
}

impl Default for ScheduleClock {
    fn default() -> Self {
        ScheduleClock {
            boot: Clock::system(),
            state: Arc::default(),
        }
    }
}

impl ScheduleClock {
    /// The schedule's time now.
    pub fn now(&self) -> SystemTime {
        let wall = SystemTime::now();
        let boot = self.boot.now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((last_wall, last_boot)) = s.last {
            let elapsed = boot.saturating_duration_since(last_boot);
            // Twice NTP's largest slew (500 ppm), and a second of jitter.
            let tolerance = Duration::from_secs(1) + elapsed / 1000;
            let expected = last_wall + elapsed;
            if let Ok(back) = expected.duration_since(wall)
                && back > tolerance
            {
                s.ahead += back;
                warn!(stepped_back = %humantime::format_duration(back), schedule_ahead_by = %humantime::format_duration(s.ahead), "The wall clock stepped back; task schedules keep their pace, numbering rounds as if it had not, so none is skipped or run twice.");
            } else if let Ok(forward) = wall.duration_since(expected)
                && forward > tolerance
            {
                if s.ahead.is_zero() {
                    warn!(stepped_forward = %humantime::format_duration(forward), "The wall clock stepped forward; task schedules follow it (the round now due runs once).");
                } else {
                    s.ahead = s.ahead.saturating_sub(forward);
                    if s.ahead.is_zero() {
                        info!(stepped_forward = %humantime::format_duration(forward), "The wall clock stepped forward again; task schedules follow it as before.");
                    } else {
                        info!(stepped_forward = %humantime::format_duration(forward), schedule_ahead_by = %humantime::format_duration(s.ahead), "The wall clock stepped forward; task schedules are still ahead of it by what is left.");
                    }
                }
            }
        }
        s.last = Some((wall, boot));
        wall + s.ahead
    }

    /// Sleeps until the schedule's time reaches `at`, looking at the clock
    /// at least every second so a step is seen when it happens; `true` if
    /// `stop` came first.
    pub async fn sleep_until(&self, at: SystemTime, stop: &CancellationToken) -> bool {
        loop {
            let Ok(left) = at.duration_since(self.now()) else {
                return false;
            };
            if left.is_zero() {
                return false;
            }
            if super::sleep_or_stop(left.min(LOOK), stop).await {
                return true;
            }
        }
    }
}
