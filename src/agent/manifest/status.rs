//! `[status]`: the local status endpoint (`/health`, `/status`, `/metrics`).

use std::net::SocketAddr;

use super::diagnostics::Diagnostics;
use super::reader::TableReader;

/// `[status]`. Absent: no endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSettings {
    /// Where to listen: loopback unless `allow_non_loopback` says otherwise.
    pub listen: SocketAddr,
    /// The endpoint has no authentication, so exposing it beyond the host
    /// must be asked for in so many words.
    pub allow_non_loopback: bool,
}

pub(super) fn status(
    d: &mut Diagnostics<'_>,
    mut t: TableReader<'_, '_>,
) -> Option<StatusSettings> {
    let before = d.len();
    let listen = t.required::<String>(
        d,
        "listen",
        "say where to serve /health, /status and /metrics, e.g. listen = \"127.0.0.1:9180\"",
    );
    let allow_non_loopback = t.optional::<bool>(d, "allow_non_loopback").unwrap_or(false);
    let addr = listen.and_then(|l| match l.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            d.error(
                t.span_of("listen"),
                format!(
                    "invalid `listen` in [status]: `{l}` is not an IP address and port like \"127.0.0.1:9180\" or \"[::1]:9180\""
                ),
            );
            None
        }
    });
    if let Some(a) = addr
        && !a.ip().is_loopback()
        && !allow_non_loopback
    {
        d.error(
            t.span_of("listen"),
            format!(
                "`listen` in [status] is `{a}`, not a loopback address: the endpoint has no authentication; \
                 use 127.0.0.1 or [::1], or set `allow_non_loopback = true` in [status] to expose it anyway"
            ),
        );
    }
    t.finish(d);
    match addr {
        Some(listen) if d.len() == before => Some(StatusSettings {
            listen,
            allow_non_loopback,
        }),
        _ => None,
    }
}
