//! Running one health check.

use std::process::Stdio;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::agent::manifest::CheckKind;
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
            CheckKind::Exec(argv) => exec(argv).await,
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
/// Nagios convention Consul also follows.
async fn exec(argv: &[String]) -> CheckResult {
    let Some((program, args)) = argv.split_first() else {
        return CheckResult::new(Health::Critical, "no program to run");
    };
    let out = tokio::process::Command::new(program)
        .args(args)
        .env_remove(crate::agent::status::NOTIFY_SOCKET)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    match out {
        Err(e) => CheckResult::new(Health::Critical, format!("cannot run `{program}`: {e}")),
        Ok(out) => {
            let mut text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let err = String::from_utf8_lossy(&out.stderr);
            if !err.trim().is_empty() {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(err.trim());
            }
            let status = match out.status.code() {
                Some(0) => Health::Passing,
                Some(1) => Health::Warning,
                _ => Health::Critical,
            };
            CheckResult::new(status, text)
        }
    }
}
