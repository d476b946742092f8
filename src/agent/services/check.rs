//! Running one health check.

use std::time::Duration;

use crate::agent::manifest::CheckKind;
use crate::agent::process::{self, Job};
use crate::registry::Health;
// The probes a service's own registration runs live in the library; the
// agent adds exec checks, which need its process handling.
pub use crate::registry::check::CheckResult;
use crate::registry::check::{http, tcp};

/// Runs an active check once, bounded by `timeout`. TTL checks are not
/// run: something outside reports them.
pub async fn run(kind: &CheckKind, timeout: Duration) -> CheckResult {
    let attempt = async {
        match kind {
            CheckKind::Http(url) => http(url).await,
            CheckKind::Tcp(addr) => tcp(addr).await,
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
