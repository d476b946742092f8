//! The `coord` binary.

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Log lines held for a stderr that is slow to take them; past this, new
/// lines are dropped rather than waited for. About a megabyte of typical lines.
const LOG_BUFFER_LINES: usize = 8192;
/// How long the exit waits for held log lines to reach stderr: the end of a
/// log matters, but not more than exiting.
const LOG_FLUSH_WAIT: Duration = Duration::from_millis(500);

fn main() -> ExitCode {
    let cli = cli::Cli::parse_or_exit();
    cli.supervise_now();
    let (stderr, guard) = log_writer();
    let filter = log_filter(std::env::var("COORD_LOG").ok(), cli.log_default());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(stderr.clone())
        // Nowhere to say it: the writer is lossy and never fails, and
        // tracing's own complaint would go to stderr through `eprintln!`,
        // which panics when stderr is a closed pipe.
        .log_internal_errors(false);
    match cli.log_format {
        cli::LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        // One JSON object per line, fields flattened beside `message`, as
        // log shippers expect.
        cli::LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let code = cli.execute(cli::Stderr::new(stderr));
    flush_logs(guard);
    code
}

/// `COORD_LOG` (default `default`, which depends on the command and `-v`),
/// with hickory-server's line per DNS query (logged at info) kept out
/// unless the variable names hickory itself.
fn log_filter(asked: Option<String>, default: &str) -> EnvFilter {
    let mut directives = asked
        .filter(|a| EnvFilter::try_new(a).is_ok())
        .unwrap_or_else(|| default.to_owned());
    if !directives.contains("hickory") {
        directives.push_str(",hickory_server=warn,hickory_net=warn,hickory_proto=warn");
    }
    EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Everything written to stderr goes through one thread that owns it, so
/// that a stderr nobody reads — a pipe whose reader exited (EPIPE) or
/// stopped reading (full) — never blocks or fails the agent: a log line is
/// then dropped, never waited for. *Why:* a blocking write stalls a tokio
/// worker, and a failing one made tracing panic the task that logged (the
/// signal handler, so SIGTERM did nothing).
fn log_writer() -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("coord-log")
        .finish(std::io::stderr())
}

/// Lets the log thread write what it holds, for at most [`LOG_FLUSH_WAIT`].
/// The guard's own drop waits up to a second and then `println!`s, which
/// blocks for good on a full stdout pipe (often the same pipe as stderr),
/// so it is dropped on a thread of its own that the exit does not wait for.
fn flush_logs(guard: WorkerGuard) {
    let (done, flushed) = std::sync::mpsc::channel();
    let dropper = std::thread::Builder::new()
        .name("coord-log-flush".to_owned())
        .spawn(move || {
            drop(guard);
            let _ = done.send(());
        });
    if dropper.is_ok() {
        let _ = flushed.recv_timeout(LOG_FLUSH_WAIT);
    }
}
