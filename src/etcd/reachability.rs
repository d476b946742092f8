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

impl Reachability {
    /// The endpoint answered.
    pub(super) fn answered(&self, url: &str) {
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
        }
        *seen = Seen::Answering;
    }

    /// The endpoint could not be reached, because of `cause`.
    pub(super) fn failed(&self, url: &str, cause: String) {
        let now = Instant::now();
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *seen {
            Seen::Unreachable {
                since,
                said,
                failures,
                cause: last,
            } => {
                *failures += 1;
                if now.duration_since(*said) >= REMINDER {
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
            }
            _ => {
                warn!(endpoint = %url, error = %cause, "etcd endpoint unreachable; retrying.");
                *seen = Seen::Unreachable {
                    since: now,
                    said: now,
                    failures: 1,
                    cause,
                };
            }
        }
    }

    /// The endpoint gave no answer, not even a refusal, within `waited`.
    /// An endpoint already known unreachable keeps its more telling cause
    /// (`Connection refused`): a dial that was still retrying when the
    /// request's time ran out says nothing new about it.
    pub(super) fn no_answer(&self, url: &str, waited: Duration) {
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
        self.failed(url, cause);
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
