//! Relayed flows on loopback without a control plane: an endpoint agent, a
//! real relay (`trellis relay`'s listener) and an outbound-only gateway agent
//! (no tunnel listener), with certificates from a throw-away CA and configs
//! built here. The relay copies the agents' end-to-end TLS: it never sees
//! plaintext, forwards only to gateways its config serves, only from agents
//! with a CA certificate, and a bad peer closes that peer's connection only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use trellis_agent::gateway::attach::AttachSettings;
use trellis_agent::relay::{RelayIdentity, RelayServerOptions, RelaySettings, RunningRelay, start_relay_server};
use trellis_agent::relay_wire::{DialRelayError, dial_relay};
use trellis_agent::testing::{LogBuf, TestCa, echo_server, eventually, unique_loopback};
use trellis_agent::{AccessLog, AgentIdentity, DataPlaneOptions, RunningAgent, start_data_plane, tls};
use trellis_proto::relay::{Hello, RelayStatus, decode_flow, encode_accept};
use trellis_proto::{
    AgentConfig, AllowedEndpoint, ConsumerVpc, EndpointConfig, EndpointResource, GatewayResource, GatewayRole,
    GatewayTarget, PortRange, RelayConfig, RelayGateway, RelayTarget, Target, agent_server_name, relay_server_name,
};

const GW: &str = "agent-0000000000000000a";
const EP: &str = "agent-0000000000000000b";
/// A second gateway the relay serves, played by the test itself (a misbehaving one).
const ROGUE_GW: &str = "agent-0000000000000000c";
const GW_ACCT: &str = "acct-000000000001";
const GW_VPC: &str = "vpc-00000000000000001";
const VPCE: &str = "vpce-00000000000000001";
const RCFG: &str = "rcfg-00000000000000001";
const ROGUE_RCFG: &str = "rcfg-00000000000000002";
const CONSUMER_ACCT: &str = "acct-000000000002";
const CONSUMER_VPC: &str = "vpc-00000000000000002";
const R1: &str = "relay-00000000000000001";
const R2: &str = "relay-00000000000000002";

/// A TCP forwarder in front of a relay that keeps a copy of every byte, both
/// ways: what the relay receives and sends, for asserting it is ciphertext.
/// Once `silent` is set it forwards nothing more and closes nothing (new
/// connections are accepted and ignored): a relay whose host was lost.
struct Tap {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
    silent: Arc<AtomicBool>,
}

async fn tap(to: SocketAddr) -> Tap {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let silent = Arc::new(AtomicBool::new(false));
    let (seen2, silent2) = (seen.clone(), silent.clone());
    tokio::spawn(async move {
        let mut ignored = Vec::new();
        while let Ok((client, _)) = listener.accept().await {
            if silent2.load(Ordering::SeqCst) {
                ignored.push(client);
                continue;
            }
            let Ok(server) = TcpStream::connect(to).await else { continue };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(copy_recording(cr, sw, seen2.clone(), silent2.clone()));
            tokio::spawn(copy_recording(sr, cw, seen2.clone(), silent2.clone()));
        }
    });
    Tap { addr, seen, silent }
}

async fn copy_recording(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    seen: Arc<Mutex<Vec<u8>>>,
    silent: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) if silent.load(Ordering::SeqCst) => {}
            Ok(n) => {
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
                if w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    if silent.load(Ordering::SeqCst) {
        // Gone silent: hold the connection open, as a lost host would.
        std::future::pending::<()>().await;
    }
    let _ = w.shutdown().await;
}

fn relay_target(id: &str, addr: SocketAddr) -> RelayTarget {
    RelayTarget {
        relay_id: id.into(),
        address: addr.to_string(),
        zone: "z1".into(),
        server_name: relay_server_name(id),
    }
}

fn relay_config(id: &str) -> RelayConfig {
    let mut gateways = vec![
        RelayGateway { agent_id: GW.into(), account_id: GW_ACCT.into(), vpc_id: GW_VPC.into() },
        RelayGateway { agent_id: ROGUE_GW.into(), account_id: GW_ACCT.into(), vpc_id: GW_VPC.into() },
    ];
    gateways.sort();
    RelayConfig { version: 1, relay_id: id.into(), zone: "z1".into(), gateways, revoked_certs: Default::default() }
}

struct Relay {
    identity: RelayIdentity,
    running: RunningRelay,
    log: LogBuf,
    _config: watch::Sender<Arc<RelayConfig>>,
}

async fn start_relay(ca: &TestCa, id: &str, listen: SocketAddr, settings: RelaySettings) -> Relay {
    let identity = ca.issue_relay(id, "z1");
    let log = LogBuf::default();
    let (config, rx) = watch::channel(Arc::new(relay_config(id)));
    let opts = RelayServerOptions {
        listen,
        access_log: AccessLog::to_writer(Box::new(log.clone())),
        settings,
        ..RelayServerOptions::loopback()
    };
    let running = start_relay_server(opts, &identity, rx).await.unwrap();
    Relay { identity, running, log, _config: config }
}

struct Setup {
    ca: TestCa,
    relays: Vec<Relay>,
    gateway: RunningAgent,
    gateway_log: LogBuf,
    _gateway_config: watch::Sender<Arc<AgentConfig>>,
    /// `None` once [`close_tunnels`] stopped it.
    endpoint: Option<RunningAgent>,
    endpoint_log: LogBuf,
    endpoint_identity: AgentIdentity,
    _endpoint_config: watch::Sender<Arc<AgentConfig>>,
    /// The endpoint address and port clients connect to (resource GW).
    client_target: SocketAddr,
    /// The endpoint address of the resource served by the rogue gateway.
    rogue_target: SocketAddr,
    /// What the first relay's wire carried, when the endpoint reaches it through a tap.
    tapped: Option<Arc<Mutex<Vec<u8>>>>,
    /// Set to make the tap in front of the first relay go silent.
    silence: Option<Arc<AtomicBool>>,
}

/// How [`setup_opts`] differs from the plain [`setup`].
struct SetupOpts {
    /// The endpoint agent reaches the first relay through a [`Tap`].
    tapped: bool,
    /// The gateway agent's direct address as the endpoint agent knows it (none: outbound-only).
    direct: String,
    /// The endpoint agent's open timeout.
    open_timeout: Duration,
    relay: RelaySettings,
}

impl Default for SetupOpts {
    fn default() -> Self {
        Self {
            tapped: false,
            direct: String::new(),
            open_timeout: Duration::from_secs(15),
            relay: RelaySettings::default(),
        }
    }
}

/// Two relays (the first one behind a tap when `tapped`), an outbound-only
/// gateway agent attached to both, an endpoint agent reaching it through them.
async fn setup(tapped: bool) -> Setup {
    setup_opts(SetupOpts { tapped, ..SetupOpts::default() }).await
}

/// [`setup`] where the endpoint agent also knows `direct` as the gateway agent's address.
async fn setup_with(tapped: bool, direct: String) -> Setup {
    setup_opts(SetupOpts { tapped, direct, ..SetupOpts::default() }).await
}

async fn setup_opts(o: SetupOpts) -> Setup {
    let SetupOpts { tapped, direct, open_timeout, relay: relay_settings } = o;
    let ca = TestCa::new();
    let gw_id = ca.issue(GW, GW_ACCT, GW_VPC);
    let ep_id = ca.issue(EP, CONSUMER_ACCT, CONSUMER_VPC);
    let echo = echo_server().await;
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let relays = vec![start_relay(&ca, R1, any, relay_settings).await, start_relay(&ca, R2, any, relay_settings).await];
    let targets: Vec<RelayTarget> =
        relays.iter().map(|r| relay_target(r.running.relay_id(), r.running.local_addr())).collect();

    let gateway_log = LogBuf::default();
    let gateway_config = AgentConfig {
        version: 1,
        agent_id: GW.into(),
        account_id: GW_ACCT.into(),
        vpc_id: GW_VPC.into(),
        zone: "z1".into(),
        gateway: GatewayRole {
            consumers: vec![ConsumerVpc { account_id: CONSUMER_ACCT.into(), vpc_id: CONSUMER_VPC.into() }],
            resources: vec![GatewayResource {
                resource_configuration_id: RCFG.into(),
                resource_gateway_id: "rgw-00000000000000001".into(),
                owner_account_id: GW_ACCT.into(),
                target: Target::Ip { address: echo.ip() },
                port_ranges: vec![PortRange::single(echo.port()).unwrap()],
                allowed: vec![AllowedEndpoint { vpc_endpoint_id: VPCE.into(), consumer: 0 }],
                proxy_protocol: false,
                limits: None,
            }],
            ..Default::default()
        },
        relays: targets.clone(),
        ..Default::default()
    };
    let (gateway_config_tx, rx) = watch::channel(Arc::new(gateway_config));
    let opts = DataPlaneOptions {
        access_log: AccessLog::to_writer(Box::new(gateway_log.clone())),
        attach: AttachSettings {
            idle_per_relay: 2,
            backoff_max: Duration::from_millis(300),
            ..AttachSettings::default()
        },
        ..DataPlaneOptions::outbound_only()
    };
    let gateway = start_data_plane(opts, &gw_id, rx).await.unwrap();
    assert_eq!(gateway.tunnel_addr(), None, "an outbound-only agent listens for no tunnel");

    let (mut tapped_bytes, mut silence) = (None, None);
    let mut endpoint_relays = targets.clone();
    if tapped {
        let t = tap(relays[0].running.local_addr()).await;
        endpoint_relays[0].address = t.addr.to_string();
        tapped_bytes = Some(t.seen);
        silence = Some(t.silent);
    }
    let address = unique_loopback(79);
    let rogue_port = echo.port().wrapping_add(1).max(1);
    let resource = |rcfg: &str, port: u16, gateway: &str| EndpointResource {
        resource_configuration_id: rcfg.into(),
        address,
        port_ranges: vec![PortRange::single(port).unwrap()],
        dns_names: vec![],
        dns_records: vec![],
        gateways: vec![GatewayTarget {
            agent_id: gateway.into(),
            address: direct.clone(),
            zone: "z1".into(),
            server_name: agent_server_name(gateway),
            relays: endpoint_relays.clone(),
        }],
    };
    let endpoint_config = AgentConfig {
        version: 1,
        agent_id: EP.into(),
        account_id: CONSUMER_ACCT.into(),
        vpc_id: CONSUMER_VPC.into(),
        zone: "z1".into(),
        region: "local".into(),
        address_pool: "127.79.0.0/16".into(),
        endpoints: vec![EndpointConfig {
            vpc_endpoint_id: VPCE.into(),
            resources: vec![resource(RCFG, echo.port(), GW), resource(ROGUE_RCFG, rogue_port, ROGUE_GW)],
        }],
        ..Default::default()
    };
    let (endpoint_config_tx, rx) = watch::channel(Arc::new(endpoint_config));
    let endpoint_log = LogBuf::default();
    let opts = DataPlaneOptions {
        tunnel_listen: None,
        access_log: AccessLog::to_writer(Box::new(endpoint_log.clone())),
        open_timeout,
        ..DataPlaneOptions::loopback()
    };
    let endpoint = start_data_plane(opts, &ep_id, rx).await.unwrap();
    let served = endpoint.served();
    eventually("the endpoint listeners", Duration::from_secs(5), || {
        served.borrow().listeners.iter().filter(|l| l.ready).count() == 2
    })
    .await;
    for relay in &relays {
        eventually("the gateway's attachments", Duration::from_secs(5), || relay.running.attachments(GW) >= 1).await;
    }
    Setup {
        ca,
        relays,
        gateway,
        gateway_log,
        _gateway_config: gateway_config_tx,
        endpoint: Some(endpoint),
        endpoint_log,
        endpoint_identity: ep_id,
        _endpoint_config: endpoint_config_tx,
        client_target: SocketAddr::new(address, echo.port()),
        rogue_target: SocketAddr::new(address, rogue_port),
        tapped: tapped_bytes,
        silence,
    }
}

/// Stops the endpoint agent, which closes its tunnel connections: each one is
/// one relayed flow (it carries many client flows), logged when it closes.
async fn close_tunnels(s: &mut Setup) {
    if let Some(endpoint) = s.endpoint.take() {
        endpoint.shutdown().await;
    }
}

async fn stop(mut s: Setup) {
    close_tunnels(&mut s).await;
    s.gateway.shutdown().await;
    for r in s.relays {
        r.running.shutdown().await;
    }
}

/// Sends `payload`, half-closes, and reads the echo to the end.
async fn echo_round_trip(target: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut client = TcpStream::connect(target).await.unwrap();
    client.write_all(payload).await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got)).await.unwrap().unwrap();
    got
}

fn relay_connector(identity: &AgentIdentity) -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(tls::relay_client_config(&tls::tunnel_client_config(identity).unwrap()))
}

#[tokio::test]
async fn a_relayed_flow_moves_bytes_both_ways_with_half_close_and_the_relay_sees_only_ciphertext() {
    let mut s = setup(true).await;
    let marker = b"PLAINTEXT-MARKER-0123456789-must-never-reach-the-relay";
    let mut payload = Vec::new();
    for _ in 0..2000 {
        payload.extend_from_slice(marker);
    }
    let got = echo_round_trip(s.client_target, &payload).await;
    assert!(got == payload, "the echo came back changed ({} of {} bytes)", got.len(), payload.len());

    // What crossed the first relay's wire (both ways) holds no plaintext.
    let seen = s.tapped.as_ref().unwrap().lock().unwrap().clone();
    assert!(seen.len() > payload.len(), "the flow went through the tapped relay ({} bytes seen)", seen.len());
    assert!(!seen.windows(marker.len()).any(|w| w == marker), "the relay saw plaintext");

    // The gateway agent served the flow exactly as a direct one (authorized, logged, counted in plaintext).
    eventually("the gateway's access log line", Duration::from_secs(5), || !s.gateway_log.lines().is_empty()).await;
    let g = s.gateway_log.lines().pop().unwrap();
    assert_eq!(g["outcome"], "closed");
    assert_eq!(g["bytesIn"], payload.len() as u64);
    assert_eq!(g["bytesOut"], payload.len() as u64);

    close_tunnels(&mut s).await;
    eventually("the relay's access log line", Duration::from_secs(5), || {
        s.relays[0]
            .log
            .lines()
            .iter()
            .any(|l| l["gatewayAgentId"] == GW && l["bytesToGateway"].as_u64() > Some(payload.len() as u64))
    })
    .await;
    let line = s.relays[0]
        .log
        .lines()
        .into_iter()
        .find(|l| l["gatewayAgentId"] == GW && l["bytesToGateway"].as_u64() > Some(payload.len() as u64))
        .unwrap();
    assert_eq!(line["fromAgentId"], EP);
    assert_eq!(line["gatewayAgentId"], GW);
    assert_eq!(line["outcome"], "closed");
    assert!(line["bytesToGateway"].as_u64().unwrap() > payload.len() as u64, "ciphertext is counted: {line}");
    assert!(line["bytesToEndpoint"].as_u64().unwrap() > payload.len() as u64, "{line}");
    let fields: Vec<&String> = line.as_object().unwrap().keys().collect();
    for field in &fields {
        assert!(!field.to_lowercase().contains("payload") && !field.contains("data"), "no payload field: {fields:?}");
    }
    let metrics = s.relays[0].running.metrics_text();
    assert!(metrics.contains(&format!("trellis_relay_attachments{{gateway=\"{GW}\"}}")), "{metrics}");
    assert!(metrics.contains("trellis_relay_flows_total{outcome=\"closed\"}"), "{metrics}");
    assert!(metrics.contains("trellis_relay_bytes_total{direction=\"to_gateway\"}"), "{metrics}");
    stop(s).await;
}

#[tokio::test]
async fn when_a_relay_dies_new_connections_go_through_the_other_within_a_second_and_the_gateway_reattaches() {
    let mut s = setup(false).await;
    assert_eq!(echo_round_trip(s.client_target, b"before").await, b"before");
    let dead = s.relays.remove(0);
    let addr = dead.running.local_addr();
    let identity = dead.identity.clone();
    dead.running.shutdown().await;
    let killed = Instant::now();
    for i in 0..5 {
        let msg = format!("after the relay died #{i}");
        let got = tokio::time::timeout(Duration::from_secs(1), echo_round_trip(s.client_target, msg.as_bytes()))
            .await
            .unwrap_or_else(|_| panic!("connection {i} after the kill took more than a second"));
        assert_eq!(got, msg.as_bytes());
    }
    assert!(killed.elapsed() < Duration::from_secs(5));
    // The other relay is the only path left: those echoes went through it.
    // The endpoint agent's metrics say so: the dead relay marked down, why, and the path new connections took.
    let metrics = s.endpoint.as_ref().unwrap().metrics_text();
    assert!(metrics.contains(&format!("trellis_endpoint_relay_up{{relay=\"{R1}\"}} 0")), "{metrics}");
    assert!(metrics.contains(&format!("trellis_endpoint_relay_up{{relay=\"{R2}\"}} 1")), "{metrics}");
    assert!(
        metrics.contains(&format!("trellis_endpoint_relay_failures_total{{relay=\"{R1}\",reason=\"unreachable\"}}")),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("trellis_tunnel_connects_total{{path=\"relay\",relay=\"{R2}\"}}")), "{metrics}");
    assert!(!metrics.contains("trellis_tunnel_connects_total{path=\"direct\"}"), "no direct path: {metrics}");

    // The relay comes back on the same address: the gateway attaches again on its own.
    let log = LogBuf::default();
    let (config, rx) = watch::channel(Arc::new(relay_config(R1)));
    let opts = RelayServerOptions {
        listen: addr,
        access_log: AccessLog::to_writer(Box::new(log.clone())),
        ..RelayServerOptions::loopback()
    };
    let running = start_relay_server(opts, &identity, rx).await.unwrap();
    eventually("the gateway to re-attach to the restarted relay", Duration::from_secs(10), || {
        running.attachments(GW) >= 1
    })
    .await;
    s.relays.push(Relay { identity, running, log, _config: config });
    stop(s).await;
}

#[tokio::test]
async fn a_relay_refuses_unserved_gateways_unserved_attaches_and_peers_without_a_ca_certificate() {
    let s = setup(false).await;
    let relay = relay_target(R2, s.relays[1].running.local_addr());
    let ep = relay_connector(&s.endpoint_identity);
    let refused_with = |r: Result<_, DialRelayError>| match r {
        Err(DialRelayError::Refused { answer, .. }) => answer,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got ok"),
    };
    // A Connect to a gateway the relay does not serve.
    let connect = Hello::Connect { gateway_agent_id: "agent-000000000000000ff".into() };
    let answer = refused_with(dial_relay(&ep, &relay, &connect, Duration::from_secs(5)).await);
    assert_eq!(answer.status, RelayStatus::NotServed);
    assert!(answer.message.contains("agent-000000000000000ff"), "{}", answer.message);
    // An Attach from an agent that is not one of the relay's gateways.
    let answer = refused_with(dial_relay(&ep, &relay, &Hello::Attach, Duration::from_secs(5)).await);
    assert_eq!(answer.status, RelayStatus::NotServed);
    assert_eq!(s.relays[1].running.attachments(EP), 0);
    // One-way: the gateway agent cannot reach the endpoint agent through the relay.
    let gw = relay_connector(&s.ca.issue(GW, GW_ACCT, GW_VPC));
    let toward_consumer = Hello::Connect { gateway_agent_id: EP.into() };
    let answer = refused_with(dial_relay(&gw, &relay, &toward_consumer, Duration::from_secs(5)).await);
    assert_eq!(answer.status, RelayStatus::NotServed);
    // A peer whose certificate another CA signed never gets past the handshake.
    let stranger = relay_connector(&TestCa::new().issue(EP, CONSUMER_ACCT, CONSUMER_VPC));
    let connect = Hello::Connect { gateway_agent_id: GW.into() };
    match dial_relay(&stranger, &relay, &connect, Duration::from_secs(5)).await {
        Err(DialRelayError::Unreachable { reason, .. }) => assert!(!reason.is_empty()),
        Err(e) => panic!("expected a failed handshake, got {e}"),
        Ok(_) => panic!("a stranger was relayed"),
    }
    // A peer with no certificate at all: likewise.
    let anonymous = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates({
            let mut roots = rustls::RootCertStore::empty();
            roots.add(s.ca.cert()).unwrap();
            roots
        })
        .with_no_client_auth();
    let anonymous = tls::relay_client_config(&anonymous);
    match dial_relay(&tokio_rustls::TlsConnector::from(anonymous), &relay, &connect, Duration::from_secs(5)).await {
        Err(DialRelayError::Unreachable { .. }) => {}
        Err(e) => panic!("expected a failed handshake, got {e}"),
        Ok(_) => panic!("an anonymous peer was relayed"),
    }
    // A certificate the control plane revoked (a deleted agent) is refused at the handshake too.
    let mut revoked = relay_config(R2);
    revoked.version = 2;
    revoked.revoked_certs = [s.endpoint_identity.cert_sha256()].into();
    s.relays[1]._config.send_replace(Arc::new(revoked));
    let fresh = relay_connector(&s.endpoint_identity);
    match dial_relay(&fresh, &relay, &connect, Duration::from_secs(5)).await {
        Err(DialRelayError::Unreachable { .. }) => {}
        Err(e) => panic!("expected a failed handshake, got {e}"),
        Ok(_) => panic!("a revoked agent was relayed"),
    }
    s.relays[1]._config.send_replace(Arc::new(relay_config(R2)));
    let metrics = s.relays[1].running.metrics_text();
    assert!(metrics.contains("trellis_relay_refusals_total{reason=\"attach_not_served\"} 1"), "{metrics}");
    assert!(metrics.contains("trellis_relay_flows_total{outcome=\"not_served\"} 2"), "{metrics}");
    // Every refusal above left the relay serving: a real flow still goes through.
    assert_eq!(echo_round_trip(s.client_target, b"still relaying").await, b"still relaying");
    stop(s).await;
}

#[tokio::test]
async fn a_gateway_that_sends_an_open_request_on_a_relayed_flow_gets_that_flow_closed() {
    let s = setup(false).await;
    let rogue = s.ca.issue(ROGUE_GW, GW_ACCT, GW_VPC);
    let connector = relay_connector(&rogue);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::tunnel_server_config(&rogue, Arc::new(tls::AnyAgent)).unwrap());
    // The rogue gateway attaches to both relays and, on each tunnel connection, opens a flow toward the consumer.
    const ROGUE_FLOW: u32 = 7;
    let reset_seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for relay in &s.relays {
        let reset_seen = reset_seen.clone();
        let target = relay_target(relay.running.relay_id(), relay.running.local_addr());
        let (connector, acceptor) = (connector.clone(), acceptor.clone());
        tokio::spawn(async move {
            loop {
                let mut session = match dial_relay(&connector, &target, &Hello::Attach, Duration::from_secs(5)).await {
                    Ok(session) => session,
                    Err(e) => panic!("the rogue gateway could not attach: {e}"),
                };
                if session.receive(decode_flow).await.is_err() {
                    return;
                }
                let mut accept = Vec::new();
                encode_accept(&mut accept);
                session.send(&accept).await.unwrap();
                let raw = session.leave().unwrap();
                let acceptor = acceptor.clone();
                let reset_seen = reset_seen.clone();
                tokio::spawn(async move {
                    let Ok(mut inner) = acceptor.accept(raw).await else { return };
                    // Stream protocol version 2, then an OPEN of its own toward the consumer.
                    let mut frames = trellis_proto::mux::PREFACE.to_vec();
                    let req = trellis_proto::stream::OpenRequest {
                        vpc_endpoint_id: "vpce-0000000000000000f".into(),
                        resource_configuration_id: "rcfg-0000000000000000f".into(),
                        port: 22,
                        client_addr: "10.0.0.1:1".parse().unwrap(),
                    };
                    trellis_proto::mux::encode_open(ROGUE_FLOW, &req, &mut frames).unwrap();
                    let _ = inner.write_all(&frames).await;
                    let _ = inner.flush().await;
                    // Read the endpoint's frames (after its preface) until it resets that flow, then hang up.
                    let mut buf = vec![0u8; trellis_proto::mux::PREFACE.len()];
                    if inner.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    let mut header = [0u8; trellis_proto::mux::FRAME_HEADER_LEN];
                    while inner.read_exact(&mut header).await.is_ok() {
                        let Some(h) = trellis_proto::mux::decode_header(&header) else { return };
                        let mut body = vec![0u8; h.len as usize];
                        if inner.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        if h.kind == trellis_proto::mux::RESET && h.flow == ROGUE_FLOW {
                            reset_seen.store(true, std::sync::atomic::Ordering::SeqCst);
                            return;
                        }
                    }
                });
            }
        });
    }
    for relay in &s.relays {
        eventually("the rogue gateway's attachments", Duration::from_secs(5), || {
            relay.running.attachments(ROGUE_GW) >= 1
        })
        .await;
    }
    let mut client = TcpStream::connect(s.rogue_target).await.unwrap();
    client.write_all(b"hello").await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got)).await.unwrap();
    assert!(read.is_err() || got.is_empty(), "the client must get nothing from a gateway that broke the protocol");
    eventually("the endpoint's access log line", Duration::from_secs(5), || {
        s.endpoint_log.lines().iter().any(|l| l["resourceConfigurationId"] == ROGUE_RCFG)
    })
    .await;
    let line = s.endpoint_log.lines().into_iter().find(|l| l["resourceConfigurationId"] == ROGUE_RCFG).unwrap();
    assert_ne!(line["outcome"], "closed", "{line}");
    assert!(reset_seen.load(std::sync::atomic::Ordering::SeqCst), "the endpoint agent reset the gateway's own OPEN");
    // The honest gateway's flows are unaffected.
    assert_eq!(echo_round_trip(s.client_target, b"honest").await, b"honest");
    stop(s).await;
}

#[tokio::test]
async fn a_malformed_or_oversized_hello_closes_that_connection_only() {
    let s = setup(false).await;
    // A long-lived flow through the relays.
    let mut flow = TcpStream::connect(s.client_target).await.unwrap();
    flow.write_all(b"ping-1").await.unwrap();
    let mut buf = [0u8; 6];
    flow.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping-1");

    let relay = &s.relays[0].running;
    let connector = relay_connector(&s.endpoint_identity);
    let name = rustls::pki_types::ServerName::try_from(relay_server_name(R1)).unwrap();
    for bad in [
        b"TRRL\x01\x02\xff\xff".to_vec(),       // oversized body
        b"TRRL\x01\x02\x00\x03\x09ab".to_vec(), // malformed id
        b"TRLS\x01\x01\x00\x00".to_vec(),       // the stream protocol, not the relay's
        vec![0u8; 2000],                        // garbage
    ] {
        let tcp = TcpStream::connect(relay.local_addr()).await.unwrap();
        let mut tls = connector.connect(name.clone(), tcp).await.unwrap();
        tls.write_all(&bad).await.unwrap();
        tls.flush().await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await.unwrap();
        let decoded = trellis_proto::relay::decode_answer(&answer).unwrap().unwrap().0;
        assert_eq!(decoded.status, RelayStatus::BadRequest, "{bad:?}");
    }
    // Bytes that are not TLS at all.
    let mut raw = TcpStream::connect(relay.local_addr()).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut rest)).await.unwrap();
    let metrics = relay.metrics_text();
    assert!(metrics.contains("trellis_relay_refusals_total{reason=\"bad_hello\"} 4"), "{metrics}");

    // The established flow and new ones still work.
    flow.write_all(b"ping-2").await.unwrap();
    flow.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping-2");
    flow.shutdown().await.unwrap();
    let mut rest = Vec::new();
    flow.read_to_end(&mut rest).await.unwrap();
    assert_eq!(echo_round_trip(s.client_target, b"new flow").await, b"new flow");
    stop(s).await;
}

#[tokio::test]
async fn a_gateway_agent_whose_direct_address_does_not_answer_is_reached_through_its_relays() {
    // An address nothing listens on: what an endpoint agent sees of a gateway behind a firewall.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut s = setup_with(false, closed.to_string()).await;
    for _ in 0..3 {
        assert_eq!(echo_round_trip(s.client_target, b"around the firewall").await, b"around the firewall");
    }
    close_tunnels(&mut s).await;
    eventually("the relay's access log line", Duration::from_secs(5), || {
        s.relays.iter().any(|r| r.log.lines().iter().any(|l| l["outcome"] == "closed"))
    })
    .await;
    stop(s).await;
}

#[tokio::test]
async fn when_a_relay_goes_silent_new_connections_go_through_the_other_right_after_the_first_timeout() {
    let open_timeout = Duration::from_secs(3);
    let s = setup_opts(SetupOpts { tapped: true, open_timeout, ..SetupOpts::default() }).await;
    assert_eq!(echo_round_trip(s.client_target, b"before").await, b"before");
    // The pool's tunnel connections all went through the first relay (first in the order, up).
    eventually("the warm tunnel connections through the first relay", Duration::from_secs(5), || {
        s.relays[0].running.active_flows() >= 2
    })
    .await;
    assert_eq!(s.relays[1].running.active_flows(), 0);

    // The first relay's host is lost: no byte through it any more, no close, no reset.
    s.silence.as_ref().unwrap().store(true, Ordering::SeqCst);
    let first = Instant::now();
    let mut client = TcpStream::connect(s.client_target).await.unwrap();
    client.write_all(b"into the void").await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut got)).await.unwrap();
    assert!(read.is_err() || got.is_empty(), "nothing can answer through a silent relay");
    assert!(first.elapsed() >= open_timeout, "the first flow waits for its open timeout");

    // From then on, new connections go through the second relay at once: the
    // silent relay's path is down, not only the gateway agent, so no one waits
    // for a connect timeout (5 s) there.
    for i in 0..5 {
        let msg = format!("through the other relay #{i}");
        let started = Instant::now();
        let got = tokio::time::timeout(Duration::from_secs(3), echo_round_trip(s.client_target, msg.as_bytes()))
            .await
            .unwrap_or_else(|_| panic!("connection {i} after the first timeout took more than 3 s"));
        assert_eq!(got, msg.as_bytes());
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    assert!(s.relays[1].running.active_flows() >= 1, "the second relay carries the tunnel connections now");
    stop(s).await;
}

#[tokio::test]
async fn an_agent_over_its_cap_at_a_relay_is_refused_busy_while_another_agent_still_connects() {
    let relay = RelaySettings { flows_per_peer: 2, connects_per_peer: 1, ..RelaySettings::default() };
    let s = setup_opts(SetupOpts { relay, ..SetupOpts::default() }).await;
    let target = relay_target(R2, s.relays[1].running.local_addr());
    let connect = Hello::Connect { gateway_agent_id: GW.into() };
    // An enrolled agent of another account pairs with the gateway agent and never sends a ClientHello.
    let greedy = relay_connector(&s.ca.issue("agent-0000000000000000d", "acct-000000000009", "vpc-00000000000000009"));
    let mut held = Vec::new();
    for _ in 0..2 {
        eventually("an idle attachment", Duration::from_secs(5), || s.relays[1].running.attachments(GW) >= 1).await;
        held.push(dial_relay(&greedy, &target, &connect, Duration::from_secs(5)).await.unwrap().leave().unwrap());
    }
    eventually("an idle attachment", Duration::from_secs(5), || s.relays[1].running.attachments(GW) >= 1).await;
    let started = Instant::now();
    match dial_relay(&greedy, &target, &connect, Duration::from_secs(5)).await {
        Err(DialRelayError::Refused { answer, .. }) => {
            assert_eq!(answer.status, RelayStatus::Busy);
            assert!(answer.message.contains("flows_per_peer"), "{}", answer.message);
            assert!(answer.message.contains("agent-0000000000000000d"), "{}", answer.message);
        }
        Err(e) => panic!("expected busy, got {e}"),
        Ok(_) => panic!("an agent over its cap was relayed"),
    }
    assert!(started.elapsed() < Duration::from_secs(2), "refused at once");
    // Another agent still gets through the same relay to the same gateway agent.
    let other = relay_connector(&s.ca.issue("agent-0000000000000000e", CONSUMER_ACCT, CONSUMER_VPC));
    dial_relay(&other, &target, &connect, Duration::from_secs(5)).await.unwrap();
    let metrics = s.relays[1].running.metrics_text();
    assert!(metrics.contains("trellis_relay_refusals_total{reason=\"peer_flows\"} 1"), "{metrics}");
    drop(held);
    stop(s).await;
}

#[tokio::test]
async fn a_connect_to_a_gateway_with_no_attachment_at_the_relay_is_answered_unavailable_at_once() {
    // A long wait for attachments: only a gateway whose attachments are all busy is waited for.
    let relay = RelaySettings { connect_wait: Duration::from_secs(10), ..RelaySettings::default() };
    let s = setup_opts(SetupOpts { relay, ..SetupOpts::default() }).await;
    let target = relay_target(R2, s.relays[1].running.local_addr());
    let ep = relay_connector(&s.endpoint_identity);
    // The relay serves ROGUE_GW, which never attached.
    let connect = Hello::Connect { gateway_agent_id: ROGUE_GW.into() };
    let started = Instant::now();
    match dial_relay(&ep, &target, &connect, Duration::from_secs(20)).await {
        Err(DialRelayError::Refused { answer, .. }) => assert_eq!(answer.status, RelayStatus::Unavailable),
        Err(e) => panic!("expected unavailable, got {e}"),
        Ok(_) => panic!("relayed to a gateway that is not attached"),
    }
    assert!(started.elapsed() < Duration::from_secs(3), "answered after {:?}", started.elapsed());
    // A gateway that is attached is still relayed.
    let connect = Hello::Connect { gateway_agent_id: GW.into() };
    dial_relay(&ep, &target, &connect, Duration::from_secs(5)).await.unwrap();
    stop(s).await;
}

#[tokio::test]
async fn a_relay_that_breaks_the_protocol_on_an_attachment_is_reattached_to_with_backoff() {
    let ca = TestCa::new();
    let identity = ca.issue_relay(R1, "z1");
    let config =
        tls::relay_server_config(&identity.ca, &identity.cert, &identity.key, Arc::new(tls::AnyAgent)).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // A "relay" that accepts every attach, then sends a record that is no relay frame.
    let attaches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = attaches.clone();
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, counter) = (acceptor.clone(), counter.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut hello = [0u8; 64];
                if !matches!(tls.read(&mut hello).await, Ok(1..)) {
                    return;
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let mut ok = Vec::new();
                trellis_proto::relay::encode_answer(&trellis_proto::relay::Answer::new(RelayStatus::Ok, ""), &mut ok);
                // Two flushes: two TLS records, so the answer arrives alone and the garbage after it.
                if tls.write_all(&ok).await.is_err() || tls.flush().await.is_err() {
                    return;
                }
                let _ = tls.write_all(b"NOT A RELAY FRAME, NOT AT ALL").await;
                let _ = tls.flush().await;
                let mut rest = Vec::new();
                let _ = tls.read_to_end(&mut rest).await;
            });
        }
    });
    let gw_id = ca.issue(GW, GW_ACCT, GW_VPC);
    let config = AgentConfig {
        version: 1,
        agent_id: GW.into(),
        account_id: GW_ACCT.into(),
        vpc_id: GW_VPC.into(),
        zone: "z1".into(),
        relays: vec![relay_target(R1, addr)],
        ..Default::default()
    };
    let (_config, rx) = watch::channel(Arc::new(config));
    let opts = DataPlaneOptions {
        attach: AttachSettings {
            idle_per_relay: 1,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_millis(300),
            ..AttachSettings::default()
        },
        ..DataPlaneOptions::outbound_only()
    };
    let gateway = start_data_plane(opts, &gw_id, rx).await.unwrap();
    eventually("the first attach", Duration::from_secs(5), || attaches.load(Ordering::SeqCst) >= 1).await;
    let from = attaches.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // At least 100 ms between attaches (the backoff restarts at its minimum after each
    // successful attach): about 20 in 2 s, where a tight loop makes hundreds.
    let during = attaches.load(Ordering::SeqCst) - from;
    assert!(during <= 30, "{during} attaches in 2 s to a relay that breaks the protocol");
    assert!(during >= 2, "the worker keeps reattaching ({during})");
    gateway.shutdown().await;
    server.abort();
}

/// A deleted relay's certificate in the agents' configs (`revokedRelayCerts`):
/// the gateway agent drops its attachments there and the tunnel connections it
/// serves through it, and attaches no more; the endpoint agent no longer asks
/// it for anything (it never sends it a `Connect`), and flows go through the other relay.
#[tokio::test]
async fn a_relay_whose_certificate_the_config_revokes_loses_its_attachments_and_flows_and_is_not_asked_again() {
    let s = setup(false).await;
    let mut client = TcpStream::connect(s.client_target).await.unwrap();
    client.write_all(b"before").await.unwrap();
    let mut got = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(&got, b"before");
    let r1 = &s.relays[0].running;
    assert!(r1.active_flows() >= 1, "the flow went through the first relay, the first in the config's order");
    let unavailable = |metrics: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("trellis_relay_flows_total{outcome=\"unavailable\"}"))
            .map_or(0, |l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
    };
    let asked_before = unavailable(&r1.metrics_text());

    let revoked = tls::cert_sha256(&s.relays[0].identity.cert);
    for config in [&s._gateway_config, &s._endpoint_config] {
        let mut next = (**config.borrow()).clone();
        next.version = 2;
        next.revoked_relay_certs = vec![revoked.clone()];
        config.send_replace(Arc::new(next));
    }
    eventually("the gateway to drop its attachments and flows at the revoked relay", Duration::from_secs(5), || {
        r1.attachments(GW) == 0 && r1.active_flows() == 0
    })
    .await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the client flow through the revoked relay was closed");
    let served = s.endpoint.as_ref().unwrap().served();
    eventually("the endpoint agent's new config", Duration::from_secs(5), || served.borrow().config_version == 2).await;

    for i in 0..5 {
        let msg = format!("after the revocation #{i}");
        assert_eq!(echo_round_trip(s.client_target, msg.as_bytes()).await, msg.as_bytes());
    }
    assert!(s.relays[1].running.attachments(GW) >= 1);
    assert_eq!(r1.attachments(GW), 0, "the gateway agent did not attach to the revoked relay again");
    assert_eq!(
        unavailable(&r1.metrics_text()),
        asked_before,
        "the endpoint agent sent no Connect to the revoked relay (it would be answered unavailable there)"
    );
    let metrics = s.endpoint.as_ref().unwrap().metrics_text();
    assert!(
        metrics.contains(&format!(
            "trellis_endpoint_relay_failures_total{{relay=\"{R1}\",reason=\"revoked_certificate\"}}"
        )),
        "{metrics}"
    );
    stop(s).await;
}
