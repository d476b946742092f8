//! `[dns]`: discovery over DNS (`api.service.coord`), served from the
//! agent's watch cache.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use super::diagnostics::Diagnostics;
use super::reader::TableReader;

/// `[dns]`. Absent: no DNS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Where to answer, UDP and TCP: loopback unless `allow_non_loopback`.
    pub listen: SocketAddr,
    /// The zone answered, lower case, without a trailing dot (`coord`).
    pub domain: String,
    /// The TTL of every answer, whole seconds; 0 (the default) lets no
    /// resolver keep an answer past a change of health.
    pub ttl: Duration,
    /// Like `[status]`: answering beyond the host must be asked for.
    pub allow_non_loopback: bool,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8600";
pub const DEFAULT_DOMAIN: &str = "coord";
/// `[dns] ttl`: up to a day; resolvers clamp longer ones anyway.
pub const TTL_RANGE: RangeInclusive<Duration> = Duration::ZERO..=Duration::from_secs(24 * 3600);

pub(super) fn dns(d: &mut Diagnostics<'_>, mut t: TableReader<'_, '_>) -> Option<DnsSettings> {
    let before = d.len();
    let listen = t
        .optional::<String>(d, "listen")
        .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let allow_non_loopback = t.optional::<bool>(d, "allow_non_loopback").unwrap_or(false);
    let addr = match listen.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            d.error(
                t.span_of("listen"),
                format!(
                    "invalid `listen` in [dns]: `{listen}` is not an IP address and port like \"127.0.0.1:8600\" or \"[::1]:8600\""
                ),
            );
            None
        }
    };
    if let Some(a) = addr
        && !a.ip().is_loopback()
        && !allow_non_loopback
    {
        d.error(
            t.span_of("listen"),
            format!(
                "`listen` in [dns] is `{a}`, not a loopback address: anyone who reaches it learns every service's instances; \
                 use 127.0.0.1 or [::1], or set `allow_non_loopback = true` in [dns] to answer beyond this host anyway"
            ),
        );
    }
    let domain = t
        .optional::<String>(d, "domain")
        .unwrap_or_else(|| DEFAULT_DOMAIN.to_owned());
    let domain = domain
        .strip_suffix('.')
        .unwrap_or(&domain)
        .to_ascii_lowercase();
    if let Err(why) = valid_domain(&domain) {
        d.error(
            t.span_of("domain"),
            format!("invalid `domain` in [dns]: `{domain}` {why}; write it like \"coord\" or \"coord.example.internal\""),
        );
    }
    let ttl = t.within(d, "ttl", TTL_RANGE);
    if let Some(ttl) = ttl
        && ttl.subsec_nanos() != 0
    {
        d.error(
            t.span_of("ttl"),
            "invalid `ttl` in [dns]: DNS counts whole seconds (e.g. \"0s\" or \"5s\")",
        );
    }
    t.finish(d);
    match addr {
        Some(listen) if d.len() == before => Some(DnsSettings {
            listen,
            domain,
            ttl: ttl.unwrap_or(Duration::ZERO),
            allow_non_loopback,
        }),
        _ => None,
    }
}

/// Labels of letters, digits and `-`, none empty, none longer than 63
/// bytes, 253 in all: a name every resolver routes.
fn valid_domain(domain: &str) -> Result<(), &'static str> {
    if domain.is_empty() {
        return Err("is empty");
    }
    if domain.len() > 253 {
        return Err("is longer than 253 characters");
    }
    for label in domain.split('.') {
        if label.is_empty() {
            return Err("has an empty label");
        }
        if label.len() > 63 {
            return Err("has a label longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("may hold only letters, digits, `-` and dots");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("has a label that starts or ends with `-`");
        }
    }
    Ok(())
}
