//! Which endpoints answer, said once per change.
//!
//! While etcd is down every retrying loop of the agent (session grant,
//! watches, presence, services, ids, tasks) fails at once, and each used to
//! log its own WARN at every attempt: seven long lines every few seconds,
//! none saying which endpoint. The client notes each endpoint's outcome
//! here instead, and this logs one line when an endpoint stops answering,
//! a reminder every [`REMINDER`] while it stays so, and one line when it
//! answers again; the loops log an unreachable etcd at DEBUG.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

/// How often an endpoint that stays unreachable is mentioned again.
pub const REMINDER: Duration = Duration::from_secs(60);

/// What is known of one endpoint.
#[derive(Debug, Default)]
pub(super) struct Reachability(Mutex<Seen>);

#[derive(Debug, Default)]
enum Seen {
    /// Not asked yet.
    #[default]
    Unknown,
    Answering,
    Unreachable {
        since: Instant,
        said: Instant,
        /// The latest failure.
        last: Instant,
        failures: u64,
        cause: String,
    },
}

/// One endpoint as last seen, for whoever must tell a person about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointState {
    /// The endpoint's URL.
    pub url: String,
    /// `None` until the endpoint has been asked something.
    pub answering: Option<bool>,
    /// Why it did not answer, when it did not.
    pub cause: Option<String>,
}

/// What a note about an endpoint made the client say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Said {
    /// Nothing: no change, and no reminder due.
    Nothing,
    /// WARN: the endpoint stopped answering.
    Unreachable,
    /// WARN: a reminder that it still does not answer.
    StillUnreachable,
    /// INFO: it answers again.
    AnswersAgain,
}

impl Reachability {
    /// The endpoint answered.
    pub(super) fn answered(&self, url: &str) -> Said {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Seen::Unreachable {
            since, failures, ..
        } = &*seen
        {
            info!(
                endpoint = %url,
                down_for = %humantime::format_duration(round(since.elapsed())),
                failures,
                "etcd endpoint answers again."
            );
            *seen = Seen::Answering;
            return Said::AnswersAgain;
        }
        *seen = Seen::Answering;
        Said::Nothing
    }

    /// The endpoint could not be reached, because of `cause`.
    pub(super) fn failed(&self, url: &str, cause: String) -> Said {
        self.failed_at(url, cause, Instant::now())
    }

    /// [`Reachability::failed`] at `now` (tests pass their own time).
    fn failed_at(&self, url: &str, cause: String, now: Instant) -> Said {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *seen {
            Seen::Unreachable {
                since,
                said,
                last: latest,
                failures,
                cause: last,
            } => {
                *failures += 1;
                *latest = now;
                let due = now.duration_since(*said) >= REMINDER;
                if due {
                    warn!(
                        endpoint = %url,
                        error = %cause,
                        down_for = %humantime::format_duration(round(since.elapsed())),
                        failures = *failures,
                        "etcd endpoint still unreachable; retrying."
                    );
                    *said = now;
                }
                *last = cause;
                if due {
                    Said::StillUnreachable
                } else {
                    Said::Nothing
                }
            }
            _ => {
                warn!(endpoint = %url, error = %cause, "etcd endpoint unreachable; retrying.");
                *seen = Seen::Unreachable {
                    since: now,
                    said: now,
                    last: now,
                    failures: 1,
                    cause,
                };
                Said::Unreachable
            }
        }
    }

    /// The endpoint gave no answer, not even a refusal, within `waited`.
    /// An endpoint already known unreachable keeps its more telling cause
    /// (`Connection refused`): a dial that was still retrying when the
    /// request's time ran out says nothing new about it.
    pub(super) fn no_answer(&self, url: &str, waited: Duration) -> Said {
        let cause = {
            let seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
            match &*seen {
                Seen::Unreachable { cause, .. } => cause.clone(),
                _ => format!(
                    "no answer within {}",
                    humantime::format_duration(round_ms(waited))
                ),
            }
        };
        self.failed(url, cause)
    }

    /// Whether the endpoint failed a request within `window`: requests
    /// then try the others first, so a member that takes requests and
    /// answers none (paused, hung) does not eat half of each one's time.
    pub(super) fn failed_within(&self, window: Duration) -> bool {
        let seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        matches!(&*seen, Seen::Unreachable { last, .. } if last.elapsed() < window)
    }

    pub(super) fn state(&self, url: &str) -> EndpointState {
        let seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (answering, cause) = match &*seen {
            Seen::Unknown => (None, None),
            Seen::Answering => (Some(true), None),
            Seen::Unreachable { cause, .. } => (Some(false), Some(cause.clone())),
        };
        EndpointState {
            url: url.to_owned(),
            answering,
            cause,
        }
    }
}

/// Whole seconds: a log line does not need the nanoseconds.
fn round(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// Whole milliseconds, for a wait that may be a fraction of a second.
fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis().try_into().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "http://127.0.0.1:1";

    fn refused() -> String {
        "Connection refused (os error 111)".to_owned()
    }

    /// Failures every second for three minutes: one line when it stops
    /// answering, one reminder a minute, one line when it answers again.
    #[test]
    fn an_outage_is_said_once_then_reminded_every_minute_then_its_end_once() {
        let r = Reachability::default();
        let start = Instant::now();
        let mut said = Vec::new();
        for second in 0..180 {
            let s = r.failed_at(URL, refused(), start + Duration::from_secs(second));
            if s != Said::Nothing {
                said.push(s);
            }
        }
        assert_eq!(
            said,
            [
                Said::Unreachable,
                Said::StillUnreachable,
                Said::StillUnreachable
            ]
        );
        assert_eq!(r.answered(URL), Said::AnswersAgain);
        assert_eq!(r.answered(URL), Said::Nothing);
        // A new outage is a new change: said again at once.
        assert_eq!(r.failed(URL, refused()), Said::Unreachable);
    }

    #[test]
    fn a_timeout_keeps_the_cause_already_known() {
        let r = Reachability::default();
        assert_eq!(
            r.no_answer(URL, Duration::from_millis(2500)),
            Said::Unreachable
        );
        assert_eq!(
            r.state(URL).cause.as_deref(),
            Some("no answer within 2s 500ms")
        );
        let r = Reachability::default();
        r.failed(URL, refused());
        r.no_answer(URL, Duration::from_secs(5));
        assert_eq!(r.state(URL).cause, Some(refused()));
        assert_eq!(r.state(URL).answering, Some(false));
    }
}
