//! The control plane's HTTPS listener under slow and greedy clients, against
//! a real server (`server::start` on loopback) with small limits so each
//! attack takes seconds: dripped bodies, slow headers, silent and idle
//! connections, floods from one address, a used-up public budget, oversized
//! bodies and clients that never read their answers.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use trellis_control::conn_limits::{Budgets, ListenerLimits, ListenerStats};
use trellis_control::server::{RunningServer, ServerOptions, start};

/// An agent's certificate and key, PEM.
type Identity = (String, String);

struct Server {
    running: Option<RunningServer>,
    addr: SocketAddr,
    ca_pem: String,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(limits: ListenerLimits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = ServerOptions::new("127.0.0.1:0".parse().unwrap(), dir.path());
        opts.limits = limits;
        let running = start(opts).await.unwrap();
        let admin = running.admin_key_created.clone().unwrap();
        Self {
            addr: running.local_addr(),
            ca_pem: running.ca_pem().to_string(),
            admin,
            running: Some(running),
            _dir: dir,
        }
    }

    fn stats(&self) -> ListenerStats {
        self.running.as_ref().unwrap().listener_stats()
    }

    /// Waits until `cond` holds for the listener's stats (10 s at most).
    async fn until(&self, what: &str, cond: impl Fn(&ListenerStats) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond(&self.stats()) {
            assert!(Instant::now() < deadline, "{what} never happened: {:?}", self.stats());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn tls_config(&self, identity: Option<&Identity>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(trellis_control::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        Arc::new(match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        })
    }

    /// A TCP connection from `from` (any address of 127/8 is loopback).
    async fn tcp_from(&self, from: IpAddr) -> std::io::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(from, 0))?;
        socket.connect(self.addr).await
    }

    /// A TLS connection from `from`, optionally with an agent identity.
    async fn tls_from(&self, from: IpAddr, identity: Option<&Identity>) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = self.tcp_from(from).await?;
        let name = ServerName::try_from("localhost").unwrap();
        TlsConnector::from(self.tls_config(identity)).connect(name, tcp).await
    }

    /// One request on its own connection from 127.0.0.1; `(status, body)`.
    async fn call(
        &self,
        identity: Option<&Identity>,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, String) {
        let mut tls = self.tls_from(LOCAL, identity).await.unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        );
        if let Some(key) = key {
            head.push_str(&format!("authorization: Bearer {key}\r\n"));
        }
        tls.write_all(format!("{head}\r\n{body}").as_bytes()).await.unwrap();
        let answer = read_all(&mut tls).await;
        parse(&answer).unwrap_or_else(|| panic!("no HTTP answer to {method} {path}: {answer:?}"))
    }

    /// An account's API key.
    async fn account(&self) -> String {
        let (status, acct) =
            self.call(None, "POST", "/v1/accounts", Some(&self.admin), Some(json!({"name": "acme"}))).await;
        assert_eq!(status, 201, "{acct}");
        json_of(&acct)["apiKey"].as_str().unwrap().to_string()
    }

    /// Creates a VPC, subnet and join token with `key` and enrolls an agent.
    async fn enroll_agent(&self, key: &str) -> Identity {
        let (_, vpc) = self.call(None, "POST", "/v1/vpcs", Some(key), Some(json!({"name": "prod"}))).await;
        let vpc_id = json_of(&vpc)["id"].as_str().unwrap().to_string();
        let subnet = json!({"vpcId": vpc_id, "zone": "z1", "cidrBlock": "10.0.9.0/24"});
        let (_, subnet) = self.call(None, "POST", "/v1/subnets", Some(key), Some(subnet)).await;
        let subnet_id = json_of(&subnet)["id"].as_str().unwrap().to_string();
        let (status, token) =
            self.call(None, "POST", "/v1/agent-tokens", Some(key), Some(json!({"subnetId": subnet_id}))).await;
        assert_eq!(status, 201, "{token}");
        let token = json_of(&token)["token"].as_str().unwrap().to_string();
        let agent_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::default().serialize_request(&agent_key).unwrap().pem().unwrap();
        let enroll = json!({"joinToken": token, "csrPem": csr, "advertise": "127.0.0.1:7443", "hostname": "node"});
        let (status, enrolled) = self.call(None, "POST", "/v1/agents/enroll", None, Some(enroll)).await;
        assert_eq!(status, 200, "{enrolled}");
        let cert = json_of(&enrolled)["certificatePem"].as_str().unwrap().to_string();
        (cert, agent_key.serialize_pem())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(running) = &self.running {
            running.shutdown();
        }
    }
}

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// Limits small enough for tests; budgets fixed so the machine's open-files limit does not matter.
fn small_limits() -> ListenerLimits {
    ListenerLimits { budgets: Some(Budgets { handshakes: 64, public: 64, agents: 64 }), ..ListenerLimits::default() }
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Everything the server sends until it closes (or resets) the connection, 20 s at most.
async fn read_all<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => {
                panic!("the server neither answered nor closed within 20 s; got {:?}", String::from_utf8_lossy(&out))
            }
        }
    }
}

/// The status and body of the first response in `bytes`.
fn parse(bytes: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// One response of a keep-alive connection (needs `content-length`).
async fn read_response<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> (u16, String) {
    let mut bytes = Vec::new();
    let mut byte = [0u8; 1];
    while !bytes.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.expect("a response head");
        bytes.push(byte[0]);
    }
    let head = String::from_utf8(bytes).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    (head.split(' ').nth(1).unwrap().parse().unwrap(), String::from_utf8(body).unwrap())
}

/// `GET /healthz` from `from` answers 200 within 2 s.
async fn healthz_answers_promptly(server: &Server, from: IpAddr) {
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(2), async {
        let mut tls = server.tls_from(from, None).await.unwrap();
        tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        read_all(&mut tls).await
    })
    .await
    .unwrap_or_else(|_| panic!("/healthz did not answer within 2 s: {:?}", server.stats()));
    assert_eq!(parse(&answer), Some((200, "ok".to_string())), "after {:?}", started.elapsed());
}

#[tokio::test]
async fn a_dripped_body_is_cut_off_at_the_request_deadline_and_others_are_served_meanwhile() {
    let limits = ListenerLimits { request_read_timeout: Duration::from_secs(2), ..small_limits() };
    let server = Server::start(limits).await;
    let key = server.account().await;

    let mut slow = server.tls_from(LOCAL, None).await.unwrap();
    let head = format!(
        "POST /v1/vpcs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{{"
    );
    let first_byte = Instant::now();
    slow.write_all(head.as_bytes()).await.unwrap();
    let (mut slow_read, mut slow_write) = tokio::io::split(slow);
    let drip = tokio::spawn(async move {
        while slow_write.write_all(b" ").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // A client that sends half a request head and stops is cut off by the same deadline.
    let mut half_head = server.tls_from(LOCAL, None).await.unwrap();
    half_head.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").await.unwrap();

    healthz_answers_promptly(&server, LOCAL).await;
    healthz_answers_promptly(&server, OTHER).await;

    let answer = read_all(&mut slow_read).await;
    let elapsed = first_byte.elapsed();
    assert!(elapsed >= Duration::from_millis(1900), "cut off before the deadline: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "not cut off at the deadline: {elapsed:?}");
    let (status, body) = parse(&answer).expect("the handler answers the body error");
    assert_eq!(status, 408, "{body}");
    let body = json_of(&body);
    assert_eq!(body["code"], "RequestTimeout");
    assert!(body["message"].as_str().unwrap().contains("2s of its first byte"), "{body}");
    drip.abort();

    assert!(read_all(&mut half_head).await.is_empty(), "a half head gets no answer, only a close");
    server.until("two request read timeouts", |s| s.request_read_timeouts >= 2).await;
    let (_, vpcs) = server.call(None, "GET", "/v1/vpcs", Some(&key), None).await;
    assert_eq!(json_of(&vpcs)["items"], json!([]), "the cut-off request created nothing");
}

#[tokio::test]
async fn idle_and_silent_connections_close_but_a_long_poll_outlives_every_deadline() {
    let second = Duration::from_secs(1);
    let limits = ListenerLimits {
        request_read_timeout: second,
        idle_timeout: 2 * second,
        response_write_timeout: second,
        ..small_limits()
    };
    let server = Server::start(limits).await;
    let key = server.account().await;
    let agent = server.enroll_agent(&key).await;

    // A keep-alive connection serves requests, then closes once idle for two seconds.
    let mut keep = server.tls_from(LOCAL, None).await.unwrap();
    for _ in 0..2 {
        keep.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        assert_eq!(read_response(&mut keep).await, (200, "ok".to_string()));
    }
    let idle_since = Instant::now();
    assert!(read_all(&mut keep).await.is_empty());
    let idle = idle_since.elapsed();
    assert!(idle >= Duration::from_millis(1900) && idle < Duration::from_secs(5), "closed after {idle:?}");

    // A connection that never sends a byte is closed too.
    let mut silent = server.tls_from(LOCAL, None).await.unwrap();
    assert!(read_all(&mut silent).await.is_empty());
    server.until("two idle closes", |s| s.idle_closed >= 2).await;

    // The config long-poll holds its answer longer than any deadline.
    let (status, config) =
        server.call(Some(&agent), "GET", "/v1/agents/self/config?after=0&waitSeconds=0", None, None).await;
    assert_eq!(status, 200, "{config}");
    let version = json_of(&config)["version"].as_u64().unwrap();
    let started = Instant::now();
    let path = format!("/v1/agents/self/config?after={version}&waitSeconds=3");
    let (status, _) = server.call(Some(&agent), "GET", &path, None, None).await;
    assert_eq!(status, 304);
    assert!(started.elapsed() >= Duration::from_millis(2900), "the poll ended early: {:?}", started.elapsed());
}

#[tokio::test]
async fn one_address_over_its_cap_is_refused_while_other_addresses_are_served() {
    let limits = ListenerLimits { max_connections_per_ip: 8, ..small_limits() };
    let server = Server::start(limits).await;

    // Four TCP connections that never start TLS and four slow requests hold the address's eight.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(server.tcp_from(LOCAL).await.unwrap());
    }
    server.until("four handshakes in progress", |s| s.handshakes == 4).await;
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut tls = server.tls_from(LOCAL, None).await.unwrap();
        tls.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        slow.push(tls);
    }
    server.until("four slow requests admitted", |s| s.public == 4).await;

    // Every further connection from that address is closed at once, before any handshake.
    for _ in 0..20 {
        let started = Instant::now();
        let refused = tokio::time::timeout(Duration::from_secs(2), server.tls_from(LOCAL, None)).await;
        assert!(matches!(refused, Ok(Err(_))), "a connection over the cap was not closed at once");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    assert_eq!(server.stats().refused_per_address, 20);

    healthz_answers_promptly(&server, OTHER).await;
    healthz_answers_promptly(&server, "127.0.0.3".parse().unwrap()).await;

    // Closing the held connections gives the address its connections back.
    drop(held);
    drop(slow);
    server.until("the address's connections closed", |s| s.handshakes == 0 && s.public == 0).await;
    healthz_answers_promptly(&server, LOCAL).await;
}

#[tokio::test]
async fn agents_are_served_when_the_public_budget_is_used_up() {
    let limits = ListenerLimits {
        max_connections_per_ip: 64,
        budgets: Some(Budgets { handshakes: 16, public: 4, agents: 4 }),
        ..ListenerLimits::default()
    };
    let server = Server::start(limits).await;
    let key = server.account().await;
    let agent = server.enroll_agent(&key).await;
    server.until("the set-up's connections closed", |s| s.public == 0).await;

    // Four keep-alive API clients use up the public budget.
    let mut public = Vec::new();
    for _ in 0..4 {
        let mut tls = server.tls_from(OTHER, None).await.unwrap();
        tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        assert_eq!(read_response(&mut tls).await.0, 200);
        public.push(tls);
    }
    assert_eq!(server.stats().public, 4);

    // The next anonymous client is closed right after its handshake.
    let mut refused = server.tls_from(LOCAL, None).await.unwrap();
    let _ = refused.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
    assert_eq!(parse(&read_all(&mut refused).await), None, "an anonymous client over the budget was served");
    assert_eq!(server.stats().refused_public, 1);

    // Agents from the same addresses keep fetching configs and reporting.
    let (status, config) =
        server.call(Some(&agent), "GET", "/v1/agents/self/config?after=0&waitSeconds=0", None, None).await;
    assert_eq!(status, 200, "{config}");
    let report = json!({"configVersion": json_of(&config)["version"], "bootId": "b1", "listeners": [], "usage": []});
    let (status, body) = server.call(Some(&agent), "POST", "/v1/agents/self/report", None, Some(report)).await;
    assert!((200..300).contains(&status), "{status} {body}");

    // A freed public slot serves anonymous clients again.
    drop(public.pop());
    server.until("a public slot freed", |s| s.public == 3).await;
    assert_eq!(server.call(None, "GET", "/healthz", None, None).await, (200, "ok".to_string()));
}

#[tokio::test]
async fn an_oversized_body_is_a_413_with_the_json_error_and_creates_nothing() {
    let server = Server::start(small_limits()).await;
    let key = server.account().await;
    let big = json!({"name": "x".repeat(1024 * 1024)}).to_string();

    // Declared too large: answered from the headers alone.
    let mut tls = server.tls_from(LOCAL, None).await.unwrap();
    let head = format!(
        "POST /v1/vpcs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        big.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let (status, body) = parse(&read_all(&mut tls).await).expect("an answer");
    assert_eq!(status, 413, "{body}");
    let body = json_of(&body);
    assert_eq!(body["code"], "PayloadTooLarge");
    assert!(body["message"].as_str().unwrap().contains("1048576 bytes"), "{body}");

    // Chunked, so only reading it finds it too large.
    let mut tls = server.tls_from(LOCAL, None).await.unwrap();
    let head = format!(
        "POST /v1/vpcs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let (mut read, mut write) = tokio::io::split(tls);
    let send = tokio::spawn(async move {
        for chunk in big.as_bytes().chunks(64 * 1024) {
            let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
            if write.write_all(&framed).await.is_err() {
                return;
            }
        }
        let _ = write.write_all(b"0\r\n\r\n").await;
    });
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), read_response(&mut read)).await.unwrap();
    assert_eq!(status, 413, "{body}");
    assert_eq!(json_of(&body)["code"], "PayloadTooLarge");
    send.abort();

    let (_, vpcs) = server.call(None, "GET", "/v1/vpcs", Some(&key), None).await;
    assert_eq!(json_of(&vpcs)["items"], json!([]), "nothing was created");
}

#[tokio::test]
async fn anonymous_bodies_in_flight_are_capped() {
    let limits = ListenerLimits { max_body_bytes: 1000, max_public_body_bytes_in_flight: 2000, ..small_limits() };
    let server = Server::start(limits).await;
    let key = server.account().await;
    let post = |length: usize| {
        format!(
            "POST /v1/vpcs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n"
        )
    };
    // Two slow bodies of 1000 bytes hold the whole 2000.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut tls = server.tls_from(LOCAL, None).await.unwrap();
        tls.write_all(post(1000).as_bytes()).await.unwrap();
        slow.push(tls);
    }
    server.until("two slow requests admitted", |s| s.public == 2).await;
    let started = Instant::now();
    let body = json!({"name": "prod"}).to_string();
    let answer = loop {
        let mut tls = server.tls_from(OTHER, None).await.unwrap();
        tls.write_all(format!("{}{body}", post(body.len())).as_bytes()).await.unwrap();
        let answer = String::from_utf8_lossy(&read_all(&mut tls).await).to_string();
        // The slow requests' headers may still be on their way.
        if answer.starts_with("HTTP/1.1 503") || started.elapsed() > Duration::from_secs(5) {
            break answer;
        }
    };
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 5"), "{answer}");
    let (_, body) = parse(answer.as_bytes()).unwrap();
    assert_eq!(json_of(&body)["code"], "ServerBusy");
    assert!(server.stats().refused_bodies >= 1);

    drop(slow);
    server.until("the slow requests closed", |s| s.public == 0).await;
    let (status, created) = server.call(None, "POST", "/v1/vpcs", Some(&key), Some(json!({"name": "prod"}))).await;
    assert_eq!(status, 201, "{created}");
}

#[tokio::test]
async fn a_client_that_never_reads_its_answers_is_cut_off() {
    let limits = ListenerLimits { response_write_timeout: Duration::from_secs(1), ..small_limits() };
    let server = Server::start(limits).await;
    let mut tls = server.tls_from(LOCAL, None).await.unwrap();
    // Far more pipelined answers than the socket buffers hold, never read.
    const REQUESTS: usize = 2000;
    let requests = "GET /v1/openapi.json HTTP/1.1\r\nhost: x\r\n\r\n".repeat(REQUESTS);
    let (mut read, mut write) = tokio::io::split(&mut tls);
    let _ = tokio::time::timeout(Duration::from_secs(5), write.write_all(requests.as_bytes())).await;
    server.until("a response write timeout", |s| s.response_write_timeouts == 1).await;
    let answers = read_all(&mut read).await;
    let count = String::from_utf8_lossy(&answers).matches("HTTP/1.1 200").count();
    assert!(count < REQUESTS, "all {count} answers were delivered");
    server.until("the connection closed", |s| s.public == 0).await;
}
