//! Discovery over DNS: `dig` (Debian package dnsutils) against a real
//! `coord run` agent on a real etcd.

use std::path::Path;

use crate::support::{CoordProcess, LocalEtcd, coord, etcd, eventually, run_tool};

const INSTALL_DIG: &str =
    "install it with `bash deploy/install-deps.sh --tests` (Debian package dnsutils)";

/// A loopback port free for both UDP and TCP right now.
fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp port");
        let port = udp.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn manifest(etcd: &LocalEtcd, state: &Path, dns_port: u16, rest: &str) -> String {
    format!(
        "[agent]\nname = \"web-01\"\nttl = \"5s\"\nstate_dir = \"{}\"\n\
         [etcd]\nendpoints = [\"{}\"]\ndial_timeout = \"1s\"\nrequest_timeout = \"2s\"\n\
         [dns]\nlisten = \"127.0.0.1:{dns_port}\"\n{rest}",
        state.display(),
        etcd.endpoint()
    )
}

/// A `[[service]]` whose exec check passes while `flag` exists and is
/// critical (exit 2) when it does not, checked every 200 ms.
fn flagged(name: &str, id: &str, address: &str, flag: &Path, extra: &str) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nid = \"{id}\"\naddress = \"{address}\"\n{extra}\
         check = {{ exec = [\"sh\", \"-c\", \"test -f {} || exit 2\"], interval = \"200ms\" }}\n",
        flag.display()
    )
}

/// What dig got back.
#[derive(Debug)]
struct Reply {
    /// NOERROR, NXDOMAIN, …
    status: String,
    /// The header's flags (`qr`, `aa`, `tc`, …).
    flags: Vec<String>,
    /// `TYPE DATA` of each answer record, sorted.
    answers: Vec<String>,
    /// `NAME TYPE DATA` of each additional record (EDNS's OPT aside), sorted.
    additionals: Vec<String>,
    raw: String,
}

impl Reply {
    fn data(&self, rtype: &str) -> Vec<String> {
        self.answers
            .iter()
            .filter_map(|a| a.strip_prefix(&format!("{rtype} ")).map(str::to_owned))
            .collect()
    }
}

/// `dig @127.0.0.1 -p PORT NAME TYPE OPTIONS…`.
fn dig(port: u16, name: &str, rtype: &str, options: &[&str]) -> Reply {
    let port = port.to_string();
    let mut args = vec![
        "@127.0.0.1",
        "-p",
        &port,
        "+tries=1",
        "+time=2",
        "+noall",
        "+comments",
        "+answer",
        "+additional",
        name,
        rtype,
    ];
    args.extend_from_slice(options);
    let out = run_tool("dig", &args, INSTALL_DIG);
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = raw
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("no answer")
        .to_owned();
    let flags = raw
        .lines()
        .find_map(|l| l.strip_prefix(";; flags: "))
        .and_then(|l| l.split(';').next())
        .map(|f| f.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let mut answers = Vec::new();
    let mut additionals = Vec::new();
    let mut section = "";
    for line in raw.lines() {
        if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
        } else if line.starts_with(";; ADDITIONAL SECTION") {
            section = "additional";
        } else if line.starts_with(';') || line.trim().is_empty() {
            if line.starts_with(";;") {
                section = "";
            }
        } else {
            // name ttl class type data…
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() >= 5 {
                let data = f[4..].join(" ");
                match section {
                    "answer" => answers.push(format!("{} {data}", f[3])),
                    "additional" => additionals.push(format!("{} {} {data}", f[0], f[3])),
                    _ => {}
                }
            }
        }
    }
    answers.sort();
    additionals.sort();
    Reply {
        status,
        flags,
        answers,
        additionals,
        raw,
    }
}

/// Asks until `want` holds for the reply (the agent starts, checks run,
/// the cache follows), then returns that reply.
async fn dig_until(
    port: u16,
    name: &str,
    rtype: &str,
    options: &[&str],
    what: &str,
    want: impl Fn(&Reply) -> bool,
) -> Reply {
    eventually(&format!("{name} {rtype}: {what}"), || {
        let reply = dig(port, name, rtype, options);
        let ok = want(&reply);
        async move { ok.then_some(reply) }
    })
    .await
}

fn sorted(items: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(|s| (*s).to_owned()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_and_srv_answers_follow_a_service_going_critical_and_back() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let (flag1, flag2) = (dir.path().join("a1-ok"), dir.path().join("a2-ok"));
    std::fs::write(&flag1, "").expect("flag");
    std::fs::write(&flag2, "").expect("flag");
    let port = free_port();
    let services = flagged("api", "a1", "10.0.0.5:8080", &flag1, "")
        + &flagged("api", "a2", "10.0.0.6:8081", &flag2, "");
    let _agent = CoordProcess::run(&manifest(&etcd, dir.path(), port, &services));

    let both = dig_until(port, "api.service.coord", "A", &[], "both instances", |r| {
        r.status == "NOERROR" && r.data("A") == sorted(&["10.0.0.5", "10.0.0.6"])
    })
    .await;
    assert!(both.flags.contains(&"aa".to_owned()), "{}", both.raw);
    let srv = dig(port, "api.service.coord", "SRV", &[]);
    assert_eq!(
        srv.data("SRV"),
        sorted(&[
            "1 1 8080 a1.api.service.coord.",
            "1 1 8081 a2.api.service.coord."
        ]),
        "{}",
        srv.raw
    );
    // The targets' addresses come along, and resolve on their own too.
    assert_eq!(
        srv.additionals,
        sorted(&[
            "a1.api.service.coord. A 10.0.0.5",
            "a2.api.service.coord. A 10.0.0.6"
        ]),
        "{}",
        srv.raw
    );
    let target = dig(port, "a2.api.service.coord", "A", &[]);
    assert_eq!(target.data("A"), ["10.0.0.6"], "{}", target.raw);

    // a1 goes critical: it leaves the A and SRV answers within its check
    // interval (and the agent's write, and the cache's watch).
    std::fs::remove_file(&flag1).expect("a1 critical");
    dig_until(port, "api.service.coord", "A", &[], "a1 gone", |r| {
        r.status == "NOERROR" && r.data("A") == ["10.0.0.6"]
    })
    .await;
    dig_until(port, "api.service.coord", "SRV", &[], "a1 gone", |r| {
        r.data("SRV") == ["1 1 8081 a2.api.service.coord."]
    })
    .await;
    // A critical instance's own name exists, with nothing to answer.
    let gone = dig(port, "a1.api.service.coord", "A", &[]);
    assert_eq!(
        (gone.status.as_str(), gone.answers.len()),
        ("NOERROR", 0),
        "{}",
        gone.raw
    );

    // Both critical: the service is known, so NOERROR with no answer.
    std::fs::remove_file(&flag2).expect("a2 critical");
    let empty = dig_until(port, "api.service.coord", "A", &[], "no instance", |r| {
        r.answers.is_empty()
    })
    .await;
    assert_eq!(empty.status, "NOERROR", "{}", empty.raw);

    // And back.
    std::fs::write(&flag1, "").expect("a1 passing");
    std::fs::write(&flag2, "").expect("a2 passing");
    dig_until(port, "api.service.coord", "A", &[], "both back", |r| {
        r.data("A") == sorted(&["10.0.0.5", "10.0.0.6"])
    })
    .await;
    dig_until(port, "api.service.coord", "SRV", &[], "both back", |r| {
        r.data("SRV").len() == 2
    })
    .await;
}

#[tokio::test]
async fn metadata_filters_answer_the_matching_instances_and_txt_their_metadata() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let (flag1, flag2) = (dir.path().join("eu-ok"), dir.path().join("us-ok"));
    std::fs::write(&flag1, "").expect("flag");
    std::fs::write(&flag2, "").expect("flag");
    let port = free_port();
    let services = flagged(
        "api",
        "eu",
        "10.0.0.5:8080",
        &flag1,
        "metadata = { zone = \"eu-1\", version = \"1.4\" }\n",
    ) + &flagged(
        "api",
        "us",
        "10.0.0.6:8080",
        &flag2,
        "metadata = { zone = \"us-2\", version = \"1.4\" }\n",
    );
    let _agent = CoordProcess::run(&manifest(&etcd, dir.path(), port, &services));

    dig_until(
        port,
        "eu-1.zone.api.service.coord",
        "A",
        &[],
        "the eu instance",
        |r| r.data("A") == ["10.0.0.5"],
    )
    .await;
    let version = dig(port, "1-4.version.api.service.coord", "A", &[]);
    assert_eq!(
        version.data("A"),
        sorted(&["10.0.0.5", "10.0.0.6"]),
        "{}",
        version.raw
    );
    let srv = dig(port, "us-2.zone.api.service.coord", "SRV", &[]);
    assert_eq!(
        srv.data("SRV"),
        ["1 1 8080 us.api.service.coord."],
        "{}",
        srv.raw
    );
    let txt = dig(port, "api.service.coord", "TXT", &[]);
    assert_eq!(
        txt.data("TXT"),
        sorted(&[
            "\"version=1.4\" \"zone=eu-1\"",
            "\"version=1.4\" \"zone=us-2\""
        ]),
        "{}",
        txt.raw
    );

    // A value no instance has: no such name.
    let none = dig(port, "ap-3.zone.api.service.coord", "A", &[]);
    assert_eq!(none.status, "NXDOMAIN", "{}", none.raw);
    // The eu instance critical: the filter's name stays, empty.
    std::fs::remove_file(&flag1).expect("eu critical");
    let empty = dig_until(
        port,
        "eu-1.zone.api.service.coord",
        "A",
        &[],
        "eu gone",
        |r| r.answers.is_empty(),
    )
    .await;
    assert_eq!(empty.status, "NOERROR", "{}", empty.raw);
    let still = dig(port, "1-4.version.api.service.coord", "A", &[]);
    assert_eq!(still.data("A"), ["10.0.0.6"], "{}", still.raw);
}

#[tokio::test]
async fn an_unknown_service_is_nxdomain_and_a_known_one_without_healthy_instances_is_empty() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let never = dir.path().join("never");
    let status_port = free_port();
    let services = flagged("down", "d1", "10.0.0.9:80", &never, "")
        + "[[service]]\nname = \"db\"\naddress = \"db.internal:5432\"\n"
        + &format!("[status]\nlisten = \"127.0.0.1:{status_port}\"\n");
    let _agent = CoordProcess::run(&manifest(&etcd, dir.path(), port, &services));

    // The host-name instance comes as a CNAME, and so does its own name.
    let db = dig_until(port, "db.service.coord", "A", &[], "a CNAME", |r| {
        r.status == "NOERROR" && !r.answers.is_empty()
    })
    .await;
    assert_eq!(db.answers, ["CNAME db.internal."], "{}", db.raw);
    let own = dig(port, "web-01-db.db.service.coord", "A", &[]);
    assert_eq!(own.answers, ["CNAME db.internal."], "{}", own.raw);
    let srv = dig(port, "db.service.coord", "SRV", &[]);
    assert_eq!(
        srv.data("SRV"),
        ["1 1 5432 web-01-db.db.service.coord."],
        "{}",
        srv.raw
    );

    let down = dig_until(port, "down.service.coord", "A", &[], "known, empty", |r| {
        r.status == "NOERROR"
    })
    .await;
    assert!(down.answers.is_empty(), "{}", down.raw);
    let unknown = dig(port, "nope.service.coord", "A", &[]);
    assert_eq!(unknown.status, "NXDOMAIN", "{}", unknown.raw);
    let outside = dig(port, "example.com", "A", &[]);
    assert_eq!(outside.status, "REFUSED", "{}", outside.raw);

    // The agent's own name: the address its presence record publishes (the
    // route to this etcd is loopback).
    let agent = dig(port, "web-01.agent.coord", "A", &[]);
    assert_eq!(agent.data("A"), ["127.0.0.1"], "{}", agent.raw);
    let stranger = dig(port, "web-02.agent.coord", "A", &[]);
    assert_eq!(stranger.status, "NXDOMAIN", "{}", stranger.raw);

    // Queries are counted by type and result.
    let metrics = eventually("the metrics", || async {
        let (code, body) = http_get(status_port, "/metrics")?;
        (code == 200).then_some(body)
    })
    .await;
    for (rtype, result) in [
        ("A", "answer"),
        ("SRV", "answer"),
        ("A", "empty"),
        ("A", "nxdomain"),
        ("A", "refused"),
    ] {
        let line = format!("coord_dns_queries_total{{type=\"{rtype}\",result=\"{result}\"}}");
        let count: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{line}` in the metrics:\n{metrics}"));
        assert!(count >= 1.0, "{line} {count}");
    }
}

#[tokio::test]
async fn an_answer_larger_than_512_bytes_comes_whole_over_tcp() {
    let etcd = etcd().await;
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let services: String = (1..=30)
        .map(|i| {
            format!("[[service]]\nname = \"big\"\nid = \"i{i}\"\naddress = \"10.1.0.{i}:80\"\n")
        })
        .collect();
    let _agent = CoordProcess::run(&manifest(&etcd, dir.path(), port, &services));

    let over_tcp = dig_until(
        port,
        "big.service.coord",
        "A",
        &["+tcp"],
        "30 instances",
        |r| r.data("A").len() == 30,
    )
    .await;
    assert_eq!(over_tcp.status, "NOERROR", "{}", over_tcp.raw);
    // Plain UDP without EDNS holds 512 bytes: the answer is cut and says so…
    let cut = dig(port, "big.service.coord", "A", &["+noedns", "+ignore"]);
    assert!(cut.flags.contains(&"tc".to_owned()), "{}", cut.raw);
    assert!(cut.answers.len() < 30, "{}", cut.raw);
    // …and dig, like any resolver, asks again over TCP and gets all of it.
    let retried = dig(port, "big.service.coord", "A", &["+noedns"]);
    assert_eq!(retried.data("A").len(), 30, "{}", retried.raw);
    let srv = dig(port, "big.service.coord", "SRV", &["+tcp"]);
    assert_eq!(srv.data("SRV").len(), 30, "{}", srv.raw);
    assert_eq!(srv.additionals.len(), 30, "{}", srv.raw);
}

#[tokio::test]
async fn until_the_cache_has_read_the_registry_every_name_is_servfail_never_nxdomain() {
    let mut etcd = etcd().await;
    let client = etcd.client().await;
    // An instance listed by someone else, there before the agent starts.
    client
        .put(
            "/coord/services/api/elsewhere",
            r#"{"Addr":"10.0.0.7:8080"}"#,
            None,
        )
        .await
        .expect("list an instance");
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    // etcd frozen: the agent starts, its cache cannot read anything.
    etcd.member().pause();
    let _agent = CoordProcess::run(&manifest(&etcd, dir.path(), port, ""));
    dig_until(port, "api.service.coord", "A", &[], "an answer", |r| {
        r.status != "no answer"
    })
    .await;
    for _ in 0..5 {
        for name in [
            "api.service.coord",
            "nope.service.coord",
            "web-01.agent.coord",
        ] {
            let r = dig(port, name, "A", &[]);
            assert_eq!(
                r.status, "SERVFAIL",
                "{name}: an unread cache must not deny it: {}",
                r.raw
            );
        }
    }
    etcd.member().resume();
    dig_until(
        port,
        "api.service.coord",
        "A",
        &[],
        "the listed instance",
        |r| r.data("A") == ["10.0.0.7"],
    )
    .await;
    let nope = dig(port, "nope.service.coord", "A", &[]);
    assert_eq!(nope.status, "NXDOMAIN", "{}", nope.raw);
}

#[tokio::test]
async fn the_dns_section_answers_loopback_only_unless_asked_and_each_mistake_is_located() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("agent.toml");
    let base = "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n\n[dns]\n";
    let p = path.to_str().expect("utf-8 path");
    let check = |text: &str| {
        std::fs::write(&path, text).expect("manifest");
        coord(&["check", p], None)
    };
    let (status, _, stderr) = check(&format!("{base}listen = \"0.0.0.0:8600\"\n"));
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!("{p}:5:10: error:")) && stderr.contains("loopback"),
        "the error should point at the address: {stderr}"
    );
    let (status, stdout, stderr) = check(&format!(
        "{base}listen = \"0.0.0.0:8600\"\nallow_non_loopback = true\n"
    ));
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("dns    0.0.0.0:8600"), "{stdout}");

    let (status, _, stderr) = check(&format!(
        "{base}domain = \"my_zone\"\nttl = \"1500ms\"\nlisten = \"localhost\"\n"
    ));
    assert_eq!(status.code(), Some(64), "{stderr}");
    for (line, col, words) in [
        (5, 10, "invalid `domain` in [dns]"),
        (6, 7, "whole seconds"),
        (7, 10, "not an IP address and port"),
    ] {
        let at = format!("{p}:{line}:{col}: error: ");
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&at) && l.contains(words)),
            "expected `{words}` at {line}:{col}: {stderr}"
        );
    }

    // Defaults: 127.0.0.1:8600, the zone `coord`, TTL 0.
    let (status, stdout, stderr) = check(base);
    assert!(status.success(), "{stderr}");
    assert!(
        stdout
            .contains("dns    127.0.0.1:8600 udp+tcp, *.service.coord and *.agent.coord (ttl 0s)"),
        "{stdout}"
    );
}

/// `GET path` on a local HTTP port: (status code, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    Some((head.split(' ').nth(1)?.parse().ok()?, body.to_owned()))
}
