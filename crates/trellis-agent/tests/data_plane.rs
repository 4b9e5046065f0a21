//! The data plane end to end on loopback, without a control plane: a gateway
//! agent and an endpoint agent (certificates from a throw-away CA, configs
//! built here and changed through their watch channels) in front of a TCP
//! echo target.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use trellis_agent::testing::{self, LogBuf, TestCa, data_frame, echo_server, eventually, unique_loopback};
use trellis_agent::{AccessLog, AgentIdentity, DataPlaneOptions, RunningAgent, start_data_plane, tls};
use trellis_proto::mux;
use trellis_proto::stream::{OpenRequest, OpenResponse, OpenStatus, decode_open_response, encode_open_request};
use trellis_proto::{
    AgentConfig, AllowedEndpoint, ConsumerVpc, EndpointConfig, EndpointResource, GatewayResource, GatewayRole,
    GatewayTarget, PortRange, Target, agent_server_name,
};

const GW: &str = "agent-0000000000000000a";
const EP: &str = "agent-0000000000000000b";
const VPCE: &str = "vpce-00000000000000001";
const RCFG: &str = "rcfg-00000000000000001";
const CONSUMER_ACCT: &str = "acct-000000000002";
const CONSUMER_VPC: &str = "vpc-00000000000000002";

fn gateway_config(peer: &AgentIdentity, target: SocketAddr, allowed_endpoint: &str) -> AgentConfig {
    AgentConfig {
        version: 1,
        agent_id: GW.into(),
        zone: "z1".into(),
        gateway: GatewayRole {
            consumers: vec![ConsumerVpc { account_id: peer.account_id.clone(), vpc_id: peer.vpc_id.clone() }],
            resources: vec![GatewayResource {
                resource_configuration_id: RCFG.into(),
                resource_gateway_id: "rgw-00000000000000001".into(),
                owner_account_id: "acct-000000000001".into(),
                target: Target::Ip { address: target.ip() },
                port_ranges: vec![PortRange::single(target.port()).unwrap()],
                allowed: vec![AllowedEndpoint { vpc_endpoint_id: allowed_endpoint.into(), consumer: 0 }],
                proxy_protocol: false,
                limits: None,
            }],
            ..Default::default()
        },
        ..Default::default()
    }
}

fn endpoint_config(address: IpAddr, port: u16, gateway: SocketAddr, gateway_id: &str) -> AgentConfig {
    AgentConfig {
        version: 1,
        agent_id: EP.into(),
        account_id: CONSUMER_ACCT.into(),
        vpc_id: CONSUMER_VPC.into(),
        zone: "z1".into(),
        region: "local".into(),
        address_pool: "127.77.0.0/16".into(),
        endpoints: vec![EndpointConfig {
            vpc_endpoint_id: VPCE.into(),
            resources: vec![EndpointResource {
                resource_configuration_id: RCFG.into(),
                address,
                port_ranges: vec![PortRange::single(port).unwrap()],
                dns_names: vec![format!("{VPCE}.{RCFG}.local.trellis.internal")],
                dns_records: vec![],
                gateways: vec![GatewayTarget {
                    agent_id: gateway_id.into(),
                    address: gateway.to_string(),
                    zone: "z1".into(),
                    server_name: agent_server_name(gateway_id),
                    relays: vec![],
                }],
            }],
        }],
        ..Default::default()
    }
}

struct Setup {
    ca: TestCa,
    gateway: RunningAgent,
    gateway_config: watch::Sender<Arc<AgentConfig>>,
    gateway_log: LogBuf,
    endpoint: RunningAgent,
    endpoint_config: watch::Sender<Arc<AgentConfig>>,
    endpoint_identity: AgentIdentity,
    endpoint_log: LogBuf,
    /// Where clients connect: the endpoint address and the resource's port.
    client_target: SocketAddr,
}

async fn setup(allowed_endpoint: &str) -> Setup {
    setup_with(allowed_endpoint, |o| o).await
}

/// [`setup`] with the gateway's options adjusted by `gateway_opts`.
async fn setup_with(allowed_endpoint: &str, gateway_opts: impl FnOnce(DataPlaneOptions) -> DataPlaneOptions) -> Setup {
    setup_both(allowed_endpoint, gateway_opts, |o| o).await
}

/// [`setup`] with the options of both agents adjusted.
async fn setup_both(
    allowed_endpoint: &str,
    gateway_opts: impl FnOnce(DataPlaneOptions) -> DataPlaneOptions,
    endpoint_opts: impl FnOnce(DataPlaneOptions) -> DataPlaneOptions,
) -> Setup {
    let ca = TestCa::new();
    let gw_id = ca.issue(GW, "acct-000000000001", "vpc-00000000000000001");
    let ep_id = ca.issue(EP, CONSUMER_ACCT, CONSUMER_VPC);
    let echo = echo_server().await;

    let gateway_log = LogBuf::default();
    let (gateway_config, rx) = watch::channel(Arc::new(gateway_config(&ep_id, echo, allowed_endpoint)));
    let opts = gateway_opts(DataPlaneOptions {
        access_log: AccessLog::to_writer(Box::new(gateway_log.clone())),
        ..DataPlaneOptions::loopback()
    });
    let gateway = start_data_plane(opts, &gw_id, rx).await.unwrap();

    let address = unique_loopback(77);
    let (endpoint_config, rx) =
        watch::channel(Arc::new(endpoint_config(address, echo.port(), gateway.tunnel_addr().unwrap(), GW)));
    // Endpoint-only: no tunnel listener at all.
    let endpoint_log = LogBuf::default();
    let endpoint_opts = endpoint_opts(DataPlaneOptions {
        tunnel_listen: None,
        access_log: AccessLog::to_writer(Box::new(endpoint_log.clone())),
        ..DataPlaneOptions::loopback()
    });
    let endpoint = start_data_plane(endpoint_opts, &ep_id, rx).await.unwrap();
    assert_eq!(endpoint.tunnel_addr(), None);
    let served = endpoint.served();
    eventually("the endpoint listener", Duration::from_secs(5), || served.borrow().listeners.iter().any(|l| l.ready))
        .await;
    Setup {
        ca,
        gateway,
        gateway_config,
        gateway_log,
        endpoint,
        endpoint_config,
        endpoint_identity: ep_id,
        endpoint_log,
        client_target: SocketAddr::new(address, echo.port()),
    }
}

async fn stop(s: Setup) {
    s.endpoint.shutdown().await;
    s.gateway.shutdown().await;
}

/// Reads until EOF or error; returns what arrived.
async fn read_all(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let _ =
        tokio::time::timeout(within, stream.read_to_end(&mut got)).await.expect("the connection did not end in time");
    got
}

/// Sends `payload` on a new client connection, half-closes (the echo target
/// sees EOF only through the tunnel, then finishes its side), and returns
/// the echo read to its end.
async fn echo_once(s: &Setup, payload: &[u8]) -> Vec<u8> {
    let mut client = TcpStream::connect(s.client_target).await.unwrap();
    let (mut r, mut w) = client.split();
    let send = async {
        w.write_all(payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let recv = async { tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut got)).await.unwrap().unwrap() };
    tokio::join!(send, recv);
    got
}

#[tokio::test]
async fn bytes_flow_both_ways_and_half_close_works() {
    let s = setup(VPCE).await;
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let got = echo_once(&s, &payload).await;
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "echoed bytes differ");

    // Usage, metrics and the access log account for the connection once it ends.
    let usage_done = || {
        s.gateway.usage().iter().any(|u| {
            u.vpc_endpoint_id == VPCE
                && u.consumer_account_id == CONSUMER_ACCT
                && u.total_connections == 1
                && u.active_connections == 0
                && u.bytes_in == payload.len() as u64
                && u.bytes_out == payload.len() as u64
        })
    };
    eventually("gateway usage counters", Duration::from_secs(5), usage_done).await;
    let text = s.gateway.metrics_text();
    assert!(text.contains("trellis_bytes_in_total{role=\"gateway\""), "{text}");
    eventually("the access log line", Duration::from_secs(5), || !s.gateway_log.lines().is_empty()).await;
    let line = &s.gateway_log.lines()[0];
    assert_eq!(line["outcome"], "closed");
    assert_eq!(line["vpcEndpointId"], VPCE);
    assert_eq!(line["bytesIn"], payload.len() as u64);
    stop(s).await;
}

#[tokio::test]
async fn a_client_that_never_reads_stalls_only_its_own_connection() {
    let s = setup(VPCE).await;
    // The echo target answers everything this client sends, and the client
    // reads none of it: every hop must push back until the client's writes
    // stop (nothing on the way buffers without bound).
    let mut stalled = TcpStream::connect(s.client_target).await.unwrap();
    let chunk = vec![5u8; 1024 * 1024];
    let mut sent = 0usize;
    let pushed_back = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            stalled.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
    })
    .await
    .is_err();
    assert!(pushed_back && sent < 128 * 1024 * 1024, "the stalled client wrote {sent} bytes without being held back");

    // Another connection over the same agents (and tunnel) moves meanwhile.
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    assert!(echo_once(&s, &payload).await == payload, "the other connection's echo arrives whole");
    drop(stalled);
    stop(s).await;
}

#[tokio::test]
async fn a_client_that_resets_mid_transfer_ends_its_flow_on_both_agents_as_an_error() {
    let s = setup(VPCE).await;
    let mut client = TcpStream::connect(s.client_target).await.unwrap();
    client.write_all(&vec![7u8; 4 * 1024 * 1024]).await.unwrap();
    let mut some = vec![0u8; 64 * 1024];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut some)).await.unwrap().unwrap();
    // Reset with the echo still flowing toward the client.
    socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).unwrap();
    drop(client);
    eventually("the endpoint's access-log line", Duration::from_secs(5), || !s.endpoint_log.lines().is_empty()).await;
    let line = &s.endpoint_log.lines()[0];
    assert_eq!(line["outcome"], "error", "{line}");
    assert!(line["message"].as_str().unwrap_or("").contains("local connection"), "{line}");
    eventually("the gateway's access-log line", Duration::from_secs(5), || !s.gateway_log.lines().is_empty()).await;
    let line = &s.gateway_log.lines()[0];
    assert_eq!(line["outcome"], "error", "the gateway saw the flow reset: {line}");
    // The agents and their tunnel carry on.
    let mut next = TcpStream::connect(s.client_target).await.unwrap();
    next.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(10), next.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(&back, b"still here");
    stop(s).await;
}

/// Threads of this process whose name starts with `prefix`.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

#[tokio::test]
async fn agents_with_two_data_plane_threads_serve_every_connection_and_stop_their_threads() {
    let two = |o| DataPlaneOptions { data_plane_threads: 2, ..o };
    let s = setup_both(VPCE, two, two).await;
    assert_eq!(threads_named("trellis-dp-"), 4, "two threads per agent");
    // Concurrent clients land on both endpoint threads (SO_REUSEPORT), each
    // opening its flow on a tunnel connection of its own thread where it can.
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 239) as u8).collect();
    let clients = (0..48).map(|_| echo_once(&s, &payload));
    for got in futures_util::future::join_all(clients).await {
        assert!(got == payload, "an echo differs ({} bytes of {})", got.len(), payload.len());
    }
    eventually("48 access-log lines on each agent", Duration::from_secs(5), || {
        s.gateway_log.lines().len() == 48 && s.endpoint_log.lines().len() == 48
    })
    .await;
    assert!(s.gateway_log.lines().iter().all(|l| l["outcome"] == "closed"), "{:?}", s.gateway_log.lines());
    // The endpoint's tunnel connections are spread over the gateway's threads, whichever
    // thread the kernel handed each to (one of them moved when both landed on one).
    let text = s.gateway.metrics_text();
    let on = |thread: u32| -> i64 {
        let series = format!("trellis_tunnel_connections{{thread=\"{thread}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&series)?.parse().ok()).unwrap_or(0)
    };
    assert!(on(0) >= 1 && on(1) >= 1 && (on(0) - on(1)).abs() <= 1, "tunnel connections per gateway thread: {text}");
    stop(s).await;
    assert_eq!(threads_named("trellis-dp-"), 0, "shutdown ends the data-plane threads");
}

#[tokio::test]
async fn an_agent_that_fails_to_start_leaves_no_data_plane_thread_behind() {
    let ca = TestCa::new();
    let identity = ca.issue(GW, "acct-000000000001", "vpc-00000000000000001");
    // The metrics address is taken: start fails after the threads started.
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (_config, rx) = watch::channel(Arc::new(AgentConfig::default()));
    let opts = DataPlaneOptions {
        metrics_listen: Some(taken.local_addr().unwrap()),
        data_plane_threads: 2,
        ..DataPlaneOptions::loopback()
    };
    let err = start_data_plane(opts, &identity, rx).await.err().expect("the metrics address is in use");
    assert!(err.to_string().contains("metrics"), "{err}");
    eventually("the data-plane threads to end", Duration::from_secs(5), || threads_named("trellis-dp-") == 0).await;
}

#[tokio::test]
async fn denied_endpoint_id_is_refused() {
    let s = setup("vpce-0000000000000000f").await;
    let mut client = TcpStream::connect(s.client_target).await.unwrap();
    let _ = client.write_all(b"hello").await;
    let got = read_all(&mut client, Duration::from_secs(10)).await;
    assert!(got.is_empty(), "a denied client received {got:?}");
    eventually("the denial in the access log", Duration::from_secs(5), || {
        s.gateway_log.lines().iter().any(|l| l["outcome"] == "denied")
    })
    .await;
    assert!(s.gateway.metrics_text().contains("trellis_rejected_connections_total{role=\"gateway\""));
    stop(s).await;
}

#[tokio::test]
async fn removing_the_resource_closes_an_open_connection_within_a_second() {
    let s = setup(VPCE).await;
    let mut client = TcpStream::connect(s.client_target).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"ping");

    let revoked_at = Instant::now();
    s.gateway_config.send_modify(|c| {
        let c = Arc::make_mut(c);
        c.version += 1;
        c.gateway.resources.clear();
    });
    let got = read_all(&mut client, Duration::from_secs(5)).await;
    assert!(got.is_empty());
    assert!(revoked_at.elapsed() < Duration::from_secs(1), "closed after {:?}", revoked_at.elapsed());
    eventually("the revocation in the access log", Duration::from_secs(5), || {
        s.gateway_log.lines().iter().any(|l| l["outcome"] == "revoked")
    })
    .await;
    stop(s).await;
}

/// A TLS connection to the gateway with the endpoint agent's identity.
async fn raw_tunnel(identity: &AgentIdentity, gateway: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(tls::tunnel_client_config(identity).unwrap());
    let tcp = TcpStream::connect(gateway).await.unwrap();
    connector.connect(ServerName::try_from(agent_server_name(GW)).unwrap(), tcp).await.unwrap()
}

fn request(port: u16) -> OpenRequest {
    testing::open_request(VPCE, RCFG, port)
}

fn open_frame(flow: u32, port: u16) -> Vec<u8> {
    testing::open_frame(flow, &request(port))
}

fn fin_frame(flow: u32) -> Vec<u8> {
    let mut out = Vec::new();
    mux::encode_fin(flow, &mut out);
    out
}

/// What a peer sent on one flow, read frame by frame from a raw tunnel connection.
#[derive(Debug, Default)]
struct FlowSeen {
    response: Option<OpenResponse>,
    data: Vec<u8>,
    fin: bool,
    reset: bool,
    /// The connection closed (or failed) before the flow ended.
    closed: bool,
}

/// Reads frames from a raw version-2 tunnel (the peer's preface first, once)
/// until `flow` is answered and `until` holds for what it got, the flow
/// ends, or the connection closes. Frames of other flows are kept for later.
struct RawReader {
    buf: Vec<u8>,
    preface_seen: bool,
    frames: Vec<(mux::Header, Vec<u8>)>,
}

impl RawReader {
    fn new() -> Self {
        Self { buf: Vec::new(), preface_seen: false, frames: Vec::new() }
    }

    /// For a connection whose preface was already read.
    fn after_preface() -> Self {
        Self { preface_seen: true, ..Self::new() }
    }

    async fn read_flow<S: tokio::io::AsyncRead + Unpin>(
        &mut self,
        io: &mut S,
        flow: u32,
        until: impl Fn(&FlowSeen) -> bool,
    ) -> Result<FlowSeen, std::io::Error> {
        let mut seen = FlowSeen::default();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if !self.preface_seen && self.buf.len() >= mux::PREFACE.len() {
                assert_eq!(&self.buf[..5], &mux::PREFACE, "the peer's preface");
                self.buf.drain(..5);
                self.preface_seen = true;
            }
            while self.preface_seen
                && let Some(h) = mux::decode_header(&self.buf)
                && self.buf.len() >= mux::FRAME_HEADER_LEN + h.len as usize
            {
                let body: Vec<u8> = self.buf.drain(..mux::FRAME_HEADER_LEN + h.len as usize).skip(9).collect();
                self.frames.push((h, body));
            }
            let (mine, others): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.frames).into_iter().partition(|(h, _)| h.flow == flow);
            self.frames = others;
            for (h, body) in mine {
                match h.kind {
                    mux::DATA => seen.data.extend_from_slice(&body),
                    mux::OPEN_RESPONSE => {
                        let mux::Control::OpenResponse(r) = mux::parse_control(h.kind, &body).unwrap() else {
                            unreachable!()
                        };
                        seen.response = Some(r);
                    }
                    mux::FIN => seen.fin = true,
                    mux::RESET => seen.reset = true,
                    _ => {}
                }
            }
            if seen.reset || seen.fin || (seen.response.is_some() && until(&seen)) {
                return Ok(seen);
            }
            let mut chunk = [0u8; 4096];
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, io.read(&mut chunk)).await {
                Err(_) => panic!("flow {flow}: nothing conclusive within 10 s: {seen:?}"),
                Ok(Ok(0)) => {
                    seen.closed = true;
                    return Ok(seen);
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) if seen.response.is_none() && seen.data.is_empty() => return Err(e),
                Ok(Err(_)) => {
                    seen.closed = true;
                    return Ok(seen);
                }
            }
        }
    }
}

#[tokio::test]
async fn a_malformed_or_oversized_frame_resets_only_its_flow() {
    let s = setup(VPCE).await;
    let port = s.client_target.port();
    let mut conn = raw_tunnel(&s.endpoint_identity, s.gateway.tunnel_addr().unwrap()).await;
    let mut reader = RawReader::new();
    // Flow 1 opens and stays open while its neighbours misbehave.
    let mut first = mux::PREFACE.to_vec();
    first.extend(open_frame(1, port));
    first.extend(data_frame(1, b"one"));
    conn.write_all(&first).await.unwrap();
    let one = reader.read_flow(&mut conn, 1, |f| f.data.ends_with(b"one")).await.unwrap();
    assert_eq!(one.response.as_ref().map(|r| r.status), Some(OpenStatus::Ok));

    // Flow 3: an OPEN whose body is garbage.
    let mut bad = Vec::new();
    mux::encode_header(mux::OPEN, 3, 3, &mut bad);
    bad.extend_from_slice(b"abc");
    conn.write_all(&bad).await.unwrap();
    let three = reader.read_flow(&mut conn, 3, |_| false).await.unwrap();
    assert_eq!(three.response.as_ref().map(|r| r.status), Some(OpenStatus::BadRequest));
    assert!(three.reset, "{three:?}");

    // Flow 5: opened, then a DATA frame larger than the protocol allows.
    conn.write_all(&open_frame(5, port)).await.unwrap();
    let mut huge = Vec::new();
    mux::encode_header(mux::DATA, 5, 1, &mut huge);
    huge[5..9].copy_from_slice(&((mux::MAX_DATA_LEN + 1) as u32).to_be_bytes());
    huge.extend(vec![b'x'; mux::MAX_DATA_LEN + 1]);
    conn.write_all(&huge).await.unwrap();
    let five = reader.read_flow(&mut conn, 5, |_| false).await.unwrap();
    assert!(five.reset, "an oversized frame did not reset its flow: {five:?}");

    // Flow 1 still echoes, half-closes cleanly, and a new flow opens on the same connection.
    conn.write_all(&data_frame(1, b" more")).await.unwrap();
    conn.write_all(&fin_frame(1)).await.unwrap();
    let one = reader.read_flow(&mut conn, 1, |_| false).await.unwrap();
    assert_eq!(one.data, b" more");
    assert!(one.fin && !one.reset, "{one:?}");
    let mut seven = open_frame(7, port);
    seven.extend(data_frame(7, b"right behind the request"));
    conn.write_all(&seven).await.unwrap();
    let seven = reader.read_flow(&mut conn, 7, |f| f.data.ends_with(b"request")).await.unwrap();
    assert_eq!(seven.response.map(|r| r.status), Some(OpenStatus::Ok));
    assert_eq!(seven.data, b"right behind the request");

    let mut client = TcpStream::connect(s.client_target).await.unwrap();
    client.write_all(b"still works").await.unwrap();
    let mut buf = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"still works");
    stop(s).await;
}

#[tokio::test]
async fn an_endpoint_agent_of_the_previous_version_is_told_to_upgrade() {
    let s = setup(VPCE).await;
    let mut old = raw_tunnel(&s.endpoint_identity, s.gateway.tunnel_addr().unwrap()).await;
    let mut v1 = Vec::new();
    encode_open_request(&request(s.client_target.port()), &mut v1).unwrap();
    old.write_all(&v1).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), old.read_to_end(&mut answer)).await.unwrap();
    // A version-1 frame, which the old agent decodes: a refusal that says what to do.
    let (resp, used) = decode_open_response(&answer).unwrap().unwrap();
    assert_eq!(resp.status, OpenStatus::BadRequest);
    assert!(resp.message.contains("upgrade the endpoint agent"), "{resp:?}");
    assert_eq!(used, answer.len());
    stop(s).await;
}

#[tokio::test]
async fn a_gateway_can_never_open_toward_the_endpoint() {
    // A "gateway" with a valid certificate that answers an open request with one of its own.
    let ca = TestCa::new();
    let rogue_id = ca.issue(GW, "acct-000000000001", "vpc-00000000000000001");
    let ep_id = ca.issue(EP, CONSUMER_ACCT, CONSUMER_VPC);
    let acceptor =
        tokio_rustls::TlsAcceptor::from(tls::tunnel_server_config(&rogue_id, Arc::new(tls::AnyAgent)).unwrap());
    let rogue = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rogue_addr = rogue.local_addr().unwrap();
    let saw_request = Arc::new(AtomicU8::new(0));
    let saw = saw_request.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = rogue.accept().await {
            let acceptor = acceptor.clone();
            let saw = saw.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buf = [0u8; 512];
                if matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {
                    saw.fetch_add(1, Ordering::Relaxed);
                    // Speaks version 2, and opens a flow of its own toward the consumer.
                    let mut frames = mux::PREFACE.to_vec();
                    mux::encode_open(
                        2,
                        &OpenRequest {
                            vpc_endpoint_id: VPCE.into(),
                            resource_configuration_id: RCFG.into(),
                            port: 22,
                            client_addr: "10.9.9.9:1".parse().unwrap(),
                        },
                        &mut frames,
                    )
                    .unwrap();
                    frames.extend(data_frame(2, b"EVIL"));
                    let _ = tls.write_all(&frames).await;
                    let _ = tls.flush().await;
                    // The endpoint agent answers with a reset of that flow (its preface was read above).
                    let mut reader = RawReader::after_preface();
                    if let Ok(seen) = reader.read_flow(&mut tls, 2, |_| false).await
                        && seen.reset
                    {
                        saw.fetch_add(100, Ordering::Relaxed);
                    }
                }
            });
        }
    });

    let address = unique_loopback(77);
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let (_tx, rx) = watch::channel(Arc::new(endpoint_config(address, port, rogue_addr, GW)));
    let endpoint = start_data_plane(DataPlaneOptions::loopback(), &ep_id, rx).await.unwrap();
    let served = endpoint.served();
    eventually("the endpoint listener", Duration::from_secs(5), || served.borrow().listeners.iter().any(|l| l.ready))
        .await;
    let mut client = TcpStream::connect(SocketAddr::new(address, port)).await.unwrap();
    let _ = client.write_all(b"hello").await;
    let got = read_all(&mut client, Duration::from_secs(10)).await;
    assert!(saw_request.load(Ordering::Relaxed) >= 1, "the endpoint never sent its open request");
    eventually("the endpoint's reset of the gateway's flow", Duration::from_secs(5), || {
        saw_request.load(Ordering::Relaxed) >= 101
    })
    .await;
    assert!(got.is_empty(), "bytes from a gateway-opened stream reached the client: {got:?}");
    assert!(endpoint.metrics_text().contains("trellis_rejected_connections_total{role=\"endpoint\""));
    endpoint.shutdown().await;
}

#[tokio::test]
async fn listener_removed_from_config_is_closed_with_its_connections() {
    let s = setup(VPCE).await;
    let mut client = TcpStream::connect(s.client_target).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut buf)).await.unwrap().unwrap();

    s.endpoint_config.send_modify(|c| {
        let c = Arc::make_mut(c);
        c.version += 1;
        c.endpoints.clear();
    });
    let got = read_all(&mut client, Duration::from_secs(5)).await;
    assert!(got.is_empty());
    let served = s.endpoint.served();
    eventually("the listener to be gone", Duration::from_secs(5), || served.borrow().config_version == 2).await;
    eventually("connects to be refused", Duration::from_secs(5), || {
        std::net::TcpStream::connect_timeout(&s.client_target, Duration::from_millis(200)).is_err()
    })
    .await;
    stop(s).await;
}

#[tokio::test]
async fn endpoint_fails_over_to_a_gateway_in_another_zone() {
    let s = setup(VPCE).await;
    // Put a dead gateway in the agent's own zone first; the live one moves to another zone.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    s.endpoint_config.send_modify(|c| {
        let c = Arc::make_mut(c);
        c.version += 1;
        let gateways = &mut c.endpoints[0].resources[0].gateways;
        gateways[0].zone = "z2".into();
        gateways.push(GatewayTarget {
            agent_id: "agent-0000000000000000d".into(),
            address: dead.to_string(),
            zone: "z1".into(),
            server_name: agent_server_name("agent-0000000000000000d"),
            relays: vec![],
        });
    });
    let served = s.endpoint.served();
    eventually("the new config", Duration::from_secs(5), || served.borrow().config_version == 2).await;
    let mut client = TcpStream::connect(s.client_target).await.unwrap();
    client.write_all(b"failover").await.unwrap();
    let mut buf = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"failover");
    stop(s).await;
}

fn dns_query(id: u16, name: &str) -> Vec<u8> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    msg.to_vec().unwrap()
}

#[tokio::test]
async fn dns_answers_configured_names_forwards_others_and_survives_garbage() {
    use hickory_proto::op::{Message, ResponseCode};
    use hickory_proto::rr::RData;

    // A fake upstream that answers every query with REFUSED, so forwarding is observable.
    let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = upstream.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
            let mut r = Message::error_msg(q.metadata.id, q.metadata.op_code, ResponseCode::Refused);
            r.add_queries(q.queries);
            let _ = upstream.send_to(&r.to_vec().unwrap(), from).await;
        }
    });

    let ca = TestCa::new();
    let id = ca.issue(EP, CONSUMER_ACCT, CONSUMER_VPC);
    let address = unique_loopback(77);
    let config = endpoint_config(address, 5432, "127.0.0.1:9".parse().unwrap(), GW);
    let (_tx, rx) = watch::channel(Arc::new(config));
    let opts = DataPlaneOptions {
        dns_listen: Some("127.0.0.1:0".parse().unwrap()),
        dns_upstream: Some(upstream_addr),
        ..DataPlaneOptions::loopback()
    };
    let agent = start_data_plane(opts, &id, rx).await.unwrap();
    let dns = agent.dns_addr().unwrap();

    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(dns).await.unwrap();
    for garbage in
        [&b""[..], b"\x00", &[0xffu8; 12], &[0x41u8; 600], b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff"]
    {
        sock.send(garbage).await.unwrap();
    }
    let ask = |id: u16, name: &'static str| {
        let sock = &sock;
        async move {
            sock.send(&dns_query(id, name)).await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf)).await.unwrap().unwrap();
                let m = Message::from_vec(&buf[..n]).unwrap();
                if m.metadata.id == id {
                    return m;
                }
            }
        }
    };
    let name = "vpce-00000000000000001.rcfg-00000000000000001.local.trellis.internal.";
    let answer = ask(7, name).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    let IpAddr::V4(v4) = address else { unreachable!() };
    assert_eq!(&answer.answers[0].data, &RData::A(hickory_proto::rr::rdata::A(v4)));
    let forwarded = ask(8, "example.org.").await;
    assert_eq!(forwarded.metadata.response_code, ResponseCode::Refused, "not answered by the fake upstream");

    // TCP on the same port.
    let mut tcp = TcpStream::connect(dns).await.unwrap();
    let q = dns_query(9, name);
    tcp.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
    tcp.write_all(&q).await.unwrap();
    let len = tcp.read_u16().await.unwrap();
    let mut buf = vec![0u8; usize::from(len)];
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(Message::from_vec(&buf).unwrap().answers.len(), 1);
    agent.shutdown().await;
}

#[tokio::test]
async fn metrics_listener_serves_prometheus_text() {
    let ca = TestCa::new();
    let id = ca.issue(GW, "acct-000000000001", "vpc-00000000000000001");
    let (_tx, rx) = watch::channel(Arc::new(AgentConfig::default()));
    let opts =
        DataPlaneOptions { metrics_listen: Some("127.0.0.1:0".parse().unwrap()), ..DataPlaneOptions::loopback() };
    let agent = start_data_plane(opts, &id, rx).await.unwrap();
    let mut s = TcpStream::connect(agent.metrics_addr().unwrap()).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut resp = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut resp)).await.unwrap().unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("application/openmetrics-text"), "{resp}");
    assert!(resp.trim_end().ends_with("# EOF"), "{resp}");
    agent.shutdown().await;
}

// ---- Hardening: who gets in, for how long, and how many ----

/// The first bytes of a tunnel connection that opens flow 1.
fn open_request_frame(port: u16) -> Vec<u8> {
    let mut out = mux::PREFACE.to_vec();
    out.extend(open_frame(1, port));
    out
}

/// Connects with `connector`'s identity, opens flow 1 and half-closes it, and
/// reads until the flow ends or the gateway closes: `Ok(the answer, if any)`
/// or the error that ended the read.
async fn try_open(
    connector: &tokio_rustls::TlsConnector,
    gateway: SocketAddr,
    port: u16,
) -> Result<Option<OpenResponse>, std::io::Error> {
    let tcp = TcpStream::connect(gateway).await?;
    let mut tls = connector.connect(ServerName::try_from(agent_server_name(GW)).unwrap(), tcp).await?;
    let mut first = open_request_frame(port);
    // Half-close the flow, so an allowed one ends once the echo target has seen EOF.
    first.extend(fin_frame(1));
    tls.write_all(&first).await?;
    let seen = RawReader::new().read_flow(&mut tls, 1, |_| false).await?;
    // Close the connection and wait until the gateway has too, so it holds nothing of ours after.
    let _ = tls.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut Vec::new())).await;
    Ok(seen.response)
}

fn connector_for(identity: &AgentIdentity) -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(tls::tunnel_client_config(identity).unwrap())
}

#[tokio::test]
async fn certificates_of_strangers_and_deleted_agents_fail_at_the_handshake() {
    let s = setup(VPCE).await;
    let gateway = s.gateway.tunnel_addr().unwrap();
    let port = s.client_target.port();
    // Signed by the same CA, but of a VPC (or account) with no endpoint on this gateway.
    for (agent, account, vpc) in [
        ("agent-0000000000000000c", CONSUMER_ACCT, "vpc-00000000000000009"),
        ("agent-0000000000000000d", "acct-000000000009", CONSUMER_VPC),
    ] {
        let stranger = s.ca.issue(agent, account, vpc);
        let r = try_open(&connector_for(&stranger), gateway, port).await;
        assert!(r.is_err(), "a stranger {account}/{vpc} got past the handshake: {r:?}");
    }
    // A deleted agent of the consumer VPC: its certificate is listed as revoked.
    let deleted = s.ca.issue("agent-0000000000000000e", CONSUMER_ACCT, CONSUMER_VPC);
    assert!(
        try_open(&connector_for(&deleted), gateway, port)
            .await
            .is_ok_and(|r| r.is_some_and(|r| r.status == OpenStatus::Ok)),
        "before revocation"
    );
    s.gateway_config.send_modify(|c| {
        let c = Arc::make_mut(c);
        c.version += 1;
        c.gateway.revoked_certs = [deleted.cert_sha256()].into();
    });
    let err = try_open(&connector_for(&deleted), gateway, port).await.unwrap_err();
    assert!(err.to_string().to_lowercase().contains("revoked"), "{err}");
    let metrics = s.gateway.metrics_text();
    assert!(metrics.contains("trellis_tunnel_refusals_total{reason=\"not_a_consumer\"} 2"), "{metrics}");
    assert!(metrics.contains("trellis_tunnel_refusals_total{reason=\"revoked_certificate\"} 1"), "{metrics}");
    // The real endpoint agent is unaffected.
    let mut client = TcpStream::connect(s.client_target).await.unwrap();
    client.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut buf)).await.unwrap().unwrap();
    stop(s).await;
}

#[tokio::test]
async fn a_resumed_session_of_a_revoked_certificate_is_refused_and_its_open_streams_closed() {
    let s = setup(VPCE).await;
    let gateway = s.gateway.tunnel_addr().unwrap();
    let port = s.client_target.port();
    let peer = s.ca.issue("agent-0000000000000000e", CONSUMER_ACCT, CONSUMER_VPC);
    let connector = connector_for(&peer);
    // An open stream of that agent (the session is cached for resumption on the way).
    let tcp = TcpStream::connect(gateway).await.unwrap();
    let mut open = connector.connect(ServerName::try_from(agent_server_name(GW)).unwrap(), tcp).await.unwrap();
    let mut first = open_request_frame(port);
    first.extend(data_frame(1, b"ping"));
    open.write_all(&first).await.unwrap();
    let mut reader = RawReader::new();
    let echoed = reader.read_flow(&mut open, 1, |f| f.data.ends_with(b"ping")).await.unwrap();
    assert!(echoed.data.ends_with(b"ping"), "closed before echoing: {echoed:?}");

    s.gateway_config.send_modify(|c| {
        let c = Arc::make_mut(c);
        c.version += 1;
        c.gateway.revoked_certs = [peer.cert_sha256()].into();
    });
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest)).await.expect("open stream kept");
    eventually("the revocation in the access log", Duration::from_secs(5), || {
        s.gateway_log.lines().iter().any(|l| {
            l["outcome"] == "revoked"
                && l["message"].as_str().is_some_and(|m| m.contains("agent-0000000000000000e was revoked"))
        })
    })
    .await;

    // Resumption skips the certificate verifier; the gateway must refuse anyway.
    let tcp = TcpStream::connect(gateway).await.unwrap();
    let mut resumed = connector.connect(ServerName::try_from(agent_server_name(GW)).unwrap(), tcp).await.unwrap();
    assert_eq!(resumed.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    let mut first = open_request_frame(port);
    first.extend(data_frame(1, b"ping"));
    let _ = resumed.write_all(&first).await;
    let seen = RawReader::new().read_flow(&mut resumed, 1, |_| false).await.unwrap();
    // Authenticated but not admitted: told why, and nothing else.
    let resp = seen.response.clone().expect("an answer");
    assert_eq!(resp.status, OpenStatus::Denied);
    assert!(resp.message.contains("agent-0000000000000000e was revoked"), "{resp:?}");
    assert!(seen.data.is_empty(), "a revoked certificate got payload after resuming: {seen:?}");
    stop(s).await;
}

#[tokio::test]
async fn a_connection_without_an_open_request_is_closed_within_the_timeout() {
    let s = setup_with(VPCE, |o| DataPlaneOptions {
        gateway_timeouts: trellis_agent::GatewayTimeouts { open_request: Duration::from_secs(1), ..Default::default() },
        ..o
    })
    .await;
    let tcp = TcpStream::connect(s.gateway.tunnel_addr().unwrap()).await.unwrap();
    let mut idle = connector_for(&s.endpoint_identity)
        .connect(ServerName::try_from(agent_server_name(GW)).unwrap(), tcp)
        .await
        .unwrap();
    let since = Instant::now();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut got)).await.expect("still open");
    assert!(since.elapsed() < Duration::from_secs(3), "closed after {:?}", since.elapsed());
    assert!(got.is_empty());
    // The default is seconds (an endpoint agent sends its preface at once).
    let open_request = trellis_agent::GatewayTimeouts::default().open_request;
    assert!(open_request <= Duration::from_secs(10));
    stop(s).await;
}

#[tokio::test]
async fn an_idle_connection_of_a_peer_that_loses_access_is_closed_at_once() {
    let s = setup(VPCE).await;
    let tcp = TcpStream::connect(s.gateway.tunnel_addr().unwrap()).await.unwrap();
    let mut idle = connector_for(&s.endpoint_identity)
        .connect(ServerName::try_from(agent_server_name(GW)).unwrap(), tcp)
        .await
        .unwrap();
    // Let the gateway finish its side of the handshake and start waiting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let since = Instant::now();
    s.gateway_config.send_modify(|c| {
        let c = Arc::make_mut(c);
        c.version += 1;
        c.gateway.consumers.clear();
        c.gateway.resources[0].allowed.clear();
    });
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut got)).await.expect("still open");
    assert!(since.elapsed() < Duration::from_secs(2), "closed after {:?}", since.elapsed());
    stop(s).await;
}

#[tokio::test]
async fn one_peer_cannot_take_more_than_its_share_of_connections() {
    let limits = trellis_agent::Limits {
        tunnel_connections: 16,
        tunnel_connections_per_peer: 6,
        tunnel_handshakes: 16,
        pending_tunnels_per_peer: 4,
        ..trellis_agent::Limits::from_open_files(1024)
    };
    let s = setup_with(VPCE, |o| DataPlaneOptions { limits, ..o }).await;
    let gateway = s.gateway.tunnel_addr().unwrap();
    let port = s.client_target.port();
    let greedy = s.ca.issue("agent-0000000000000000e", CONSUMER_ACCT, CONSUMER_VPC);
    let connector = connector_for(&greedy);
    let name = || ServerName::try_from(agent_server_name(GW)).unwrap();
    // Idle connections: at most 4 wait for an open request.
    let mut held = Vec::new();
    for _ in 0..4 {
        let tcp = TcpStream::connect(gateway).await.unwrap();
        held.push(connector.connect(name(), tcp).await.unwrap());
    }
    let tcp = TcpStream::connect(gateway).await.unwrap();
    let mut fifth = connector.connect(name(), tcp).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), fifth.read_to_end(&mut got)).await.expect("fifth idle kept");
    // Connections and flows (each holds a socket to the resource): at most 6 in all.
    let mut first = open_request_frame(port);
    first.extend(open_frame(3, port));
    held[0].write_all(&first).await.unwrap();
    let mut reader = RawReader::new();
    for flow in [1, 3] {
        let seen = reader.read_flow(&mut held[0], flow, |_| true).await.unwrap();
        assert_eq!(seen.response.map(|r| r.status), Some(OpenStatus::Ok), "a flow within the share was refused");
    }
    held[0].write_all(&open_frame(5, port)).await.unwrap();
    let over = reader.read_flow(&mut held[0], 5, |_| true).await.unwrap();
    assert_eq!(over.response.as_ref().map(|r| r.status), Some(OpenStatus::Denied), "a seventh was served: {over:?}");
    let metrics = s.gateway.metrics_text();
    assert!(metrics.contains("trellis_tunnel_refusals_total{reason=\"peer_pending\"} 1"), "{metrics}");
    assert!(metrics.contains("trellis_tunnel_refusals_total{reason=\"peer_connections\"} 1"), "{metrics}");
    // Another agent still gets through, and so do real clients of the endpoint agent.
    let other = s.ca.issue("agent-0000000000000000f", CONSUMER_ACCT, CONSUMER_VPC);
    let answer = try_open(&connector_for(&other), gateway, port).await.unwrap();
    assert_eq!(answer.map(|r| r.status), Some(OpenStatus::Ok));
    let mut client = TcpStream::connect(s.client_target).await.unwrap();
    client.write_all(b"fair").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut buf)).await.unwrap().unwrap();
    stop(s).await;
}

/// An open connection through the endpoint agent, echoed once.
async fn open_client(s: &Setup) -> TcpStream {
    let mut client = TcpStream::connect(s.client_target).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut buf)).await.unwrap().unwrap();
    client
}

async fn revoked_message(s: &Setup) -> String {
    eventually("a revoked line in the access log", Duration::from_secs(5), || {
        s.gateway_log.lines().iter().any(|l| l["outcome"] == "revoked")
    })
    .await;
    let lines = s.gateway_log.lines();
    let line = lines.iter().find(|l| l["outcome"] == "revoked").unwrap();
    line["message"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn the_access_log_says_what_was_revoked() {
    // The control plane names the revocation: its reason is logged.
    let s = setup(VPCE).await;
    let mut client = open_client(&s).await;
    s.gateway_config.send_modify(|c| {
        let c = Arc::make_mut(c);
        c.version += 1;
        c.gateway.consumers.clear();
        c.gateway.resources[0].allowed.clear();
        c.gateway.revoked_endpoints = vec![trellis_proto::RevokedEndpoint {
            vpc_endpoint_id: VPCE.into(),
            reason: "the resource share was deleted".into(),
        }];
    });
    assert!(read_all(&mut client, Duration::from_secs(5)).await.is_empty());
    assert_eq!(revoked_message(&s).await, format!("endpoint {VPCE} was revoked: the resource share was deleted"));
    stop(s).await;

    // The endpoint vanished from the config.
    let s = setup(VPCE).await;
    let mut client = open_client(&s).await;
    s.gateway_config.send_modify(|c| {
        let c = Arc::make_mut(c);
        c.version += 1;
        c.gateway.consumers.clear();
        c.gateway.resources[0].allowed.clear();
    });
    assert!(read_all(&mut client, Duration::from_secs(5)).await.is_empty());
    assert_eq!(revoked_message(&s).await, format!("endpoint {VPCE} was deleted or its resource is no longer served"));
    stop(s).await;
}

#[tokio::test]
async fn the_metrics_listener_survives_idle_and_slow_clients() {
    let ca = TestCa::new();
    let id = ca.issue(GW, "acct-000000000001", "vpc-00000000000000001");
    let (_tx, rx) = watch::channel(Arc::new(AgentConfig::default()));
    let opts =
        DataPlaneOptions { metrics_listen: Some("127.0.0.1:0".parse().unwrap()), ..DataPlaneOptions::loopback() };
    let agent = start_data_plane(opts, &id, rx).await.unwrap();
    let addr = agent.metrics_addr().unwrap();
    // Idle clients that never send a byte, and slow ones that never finish their headers.
    let mut idle = Vec::new();
    for i in 0..40 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 0 {
            c.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        }
        idle.push(c);
    }
    let get = |path: &'static str| async move {
        let mut c = TcpStream::connect(addr).await.ok()?;
        c.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await.ok()?;
        let mut resp = String::new();
        tokio::time::timeout(Duration::from_secs(2), c.read_to_string(&mut resp)).await.ok()?.ok()?;
        (!resp.is_empty()).then_some(resp)
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let resp = loop {
        if let Some(r) = get("/metrics").await {
            break r;
        }
        assert!(Instant::now() < deadline, "the metrics listener never answered again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // Every idle or slow client was cut off.
    for mut c in idle {
        let mut sink = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut sink)).await;
        assert!(r.is_ok(), "an idle metrics client is still connected");
    }
    assert!(get("/healthz").await.unwrap().starts_with("HTTP/1.1 404"));
    agent.shutdown().await;
}

/// A fake upstream resolver that answers every query with REFUSED and counts them.
async fn counting_upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use hickory_proto::op::{Message, ResponseCode};
    let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = upstream.recv_from(&mut buf).await {
            seen.fetch_add(1, Ordering::SeqCst);
            let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
            let mut r = Message::error_msg(q.metadata.id, q.metadata.op_code, ResponseCode::Refused);
            r.add_queries(q.queries);
            let _ = upstream.send_to(&r.to_vec().unwrap(), from).await;
        }
    });
    (addr, count)
}

async fn dns_agent(upstream: SocketAddr, allow: Option<Vec<ipnet::IpNet>>) -> RunningAgent {
    let ca = TestCa::new();
    let id = ca.issue(EP, CONSUMER_ACCT, CONSUMER_VPC);
    let config = endpoint_config(unique_loopback(77), 5432, "127.0.0.1:9".parse().unwrap(), GW);
    let (tx, rx) = watch::channel(Arc::new(config));
    // The sender lives as long as the test process: the agent keeps its config.
    std::mem::forget(tx);
    let opts = DataPlaneOptions {
        tunnel_listen: None,
        dns_listen: Some("127.0.0.1:0".parse().unwrap()),
        dns_upstream: Some(upstream),
        dns_allow: allow,
        ..DataPlaneOptions::loopback()
    };
    start_data_plane(opts, &id, rx).await.unwrap()
}

/// Sends one UDP query from `from` and returns the answer, if one comes within 3 s.
async fn udp_ask(
    from: &str,
    dns: SocketAddr,
    id: u16,
    name: &str,
    ty: hickory_proto::rr::RecordType,
) -> Option<hickory_proto::op::Message> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::Name;
    let sock = UdpSocket::bind(from).await.unwrap();
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), ty));
    sock.send_to(&msg.to_vec().unwrap(), dns).await.unwrap();
    let mut buf = [0u8; 1024];
    let (n, _) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf)).await.ok()?.ok()?;
    Message::from_vec(&buf[..n]).ok()
}

#[tokio::test]
async fn dns_refuses_sources_outside_the_allowed_networks_and_never_forwards_for_them() {
    use hickory_proto::op::ResponseCode;
    use hickory_proto::rr::RecordType;
    let (upstream, forwarded) = counting_upstream().await;
    let agent = dns_agent(upstream, Some(vec!["127.0.0.1/32".parse().unwrap()])).await;
    let dns = agent.dns_addr().unwrap();
    let name = "vpce-00000000000000001.rcfg-00000000000000001.local.trellis.internal.";

    let refused = udp_ask("127.0.0.2:0", dns, 1, "example.org.", RecordType::A).await.expect("an answer");
    assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
    let refused = udp_ask("127.0.0.2:0", dns, 2, name, RecordType::A).await.expect("an answer");
    assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
    assert!(refused.answers.is_empty(), "an endpoint address leaked to a refused source");
    // TCP from there is closed without an answer.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut tcp = sock.connect(dns).await.unwrap();
    let q = dns_query(3, "example.org.");
    let _ = tcp.write_all(&(q.len() as u16).to_be_bytes()).await;
    let _ = tcp.write_all(&q).await;
    assert!(read_all(&mut tcp, Duration::from_secs(5)).await.is_empty());
    assert_eq!(forwarded.load(Ordering::SeqCst), 0, "a refused source's query reached the upstream");
    assert!(agent.metrics_text().contains("trellis_dns_queries_total{answer=\"refused_source\"} 3"));

    // The allowed source is served as before.
    let ok = udp_ask("127.0.0.1:0", dns, 4, name, RecordType::A).await.expect("an answer");
    assert_eq!(ok.answers.len(), 1);
    let fwd = udp_ask("127.0.0.1:0", dns, 5, "example.org.", RecordType::A).await.expect("an answer");
    assert_eq!(fwd.metadata.response_code, ResponseCode::Refused, "the fake upstream's answer");
    assert_eq!(forwarded.load(Ordering::SeqCst), 1);
    agent.shutdown().await;
}

#[tokio::test]
async fn dns_never_forwards_any_queries() {
    use hickory_proto::op::ResponseCode;
    use hickory_proto::rr::RecordType;
    let (upstream, forwarded) = counting_upstream().await;
    let agent = dns_agent(upstream, None).await;
    let dns = agent.dns_addr().unwrap();
    let answer = udp_ask("127.0.0.1:0", dns, 1, "example.org.", RecordType::ANY).await.expect("an answer");
    assert_eq!(answer.metadata.response_code, ResponseCode::NotImp);
    assert_eq!(forwarded.load(Ordering::SeqCst), 0, "ANY reached the upstream");
    // Other types still are forwarded (the check above can fail).
    udp_ask("127.0.0.1:0", dns, 2, "example.org.", RecordType::TXT).await.expect("an answer");
    assert_eq!(forwarded.load(Ordering::SeqCst), 1);
    agent.shutdown().await;
}

#[tokio::test]
async fn idle_dns_tcp_connections_do_not_stop_udp_answers() {
    use hickory_proto::rr::RecordType;
    let (upstream, _) = counting_upstream().await;
    let agent = dns_agent(upstream, None).await;
    let dns = agent.dns_addr().unwrap();
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(dns).await.unwrap());
    }
    for id in 0..20u16 {
        let answer = udp_ask("127.0.0.1:0", dns, id, "example.org.", RecordType::A).await;
        assert!(answer.is_some(), "UDP query {id} went unanswered with 300 idle TCP connections");
    }
    let name = "vpce-00000000000000001.rcfg-00000000000000001.local.trellis.internal.";
    assert!(udp_ask("127.0.0.1:0", dns, 99, name, RecordType::A).await.is_some());
    // The idle TCP connections are closed (beyond the budget at once, the rest when idle too long).
    let since = Instant::now();
    for mut c in idle {
        let mut sink = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(15), c.read_to_end(&mut sink)).await;
        assert!(r.is_ok(), "an idle DNS TCP connection is still open after {:?}", since.elapsed());
    }
    agent.shutdown().await;
}

#[tokio::test]
async fn an_endpoint_asking_for_too_many_ports_fails_whole_and_the_others_keep_serving() {
    let s = setup(VPCE).await;
    let greedy_addr = unique_loopback(77);
    // Its id sorts first, so an id-ordered budget would hand it the ports first.
    let greedy = "vpce-00000000000000000";
    s.endpoint_config.send_modify(|c| {
        let c = Arc::make_mut(c);
        c.version += 1;
        let mut big = c.endpoints[0].clone();
        big.vpc_endpoint_id = greedy.into();
        big.resources[0].address = greedy_addr;
        big.resources[0].port_ranges = vec![PortRange::new(20000, 24999).unwrap()];
        c.endpoints.insert(0, big);
    });
    let served = s.endpoint.served();
    eventually("the new config", Duration::from_secs(10), || served.borrow().config_version == 2).await;
    let state = served.borrow().clone();
    let status = |id: &str| state.listeners.iter().find(|l| l.vpc_endpoint_id == id).unwrap().clone();
    let failed = status(greedy);
    assert!(!failed.ready);
    assert_eq!(
        failed.error.as_deref().unwrap_or_default(),
        format!(
            "endpoint {greedy} asks for 5000 listeners; an endpoint may have at most {} (narrow the resource's port ranges)",
            trellis_proto::MAX_LISTENERS_PER_ENDPOINT
        )
    );
    assert!(status(VPCE).ready, "{state:?}");
    // None of its ports listen; the other endpoint serves.
    for port in [20000, 22500, 24999] {
        assert!(
            std::net::TcpStream::connect_timeout(&SocketAddr::new(greedy_addr, port), Duration::from_millis(500))
                .is_err(),
            "port {port} of the failed endpoint listens"
        );
    }
    let mut client = open_client(&s).await;
    client.write_all(b"more").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut buf)).await.unwrap().unwrap();
    stop(s).await;
}

#[tokio::test]
async fn an_endpoint_agent_refused_at_the_handshake_says_why() {
    let s = setup(VPCE).await;
    // The gateway has not (or no longer) got this consumer VPC.
    s.gateway_config.send_modify(|c| {
        let c = Arc::make_mut(c);
        c.version += 1;
        c.gateway.consumers.clear();
        c.gateway.resources[0].allowed.clear();
    });
    let mut client = TcpStream::connect(s.client_target).await.unwrap();
    let _ = client.write_all(b"hello").await;
    assert!(read_all(&mut client, Duration::from_secs(10)).await.is_empty());
    eventually("the refusal in the endpoint's access log", Duration::from_secs(10), || {
        // A full handshake is refused with a TLS alert; a resumed session gets a denial.
        s.endpoint_log.lines().iter().any(|l| {
            let message = l["message"].as_str().unwrap_or_default();
            (l["outcome"] == "unreachable" && message.contains("refused this agent's certificate"))
                || (l["outcome"] == "denied"
                    && message.contains(&format!("no endpoint of VPC {CONSUMER_VPC} (account {CONSUMER_ACCT})")))
        })
    })
    .await;
    stop(s).await;
}
