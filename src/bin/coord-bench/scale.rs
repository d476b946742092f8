//! Scale: one `coord run` agent with 1,000 files over 10,000 keys (10 keys
//! each): agent start → all files written, one key changed → its file
//! replaced, renders per change (counted from the agent's debug log: 1
//! means only the dependent file re-rendered) and the agent's peak RSS.
//! No peer: etcd has no templating of its own.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::task::JoinSet;

use crate::Ctx;
use crate::harness::{Agent, rss_mib, wait_for};
use crate::report::{Report, Row, Stat, Unit};

const KEYS: usize = 10_000;
const FILES: usize = 1_000;
const PER_FILE: usize = KEYS / FILES;
const CHANGED: usize = 4242;

fn renders(agent: &Agent) -> usize {
    std::fs::read_to_string(&agent.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Rendered file"))
        .count()
}

pub async fn run(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let changes = ctx.rounds(50, 10);
    let client = &ctx.client;
    let started = Instant::now();
    let mut puts = JoinSet::new();
    for i in 0..KEYS {
        if puts.len() >= 64
            && let Some(r) = puts.join_next().await
        {
            r??;
        }
        let client = client.clone();
        puts.spawn(async move {
            client
                .put(&format!("/scale/k{i:05}"), format!("value-{i}"), None)
                .await
        });
    }
    while let Some(r) = puts.join_next().await {
        r??;
    }
    println!(
        "  {KEYS} keys written in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let dir = tempfile::tempdir()?;
    let files: Vec<PathBuf> = (0..FILES)
        .map(|f| dir.path().join(format!("out/f{f:04}.conf")))
        .collect();
    let mut body = String::new();
    for (f, path) in files.iter().enumerate() {
        let source: String = (0..PER_FILE)
            .map(|j| format!("{{{{ key('/scale/k{:05}') }}}}\\n", f * PER_FILE + j))
            .collect();
        body.push_str(&format!(
            "[[file]]\npath = \"{}\"\ncreate_dirs = true\nsource = \"{source}\"\n",
            path.display()
        ));
    }
    let started = Instant::now();
    let mut agent = Agent::start(
        ctx,
        &dir.path().join("agent"),
        "bench-scale",
        &body,
        "warn,coord::agent::files=debug",
    )?;
    // A file appears whole (rename), so existing means written.
    let first = tokio::task::block_in_place(|| -> anyhow::Result<Duration> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut next = 0;
        while next < FILES {
            if files[next].exists() {
                next += 1;
                continue;
            }
            if Instant::now() > deadline {
                bail!("only {next} of {FILES} files were written in 120 s");
            }
            agent.check_running()?;
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(started.elapsed())
    })?;
    let expected = |f: usize, changed: Option<&str>| -> String {
        (0..PER_FILE)
            .map(|j| {
                let k = f * PER_FILE + j;
                match changed {
                    Some(v) if k == CHANGED => format!("{v}\n"),
                    _ => format!("value-{k}\n"),
                }
            })
            .collect()
    };
    for (f, path) in files.iter().enumerate() {
        if std::fs::read_to_string(path)? != expected(f, None) {
            bail!("{} does not hold what its template says", path.display());
        }
    }
    // Let the first render's log lines all arrive.
    let deadline = Instant::now() + Duration::from_secs(10);
    while renders(&agent) < FILES && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = renders(&agent);

    let target = &files[CHANGED / PER_FILE];
    let mut change = Vec::new();
    for round in 0..changes {
        let value = format!("changed-{round}");
        let sent = Instant::now();
        client
            .put(&format!("/scale/k{CHANGED:05}"), value.clone(), None)
            .await?;
        let done = wait_for(
            target,
            &expected(CHANGED / PER_FILE, Some(&value)),
            Duration::from_secs(10),
        )?;
        change.push((done - sent).as_secs_f64() * 1e3);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let per_change = (renders(&agent) - before) as f64 / changes as f64;
    agent.check_running()?;
    let (rss, hwm) = rss_mib(agent.pid());
    agent.stop();
    client.delete_prefix("/scale/").await?;

    println!(
        "  {FILES} files x {PER_FILE} keys; agent RSS now {rss:.1} MiB, peak {hwm:.1} MiB; \
         {changes} single-key changes"
    );
    report.add(
        Row::new("scale", "agent start → 1,000 files written", Unit::Ms)
            .coord(Stat::one(first.as_secs_f64() * 1e3)),
    );
    report.add(
        Row::new(
            "scale",
            "one of 10,000 keys changed → file replaced",
            Unit::Ms,
        )
        .coord(Stat::of(&change)),
    );
    report.add(
        Row::new("scale", "files rendered per single-key change", Unit::Count)
            .coord(Stat::one(per_change))
            .target("1 (only the dependent file)", per_change <= 1.0),
    );
    report.add(
        Row::new("scale", "agent peak RSS (VmHWM), 1,000 files", Unit::MiB).coord(Stat::one(hwm)),
    );
    Ok(())
}
