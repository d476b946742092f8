//! The `coord` command line: clap definitions and thin handlers over the
//! library and the agent.

mod agents;
mod check;
mod connection;
mod dev;
mod docs;
mod errors;
mod hook;
mod ids;
mod kv;
mod lock;
mod maint;
mod render;
mod rollout;
mod run;
mod services;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use coord::agent::hold::{Claim, Guarded, Held, HoldError, hold_and_run};
use coord::agent::manifest::ManifestError;
use coord::etcd::{Client, Session};

/// A token cancelled at the first SIGTERM or SIGINT: what stops a command
/// run under a lock or an id. Set up before the command starts, so a
/// signal that comes early is not lost.
pub fn stop_signal() -> std::io::Result<tokio_util::sync::CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = tokio_util::sync::CancellationToken::new();
    let cancel = stop.clone();
    // Ends with the command's runtime.
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        cancel.cancel();
    });
    Ok(stop)
}

/// The command line's side of [`hold_and_run`] (`coord lock`, `coord ids
/// claim`): runs `command` under the claim `take` makes on `session`'s
/// lease, stopped by SIGTERM or SIGINT — also while waiting for the claim,
/// which then fails with `None`. The caller closes the session after.
pub async fn hold_for_command<C: Claim, E>(
    client: &Client,
    session: &Session,
    command: &[String],
    grace: std::time::Duration,
    take: impl std::future::Future<Output = Result<C, E>>,
) -> anyhow::Result<Result<Held<C>, HoldError<Option<E>>>> {
    use anyhow::Context as _;
    let coord =
        std::env::current_exe().context("cannot find the coord binary to supervise with")?;
    let stop = stop_signal()?;
    let take = async {
        tokio::select! {
            taken = take => taken.map_err(Some),
            _ = stop.cancelled() => Err(None),
        }
    };
    let subscribed = session.subscribe();
    let guarded = Guarded {
        client,
        session: &subscribed,
        coord: &coord,
        argv: command,
        grace,
    };
    Ok(hold_and_run(guarded, take, &stop).await)
}

/// Exit status for a bad manifest or bad usage (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// What `coord --version` says: the package version and the commit it was
/// built from (build.rs; "unknown" outside a git checkout).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("COORD_COMMIT"),
    ")"
);

/// The CLI's own messages to stderr. They go through the log writer, so
/// they stay in order with the log lines and, like them, never block or
/// fail when stderr is a pipe nobody reads (`eprintln!` would panic).
#[derive(Clone)]
pub struct Stderr(tracing_appender::non_blocking::NonBlocking);

impl std::fmt::Debug for Stderr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stderr")
    }
}

impl Stderr {
    /// Wraps the writer the logs go to.
    pub fn new(writer: tracing_appender::non_blocking::NonBlocking) -> Stderr {
        Stderr(writer)
    }

    /// Writes `message` and a newline, as one piece.
    pub fn say(&self, message: impl std::fmt::Display) {
        use std::io::Write;
        let line = format!("{message}\n");
        // Lossy by design: nothing to do when nobody reads stderr.
        let _ = self.0.clone().write_all(line.as_bytes());
    }
}

/// coord: a per-host agent that coordinates hosts through etcd.
#[derive(Debug, Parser)]
#[command(name = "coord", version = VERSION, about, long_about = None)]
pub struct Cli {
    /// How logs are written to stderr: `text` for people, `json` (one
    /// object per line) for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log what a one-shot command does (its session lease, retries), not
    /// only warnings; `-vv` adds debug lines. `COORD_LOG` overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    command: Command,
}

/// The log formats: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent on a manifest until SIGINT/SIGTERM (SIGHUP reloads).
    Run(run::RunArgs),
    /// Validate a manifest and summarise what it declares.
    Check(check::CheckArgs),
    /// List the agents present in etcd.
    Agents(agents::AgentsArgs),
    /// Start a throw-away local etcd and run the agent on the example manifest.
    Dev(dev::DevArgs),
    /// Run one hook of a manifest on an event given as JSON, and show what it did.
    Hook(hook::HookArgs),
    /// Render a manifest's [[file]]s once, or show what they would become.
    Render(render::RenderArgs),
    /// List services and their instances; report TTL checks.
    Services(Box<services::ServicesArgs>),
    /// Put a service instance (or every service of an agent) in maintenance: withdrawn from discovery; or take it out.
    Maint(maint::MaintArgs),
    /// List a pool's instance ids, or run a command with one claimed.
    Ids(Box<ids::IdsArgs>),
    /// Run a command while holding a lock; it never outlives the lock.
    Lock(Box<lock::LockArgs>),
    /// (internal) Run a command that must die before its lock's deadline.
    #[command(hide = true)]
    Supervise(lock::SuperviseArgs),
    /// (internal) Compile the WASM component on stdin into the agent's cache.
    #[command(hide = true)]
    CompileWasm(hook::CompileWasmArgs),
    /// The config center: get, set (compare-and-set by version), delete, list, watch, history, rollback.
    Kv(kv::KvArgs),
    /// Staged rollouts (`coord kv set KEY VALUE --stage SELECTOR`): status, promote, abort.
    Rollout(rollout::RolloutArgs),
    /// Show what a running agent says about itself (from its [status] endpoint).
    Status(status::StatusArgs),
    /// Print a shell completion script: `source <(coord completions bash)`.
    Completions(docs::CompletionsArgs),
    /// (for packagers) Print the man page, or write every page into a directory.
    #[command(hide = true)]
    Man(docs::ManArgs),
}

impl Cli {
    /// The parsed command line, or clap's error and exit — with a hint
    /// when a command to run under `coord lock` / `coord ids claim` was
    /// given without the `--` before it (clap only says it found an
    /// unexpected argument).
    pub fn parse_or_exit() -> Cli {
        let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        match Cli::try_parse_from(&args) {
            Ok(cli) => cli,
            Err(e) => {
                let holds = args.iter().any(|a| a == "lock" || a == "claim");
                let dashes = args.iter().any(|a| a == "--");
                if e.kind() == clap::error::ErrorKind::UnknownArgument && holds && !dashes {
                    let _ = e.print();
                    let which = if args.iter().any(|a| a == "claim") {
                        "coord ids claim POOL --size N -- COMMAND"
                    } else {
                        "coord lock NAME -- COMMAND"
                    };
                    eprintln!(
                        "hint: the command to run goes after `--`, which ends coord's own options: `{which}`"
                    );
                    std::process::exit(e.exit_code());
                }
                e.exit()
            }
        }
    }

    /// The log filter when `COORD_LOG` does not say: `info` for the agent
    /// (`run`, `dev`), whose log is its record; for a one-shot command only
    /// warnings, since its output and its error message say what happened,
    /// and no lines about an etcd endpoint being unreachable (the error
    /// says it, with where the endpoint came from). `-v` and `-vv` ask for
    /// more.
    /// Runs `coord supervise` at once, if that is the command: it and its
    /// staged child write to stderr directly and start no log thread, which
    /// the staged child's exec would wait out on a lock handover's path.
    pub fn supervise_now(&self) {
        if let Command::Supervise(args) = &self.command {
            lock::supervise_command(args)
        }
    }

    pub fn log_default(&self) -> &'static str {
        let agent = matches!(self.command, Command::Run(_) | Command::Dev(_));
        match (agent, self.verbose) {
            (_, 2..) => "debug,h2=info,tower=info,hyper=info",
            (true, _) | (false, 1) => "info",
            (false, 0) => "warn,coord::etcd::reachability=error",
        }
    }

    /// Runs the command on the runtime it needs.
    ///
    /// The agent gets worker threads (renders, WASM calls and reconciles
    /// run side by side); every other command is one request or one chain
    /// of waits, where a single-threaded runtime wakes the waiting task on
    /// the thread that saw the event, without a hand-over between threads —
    /// the difference shows in a lock handover. The supervisor and the
    /// commands that only print what clap knows get no runtime at all.
    pub fn execute(self, stderr: Stderr) -> ExitCode {
        let mut runtime = match &self.command {
            Command::Completions(args) => return docs::completions(args),
            Command::Man(args) => return docs::man(args),
            Command::Supervise(args) => lock::supervise_command(args),
            Command::CompileWasm(args) => hook::compile_wasm(args),
            Command::Run(_) | Command::Dev(_) => {
                if let Ok(exe) = std::env::current_exe() {
                    coord::agent::hooks::compile_in_child_processes(exe);
                }
                tokio::runtime::Builder::new_multi_thread()
            }
            _ => tokio::runtime::Builder::new_current_thread(),
        };
        match runtime.enable_all().build() {
            Ok(rt) => rt.block_on(self.run(stderr)),
            Err(e) => {
                stderr.say(format_args!("error: cannot start the async runtime: {e}"));
                ExitCode::FAILURE
            }
        }
    }

    /// Runs the command; errors are printed here, at the edge.
    async fn run(self, stderr: Stderr) -> ExitCode {
        let result = match self.command {
            Command::Run(args) => run::run(args).await,
            Command::Check(args) => check::check(args).await,
            Command::Agents(args) => agents::agents(args).await,
            Command::Dev(args) => dev::dev(args, &stderr).await,
            Command::Hook(args) => hook::hook(args).await,
            Command::Render(args) => render::render(args).await,
            Command::Services(args) => services::services(*args).await,
            Command::Maint(args) => maint::maint(args).await,
            Command::Ids(args) => ids::ids(*args).await,
            Command::Lock(args) => lock::lock(*args).await,
            Command::Supervise(args) => lock::supervise_command(&args),
            Command::CompileWasm(args) => hook::compile_wasm(&args),
            Command::Kv(args) => kv::kv(args).await,
            Command::Rollout(args) => rollout::rollout(args).await,
            Command::Status(args) => status::status(args).await,
            Command::Completions(args) => Ok(docs::completions(&args)),
            Command::Man(args) => Ok(docs::man(&args)),
        };
        match result {
            Ok(code) => code,
            Err(e) => {
                if let Some(m) = e.downcast_ref::<ManifestError>() {
                    let n = m.diagnostics.len();
                    stderr.say(format_args!(
                        "{m}\nerror: the manifest has {n} problem{}; nothing was done",
                        if n == 1 { "" } else { "s" }
                    ));
                    return ExitCode::from(EXIT_USAGE);
                }
                stderr.say(format_args!("error: {}", errors::describe(&e)));
                ExitCode::FAILURE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every argument of every command says what it is for in `--help`.
    #[test]
    fn every_argument_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" || arg.is_hide_set() {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.is_hide_set() || sub.get_name() == "help" {
                    continue;
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        // clap's own checks too (a short flag such as -v used twice).
        super::Cli::command().debug_assert();
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "coord", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:#?}");
    }
}
