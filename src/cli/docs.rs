//! `coord completions SHELL` and the hidden `coord man`: shell completions
//! and man pages generated from the clap definitions, so they cannot drift
//! from the commands. The Debian package ships both (deploy/build-deb.sh).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory};

use super::Cli;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write `coord.1` and a page per command (`coord-run.1`,
    /// `coord-kv-get.1`, …) into this directory, instead of `coord.1`
    /// alone to stdout.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Prints the completion script: `coord completions bash >
/// /usr/share/bash-completion/completions/coord`, or for the current
/// shell, `source <(coord completions bash)`.
pub fn completions(args: &CompletionsArgs) -> ExitCode {
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut visible_command(), "coord", &mut out);
    write_stdout(&out)
}

/// `coord` without its hidden commands (`supervise`, `compile-wasm`,
/// `man`): clap_complete would offer them, and they are not for typing.
/// clap cannot remove a subcommand, so the root is assembled again from
/// the same pieces.
fn visible_command() -> clap::Command {
    let full = Cli::command();
    let mut root = clap::Command::new("coord")
        .about(full.get_about().cloned().unwrap_or_default())
        .version(super::VERSION)
        .args(full.get_arguments().cloned());
    for sub in full.get_subcommands().filter(|s| !s.is_hide_set()) {
        root = root.subcommand(sub.clone());
    }
    root
}

/// Prints the man page, or writes every page into `--dir`.
pub fn man(args: &ManArgs) -> ExitCode {
    // `coord help` is `--help` again: no page of its own.
    let command = Cli::command().disable_help_subcommand(true);
    if let Some(dir) = &args.dir {
        return match clap_mangen::generate_to(command, dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&format!(
                "cannot write the man pages into `{}`: {e}",
                dir.display()
            )),
        };
    }
    let mut out = Vec::new();
    match clap_mangen::Man::new(command).render(&mut out) {
        Ok(()) => write_stdout(&out),
        Err(e) => fail(&format!("cannot render the man page: {e}")),
    }
}

fn write_stdout(bytes: &[u8]) -> ExitCode {
    match std::io::stdout().lock().write_all(bytes) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`coord man | head`) is not worth a message.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(&format!("cannot write to stdout: {e}")),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}
