//! How an endpoint agent chooses among the gateway agents of a resource, on
//! loopback without a control plane: flows spread over the gateways of its
//! zone; a gateway that does not answer costs one timeout, not one per
//! connection, and is skipped until a background probe finds it back; when
//! every gateway is marked down they are all tried at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use trellis_agent::testing::{LogBuf, TestCa, echo_server, eventually, unique_loopback};
use trellis_agent::{AccessLog, AgentIdentity, DataPlaneOptions, PoolSettings, RunningAgent, start_data_plane};
use trellis_proto::{
    AgentConfig, AllowedEndpoint, ConsumerVpc, EndpointConfig, EndpointResource, GatewayResource, GatewayRole,
    GatewayTarget, PortRange, Target, agent_server_name,
};

const GW_A: &str = "agent-0000000000000000a";
const GW_B: &str = "agent-0000000000000000c";
const EP: &str = "agent-0000000000000000b";
const VPCE: &str = "vpce-00000000000000001";
const RCFG: &str = "rcfg-00000000000000001";
const CONSUMER_ACCT: &str = "acct-000000000002";
const CONSUMER_VPC: &str = "vpc-00000000000000002";
/// The endpoint's connect (TCP + TLS) timeout in these tests.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

/// A gateway agent data plane serving the echo target to the consumer's endpoint.
async fn gateway(ca: &TestCa, id: &str, consumer: &AgentIdentity, echo: SocketAddr, listen: SocketAddr) -> Gateway {
    let identity = ca.issue(id, "acct-000000000001", "vpc-00000000000000001");
    let config = AgentConfig {
        version: 1,
        agent_id: id.into(),
        zone: "z1".into(),
        gateway: GatewayRole {
            consumers: vec![ConsumerVpc { account_id: consumer.account_id.clone(), vpc_id: consumer.vpc_id.clone() }],
            resources: vec![GatewayResource {
                resource_configuration_id: RCFG.into(),
                resource_gateway_id: "rgw-00000000000000001".into(),
                owner_account_id: "acct-000000000001".into(),
                target: Target::Ip { address: echo.ip() },
                port_ranges: vec![PortRange::single(echo.port()).unwrap()],
                allowed: vec![AllowedEndpoint { vpc_endpoint_id: VPCE.into(), consumer: 0 }],
                proxy_protocol: false,
                limits: None,
            }],
            ..Default::default()
        },
        ..Default::default()
    };
    let (_config, rx) = watch::channel(Arc::new(config));
    let log = LogBuf::default();
    let opts = DataPlaneOptions {
        tunnel_listen: Some(listen),
        access_log: AccessLog::to_writer(Box::new(log.clone())),
        ..DataPlaneOptions::loopback()
    };
    let agent = start_data_plane(opts, &identity, rx).await.unwrap();
    Gateway { agent, log, _config }
}

struct Gateway {
    agent: RunningAgent,
    log: LogBuf,
    _config: watch::Sender<Arc<AgentConfig>>,
}

impl Gateway {
    /// Flows this gateway proxied (its access-log lines).
    fn flows(&self) -> usize {
        self.log.lines().iter().filter(|l| l["role"] == "gateway" && l["outcome"] == "closed").count()
    }
}

fn target(id: &str, address: SocketAddr, zone: &str) -> GatewayTarget {
    GatewayTarget {
        agent_id: id.into(),
        address: address.to_string(),
        zone: zone.into(),
        server_name: agent_server_name(id),
        relays: vec![],
    }
}

struct Endpoint {
    agent: RunningAgent,
    log: LogBuf,
    _config: watch::Sender<Arc<AgentConfig>>,
    client_target: SocketAddr,
}

/// An endpoint-only agent whose endpoint reaches `echo` through `gateways`;
/// a gateway marked down is first probed after `probe_first`.
async fn endpoint(
    identity: &AgentIdentity,
    echo: SocketAddr,
    gateways: Vec<GatewayTarget>,
    probe_first: Duration,
) -> Endpoint {
    let address = unique_loopback(78);
    let config = AgentConfig {
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
                port_ranges: vec![PortRange::single(echo.port()).unwrap()],
                dns_names: vec![],
                dns_records: vec![],
                gateways,
            }],
        }],
        ..Default::default()
    };
    let (_config, rx) = watch::channel(Arc::new(config));
    let log = LogBuf::default();
    let opts = DataPlaneOptions {
        tunnel_listen: None,
        access_log: AccessLog::to_writer(Box::new(log.clone())),
        pool: PoolSettings {
            connect_timeout: CONNECT_TIMEOUT,
            probe_first,
            probe_max: probe_first.max(Duration::from_secs(1)),
            ..PoolSettings::default()
        },
        open_timeout: Duration::from_secs(3),
        ..DataPlaneOptions::loopback()
    };
    let agent = start_data_plane(opts, identity, rx).await.unwrap();
    let served = agent.served();
    eventually("the endpoint listener", Duration::from_secs(5), || served.borrow().listeners.iter().any(|l| l.ready))
        .await;
    Endpoint { agent, log, _config, client_target: SocketAddr::new(address, echo.port()) }
}

impl Endpoint {
    /// One echo round trip through the endpoint.
    async fn echo(&self, payload: &[u8]) -> Result<(), String> {
        let mut s = TcpStream::connect(self.client_target).await.map_err(|e| format!("connect: {e}"))?;
        s.write_all(payload).await.map_err(|e| format!("write: {e}"))?;
        s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut back))
            .await
            .map_err(|_| "no answer within 20 s".to_string())?
            .map_err(|e| format!("read: {e}"))?;
        if back != payload {
            return Err(format!("echo came back as {} bytes", back.len()));
        }
        Ok(())
    }

    /// A sample of the endpoint's metrics, e.g. `trellis_gateway_up` of `gateway`.
    fn metric(&self, name: &str, gateway: &str) -> Option<f64> {
        let text = self.agent.metrics_text();
        let needle = format!("gateway=\"{gateway}\"");
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&needle))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }
}

/// A listener that never accepts: TCP connects complete in the kernel's
/// backlog, but no TLS handshake is ever answered (a silently dropping gateway).
async fn silent_listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind(SocketAddr::new(unique_loopback(78), 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// An address where nothing listens (connects are refused at once).
async fn refusing_address() -> SocketAddr {
    TcpListener::bind(SocketAddr::new(unique_loopback(78), 0)).await.unwrap().local_addr().unwrap()
}

#[tokio::test]
async fn flows_spread_over_the_gateways_of_the_own_zone() {
    let ca = TestCa::new();
    let ep_id = ca.issue(EP, CONSUMER_ACCT, CONSUMER_VPC);
    let echo = echo_server().await;
    let a = gateway(&ca, GW_A, &ep_id, echo, "127.0.0.1:0".parse().unwrap()).await;
    let b = gateway(&ca, GW_B, &ep_id, echo, "127.0.0.1:0".parse().unwrap()).await;
    let gateways =
        vec![target(GW_A, a.agent.tunnel_addr().unwrap(), "z1"), target(GW_B, b.agent.tunnel_addr().unwrap(), "z1")];
    let ep = endpoint(&ep_id, echo, gateways, Duration::from_millis(200)).await;
    for i in 0..10 {
        ep.echo(format!("flow {i}").as_bytes()).await.unwrap_or_else(|e| panic!("flow {i}: {e}"));
    }
    eventually("both gateways to log their flows", Duration::from_secs(5), || a.flows() + b.flows() == 10).await;
    let (on_a, on_b) = (a.flows(), b.flows());
    assert!(on_a >= 3 && on_b >= 3, "10 flows were not spread over both gateways of the zone: {on_a} and {on_b}");
    eventually("the endpoint to log its flows", Duration::from_secs(5), || ep.log.lines().len() == 10).await;
    assert!(ep.log.lines().iter().all(|l| l.get("tried").is_none()), "no flow needed to fail over");
    ep.agent.shutdown().await;
    a.agent.shutdown().await;
    b.agent.shutdown().await;
}

#[tokio::test]
async fn a_silent_gateway_costs_one_timeout_not_one_per_connection() {
    let ca = TestCa::new();
    let ep_id = ca.issue(EP, CONSUMER_ACCT, CONSUMER_VPC);
    let echo = echo_server().await;
    let (_silent, silent_addr) = silent_listener().await;
    let b = gateway(&ca, GW_B, &ep_id, echo, "127.0.0.1:0".parse().unwrap()).await;
    let gateways = vec![target(GW_A, silent_addr, "z1"), target(GW_B, b.agent.tunnel_addr().unwrap(), "z1")];
    let ep = endpoint(&ep_id, echo, gateways, Duration::from_millis(200)).await;

    const FLOWS: usize = 10;
    let started = Instant::now();
    for i in 0..FLOWS {
        ep.echo(format!("flow {i}").as_bytes()).await.unwrap_or_else(|e| panic!("flow {i}: {e}"));
    }
    let took = started.elapsed();
    // Spread alone would send every other flow to the silent gateway first:
    // five timeouts. The memory pays at most one (or none, when the warm pool
    // found it silent first).
    assert!(
        took < CONNECT_TIMEOUT * 2,
        "{FLOWS} flows took {took:?}: more than one connect timeout ({CONNECT_TIMEOUT:?}) was paid"
    );
    eventually("the gateway to log every flow", Duration::from_secs(5), || b.flows() == FLOWS).await;
    assert_eq!(ep.metric("trellis_gateway_up", GW_A), Some(0.0), "{}", ep.agent.metrics_text());
    assert_eq!(ep.metric("trellis_gateway_up", GW_B), Some(1.0));
    let skipped = ep.metric("trellis_gateway_skipped_total", GW_A).unwrap_or(0.0);
    assert!(skipped >= (FLOWS - 1) as f64, "only {skipped} flows skipped the silent gateway");
    // A flow that paid the timeout says so in its access-log line.
    eventually("the endpoint to log every flow", Duration::from_secs(5), || ep.log.lines().len() == FLOWS).await;
    let failed_over: Vec<serde_json::Value> = ep.log.lines().into_iter().filter(|l| l.get("tried").is_some()).collect();
    assert!(failed_over.len() <= 1, "{failed_over:?}");
    for line in &failed_over {
        let tried = line["tried"][0].as_str().unwrap_or_default();
        assert!(tried.starts_with(&format!("tried {GW_A} ({silent_addr}): ")), "{line}");
        assert!(tried.contains("timed out"), "{line}");
        assert_eq!(line["outcome"], "closed", "{line}");
    }
    ep.agent.shutdown().await;
    b.agent.shutdown().await;
}

#[tokio::test]
async fn a_gateway_that_comes_back_is_found_by_the_probe_and_takes_flows_again() {
    let ca = TestCa::new();
    let ep_id = ca.issue(EP, CONSUMER_ACCT, CONSUMER_VPC);
    let echo = echo_server().await;
    // A's address refuses connections until a gateway agent starts on it.
    let a_addr = refusing_address().await;
    let b = gateway(&ca, GW_B, &ep_id, echo, "127.0.0.1:0".parse().unwrap()).await;
    let gateways = vec![target(GW_A, a_addr, "z1"), target(GW_B, b.agent.tunnel_addr().unwrap(), "z1")];
    let ep = endpoint(&ep_id, echo, gateways, Duration::from_millis(200)).await;
    for i in 0..4 {
        ep.echo(format!("flow {i}").as_bytes()).await.unwrap_or_else(|e| panic!("flow {i}: {e}"));
    }
    assert_eq!(ep.metric("trellis_gateway_up", GW_A), Some(0.0));

    let a = gateway(&ca, GW_A, &ep_id, echo, a_addr).await;
    eventually("the probe to find the gateway back", Duration::from_secs(5), || {
        ep.metric("trellis_gateway_up", GW_A) == Some(1.0)
    })
    .await;
    for i in 0..6 {
        ep.echo(format!("again {i}").as_bytes()).await.unwrap_or_else(|e| panic!("flow {i} after recovery: {e}"));
    }
    eventually("the recovered gateway to take flows again", Duration::from_secs(5), || a.flows() >= 2).await;
    ep.agent.shutdown().await;
    a.agent.shutdown().await;
    b.agent.shutdown().await;
}

#[tokio::test]
async fn when_every_gateway_is_down_they_are_tried_at_once_and_the_error_says_so() {
    let ca = TestCa::new();
    let ep_id = ca.issue(EP, CONSUMER_ACCT, CONSUMER_VPC);
    let echo = echo_server().await;
    let (a_addr, b_addr) = (refusing_address().await, refusing_address().await);
    let gateways = vec![target(GW_A, a_addr, "z1"), target(GW_B, b_addr, "z2")];
    // Probes wait a minute here: only the flows themselves can find a gateway back.
    let ep = endpoint(&ep_id, echo, gateways, Duration::from_secs(60)).await;

    // The first flow finds both refusing and marks them down; the next one tries both at once.
    assert!(ep.echo(b"first").await.is_err());
    assert!(ep.echo(b"second").await.is_err());
    // Lines are written by the log's own thread, within moments.
    eventually("an access-log line per refused flow", Duration::from_secs(5), || ep.log.lines().len() >= 2).await;
    let lines = ep.log.lines();
    let last = lines.last().expect("an access-log line per refused flow");
    assert_eq!(last["outcome"], "unreachable", "{last}");
    let message = last["message"].as_str().unwrap_or_default();
    assert!(message.contains("every gateway agent of this resource was marked down"), "{message}");
    assert!(message.contains("tried all 2 at once"), "{message}");
    assert!(message.contains(GW_A) && message.contains(GW_B), "{message}");

    // A gateway that is back serves the very next flow, long before its probe:
    // the memory never turns a recovered network into an outage.
    let b = gateway(&ca, GW_B, &ep_id, echo, b_addr).await;
    let started = Instant::now();
    ep.echo(b"recovered").await.expect("a flow through the gateway that came back");
    assert!(started.elapsed() < CONNECT_TIMEOUT, "the flow waited for the refusing gateway");
    assert_eq!(ep.metric("trellis_gateway_up", GW_B), Some(1.0));
    ep.agent.shutdown().await;
    b.agent.shutdown().await;
}
