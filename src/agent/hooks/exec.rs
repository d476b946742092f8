//! Shell hooks: a program run with the event in its environment and on
//! stdin — never on its command line, so values from etcd cannot become
//! arguments or shell syntax.

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use tracing::{debug, warn};

use super::{Envelope, Event, HookError, Outcome};
use crate::agent::process::{self, Job};

/// Lines of stderr kept to explain a failure or a veto.
const KEPT_LINES: usize = 5;

/// A shell hook, ready to run.
#[derive(Debug, Clone)]
pub struct ExecHook {
    pub name: String,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
    /// The agent's ambient environment (instance ids), if any.
    pub ambient: Option<super::AmbientEnv>,
}

impl ExecHook {
    /// How long a hook gets between TERM and KILL once its time is up.
    fn grace(&self) -> Duration {
        (self.timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// Runs the hook once on `envelope`. For a validate event a non-zero
    /// exit is a veto (the reason is the last lines of stderr); for other
    /// events it is a failure. The run ends when the hook's process exits
    /// (what it left in its group is killed) or at its timeout (TERM,
    /// grace, KILL to the group); its output counts towards the timeout.
    pub async fn run(&self, envelope: &Envelope) -> Result<Outcome, HookError> {
        if self.argv.is_empty() {
            return Err(HookError::Failed {
                hook: self.name.clone(),
                status: "no program to run".into(),
            });
        }
        let ambient: BTreeMap<String, String> = self
            .ambient
            .as_ref()
            .map(|a| a.read().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default();
        let mut env: Vec<(String, String)> = ambient.into_iter().collect();
        env.extend(envelope.env());
        env.extend(self.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let started = std::time::Instant::now();
        let finished = process::run(Job {
            argv: &self.argv,
            env,
            stdin: Some(envelope.to_json().into_bytes()),
            timeout: self.timeout,
            grace: self.grace(),
            log_as: Some(format!("hook {}", self.name)),
        })
        .await
        .map_err(|e| HookError::Spawn {
            hook: self.name.clone(),
            program: e.program,
            source: e.source,
        })?;
        let Some(status) = finished.status else {
            warn!(hook = %self.name, timeout = ?self.timeout, "Hook stopped at its timeout.");
            return Err(HookError::Timeout {
                hook: self.name.clone(),
                timeout: self.timeout,
            });
        };
        debug!(hook = %self.name, status = %status, elapsed = ?started.elapsed(), "Hook finished.");
        if status.success() {
            return Ok(Outcome::Done);
        }
        let lines = &finished.stderr.lines;
        let tail: VecDeque<String> = lines
            .iter()
            .skip(lines.len().saturating_sub(KEPT_LINES))
            .cloned()
            .collect();
        let reason = describe(status, &tail);
        match envelope.event {
            Event::ValidateFile { .. } => Ok(Outcome::Vetoed(reason)),
            _ => Err(HookError::Failed {
                hook: self.name.clone(),
                status: reason,
            }),
        }
    }
}

fn describe(status: ExitStatus, tail: &VecDeque<String>) -> String {
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    };
    if tail.is_empty() {
        how
    } else {
        let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
        format!("{how}: {}", lines.join(" | "))
    }
}
