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
    /// etcd answered with an error, or could not be reached.
    #[error("etcd request `{op}` failed: {source}")]
    Request {
        /// The request (`get`, `lease grant`, …).
        op: &'static str,
        #[source]
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
    /// The session was closed (or its handle dropped): nothing more can
    /// be held on its lease.
    #[error("the session is closed: nothing more can be held on its lease")]
    SessionClosed,
}
