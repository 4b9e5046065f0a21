//! A real DNS client for the agent's DNS listener (queries built and parsed
//! with hickory-proto, sent over UDP or TCP), and a stub upstream resolver on
//! loopback so that forwarded queries never leave the machine.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// How a query travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The parts of a DNS answer a test asserts on.
#[derive(Clone, Debug)]
pub struct DnsAnswer {
    pub response_code: ResponseCode,
    pub authoritative: bool,
    /// The A and AAAA records of the answer section, in order.
    pub addresses: Vec<IpAddr>,
    pub message: Message,
}

fn next_id() -> u16 {
    static ID: AtomicU16 = AtomicU16::new(0x2a00);
    ID.fetch_add(1, Ordering::Relaxed)
}

/// `name` as a fully qualified name (with the root label).
fn fqdn(name: &str) -> Name {
    let text = if name.ends_with('.') { name.to_string() } else { format!("{name}.") };
    Name::from_ascii(&text).unwrap_or_else(|e| panic!("{name:?} is not a DNS name: {e}"))
}

/// A recursive query for `name` of type `record_type`, as a stub resolver sends it.
pub fn build_query(id: u16, name: &str, record_type: RecordType) -> Vec<u8> {
    let name = fqdn(name);
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name, record_type));
    msg.to_vec().expect("a query encodes")
}

/// Sends one query for `name` to `server` and waits up to `timeout` for the
/// answer with the same id. `Err` on timeout, transport errors, or an answer
/// that does not parse or does not match the question.
pub fn query(
    server: SocketAddr,
    name: &str,
    record_type: RecordType,
    transport: Transport,
    timeout: Duration,
) -> Result<DnsAnswer, String> {
    let id = next_id();
    let packet = build_query(id, name, record_type);
    let bytes = match transport {
        Transport::Udp => exchange_udp(server, &packet, id, timeout),
        Transport::Tcp => exchange_tcp(server, &packet, timeout),
    }
    .map_err(|e| format!("DNS {transport:?} query for {name} to {server}: {e}"))?;
    let message = Message::from_vec(&bytes).map_err(|e| format!("unparseable DNS answer from {server}: {e}"))?;
    if message.metadata.id != id || message.metadata.message_type != MessageType::Response {
        return Err(format!("{server} answered something else than query {id}: {message:?}"));
    }
    let asked = fqdn(name);
    if message.queries.first().map(Query::name) != Some(&asked) {
        return Err(format!("{server} answered another question: {:?}", message.queries));
    }
    let addresses = message
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    Ok(DnsAnswer {
        response_code: message.metadata.response_code,
        authoritative: message.metadata.authoritative,
        addresses,
        message,
    })
}

/// The IPv4 addresses `server` gives for `name` over UDP; `Err` unless the
/// answer is NOERROR.
pub fn resolve_a(server: SocketAddr, name: &str) -> Result<Vec<Ipv4Addr>, String> {
    let answer = query(server, name, RecordType::A, Transport::Udp, Duration::from_secs(5))?;
    if answer.response_code != ResponseCode::NoError {
        return Err(format!("{server} answered {} for {name}", answer.response_code));
    }
    Ok(answer
        .addresses
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
        .collect())
}

fn exchange_udp(server: SocketAddr, packet: &[u8], id: u16, timeout: Duration) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = if server.is_ipv4() { (Ipv4Addr::LOCALHOST, 0).into() } else { "[::1]:0".parse().unwrap() };
    let sock = UdpSocket::bind(local)?;
    sock.connect(server)?;
    sock.send(packet)?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        sock.set_read_timeout(Some(left))?;
        let n = sock.recv(&mut buf)?;
        // a late answer to an earlier query on a reused port is not ours
        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            return Ok(buf[..n].to_vec());
        }
    }
}

fn exchange_tcp(server: SocketAddr, packet: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&server, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let len = u16::try_from(packet.len()).map_err(|_| std::io::Error::other("query too long"))?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(packet);
    stream.write_all(&framed)?;
    let mut head = [0u8; 2];
    stream.read_exact(&mut head)?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(head))];
    stream.read_exact(&mut body)?;
    Ok(body)
}

/// A UDP DNS server on 127.0.0.1 that answers A queries for the names it was
/// given and stays silent for every other name (as an unreachable or broken
/// upstream would). Stops when dropped.
pub struct StubUpstream {
    pub addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StubUpstream {
    /// Starts the stub with `records` (names without the trailing dot, any case).
    pub fn start(records: &[(&str, Ipv4Addr)]) -> StubUpstream {
        let table: HashMap<String, Ipv4Addr> =
            records.iter().map(|(n, ip)| (n.trim_end_matches('.').to_ascii_lowercase(), *ip)).collect();
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the stub upstream on 127.0.0.1:0");
        sock.set_read_timeout(Some(Duration::from_millis(100))).expect("set a read timeout");
        let addr = sock.local_addr().expect("local address of a bound socket");
        let queries = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (q, s) = (queries.clone(), stop.clone());
        let thread = std::thread::spawn(move || serve_stub(&sock, &table, &q, &s));
        StubUpstream { addr, queries, stop, thread: Some(thread) }
    }

    /// How many queries reached the stub so far.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }
}

fn serve_stub(sock: &UdpSocket, table: &HashMap<String, Ipv4Addr>, queries: &AtomicUsize, stop: &AtomicBool) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
        let Ok(request) = Message::from_vec(&buf[..n]) else { continue };
        queries.fetch_add(1, Ordering::Relaxed);
        let Some(question) = request.queries.first() else { continue };
        let name = question.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
        let Some(ip) = table.get(&name) else { continue };
        let mut response = Message::response(request.metadata.id, OpCode::Query);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.metadata.response_code = ResponseCode::NoError;
        response.add_query(question.clone());
        if question.query_type() == RecordType::A {
            response.add_answer(Record::from_rdata(question.name().clone(), 60, RData::A(A(*ip))));
        }
        if let Ok(bytes) = response.to_vec() {
            let _ = sock.send_to(&bytes, from);
        }
    }
}

impl Drop for StubUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// dnsmasq answering TXT records on 127.0.0.1:`port` (and nothing else);
/// stopped by PID on drop.
pub struct Dnsmasq {
    pub proc: crate::Proc,
    _logs: tempfile::TempDir,
}

impl Dnsmasq {
    pub fn start(port: u16, txt_records: &[(&str, &str)]) -> Dnsmasq {
        let program = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("dnsmasq is missing: install Debian's dnsmasq-base (scripts/test does)");
        let mut cmd = std::process::Command::new(program);
        cmd.args([
            "--no-daemon",
            &format!("--port={port}"),
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--pid-file=",
        ]);
        for (name, value) in txt_records {
            cmd.arg(format!("--txt-record={name},{value}"));
        }
        let logs = tempfile::Builder::new().prefix("trellis-e2e-dnsmasq-").tempdir().expect("dnsmasq log dir");
        Dnsmasq { proc: crate::Proc::spawn("dnsmasq", cmd, logs.path()), _logs: logs }
    }
}
