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
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// etcd did not answer within the request timeout.
    #[error("etcd did not answer `{op}` within {}", humantime::format_duration(*timeout))]
    Timeout { op: &'static str, timeout: Duration },
    /// etcd answered with an error, or could not be reached.
    #[error("etcd request `{op}` failed: {source}")]
    Request {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    /// etcd's auth refused a read: the user's role may not read this.
    #[error(
        "etcd refused to let this user read {range}: permission denied (grant the user's role read access to it)"
    )]
    Denied { range: String },
    /// The requested revision has been compacted away.
    #[error("revision {requested} of `{key}` is compacted (oldest kept: {compacted})")]
    Compacted {
        key: String,
        requested: i64,
        compacted: i64,
    },
    /// The session was closed (or its handle dropped): nothing more can
    /// be held on its lease.
    #[error("the session is closed: nothing more can be held on its lease")]
    SessionClosed,
}
