//! One TXT lookup through a recursive resolver: a query over UDP, again over
//! TCP when the answer comes back truncated, the whole exchange under one
//! deadline.
//!
//! The answer decides whether an account owns a domain, so it is treated as
//! hostile input: only a datagram from the resolver's address, with the
//! query's random id and the same question, counts; junk is ignored;
//! sizes and record counts are capped. DNSSEC is not validated: the resolver
//! is trusted, as the operator chose it (`--dns-resolver`).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use aws_lc_rs::rand::SecureRandom;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// Receive buffer for UDP answers; a larger datagram is cut and then ignored as junk.
const MAX_UDP_ANSWER: usize = 4096;
/// Largest TCP answer read; a resolver announcing more is refused.
pub const MAX_TCP_ANSWER: usize = 16 * 1024;
/// TXT records of one name considered; the rest are ignored.
pub const MAX_TXT_RECORDS: usize = 64;
/// CNAMEs followed inside one answer.
const MAX_CNAME_HOPS: usize = 8;

/// Why a lookup gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// No answer to this query arrived before the deadline.
    #[error("no answer from the DNS resolver {resolver} within {}", humantime::format_duration(*timeout))]
    Timeout { resolver: SocketAddr, timeout: Duration },
    /// The resolver answered with an error code (SERVFAIL, REFUSED, …).
    #[error("the DNS resolver {resolver} answered {code}")]
    Refused { resolver: SocketAddr, code: ResponseCode },
    /// The resolver cannot be reached (no route, connection refused, …).
    #[error("cannot reach the DNS resolver {resolver}: {source}")]
    Io { resolver: SocketAddr, source: io::Error },
    /// A TCP answer that is too large, malformed, or answers another question.
    #[error("the DNS resolver {resolver} sent an unusable answer over TCP: {what}")]
    BadAnswer { resolver: SocketAddr, what: &'static str },
    /// The name cannot be put into a query (not a DNS name).
    #[error("{0:?} is not a DNS name")]
    BadName(String),
}

/// What one received message means for the query with `id` and `name`.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Not an answer to this query (junk, another id, another question): keep waiting.
    Ignore,
    /// The answer did not fit; ask again over TCP.
    Truncated,
    /// The TXT records of the name (each record's strings joined), possibly none.
    Records(Vec<Vec<u8>>),
    /// The resolver answered with this error code.
    Error(ResponseCode),
}

/// A recursive query for the TXT records of `name` (a fully qualified name).
pub fn build_query(id: u16, name: &Name) -> Vec<u8> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name.clone(), RecordType::TXT));
    // Encoding a message with one valid name and no records cannot fail.
    msg.to_vec().expect("a TXT query encodes")
}

/// Reads one message received for the query `id` about `name`. Pure.
pub fn read_reply(id: u16, name: &Name, bytes: &[u8]) -> Reply {
    let Ok(msg) = Message::from_vec(bytes) else { return Reply::Ignore };
    let head = msg.metadata;
    if head.id != id || head.message_type != MessageType::Response || head.op_code != OpCode::Query {
        return Reply::Ignore;
    }
    let [query] = msg.queries.as_slice() else { return Reply::Ignore };
    if query.name() != name || query.query_type() != RecordType::TXT || query.query_class() != DNSClass::IN {
        return Reply::Ignore;
    }
    if head.truncation {
        return Reply::Truncated;
    }
    match head.response_code {
        ResponseCode::NoError => Reply::Records(txt_records(&msg, name)),
        ResponseCode::NXDomain => Reply::Records(Vec::new()),
        code => Reply::Error(code),
    }
}

/// The TXT records of `name` in the answer section, following CNAMEs from it.
fn txt_records(msg: &Message, name: &Name) -> Vec<Vec<u8>> {
    let mut owners = vec![name.clone()];
    for _ in 0..MAX_CNAME_HOPS {
        let before = owners.len();
        for record in &msg.answers {
            if let RData::CNAME(target) = &record.data
                && owners.contains(&record.name)
                && !owners.contains(&target.0)
            {
                owners.push(target.0.clone());
            }
        }
        if owners.len() == before {
            break;
        }
    }
    msg.answers
        .iter()
        .filter(|r| r.dns_class == DNSClass::IN && owners.contains(&r.name))
        .filter_map(|r| match &r.data {
            RData::TXT(txt) => Some(txt.txt_data.concat()),
            _ => None,
        })
        .take(MAX_TXT_RECORDS)
        .collect()
}

/// The TXT records of `name` (each record's strings joined), or none when the
/// name has none or does not exist. Never longer than `timeout`.
pub async fn lookup_txt(resolver: SocketAddr, name: &str, timeout: Duration) -> Result<Vec<Vec<u8>>, LookupError> {
    let fqdn = if name.ends_with('.') { name.to_string() } else { format!("{name}.") };
    let name = Name::from_ascii(&fqdn).map_err(|_| LookupError::BadName(name.to_string()))?;
    let id = random_id();
    let exchange = async {
        let io = |source| LookupError::Io { resolver, source };
        let reply = match exchange_udp(resolver, id, &name).await.map_err(io)? {
            Reply::Truncated => exchange_tcp(resolver, id, &name).await?,
            other => other,
        };
        match reply {
            Reply::Records(records) => Ok(records),
            Reply::Error(code) => Err(LookupError::Refused { resolver, code }),
            Reply::Ignore | Reply::Truncated => {
                Err(LookupError::BadAnswer { resolver, what: "a truncated or unrelated answer" })
            }
        }
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| LookupError::Timeout { resolver, timeout })?
}

fn random_id() -> u16 {
    let mut bytes = [0u8; 2];
    // A predictable id only weakens spoofing resistance; the source port is random too.
    if aws_lc_rs::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        tracing::warn!("the system random number generator failed; using a fixed DNS query id");
    }
    u16::from_be_bytes(bytes)
}

/// Sends the query and waits for its reply (the caller bounds the time).
async fn exchange_udp(resolver: SocketAddr, id: u16, name: &Name) -> io::Result<Reply> {
    let local: SocketAddr = if resolver.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = UdpSocket::bind(local).await?;
    // Connected: the kernel drops datagrams from any other address.
    socket.connect(resolver).await?;
    socket.send(&build_query(id, name)).await?;
    let mut buf = vec![0u8; MAX_UDP_ANSWER];
    loop {
        let n = socket.recv(&mut buf).await?;
        match read_reply(id, name, &buf[..n]) {
            Reply::Ignore => continue,
            reply => return Ok(reply),
        }
    }
}

/// One query over TCP (RFC 1035 §4.2.2: a two-byte length before each message).
async fn exchange_tcp(resolver: SocketAddr, id: u16, name: &Name) -> Result<Reply, LookupError> {
    let io = |source| LookupError::Io { resolver, source };
    let mut stream = TcpStream::connect(resolver).await.map_err(io)?;
    let query = build_query(id, name);
    let mut out = Vec::with_capacity(2 + query.len());
    // A query holds one name of at most 255 bytes: its length fits in two bytes.
    out.extend_from_slice(&(query.len() as u16).to_be_bytes());
    out.extend_from_slice(&query);
    stream.write_all(&out).await.map_err(io)?;
    let len = usize::from(stream.read_u16().await.map_err(io)?);
    if len > MAX_TCP_ANSWER {
        return Err(LookupError::BadAnswer { resolver, what: "larger than 16 KiB" });
    }
    let mut answer = vec![0u8; len];
    stream.read_exact(&mut answer).await.map_err(io)?;
    match read_reply(id, name, &answer) {
        Reply::Ignore => Err(LookupError::BadAnswer { resolver, what: "malformed, or for another query" }),
        Reply::Truncated => Err(LookupError::BadAnswer { resolver, what: "truncated" }),
        reply => Ok(reply),
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::{A, CNAME, TXT};

    use super::*;

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    /// The answer a resolver would give to `query` with these records.
    fn answer_to(query: &[u8], code: ResponseCode, records: Vec<Record>) -> Message {
        let q = Message::from_vec(query).unwrap();
        let mut msg = Message::response(q.metadata.id, OpCode::Query);
        msg.metadata.response_code = code;
        msg.add_queries(q.queries);
        msg.add_answers(records);
        msg
    }

    fn txt(owner: &str, strings: &[&str]) -> Record {
        Record::from_rdata(name(owner), 60, RData::TXT(TXT::new(strings.iter().map(|s| s.to_string()).collect())))
    }

    const N: &str = "_trellis-verification.example.com.";

    #[test]
    fn txt_records_of_the_name_are_returned_with_their_strings_joined() {
        let q = build_query(7, &name(N));
        let records = vec![
            txt(N, &["trellis-verification=", "abc"]),
            txt("_TRELLIS-verification.EXAMPLE.com.", &["v=spf1 -all"]),
            txt("other.example.com.", &["not for us"]),
            Record::from_rdata(name(N), 60, RData::A(A([10, 0, 0, 1].into()))),
        ];
        let bytes = answer_to(&q, ResponseCode::NoError, records).to_vec().unwrap();
        assert_eq!(
            read_reply(7, &name(N), &bytes),
            Reply::Records(vec![b"trellis-verification=abc".to_vec(), b"v=spf1 -all".to_vec()])
        );
    }

    #[test]
    fn cnames_from_the_name_are_followed() {
        let q = build_query(7, &name(N));
        let target = "verify.dns-provider.net.";
        let records = vec![
            Record::from_rdata(name(N), 60, RData::CNAME(CNAME(name(target)))),
            txt(target, &["trellis-verification=abc"]),
            // A CNAME from an unrelated name does not make its target count.
            Record::from_rdata(name("x.example.org."), 60, RData::CNAME(CNAME(name("y.example.org.")))),
            txt("y.example.org.", &["trellis-verification=evil"]),
        ];
        let bytes = answer_to(&q, ResponseCode::NoError, records).to_vec().unwrap();
        assert_eq!(read_reply(7, &name(N), &bytes), Reply::Records(vec![b"trellis-verification=abc".to_vec()]));
    }

    #[test]
    fn nxdomain_is_no_records_and_other_codes_are_errors() {
        let q = build_query(9, &name(N));
        let nx = answer_to(&q, ResponseCode::NXDomain, vec![]).to_vec().unwrap();
        assert_eq!(read_reply(9, &name(N), &nx), Reply::Records(vec![]));
        let fail = answer_to(&q, ResponseCode::ServFail, vec![]).to_vec().unwrap();
        assert_eq!(read_reply(9, &name(N), &fail), Reply::Error(ResponseCode::ServFail));
    }

    #[test]
    fn answers_to_other_queries_and_junk_are_ignored() {
        let q = build_query(9, &name(N));
        let good = answer_to(&q, ResponseCode::NoError, vec![txt(N, &["v"])]);
        let mut wrong_id = good.clone();
        wrong_id.metadata.id = 10;
        let mut not_a_response = good.clone();
        not_a_response.metadata.message_type = MessageType::Query;
        let other_question =
            answer_to(&build_query(9, &name("_trellis-verification.evil.net.")), ResponseCode::NoError, vec![]);
        for junk in [
            wrong_id.to_vec().unwrap(),
            not_a_response.to_vec().unwrap(),
            other_question.to_vec().unwrap(),
            vec![],
            vec![0xff; 3],
            good.to_vec().unwrap()[..20].to_vec(),
        ] {
            assert_eq!(read_reply(9, &name(N), &junk), Reply::Ignore, "{junk:?}");
        }
        let mut truncated = good.clone();
        truncated.metadata.truncation = true;
        assert_eq!(read_reply(9, &name(N), &truncated.to_vec().unwrap()), Reply::Truncated);
    }

    #[test]
    fn at_most_max_txt_records_are_considered() {
        let q = build_query(1, &name(N));
        let records = (0..MAX_TXT_RECORDS + 10).map(|i| txt(N, &[&format!("r{i}")])).collect();
        let bytes = answer_to(&q, ResponseCode::NoError, records).to_vec().unwrap();
        let Reply::Records(got) = read_reply(1, &name(N), &bytes) else { panic!("no records") };
        assert_eq!(got.len(), MAX_TXT_RECORDS);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_from_a_resolver_are_read_without_panicking(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = read_reply(0x1234, &name(N), &bytes);
        }
    }

    /// A resolver on loopback that answers every query with `records` for its
    /// question, `truncate_udp` making UDP answers truncated; counts TCP queries.
    struct StubResolver {
        addr: SocketAddr,
        tcp_queries: Arc<AtomicUsize>,
        _task: tokio::task::JoinHandle<()>,
    }

    async fn stub_resolver(strings: Vec<String>, truncate_udp: bool) -> StubResolver {
        // UDP and TCP on the same port number: a free UDP port's TCP twin may be
        // held by another process (tests run in parallel), so try a few ports.
        let mut attempts = 0;
        let (udp, tcp, addr) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            match tokio::net::TcpListener::bind(addr).await {
                Ok(tcp) => break (udp, tcp, addr),
                Err(_) if attempts < 50 => attempts += 1,
                Err(e) => panic!("no port free for both UDP and TCP after 50 tries: {e}"),
            }
        };
        let tcp_queries = Arc::new(AtomicUsize::new(0));
        let answer = move |query: &[u8], truncated: bool| {
            let q = Message::from_vec(query).unwrap();
            let owner = q.queries[0].name().clone();
            let record = Record::from_rdata(owner, 60, RData::TXT(TXT::new(strings.clone())));
            let mut msg = answer_to(query, ResponseCode::NoError, if truncated { vec![] } else { vec![record] });
            msg.metadata.truncation = truncated;
            msg.to_vec().unwrap()
        };
        let counter = tcp_queries.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                tokio::select! {
                    Ok((n, from)) = udp.recv_from(&mut buf) => {
                        // Junk first, from the right address: the client must skip it.
                        udp.send_to(b"junk", from).await.unwrap();
                        udp.send_to(&answer(&buf[..n], truncate_udp), from).await.unwrap();
                    }
                    Ok((mut stream, _)) = tcp.accept() => {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let len = stream.read_u16().await.unwrap();
                        let mut query = vec![0u8; usize::from(len)];
                        stream.read_exact(&mut query).await.unwrap();
                        let reply = answer(&query, false);
                        stream.write_all(&(reply.len() as u16).to_be_bytes()).await.unwrap();
                        stream.write_all(&reply).await.unwrap();
                    }
                }
            }
        });
        StubResolver { addr, tcp_queries, _task: task }
    }

    #[tokio::test]
    async fn udp_answers_are_read_past_junk() {
        let stub = stub_resolver(vec!["trellis-verification=abc".into()], false).await;
        let got = lookup_txt(stub.addr, "_trellis-verification.example.com", Duration::from_secs(5)).await.unwrap();
        assert_eq!(got, vec![b"trellis-verification=abc".to_vec()]);
        assert_eq!(stub.tcp_queries.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_truncated_udp_answer_is_asked_again_over_tcp() {
        let stub = stub_resolver(vec!["x".repeat(200), "y".repeat(200)], true).await;
        let got = lookup_txt(stub.addr, "_trellis-verification.example.com", Duration::from_secs(5)).await.unwrap();
        assert_eq!(got, vec![format!("{}{}", "x".repeat(200), "y".repeat(200)).into_bytes()]);
        assert_eq!(stub.tcp_queries.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_resolver_that_never_answers_costs_one_timeout_and_blocks_no_other_lookup() {
        // Reads every query and drops it.
        let black_hole = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let silent = black_hole.local_addr().unwrap();
        let _drain = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while black_hole.recv_from(&mut buf).await.is_ok() {}
        });
        let stub = stub_resolver(vec!["trellis-verification=abc".into()], false).await;
        // Long enough that a loaded machine (tests run in parallel) answers the
        // good lookup well within half of it.
        let timeout = Duration::from_secs(3);
        let started = tokio::time::Instant::now();
        let hanging: Vec<_> = (0..8)
            .map(|i| {
                let name = format!("_trellis-verification.d{i}.example.com");
                tokio::spawn(async move { lookup_txt(silent, &name, timeout).await })
            })
            .collect();
        let good = lookup_txt(stub.addr, "_trellis-verification.example.com", timeout).await.unwrap();
        assert_eq!(good.len(), 1);
        assert!(
            started.elapsed() < timeout / 2,
            "the answered lookup waited for the silent ones: {:?}",
            started.elapsed()
        );
        for h in hanging {
            let err = h.await.unwrap().unwrap_err();
            assert!(matches!(err, LookupError::Timeout { .. }), "{err}");
            assert!(err.to_string().contains("within 3s"), "{err}");
        }
        assert!(started.elapsed() < timeout * 3, "every lookup ends at its deadline");
    }

    #[tokio::test]
    async fn a_closed_port_fails_fast_and_names_the_resolver() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        drop(sock);
        let err = lookup_txt(addr, "example.com", Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, LookupError::Io { .. }), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
