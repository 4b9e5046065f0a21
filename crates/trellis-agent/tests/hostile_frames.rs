//! A malformed or oversized frame on a direct hop closes that flow only
//! (issue 8, test 4; the relay hop is tested with the relay), over stream
//! protocol version 2 (flows multiplexed on long-lived tunnel connections,
//! `trellis_proto::mux`). Real agents with hand-built configs, as in
//! `data_plane.rs`: a hostile enrolled agent that breaks the protocol toward a
//! gateway agent, and a hostile "gateway" that breaks it toward an endpoint
//! agent, each while a flow of the real agents through the same agent keeps
//! moving bytes. (`data_plane.rs` covers bad frames among flows of one
//! connection, a version-1 peer, and a gateway that opens flows.)

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use trellis_agent::testing::{self, TestCa, data_frame, echo_server, unique_loopback};
use trellis_agent::{AgentIdentity, DataPlaneOptions, RunningAgent, start_data_plane, tls};
use trellis_proto::mux::{
    self, Control, FRAME_HEADER_LEN, Header, MAX_CONTROL_LEN, PREFACE, decode_header, parse_control,
};
use trellis_proto::stream::{OpenRequest, OpenResponse, OpenStatus};
use trellis_proto::{
    AgentConfig, AllowedEndpoint, ConsumerVpc, EndpointConfig, EndpointResource, GatewayResource, GatewayRole,
    GatewayTarget, PortRange, Target, agent_server_name,
};

const GW: &str = "agent-0000000000000000a";
const EP: &str = "agent-0000000000000000b";
/// Another enrolled agent of the consumer VPC, which turns hostile.
const HOSTILE: &str = "agent-0000000000000000c";
const VPCE: &str = "vpce-00000000000000001";
const RCFG: &str = "rcfg-00000000000000001";
const OWNER_ACCT: &str = "acct-000000000001";
const OWNER_VPC: &str = "vpc-00000000000000001";
const CONSUMER_ACCT: &str = "acct-000000000002";
const CONSUMER_VPC: &str = "vpc-00000000000000002";
const DEADLINE: Duration = Duration::from_secs(10);

fn gateway_config(target: SocketAddr) -> AgentConfig {
    AgentConfig {
        version: 1,
        agent_id: GW.into(),
        zone: "z1".into(),
        gateway: GatewayRole {
            consumers: vec![ConsumerVpc { account_id: CONSUMER_ACCT.into(), vpc_id: CONSUMER_VPC.into() }],
            resources: vec![GatewayResource {
                resource_configuration_id: RCFG.into(),
                resource_gateway_id: "rgw-00000000000000001".into(),
                owner_account_id: OWNER_ACCT.into(),
                target: Target::Ip { address: target.ip() },
                port_ranges: vec![PortRange::single(target.port()).unwrap()],
                allowed: vec![AllowedEndpoint { vpc_endpoint_id: VPCE.into(), consumer: 0 }],
                proxy_protocol: false,
                limits: None,
            }],
            ..Default::default()
        },
        ..Default::default()
    }
}

fn endpoint_config(address: IpAddr, port: u16, gateway: SocketAddr) -> AgentConfig {
    AgentConfig {
        version: 1,
        agent_id: EP.into(),
        account_id: CONSUMER_ACCT.into(),
        vpc_id: CONSUMER_VPC.into(),
        zone: "z1".into(),
        region: "local".into(),
        address_pool: "127.78.0.0/16".into(),
        endpoints: vec![EndpointConfig {
            vpc_endpoint_id: VPCE.into(),
            resources: vec![EndpointResource {
                resource_configuration_id: RCFG.into(),
                address,
                port_ranges: vec![PortRange::single(port).unwrap()],
                dns_names: vec![],
                dns_records: vec![],
                gateways: vec![GatewayTarget {
                    agent_id: GW.into(),
                    address: gateway.to_string(),
                    zone: "z1".into(),
                    server_name: agent_server_name(GW),
                    relays: vec![],
                }],
            }],
        }],
        ..Default::default()
    }
}

/// An endpoint agent in front of `gateway`, listening on `address` at `port`, once its listener is up.
async fn endpoint_agent(
    identity: &AgentIdentity,
    address: IpAddr,
    port: u16,
    gateway: SocketAddr,
) -> (RunningAgent, watch::Sender<Arc<AgentConfig>>) {
    let (tx, rx) = watch::channel(Arc::new(endpoint_config(address, port, gateway)));
    let agent =
        start_data_plane(DataPlaneOptions { tunnel_listen: None, ..DataPlaneOptions::loopback() }, identity, rx)
            .await
            .unwrap();
    let mut served = agent.served();
    tokio::time::timeout(DEADLINE, served.wait_for(|s| s.listeners.iter().any(|l| l.ready)))
        .await
        .expect("the endpoint listener is ready in time")
        .unwrap();
    (agent, tx)
}

/// Reads until the peer closes or resets; returns what arrived. Fails if it stays open.
async fn read_until_closed(stream: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(DEADLINE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the connection was not closed in time");
    got
}

/// `payload` sent on `flow` comes back: the flow still moves bytes both ways.
async fn still_moves(flow: &mut TcpStream, payload: &[u8]) {
    flow.write_all(payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(DEADLINE, flow.read_exact(&mut back))
        .await
        .expect("the other flow stalled")
        .expect("the other flow was closed");
    assert_eq!(back, payload);
}

fn request(port: u16) -> OpenRequest {
    testing::open_request(VPCE, RCFG, port)
}

fn open_frame(flow: u32, port: u16) -> Vec<u8> {
    testing::open_frame(flow, &request(port))
}

/// A control frame of `kind` on `flow` whose header announces `len` body bytes, followed by `body`.
fn raw_frame(kind: u8, flow: u32, len: u32, body: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&flow.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// What one flow got, read frame by frame from a raw tunnel connection.
#[derive(Debug, Default)]
struct FlowSeen {
    response: Option<OpenResponse>,
    data: Vec<u8>,
    fin: bool,
    reset: bool,
    /// The connection ended first.
    closed: bool,
}

/// Reads a raw version-2 tunnel connection frame by frame (the peer's preface first).
#[derive(Default)]
struct Frames {
    buf: Vec<u8>,
    preface_seen: bool,
    /// Frames of other flows than the one being read.
    kept: VecDeque<(Header, Vec<u8>)>,
}

impl Frames {
    /// The next frame off the wire; `None` once the connection ends.
    async fn next(&mut self, io: &mut (impl AsyncRead + Unpin)) -> Option<(Header, Vec<u8>)> {
        loop {
            if !self.preface_seen && self.buf.len() >= PREFACE.len() {
                assert_eq!(self.buf[..PREFACE.len()], PREFACE, "the peer's preface");
                self.buf.drain(..PREFACE.len());
                self.preface_seen = true;
            }
            if self.preface_seen
                && let Some(h) = decode_header(&self.buf)
                && self.buf.len() >= FRAME_HEADER_LEN + h.len as usize
            {
                let body = self.buf.drain(..FRAME_HEADER_LEN + h.len as usize).skip(FRAME_HEADER_LEN).collect();
                return Some((h, body));
            }
            let mut chunk = [0u8; 4096];
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// What `flow` gets until `until` holds, it is reset or finished, or the
    /// connection ends. Frames of other flows are kept for later.
    async fn flow(
        &mut self,
        io: &mut (impl AsyncRead + Unpin),
        flow: u32,
        until: impl Fn(&FlowSeen) -> bool,
    ) -> FlowSeen {
        let mut seen = FlowSeen::default();
        let read = tokio::time::timeout(DEADLINE, async {
            loop {
                let frame = match self.kept.iter().position(|(h, _)| h.flow == flow) {
                    Some(at) => self.kept.remove(at),
                    None => self.next(io).await,
                };
                let Some((h, body)) = frame else {
                    seen.closed = true;
                    return;
                };
                if h.flow != flow {
                    self.kept.push_back((h, body));
                    continue;
                }
                match h.kind {
                    mux::DATA => seen.data.extend_from_slice(&body),
                    mux::OPEN_RESPONSE => {
                        if let Ok(Control::OpenResponse(r)) = parse_control(h.kind, &body) {
                            seen.response = Some(r);
                        }
                    }
                    mux::FIN => seen.fin = true,
                    mux::RESET => seen.reset = true,
                    _ => {}
                }
                if seen.reset || seen.fin || until(&seen) {
                    return;
                }
            }
        })
        .await;
        assert!(read.is_ok(), "flow {flow}: nothing conclusive within {DEADLINE:?}");
        seen
    }

    /// Whether a frame of `flow` arrived and was kept.
    fn kept_any(&self, flow: u32) -> bool {
        self.kept.iter().any(|(h, _)| h.flow == flow)
    }
}

/// A tunnel connection to the gateway agent at `addr` with `connector`'s identity.
async fn hostile(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector.connect(ServerName::try_from(agent_server_name(GW)).unwrap(), tcp).await.unwrap()
}

fn status(seen: &FlowSeen) -> Option<OpenStatus> {
    seen.response.as_ref().map(|r| r.status)
}

#[tokio::test]
async fn bad_frames_toward_a_gateway_close_only_their_flow_or_their_connection() {
    let ca = TestCa::new();
    let gw_id = ca.issue(GW, OWNER_ACCT, OWNER_VPC);
    let ep_id = ca.issue(EP, CONSUMER_ACCT, CONSUMER_VPC);
    let hostile_id = ca.issue(HOSTILE, CONSUMER_ACCT, CONSUMER_VPC);
    let echo = echo_server().await;
    let (_gw_tx, rx) = watch::channel(Arc::new(gateway_config(echo)));
    let gateway = start_data_plane(DataPlaneOptions::loopback(), &gw_id, rx).await.unwrap();
    let tunnel_addr = gateway.tunnel_addr().unwrap();
    let address = unique_loopback(76);
    let (endpoint, _ep_tx) = endpoint_agent(&ep_id, address, echo.port(), tunnel_addr).await;

    // A flow through both agents, established before the hostile peer shows up.
    let mut flow = TcpStream::connect(SocketAddr::new(address, echo.port())).await.unwrap();
    still_moves(&mut flow, b"before").await;

    // An enrolled agent's certificate: the peer gets past TLS and admission, then breaks the protocol.
    let connector = tokio_rustls::TlsConnector::from(tls::tunnel_client_config(&hostile_id).unwrap());
    let port = echo.port();
    let mut conn = hostile(&connector, tunnel_addr).await;
    let mut frames = Frames::default();
    // Its flow 1 behaves, and outlives its neighbours on the same connection.
    let mut first = PREFACE.to_vec();
    first.extend(open_frame(1, port));
    first.extend(data_frame(1, b"one"));
    conn.write_all(&first).await.unwrap();
    let one = frames.flow(&mut conn, 1, |f| f.data == b"one").await;
    assert_eq!(status(&one), Some(OpenStatus::Ok), "{one:?}");

    // A malformed OPEN: answered BadRequest and reset.
    conn.write_all(&raw_frame(mux::OPEN, 3, 3, b"abc")).await.unwrap();
    let three = frames.flow(&mut conn, 3, |_| false).await;
    assert_eq!(status(&three), Some(OpenStatus::BadRequest), "{three:?}");
    assert!(three.reset, "{three:?}");
    still_moves(&mut flow, b"after a malformed OPEN").await;

    // An OPEN whose header announces a body over the limit (sent in full,
    // a valid request padded): its flow is reset unopened, the body skipped.
    let mut big = open_frame(5, port);
    big[5..9].copy_from_slice(&((MAX_CONTROL_LEN + 1) as u32).to_be_bytes());
    big.resize(FRAME_HEADER_LEN + MAX_CONTROL_LEN + 1, 0);
    conn.write_all(&big).await.unwrap();
    let five = frames.flow(&mut conn, 5, |_| false).await;
    assert!(five.reset && five.response.is_none(), "an oversized OPEN was not refused: {five:?}");
    still_moves(&mut flow, b"after an oversized OPEN").await;

    // A frame of an unknown type on an open flow resets that flow.
    let mut seven = open_frame(7, port);
    seven.extend(data_frame(7, b"seven"));
    conn.write_all(&seven).await.unwrap();
    let seven = frames.flow(&mut conn, 7, |f| f.data == b"seven").await;
    assert_eq!(status(&seven), Some(OpenStatus::Ok), "{seven:?}");
    conn.write_all(&raw_frame(0x42, 7, 4, b"????")).await.unwrap();
    let seven = frames.flow(&mut conn, 7, |_| false).await;
    assert!(seven.reset, "an unknown frame type did not reset its flow: {seven:?}");
    still_moves(&mut flow, b"after an unknown frame type").await;

    // DATA for a flow never opened goes nowhere: flow 1 still echoes behind
    // it (the gateway handles frames in order, so an answer to flow 9 would
    // have come first), and a flow opened later with that id gets none of it.
    conn.write_all(&data_frame(9, b"ghost")).await.unwrap();
    conn.write_all(&data_frame(1, b" two")).await.unwrap();
    let one = frames.flow(&mut conn, 1, |f| f.data == b" two").await;
    assert!(!one.reset && !one.closed, "{one:?}");
    assert!(!frames.kept_any(9), "the gateway answered DATA of an unopened flow");
    let mut nine = open_frame(9, port);
    nine.extend(data_frame(9, b"nine"));
    conn.write_all(&nine).await.unwrap();
    let nine = frames.flow(&mut conn, 9, |f| f.data.len() >= 4).await;
    assert_eq!((status(&nine), nine.data.as_slice()), (Some(OpenStatus::Ok), &b"nine"[..]), "{nine:?}");
    still_moves(&mut flow, b"after DATA of an unopened flow").await;

    // Garbage where a frame should start: read as a header (type 0, flow
    // 0xff474554) announcing ~540 MB, so the gateway resets that flow and
    // skips what follows; this connection's framing is lost, nothing else.
    let garbage = b"\x00\xffGET / HTTP/1.1\r\nHost: x\r\n\r\n";
    conn.write_all(garbage).await.unwrap();
    let lost = frames.flow(&mut conn, 0xff47_4554, |_| false).await;
    assert!(lost.reset, "{lost:?}");
    still_moves(&mut flow, b"after garbage on a tunnel connection").await;

    // Garbage instead of the preface, or a preface of an unknown version:
    // that connection is closed, unanswered.
    for (what, bytes) in [("garbage", &b"\x00\xffGET / HTTP/1.1\r\n\r\n"[..]), ("version 9", &b"TRLS\x09"[..])] {
        let mut bad = hostile(&connector, tunnel_addr).await;
        let _ = bad.write_all(bytes).await;
        let _ = bad.flush().await;
        let answer = read_until_closed(&mut bad).await;
        assert!(answer.is_empty(), "{what} instead of the preface was answered: {answer:?}");
        still_moves(&mut flow, format!("after {what} instead of the preface").as_bytes()).await;
    }

    // New flows still open through the same agents.
    let mut fresh = TcpStream::connect(SocketAddr::new(address, echo.port())).await.unwrap();
    still_moves(&mut fresh, b"a new flow").await;
    still_moves(&mut flow, b"the first flow, last").await;
    drop(conn);
    endpoint.shutdown().await;
    gateway.shutdown().await;
}

/// How the hostile gateway answers an OPEN (chosen by the client's port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Ok,
    UnknownStatus,
    Oversized,
    Garbage,
    Overrun,
}

const ATTACKS: [(&str, Answer); 4] = [
    ("an OPEN_RESPONSE with an unknown status", Answer::UnknownStatus),
    ("an OPEN_RESPONSE over the size limit", Answer::Oversized),
    ("garbage instead of the preface", Answer::Garbage),
    ("an OPEN_RESPONSE whose message overruns its body", Answer::Overrun),
];

/// What the hostile gateway saw and did.
#[derive(Default)]
struct Rogue {
    /// Client port → answer; `Ok` for ports not listed.
    plan: Mutex<HashMap<u16, Answer>>,
    /// The answers it gave, one per OPEN.
    answered: Mutex<Vec<Answer>>,
    /// Connections it sent garbage on.
    garbage_sent: AtomicUsize,
}

/// One tunnel connection of the hostile gateway: version 2, answering each
/// OPEN as planned. Good flows are echoed. Every bad answer is followed by
/// DATA on that flow. Garbage replaces the preface, so it goes only on a
/// connection that carries nothing yet; a garbage OPEN on a connection that
/// already spoke is reset, and the endpoint agent retries it on a new one.
async fn rogue_connection(mut tls: tokio_rustls::server::TlsStream<TcpStream>, rogue: Arc<Rogue>) {
    let mut frames = Frames::default();
    let mut greeted = false;
    let mut echoing = HashSet::new();
    while let Some((h, body)) = frames.next(&mut tls).await {
        let mut out = Vec::new();
        match h.kind {
            mux::OPEN => {
                let Ok(Control::Open(req)) = parse_control(mux::OPEN, &body) else { return };
                let answer = rogue.plan.lock().unwrap().get(&req.client_addr.port()).copied().unwrap_or(Answer::Ok);
                rogue.answered.lock().unwrap().push(answer);
                if answer == Answer::Garbage && !greeted {
                    let _ = tls.write_all(b"HTTP/1.1 200 OK\r\n\r\nEVIL").await;
                    let _ = tls.flush().await;
                    rogue.garbage_sent.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                if !greeted {
                    out.extend_from_slice(&PREFACE);
                    greeted = true;
                }
                let mut ok = Vec::new();
                trellis_proto::stream::encode_open_response_body(&OpenResponse::new(OpenStatus::Ok, ""), &mut ok);
                match answer {
                    Answer::Ok => {
                        mux::encode_open_response(h.flow, &OpenResponse::new(OpenStatus::Ok, ""), &mut out);
                        echoing.insert(h.flow);
                    }
                    Answer::Garbage => mux::encode_reset(h.flow, &mut out),
                    Answer::UnknownStatus => out.extend(raw_frame(mux::OPEN_RESPONSE, h.flow, 3, &[9, 0, 0])),
                    Answer::Oversized => {
                        ok.resize(MAX_CONTROL_LEN + 1, b' ');
                        out.extend(raw_frame(mux::OPEN_RESPONSE, h.flow, ok.len() as u32, &ok));
                    }
                    // Status Ok, a 256-byte message, two bytes of it.
                    Answer::Overrun => out.extend(raw_frame(mux::OPEN_RESPONSE, h.flow, 5, &[0, 1, 0, b'x', b'y'])),
                }
                if !matches!(answer, Answer::Ok | Answer::Garbage) {
                    out.extend(data_frame(h.flow, b"EVIL"));
                }
            }
            mux::DATA if echoing.contains(&h.flow) => out.extend(data_frame(h.flow, &body)),
            mux::FIN if echoing.remove(&h.flow) => mux::encode_fin(h.flow, &mut out),
            mux::RESET => {
                echoing.remove(&h.flow);
            }
            _ => {}
        }
        if !out.is_empty() && (tls.write_all(&out).await.is_err() || tls.flush().await.is_err()) {
            return;
        }
    }
}

#[tokio::test]
async fn a_bad_answer_from_a_gateway_fails_that_client_connection_only() {
    // A "gateway" with a valid certificate that speaks version 2, answers one
    // flow properly (and echoes it) and breaks the protocol on the others.
    let ca = TestCa::new();
    let rogue_id = ca.issue(GW, OWNER_ACCT, OWNER_VPC);
    let ep_id = ca.issue(EP, CONSUMER_ACCT, CONSUMER_VPC);
    let acceptor =
        tokio_rustls::TlsAcceptor::from(tls::tunnel_server_config(&rogue_id, Arc::new(tls::AnyAgent)).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rogue_addr = listener.local_addr().unwrap();
    let rogue = Arc::new(Rogue::default());
    let serving = rogue.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, rogue) = (acceptor.clone(), serving.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    rogue_connection(tls, rogue).await;
                }
            });
        }
    });
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let address = unique_loopback(76);
    let (endpoint, _tx) = endpoint_agent(&ep_id, address, port, rogue_addr).await;
    let entry = SocketAddr::new(address, port);

    let mut flow = TcpStream::connect(entry).await.unwrap();
    still_moves(&mut flow, b"before").await;
    for (what, answer) in ATTACKS {
        // The client's port tells the rogue which answer this flow gets (also when the endpoint agent retries it).
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        rogue.plan.lock().unwrap().insert(socket.local_addr().unwrap().port(), answer);
        let mut client = socket.connect(entry).await.unwrap();
        let _ = client.write_all(b"hello").await;
        let got = read_until_closed(&mut client).await;
        assert!(got.is_empty(), "after {what}, bytes reached the client: {got:?}");
        assert!(
            rogue.answered.lock().unwrap().contains(&answer),
            "the endpoint agent never sent the OPEN {what} answers"
        );
        still_moves(&mut flow, format!("after {what}").as_bytes()).await;
    }
    assert!(rogue.garbage_sent.load(Ordering::SeqCst) >= 1, "the garbage never went out");
    assert!(endpoint.metrics_text().contains("trellis_rejected_connections_total{role=\"endpoint\""));

    // A new client is still served through the same gateway.
    let mut fresh = TcpStream::connect(entry).await.unwrap();
    still_moves(&mut fresh, b"a new flow").await;
    still_moves(&mut flow, b"the first flow, last").await;
    endpoint.shutdown().await;
}
