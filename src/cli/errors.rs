//! How a failed command tells a person what went wrong: each cause once,
//! and an etcd that cannot be reached said as where coord looked, where
//! that address came from and what to do — not as tonic's transport error.

use std::future::Future;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use coord::etcd::{Client, unreachable_in};

/// Where a command's etcd endpoints came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Nothing said: `http://127.0.0.1:2379`.
    Default,
    /// `COORD_ENDPOINTS`.
    Env,
    /// `--endpoints`.
    Flag,
    /// A manifest's `[etcd] endpoints`.
    Manifest(PathBuf),
}

/// The endpoints a command talks to and where they came from.
#[derive(Debug, Clone)]
pub struct Place {
    /// The endpoints, as given.
    pub endpoints: Vec<String>,
    /// Who gave them.
    pub origin: Origin,
}

/// Set once, when the connection options are resolved; read once, when an
/// error is printed. *Why a global:* an etcd error surfaces deep inside
/// whichever command ran, far from its arguments, and a run of the CLI
/// talks to one etcd.
static PLACE: OnceLock<Place> = OnceLock::new();

/// Records where this run's endpoints came from (the first call wins).
pub fn remember(place: Place) {
    let _ = PLACE.set(place);
}

/// etcd gave a one-shot command nothing to work with in the time it waits.
#[derive(Debug, thiserror::Error)]
pub enum NoAnswer {
    /// No endpoint could be reached.
    #[error("cannot reach etcd: {cause}")]
    Unreachable {
        /// What the endpoints said (or that they said nothing).
        cause: String,
    },
    /// An endpoint answers, yet `what` did not happen in time; the
    /// library's warnings above say why (auth, quota, …).
    #[error("etcd answers, but {what} within {}", humantime::format_duration(*wait))]
    Stalled {
        /// What did not happen ("no session lease was granted").
        what: &'static str,
        /// How long the command waited.
        wait: Duration,
    },
}

impl NoAnswer {
    /// Why `what` has not happened, from what `client` saw of its endpoints.
    pub fn seen_by(client: &Client, what: &'static str, wait: Duration) -> NoAnswer {
        let states = client.endpoint_states();
        if states.iter().any(|s| s.answering == Some(true)) {
            return NoAnswer::Stalled { what, wait };
        }
        let mut causes: Vec<String> = states.into_iter().filter_map(|s| s.cause).collect();
        causes.dedup();
        let cause = if causes.is_empty() {
            format!("no answer within {}", humantime::format_duration(wait))
        } else {
            causes.join("; ")
        };
        NoAnswer::Unreachable { cause }
    }

    /// Whether no endpoint could be reached (rather than etcd answering).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, NoAnswer::Unreachable { .. })
    }
}

/// How long a one-shot command waits for etcd to answer at all (its first
/// session lease) before giving up with [`NoAnswer`]: two request
/// timeouts, so a leader election or one slow member fits in it, and
/// `--request-timeout` moves it.
pub fn reach_wait(client: &Client) -> Duration {
    client.request_timeout() * 2
}

/// `fut`, or [`NoAnswer`] once `wait` has passed: what keeps a one-shot
/// command from waiting forever for an etcd that cannot be reached.
pub async fn within<T>(
    client: &Client,
    what: &'static str,
    wait: Duration,
    fut: impl Future<Output = T>,
) -> Result<T, NoAnswer> {
    tokio::time::timeout(wait, fut)
        .await
        .map_err(|_| NoAnswer::seen_by(client, what, wait))
}

/// The text after `error: ` for `e`.
pub fn describe(e: &anyhow::Error) -> String {
    match unreachable(e) {
        Some(cause) => unreachable_text(PLACE.get(), &cause),
        None => chain(e),
    }
}

/// Why etcd could not be reached, if that is what `e` comes down to.
fn unreachable(e: &anyhow::Error) -> Option<String> {
    for cause in e.chain() {
        if let Some(NoAnswer::Unreachable { cause }) = cause.downcast_ref::<NoAnswer>() {
            return Some(cause.clone());
        }
    }
    unreachable_in(e.as_ref())
}

/// The causes of `e` joined by `: `, leaving out one whose text is already
/// there (an error that prints its source, then the source itself).
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// "cannot reach etcd at X (from …): cause", and on a second line what to
/// do about it, which depends on where X came from.
fn unreachable_text(place: Option<&Place>, cause: &str) -> String {
    let Some(place) = place else {
        return format!("cannot reach etcd: {cause}");
    };
    let at = place.endpoints.join(", ");
    let (from, hint) = match &place.origin {
        Origin::Default => (
            "the default".to_owned(),
            "nothing said where etcd is, so coord tried the default: start etcd there, \
             or say where it is with --endpoints, COORD_ENDPOINTS or --manifest FILE"
                .to_owned(),
        ),
        Origin::Env => (
            "COORD_ENDPOINTS".to_owned(),
            "check the COORD_ENDPOINTS variable and that etcd runs there (--endpoints \
             overrides it)"
                .to_owned(),
        ),
        Origin::Flag => (
            "--endpoints".to_owned(),
            "check --endpoints and that etcd runs there".to_owned(),
        ),
        Origin::Manifest(path) => (
            format!("manifest {}", path.display()),
            format!(
                "check `endpoints` in the [etcd] section of {} and that etcd runs there \
                 (--endpoints or COORD_ENDPOINTS override it)",
                path.display()
            ),
        ),
    };
    let first = place.endpoints.first().map_or("", String::as_str);
    format!(
        "cannot reach etcd at {at} (from {from}): {cause}\n\
         hint: {hint}; `etcdctl --endpoints={first} endpoint health` tells whether it answers"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer failed: {source}")]
    struct Outer {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::from_raw_os_error(13);
        let e = anyhow::Error::new(Outer { source: io }).context("cannot start the agent");
        let text = chain(&e);
        assert_eq!(
            text.matches("Permission denied").count(),
            1,
            "repeated: {text}"
        );
        assert!(text.starts_with("cannot start the agent: outer failed: "));
    }
}
