//! `coord status`: what a running agent says about itself, for a person.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use coord::agent::manifest::Manifest;
use coord::agent::status::report::{HookResult, ResourceKind, SessionPhase, StatusReport};
use coord::registry::Health;

/// How long to wait for the agent to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("where").required(true).args(["addr", "manifest"]))]
pub struct StatusArgs {
    /// The agent's status endpoint, e.g. 127.0.0.1:9180.
    #[arg(long, value_name = "ADDR")]
    addr: Option<String>,
    /// Read the address from this manifest's `[status] listen`.
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// Print the agent's JSON as it is.
    #[arg(long)]
    json: bool,
}

pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let addr = match (&args.addr, &args.manifest) {
        (Some(a), _) => a.clone(),
        (None, Some(path)) => {
            let m = Manifest::load(path)?;
            match m.status {
                Some(s) => s.listen.to_string(),
                None => bail!(
                    "{} has no [status] section, so its agent serves no status endpoint; add one, e.g.\n\n[status]\nlisten = \"127.0.0.1:9180\"",
                    path.display()
                ),
            }
        }
        (None, None) => bail!("say where the agent is: --addr ADDR or --manifest FILE"),
    };
    let url = format!("http://{addr}/status");
    let body = tokio::time::timeout(TIMEOUT, fetch(&url))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {}", humantime::format_duration(TIMEOUT)))
        .and_then(|r| r)
        .with_context(|| format!("no coord agent reachable at {addr} (is it running, with [status] listen = \"{addr}\"?)"))?;
    if args.json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(ExitCode::SUCCESS);
    }
    let report: StatusReport = serde_json::from_slice(&body)
        .with_context(|| format!("{url} did not answer with a coord status report"))?;
    print!("{}", render(&report));
    Ok(if report.healthy {
        ExitCode::SUCCESS
    } else {
        // Scripts can tell "running but unhealthy" from "not reachable" (1).
        ExitCode::from(2)
    })
}

async fn fetch(url: &str) -> anyhow::Result<Bytes> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = client.get(url.parse()?).await?;
    let code = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !code.is_success() {
        bail!("{url} answered {code}");
    }
    Ok(body)
}

fn render(r: &StatusReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "agent    {} (coord {}, pid {}, started {})",
        r.agent, r.version, r.pid, r.started_at
    );
    // The agent's own health (what /healthz says) is about the agent;
    // a critical service is said beside it, with why, since "ok" alone
    // reads as "everything is fine".
    let critical: Vec<&coord::agent::status::report::ResourceReport> = r
        .resources
        .iter()
        .filter(|x| x.kind == ResourceKind::Service && x.state == Health::Critical.name())
        .collect();
    if r.healthy && critical.is_empty() {
        let _ = writeln!(out, "health   ok");
    } else if r.healthy {
        let n = critical.len();
        let _ = writeln!(
            out,
            "health   agent ok; {n} service instance{} critical (withdrawn from discovery)",
            if n == 1 { "" } else { "s" }
        );
        for x in &critical {
            let why = x.detail.as_deref().filter(|d| !d.is_empty());
            let _ = writeln!(
                out,
                "         - {}: {}",
                x.name,
                why.unwrap_or("its check fails (no output)")
            );
        }
    } else {
        let _ = writeln!(out, "health   UNHEALTHY");
        for p in &r.problems {
            let _ = writeln!(out, "         - {p}");
        }
    }
    let session = match (r.session.state, &r.session.lease, r.session.expires_in_ms) {
        (SessionPhase::Alive, Some(l), Some(ms)) => {
            format!("alive, lease {l}, deadline in {:.1}s", ms as f64 / 1000.0)
        }
        (state, Some(l), _) => format!("{}, lease {l}", state.name()),
        (state, None, _) => state.name().to_owned(),
    };
    let _ = writeln!(out, "session  {session} (since {})", r.session.since);
    let _ = writeln!(
        out,
        "cache    {}",
        if r.cache_ready {
            "ready"
        } else {
            "first read not complete"
        }
    );
    let queues: Vec<String> = r
        .queues
        .iter()
        .map(|q| format!("{} {}", q.queue.name(), q.depth))
        .collect();
    let _ = writeln!(out, "queues   {}", queues.join(", "));
    if !r.resources.is_empty() {
        let _ = writeln!(out, "\nresources");
        let width = r
            .resources
            .iter()
            .map(|x| x.kind.name().len() + 1 + x.name.len())
            .max()
            .unwrap_or(0);
        let state_width = r.resources.iter().map(|x| x.state.len()).max().unwrap_or(0);
        for x in &r.resources {
            let what = format!("{} {}", x.kind.name(), x.name);
            let _ = write!(
                out,
                "  {what:<width$}  {:<state_width$}  since {}",
                x.state, x.last_change
            );
            if let Some(d) = x.detail.as_deref().filter(|d| !d.is_empty()) {
                let _ = write!(out, "\n  {:<width$}  {d}", "");
            }
            if let (Some(e), Some(at)) = (&x.last_error, &x.last_error_at) {
                let _ = write!(out, "\n  {:<width$}  last error at {at}: {e}", "");
            }
            out.push('\n');
        }
    }
    if !r.hooks.is_empty() {
        let _ = writeln!(out, "\nrecent hook runs (newest last)");
        for h in &r.hooks {
            let _ = write!(
                out,
                "  {}  {} on {} ({})  {} in {} ms",
                h.at,
                h.hook,
                h.event,
                h.resource,
                h.result.name(),
                h.duration_ms
            );
            if let (Some(e), HookResult::Failed | HookResult::Vetoed) = (&h.error, h.result) {
                let _ = write!(out, ": {e}");
            }
            out.push('\n');
        }
    }
    if !r.gates.is_empty() {
        let _ = writeln!(out, "\nwaiting at fleet gates");
        for g in &r.gates {
            let _ = writeln!(out, "  {} ({})  since {}", g.hook, g.resource, g.since);
        }
    }
    out
}
