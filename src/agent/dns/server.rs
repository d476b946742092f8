//! The DNS server: hickory-server on one UDP socket and one TCP listener,
//! answering from a [`RegistryView`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::RecordType;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tracing::{debug, info, warn};

use super::answers::Answer;
use super::names::Zone;
use super::view::RegistryView;
use crate::agent::manifest::DnsSettings;
use crate::agent::status::Status;

/// A TCP client that sends nothing for this long is dropped.
const TCP_IDLE: Duration = Duration::from_secs(5);
/// Responses queued per TCP connection.
const TCP_QUEUE: usize = 32;

/// The server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot serve DNS on {proto} {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid DNS domain {0}")]
    Domain(String),
}

/// The running server. [`DnsServer::stop`] ends it and waits; dropping it
/// aborts its tasks.
pub struct DnsServer {
    addr: SocketAddr,
    server: Server<Handler>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl DnsServer {
    /// Binds `settings.listen` (UDP and TCP, one port) and answers from
    /// `view` until stopped.
    pub async fn start(
        settings: &DnsSettings,
        view: Arc<RegistryView>,
        status: Status,
    ) -> Result<DnsServer, DnsError> {
        let zone = Zone::new(&settings.domain).map_err(DnsError::Domain)?;
        let udp = tokio::net::UdpSocket::bind(settings.listen)
            .await
            .map_err(|source| DnsError::Bind {
                proto: "udp",
                addr: settings.listen,
                source,
            })?;
        // Port 0 asks for one port: TCP takes the one UDP was given.
        let addr = udp.local_addr().unwrap_or(settings.listen);
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DnsError::Bind {
                proto: "tcp",
                addr,
                source,
            })?;
        let handler = Handler {
            zone,
            ttl: u32::try_from(settings.ttl.as_secs()).unwrap_or(u32::MAX),
            view,
            status,
        };
        let mut server = Server::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE, TCP_QUEUE);
        info!(addr = %addr, domain = %settings.domain, "DNS server listening (UDP and TCP).");
        Ok(DnsServer { addr, server })
    }

    /// The address bound, UDP and TCP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops answering and waits for the server's tasks to end.
    pub async fn stop(mut self) {
        if let Err(e) = self.server.shutdown_gracefully().await {
            debug!(error = %e, "DNS server stopped with an error.");
        }
    }
}

struct Handler {
    zone: Zone,
    ttl: u32,
    view: Arc<RegistryView>,
    status: Status,
}

/// How a query ended, for the metrics: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryResult {
    /// NOERROR with records.
    Answer,
    /// NOERROR without records: the name exists, nothing of that type
    /// (or no healthy instance).
    Empty,
    NxDomain,
    /// Outside the zone.
    Refused,
    /// The cache has not completed its first read.
    ServFail,
    /// Not one question, or not a query.
    FormErr,
}

impl QueryResult {
    pub fn name(self) -> &'static str {
        match self {
            QueryResult::Answer => "answer",
            QueryResult::Empty => "empty",
            QueryResult::NxDomain => "nxdomain",
            QueryResult::Refused => "refused",
            QueryResult::ServFail => "servfail",
            QueryResult::FormErr => "formerr",
        }
    }
}

/// The query type as a metrics label: the types coord answers, else
/// `other` (the set stays small whatever clients send).
pub fn type_label(qtype: RecordType) -> &'static str {
    match qtype {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::SRV => "SRV",
        RecordType::TXT => "TXT",
        RecordType::CNAME => "CNAME",
        RecordType::ANY => "ANY",
        RecordType::SOA => "SOA",
        _ => "other",
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let edns = request.edns.as_ref().map(|asked| {
            let mut e = Edns::new();
            e.set_max_payload(asked.max_payload().max(512));
            e.set_version(0);
            e
        });
        let query = match request.request_info() {
            Ok(info)
                if request.metadata.op_code == OpCode::Query
                    && request.metadata.message_type == MessageType::Query =>
            {
                info.query
            }
            _ => {
                self.status.dns_query("other", QueryResult::FormErr.name());
                metadata.response_code = ResponseCode::FormErr;
                return send(
                    &mut response,
                    request,
                    metadata,
                    edns.as_ref(),
                    &Answer::new(ResponseCode::FormErr),
                )
                .await;
            }
        };
        let qtype = query.query_type();
        let (answer, result) = match self.view.index() {
            None => (Answer::new(ResponseCode::ServFail), QueryResult::ServFail),
            Some(index) => {
                let answer = index.answer(&self.zone, query.original().name(), qtype, self.ttl);
                let result = match answer.code {
                    ResponseCode::NoError if answer.answers.is_empty() => QueryResult::Empty,
                    ResponseCode::NoError => QueryResult::Answer,
                    ResponseCode::NXDomain => QueryResult::NxDomain,
                    ResponseCode::Refused => QueryResult::Refused,
                    _ => QueryResult::ServFail,
                };
                (answer, result)
            }
        };
        self.status.dns_query(type_label(qtype), result.name());
        metadata.response_code = answer.code;
        send(&mut response, request, metadata, edns.as_ref(), &answer).await
    }
}

async fn send<R: ResponseHandler>(
    response: &mut R,
    request: &Request,
    metadata: Metadata,
    edns: Option<&Edns>,
    answer: &Answer,
) -> ResponseInfo {
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(e) = edns {
        builder.edns(e);
    }
    let message = builder.build(
        metadata,
        answer.answers.iter(),
        answer.authorities.iter(),
        [],
        answer.additionals.iter(),
    );
    match response.send_response(message).await {
        Ok(info) => info,
        Err(e) => {
            warn!(error = %e, "Could not send a DNS answer.");
            let mut failed = metadata;
            failed.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata: failed,
                counts: HeaderCounts::default(),
            })
        }
    }
}
