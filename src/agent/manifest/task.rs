//! `[[task]]`: commands run only while holding a lock.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use super::Location;
use super::diagnostics::Diagnostics;
use super::file::hook_refs;
use super::reader::{TableReader, check_range};
use crate::lock::Mode;

/// One `[[task]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    pub name: String,
    /// The lock's name (default: the task's name).
    pub lock: String,
    pub mode: Mode,
    pub run: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Longest a run may take (then TERM, grace, KILL); none for leaders.
    pub timeout: Option<Duration>,
    /// Time between TERM and KILL.
    pub grace: Duration,
    pub schedule: Schedule,
    /// Hooks for lock-acquired, lock-lost and task-finished.
    pub on_change: Vec<String>,
    pub location: Location,
}

/// When a task runs. A closed set.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// Once across the fleet: the first successful run leaves a done
    /// marker in etcd, and nobody runs it again while it is there.
    Once,
    /// Every interval, on one holder at a time; a round another agent
    /// already ran is skipped.
    Every(Duration),
    /// At the times of a cron expression (UTC), likewise once per time.
    Cron(String),
    /// Keep the command running while holding the lock; restart it with
    /// backoff when it exits.
    Leader,
}

pub const DEFAULT_GRACE: Duration = Duration::from_secs(2);
/// A task's `timeout`.
pub const TASK_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(30 * 24 * 3600);
/// `grace`: between TERM and KILL (zero: KILL at once).
pub const GRACE_RANGE: RangeInclusive<Duration> = Duration::ZERO..=Duration::from_secs(3600);
/// `schedule = "every <d>"`: each round takes a lock in etcd, so not a
/// hot loop, and at most yearly.
pub const EVERY_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(31_557_600);
/// A semaphore's `limit`.
pub const LIMIT_RANGE: RangeInclusive<u32> = 1..=100_000;

pub(super) fn task(
    d: &mut Diagnostics<'_>,
    mut t: TableReader<'_, '_>,
    hooks: &[String],
) -> Option<TaskSpec> {
    let before = d.len();
    let name = t.required::<String>(d, "name", "give the task a name");
    if let Some(n) = &name
        && (n.is_empty() || n.contains('/'))
    {
        d.error(
            t.span_of("name"),
            format!("invalid task name `{n}`: non-empty, without `/`"),
        );
    }
    let lock = t.optional::<String>(d, "lock");
    let mode_name = t.optional::<String>(d, "mode");
    let limit = t.within(d, "limit", LIMIT_RANGE);
    let mode = match (mode_name.as_deref(), limit) {
        (None | Some("mutex"), None) => Some(Mode::Mutex),
        (Some("read"), None) => Some(Mode::Read),
        (Some("write"), None) => Some(Mode::Write),
        (Some("semaphore"), Some(n)) => Some(Mode::Semaphore(n)),
        // Given but out of range: already reported.
        (Some("semaphore"), None) if t.has("limit") => None,
        (Some("semaphore"), _) => {
            d.error(
                t.span_of("mode"),
                "a semaphore needs `limit = N` (at least 1)",
            );
            None
        }
        (Some("mutex" | "read" | "write") | None, Some(_)) => {
            d.error(t.span_of("limit"), "`limit` goes with mode = \"semaphore\"");
            None
        }
        (Some(other), _) => {
            d.error(
                t.span_of("mode"),
                format!("unknown lock `mode` \"{other}\": use mutex, read, write or semaphore"),
            );
            None
        }
    };
    let run = t.required::<Vec<String>>(
        d,
        "run",
        "give the command, e.g. run = [\"/usr/local/bin/report\"]",
    );
    if run
        .as_ref()
        .is_some_and(|r| r.is_empty() || r[0].is_empty())
    {
        d.error(
            t.span_of("run"),
            "`run` is empty: give the program and its arguments",
        );
    }
    let env = t
        .optional::<BTreeMap<String, String>>(d, "env")
        .unwrap_or_default();
    let timeout = t.within(d, "timeout", TASK_TIMEOUT_RANGE);
    let grace = t.within(d, "grace", GRACE_RANGE).unwrap_or(DEFAULT_GRACE);
    let schedule = match t.required::<String>(
        d,
        "schedule",
        "say when: \"once\", \"every 1h\", a cron expression or \"leader\"",
    ) {
        None => None,
        Some(s) => match s.trim() {
            "once" => Some(Schedule::Once),
            "leader" => Some(Schedule::Leader),
            every if every.starts_with("every ") => {
                match humantime::parse_duration(every[6..].trim()) {
                    Ok(every) => match check_range(&every, &EVERY_RANGE) {
                        Ok(()) => Some(Schedule::Every(every)),
                        Err(why) => {
                            d.error(
                                t.span_of("schedule"),
                                format!("invalid `schedule` \"{s}\": {why}"),
                            );
                            None
                        }
                    },
                    Err(_) => {
                        d.error(
                            t.span_of("schedule"),
                            format!("invalid `schedule` \"{s}\": write it like \"every 10m\""),
                        );
                        None
                    }
                }
            }
            cron => match croner::Cron::from_str(cron) {
                Ok(_) => Some(Schedule::Cron(cron.to_owned())),
                Err(e) => {
                    d.error(
                        t.span_of("schedule"),
                        format!("invalid `schedule` \"{s}\": not once, every <d> or leader, and not a cron expression ({e})"),
                    );
                    None
                }
            },
        },
    };
    if timeout.is_some() && schedule == Some(Schedule::Leader) {
        d.error(
            t.span_of("timeout"),
            "a leader runs as long as it holds the lock: no `timeout`",
        );
    }
    let on_change = hook_refs(d, &mut t, "on_change", hooks);
    let location = d.locate(t.span());
    t.finish(d);
    let name = name?;
    (d.len() == before).then(|| TaskSpec {
        lock: lock.unwrap_or_else(|| name.clone()),
        name,
        mode: mode.unwrap_or(Mode::Mutex),
        run: run.unwrap_or_default(),
        env,
        timeout,
        grace,
        schedule: schedule.unwrap_or(Schedule::Once),
        on_change,
        location,
    })
}
