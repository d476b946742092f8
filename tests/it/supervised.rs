//! What a lock-guarded command gets from its supervisor, which starts it
//! without a fork (`process::spawn_leader`): the process a shell expects —
//! stdin from /dev/null, SIGPIPE at its default, the lock's variables and
//! none of coord's secrets — and death with the supervisor even when
//! nobody is left to notice.

use std::io::Write as _;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::guarded::{processes, supervisors_under};
use crate::support::{etcd, eventually};

#[tokio::test]
async fn a_guarded_command_runs_as_a_shell_expects() {
    let etcd = etcd().await;
    let script = "if read -r line; then echo \"stdin:$line\"; else echo stdin:eof; fi; \
                  yes | head -n1 >/dev/null; echo \"pipe:${PIPESTATUS[0]}\"; \
                  echo \"token:${COORD_FENCING_TOKEN:-none}\"; \
                  echo \"password:${COORD_PASSWORD:-none}\"";
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_coord"))
        .args(["lock", "shell", "--endpoints", &etcd.endpoint(), "--"])
        .args(["bash", "-c", script])
        .env("COORD_PASSWORD", "hunter2")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn coord lock");
    // Input for coord, which is not the command's to read.
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"not for the command\n")
        .expect("write");
    let out = child.wait_with_output().expect("coord lock");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "stdin:eof", "{stdout}");
    // 141 = 128 + SIGPIPE: `yes` was killed by the signal, as in a shell;
    // with SIGPIPE ignored it would print an error and exit 1.
    assert_eq!(lines[1], "pipe:141", "{stdout}");
    let token: i64 = lines[2]
        .strip_prefix("token:")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no fencing token: {stdout}"));
    assert!(token > 0, "{stdout}");
    assert_eq!(lines[3], "password:none", "{stdout}");
}

#[tokio::test]
async fn a_command_that_cannot_start_exits_127_and_says_why() {
    let etcd = etcd().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_coord"))
        .args(["lock", "missing", "--endpoints", &etcd.endpoint(), "--"])
        .arg("coord-test-no-such-program")
        .output()
        .expect("coord lock");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(127), "{stderr}");
    assert!(
        stderr.contains("cannot start `coord-test-no-such-program`")
            && stderr.contains("No such file or directory"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_guarded_command_dies_with_its_supervisor_when_nobody_is_left_to_stop_it() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let pid_file = dir.path().join("pid");
    // Deaf to TERM, so that only the kernel's death signal can end it.
    let script = format!(
        "trap '' TERM; echo $$ > {}; while :; do sleep 0.1; done",
        pid_file.display()
    );
    let mut holder = tokio::process::Command::new(env!("CARGO_BIN_EXE_coord"))
        .args([
            "lock",
            "orphan",
            "--ttl",
            "30s",
            "--endpoints",
            &etcd.endpoint(),
        ])
        .args(["--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn coord lock");
    let command: i32 = eventually("the command's pid", || async {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
    })
    .await;
    let holder_pid = holder.id().expect("pid");
    let supervisor = eventually("the supervisor", || async {
        supervisors_under(holder_pid).first().copied()
    })
    .await;
    // `coord lock` cannot act (as if killed in the same `pkill -9`), then
    // the supervisor goes.
    kill(Pid::from_raw(holder_pid as i32), Signal::SIGSTOP).expect("stop coord lock");
    kill(Pid::from_raw(supervisor as i32), Signal::SIGKILL).expect("kill the supervisor");
    let running = || {
        processes()
            .iter()
            .any(|(pid, _, state)| *pid == command as u32 && *state != 'Z')
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while running() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = running();
    let _ = kill(Pid::from_raw(command), Signal::SIGKILL);
    let _ = kill(Pid::from_raw(holder_pid as i32), Signal::SIGKILL);
    let _ = holder.wait().await;
    assert!(
        !left,
        "the command (pid {command}) outlived its supervisor with nobody to stop it"
    );
}
