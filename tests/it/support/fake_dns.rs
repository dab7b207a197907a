//! In-process DNS servers for tests, on 127.0.0.1 only.
//!
//! - [`FakeDns`]: an authoritative hickory-server for one zone, UDP and TCP on the *same*
//!   random port (so one `"127.0.0.1:PORT"` nameserver string reaches both), with a query
//!   counter and names that answer SERVFAIL.
//! - [`SilentDns`]: a UDP socket and a TCP listener that never answer, for timeouts.
//!
//! ```ignore
//! let dns = FakeDns::builder("example.test")
//!     .mx("mx", 10, "mx1")          // names are relative to the origin unless they end in "."
//!     .a("mx1", Ipv4Addr::new(1, 1, 1, 1))
//!     .txt("@", "v=spf1 -all")      // "@" is the origin itself
//!     .servfail("broken")
//!     .start()
//!     .await;
//! let nameserver = dns.nameserver(); // "127.0.0.1:PORT"
//! ```

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Header, HeaderCounts, MessageType, Metadata, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX, SOA, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, MessageResponseBuilder, ZoneType};

/// TTL of every record the fake serves, in seconds.
const RECORD_TTL: u32 = 300;
/// SOA MINIMUM, i.e. the negative-caching TTL of NXDOMAIN/NODATA answers, in seconds.
const NEGATIVE_TTL: u32 = 60;
/// Idle timeout of a TCP connection to the fake.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Responses buffered per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 64;
/// Tries at finding a port free for both UDP and TCP.
const PORT_TRIES: usize = 50;
/// SOA REFRESH, RETRY and EXPIRE, in seconds (unused: there are no secondaries).
const SOA_REFRESH: i32 = 3600;
const SOA_RETRY: i32 = 600;
const SOA_EXPIRE: i32 = 86400;
/// Serial of the zone (only matters for zone transfers, which are denied).
const SERIAL: u32 = 1;

/// Builds a [`FakeDns`]; see the module docs.
#[derive(Debug)]
pub struct FakeDnsBuilder {
    origin: Name,
    records: Vec<Record>,
    servfail: Vec<LowerName>,
}

impl FakeDnsBuilder {
    /// Adds `MX preference exchange` at `name`. `exchange` "." is the null MX.
    pub fn mx(self, name: &str, preference: u16, exchange: &str) -> Self {
        let exchange = self.name(exchange);
        self.push(name, RData::MX(MX::new(preference, exchange)))
    }

    /// Adds an A record at `name`.
    pub fn a(self, name: &str, ip: Ipv4Addr) -> Self {
        self.push(name, RData::A(A(ip)))
    }

    /// Adds an AAAA record at `name`.
    pub fn aaaa(self, name: &str, ip: Ipv6Addr) -> Self {
        self.push(name, RData::AAAA(AAAA(ip)))
    }

    /// Adds a TXT record of one string at `name`.
    pub fn txt(self, name: &str, text: &str) -> Self {
        self.push(name, RData::TXT(TXT::new(vec![text.to_owned()])))
    }

    /// Makes every query for `name` (any type) answer SERVFAIL.
    pub fn servfail(mut self, name: &str) -> Self {
        let name = self.name(name);
        self.servfail.push(LowerName::new(&name));
        self
    }

    /// Binds 127.0.0.1 and starts serving.
    ///
    /// # Panics
    ///
    /// When no port is free for both UDP and TCP, or the zone cannot be built.
    pub async fn start(self) -> FakeDns {
        let mut zone: InMemoryZoneHandler =
            InMemoryZoneHandler::empty(self.origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa = SOA::new(
            self.name("ns"),
            self.name("hostmaster"),
            SERIAL,
            SOA_REFRESH,
            SOA_RETRY,
            SOA_EXPIRE,
            NEGATIVE_TTL,
        );
        zone.upsert_mut(
            Record::from_rdata(self.origin.clone(), RECORD_TTL, RData::SOA(soa)),
            SERIAL,
        );
        for record in self.records {
            zone.upsert_mut(record, SERIAL);
        }
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::new(&self.origin), vec![Arc::new(zone)]);

        let queries = Arc::new(AtomicUsize::new(0));
        let handler = Handler {
            catalog,
            queries: queries.clone(),
            servfail: self.servfail,
        };
        let (udp, tcp) = bind_udp_and_tcp();
        let addr = udp.local_addr().expect("local address of the UDP socket");
        let mut server = Server::new(handler);
        server.register_socket(tokio::net::UdpSocket::from_std(udp).expect("tokio UDP socket"));
        server.register_listener(
            tokio::net::TcpListener::from_std(tcp).expect("tokio TCP listener"),
            TCP_IDLE_TIMEOUT,
            TCP_RESPONSE_BUFFER,
        );
        FakeDns {
            addr,
            queries,
            server,
        }
    }

    fn push(mut self, name: &str, data: RData) -> Self {
        let name = self.name(name);
        self.records
            .push(Record::from_rdata(name, RECORD_TTL, data));
        self
    }

    /// `"@"` is the origin, `"x."` is absolute, anything else is relative to the origin.
    fn name(&self, name: &str) -> Name {
        if name == "@" {
            return self.origin.clone();
        }
        if name.ends_with('.') {
            return Name::from_ascii(name).expect("absolute test name");
        }
        Name::from_ascii(name)
            .and_then(|relative| relative.append_domain(&self.origin))
            .expect("relative test name")
    }
}

/// A running authoritative DNS server for one zone; see the module docs.
pub struct FakeDns {
    addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    server: Server<Handler>,
}

impl FakeDns {
    /// Starts describing a zone with origin `origin` (with or without the trailing dot).
    pub fn builder(origin: &str) -> FakeDnsBuilder {
        let origin = Name::from_ascii(origin)
            .map(|mut name| {
                name.set_fqdn(true);
                name
            })
            .expect("zone origin");
        FakeDnsBuilder {
            origin,
            records: Vec::new(),
            servfail: Vec::new(),
        }
    }

    /// The `"127.0.0.1:PORT"` to put in `dns.nameservers` (UDP and TCP share the port).
    pub fn nameserver(&self) -> String {
        self.addr.to_string()
    }

    /// Queries received so far, over UDP and TCP, answered or not.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }

    /// Stops serving and waits until the sockets are closed.
    pub async fn stop(mut self) {
        self.server
            .shutdown_gracefully()
            .await
            .expect("fake DNS server shut down");
    }
}

/// Counts queries, answers SERVFAIL for the chosen names and hands the rest to the catalog.
struct Handler {
    catalog: Catalog,
    queries: Arc<AtomicUsize>,
    servfail: Vec<LowerName>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        self.queries.fetch_add(1, Ordering::SeqCst);
        let fails = request
            .request_info()
            .is_ok_and(|info| self.servfail.contains(info.query.name()));
        if !fails {
            return self
                .catalog
                .handle_request::<R, T>(request, response_handle)
                .await;
        }
        let response = MessageResponseBuilder::from_message_request(request)
            .error_msg(&request.metadata, ResponseCode::ServFail);
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(_) => {
                let mut metadata = Metadata::new(
                    request.metadata.id,
                    MessageType::Response,
                    request.metadata.op_code,
                );
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

/// A name server that never answers: queries time out. UDP and TCP share the port; the
/// kernel completes TCP handshakes but nothing is ever read.
pub struct SilentDns {
    udp: std::net::UdpSocket,
    _tcp: std::net::TcpListener,
}

impl SilentDns {
    /// Binds 127.0.0.1 on a random port.
    pub fn start() -> SilentDns {
        let (udp, tcp) = bind_udp_and_tcp();
        SilentDns { udp, _tcp: tcp }
    }

    /// The `"127.0.0.1:PORT"` to put in `dns.nameservers`.
    pub fn nameserver(&self) -> String {
        self.udp
            .local_addr()
            .expect("local address of the UDP socket")
            .to_string()
    }
}

/// A non-blocking UDP socket and TCP listener on the same random 127.0.0.1 port.
fn bind_udp_and_tcp() -> (std::net::UdpSocket, std::net::TcpListener) {
    for _ in 0..PORT_TRIES {
        let udp = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind UDP");
        let port = udp.local_addr().expect("UDP local address").port();
        if let Ok(tcp) = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            udp.set_nonblocking(true).expect("non-blocking UDP");
            tcp.set_nonblocking(true).expect("non-blocking TCP");
            return (udp, tcp);
        }
    }
    panic!("no port on 127.0.0.1 was free for both UDP and TCP after {PORT_TRIES} tries");
}
