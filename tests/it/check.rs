//! `coord check` as a newcomer meets it: one mistake is one error, at its
//! place, with what was probably meant; and what would fail at run time
//! (templates, credentials, directories, plugins) fails the check instead.

use std::path::Path;

use coord::agent::manifest::Manifest;

use crate::support::coord;

const ETCD: &str = "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n";

/// Every error of a manifest text: (line, column, message).
fn errors(text: &str) -> Vec<(usize, usize, String)> {
    match Manifest::parse(Path::new("agent.toml"), text) {
        Ok(_) => panic!("expected errors, the manifest was accepted:\n{text}"),
        Err(e) => e
            .diagnostics
            .into_iter()
            .map(|d| (d.line, d.column, d.message))
            .collect(),
    }
}

/// Writes `text` as `agent.toml` in `dir` and runs `coord check` on it.
fn check_in(dir: &Path, text: &str) -> (Option<i32>, String, String) {
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).expect("write the manifest");
    let (status, out, err) = coord(&["check", path.to_str().expect("utf-8")], Some(dir));
    (status.code(), out, err)
}

/// The stderr lines that are located errors.
fn located(err: &str) -> Vec<&str> {
    err.lines().filter(|l| l.contains(": error: ")).collect()
}

#[test]
fn one_misspelt_hook_name_is_one_located_error_not_a_cascade_of_unknown_hooks() {
    let text = format!(
        "{ETCD}
[[hook]]
nmae = \"notify\"
exec = [\"true\"]

[[file]]
path = \"out.txt\"
source = \"x\"
on_change = [\"notify\"]

[[service]]
name = \"api\"
address = \"127.0.0.1:8080\"
on_change = [\"notify\"]

[[task]]
name = \"t\"
run = [\"true\"]
schedule = \"once\"
on_change = [\"notify\"]

[[instance_id]]
pool = \"worker\"
size = 4
on_change = [\"notify\"]
"
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "one typo, one error: {errs:#?}");
    let (line, column, message) = &errs[0];
    assert_eq!((*line, *column), (5, 1), "{message}");
    assert!(
        message.contains("unknown field `nmae` in [[hook]]; did you mean `name`"),
        "{message}"
    );

    // As the operator sees it.
    let dir = tempfile::tempdir().expect("tmp");
    let (code, _, err) = check_in(dir.path(), &text);
    assert_eq!(code, Some(64), "{err}");
    let lines = located(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("agent.toml:5:1: error: unknown field `nmae`"),
        "{err}"
    );
    assert!(err.contains("the manifest has 1 problem;"), "{err}");
}

#[test]
fn a_hook_with_another_mistake_still_counts_as_defined_and_a_misspelt_reference_gets_a_did_you_mean()
 {
    let text = format!(
        "{ETCD}
[[hook]]
name = \"notify\"
exec = [\"true\"]
timeout = \"soon\"

[[file]]
path = \"out.txt\"
source = \"x\"
on_change = [\"notify\", \"notfy\"]
"
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].2.contains("invalid `timeout` in [[hook]]"),
        "{errs:#?}"
    );
    assert!(
        errs[1]
            .2
            .contains("unknown hook `notfy` in `on_change`; did you mean `notify`?"),
        "{errs:#?}"
    );
}

#[test]
fn cron_mistakes_name_the_field_and_its_range_and_six_fields_are_refused_with_the_dialect() {
    let task = |schedule: &str| {
        format!("{ETCD}\n[[task]]\nname = \"t\"\nrun = [\"true\"]\nschedule = \"{schedule}\"\n")
    };
    let cases: &[(&str, &[&str])] = &[
        ("61 * * * *", &["minute field", "61 is out of range 0–59"]),
        ("0 24 * * *", &["hour field", "24 is out of range 0–23"]),
        (
            "0 0 0 * *",
            &["day-of-month field", "0 is out of range 1–31"],
        ),
        ("0 0 1 13 *", &["month field", "13 is out of range 1–12"]),
        ("0 0 * * 8", &["day-of-week field", "8 is out of range 0–7"]),
        (
            "0 0 * * 1-9",
            &["day-of-week field", "9 is out of range 0–7"],
        ),
        ("*/0 * * * *", &["minute field", "step /0"]),
        ("0 0 * FOO *", &["month field", "`FOO`", "JAN"]),
        (
            "0 0 3 * * *",
            &[
                "5 fields: minute hour day-of-month month day-of-week, in UTC",
                "6 fields",
                "seconds",
                "every 30s",
            ],
        ),
        ("0 3 * *", &["5 fields", "this has 4 fields"]),
    ];
    for (schedule, words) in cases {
        let errs = errors(&task(schedule));
        assert_eq!(errs.len(), 1, "{schedule}: {errs:#?}");
        let (line, column, message) = &errs[0];
        assert_eq!((*line, *column), (7, 12), "{schedule}: {message}");
        assert!(
            message.starts_with(&format!("invalid `schedule` \"{schedule}\": ")),
            "{message}"
        );
        for w in *words {
            assert!(
                message.contains(w),
                "{schedule}: `{message}` should say `{w}`"
            );
        }
        assert!(!message.contains("Component error"), "{message}");
    }
    for good in [
        "0 3 * * MON-FRI",
        "*/15 * * * *",
        "0 0 1 JAN,JUL *",
        "0 0 * * 7",
        "@daily",
    ] {
        Manifest::parse(Path::new("agent.toml"), &task(good))
            .unwrap_or_else(|e| panic!("`{good}` is a good cron expression: {e}"));
    }
}

#[test]
fn check_prints_the_next_run_of_each_scheduled_task() {
    let dir = tempfile::tempdir().expect("tmp");
    let text = format!(
        "[agent]\nstate_dir = \"state\"\n{ETCD}
[[task]]
name = \"nightly\"
run = [\"true\"]
schedule = \"30 3 * * *\"

[[task]]
name = \"hourly\"
run = [\"true\"]
schedule = \"every 1h\"

[[task]]
name = \"setup\"
run = [\"true\"]
schedule = \"once\"
"
    );
    let (code, out, err) = check_in(dir.path(), &text);
    assert_eq!(code, Some(0), "{err}");
    let line = |task: &str| {
        out.lines()
            .find(|l| l.contains(&format!("task   {task} ")))
            .unwrap_or_else(|| panic!("no line for task {task}:\n{out}"))
            .to_owned()
    };
    let nightly = line("nightly");
    assert!(nightly.contains("(cron 30 3 * * *, next run "), "{nightly}");
    assert!(nightly.contains("T03:30:00Z)"), "{nightly}");
    let hourly = line("hourly");
    assert!(hourly.contains("(every 1h, next run "), "{hourly}");
    assert!(hourly.contains(":00:00Z)"), "{hourly}");
    assert!(!line("setup").contains("next run"), "{out}");
}
