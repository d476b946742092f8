use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

use super::connection::EtcdArgs;
use coord::etcd::Client;
use coord::registry::{self, Instance};

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
    /// `service/instance` (as `coord services pass` and `coord status`
    /// name it), or an instance id unique across services. The old
    /// `agent/service` and `agent` are still understood.
    #[arg(required_unless_present = "agent", conflicts_with = "agent")]
    target: Option<String>,
    /// Every service of this agent instead of one instance.
    #[arg(long, value_name = "AGENT")]
    agent: Option<String>,
    /// Why, shown in the instances' health (`coord services --all`,
    /// `coord status`).
    #[arg(long, default_value = "")]
    reason: String,
    #[command(flatten)]
    etcd: EtcdArgs,
}

/// What maintenance is set on: the key is per agent and service (every
/// instance of that service the agent runs), or per agent.
struct Target {
    agent: String,
    service: Option<String>,
    /// How to name it to the user.
    shown: String,
}

pub async fn maint(args: MaintArgs) -> anyhow::Result<ExitCode> {
    let (client, namespace) = args.etcd.connect().await?;
    let target = match (&args.agent, &args.target) {
        (Some(agent), _) => Target {
            agent: agent.clone(),
            service: None,
            shown: format!("agent {agent}"),
        },
        (None, Some(t)) => resolve(&client, &namespace, t, args.switch).await?,
        (None, None) => bail!("say what to put in maintenance: service/instance, or --agent NAME"),
    };
    let (agent, service) = (target.agent.as_str(), target.service.as_deref());
    match args.switch {
        Switch::On => {
            match registry::start_maintenance(&client, &namespace, agent, service, &args.reason)
                .await
            {
                Ok(()) => {}
                Err(e @ registry::TargetError::Etcd(_)) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("cannot put {} in maintenance", target.shown)));
                }
                Err(e) => return Err(e.into()),
            }
            println!("{}: maintenance on", target.shown);
        }
        Switch::Off => {
            let was = registry::end_maintenance(&client, &namespace, agent, service)
                .await
                .with_context(|| format!("cannot end maintenance of {}", target.shown))?;
            println!(
                "{}: maintenance off{}",
                target.shown,
                if was { "" } else { " (it was not on)" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads `text` against the registry: `service/instance` or an instance
/// id first (the spelling `coord services pass` and `coord status` use),
/// then the old `agent/service` or `agent`, which a note names anew. For
/// `off`, a target the registry no longer shows is taken in the old
/// spelling, so maintenance left on a service that is gone can be ended.
async fn resolve(
    client: &Client,
    namespace: &str,
    text: &str,
    switch: Switch,
) -> anyhow::Result<Target> {
    let all = registry::read(client, namespace, None)
        .await
        .context("failed to read the service registry")?;
    let agent_of = |i: &Instance| i.health.as_ref().map(|h| h.agent.clone());
    let (first, second) = match text.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (text, None),
    };
    let instances: Vec<&Instance> = all
        .iter()
        .filter(|i| match second {
            Some(id) => i.service == first && i.id == id,
            None => i.id == first,
        })
        .collect();
    match instances.as_slice() {
        [one] => {
            let Some(agent) = agent_of(one) else {
                bail!(
                    "instance `{}/{}` has no health record naming its agent, so it is not an agent's to withdraw",
                    one.service,
                    one.id
                );
            };
            return Ok(Target {
                shown: format!(
                    "{}/{} (service {} on agent {agent})",
                    one.service, one.id, one.service
                ),
                agent,
                service: Some(one.service.clone()),
            });
        }
        [] => {}
        _ => bail!("instance id `{text}` is used by several services; name it as service/instance"),
    }
    let old = all.iter().find(|i| {
        i.health
            .as_ref()
            .is_some_and(|h| h.agent == first && second.is_none_or(|s| i.service == s))
    });
    let target = Target {
        agent: first.to_owned(),
        service: second.map(str::to_owned),
        shown: match second {
            Some(s) => format!("service {s} on agent {first}"),
            None => format!("agent {first}"),
        },
    };
    match (old, switch) {
        (Some(i), _) => {
            let new = match second {
                Some(_) => format!("`{}/{}`", i.service, i.id),
                None => format!("`--agent {first}`"),
            };
            eprintln!(
                "note: `{text}` read as {} (the old spelling); write it as {new}",
                if second.is_some() {
                    "agent/service"
                } else {
                    "an agent"
                }
            );
            Ok(target)
        }
        (None, Switch::Off) => Ok(target),
        (None, Switch::On) => bail!(
            "no instance `{text}` is registered (nor an agent{} of that name); `coord services --all` lists them as service/instance",
            if second.is_some() {
                " with a service"
            } else {
                ""
            }
        ),
    }
}
