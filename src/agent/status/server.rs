//! The local HTTP endpoint: `/health`, `/status`, `/metrics`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::Status;

/// A slow or idle client must not hold a connection for ever.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The endpoint could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve the status endpoint on {addr}: {source}")]
pub struct ServeError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// The running endpoint; stopped on drop.
#[derive(Debug)]
pub struct StatusServer {
    addr: SocketAddr,
    stop: CancellationToken,
    /// The listener and its connections, joined by [`StatusServer::stop`].
    tasks: TaskTracker,
}

impl Drop for StatusServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl StatusServer {
    /// Binds `addr` and serves `status` until dropped.
    pub async fn start(addr: SocketAddr, status: Status) -> Result<StatusServer, ServeError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError { addr, source })?;
        let bound = listener.local_addr().unwrap_or(addr);
        info!(addr = %bound, "Status endpoint listening.");
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(accept(listener, status, stop.clone(), tasks.clone()));
        Ok(StatusServer {
            addr: bound,
            stop,
            tasks,
        })
    }

    /// The address bound (the port is known even when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and returns once the listener and every connection
    /// have ended (the port is free again).
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn accept(
    listener: TcpListener,
    status: Status,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    super::super::fd_limit::note(&e);
                    debug!(error = %e, "Status endpoint could not accept a connection.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let status = status.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let status = status.clone();
                async move { Ok::<_, Infallible>(route(&status, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                r = conn => if let Err(e) = r {
                    debug!(peer = %peer, error = %e, "Status connection ended with an error.");
                },
            }
        });
    }
}

fn route(status: &Status, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".into(),
        );
    }
    match req.uri().path() {
        "/health" => {
            let problems = status.problems();
            if problems.is_empty() {
                reply(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into())
            } else {
                let mut body = problems.join("\n");
                body.push('\n');
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    body,
                )
            }
        }
        "/status" => {
            let body = serde_json::to_string_pretty(&status.report()).unwrap_or_default();
            reply(StatusCode::OK, "application/json", body)
        }
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            status.metrics_text(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /health, /status or /metrics\n".into(),
        ),
    }
}

fn reply(code: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
