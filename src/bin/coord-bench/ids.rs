//! Instance-id claims under contention, through the library
//! (`coord::ids::claim`): 1, 64 and 256 claimers, each with its own
//! session, all starting together on a pool of 256. No peer: etcd has no
//! id pools of its own.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::bail;
use coord::etcd::Session;
use coord::ids::{self, ClaimRecord};

use crate::Ctx;
use crate::report::{Report, Row, Stat, Unit};

const POOL: u32 = 256;

pub async fn run(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let rounds = ctx.rounds(5, 2);
    let client = &ctx.client;
    for claimers in [1usize, 64, 256] {
        let mut latencies = Vec::new();
        let mut all_done = Vec::new();
        let mut trips = 0u32;
        let mut all_unique = true;
        for round in 0..rounds {
            let pool = format!("bench-{claimers}-{round}");
            let mut sessions = Vec::new();
            for _ in 0..claimers {
                let s = Session::start(client.clone(), Duration::from_secs(30));
                let lease = s.wait_alive().await;
                sessions.push((s, lease));
            }
            let started = Instant::now();
            let mut tasks = Vec::new();
            for (i, (_, lease)) in sessions.iter().enumerate() {
                let (client, pool, lease) = (client.clone(), pool.clone(), *lease);
                tasks.push(tokio::spawn(async move {
                    let me = ClaimRecord {
                        agent: format!("c{i}"),
                        claimed_at: String::new(),
                    };
                    let t = Instant::now();
                    let c = ids::claim(&client, "/coord", &pool, POOL, lease, None, &me).await;
                    (t.elapsed(), c)
                }));
            }
            let mut got = BTreeSet::new();
            for t in tasks {
                let (d, c) = t.await?;
                let c = match c {
                    Ok(c) => c,
                    Err(e) => bail!("{claimers} claimers: a claim failed: {e}"),
                };
                latencies.push(d.as_secs_f64() * 1e3);
                trips += c.round_trips;
                all_unique &= got.insert(c.id);
            }
            all_done.push(started.elapsed().as_secs_f64() * 1e3);
            for (s, _) in sessions {
                s.close().await;
            }
        }
        let n = (claimers * rounds) as f64;
        println!(
            "  {claimers:>3} claimer(s) on {POOL} ids: all done in {:.1} ms (median of {rounds}), \
             {:.2} round trips per claim, {}",
            Stat::of(&all_done).median,
            f64::from(trips) / n,
            if all_unique {
                "all unique"
            } else {
                "DUPLICATES"
            }
        );
        let mut row = Row::new(
            "ids",
            format!(
                "{claimers} claimer{} / {POOL} ids: one claim",
                if claimers == 1 { "" } else { "s" }
            ),
            Unit::Ms,
        )
        .coord(Stat::of(&latencies));
        if !all_unique {
            row = row.target("unique", false);
        }
        report.add(row);
        if claimers == 256 {
            let done = Stat::of(&all_done);
            report.add(
                Row::new("ids", "256 claimers / 256 ids: all claimed", Unit::Ms)
                    .coord(done)
                    .target("all unique, < 2 s", all_unique && done.p99 < 2000.0),
            );
        }
    }
    Ok(())
}
