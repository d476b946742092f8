use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};

use super::connection::EtcdArgs;
use coord::registry;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Debug, Args)]
pub struct MaintArgs {
    /// `on` withdraws the instances from discovery, `off` restores them.
    #[arg(value_enum)]
    switch: Switch,
    /// `AGENT` (all its services) or `AGENT/SERVICE`; the agent must be
    /// present, and run the service.
    #[arg(value_name = "AGENT[/SERVICE]")]
    target: String,
    /// Why, shown in the instances' health (`coord services --all`,
    /// `coord status`).
    #[arg(long, default_value = "")]
    reason: String,
    #[command(flatten)]
    etcd: EtcdArgs,
}

pub async fn maint(args: MaintArgs) -> anyhow::Result<ExitCode> {
    let (client, namespace) = args.etcd.connect().await?;
    let (agent, service) = match args.target.split_once('/') {
        Some((a, s)) => (a, Some(s)),
        None => (args.target.as_str(), None),
    };
    match args.switch {
        Switch::On => {
            match registry::start_maintenance(&client, &namespace, agent, service, &args.reason)
                .await
            {
                Ok(()) => {}
                Err(e @ registry::TargetError::Etcd(_)) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("cannot put `{}` in maintenance", args.target)));
                }
                Err(e) => return Err(e.into()),
            }
            println!("{}: maintenance on", args.target);
        }
        Switch::Off => {
            let was = registry::end_maintenance(&client, &namespace, agent, service)
                .await
                .with_context(|| format!("cannot end maintenance of `{}`", args.target))?;
            println!(
                "{}: maintenance off{}",
                args.target,
                if was { "" } else { " (it was not on)" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
