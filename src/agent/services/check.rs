//! Running one health check.

use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::agent::manifest::CheckKind;
use crate::agent::process::{self, Job};
use crate::registry::{Health, bounded_output};

/// What one check run found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// Passing, Warning or Critical.
    pub status: Health,
    pub output: String,
}

impl CheckResult {
    fn new(status: Health, output: impl Into<String>) -> Self {
        CheckResult {
            status,
            output: bounded_output(output.into()),
        }
    }
}

/// Runs an active check once, bounded by `timeout`. TTL checks are not
/// run: something outside reports them.
pub async fn run(kind: &CheckKind, timeout: Duration) -> CheckResult {
    let attempt = async {
        match kind {
            CheckKind::Http(url) => http(url).await,
            CheckKind::Tcp(addr) => match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => CheckResult::new(Health::Passing, format!("connected to {addr}")),
                Err(e) => {
                    CheckResult::new(Health::Critical, format!("cannot connect to {addr}: {e}"))
                }
            },
            CheckKind::Exec(argv) => exec(argv, timeout).await,
            CheckKind::Ttl(_) => CheckResult::new(Health::Passing, ""),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => CheckResult::new(
            Health::Critical,
            format!("no answer within {}", humantime::format_duration(timeout)),
        ),
    }
}

async fn http(url: &str) -> CheckResult {
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

/// Exit 0 passing, 1 warning, anything else (or a signal) critical — the
/// Nagios convention Consul also follows. The caller's timeout bounds it;
/// a check cut short kills its process group.
async fn exec(argv: &[String], timeout: Duration) -> CheckResult {
    let Some(program) = argv.first() else {
        return CheckResult::new(Health::Critical, "no program to run");
    };
    let finished = process::run(Job {
        argv,
        env: Vec::new(),
        stdin: None,
        timeout,
        grace: (timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(2)),
        log_as: None,
    })
    .await;
    match finished {
        Err(e) => CheckResult::new(
            Health::Critical,
            format!("cannot run `{program}`: {}", e.source),
        ),
        Ok(out) => {
            let mut text = out.stdout.joined("\n");
            let err = out.stderr.joined("\n");
            if !err.is_empty() {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&err);
            }
            let status = match out.status.and_then(|s| s.code()) {
                Some(0) => Health::Passing,
                Some(1) => Health::Warning,
                _ if out.status.is_none() => {
                    return CheckResult::new(
                        Health::Critical,
                        format!("no answer within {}", humantime::format_duration(timeout)),
                    );
                }
                _ => Health::Critical,
            };
            CheckResult::new(status, text)
        }
    }
}
