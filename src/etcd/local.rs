//! Local etcd processes on free loopback ports: for `coord dev`, the
//! integration tests and the benchmarks.
//!
//! The processes are killed when their handle is dropped, so a panicking
//! test never leaves an etcd behind.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::time::Instant;

use super::{Client, ConnectOptions, TlsFiles};

/// How long a fresh etcd may take to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a local etcd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LocalEtcdError {
    #[error(
        "etcd was not found (looked for `{0}`). Install it with `sudo apt-get install etcd-server` \
         on Debian/Ubuntu, or point ETCD_BIN at an etcd binary"
    )]
    /// No `etcd` binary (the message says how to install one).
    NotInstalled(String),
    #[error("failed to prepare the etcd data directory `{path}`: {source}")]
    /// The data directory could not be made.
    DataDir {
        /// The directory.
        path: PathBuf,
        #[source]
        /// Why not.
        source: std::io::Error,
    },
    #[error("failed to start etcd `{bin}`: {source}")]
    /// `etcd` could not be started.
    Spawn {
        /// The binary.
        bin: String,
        #[source]
        /// Why not.
        source: std::io::Error,
    },
    #[error(
        "etcd member `{name}` did not become healthy within {}; its log is at `{log}`",
        humantime::format_duration(*timeout)
    )]
    /// The member did not become healthy in time.
    Unhealthy {
        /// The member.
        name: String,
        /// How long it was given.
        timeout: Duration,
        /// Its log, to read why.
        log: PathBuf,
    },
}

/// The etcd binary to run: `ETCD_BIN`, or `etcd` from `PATH`.
pub fn etcd_binary() -> Result<PathBuf, LocalEtcdError> {
    let name = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".to_owned());
    let candidate = Path::new(&name);
    if candidate.components().count() > 1 {
        return if candidate.is_file() {
            Ok(candidate.to_owned())
        } else {
            Err(LocalEtcdError::NotInstalled(name))
        };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(&name))
        .find(|p| p.is_file())
        .ok_or(LocalEtcdError::NotInstalled(name))
}

/// One etcd member process.
#[derive(Debug)]
pub struct Member {
    name: String,
    data_dir: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    bin: PathBuf,
    child: Option<Child>,
    /// How clients reach this member (TLS files included).
    connect: ConnectOptions,
}

impl Member {
    /// `http://127.0.0.1:<port>` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        self.connect.endpoints[0].clone()
    }

    /// The member's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the member logs.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the process (SIGSTOP): connections stay open but nothing
    /// answers, like a hung or partitioned member.
    pub fn pause(&mut self) {
        self.send(Signal::SIGSTOP);
    }

    /// Thaws a paused process (SIGCONT).
    pub fn resume(&mut self) {
        self.send(Signal::SIGCONT);
    }

    fn send(&mut self, signal: Signal) {
        if let Some(child) = &self.child {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
        }
    }

    /// Starts the process again with the same ports and data.
    pub fn restart(&mut self) -> Result<(), LocalEtcdError> {
        self.kill();
        self.spawn()
    }

    /// Wipes the data directory: the member comes back as a brand-new
    /// cluster that has lost everything (only meaningful for one member).
    pub fn wipe_data(&mut self) -> Result<(), LocalEtcdError> {
        self.kill();
        std::fs::remove_dir_all(&self.data_dir)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
            .map_err(|source| LocalEtcdError::DataDir {
                path: self.data_dir.clone(),
                source,
            })
    }

    fn spawn(&mut self) -> Result<(), LocalEtcdError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|source| LocalEtcdError::DataDir {
                path: self.log.clone(),
                source,
            })?;
        let log2 = log.try_clone().map_err(|source| LocalEtcdError::DataDir {
            path: self.log.clone(),
            source,
        })?;
        // Its own process group: a Ctrl-C meant for `coord dev` must not
        // kill etcd before the agent has revoked its lease.
        let child = Command::new(&self.bin)
            .args(&self.args)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|source| LocalEtcdError::Spawn {
                bin: self.bin.display().to_string(),
                source,
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until this member answers a linearizable read (so it has a
    /// leader and has caught up).
    pub async fn wait_healthy(&mut self) -> Result<(), LocalEtcdError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut opts = self.connect.clone();
        opts.dial_timeout = Duration::from_millis(500);
        opts.request_timeout = Duration::from_secs(1);
        while Instant::now() < deadline && self.is_running() {
            if let Ok(client) = Client::connect(&opts).await
                && client.get("/coord-health-probe").await.is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(LocalEtcdError::Unhealthy {
            name: self.name.clone(),
            timeout: START_TIMEOUT,
            log: self.log.clone(),
        })
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A single-member etcd, for tests and `coord dev`.
#[derive(Debug)]
pub struct LocalEtcd {
    cluster: LocalCluster,
}

impl LocalEtcd {
    /// Starts one member with its data in a fresh temporary directory.
    pub async fn start() -> Result<LocalEtcd, LocalEtcdError> {
        Ok(LocalEtcd {
            cluster: LocalCluster::start(1).await?,
        })
    }

    /// Starts one member with its data under `dir` (kept after exit).
    pub async fn start_in(dir: &Path) -> Result<LocalEtcd, LocalEtcdError> {
        Ok(LocalEtcd {
            cluster: LocalCluster::start_in(1, dir.to_owned(), None, None).await?,
        })
    }

    /// Starts one member that serves clients over TLS only, and requires a
    /// client certificate signed by `tls.ca`.
    pub async fn start_tls(tls: LocalTls) -> Result<LocalEtcd, LocalEtcdError> {
        let tmp = temp_dir()?;
        let dir = tmp.path().to_owned();
        Ok(LocalEtcd {
            cluster: LocalCluster::start_in(1, dir, Some(tmp), Some(tls)).await?,
        })
    }

    /// The client URL of the member.
    pub fn endpoint(&self) -> String {
        self.cluster.members[0].endpoint()
    }

    /// The one member.
    pub fn member(&mut self) -> &mut Member {
        &mut self.cluster.members[0]
    }

    /// Connection options for this member.
    pub fn connect_options(&self) -> ConnectOptions {
        self.cluster.connect_options()
    }

    /// A client connected to this member.
    pub async fn client(&self) -> Client {
        self.cluster.client().await
    }
}

/// A cluster of local etcd members on loopback.
#[derive(Debug)]
pub struct LocalCluster {
    members: Vec<Member>,
    _tmp: Option<tempfile::TempDir>,
}

impl LocalCluster {
    /// Starts `size` members with their data in a fresh temporary directory.
    pub async fn start(size: usize) -> Result<LocalCluster, LocalEtcdError> {
        let tmp = temp_dir()?;
        let dir = tmp.path().to_owned();
        Self::start_in(size, dir, Some(tmp), None).await
    }

    async fn start_in(
        size: usize,
        dir: PathBuf,
        tmp: Option<tempfile::TempDir>,
        tls: Option<LocalTls>,
    ) -> Result<LocalCluster, LocalEtcdError> {
        let bin = etcd_binary()?;
        std::fs::create_dir_all(&dir).map_err(|source| LocalEtcdError::DataDir {
            path: dir.clone(),
            source,
        })?;
        // Free ports are picked by binding to port 0; another process can
        // take one before etcd binds it, so a failed start is retried.
        let mut last_err = None;
        for _attempt in 0..3 {
            let mut members = plan(size, &dir, &bin, tls.as_ref());
            for m in &mut members {
                m.spawn()?;
            }
            let mut failed = None;
            for m in &mut members {
                if let Err(e) = m.wait_healthy().await {
                    failed = Some(e);
                    break;
                }
            }
            match failed {
                None => {
                    return Ok(LocalCluster { members, _tmp: tmp });
                }
                Some(e) => {
                    drop(members);
                    for i in 0..size {
                        let _ = std::fs::remove_dir_all(dir.join(format!("m{i}.etcd")));
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or(LocalEtcdError::NotInstalled("etcd".into())))
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// Member `i`.
    pub fn member(&mut self, i: usize) -> &mut Member {
        &mut self.members[i]
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Connection options listing every member.
    pub fn connect_options(&self) -> ConnectOptions {
        let mut opts = self.members[0].connect.clone();
        opts.endpoints = self.endpoints();
        opts
    }

    /// A client connected to every member.
    ///
    /// # Panics
    /// If the connection cannot be set up (connecting is lazy, so only on
    /// invalid options, which cannot happen here).
    pub async fn client(&self) -> Client {
        match Client::connect(&self.connect_options()).await {
            Ok(c) => c,
            Err(e) => panic!("failed to connect to the local etcd: {e}"),
        }
    }
}

/// Server-side TLS for a local etcd, and the client files that reach it.
#[derive(Debug, Clone)]
pub struct LocalTls {
    /// The CA that signed both the server and client certificates.
    pub ca: PathBuf,
    /// The members' certificate.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client certificate etcd accepts.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

fn temp_dir() -> Result<tempfile::TempDir, LocalEtcdError> {
    tempfile::Builder::new()
        .prefix("coord-etcd-")
        .tempdir()
        .map_err(|source| LocalEtcdError::DataDir {
            path: std::env::temp_dir(),
            source,
        })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn plan(size: usize, dir: &Path, bin: &Path, tls: Option<&LocalTls>) -> Vec<Member> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
    let initial_cluster = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let token = format!("coord-{}", std::process::id());
    ports
        .iter()
        .enumerate()
        .map(|(i, &(client_port, peer_port))| {
            let name = format!("m{i}");
            let data_dir = dir.join(format!("{name}.etcd"));
            let client_url = format!("{scheme}://127.0.0.1:{client_port}");
            let mut args = vec![
                format!("--name={name}"),
                format!("--data-dir={}", data_dir.display()),
                format!("--listen-client-urls={client_url}"),
                format!("--advertise-client-urls={client_url}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster={initial_cluster}"),
                "--initial-cluster-state=new".to_owned(),
                format!("--initial-cluster-token={token}"),
                "--log-level=warn".to_owned(),
                "--logger=zap".to_owned(),
            ];
            let mut connect = ConnectOptions::new(vec![client_url]);
            if let Some(tls) = tls {
                args.extend([
                    format!("--cert-file={}", tls.server_cert.display()),
                    format!("--key-file={}", tls.server_key.display()),
                    format!("--trusted-ca-file={}", tls.ca.display()),
                    "--client-cert-auth".to_owned(),
                ]);
                connect.tls = Some(TlsFiles {
                    ca: Some(tls.ca.clone()),
                    cert: Some(tls.client_cert.clone()),
                    key: Some(tls.client_key.clone()),
                });
            }
            Member {
                log: dir.join(format!("{name}.log")),
                name,
                data_dir,
                args,
                bin: bin.to_owned(),
                child: None,
                connect,
            }
        })
        .collect()
}
