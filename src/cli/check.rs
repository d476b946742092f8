use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use coord::agent::manifest::Manifest;

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The manifest to validate.
    #[arg(value_name = "FILE")]
    manifest: PathBuf,
}

pub fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let manifest = Manifest::load(&args.manifest)?;
    println!("{}", manifest.summary());
    Ok(ExitCode::SUCCESS)
}
