//! `[[task]]`: lock-guarded commands run by agents.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::{CoordProcess, etcd, eventually};

fn agent(name: &str, endpoint: &str, ttl: u64, rest: &str) -> String {
    format!(
        "[agent]\nname = \"{name}\"\nttl = \"{ttl}s\"\n[etcd]\nendpoints = [\"{endpoint}\"]\nrequest_timeout = \"2s\"\n{rest}"
    )
}

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_leader_task_runs_on_one_agent_and_moves_when_that_agent_dies() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("leaders");
    let task = format!(
        "[[task]]\nname = \"singleton\"\nschedule = \"leader\"\nrun = [\"sh\", \"-c\", \"echo $AGENT $COORD_FENCING_TOKEN >> {}; exec sleep 1000\"]\n",
        log.display()
    );
    let a = CoordProcess::run(&agent(
        "a",
        &etcd.endpoint(),
        3,
        &task.replace("[[task]]\n", "[[task]]\nenv = { AGENT = \"a\" }\n"),
    ));
    let first = eventually("a leader", || async { lines(&log).first().cloned() }).await;
    let b = CoordProcess::run(&agent(
        "b",
        &etcd.endpoint(),
        3,
        &task.replace("[[task]]\n", "[[task]]\nenv = { AGENT = \"b\" }\n"),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        lines(&log).len(),
        1,
        "two leaders at once: {:?}",
        lines(&log)
    );
    let (leader, other) = if first.starts_with("a ") {
        (a, b)
    } else {
        (b, a)
    };
    leader.signal(Signal::SIGKILL);
    let second = eventually("the other agent to take over", || async {
        lines(&log).get(1).cloned()
    })
    .await;
    let token = |l: &str| {
        l.split(' ')
            .nth(1)
            .and_then(|t| t.parse::<i64>().ok())
            .expect("token")
    };
    assert!(token(&second) > token(&first), "{first} then {second}");
    assert_ne!(first.split(' ').next(), second.split(' ').next());
    drop(other);
}

#[tokio::test]
async fn a_once_task_runs_once_across_the_fleet() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("ran");
    let task = format!(
        "[[task]]\nname = \"migrate\"\nschedule = \"once\"\nrun = [\"sh\", \"-c\", \"echo $COORD_FENCING_TOKEN >> {}; sleep 0.3\"]\n",
        log.display()
    );
    let _a = CoordProcess::run(&agent("a", &etcd.endpoint(), 5, &task));
    let _b = CoordProcess::run(&agent("b", &etcd.endpoint(), 5, &task));
    eventually("the done marker", || async {
        client.get("/coord/tasks/migrate/done").await.ok().flatten()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(lines(&log).len(), 1, "{:?}", lines(&log));
}

#[tokio::test]
async fn an_every_task_runs_each_round_once_records_its_runs_and_fires_its_hook() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("rounds");
    let hook_log = dir.path().join("finished");
    let rest = format!(
        "[[hook]]\nname = \"note\"\nexec = [\"sh\", \"-c\", \"echo $COORD_EVENT $COORD_EXIT_CODE >> {}\"]\n\
         [[task]]\nname = \"tick\"\nschedule = \"every 1s\"\non_change = [\"note\"]\n\
         run = [\"sh\", \"-c\", \"echo $COORD_TASK $COORD_FENCING_TOKEN >> {}\"]\n",
        hook_log.display(),
        log.display()
    );
    let _a = CoordProcess::run(&agent("a", &etcd.endpoint(), 5, &rest));
    let _b = CoordProcess::run(&agent("b", &etcd.endpoint(), 5, &rest));
    eventually("three rounds", || async {
        (lines(&log).len() >= 3).then_some(())
    })
    .await;
    // Every run held the lock: fencing tokens only grow.
    let tokens: Vec<i64> = lines(&log)
        .iter()
        .map(|l| {
            l.split(' ')
                .nth(1)
                .and_then(|t| t.parse().ok())
                .expect("token")
        })
        .collect();
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    let runs = client
        .get_prefix("/coord/tasks/tick/runs/")
        .await
        .expect("etcd")
        .kvs;
    assert!(!runs.is_empty() && runs.len() <= 20);
    let record: serde_json::Value = serde_json::from_slice(&runs[0].value).expect("JSON");
    assert_eq!(record["exit"], 0);
    let finished = eventually("the task-finished hook", || async {
        lines(&hook_log)
            .into_iter()
            .find(|l| l.starts_with("task-finished"))
    })
    .await;
    assert_eq!(finished, "task-finished 0");
}

#[tokio::test]
async fn a_task_sees_the_agents_instance_ids_in_its_environment() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("ids");
    let text = format!(
        "[agent]\nname = \"a\"\nttl = \"5s\"\nstate_dir = \"{}\"\n\
         [etcd]\nendpoints = [\"{}\"]\n\
         [[instance_id]]\npool = \"shard-map\"\nsize = 4\n\
         [[task]]\nname = \"t\"\nschedule = \"every 1s\"\n\
         run = [\"sh\", \"-c\", \"echo id=$COORD_INSTANCE_ID_SHARD_MAP >> {}\"]\n",
        dir.path().join("state").display(),
        etcd.endpoint(),
        log.display()
    );
    let _a = CoordProcess::run(&text);
    eventually("a run that sees the id", || async {
        lines(&log)
            .into_iter()
            .find(|l| l.len() > "id=".len() && l[3..].parse::<u32>().is_ok_and(|n| n < 4))
    })
    .await;
}
