//! `coord-bench`: coord measured against its peers, side by side, in one run.
//!
//! ```sh
//! cargo build --release --bins
//! target/release/coord-bench all            # every scenario (several minutes)
//! target/release/coord-bench all --quick    # fewer rounds (`all` may be left out)
//! target/release/coord-bench reaction locks # some scenarios
//! target/release/coord-bench dns            # the DNS server against dnsmasq, with dnsperf
//! target/release/coord-bench nemesis --runs 300   # guarded runs under faults
//! target/release/coord-bench fleet --fleet-sizes 100,300,1000   # fleet scale
//! target/release/coord-bench chaos --minutes 15   # files, ids, services under faults
//! ```
//!
//! It starts its own single-member etcd on free loopback ports, runs each
//! scenario with coord and with the peer (etcdctl, a shell hook) in the same
//! run, alternating after a warm-up, and ends with one line naming the
//! machine and a table: figure, coord median and p99, peer median and p99,
//! their ratio, the target (from the design's "Performance" section) and
//! whether it was met. Scenarios that need a real agent run the `coord`
//! binary found next to this one. BENCHMARKS.md says how to read it.

mod chaos;
mod dns;
mod fanout;
mod fleet;
mod harness;
mod hooks;
mod idle;
mod ids;
mod locks;
mod nemesis;
mod reaction;
mod report;
mod scale;
mod services;
mod shared;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use coord::etcd::Client;
use coord::etcd::local::LocalEtcd;

use report::Report;

/// coord against its peers, side by side: prints a table of medians, p99s,
/// ratios and targets.
#[derive(Debug, Parser)]
#[command(name = "coord-bench")]
struct Args {
    /// `all` (the default), or the scenarios to run, in this order.
    #[arg(value_enum, default_value = "all")]
    scenarios: Vec<Scenario>,
    /// Fewer rounds everywhere (noisier numbers, a few minutes less).
    #[arg(long)]
    quick: bool,
    /// How many agents (and etcdctl watchers) the fan-out scenario starts.
    #[arg(long, default_value_t = 100)]
    fanout_agents: usize,
    /// Guarded runs the nemesis scenario goes on for.
    #[arg(long, default_value_t = 300)]
    runs: usize,
    /// Fleet sizes the fleet scenario runs, each directly and through proxies.
    #[arg(long, value_delimiter = ',', default_value = "100,300,1000")]
    fleet_sizes: Vec<usize>,
    /// How long the fleet scenario measures an idle fleet.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    fleet_idle: std::time::Duration,
    /// How long the chaos scenario injects faults, in minutes.
    #[arg(long, default_value_t = 15)]
    minutes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    All,
    Reaction,
    Locks,
    Ids,
    Scale,
    Fanout,
    Hooks,
    Idle,
    Services,
    Shared,
    /// The `[dns]` server against dnsmasq, loaded by dnsperf.
    Dns,
    /// Not in `all`: guarded commands under random faults, several minutes.
    Nemesis,
    /// Not in `all`: 100, 300 and 1,000 agents on a 3-member etcd, with and
    /// without grpc-proxy (tens of minutes).
    Fleet,
    /// Not in `all`: rendered files, instance ids and services under
    /// random faults, for `--minutes`.
    Chaos,
}

const ALL: [Scenario; 10] = [
    Scenario::Reaction,
    Scenario::Locks,
    Scenario::Ids,
    Scenario::Scale,
    Scenario::Fanout,
    Scenario::Hooks,
    Scenario::Idle,
    Scenario::Services,
    Scenario::Shared,
    Scenario::Dns,
];

/// What every scenario gets.
#[derive(Debug)]
pub struct Ctx {
    pub etcd: LocalEtcd,
    pub client: Client,
    /// The `coord` binary next to this one.
    pub coord: PathBuf,
    /// The repository (for the WASM plugins).
    pub root: PathBuf,
    pub quick: bool,
    pub fanout_agents: usize,
}

impl Ctx {
    pub fn endpoint(&self) -> String {
        self.etcd.endpoint()
    }

    /// `full` rounds, or `quick` with `--quick`.
    pub fn rounds(&self, full: usize, quick: usize) -> usize {
        if self.quick { quick } else { full }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut scenarios: Vec<Scenario> = Vec::new();
    for s in &args.scenarios {
        let add: &[Scenario] = if *s == Scenario::All { &ALL } else { &[*s] };
        for s in add {
            if !scenarios.contains(s) {
                scenarios.push(*s);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("coord-bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args, &scenarios)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("coord-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the scenarios and prints the table; `Ok(false)` when a scenario
/// failed (its row says so) but the others ran.
async fn run(args: &Args, scenarios: &[Scenario]) -> anyhow::Result<bool> {
    let coord = harness::coord_binary()?;
    harness::require_program("etcdctl")?;
    let etcd = LocalEtcd::start().await.context("starting a local etcd")?;
    let client = etcd.client().await;
    let ctx = Ctx {
        etcd,
        client,
        coord,
        root: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        quick: args.quick,
        fanout_agents: args.fanout_agents,
    };
    let machine = harness::machine_line();
    println!("{machine}");
    println!(
        "etcd at {}, coord at {}{}\n",
        ctx.endpoint(),
        ctx.coord.display(),
        if ctx.quick { ", --quick" } else { "" }
    );
    let mut report = Report::default();
    let mut all_ran = true;
    for s in scenarios {
        let name = format!("{s:?}").to_lowercase();
        println!("== {name}");
        let result = match s {
            Scenario::All => Ok(()),
            Scenario::Reaction => reaction::run(&ctx, &mut report).await,
            Scenario::Locks => locks::run(&ctx, &mut report).await,
            Scenario::Ids => ids::run(&ctx, &mut report).await,
            Scenario::Scale => scale::run(&ctx, &mut report).await,
            Scenario::Fanout => fanout::run(&ctx, &mut report).await,
            Scenario::Hooks => hooks::run(&ctx, &mut report).await,
            Scenario::Idle => idle::run(&ctx, &mut report).await,
            Scenario::Services => services::run(&ctx, &mut report).await,
            Scenario::Shared => shared::run(&ctx, &mut report).await,
            Scenario::Dns => dns::run(&ctx, &mut report).await,
            Scenario::Nemesis => nemesis::run(&ctx, &mut report, args.runs).await,
            Scenario::Fleet => {
                fleet::run(&ctx, &mut report, &args.fleet_sizes, args.fleet_idle).await
            }
            Scenario::Chaos => chaos::run(&ctx, &mut report, args.minutes).await,
        };
        if let Err(e) = result {
            all_ran = false;
            println!("  FAILED: {e:#}");
            report.failed(&name, &format!("{e:#}"));
        }
    }
    println!();
    println!("{machine}");
    report.print();
    Ok(all_ran)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Args, Scenario};

    /// `coord-bench --quick`, as the README says it, runs every scenario.
    #[test]
    fn without_a_scenario_every_one_runs() {
        let args = Args::try_parse_from(["coord-bench", "--quick"]).expect("parses");
        assert!(args.quick);
        assert_eq!(args.scenarios, [Scenario::All]);
        let args = Args::try_parse_from(["coord-bench", "locks", "--quick"]).expect("parses");
        assert_eq!(args.scenarios, [Scenario::Locks]);
    }
}
