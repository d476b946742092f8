//! `[[task]]`: commands run only while holding a lock.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Location;
use super::diagnostics::Diagnostics;
use super::file::{HookNames, hook_refs};
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

impl Schedule {
    /// The next round after `now`: (its number, when it starts). Every
    /// agent computes the same: intervals are aligned to the Unix epoch
    /// (the number counts intervals since it), cron times are UTC (the
    /// number is the time's Unix second). `None` for `once` and `leader`,
    /// and for a cron expression with no time left.
    pub fn next_round(&self, now: SystemTime) -> Option<(i64, SystemTime)> {
        match self {
            Schedule::Once | Schedule::Leader => None,
            Schedule::Every(every) => {
                let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
                let every_ms = every.as_millis().max(1);
                let slot = now.as_millis() / every_ms + 1;
                let at = Duration::from_millis((slot * every_ms) as u64);
                Some((slot as i64, UNIX_EPOCH + at))
            }
            Schedule::Cron(expr) => {
                let cron = croner::Cron::from_str(expr).ok()?;
                let now = chrono::DateTime::<chrono::Utc>::from(now);
                let next = cron.find_next_occurrence(&now, false).ok()?;
                Some((next.timestamp(), SystemTime::from(next)))
            }
        }
    }
}

/// The cron dialect coord reads, as messages name it.
pub const CRON_DIALECT: &str = "5 fields: minute hour day-of-month month day-of-week, in UTC \
     (or 6, with seconds first)";

/// A cron field: its name, its bounds, and the names it also takes.
struct CronField {
    name: &'static str,
    range: RangeInclusive<u32>,
    names: &'static [&'static str],
}

/// The leading field of a six-field expression.
const SECONDS: CronField = CronField {
    name: "second",
    range: 0..=59,
    names: &[],
};

const CRON_FIELDS: [CronField; 5] = [
    CronField {
        name: "minute",
        range: 0..=59,
        names: &[],
    },
    CronField {
        name: "hour",
        range: 0..=23,
        names: &[],
    },
    CronField {
        name: "day-of-month",
        range: 1..=31,
        names: &[],
    },
    CronField {
        name: "month",
        range: 1..=12,
        names: &[
            "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
        ],
    },
    CronField {
        name: "day-of-week",
        range: 0..=7,
        names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
    },
];

/// Why `expr` is not a cron expression coord runs, naming the field.
/// crontab's five fields, or six with seconds first (croner's reading,
/// and Quartz's; a task every few seconds needs it). *Why seconds-first
/// rather than refusing six fields:* a refusal would take sub-minute cron
/// schedules away from whoever uses them, while what made the reading a
/// surprise was that nothing showed it — now the README states it and
/// `coord check` prints "seconds first" and the next run beside the
/// expression. Seven fields (a year, to some tools) are refused. croner
/// has the last word on what is left (`L`, `W`, `#`, `@daily`), after the
/// field-by-field check has named any number out of range — croner would
/// only say "Number out of bounds".
pub fn cron_problem(expr: &str) -> Option<String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    if !expr.starts_with('@') {
        let named: Vec<&CronField> = match fields.len() {
            5 => CRON_FIELDS.iter().collect(),
            6 => std::iter::once(&SECONDS)
                .chain(CRON_FIELDS.iter())
                .collect(),
            7 => {
                return Some(format!(
                    "a cron expression has {CRON_DIALECT}; this one has 7, and coord reads no year field"
                ));
            }
            n => {
                return Some(format!(
                    "not \"once\", \"every <duration>\" or \"leader\", and not a cron expression ({CRON_DIALECT}; this has {n} field{})",
                    if n == 1 { "" } else { "s" }
                ));
            }
        };
        for (text, field) in fields.iter().zip(named) {
            if let Some(why) = cron_field_problem(text, field) {
                return Some(format!("{} field: {why}", field.name));
            }
        }
    }
    croner::Cron::from_str(expr)
        .err()
        .map(|e| format!("not a cron expression of {CRON_DIALECT} ({e})"))
}

/// Whether a cron expression has a seconds field.
pub fn cron_has_seconds(expr: &str) -> bool {
    !expr.starts_with('@') && expr.split_whitespace().count() == 6
}

fn cron_field_problem(text: &str, field: &CronField) -> Option<String> {
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (part, None),
        };
        if let Some(step) = step
            && let Ok(n) = step.parse::<u32>()
            && (n == 0 || n > *field.range.end())
        {
            return Some(format!("step /{n} is out of range 1–{}", field.range.end()));
        }
        let ends = match range.split_once('-') {
            Some((a, b)) => vec![a, b],
            None => vec![range],
        };
        for end in ends {
            if let Ok(n) = end.parse::<u32>() {
                if !field.range.contains(&n) {
                    return Some(format!(
                        "{n} is out of range {}–{}",
                        field.range.start(),
                        field.range.end()
                    ));
                }
            } else if end.chars().all(|c| c.is_ascii_alphabetic())
                && end.len() == 3
                && !field.names.iter().any(|n| n.eq_ignore_ascii_case(end))
            {
                return Some(if field.names.is_empty() {
                    format!(
                        "`{end}` is not a number {}–{}",
                        field.range.start(),
                        field.range.end()
                    )
                } else {
                    format!(
                        "`{end}` is neither a number {}–{} nor one of {}",
                        field.range.start(),
                        field.range.end(),
                        field.names.join(" ")
                    )
                });
            }
        }
    }
    None
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
    hooks: &HookNames,
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
            cron => match cron_problem(cron) {
                Some(why) => {
                    d.error(
                        t.span_of("schedule"),
                        format!("invalid `schedule` \"{s}\": {why}"),
                    );
                    None
                }
                None => Some(Schedule::Cron(cron.to_owned())),
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
