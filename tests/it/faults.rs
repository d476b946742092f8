//! Faults of the agent's environment, each tried for real: the agent keeps
//! its promises, or says why once and recovers by itself.

use std::io::{BufRead, BufReader, PipeReader, PipeWriter};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use coord::etcd::{Client, KeyValue};
use nix::sys::signal::Signal;

use crate::support::{CoordProcess, etcd, eventually, manifest, repo_root};

const TTL: u64 = 2;

/// A pipe for a child's output, as small as Linux allows (one page), so
/// that a reader that stops reading leaves it full after a few log lines.
fn small_pipe() -> (PipeReader, PipeWriter) {
    let (reader, writer) = std::io::pipe().expect("pipe");
    nix::fcntl::fcntl(writer.as_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096))
        .expect("shrink the pipe");
    (reader, writer)
}

/// What the operator's log reader does.
#[derive(Clone, Copy)]
enum Reader {
    /// Reads what it wants and exits, like `| head -n 1`: writes then fail
    /// with EPIPE.
    ExitsAfterOneLine,
    /// Stays, but never reads again, like a hung log shipper: the pipe
    /// fills and writes block.
    StopsReading,
}

/// Reads up to the line that starts with `until` (the first line when
/// empty), then leaves or stops reading: the read end while it stays, and
/// the rest of that line.
fn act(reader: Reader, pipe: PipeReader, until: &str) -> (Option<PipeReader>, String) {
    let mut pipe = BufReader::with_capacity(1, pipe);
    let rest = loop {
        let mut line = String::new();
        pipe.read_line(&mut line).expect("coord's output");
        assert!(!line.is_empty(), "coord's output ended before `{until}`");
        if let Some(rest) = line.trim_end().strip_prefix(until) {
            break rest.to_owned();
        }
    };
    match reader {
        Reader::ExitsAfterOneLine => (None, rest),
        Reader::StopsReading => (Some(pipe.into_inner()), rest),
    }
}

/// Whether a thread of process `pid` is blocked writing into a pipe.
fn blocked_writing_to_a_pipe(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("wchan")).is_ok_and(|w| w.contains("pipe_write"))
    })
}

/// Renders are logged: puts `/app/x` until coord's log pipe is full and a
/// write into it blocks.
async fn fill_the_log(client: &Client, file: &Path, pid: u32) {
    let mut n = 0;
    eventually("coord to block writing into its full log pipe", || {
        n += 1;
        let value = format!("fill{n}");
        async move {
            client.put("/app/x", value.as_str(), None).await.ok()?;
            rendered(file, &value).await;
            blocked_writing_to_a_pipe(pid).then_some(())
        }
    })
    .await;
}

/// A `[[file]]` at `path` holding the value of `/app/x`.
fn file_of_app_x(path: &Path) -> String {
    format!(
        "\n[[file]]\npath = \"{}\"\nsource = \"{{{{ key_or('/app/x', 'none') }}}}\"\n",
        path.display()
    )
}

async fn present(client: &Client, key: &str) -> KeyValue {
    eventually("the presence key", || async {
        client.get(key).await.ok().flatten()
    })
    .await
}

async fn rendered(path: &Path, want: &str) {
    eventually(&format!("{} to hold {want}", path.display()), || async {
        (std::fs::read_to_string(path).ok()? == want).then_some(())
    })
    .await;
}

/// An agent whose stdout and stderr are one pipe read by `reader`: it must
/// register, render every put, keep its session past several TTLs and stop
/// cleanly on SIGTERM.
async fn agent_keeps_working_when_its_log_reader(reader: Reader) {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let out = tempfile::tempdir().expect("tmp");
    let file = out.path().join("x.txt");
    let text = manifest("piped", &[etcd.endpoint()], TTL) + &file_of_app_x(&file);
    let (read_end, write_end) = small_pipe();
    let mut agent = CoordProcess::run_with_output(&text, &["run", "{manifest}"], write_end);
    let (still_open, _) = act(reader, read_end, "");
    let before = present(&client, "/coord/agents/piped").await;
    rendered(&file, "none").await;
    if still_open.is_some() {
        fill_the_log(&client, &file, agent.pid()).await;
    }
    // Several TTLs of puts: each must reach the file.
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(3 * TTL + 1) {
        round += 1;
        let value = format!("v{round}");
        client
            .put("/app/x", value.as_str(), None)
            .await
            .expect("put");
        rendered(&file, &value).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = present(&client, "/coord/agents/piped").await;
    assert_eq!(
        after.lease, before.lease,
        "the agent lost its session while nobody read its log"
    );

    let signalled = Instant::now();
    agent.signal(Signal::SIGTERM);
    let status = agent.wait().await;
    eprintln!("SIGTERM -> exited: {:?}", signalled.elapsed());
    assert!(status.success(), "a clean stop exits 0: {status}");
    assert_eq!(
        client.get("/coord/agents/piped").await.expect("get"),
        None,
        "presence still there: the lease was not revoked"
    );
}

#[tokio::test]
async fn an_agent_whose_log_reader_exits_keeps_rendering_and_stops_on_sigterm() {
    agent_keeps_working_when_its_log_reader(Reader::ExitsAfterOneLine).await;
}

#[tokio::test]
async fn an_agent_whose_log_reader_stops_reading_keeps_rendering_and_stops_on_sigterm() {
    agent_keeps_working_when_its_log_reader(Reader::StopsReading).await;
}

/// `coord dev | tee log`, then Ctrl-C (which ends `tee` too), or a `tee`
/// that hangs: the agent stops and so does the etcd it started.
async fn dev_stops_its_etcd_when_its_log_reader(reader: Reader) {
    let out = tempfile::tempdir().expect("tmp");
    let file = out.path().join("x.txt");
    let example = std::fs::read_to_string(repo_root().join("agent.toml.example")).expect("example")
        + &file_of_app_x(&file);
    let (read_end, write_end) = small_pipe();
    let mut dev = CoordProcess::run_with_output(&example, &["dev", "{manifest}"], write_end);
    let (still_open, endpoint) = act(reader, read_end, "coord dev: etcd is up at ");
    let opts = coord::etcd::ConnectOptions::new(vec![endpoint.clone()]);
    let client = Client::connect(&opts)
        .await
        .expect("connect to coord dev's etcd");
    present(&client, "/coord/agents/example-agent").await;
    rendered(&file, "none").await;
    if still_open.is_some() {
        fill_the_log(&client, &file, dev.pid()).await;
    }

    let signalled = Instant::now();
    dev.signal(Signal::SIGINT);
    let status = dev.wait().await;
    eprintln!("SIGINT -> coord dev exited: {:?}", signalled.elapsed());
    assert!(status.success(), "Ctrl-C stops coord dev cleanly: {status}");
    let addr = endpoint.trim_start_matches("http://");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "coord dev exited but its etcd still answers at {addr}"
    );
}

#[tokio::test]
async fn dev_whose_log_reader_exits_stops_its_etcd_on_ctrl_c() {
    dev_stops_its_etcd_when_its_log_reader(Reader::ExitsAfterOneLine).await;
}

#[tokio::test]
async fn dev_whose_log_reader_stops_reading_stops_its_etcd_on_ctrl_c() {
    dev_stops_its_etcd_when_its_log_reader(Reader::StopsReading).await;
}

/// Text from etcd and from hooks, each carrying a forged log line: a TTL
/// note, another agent's host name, a shell hook's output and a value a
/// WASM plugin logs. None may start a line of the agent's log, move the
/// cursor or recolour a terminal.
#[tokio::test]
async fn text_from_etcd_and_hooks_never_starts_a_log_line_of_its_own() {
    const FORGED: &str = "2026-01-01T00:00:00.000000Z ERROR coord: FORGED";
    let etcd = etcd().await;
    let client = etcd.client().await;
    // The name is held, for now, by an "agent" whose host name forges a line.
    let holder = coord::etcd::Session::start(client.clone(), Duration::from_secs(60));
    let lease = holder.wait_alive().await;
    let record = serde_json::json!({
        "version": "0", "manifest_hash": "", "started_at": "",
        "host": format!("evil\n{FORGED}-HOST"), "pid": 1,
    });
    client
        .put("/coord/agents/forger", record.to_string(), Some(lease))
        .await
        .expect("put the holder's record");
    client
        .put("/app/evil", format!("x\n{FORGED}-PLUGIN\r\x1b[2K"), None)
        .await
        .expect("put");
    let misbehave = crate::support::plugins().misbehave.display().to_string();
    let text = format!(
        "{}
[[service]]
name = \"api\"
address = \"127.0.0.1:1\"
check = {{ ttl = \"1h\" }}
on_change = [\"shout\", \"reader\"]

[[hook]]
name = \"shout\"
exec = [\"printf\", \"hook says\\r{FORGED}-HOOK \\u001b[2K\\n\"]

[[hook]]
name = \"reader\"
wasm = \"{misbehave}\"
config = {{ mode = \"read\", key = \"/app/evil\" }}
read_prefixes = [\"/app/\"]
",
        manifest("forger", &[etcd.endpoint()], 10)
    );
    let agent = CoordProcess::run(&text);
    let logged = |what: &'static str| {
        let agent = &agent;
        async move {
            eventually(&format!("the agent to log {what}"), || async {
                agent.log().contains(what).then_some(())
            })
            .await
        }
    };
    logged("Another agent already uses this name").await;
    holder.close().await;
    // Now the agent holds its name; a report with a forged line arrives.
    let report =
        serde_json::json!({ "status": "passing", "output": format!("fine\n{FORGED}-NOTE") });
    client
        .put(
            &coord::registry::check_key("/coord", "api", "forger-api"),
            report.to_string(),
            None,
        )
        .await
        .expect("put the report");
    for what in ["FORGED-HOST", "FORGED-NOTE", "FORGED-HOOK", "FORGED-PLUGIN"] {
        logged(what).await;
    }
    let log = agent.log();
    for line in log.lines() {
        assert!(
            !line.contains("FORGED") || !line.starts_with("2026-01-01"),
            "a forged line made it into the log:\n{log}"
        );
    }
    assert!(
        !log.contains('\r') && !log.contains('\x1b'),
        "control characters reached the log:\n{log}"
    );
}

/// `[agent]` with `state_dir`, the etcd of `etcd`, a service, two id pools
/// with files in `out` and a file rendered from `/app/x`.
fn manifest_with_state_dir(endpoint: &str, state_dir: &Path, out: &Path) -> String {
    format!(
        "[agent]\nname = \"web-01\"\nttl = \"{TTL}s\"\nstate_dir = \"{}\"\n\n\
         [etcd]\nendpoints = [\"{endpoint}\"]\n\n\
         [[service]]\nname = \"api\"\naddress = \"10.0.0.1:80\"\n\n\
         [[instance_id]]\npool = \"worker\"\nsize = 8\nfile = \"{}\"\n\n\
         [[instance_id]]\npool = \"shard\"\nsize = 8\nfile = \"{}\"\n{}",
        state_dir.display(),
        out.join("worker-id").display(),
        out.join("shard-id").display(),
        file_of_app_x(&out.join("x.txt"))
    )
}

#[tokio::test]
async fn an_agent_whose_state_dir_cannot_be_written_keeps_its_promises_and_recovers() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let out = tempfile::tempdir().expect("tmp");
    // Tests run as root, which ignores permission bits: a regular file
    // where the directory should be makes it unwritable for anyone.
    let state_dir = out.path().join("state");
    std::fs::write(&state_dir, "not a directory").expect("a file in the way");
    client.put("/app/x", "one", None).await.expect("put");
    let agent = CoordProcess::run(&manifest_with_state_dir(
        &etcd.endpoint(),
        &state_dir,
        out.path(),
    ));
    // Everything that needs no state works.
    present(&client, "/coord/agents/web-01").await;
    present(&client, "/coord/services/api/web-01-api").await;
    rendered(&out.path().join("x.txt"), "one").await;
    let mut ids = Vec::new();
    for pool in ["worker", "shard"] {
        let file = out.path().join(format!("{pool}-id"));
        let id = eventually(&format!("the {pool} id file"), || async {
            std::fs::read_to_string(&file)
                .ok()
                .filter(|s| s.ends_with('\n'))
        })
        .await;
        let key = format!("/coord/ids/{pool}/{}", id.trim());
        assert!(client.get(&key).await.expect("etcd").is_some(), "{key}");
        ids.push((pool, id.trim().to_owned()));
    }
    eventually("the agent to say what it cannot do", || {
        let said = agent.log().contains("Cannot write to the state directory");
        async move { said.then_some(()) }
    })
    .await;
    client.put("/app/x", "two", None).await.expect("put");
    rendered(&out.path().join("x.txt"), "two").await;
    let (status, _, err) = crate::support::coord(
        &["check", agent.manifest_path().to_str().expect("utf-8")],
        None,
    );
    assert!(status.success(), "no error, the agent copes: {err}");
    assert!(
        err.contains("warning: [agent] state_dir") && err.contains("not a directory"),
        "`coord check` warns: {err}"
    );

    // Writable again: the ids are remembered without a restart.
    std::fs::remove_file(&state_dir).expect("remove the file in the way");
    for (pool, id) in &ids {
        let remembered = state_dir.join("ids").join(pool);
        eventually(&format!("the {pool} id remembered"), || async {
            (std::fs::read_to_string(&remembered).ok()?.trim() == id).then_some(())
        })
        .await;
    }
    eventually("the agent to say it recovered", || {
        let said = agent.log().contains("state directory is writable again");
        async move { said.then_some(()) }
    })
    .await;
    let log = agent.log();
    assert_eq!(
        log.matches("Cannot write to the state directory").count(),
        1,
        "said once for the whole agent:\n{log}"
    );
    assert!(
        log.contains("Not a directory"),
        "the reason is given:\n{log}"
    );
}

/// The lowest descriptor number process `pid` does not use: with its
/// open-file limit there, it can open nothing more.
fn lowest_free_fd(pid: u32) -> u64 {
    let used: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the agent's descriptors")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).unwrap_or(0)
}

/// Sets the soft open-file limit of the running process `pid`.
fn set_open_file_limit(pid: u32, soft: u64) {
    let out = crate::support::run_tool(
        "prlimit",
        &["--pid", &pid.to_string(), &format!("--nofile={soft}:")],
        "install util-linux (apt-get install util-linux)",
    );
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// CPU time process `pid` has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the agent's stat");
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15, the 12th and 13th after it.
    fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0)
}

#[tokio::test]
async fn an_agent_at_its_open_file_limit_says_why_once_keeps_its_files_and_recovers() {
    let etcd = etcd().await;
    let client = etcd.client().await;
    let out = tempfile::tempdir().expect("tmp");
    let file = out.path().join("x.txt");
    let hooks = out.path().join("hooks.log");
    client.put("/app/x", "one", None).await.expect("put");
    let mut agent = CoordProcess::run(&format!(
        "{}\n[[hook]]\nname = \"note\"\nexec = [\"sh\", \"-c\", \"echo $COORD_EVENT >> {}\"]\n\n\
         [[service]]\nname = \"api\"\naddress = \"127.0.0.1:1\"\n\
         check = {{ exec = [\"true\"], interval = \"1s\" }}\n\
         [[file]]\npath = \"{}\"\nsource = \"{{{{ key_or('/app/x', 'none') }}}}\"\non_change = [\"note\"]\n",
        manifest("web-01", &[etcd.endpoint()], TTL),
        hooks.display(),
        file.display()
    ));
    rendered(&file, "one").await;
    let health = "/coord/health/api/web-01-api";
    let passing = |client: Client| async move {
        eventually("the service passing", || async {
            let kv = client.get(health).await.ok()??;
            kv.value_str().contains("passing").then_some(())
        })
        .await
    };
    passing(client.clone()).await;
    eventually("the first file-changed hook", || async {
        std::fs::read_to_string(&hooks)
            .ok()
            .filter(|h| h.lines().count() == 1)
    })
    .await;

    // Not one more descriptor: no file opened, no process started.
    let pid = agent.pid();
    set_open_file_limit(pid, lowest_free_fd(pid));
    client.put("/app/x", "two", None).await.expect("put");
    eventually("the agent to name its open-file limit", || {
        let said = agent.log().contains("reached its open-file limit");
        async move { said.then_some(()) }
    })
    .await;
    let c = client.clone();
    eventually("the check, which cannot start, to report critical", || {
        let c = c.clone();
        async move {
            let kv = c.get(health).await.ok()??;
            kv.value_str().contains("critical").then_some(())
        }
    })
    .await;
    let ticks = cpu_ticks(pid);
    // A few of the agent's retries (renders every 5 s, checks every 1 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let spent = cpu_ticks(pid) - ticks;
    assert!(agent.is_running(), "the agent must not crash");
    assert_eq!(
        std::fs::read_to_string(&file).expect("the file"),
        "one",
        "the old file is kept"
    );
    // Spinning would take a whole core: 600 ticks in 6 s.
    assert!(spent < 300, "the agent spins: {spent} ticks of CPU in 6 s");

    // Descriptors free again: everything catches up by itself.
    set_open_file_limit(pid, 1024);
    rendered(&file, "two").await;
    passing(client.clone()).await;
    eventually("the second file-changed hook", || async {
        std::fs::read_to_string(&hooks)
            .ok()
            .filter(|h| h.lines().count() == 2)
    })
    .await;
    let log = agent.log();
    assert_eq!(
        log.matches("reached its open-file limit").count(),
        1,
        "the cause is said once:\n{log}"
    );
    assert!(
        log.contains("File descriptors can be had again"),
        "the recovery is said:\n{log}"
    );
    agent.signal(Signal::SIGTERM);
    assert!(agent.wait().await.success());
    assert_eq!(
        client.get("/coord/agents/web-01").await.expect("etcd"),
        None
    );
}

/// libfaketime's preload library, or a failure saying how to install it.
fn libfaketime() -> std::path::PathBuf {
    let candidates = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketime.so.1"))
        .chain([std::path::PathBuf::from(
            "/usr/lib/faketime/libfaketime.so.1",
        )]);
    for lib in candidates {
        if lib.is_file() {
            return lib;
        }
    }
    panic!(
        "libfaketime is not installed; install it with `apt-get install faketime` (or deploy/install-deps.sh --tests)"
    )
}

/// The rounds a task wrote to `log`, once it holds at least `n`.
async fn rounds(log: &Path, n: usize) -> Vec<i64> {
    eventually(&format!("{n} rounds in {}", log.display()), || async {
        let text = std::fs::read_to_string(log).ok()?;
        let rounds: Vec<i64> = text.lines().filter_map(|l| l.parse().ok()).collect();
        (rounds.len() >= n).then_some(rounds)
    })
    .await
}

#[tokio::test]
async fn task_schedules_neither_skip_nor_double_run_a_round_when_the_wall_clock_steps_back_and_forward()
 {
    let lib = libfaketime();
    let etcd = etcd().await;
    let client = etcd.client().await;
    let out = tempfile::tempdir().expect("tmp");
    // libfaketime reads the agent's offset from this file at each reading
    // of the wall clock; the monotonic and boot clocks stay true, as they
    // do when a clock is stepped.
    let offset = out.path().join("faketime");
    std::fs::write(&offset, "+0\n").expect("offset");
    let every = out.path().join("every.log");
    let cron = out.path().join("cron.log");
    let task = |name: &str, schedule: &str, log: &Path| {
        format!(
            "\n[[task]]\nname = \"{name}\"\nlock = \"{name}\"\nschedule = \"{schedule}\"\n\
             run = [\"sh\", \"-c\", \"echo $COORD_TASK_ROUND >> {}\"]\n",
            log.display()
        )
    };
    let agent = CoordProcess::run_with_env(
        &format!(
            "{}{}{}",
            manifest("web-01", &[etcd.endpoint()], 5),
            task("every", "every 3s", &every),
            task("cron", "*/3 * * * * *", &cron)
        ),
        &[
            ("LD_PRELOAD", lib.as_os_str()),
            ("FAKETIME_TIMESTAMP_FILE", offset.as_os_str()),
            ("FAKETIME_NO_CACHE", "1".as_ref()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".as_ref()),
        ],
    );
    let presence = present(&client, "/coord/agents/web-01").await;
    let counted = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .count()
    };
    rounds(&every, 2).await;
    rounds(&cron, 2).await;

    std::fs::write(&offset, "-1h\n").expect("step back");
    eventually("the agent to see the step back", || {
        let seen = agent.log().contains("wall clock stepped back");
        async move { seen.then_some(()) }
    })
    .await;
    let (e, c) = (counted(&every), counted(&cron));
    rounds(&every, e + 2).await;
    rounds(&cron, c + 2).await;

    std::fs::write(&offset, "+0\n").expect("step forward");
    eventually("the agent to see the step forward", || {
        let seen = agent.log().contains("wall clock stepped forward");
        async move { seen.then_some(()) }
    })
    .await;
    let (e, c) = (counted(&every), counted(&cron));
    let every_rounds = rounds(&every, e + 2).await;
    let cron_rounds = rounds(&cron, c + 2).await;

    // Each round once, none left out: `every` rounds are numbered one by
    // one, cron rounds by their Unix second.
    let log = agent.log();
    for (name, rounds, step) in [("every", &every_rounds, 1), ("cron", &cron_rounds, 3)] {
        for pair in rounds.windows(2) {
            assert_eq!(
                pair[1] - pair[0],
                step,
                "{name}: rounds {rounds:?} skip or repeat one\n{log}"
            );
        }
    }
    assert!(
        !log.contains("Session lease lost"),
        "the lease does not care about the wall clock:\n{log}"
    );
    let now = client
        .get("/coord/agents/web-01")
        .await
        .expect("etcd")
        .expect("present");
    assert_eq!(now.lease, presence.lease, "one lease all along");
}

/// A client of every member of `cluster` but the `paused` one.
async fn client_of_all_but(cluster: &crate::support::LocalCluster, paused: usize) -> Client {
    let mut opts = cluster.connect_options();
    opts.endpoints.remove(paused);
    Client::connect(&opts).await.expect("client")
}

/// Puts `value` at `/app/x` through `client`, retrying while the cluster
/// elects a leader.
async fn put_x(client: &Client, value: &str) {
    eventually(&format!("etcd to take /app/x = {value}"), || async {
        client.put("/app/x", value, None).await.ok()
    })
    .await;
}

#[tokio::test]
async fn an_agent_keeps_its_lease_and_renders_while_any_one_member_of_three_answers_nothing() {
    let mut cluster = crate::support::cluster().await;
    // A paused leader costs an election (1-2 s, more on a loaded machine:
    // 3 s seen with two other builds running) on top of up to TTL/3 since
    // the last renewal: 8 s leaves room.
    let ttl = 8;
    let out = tempfile::tempdir().expect("tmp");
    let file = out.path().join("x.txt");
    let agent = CoordProcess::run(&format!(
        "{}{}",
        manifest("web-01", &cluster.endpoints(), ttl),
        file_of_app_x(&file)
    ));
    let client = cluster.client().await;
    let before = present(&client, "/coord/agents/web-01").await;
    for i in 0..cluster.len() {
        cluster.member(i).pause();
        let others = client_of_all_but(&cluster, i).await;
        let value = format!("member {i} paused");
        put_x(&others, &value).await;
        rendered(&file, &value).await;
        // Longer than the request timeout (2 s) and than the TTL: a
        // request or a keepalive left waiting on the paused member would
        // have lost the lease by now.
        tokio::time::sleep(Duration::from_secs(2 * ttl)).await;
        let later = format!("member {i} still paused");
        put_x(&others, &later).await;
        rendered(&file, &later).await;
        let now = others
            .get("/coord/agents/web-01")
            .await
            .expect("etcd")
            .expect("presence kept");
        assert_eq!(
            now.lease,
            before.lease,
            "member {i} paused: the lease changed\n{}",
            agent.log()
        );
        cluster.member(i).resume();
    }
    let log = agent.log();
    assert!(!log.contains("Session lease lost"), "{log}");
}

#[tokio::test]
async fn agents_whose_only_etcd_member_answers_nothing_keep_their_files_and_recover_without_double_runs()
 {
    let mut etcd = etcd().await;
    let client = etcd.client().await;
    let out = tempfile::tempdir().expect("tmp");
    let rounds_log = out.path().join("rounds.log");
    let starts = out.path().join("leader-starts");
    let overlaps = out.path().join("leader-overlaps");
    // The leader's command holds an flock for as long as it lives, killed
    // or not: one that finds it taken overlaps another.
    let leader = format!(
        "exec 9>>{}; flock -n 9 || echo overlap >> {}; echo $COORD_FENCING_TOKEN >> {}; exec sleep 1000",
        out.path().join("leader.lock").display(),
        overlaps.display(),
        starts.display()
    );
    let agent = |name: &str| {
        let file = out.path().join(format!("{name}.txt"));
        CoordProcess::run(&format!(
            "{}{}\n[[task]]\nname = \"rounds\"\nlock = \"rounds\"\nschedule = \"every 2s\"\n\
             run = [\"sh\", \"-c\", \"echo $COORD_TASK_ROUND >> {}\"]\n\n\
             [[task]]\nname = \"leader\"\nlock = \"leader\"\nschedule = \"leader\"\ngrace = \"1s\"\n\
             run = [\"sh\", \"-c\", \"{leader}\"]\n",
            manifest(name, &[etcd.endpoint()], 3),
            file_of_app_x(&file),
            rounds_log.display(),
        ))
    };
    client.put("/app/x", "one", None).await.expect("put");
    let mut agents = [agent("web-01"), agent("web-02")];
    let files = ["web-01", "web-02"].map(|n| out.path().join(format!("{n}.txt")));
    for f in &files {
        rendered(f, "one").await;
    }
    rounds(&rounds_log, 2).await;
    let started = rounds(&starts, 1).await.len();

    // Longer than the request timeout (2 s) and than the TTL (3 s).
    etcd.member().pause();
    tokio::time::sleep(Duration::from_secs(8)).await;
    for f in &files {
        assert_eq!(
            std::fs::read_to_string(f).expect("file"),
            "one",
            "the file is kept"
        );
    }
    let free = std::process::Command::new("flock")
        .args([
            "-n",
            &out.path().join("leader.lock").display().to_string(),
            "true",
        ])
        .status()
        .expect("run flock");
    assert!(
        free.success(),
        "the leader's command must be stopped once its lease cannot be renewed"
    );
    for a in &mut agents {
        assert!(a.is_running());
    }
    etcd.member().resume();

    // Recovered by themselves.
    put_x(&client, "two").await;
    for f in &files {
        rendered(f, "two").await;
    }
    let before = rounds(&rounds_log, 0).await.len();
    let all_rounds = rounds(&rounds_log, before + 2).await;
    // A new run of the leader, on a new lease and token.
    let tokens = rounds(&starts, started + 1).await;
    let mut unique = all_rounds.clone();
    unique.dedup();
    assert_eq!(unique, all_rounds, "a round ran twice: {all_rounds:?}");
    assert!(
        all_rounds.windows(2).all(|p| p[0] < p[1]),
        "rounds out of order: {all_rounds:?}"
    );
    assert!(
        tokens.windows(2).all(|p| p[0] < p[1]),
        "fencing tokens only grow: {tokens:?}"
    );
    assert!(
        !overlaps.exists(),
        "two leaders' commands ran at once: {:?}",
        std::fs::read_to_string(&overlaps)
    );
}
