//! A malformed or oversized frame on a direct hop closes that flow only
//! (issue 8, test 4; the relay hop is tested with the relay). Real agents with
//! hand-built configs, as in `data_plane.rs`: a peer that breaks the stream
//! protocol toward a gateway agent, and a hostile "gateway" that breaks it
//! toward an endpoint agent, each while another flow through the same agent
//! keeps moving bytes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use trellis_agent::testing::TestCa;
use trellis_agent::{AgentIdentity, DataPlaneOptions, RunningAgent, start_data_plane, tls};
use trellis_proto::stream::{
    MAGIC, MAX_BODY_LEN, OpenResponse, OpenStatus, VERSION, decode_open_request, decode_open_response,
    encode_open_response,
};
use trellis_proto::{
    AgentConfig, AllowedEndpoint, ConsumerVpc, EndpointConfig, EndpointResource, GatewayResource, GatewayRole,
    GatewayTarget, PortRange, Target, agent_server_name,
};

const GW: &str = "agent-0000000000000000a";
const EP: &str = "agent-0000000000000000b";
const VPCE: &str = "vpce-00000000000000001";
const RCFG: &str = "rcfg-00000000000000001";
const OWNER_ACCT: &str = "acct-000000000001";
const OWNER_VPC: &str = "vpc-00000000000000001";
const CONSUMER_ACCT: &str = "acct-000000000002";
const CONSUMER_VPC: &str = "vpc-00000000000000002";
const DEADLINE: Duration = Duration::from_secs(10);

/// A loopback address of its own for each test (parallel tests never share a listener).
fn unique_loopback(n: u8) -> IpAddr {
    IpAddr::from([127, 78, (std::process::id() % 250) as u8, n])
}

/// Echoes every connection, and half-closes after the client does.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

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

/// A frame header of `frame_type` announcing `len` body bytes.
fn header(frame_type: u8, len: u16) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&[VERSION, frame_type]);
    h.extend_from_slice(&len.to_be_bytes());
    h
}

#[tokio::test]
async fn a_bad_first_frame_toward_a_gateway_closes_that_tunnel_connection_only() {
    let ca = TestCa::new();
    let gw_id = ca.issue(GW, OWNER_ACCT, OWNER_VPC);
    let ep_id = ca.issue(EP, CONSUMER_ACCT, CONSUMER_VPC);
    let echo = echo_server().await;
    let (_gw_tx, rx) = watch::channel(Arc::new(gateway_config(echo)));
    let gateway = start_data_plane(DataPlaneOptions::loopback(), &gw_id, rx).await.unwrap();
    let tunnel_addr = gateway.tunnel_addr().unwrap();
    let address = unique_loopback(1);
    let (endpoint, _ep_tx) = endpoint_agent(&ep_id, address, echo.port(), tunnel_addr).await;

    // A flow through both agents, established before the hostile peer shows up.
    let mut flow = TcpStream::connect(SocketAddr::new(address, echo.port())).await.unwrap();
    still_moves(&mut flow, b"before").await;

    let oversized = {
        let mut f = header(1, (MAX_BODY_LEN + 1) as u16);
        f.extend(std::iter::repeat_n(b'x', MAX_BODY_LEN + 1));
        f
    };
    let mut response_frame = Vec::new();
    encode_open_response(&OpenResponse::new(OpenStatus::Ok, ""), &mut response_frame);
    let attacks: [(&str, Vec<u8>); 5] = [
        ("a malformed open request", b"TRLS\x01\x01\x00\x03abc".to_vec()),
        ("an open request announcing 65,535 body bytes", header(1, u16::MAX)),
        ("an oversized open request, body and all", oversized),
        ("garbage after the TLS handshake", b"\x00\xffGET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("an open response, which only a gateway may send", response_frame),
    ];
    let connector = tokio_rustls::TlsConnector::from(tls::tunnel_client_config(&ep_id).unwrap());
    for (what, bytes) in &attacks {
        // An enrolled consumer agent's certificate: the peer gets past TLS and breaks the protocol.
        let tcp = TcpStream::connect(tunnel_addr).await.unwrap();
        let mut bad = connector.connect(ServerName::try_from(agent_server_name(GW)).unwrap(), tcp).await.unwrap();
        // The gateway may close while the rest is still being written.
        let _ = bad.write_all(bytes).await;
        let _ = bad.flush().await;
        // Told why, then closed.
        let answer = read_until_closed(&mut bad).await;
        let (resp, _) = decode_open_response(&answer)
            .unwrap_or_else(|e| panic!("{what}: answered {answer:?}: {e}"))
            .unwrap_or_else(|| panic!("{what}: no answer before the close"));
        assert_eq!(resp.status, OpenStatus::BadRequest, "{what}: {}", resp.message);
        still_moves(&mut flow, format!("after {what}").as_bytes()).await;
    }

    // New flows still open through the same agents.
    let mut fresh = TcpStream::connect(SocketAddr::new(address, echo.port())).await.unwrap();
    still_moves(&mut fresh, b"a new flow").await;
    still_moves(&mut flow, b"the first flow, last").await;
    endpoint.shutdown().await;
    gateway.shutdown().await;
}

/// What the hostile gateway answers an open request with (by the order the requests arrive).
const ANSWERS: [(&str, &[u8]); 5] = [
    ("OK", b""),
    ("a response with an unknown status", b"TRLS\x01\x02\x00\x03\x09\x00\x00"),
    ("a response announcing 65,535 body bytes", b"TRLS\x01\x02\xff\xff"),
    ("garbage", b"HTTP/1.1 200 OK\r\n\r\n"),
    ("a response whose message overruns its body", b"TRLS\x01\x02\x00\x05\x00\x01\x00xy"),
];

#[tokio::test]
async fn a_bad_open_response_fails_that_client_connection_only() {
    // A "gateway" with a valid certificate: its first stream is a good one (answered
    // OK, then echoed); every later one gets a broken answer followed by payload.
    let ca = TestCa::new();
    let rogue_id = ca.issue(GW, OWNER_ACCT, OWNER_VPC);
    let ep_id = ca.issue(EP, CONSUMER_ACCT, CONSUMER_VPC);
    let acceptor =
        tokio_rustls::TlsAcceptor::from(tls::tunnel_server_config(&rogue_id, Arc::new(tls::AnyAgent)).unwrap());
    let rogue = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rogue_addr = rogue.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = requests.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = rogue.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                let rest = loop {
                    match decode_open_request(&got) {
                        Ok(Some((_, used))) => break got.split_off(used),
                        Ok(None) => {}
                        Err(_) => return,
                    }
                    match tls.read(&mut buf).await {
                        Ok(n @ 1..) => got.extend_from_slice(&buf[..n]),
                        _ => return, // an idle pooled connection closed
                    }
                };
                let n = seen.fetch_add(1, Ordering::SeqCst);
                let (_, answer) = ANSWERS[n.min(ANSWERS.len() - 1)];
                if n == 0 {
                    let mut ok = Vec::new();
                    encode_open_response(&OpenResponse::new(OpenStatus::Ok, ""), &mut ok);
                    ok.extend_from_slice(&rest);
                    if tls.write_all(&ok).await.is_err() {
                        return;
                    }
                    let _ = tls.flush().await;
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = tls.read(&mut buf).await {
                        if tls.write_all(&buf[..n]).await.is_err() || tls.flush().await.is_err() {
                            return;
                        }
                    }
                    return;
                }
                let mut frame = answer.to_vec();
                frame.extend_from_slice(b"EVIL");
                let _ = tls.write_all(&frame).await;
                let _ = tls.flush().await;
                let mut sink = Vec::new();
                let _ = tls.read_to_end(&mut sink).await;
            });
        }
    });
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let address = unique_loopback(2);
    let (endpoint, _tx) = endpoint_agent(&ep_id, address, port, rogue_addr).await;
    let entry = SocketAddr::new(address, port);

    let mut flow = TcpStream::connect(entry).await.unwrap();
    still_moves(&mut flow, b"before").await;
    for (i, (what, _)) in ANSWERS.iter().enumerate().skip(1) {
        let mut client = TcpStream::connect(entry).await.unwrap();
        let _ = client.write_all(b"hello").await;
        let got = read_until_closed(&mut client).await;
        assert!(got.is_empty(), "after {what}, bytes reached the client: {got:?}");
        assert_eq!(requests.load(Ordering::SeqCst), i + 1, "the endpoint agent did not send its open request");
        still_moves(&mut flow, format!("after {what}").as_bytes()).await;
    }
    assert!(endpoint.metrics_text().contains("trellis_rejected_connections_total{role=\"endpoint\""));
    endpoint.shutdown().await;
}
