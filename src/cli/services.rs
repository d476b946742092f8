use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use super::connection::EtcdArgs;
use coord::etcd::{Cache, Client};
use coord::registry::{self, CheckReport, Health, Instance};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServicesArgs {
    #[command(subcommand)]
    report: Option<Report>,
    /// Show this service's instances (without: every service with counts).
    name: Option<String>,
    /// Include instances withdrawn from discovery (critical, maintenance).
    #[arg(long)]
    all: bool,
    /// Keep printing the instances as they change, until interrupted.
    #[arg(long)]
    watch: bool,
    /// Print JSON, one object per line, for scripts.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    etcd: EtcdArgs,
}

/// Reports for TTL checks.
#[derive(Debug, Subcommand)]
enum Report {
    /// Report a TTL-checked instance as passing.
    Pass(ReportArgs),
    /// Report it as warning (still listed for discovery).
    Warn(ReportArgs),
    /// Report it as critical (withdrawn from discovery).
    Fail(ReportArgs),
}

#[derive(Debug, Args)]
struct ReportArgs {
    /// `SERVICE/INSTANCE`, or an instance id unique across services; it
    /// must be registered.
    #[arg(value_name = "SERVICE/INSTANCE")]
    instance: String,
    /// A note shown as the check's output.
    #[arg(long, default_value = "")]
    note: String,
    #[command(flatten)]
    etcd: EtcdArgs,
}

pub async fn services(args: ServicesArgs) -> anyhow::Result<ExitCode> {
    if let Some(report) = args.report {
        return report_check(report).await;
    }
    let (client, namespace) = args.etcd.connect().await?;
    if !args.watch {
        let all = registry::read(&client, &namespace, args.name.as_deref())
            .await
            .context("failed to read the service registry")?;
        print(&all, args.name.as_deref(), args.all, args.json);
        return Ok(ExitCode::SUCCESS);
    }
    watch(
        client,
        &namespace,
        args.name.as_deref(),
        args.all,
        args.json,
    )
    .await
}

async fn watch(
    client: Client,
    namespace: &str,
    name: Option<&str>,
    all: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let cache = Cache::new(client);
    let scope = |p: String| name.map_or(p.clone(), |n| format!("{p}{n}/"));
    let mut endpoints = cache.subscribe(&scope(registry::services_prefix(namespace)));
    let mut health = cache.subscribe(&scope(registry::health_prefix(namespace)));
    endpoints.ready().await;
    health.ready().await;
    let mut last = None;
    loop {
        let now = registry::instances(namespace, name, endpoints.list(), health.list());
        if last.as_ref() != Some(&now) {
            if !json {
                println!(
                    "--- {}",
                    humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                );
            }
            print(&now, name, all, json);
            last = Some(now);
        }
        tokio::select! {
            _ = endpoints.recv() => {}
            _ = health.recv() => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}

fn print(all_instances: &[Instance], name: Option<&str>, all: bool, json: bool) {
    let shown: Vec<&Instance> = all_instances
        .iter()
        .filter(|i| all || i.is_listed())
        .collect();
    if json {
        for i in &shown {
            let line = serde_json::json!({
                "service": i.service,
                "id": i.id,
                // The manifest's name; `addr` is kept for scripts written before.
                "address": i.addr(),
                "addr": i.addr(),
                "weight": i.weight(),
                "listed": i.is_listed(),
                "health": i.health.as_ref().map(|h| h.status.name()),
                "agent": i.health.as_ref().map(|h| h.agent.clone()),
                "output": i.health.as_ref().map(|h| h.output.clone()),
                "metadata": i.metadata(),
            });
            println!("{line}");
        }
        return;
    }
    if name.is_none() {
        let mut counts: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for i in all_instances {
            let c = counts.entry(i.service.as_str()).or_default();
            c.1 += 1;
            if i.is_listed() {
                c.0 += 1;
            }
        }
        if counts.is_empty() {
            println!("no services registered");
        }
        println!("{:24}  {:>6}  {:>5}", "SERVICE", "LISTED", "TOTAL");
        for (service, (listed, total)) in counts {
            println!("{service:24}  {listed:>6}  {total:>5}");
        }
        return;
    }
    if shown.is_empty() {
        println!(
            "no instances{}",
            if all { "" } else { " listed (try --all)" }
        );
        return;
    }
    println!(
        "{:24}  {:22}  {:11}  {:16}  METADATA",
        "INSTANCE", "ADDRESS", "HEALTH", "AGENT"
    );
    for i in shown {
        let health = i.health.as_ref().map_or("?", |h| h.status.name());
        let agent = i.health.as_ref().map_or("?", |h| h.agent.as_str());
        let metadata = i
            .metadata()
            .map(|m| serde_json::to_string(m).unwrap_or_default())
            .unwrap_or_default();
        println!(
            "{:24}  {:22}  {health:11}  {agent:16}  {metadata}",
            i.id,
            i.addr().unwrap_or("?")
        );
    }
}

async fn report_check(report: Report) -> anyhow::Result<ExitCode> {
    let (status, args) = match report {
        Report::Pass(a) => (Health::Passing, a),
        Report::Warn(a) => (Health::Warning, a),
        Report::Fail(a) => (Health::Critical, a),
    };
    let (client, namespace) = args.etcd.connect().await?;
    let (service, id) = match args.instance.split_once('/') {
        Some((s, i)) => (s.to_owned(), i.to_owned()),
        None => {
            let all = registry::read(&client, &namespace, None).await?;
            let found: Vec<&Instance> = all.iter().filter(|i| i.id == args.instance).collect();
            match found.as_slice() {
                [one] => (one.service.clone(), one.id.clone()),
                [] => bail!(
                    "no instance `{}` is registered; name it as service/instance",
                    args.instance
                ),
                _ => bail!(
                    "instance id `{}` is used by several services; name it as service/instance",
                    args.instance
                ),
            }
        }
    };
    let report = CheckReport {
        status,
        output: args.note,
    };
    match registry::report_check(&client, &namespace, &service, &id, &report).await {
        Ok(()) => {}
        Err(e @ registry::TargetError::Etcd(_)) => {
            return Err(anyhow::Error::new(e).context(format!("cannot report `{service}/{id}`")));
        }
        Err(e) => return Err(e.into()),
    }
    println!("{service}/{id}: reported {}", status.name());
    Ok(ExitCode::SUCCESS)
}
