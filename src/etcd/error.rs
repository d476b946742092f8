use std::path::PathBuf;
use std::time::Duration;

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection settings cannot work (bad URL, unreadable TLS file, …).
    #[error("invalid etcd connection settings: {0}")]
    Config(String),
    /// A TLS or credential file could not be read.
    #[error("failed to read {what} from `{path}`: {source}")]
    ReadFile {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        #[source]
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// etcd did not answer within the request timeout.
    #[error("etcd did not answer `{op}` within {}", humantime::format_duration(*timeout))]
    Timeout {
        /// The request.
        op: &'static str,
        /// The request timeout.
        timeout: Duration,
    },
    /// etcd answered with an error, or could not be reached. The message
    /// says what etcd said (or the innermost transport failure), not
    /// tonic's whole debug form; `source` keeps the rest for code that
    /// matches on it. *Why not `#[source]`:* it would print the same
    /// failure a second time, at length, after ours.
    #[error("etcd request `{op}` failed: {}", brief(source))]
    Request {
        /// The request (`get`, `lease grant`, …).
        op: &'static str,
        /// What etcd (or the transport) said.
        source: etcd_client::Error,
    },
    /// etcd's auth refused a read: the user's role may not read this.
    #[error(
        "etcd refused to let this user read {range}: permission denied (grant the user's role read access to it)"
    )]
    Denied {
        /// The range refused (a key or a prefix).
        range: String,
    },
    /// The requested revision has been compacted away.
    #[error("revision {requested} of `{key}` is compacted (oldest kept: {compacted})")]
    Compacted {
        /// The key read.
        key: String,
        /// The revision asked for.
        requested: i64,
        /// The oldest revision etcd keeps.
        compacted: i64,
    },
    /// The requested revision is newer than etcd's current one.
    #[error("revision {requested} of `{key}` is in the future (etcd is at revision {current})")]
    FutureRevision {
        /// The key read.
        key: String,
        /// The revision asked for.
        requested: i64,
        /// etcd's current revision.
        current: i64,
    },
    /// The session was closed (or its handle dropped): nothing more can
    /// be held on its lease.
    #[error("the session is closed: nothing more can be held on its lease")]
    SessionClosed,
}

impl Error {
    /// Why etcd could not be reached at all — no connection, a failed TLS
    /// handshake, no answer in time — as opposed to etcd answering with an
    /// error; `None` for every other failure. Retrying callers use it to
    /// say an outage once rather than at every attempt, and the CLI to say
    /// where the endpoints came from.
    pub fn unreachable(&self) -> Option<String> {
        match self {
            Error::Timeout { timeout, .. } => Some(format!(
                "no answer within {}",
                humantime::format_duration(*timeout)
            )),
            Error::Request { source, .. } if is_transport(source) => Some(brief(source)),
            _ => None,
        }
    }
}

/// gRPC's UNAVAILABLE: the request did not reach a member that could serve
/// it (connection refused, member without a leader), so another member may.
const GRPC_UNAVAILABLE: i32 = 14;

/// Whether another endpoint may serve what this one could not: it could
/// not be reached, or it has no leader.
pub(super) fn worth_another_endpoint(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(status) => i32::from(status.code()) == GRPC_UNAVAILABLE,
        _ => false,
    }
}

/// Whether the request never reached etcd: a transport failure, or an
/// UNAVAILABLE that tonic made from one (it carries the transport error as
/// its source; etcd's own UNAVAILABLE, such as "no leader", does not).
pub(super) fn is_transport(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            i32::from(status.code()) == GRPC_UNAVAILABLE
                && std::error::Error::source(status).is_some()
        }
        _ => false,
    }
}

/// One short line for `e`: etcd's own message for an error etcd sent, the
/// innermost cause (`Connection refused (os error 111)`) for a transport
/// failure, and etcd-client's text otherwise.
pub(super) fn brief(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::TransportError(t) => innermost(t),
        etcd_client::Error::GRpcStatus(status) => match std::error::Error::source(status) {
            Some(cause) => innermost(cause),
            None => status.message().to_owned(),
        },
        other => other.to_string(),
    }
}

/// The text of the last error in `e`'s chain of sources.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

/// [`Error::unreachable`] of the first etcd error in `e`'s chain of
/// sources (`e` itself included): whether a failure of a primitive or a
/// command came down to an etcd that could not be reached.
pub fn unreachable_in(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(cause) = e.downcast_ref::<Error>().and_then(Error::unreachable) {
            return Some(cause);
        }
        next = e.source();
    }
    None
}
