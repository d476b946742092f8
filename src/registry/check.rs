//! Health checks a registration runs itself (and the agent's services
//! reuse): HTTP and TCP probes, a check of the caller's own, and the
//! thresholds that turn results into a status.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::{Health, bounded_output};

/// What one check run found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// Passing, Warning or Critical.
    pub status: Health,
    /// What the check said, cut to [`super::OUTPUT_LIMIT`].
    pub output: String,
}

impl CheckResult {
    /// A result, its output cut to [`super::OUTPUT_LIMIT`].
    pub fn new(status: Health, output: impl Into<String>) -> Self {
        CheckResult {
            status,
            output: bounded_output(output.into()),
        }
    }
}

/// `GET url`: passing on a 2xx answer, critical otherwise.
pub async fn http(url: &str) -> CheckResult {
    let uri: hyper::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => return CheckResult::new(Health::Critical, format!("invalid URL {url}: {e}")),
    };
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    match client.get(uri).await {
        Ok(resp) if resp.status().is_success() => {
            CheckResult::new(Health::Passing, format!("HTTP {}", resp.status()))
        }
        Ok(resp) => CheckResult::new(Health::Critical, format!("HTTP {}", resp.status())),
        Err(e) => CheckResult::new(Health::Critical, format!("GET {url} failed: {e}")),
    }
}

/// A TCP connection to `addr`: passing when it opens.
pub async fn tcp(addr: &str) -> CheckResult {
    match tokio::net::TcpStream::connect(addr).await {
        Ok(_) => CheckResult::new(Health::Passing, format!("connected to {addr}")),
        Err(e) => CheckResult::new(Health::Critical, format!("cannot connect to {addr}: {e}")),
    }
}

type CustomFn = dyn Fn() -> Pin<Box<dyn Future<Output = CheckResult> + Send>> + Send + Sync;

/// What a [`Check`] probes.
#[derive(Clone)]
pub enum Probe {
    /// `GET` this URL.
    Http(String),
    /// Open a TCP connection to this `host:port`.
    Tcp(String),
    /// The caller's own check.
    Custom(Arc<CustomFn>),
}

impl fmt::Debug for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Http(url) => f.debug_tuple("Http").field(url).finish(),
            Probe::Tcp(addr) => f.debug_tuple("Tcp").field(addr).finish(),
            Probe::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// A health check run by the library every `interval`, each run bounded
/// by `timeout`; `failures` bad results in a row make the instance
/// critical (withdrawn from discovery), `successes` good ones bring it
/// back.
///
/// ```
/// use std::time::Duration;
/// use coord::registry::check::Check;
/// let check = Check::http("http://127.0.0.1:8080/healthz")
///     .interval(Duration::from_secs(5))
///     .timeout(Duration::from_secs(2))
///     .failures(3);
/// assert_eq!(check.failures, 3);
/// ```
#[derive(Debug, Clone)]
pub struct Check {
    /// What it probes.
    pub probe: Probe,
    /// Time between runs.
    pub interval: Duration,
    /// Longest a run may take (then it counts as critical).
    pub timeout: Duration,
    /// Bad results in a row before the instance is critical.
    pub failures: u32,
    /// Good results in a row before a critical instance passes again.
    pub successes: u32,
}

impl Check {
    fn with(probe: Probe) -> Self {
        Check {
            probe,
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            failures: 1,
            successes: 1,
        }
    }

    /// `GET url`, every 10 s, within 5 s.
    pub fn http(url: impl Into<String>) -> Self {
        Self::with(Probe::Http(url.into()))
    }

    /// A TCP connection to `addr`, every 10 s, within 5 s.
    pub fn tcp(addr: impl Into<String>) -> Self {
        Self::with(Probe::Tcp(addr.into()))
    }

    /// The caller's own check, every 10 s, within 5 s.
    pub fn custom<F, Fut>(check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = CheckResult> + Send + 'static,
    {
        Self::with(Probe::Custom(Arc::new(move || Box::pin(check()))))
    }

    /// Time between runs.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Longest a run may take.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Bad results in a row before critical (at least 1).
    pub fn failures(mut self, n: u32) -> Self {
        self.failures = n.max(1);
        self
    }

    /// Good results in a row before passing again (at least 1).
    pub fn successes(mut self, n: u32) -> Self {
        self.successes = n.max(1);
        self
    }

    /// Runs the probe once, bounded by the timeout.
    pub async fn run_once(&self) -> CheckResult {
        let attempt = async {
            match &self.probe {
                Probe::Http(url) => http(url).await,
                Probe::Tcp(addr) => tcp(addr).await,
                Probe::Custom(f) => f().await,
            }
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => CheckResult::new(
                Health::Critical,
                format!(
                    "no answer within {}",
                    humantime::format_duration(self.timeout)
                ),
            ),
        }
    }
}

/// Results in a row, turned into a status by a check's thresholds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    /// The status the results add up to.
    pub status: Health,
    /// The last result's output.
    pub output: String,
    passes: u32,
    fails: u32,
}

impl Tally {
    /// A tally starting from `status`.
    pub fn new(status: Health) -> Self {
        Tally {
            status,
            output: String::new(),
            passes: 0,
            fails: 0,
        }
    }

    /// Counts `result`: `failures` critical results in a row to become
    /// critical, `successes` good ones to recover from critical.
    pub fn apply(&mut self, result: CheckResult, successes: u32, failures: u32) {
        match result.status {
            Health::Critical => {
                self.passes = 0;
                self.fails += 1;
                if self.status == Health::Critical || self.fails >= failures {
                    self.status = Health::Critical;
                }
            }
            good => {
                self.fails = 0;
                self.passes += 1;
                if self.status != Health::Critical || self.passes >= successes {
                    self.status = good;
                }
            }
        }
        self.output = result.output;
    }
}
