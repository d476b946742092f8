//! Shell hooks: a program run with the event in its environment and on
//! stdin — never on its command line, so values from etcd cannot become
//! arguments or shell syntax.

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tracing::{debug, info, warn};

use super::{Envelope, Event, HookError, Outcome};
use crate::untrusted::Untrusted;

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
    /// events it is a failure.
    pub async fn run(&self, envelope: &Envelope) -> Result<Outcome, HookError> {
        let Some((program, args)) = self.argv.split_first() else {
            return Err(HookError::Failed {
                hook: self.name.clone(),
                status: "no program to run".into(),
            });
        };
        let ambient: BTreeMap<String, String> = self
            .ambient
            .as_ref()
            .map(|a| a.read().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default();
        let mut child = Command::new(program)
            .args(args)
            .env_remove(crate::agent::status::NOTIFY_SOCKET)
            .envs(ambient)
            .envs(envelope.env())
            .envs(&self.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that a timeout stops whatever the
            // hook started too.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| HookError::Spawn {
                hook: self.name.clone(),
                program: program.clone(),
                source,
            })?;
        let started = std::time::Instant::now();
        if let Some(mut stdin) = child.stdin.take() {
            let json = envelope.to_json();
            tokio::spawn(async move {
                // A hook that does not read stdin closes the pipe; that is fine.
                let _ = stdin.write_all(json.as_bytes()).await;
                let _ = stdin.shutdown().await;
            });
        }
        let stdout = child
            .stdout
            .take()
            .map(|s| pump(self.name.clone(), "stdout", s));
        let stderr = child
            .stderr
            .take()
            .map(|s| pump(self.name.clone(), "stderr", s));
        let status = match tokio::time::timeout(self.timeout, child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(source)) => {
                return Err(HookError::Spawn {
                    hook: self.name.clone(),
                    program: program.clone(),
                    source,
                });
            }
            Err(_) => {
                self.stop(&mut child).await;
                warn!(hook = %self.name, timeout = ?self.timeout, "Hook stopped at its timeout.");
                return Err(HookError::Timeout {
                    hook: self.name.clone(),
                    timeout: self.timeout,
                });
            }
        };
        if let Some(task) = stdout {
            let _ = task.await;
        }
        let tail = match stderr {
            Some(task) => task.await.unwrap_or_default(),
            None => VecDeque::new(),
        };
        debug!(hook = %self.name, status = %status, elapsed = ?started.elapsed(), "Hook finished.");
        if status.success() {
            return Ok(Outcome::Done);
        }
        let reason = describe(status, &tail);
        match envelope.event {
            Event::ValidateFile { .. } => Ok(Outcome::Vetoed(reason)),
            _ => Err(HookError::Failed {
                hook: self.name.clone(),
                status: reason,
            }),
        }
    }

    /// TERM to the hook's process group, then KILL after the grace period.
    async fn stop(&self, child: &mut Child) {
        let Some(pid) = child.id() else { return };
        let group = Pid::from_raw(pid as i32);
        let _ = killpg(group, Signal::SIGTERM);
        if tokio::time::timeout(self.grace(), child.wait())
            .await
            .is_err()
        {
            let _ = killpg(group, Signal::SIGKILL);
            let _ = child.wait().await;
        } else {
            // The leader is gone; children it left in the group go too.
            let _ = killpg(group, Signal::SIGKILL);
        }
    }
}

/// Logs each line of a hook's output with its name; returns the last lines.
fn pump(
    hook: String,
    stream: &'static str,
    pipe: impl AsyncRead + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<VecDeque<String>> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        let mut tail = VecDeque::new();
        while let Ok(Some(line)) = lines.next_line().await {
            // Escaped once here: it is logged now and maybe in an error later.
            let line = Untrusted(&line).to_string();
            info!(hook = %hook, stream, "{line}");
            if tail.len() == KEPT_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        tail
    })
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
