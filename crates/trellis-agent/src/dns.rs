//! The agent's DNS listener (UDP and TCP on the same port): answers A/AAAA for
//! the endpoint DNS names in the config, answers NXDOMAIN for other names under
//! `trellis.internal`, and forwards everything else, unchanged, to the
//! upstream resolver.
//!
//! It must never be an open resolver: only sources in the allowed networks
//! (`--dns-allow`; by default loopback, private and link-local ranges and the
//! agent's address pool) are answered — others get REFUSED on UDP and a closed
//! connection on TCP, and nothing is forwarded for them. `ANY` queries are
//! never forwarded (NOTIMP, in the spirit of RFC 8482). Bounded: UDP forwards
//! in flight and TCP connections have budgets of their own, so TCP clients
//! cannot starve UDP; every upstream exchange has a deadline; a TCP connection
//! must complete each query within a deadline and is closed when idle; garbage
//! packets are dropped without a reply.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_proto::AgentConfig;

use crate::metrics::Metrics;

/// TTL of answers for endpoint names: short, so revocations and moves show quickly.
const TTL: u32 = 30;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// A TCP connection must bring its next query (and get the answer out) within this.
const TCP_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// UDP queries being forwarded at once; more are dropped (the client retries).
const MAX_UDP_FORWARDS: usize = 256;
/// TCP connections open at once; more are closed on accept.
const MAX_TCP_CONNECTIONS: usize = 64;
const INTERNAL_SUFFIX: &str = "trellis.internal";

/// Endpoint names → addresses, built from a config.
#[derive(Debug, Default)]
pub struct NameTable {
    names: HashMap<String, Vec<IpAddr>>,
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl NameTable {
    pub fn from_config(config: &AgentConfig) -> Self {
        let mut names: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for endpoint in &config.endpoints {
            for resource in &endpoint.resources {
                let records = resource.dns_names.iter().map(|n| (n, std::slice::from_ref(&resource.address)));
                let others = resource.dns_records.iter().map(|r| (&r.name, r.addresses.as_slice()));
                for (name, addresses) in records.chain(others) {
                    let addrs = names.entry(normalize(name)).or_default();
                    for address in addresses {
                        if !addrs.contains(address) {
                            addrs.push(*address);
                        }
                    }
                }
            }
        }
        Self { names }
    }

    pub fn lookup(&self, name: &str) -> Option<&[IpAddr]> {
        self.names.get(&normalize(name)).map(Vec::as_slice)
    }
}

/// What to do with one DNS message.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Reply with these bytes.
    Reply(Vec<u8>),
    /// Send the query to the upstream resolver.
    Forward,
    /// Not a DNS query: say nothing.
    Drop,
}

/// Decides the answer to `packet` from `table`. Pure, so it is tested without sockets.
pub fn answer(table: &NameTable, packet: &[u8]) -> Answer {
    let Ok(request) = Message::from_vec(packet) else { return Answer::Drop };
    let head = request.metadata;
    if head.message_type != MessageType::Query {
        return Answer::Drop;
    }
    if head.op_code != OpCode::Query {
        return reply(Message::error_msg(head.id, head.op_code, ResponseCode::NotImp));
    }
    let [query] = request.queries.as_slice() else {
        return reply(Message::error_msg(head.id, head.op_code, ResponseCode::FormErr));
    };
    let name = query.name().to_ascii();
    let normalized = normalize(&name);
    let addrs = match table.lookup(&normalized) {
        Some(a) => a,
        None if normalized == INTERNAL_SUFFIX || normalized.ends_with(&format!(".{INTERNAL_SUFFIX}")) => &[][..],
        // ANY is an amplification tool, never forwarded.
        None if query.query_type() == RecordType::ANY => {
            let mut msg = Message::error_msg(head.id, head.op_code, ResponseCode::NotImp);
            msg.add_query(query.clone());
            msg.metadata.recursion_desired = head.recursion_desired;
            msg.metadata.recursion_available = true;
            return reply(msg);
        }
        None => return Answer::Forward,
    };
    let known = table.lookup(&normalized).is_some();
    let mut response = Message::response(head.id, OpCode::Query);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = head.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.response_code = if known { ResponseCode::NoError } else { ResponseCode::NXDomain };
    response.add_query(query.clone());
    if query.query_class() == DNSClass::IN {
        for addr in addrs {
            let rdata = match (query.query_type(), addr) {
                (RecordType::A | RecordType::ANY, IpAddr::V4(v4)) => RData::A(A(*v4)),
                (RecordType::AAAA | RecordType::ANY, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            response.add_answer(Record::from_rdata(query.name().clone(), TTL, rdata));
        }
    }
    reply(response)
}

fn reply(msg: Message) -> Answer {
    match msg.to_vec() {
        Ok(bytes) => Answer::Reply(bytes),
        Err(_) => Answer::Drop,
    }
}

/// Networks whose clients the DNS listener answers when `--dns-allow` is not
/// given (the agent's address pool is added): loopback, the RFC 1918 ranges,
/// shared address space (RFC 6598), unique local and link-local IPv6.
pub fn default_allowed_sources() -> Vec<IpNet> {
    [
        "127.0.0.0/8",
        "::1/128",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "fc00::/7",
        "fe80::/10",
    ]
    .iter()
    // Literal networks.
    .map(|n| n.parse().expect("a literal network"))
    .collect()
}

/// Whether a query from `source` may be answered. Pure.
pub fn source_allowed(allowed: &[IpNet], source: IpAddr) -> bool {
    let source = source.to_canonical();
    allowed.iter().any(|net| net.contains(&source))
}

/// What the listener knows of one config version.
#[derive(Default)]
struct Snapshot {
    version: u64,
    names: Arc<NameTable>,
    allowed: Arc<Vec<IpNet>>,
}

/// Shared state of the DNS listener.
pub struct DnsContext {
    config: watch::Receiver<Arc<AgentConfig>>,
    /// `None`: the default networks and the config's address pool.
    allow: Option<Arc<Vec<IpNet>>>,
    snapshot: Mutex<Snapshot>,
    upstream: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    udp_forwards: Arc<Semaphore>,
    tcp_connections: Arc<Semaphore>,
}

impl DnsContext {
    pub fn new(
        config: watch::Receiver<Arc<AgentConfig>>,
        upstream: Option<SocketAddr>,
        allow: Option<Vec<IpNet>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            config,
            allow: allow.map(Arc::new),
            snapshot: Mutex::new(Snapshot { version: u64::MAX, ..Snapshot::default() }),
            upstream,
            metrics,
            udp_forwards: Arc::new(Semaphore::new(MAX_UDP_FORWARDS)),
            tcp_connections: Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS)),
        }
    }

    /// The name table and allowed sources of the current config, rebuilt when the version changes.
    fn snapshot(&self) -> (Arc<NameTable>, Arc<Vec<IpNet>>) {
        let config = self.config.borrow().clone();
        let mut cached = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        if cached.version != config.version {
            let allowed = match &self.allow {
                Some(list) => list.clone(),
                None => {
                    let mut list = default_allowed_sources();
                    list.extend(config.address_pool.parse::<IpNet>().ok());
                    Arc::new(list)
                }
            };
            *cached = Snapshot { version: config.version, names: Arc::new(NameTable::from_config(&config)), allowed };
        }
        (cached.names.clone(), cached.allowed.clone())
    }

    fn table(&self) -> Arc<NameTable> {
        self.snapshot().0
    }

    /// Whether `source` may be answered; counts it when not.
    fn admits(&self, source: IpAddr) -> bool {
        let ok = source_allowed(&self.snapshot().1, source);
        if !ok {
            self.metrics.count_dns("refused_source");
        }
        ok
    }

    /// REFUSED for `packet` (a parseable query).
    fn refused(packet: &[u8]) -> Option<Vec<u8>> {
        let request = Message::from_vec(packet).ok()?;
        let head = request.metadata;
        if head.message_type != MessageType::Query {
            return None;
        }
        let mut msg = Message::error_msg(head.id, head.op_code, ResponseCode::Refused);
        msg.add_queries(request.queries);
        msg.metadata.recursion_desired = head.recursion_desired;
        msg.to_vec().ok()
    }

    fn answer(&self, packet: &[u8]) -> Answer {
        let a = answer(&self.table(), packet);
        self.metrics.count_dns(match &a {
            Answer::Reply(_) => "local",
            Answer::Forward => "forwarded",
            Answer::Drop => "dropped",
        });
        a
    }

    /// SERVFAIL for `packet` (a parseable query), when the upstream cannot help.
    fn servfail(packet: &[u8]) -> Option<Vec<u8>> {
        let request = Message::from_vec(packet).ok()?;
        let head = request.metadata;
        let mut msg = Message::error_msg(head.id, head.op_code, ResponseCode::ServFail);
        msg.add_queries(request.queries);
        msg.metadata.recursion_desired = head.recursion_desired;
        msg.metadata.recursion_available = true;
        msg.to_vec().ok()
    }
}

/// Binds UDP and TCP on the same address (when the port is 0, on the same chosen port).
pub async fn bind(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    // Sockets whose TCP twin was taken stay bound until we are done, so the
    // kernel cannot hand the same UDP port out again on the next try.
    let mut held = Vec::new();
    for _ in 0..32 {
        let udp = UdpSocket::bind(addr).await?;
        let bound = udp.local_addr()?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            // Port 0 picked a UDP port whose TCP twin is taken: pick again.
            Err(e) if addr.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => {
                last = Some(e);
                held.push(udp);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("could not bind DNS on UDP and TCP")))
}

/// Serves DNS on `udp` and `tcp` until `shutdown`.
pub async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    ctx: Arc<DnsContext>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let udp = Arc::new(udp);
    tracker.spawn(serve_tcp(tcp, ctx.clone(), tracker.clone(), shutdown.clone()));
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = tokio::select! {
            r = udp.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // ICMP errors from earlier replies surface here on some systems; keep serving.
                Err(e) => {
                    tracing::debug!(error = %e, "dns receive failed");
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let packet = buf[..n].to_vec();
        if !ctx.admits(from.ip()) {
            if let Some(bytes) = DnsContext::refused(&packet) {
                let _ = udp.send_to(&bytes, from).await;
            }
            continue;
        }
        match ctx.answer(&packet) {
            Answer::Drop => {}
            Answer::Reply(bytes) => {
                let _ = udp.send_to(&bytes, from).await;
            }
            Answer::Forward => {
                let Ok(permit) = ctx.udp_forwards.clone().try_acquire_owned() else {
                    ctx.metrics.count_dns("overloaded");
                    continue;
                };
                let (udp, ctx) = (udp.clone(), ctx.clone());
                tracker.spawn(async move {
                    let resp = match ctx.upstream {
                        Some(up) => forward_udp(up, &packet).await.ok(),
                        None => None,
                    };
                    if let Some(bytes) = resp.or_else(|| DnsContext::servfail(&packet)) {
                        let _ = udp.send_to(&bytes, from).await;
                    }
                    drop(permit);
                });
            }
        }
    }
}

async fn serve_tcp(tcp: TcpListener, ctx: Arc<DnsContext>, tracker: TaskTracker, shutdown: CancellationToken) {
    loop {
        let (stream, from) = tokio::select! {
            r = tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "dns tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        if !ctx.admits(from.ip()) {
            continue;
        }
        let Ok(permit) = ctx.tcp_connections.clone().try_acquire_owned() else {
            ctx.metrics.count_dns("tcp_busy");
            continue;
        };
        let ctx = ctx.clone();
        let cancel = shutdown.clone();
        tracker.spawn(async move {
            tokio::select! {
                () = tcp_connection(stream, &ctx) => {}
                () = cancel.cancelled() => {}
            }
            drop(permit);
        });
    }
}

async fn read_tcp_message(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    let mut msg = vec![0u8; usize::from(len)];
    stream.read_exact(&mut msg).await?;
    Ok(msg)
}

async fn write_tcp_message(stream: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| io::Error::other("DNS message too long for TCP"))?;
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    stream.write_all(&out).await
}

/// Serves queries on one TCP connection; each (from waiting for it to the
/// answer written) must finish within [`TCP_QUERY_TIMEOUT`], so idle and slow
/// clients are closed.
async fn tcp_connection(mut stream: TcpStream, ctx: &DnsContext) {
    while let Ok(true) = tokio::time::timeout(TCP_QUERY_TIMEOUT, tcp_query(&mut stream, ctx)).await {}
}

/// One query on a TCP connection; false when the connection should close.
async fn tcp_query(stream: &mut TcpStream, ctx: &DnsContext) -> bool {
    let Ok(packet) = read_tcp_message(stream).await else { return false };
    let bytes = match ctx.answer(&packet) {
        Answer::Drop => return false,
        Answer::Reply(b) => b,
        Answer::Forward => {
            let resp = match ctx.upstream {
                Some(up) => forward_tcp(up, &packet).await.ok(),
                None => None,
            };
            match resp.or_else(|| DnsContext::servfail(&packet)) {
                Some(b) => b,
                None => return false,
            }
        }
    };
    write_tcp_message(stream, &bytes).await.is_ok()
}

async fn forward_udp(upstream: SocketAddr, packet: &[u8]) -> io::Result<Vec<u8>> {
    let local: SocketAddr = if upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal address");
    let sock = UdpSocket::bind(local).await?;
    sock.connect(upstream).await?;
    sock.send(packet).await?;
    let mut buf = vec![0u8; 4096];
    let exchange = async {
        loop {
            let n = sock.recv(&mut buf).await?;
            // Only the answer to this query (same id) counts; anything else is ignored.
            if n >= 2 && packet.len() >= 2 && buf[..2] == packet[..2] {
                return Ok::<_, io::Error>(buf[..n].to_vec());
            }
        }
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, exchange).await.map_err(|_| io::ErrorKind::TimedOut)?
}

async fn forward_tcp(upstream: SocketAddr, packet: &[u8]) -> io::Result<Vec<u8>> {
    let exchange = async {
        let mut stream = TcpStream::connect(upstream).await?;
        write_tcp_message(&mut stream, packet).await?;
        read_tcp_message(&mut stream).await
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, exchange).await.map_err(|_| io::ErrorKind::TimedOut)?
}

/// The first `nameserver` of `/etc/resolv.conf`, port 53.
pub fn system_upstream() -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    parse_resolv_conf(&text)
}

fn parse_resolv_conf(text: &str) -> Option<SocketAddr> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next()? != "nameserver" {
            return None;
        }
        // Scoped IPv6 (`fe80::1%eth0`) cannot be dialed without the scope id; skip those.
        let ip: IpAddr = words.next()?.parse().ok()?;
        Some(SocketAddr::new(ip, 53))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use trellis_proto::{EndpointConfig, EndpointResource};

    fn config() -> AgentConfig {
        AgentConfig {
            version: 3,
            endpoints: vec![EndpointConfig {
                vpc_endpoint_id: "vpce-1".into(),
                resources: vec![EndpointResource {
                    resource_configuration_id: "rcfg-1".into(),
                    address: "127.77.0.5".parse().unwrap(),
                    port_ranges: vec![],
                    dns_names: vec!["vpce-1.rcfg-1.local.trellis.internal".into(), "DB.Example.com".into()],
                    dns_records: vec![],
                    gateways: vec![],
                }],
            }],
            ..Default::default()
        }
    }

    fn query(name: &str, ty: RecordType) -> Vec<u8> {
        let mut msg = Message::new(4242, MessageType::Query, OpCode::Query);
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(Name::from_ascii(name).unwrap(), ty));
        msg.to_vec().unwrap()
    }

    fn reply_of(a: Answer) -> Message {
        match a {
            Answer::Reply(b) => Message::from_vec(&b).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn configured_name_gets_its_address_case_insensitively() {
        let table = NameTable::from_config(&config());
        let msg = reply_of(answer(&table, &query("db.example.COM.", RecordType::A)));
        assert_eq!(msg.metadata.id, 4242);
        assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
        assert_eq!(msg.answers.len(), 1);
        assert_eq!(&msg.answers[0].data, &RData::A(A("127.77.0.5".parse().unwrap())));
    }

    #[test]
    fn aaaa_for_an_ipv4_endpoint_is_empty_not_an_error() {
        let table = NameTable::from_config(&config());
        let msg = reply_of(answer(&table, &query("vpce-1.rcfg-1.local.trellis.internal.", RecordType::AAAA)));
        assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
        assert!(msg.answers.is_empty());
    }

    #[test]
    fn unknown_internal_name_is_nxdomain_and_others_are_forwarded() {
        let table = NameTable::from_config(&config());
        let msg = reply_of(answer(&table, &query("vpce-9.rcfg-9.local.trellis.internal.", RecordType::A)));
        assert_eq!(msg.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(answer(&table, &query("example.org.", RecordType::A)), Answer::Forward);
    }

    #[test]
    fn any_is_answered_locally_never_forwarded() {
        let table = NameTable::from_config(&config());
        let msg = reply_of(answer(&table, &query("example.org.", RecordType::ANY)));
        assert_eq!(msg.metadata.response_code, ResponseCode::NotImp);
        assert!(msg.answers.is_empty());
        // An endpoint name still gets its addresses.
        let msg = reply_of(answer(&table, &query("db.example.com.", RecordType::ANY)));
        assert_eq!(msg.answers.len(), 1);
    }

    #[test]
    fn only_private_and_local_sources_are_allowed_by_default() {
        let allowed = default_allowed_sources();
        for ok in [
            "127.0.0.1",
            "10.1.2.3",
            "172.31.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(source_allowed(&allowed, ok.parse().unwrap()), "{ok}");
        }
        for no in ["8.8.8.8", "172.32.0.1", "100.128.0.1", "2001:db8::1", "::ffff:8.8.8.8"] {
            assert!(!source_allowed(&allowed, no.parse().unwrap()), "{no}");
        }
    }

    #[test]
    fn garbage_is_dropped() {
        let table = NameTable::from_config(&config());
        assert_eq!(answer(&table, b""), Answer::Drop);
        assert_eq!(answer(&table, &[0xff; 7]), Answer::Drop);
    }

    #[test]
    fn resolv_conf_first_nameserver_wins() {
        let text = "# comment\nsearch x\nnameserver fe80::1%eth0\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n";
        assert_eq!(parse_resolv_conf(text), Some("10.0.0.2:53".parse().unwrap()));
        assert_eq!(parse_resolv_conf("search x\n"), None);
    }
}
