//! A guarded command never outlives its lock, whatever the operator does:
//! reloads, clean stops, `kill -9` of a supervisor, `etcdctl del` of the
//! holder key, two tasks on one lock, nested `coord lock`s, semaphore
//! rounds, and nothing left behind once every agent has stopped.
//!
//! Every guarded command here is the same shell script: it appends
//! `start`, `beat` (every 50 ms) and, when stopped with TERM, 1.5 s more of
//! beats then `end` to one log per lock, each line with its fencing token
//! and pid. Appends to one file are ordered by the kernel, so the log's
//! line order is the true order of events across processes: no clocks are
//! compared. The script also holds an exclusive `flock` on a witness file
//! for as long as any process of its group lives, and logs `overlap` if it
//! cannot take it at its start — the kernel's own word that the previous
//! command was still there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::{CoordProcess, LocalEtcd, etcd, eventually};

/// The lines of a file (none if it does not exist yet).
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Where a lock's commands write: the shared log and the flock witness.
struct Witness {
    log: PathBuf,
    lock: PathBuf,
}

impl Witness {
    fn new(dir: &Path, name: &str) -> Witness {
        Witness {
            log: dir.join(format!("{name}.log")),
            lock: dir.join(format!("{name}.witness")),
        }
    }

    /// The guarded command: `sh -c <script>`, labelled `who`.
    fn script(&self, who: &str) -> String {
        format!(
            "exec 9>>{lock}; flock -n 9 || echo \"overlap $COORD_FENCING_TOKEN $$ {who}\" >> {log}; \
             echo \"start $COORD_FENCING_TOKEN $$ {who}\" >> {log}; \
             stopping() {{ i=0; while [ $i -lt 30 ]; do echo \"beat $COORD_FENCING_TOKEN $$ {who}\" >> {log}; sleep 0.05; i=$((i+1)); done; \
             echo \"end $COORD_FENCING_TOKEN $$ {who}\" >> {log}; exit 0; }}; \
             trap stopping TERM; \
             while :; do echo \"beat $COORD_FENCING_TOKEN $$ {who}\" >> {log}; sleep 0.05; done",
            lock = self.lock.display(),
            log = self.log.display(),
        )
    }

    /// The script as a TOML array for a task's `run`.
    fn run(&self, who: &str) -> String {
        let script = self.script(who).replace('\\', "\\\\").replace('"', "\\\"");
        format!("[\"sh\", \"-c\", \"{script}\"]")
    }

    fn lines(&self) -> Vec<String> {
        lines(&self.log)
    }

    /// The commands started so far, in order: (token, who).
    fn starts(&self) -> Vec<(i64, String)> {
        self.lines()
            .iter()
            .filter_map(|l| {
                let mut f = l.split(' ');
                (f.next()? == "start").then_some(())?;
                let token = f.next()?.parse().ok()?;
                let _pid = f.next()?;
                Some((token, f.next()?.to_owned()))
            })
            .collect()
    }

    /// Checks the log: no `overlap`, tokens strictly increasing in start
    /// order, and each command's last line before the next one's start.
    /// Returns how many commands started.
    fn assert_exclusive(&self) -> usize {
        let lines = self.lines();
        let text = lines.join("\n");
        // (token, pid) → (first line, last line)
        let mut spans: BTreeMap<(i64, u32), (usize, usize)> = BTreeMap::new();
        let mut starts = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let f: Vec<&str> = line.split(' ').collect();
            assert!(f.len() == 4, "bad line {i}: {line:?}\n{text}");
            assert_ne!(
                f[0], "overlap",
                "the previous holder's command was still alive (its flock held) at line {i}:\n{text}"
            );
            let token: i64 = f[1]
                .parse()
                .unwrap_or_else(|_| panic!("no token at line {i}:\n{text}"));
            let pid: u32 = f[2].parse().expect("pid");
            let span = spans.entry((token, pid)).or_insert((i, i));
            span.1 = i;
            if f[0] == "start" {
                starts.push((token, pid, i));
            }
        }
        for pair in starts.windows(2) {
            let (t0, p0, _) = pair[0];
            let (t1, p1, s1) = pair[1];
            assert!(
                t1 > t0,
                "token {t1} started after token {t0}: fencing tokens must grow\n{text}"
            );
            let last0 = spans[&(t0, p0)].1;
            assert!(
                last0 < s1,
                "token {t0} (pid {p0}) still ran at line {last0}, after token {t1} (pid {p1}) started at line {s1}\n{text}"
            );
        }
        starts.len()
    }
}

fn agent(name: &str, endpoint: &str, rest: &str) -> String {
    format!(
        "[agent]\nname = \"{name}\"\nttl = \"6s\"\n[etcd]\nendpoints = [\"{endpoint}\"]\nrequest_timeout = \"2s\"\n{rest}"
    )
}

fn leader_task(w: &Witness, who: &str, extra: &str) -> String {
    format!(
        "[[task]]\nname = \"leader\"\nlock = \"L\"\nschedule = \"leader\"\ngrace = \"1700ms\"\n{extra}run = {}\n",
        w.run(who)
    )
}

/// Agents `a` (leading, its command running) and `b` (queued behind it)
/// with the same leader task on lock `L`.
async fn a_leads_b_waits(etcd: &LocalEtcd, w: &Witness) -> (CoordProcess, CoordProcess) {
    let a = CoordProcess::run(&agent("a", &etcd.endpoint(), &leader_task(w, "a", "")));
    eventually("a to lead", || async {
        (w.starts().len() == 1).then_some(())
    })
    .await;
    let b = CoordProcess::run(&agent("b", &etcd.endpoint(), &leader_task(w, "b", "")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    (a, b)
}

/// `coord lock` on `lock` running `script`, in the background.
fn coord_lock(etcd: &LocalEtcd, args: &[&str], script: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_coord"))
        .arg("lock")
        .args(args)
        .args(["--endpoints", &etcd.endpoint(), "--", "sh", "-c", script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn coord lock")
}

/// (pid, ppid, state) of every process.
pub(crate) fn processes() -> Vec<(u32, u32, char)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let rest = &stat[stat.rfind(')')? + 2..];
            let mut f = rest.split(' ');
            let state = f.next()?.chars().next()?;
            let ppid = f.next()?.parse().ok()?;
            Some((pid, ppid, state))
        })
        .collect()
}

pub(crate) fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The `coord supervise` processes below `ancestor`.
pub(crate) fn supervisors_under(ancestor: u32) -> Vec<u32> {
    let all = processes();
    let mut below = vec![ancestor];
    let mut found = Vec::new();
    while let Some(p) = below.pop() {
        for (pid, ppid, state) in &all {
            if *ppid == p && *state != 'Z' {
                below.push(*pid);
                if cmdline(*pid).get(1).is_some_and(|a| a == "supervise") {
                    found.push(*pid);
                }
            }
        }
    }
    found
}

/// Live (not zombie) processes whose environment holds `marker`.
fn running_with(marker: &str) -> Vec<(u32, Vec<String>)> {
    processes()
        .into_iter()
        .filter(|(_, _, state)| *state != 'Z')
        .filter(|(pid, _, _)| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.windows(marker.len()).any(|w| w == marker.as_bytes()))
        })
        .map(|(pid, _, _)| (pid, cmdline(pid)))
        .collect()
}

#[tokio::test]
async fn a_reload_that_changes_a_running_leader_task_never_gives_two_leaders() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let w = Witness::new(dir.path(), "L");
    let (mut a, _b) = a_leads_b_waits(&etcd, &w).await;
    // The same task with another environment: a changed task.
    std::fs::write(
        a.manifest_path(),
        agent(
            "a",
            &etcd.endpoint(),
            &leader_task(&w, "a", "env = { CHANGED = \"1\" }\n"),
        ),
    )
    .expect("rewrite manifest");
    a.signal(Signal::SIGHUP);
    eventually("a new leader after the reload", || async {
        (w.starts().len() >= 2).then_some(())
    })
    .await;
    // Long enough for a second leader (or the old command) to show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    w.assert_exclusive();
    assert!(a.is_running());
}

#[tokio::test]
async fn sigterm_to_the_holders_agent_stops_its_command_before_the_waiter_starts() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let w = Witness::new(dir.path(), "L");
    let (mut a, _b) = a_leads_b_waits(&etcd, &w).await;
    a.signal(Signal::SIGTERM);
    let status = a.wait().await;
    assert!(status.success(), "a clean stop: {status}");
    eventually("b to take over", || async {
        (w.starts().len() == 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(w.starts()[1].1, "b");
    // a's command (TERM, then KILL if its 1.5 s stop outran the grace on
    // a loaded machine) was gone before b's started.
    w.assert_exclusive();
}

#[tokio::test]
async fn kill_9_of_the_supervisor_under_coord_lock_stops_the_command_before_release() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let w = Witness::new(dir.path(), "x");
    let mut holder = coord_lock(
        &etcd,
        &["x", "--ttl", "6s", "--grace", "1700ms"],
        &w.script("first"),
    );
    eventually("the first command", || async {
        (w.starts().len() == 1).then_some(())
    })
    .await;
    let mut waiter = coord_lock(&etcd, &["x", "--ttl", "6s"], &w.script("second"));
    let holder_pid = holder.id().expect("pid");
    let supervisor = eventually("the holder's supervisor", || async {
        supervisors_under(holder_pid).first().copied()
    })
    .await;
    // Let the waiter queue.
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill(Pid::from_raw(supervisor as i32), Signal::SIGKILL).expect("kill the supervisor");
    eventually("the waiter to take over", || async {
        (w.starts().len() == 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    w.assert_exclusive();
    let _ = waiter.start_kill();
    let _ = holder.wait().await;
}

#[tokio::test]
async fn kill_9_of_a_tasks_supervisor_stops_the_command_before_the_lock_moves() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let w = Witness::new(dir.path(), "L");
    let (a, _b) = a_leads_b_waits(&etcd, &w).await;
    let agent_pid = a.pid();
    let supervisor = eventually("a's supervisor", || async {
        supervisors_under(agent_pid).first().copied()
    })
    .await;
    kill(Pid::from_raw(supervisor as i32), Signal::SIGKILL).expect("kill the supervisor");
    eventually("a next leader", || async {
        (w.starts().len() >= 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    w.assert_exclusive();
}

#[tokio::test]
async fn deleting_the_holder_key_by_hand_stops_the_command_and_fires_lock_lost() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let dir = tempfile::tempdir().expect("tmp");
    let w = Witness::new(dir.path(), "L");
    let hooks = dir.path().join("hooks");
    let rest = format!(
        "[[hook]]\nname = \"note\"\nexec = [\"sh\", \"-c\", \"echo $COORD_EVENT $COORD_FENCING_TOKEN >> {}\"]\n{}",
        hooks.display(),
        leader_task(&w, "a", "on_change = [\"note\"]\n")
    );
    let _a = CoordProcess::run(&agent("a", &etcd.endpoint(), &rest));
    eventually("a to lead", || async {
        (w.starts().len() == 1).then_some(())
    })
    .await;
    let held = client
        .get_prefix("/coord/locks/L/")
        .await
        .expect("etcd")
        .kvs;
    assert_eq!(held.len(), 1, "one holder key");
    let first = w.starts()[0].0;
    // What an operator does to break a stuck lock.
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.endpoint(), "del", &held[0].key])
        .output()
        .expect("etcdctl must be installed (apt-get install etcd-client)");
    assert!(out.status.success());
    // lock-lost fires once the command is gone (TERM, grace, KILL).
    eventually("lock-lost to fire", || async {
        lines(&hooks)
            .contains(&format!("lock-lost {first}"))
            .then_some(())
    })
    .await;
    let pid: u32 = w
        .lines()
        .first()
        .and_then(|l| l.split(' ').nth(2)?.parse().ok())
        .expect("the first command's pid");
    assert!(
        !processes()
            .iter()
            .any(|(p, _, state)| *p == pid && *state != 'Z'),
        "the command whose key was deleted still runs"
    );
    eventually("the leader to take the lock again", || async {
        (w.starts().len() >= 2).then_some(())
    })
    .await;
    w.assert_exclusive();
}

#[tokio::test]
async fn two_tasks_naming_one_lock_take_turns_each_with_its_own_token() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let w = Witness::new(dir.path(), "shared");
    let task = |name: &str| {
        format!(
            "[[task]]\nname = \"{name}\"\nlock = \"shared\"\nschedule = \"leader\"\ngrace = \"1700ms\"\nrun = {}\n",
            w.run(name)
        )
    };
    let body = format!("{}{}", task("one"), task("two"));
    let mut a = CoordProcess::run(&agent("a", &etcd.endpoint(), &body));
    eventually("a first holder", || async {
        (!w.starts().is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        w.starts().len(),
        1,
        "the second task waits while the first holds:\n{}",
        w.lines().join("\n")
    );
    // A stop hands the lock to nobody else in this agent, but each run
    // ended before the next started.
    a.signal(Signal::SIGTERM);
    a.wait().await;
    w.assert_exclusive();
}

#[tokio::test]
async fn re_entry_is_for_the_same_lock_name_and_a_mode_the_held_one_covers() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let ran = dir.path().join("ran");
    let coord = env!("CARGO_BIN_EXE_coord");
    let ep = etcd.endpoint();
    // Someone else holds `a`.
    let w = Witness::new(dir.path(), "a");
    let mut other = coord_lock(&etcd, &["a", "--ttl", "6s"], &w.script("other"));
    eventually("the holder of a", || async {
        (w.starts().len() == 1).then_some(())
    })
    .await;
    // Holding `a/b` is not holding `a`: the inner lock waits (and times out).
    let inner = format!(
        "{coord} lock a --timeout 1s --endpoints {ep} -- sh -c 'echo a-from-a/b >> {}'",
        ran.display()
    );
    let status = coord_lock(&etcd, &["a/b", "--ttl", "6s"], &inner)
        .wait()
        .await
        .expect("coord lock a/b");
    assert_eq!(status.code(), Some(75), "the inner lock timed out");
    // A reader is not a writer: re-entering for writing is refused.
    let inner = format!(
        "{coord} lock db --mode write --timeout 1s --endpoints {ep} -- sh -c 'echo write-from-read >> {}'",
        ran.display()
    );
    let status = coord_lock(&etcd, &["db", "--mode", "read", "--ttl", "6s"], &inner)
        .wait()
        .await
        .expect("coord lock db");
    assert!(!status.success(), "write from read is refused");
    // A writer re-enters for reading, with the same token.
    let inner = format!(
        "{coord} lock db --mode read --endpoints {ep} -- sh -c 'echo read-from-write $COORD_FENCING_TOKEN >> {}'",
        ran.display()
    );
    let outer = format!(
        "echo outer $COORD_FENCING_TOKEN >> {}; {inner}",
        ran.display()
    );
    let status = coord_lock(&etcd, &["db", "--mode", "write", "--ttl", "6s"], &outer)
        .wait()
        .await
        .expect("coord lock db");
    assert!(status.success());
    let got = lines(&ran);
    assert_eq!(got.len(), 2, "{got:?}");
    let outer_token = got[0].strip_prefix("outer ").expect("outer first");
    assert_eq!(got[1], format!("read-from-write {outer_token}"));
    let _ = other.start_kill();
}

#[tokio::test]
async fn a_semaphore_tasks_every_round_runs_on_one_agent_only() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("rounds");
    // Each run logs the round it belongs to: rounds are 2 s, aligned to
    // the epoch, and a run starts right after its round begins.
    let task = |who: &str| {
        format!(
            "[[task]]\nname = \"tick\"\nlock = \"tick\"\nmode = \"semaphore\"\nlimit = 2\nschedule = \"every 2s\"\n\
             run = [\"sh\", \"-c\", \"echo $(( $(date +%s%3N) / 2000 )) {who} >> {}\"]\n",
            log.display()
        )
    };
    let _a = CoordProcess::run(&agent("a", &etcd.endpoint(), &task("a")));
    let _b = CoordProcess::run(&agent("b", &etcd.endpoint(), &task("b")));
    eventually("six rounds", || async {
        let rounds: std::collections::BTreeSet<String> = lines(&log)
            .iter()
            .filter_map(|l| l.split(' ').next().map(str::to_owned))
            .collect();
        (rounds.len() >= 6).then_some(())
    })
    .await;
    let mut seen = BTreeMap::new();
    for line in lines(&log) {
        let (round, who) = line.split_once(' ').expect("round agent");
        if let Some(first) = seen.insert(round.to_owned(), who.to_owned()) {
            panic!(
                "round {round} ran on {first} and on {who}:\n{}",
                lines(&log).join("\n")
            );
        }
    }
}

#[tokio::test]
async fn nothing_the_agents_started_is_left_running_once_every_agent_has_stopped() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let w = Witness::new(dir.path(), "L");
    let marker = format!("COORD_TEST_MARKER=leftover-{}", std::process::id());
    let (key, value) = marker.split_once('=').expect("k=v");
    let started = dir.path().join("hook-ran");
    // A hook and a task that leave a background child behind.
    let body = |who: &str, extra: &str| {
        format!(
            "[[hook]]\nname = \"bg\"\nenv = {{ {key} = \"{value}\" }}\n\
             exec = [\"sh\", \"-c\", \"sleep 1000 & echo ran >> {started}\"]\n\
             [[task]]\nname = \"bg\"\nschedule = \"every 1s\"\nenv = {{ {key} = \"{value}\" }}\n\
             run = [\"sh\", \"-c\", \"sleep 1000 & sleep 0.2\"]\n{}",
            leader_task(
                &w,
                who,
                &format!("env = {{ {key} = \"{value}\" {extra}}}\non_change = [\"bg\"]\n")
            ),
            started = started.display(),
        )
    };
    let mut a = CoordProcess::run(&agent("a", &etcd.endpoint(), &body("a", "")));
    let mut b = CoordProcess::run(&agent("b", &etcd.endpoint(), &body("b", "")));
    eventually("a leader and a hook run", || async {
        (!w.starts().is_empty() && started.exists()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Edit the leader's task, then stop: the sequence that left a command
    // behind.
    let leader = w.starts()[0].1.clone();
    let (first, second) = if leader == "a" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    std::fs::write(
        first.manifest_path(),
        agent(
            &leader,
            &etcd.endpoint(),
            &body(&leader, ", EDITED = \"1\" "),
        ),
    )
    .expect("rewrite");
    first.signal(Signal::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.signal(Signal::SIGTERM);
    second.signal(Signal::SIGTERM);
    first.wait().await;
    second.wait().await;
    // Whatever was stopping has had its grace.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let left = running_with(&marker);
    for (pid, _) in &left {
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }
    assert!(
        left.is_empty(),
        "left running after every agent stopped: {left:?}"
    );
}
