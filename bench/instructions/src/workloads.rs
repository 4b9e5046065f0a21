//! The hot paths, one workload each. A workload sets up what it needs, then
//! calls [`measured`] exactly once around the part whose instructions count,
//! on the main thread (callgrind counts per thread: everything measured runs
//! on a current-thread runtime, so the agents' tasks are counted too).
//!
//! They reach the agent through few, narrow public entry points
//! (`testing::copy_both_ways`, the tunnel's frame encoders and decoders in
//! `trellis_proto::mux`, `trellis_agent::mux`'s connection and its driver,
//! `gateway::authorize::authorize`, `start_data_plane`), so a redesign of the
//! transport behind them needs a re-bless of the baseline, not a new harness.

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use trellis_agent::gateway::authorize::authorize;
use trellis_agent::mux::{MuxConnection, MuxStream, Side};
use trellis_agent::testing::{TestCa, copy_both_ways};
use trellis_agent::tls::PeerIdentity;
use trellis_agent::{DataPlaneOptions, GatewayTimeouts, PoolSettings, start_data_plane};
use trellis_proto::mux::{self as frames, Control, FRAME_HEADER_LEN};
use trellis_proto::stream::{OpenRequest, OpenResponse, OpenStatus};
use trellis_proto::{
    AgentConfig, AllowedEndpoint, ConsumerVpc, EndpointConfig, EndpointResource, GatewayResource, GatewayRole,
    GatewayTarget, PortRange, Target, agent_server_name,
};

use crate::Res;

/// One hot path.
pub struct Workload {
    pub name: &'static str,
    /// What one run does, for the report and the baseline file.
    pub what: &'static str,
    pub run: fn() -> Res<()>,
}

/// Every path, in the order they are run and reported.
pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "copy",
        what: "the copy loop, bulk: 16 MiB spliced between two in-memory stream pairs in 64 KiB writes, one direction, then both closed",
        run: copy,
    },
    Workload {
        name: "copy-rr",
        what: "the copy loop, small messages: 10,000 round trips of 64 bytes spliced between two in-memory stream pairs",
        run: copy_round_trips,
    },
    Workload {
        name: "framing",
        what: "10,000 times: the tunnel frames of one flow (stream protocol version 2), each encoded and decoded: OPEN, OPEN_RESPONSE, a DATA header, WINDOW, FIN",
        run: framing,
    },
    Workload {
        name: "mux",
        what: "the multiplexed tunnel without TLS: two flows between an endpoint and a gateway mux connection over an in-memory stream, opened, 8 MiB each way on each (16 MiB each way in all, 64 KiB writes), closed",
        run: mux,
    },
    Workload {
        name: "authorize",
        what: "1,000 open requests authorized against a gateway config with 5,000 consumer VPCs and 5,000 allowed endpoints on 50 resources",
        run: authorize_many,
    },
    Workload {
        name: "connect",
        what: "200 connections one after another through a real endpoint agent and gateway agent over loopback TLS (warm tunnels): connect, half-close, the target's answer (a count of 0), close",
        run: connect,
    },
    Workload {
        name: "proxy",
        what: "one 1 MiB upload through a real endpoint agent and gateway agent over loopback TLS (a pooled tunnel), from connect to the target's answer",
        run: proxy,
    },
];

/// Callgrind collects only inside this function (`--toggle-collect`). Not
/// inlined, and not a tail call (the `black_box` after the call), so
/// callgrind sees it entered and left.
#[inline(never)]
pub fn measured(f: &mut dyn FnMut()) {
    f();
    black_box(());
}

fn runtime() -> Res<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a tokio runtime: {e}"))
}

fn copy() -> Res<()> {
    const TOTAL: usize = 16 << 20;
    const CHUNK: usize = 64 << 10;
    let rt = runtime()?;
    let chunk = vec![0x5au8; CHUNK];
    let mut sink = vec![0u8; CHUNK];
    let mut outcome = Err("not run".to_string());
    measured(&mut || {
        outcome = rt.block_on(async {
            let (mut client, a) = tokio::io::duplex(CHUNK);
            let (b, mut server) = tokio::io::duplex(CHUNK);
            let send = async {
                for _ in 0..TOTAL / CHUNK {
                    client.write_all(&chunk).await?;
                }
                client.shutdown().await?;
                // The far side closes after it read everything: the copy loop passes that on.
                let mut rest = Vec::new();
                client.read_to_end(&mut rest).await?;
                Ok::<_, std::io::Error>(rest.len())
            };
            let receive = async {
                let mut got = 0usize;
                loop {
                    match server.read(&mut sink).await? {
                        0 => break,
                        n => got += n,
                    }
                }
                server.shutdown().await?;
                Ok::<_, std::io::Error>(got)
            };
            let (moved, back, received) = tokio::join!(copy_both_ways(a, b), send, receive);
            let (up, down) = moved.map_err(|e| format!("copy loop: {e}"))?;
            let back = back.map_err(|e| format!("client side: {e}"))?;
            let received = received.map_err(|e| format!("far side: {e}"))?;
            if up != TOTAL as u64 || down != 0 || received != TOTAL || back != 0 {
                return Err(format!("the copy loop moved {up} / {down} bytes, the far side got {received}"));
            }
            Ok(())
        });
    });
    outcome
}

fn copy_round_trips() -> Res<()> {
    const ROUND_TRIPS: usize = 10_000;
    const SIZE: usize = 64;
    let rt = runtime()?;
    let mut outcome = Err("not run".to_string());
    measured(&mut || {
        outcome = rt.block_on(async {
            let (mut client, a) = tokio::io::duplex(64 << 10);
            let (b, mut server) = tokio::io::duplex(64 << 10);
            let client_side = async {
                let (request, mut answer) = ([0x11u8; SIZE], [0u8; SIZE]);
                for _ in 0..ROUND_TRIPS {
                    client.write_all(&request).await?;
                    client.read_exact(&mut answer).await?;
                }
                client.shutdown().await?;
                client.read(&mut answer).await
            };
            let server_side = async {
                let mut buf = [0u8; SIZE];
                let mut answered = 0usize;
                while server.read_exact(&mut buf).await.is_ok() {
                    server.write_all(&buf).await?;
                    answered += 1;
                }
                server.shutdown().await?;
                Ok::<_, std::io::Error>(answered)
            };
            let (moved, last, answered) = tokio::join!(copy_both_ways(a, b), client_side, server_side);
            let (up, down) = moved.map_err(|e| format!("copy loop: {e}"))?;
            let last = last.map_err(|e| format!("client side: {e}"))?;
            let answered = answered.map_err(|e| format!("far side: {e}"))?;
            let want = (ROUND_TRIPS * SIZE) as u64;
            if up != want || down != want || answered != ROUND_TRIPS || last != 0 {
                return Err(format!("the copy loop moved {up} / {down} bytes, {answered} round trips answered"));
            }
            Ok(())
        });
    });
    outcome
}

/// Decodes the frame at the start of `buf`: its header and, for a control frame, its meaning.
fn decode_frame(buf: &[u8]) -> Res<(frames::Header, Option<Control>)> {
    let h = frames::decode_header(buf).ok_or("a frame shorter than its header")?;
    if h.oversized() {
        return Err(format!("an oversized frame: {h:?}"));
    }
    if h.kind == frames::DATA {
        return Ok((h, None));
    }
    let body = buf.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + h.len as usize).ok_or("a frame shorter than its body")?;
    let control = frames::parse_control(h.kind, body).map_err(|e| format!("frame {h:?}: {e}"))?;
    Ok((h, Some(control)))
}

fn framing() -> Res<()> {
    const N: usize = 10_000;
    let req = OpenRequest {
        vpc_endpoint_id: "vpce-0123456789abcdef0".into(),
        resource_configuration_id: "rcfg-0123456789abcdef0".into(),
        port: 5432,
        client_addr: "10.1.2.3:40000".parse().map_err(|e| format!("{e}"))?,
    };
    let resp = OpenResponse::new(OpenStatus::Ok, "");
    let mut buf = Vec::with_capacity(FRAME_HEADER_LEN + frames::MAX_CONTROL_LEN);
    let mut outcome = Ok(());
    measured(&mut || {
        outcome = (|| {
            for i in 0..N {
                // What one flow's frames cost each side: the endpoint opens, the gateway
                // answers, DATA headers and WINDOW grants go both ways, each side half-closes.
                let flow = black_box(2 * i as u32 + 1);
                buf.clear();
                frames::encode_open(flow, black_box(&req), &mut buf).map_err(|e| format!("encode OPEN: {e}"))?;
                match decode_frame(black_box(&buf))? {
                    (h, Some(Control::Open(decoded))) if h.flow == flow => black_box(decoded),
                    other => return Err(format!("an OPEN decoded as {other:?}")),
                };
                buf.clear();
                frames::encode_open_response(flow, black_box(&resp), &mut buf);
                match decode_frame(black_box(&buf))? {
                    (h, Some(Control::OpenResponse(decoded))) if h.flow == flow => black_box(decoded),
                    other => return Err(format!("an OPEN_RESPONSE decoded as {other:?}")),
                };
                buf.clear();
                frames::encode_header(frames::DATA, flow, black_box(frames::MAX_DATA_LEN), &mut buf);
                match decode_frame(black_box(&buf))? {
                    (h, None) if h.flow == flow && h.len as usize == frames::MAX_DATA_LEN => black_box(h),
                    other => return Err(format!("a DATA header decoded as {other:?}")),
                };
                buf.clear();
                frames::encode_window(flow, black_box(256 << 10), &mut buf);
                match decode_frame(black_box(&buf))? {
                    (h, Some(Control::Window(n))) if h.flow == flow && n == 256 << 10 => black_box(n),
                    other => return Err(format!("a WINDOW decoded as {other:?}")),
                };
                buf.clear();
                frames::encode_fin(flow, &mut buf);
                match decode_frame(black_box(&buf))? {
                    (h, Some(Control::Fin)) if h.flow == flow => black_box(h),
                    other => return Err(format!("a FIN decoded as {other:?}")),
                };
            }
            Ok(())
        })();
    });
    outcome
}

/// Bytes each flow of the `mux` workload moves each way.
const MUX_PER_FLOW: usize = 8 << 20;
/// The application's reads and writes in the `mux` workload (the copy loop's size).
const MUX_CHUNK: usize = 64 << 10;

fn mux() -> Res<()> {
    let rt = runtime()?;
    let up = vec![0x5au8; MUX_CHUNK];
    let down = vec![0xa5u8; MUX_CHUNK];
    let mut outcome = Err("not run".to_string());
    measured(&mut || outcome = rt.block_on(mux_flows(&up, &down)));
    outcome
}

/// An endpoint and a gateway [`MuxConnection`] over `tokio::io::duplex` (what
/// TLS would carry), each driven by `trellis_agent::mux::run` as the agents do;
/// two flows opened and answered, then on both at once both sides write
/// [`MUX_PER_FLOW`] bytes and read the other side's to their end.
async fn mux_flows(up: &[u8], down: &[u8]) -> Res<()> {
    let (a, b) = tokio::io::duplex(256 << 10);
    let (ep, gw) = (MuxConnection::new(Side::Endpoint), MuxConnection::new(Side::Gateway));
    let ep_driver = tokio::spawn(trellis_agent::mux::run(ep.clone(), tokio::io::BufReader::new(a)));
    let gw_driver = tokio::spawn(trellis_agent::mux::run(gw.clone(), tokio::io::BufReader::new(b)));
    let gateway = async {
        let accept = async || {
            let (stream, req) = gw.accept().await.ok_or("the gateway connection ended before both flows opened")?;
            stream.respond(&OpenResponse::new(OpenStatus::Ok, ""));
            Ok::<_, String>((stream, req.port))
        };
        let (one, one_port) = accept().await?;
        let (two, two_port) = accept().await?;
        let (one, two) = tokio::join!(both_ways(one, down), both_ways(two, up));
        let e = |port| move |e| format!("gateway side of the flow to port {port}: {e}");
        Ok::<_, String>([one.map_err(e(one_port))?, two.map_err(e(two_port))?])
    };
    let endpoint = async {
        let open = async |port| {
            let req = OpenRequest {
                vpc_endpoint_id: "vpce-0123456789abcdef0".into(),
                resource_configuration_id: "rcfg-0123456789abcdef0".into(),
                port,
                client_addr: SocketAddr::from(([10, 1, 2, 3], 40000)),
            };
            let mut stream = ep.open(&req).map_err(|e| format!("open a flow to port {port}: {e:?}"))?;
            let resp = stream.response().await.map_err(|e| format!("the flow to port {port}: no answer: {e}"))?;
            if resp.status != OpenStatus::Ok {
                return Err(format!("the flow to port {port} was answered {}: {}", resp.status, resp.message));
            }
            Ok::<_, String>(stream)
        };
        let (one, two) = (open(1).await?, open(2).await?);
        let (one, two) = tokio::join!(both_ways(one, up), both_ways(two, down));
        let e = |port| move |e| format!("endpoint side of the flow to port {port}: {e}");
        Ok::<_, String>([one.map_err(e(1))?, two.map_err(e(2))?])
    };
    let (gateway, endpoint) = tokio::join!(gateway, endpoint);
    ep.close();
    gw.close();
    let _ = tokio::join!(ep_driver, gw_driver);
    for (side, got) in [("gateway", gateway?), ("endpoint", endpoint?)] {
        if got != [MUX_PER_FLOW; 2] {
            return Err(format!("the {side} side received {got:?} bytes on the two flows, not {MUX_PER_FLOW} on each"));
        }
    }
    Ok(())
}

/// Writes [`MUX_PER_FLOW`] bytes of `chunk` and half-closes while reading the
/// peer's bytes to their end; returns how many were read.
async fn both_ways(mut stream: MuxStream, chunk: &[u8]) -> std::io::Result<usize> {
    let (mut r, mut w) = tokio::io::split(&mut stream);
    let send = async {
        for _ in 0..MUX_PER_FLOW / chunk.len() {
            w.write_all(chunk).await?;
        }
        w.shutdown().await
    };
    let receive = async {
        let mut buf = vec![0u8; MUX_CHUNK];
        let mut got = 0usize;
        loop {
            match r.read(&mut buf).await? {
                0 => return Ok::<_, std::io::Error>(got),
                n => got += n,
            }
        }
    };
    let (sent, got) = tokio::join!(send, receive);
    sent?;
    got
}

fn authorize_many() -> Res<()> {
    const N: usize = 1_000;
    const RESOURCES: usize = 50;
    const ENDPOINTS_PER_RESOURCE: usize = 100;
    let consumers: Vec<ConsumerVpc> = (0..RESOURCES * ENDPOINTS_PER_RESOURCE)
        .map(|i| ConsumerVpc { account_id: format!("acct-{:012}", 100_000 + i), vpc_id: format!("vpc-{i:017x}") })
        .collect();
    let resources = (0..RESOURCES)
        .map(|r| GatewayResource {
            resource_configuration_id: format!("rcfg-{r:017x}"),
            resource_gateway_id: "rgw-00000000000000001".into(),
            owner_account_id: "acct-000000000001".into(),
            target: Target::Ip { address: IpAddr::from([10, 0, 0, 5]) },
            port_ranges: vec![
                PortRange::single(5432).expect("a port range"),
                PortRange::new(8000, 8100).expect("a port range"),
            ],
            // Sorted by endpoint id, as the control plane sends them.
            allowed: (0..ENDPOINTS_PER_RESOURCE)
                .map(|e| {
                    let i = r * ENDPOINTS_PER_RESOURCE + e;
                    AllowedEndpoint { vpc_endpoint_id: format!("vpce-{i:017x}"), consumer: i as u32 }
                })
                .collect(),
            proxy_protocol: false,
            limits: None,
        })
        .collect();
    let config = AgentConfig {
        version: 1,
        gateway: GatewayRole {
            consumers,
            resources,
            revoked_certs: (0..100).map(|i| format!("{i:064x}")).collect(),
            ..Default::default()
        },
        ..Default::default()
    };
    // The last resource, an endpoint in its middle, a consumer near the end of the list.
    let i = (RESOURCES - 1) * ENDPOINTS_PER_RESOURCE + ENDPOINTS_PER_RESOURCE / 2;
    let peer = PeerIdentity {
        agent_id: "agent-0000000000000000b".into(),
        account_id: format!("acct-{:012}", 100_000 + i),
        vpc_id: format!("vpc-{i:017x}"),
        cert_sha256: "ab".repeat(32),
    };
    let req = OpenRequest {
        vpc_endpoint_id: format!("vpce-{i:017x}"),
        resource_configuration_id: format!("rcfg-{:017x}", RESOURCES - 1),
        port: 8050,
        client_addr: SocketAddr::from(([10, 1, 2, 3], 40000)),
    };
    authorize(&config, &peer, &req).map_err(|d| format!("the workload's request is denied: {d}"))?;
    let mut granted = 0usize;
    measured(&mut || {
        for _ in 0..N {
            if let Ok(grant) = authorize(black_box(&config), black_box(&peer), black_box(&req)) {
                granted += 1;
                black_box(grant);
            }
        }
    });
    if granted != N {
        return Err(format!("{} of {N} requests were denied", N - granted));
    }
    Ok(())
}

const GW: &str = "agent-0000000000000000a";
const EP: &str = "agent-0000000000000000b";
const VPCE: &str = "vpce-00000000000000001";
const RCFG: &str = "rcfg-00000000000000001";
const CONSUMER_ACCT: &str = "acct-000000000002";
const CONSUMER_VPC: &str = "vpc-00000000000000002";
const UPLOAD: usize = 1 << 20;
/// How long a warm tunnel may wait for a flow in the `proxy` workload (far beyond any run).
const IDLE: Duration = Duration::from_secs(3600);

fn proxy() -> Res<()> {
    let rt = runtime()?;
    let agents = rt.block_on(proxy_setup())?;
    let entry = agents.entry;
    // The first transfers pay the full TLS handshakes and fill the pool; the measured one
    // takes a warm tunnel, as a steady-state connection does.
    for _ in 0..2 {
        rt.block_on(upload(entry))?;
    }
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(200)).await });
    let mut outcome = Err("not run".to_string());
    measured(&mut || outcome = rt.block_on(upload(entry)));
    rt.block_on(async {
        agents.endpoint.shutdown().await;
        agents.gateway.shutdown().await;
    });
    outcome
}

/// Connections the `connect` workload makes.
const CONNECTS: usize = 200;

fn connect() -> Res<()> {
    let rt = runtime()?;
    let agents = rt.block_on(proxy_setup())?;
    let entry = agents.entry;
    // As in `proxy`: the first connections pay the handshakes and open the tunnels.
    for _ in 0..2 {
        rt.block_on(upload(entry))?;
    }
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(200)).await });
    let mut outcome = Err("not run".to_string());
    measured(&mut || {
        outcome = rt.block_on(async {
            for i in 0..CONNECTS {
                connect_once(entry).await.map_err(|e| format!("connection {i}: {e}"))?;
            }
            Ok(())
        })
    });
    rt.block_on(async {
        agents.endpoint.shutdown().await;
        agents.gateway.shutdown().await;
    });
    outcome
}

/// One connection through `entry` that sends nothing: the target answers a count of 0.
async fn connect_once(entry: SocketAddr) -> Res<()> {
    let work = async {
        let mut s = TcpStream::connect(entry).await?;
        s.shutdown().await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(60), work)
        .await
        .map_err(|_| "no answer within 60 s".to_string())?
        .map_err(|e| e.to_string())?;
    if answer != [0u8; 8] {
        return Err(format!("the target answered {answer:?}, not a count of 0"));
    }
    Ok(())
}

struct Agents {
    gateway: trellis_agent::RunningAgent,
    endpoint: trellis_agent::RunningAgent,
    /// Where a client connects: the endpoint address at the target's port.
    entry: SocketAddr,
    /// Held so that the agents' configs stay open.
    _configs: [watch::Sender<Arc<AgentConfig>>; 2],
}

/// A gateway agent and an endpoint agent with hand-built configs (a throw-away
/// CA, no control plane) in front of a target that counts what it receives.
async fn proxy_setup() -> Res<Agents> {
    let ca = TestCa::new();
    let gw_id = ca.issue(GW, "acct-000000000001", "vpc-00000000000000001");
    let ep_id = ca.issue(EP, CONSUMER_ACCT, CONSUMER_VPC);
    let target = TcpListener::bind("127.0.0.1:0").await.map_err(|e| format!("target listener: {e}"))?;
    let target_addr = target.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = target.accept().await {
            tokio::spawn(async move {
                // Not zeroed per connection: the `connect` path counts the agents, not this.
                let mut buf = Vec::with_capacity(64 << 10);
                let mut got = 0u64;
                while let Ok(n @ 1..) = s.read_buf(&mut buf).await {
                    got += n as u64;
                    buf.clear();
                }
                let _ = s.write_all(&got.to_be_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });

    let gateway_config = AgentConfig {
        version: 1,
        agent_id: GW.into(),
        zone: "z1".into(),
        gateway: GatewayRole {
            consumers: vec![ConsumerVpc { account_id: CONSUMER_ACCT.into(), vpc_id: CONSUMER_VPC.into() }],
            resources: vec![GatewayResource {
                resource_configuration_id: RCFG.into(),
                resource_gateway_id: "rgw-00000000000000001".into(),
                owner_account_id: "acct-000000000001".into(),
                target: Target::Ip { address: target_addr.ip() },
                port_ranges: vec![PortRange::single(target_addr.port()).map_err(|e| e.to_string())?],
                allowed: vec![AllowedEndpoint { vpc_endpoint_id: VPCE.into(), consumer: 0 }],
                proxy_protocol: false,
                limits: None,
            }],
            ..Default::default()
        },
        ..Default::default()
    };
    let (gw_tx, rx) = watch::channel(Arc::new(gateway_config));
    // Warm tunnels are replaced on a wall-clock schedule (7 s, before the gateway's 10 s
    // open-request deadline). Under callgrind on a loaded machine the run can take that long,
    // and a replacement's handshake inside the measured part would count: push both far out.
    let gateway_opts = DataPlaneOptions {
        gateway_timeouts: GatewayTimeouts { open_request: IDLE + IDLE, ..GatewayTimeouts::default() },
        ..DataPlaneOptions::loopback()
    };
    let gateway = start_data_plane(gateway_opts, &gw_id, rx).await.map_err(|e| format!("gateway agent: {e}"))?;
    let tunnel = gateway.tunnel_addr().ok_or("the gateway agent has no tunnel listener")?;

    let address = IpAddr::from([127, 79, (std::process::id() % 250) as u8, 1]);
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
            resources: vec![EndpointResource {
                resource_configuration_id: RCFG.into(),
                address,
                port_ranges: vec![PortRange::single(target_addr.port()).map_err(|e| e.to_string())?],
                dns_names: vec![],
                dns_records: vec![],
                gateways: vec![GatewayTarget {
                    agent_id: GW.into(),
                    address: tunnel.to_string(),
                    zone: "z1".into(),
                    server_name: agent_server_name(GW),
                    relays: vec![],
                }],
            }],
        }],
        ..Default::default()
    };
    let (ep_tx, rx) = watch::channel(Arc::new(endpoint_config));
    let endpoint_opts =
        DataPlaneOptions { tunnel_listen: None, pool: PoolSettings::default(), ..DataPlaneOptions::loopback() };
    let endpoint = start_data_plane(endpoint_opts, &ep_id, rx).await.map_err(|e| format!("endpoint agent: {e}"))?;
    let mut served = endpoint.served();
    tokio::time::timeout(Duration::from_secs(30), served.wait_for(|s| s.listeners.iter().any(|l| l.ready)))
        .await
        .map_err(|_| "the endpoint listener was not ready within 30 s".to_string())?
        .map_err(|_| "the endpoint agent stopped".to_string())?;
    Ok(Agents { gateway, endpoint, entry: SocketAddr::new(address, target_addr.port()), _configs: [gw_tx, ep_tx] })
}

/// Uploads [`UPLOAD`] bytes through `entry`, half-closes, and checks the target's count.
async fn upload(entry: SocketAddr) -> Res<()> {
    let chunk = vec![0xa5u8; 64 << 10];
    let work = async {
        let mut s = TcpStream::connect(entry).await?;
        for _ in 0..UPLOAD / chunk.len() {
            s.write_all(&chunk).await?;
        }
        s.shutdown().await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(60), work)
        .await
        .map_err(|_| "the proxied upload did not finish within 60 s".to_string())?
        .map_err(|e| format!("proxied upload: {e}"))?;
    match <[u8; 8]>::try_from(answer.as_slice()) {
        Ok(count) if u64::from_be_bytes(count) == UPLOAD as u64 => Ok(()),
        _ => Err(format!("the target answered {answer:?}, not the count of {UPLOAD} bytes")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path but the slow ones (`authorize`'s config, `proxy`'s agents) runs
    /// and checks what it moved, as it does under callgrind.
    #[test]
    fn the_quick_paths_run_and_check_their_results() {
        for name in ["copy", "copy-rr", "framing", "mux"] {
            let w = WORKLOADS.iter().find(|w| w.name == name).unwrap_or_else(|| panic!("no path {name}"));
            (w.run)().unwrap_or_else(|e| panic!("path {name}: {e}"));
        }
    }

    #[test]
    fn framing_measures_the_tunnel_frames_the_agents_send() {
        // Version-2 frames, as `trellis_agent::mux` writes them, decode as the workload expects.
        let mut buf = Vec::new();
        frames::encode_window(7, 99, &mut buf);
        let (h, control) = decode_frame(&buf).unwrap();
        assert_eq!((h.kind, h.flow, control), (frames::WINDOW, 7, Some(Control::Window(99))));
        let mut v1 = Vec::new();
        trellis_proto::stream::encode_open_response(&OpenResponse::new(OpenStatus::Ok, ""), &mut v1);
        assert!(decode_frame(&v1).is_err(), "a version-1 message is not a tunnel frame");
        assert!(WORKLOADS.iter().find(|w| w.name == "framing").unwrap().what.contains("version 2"));
    }
}
