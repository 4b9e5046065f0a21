//! An ad-hoc measurement, not a test: one-stream throughput and new
//! connections per second through a relayed path (endpoint agent → relay →
//! outbound-only gateway agent), the direct path (endpoint agent → gateway
//! agent), two plain haproxy hops (when `haproxy` is installed) and no proxy
//! at all, on loopback. Agents and relay run in this process; haproxy runs as
//! two processes. Run it in release mode:
//!
//! ```sh
//! cargo test --release -p trellis-agent --test relay_perf -- --ignored --nocapture
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use trellis_agent::relay::{RelayServerOptions, start_relay_server};
use trellis_agent::testing::TestCa;
use trellis_agent::{DataPlaneOptions, start_data_plane};
use trellis_proto::{
    AgentConfig, AllowedEndpoint, ConsumerVpc, EndpointConfig, EndpointResource, GatewayResource, GatewayRole,
    GatewayTarget, PortRange, RelayConfig, RelayGateway, RelayTarget, Target, agent_server_name, relay_server_name,
};

const GW: &str = "agent-0000000000000000a";
const EP: &str = "agent-0000000000000000b";
const VPCE: &str = "vpce-00000000000000001";
const RCFG: &str = "rcfg-00000000000000001";

/// Discards what it reads and answers the count when the client half-closes;
/// a client that sends one byte first gets it echoed (connection-rate probe).
async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if total == 0 && n == 1 && buf[0] == b'?' {
                                let _ = s.write_all(b"!").await;
                            }
                            total += n as u64;
                        }
                    }
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Bytes per throughput run: 1 GiB, or `RELAY_PERF_MIB` MiB.
fn bytes() -> u64 {
    std::env::var("RELAY_PERF_MIB").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(1024) << 20
}

async fn throughput(target: SocketAddr) -> f64 {
    let mut s = TcpStream::connect(target).await.unwrap();
    let _ = s.set_nodelay(true);
    let chunk = vec![7u8; 256 * 1024];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < bytes() {
        s.write_all(&chunk).await.unwrap();
        sent += chunk.len() as u64;
    }
    s.shutdown().await.unwrap();
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await.unwrap();
    assert_eq!(u64::from_be_bytes(count), sent);
    (sent as f64 * 8.0) / started.elapsed().as_secs_f64() / 1e9
}

async fn connection_rate(target: SocketAddr, workers: usize, for_how_long: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + for_how_long;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let mut s = TcpStream::connect(target).await.unwrap();
                let _ = s.set_nodelay(true);
                s.write_all(b"?").await.unwrap();
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await.unwrap();
                drop(s);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / for_how_long.as_secs_f64()
}

fn haproxy_2hop(target: SocketAddr, dir: &std::path::Path) -> Option<(SocketAddr, Vec<std::process::Child>)> {
    let bin = ["/usr/sbin/haproxy", "/usr/bin/haproxy"].into_iter().find(|p| std::path::Path::new(p).exists())?;
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (first, second) = (free(), free());
    let cfg = |listen: SocketAddr, to: SocketAddr| {
        format!(
            "global\n    maxconn 4000\n\ndefaults\n    mode tcp\n    maxconn 4000\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\nfrontend f\n    bind {listen}\n    default_backend b\n\nbackend b\n    server s1 {to}\n"
        )
    };
    let mut children = Vec::new();
    for (name, listen, to) in [("h2", second, target), ("h1", first, second)] {
        let path = dir.join(format!("{name}.cfg"));
        std::fs::write(&path, cfg(listen, to)).unwrap();
        children.push(std::process::Command::new(bin).arg("-db").arg("-f").arg(&path).spawn().ok()?);
    }
    for _ in 0..200 {
        if std::net::TcpStream::connect(first).is_ok() && std::net::TcpStream::connect(second).is_ok() {
            return Some((first, children));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run in release mode with --ignored --nocapture"]
async fn relayed_path_against_direct_and_haproxy() {
    let target = backend().await;
    let ca = TestCa::new();
    let gw_id = ca.issue(GW, "acct-000000000001", "vpc-00000000000000001");
    let ep_id = ca.issue(EP, "acct-000000000002", "vpc-00000000000000002");
    let relay_id = ca.issue_relay("relay-00000000000000001", "z1");
    let (_relay_cfg, rx) = watch::channel(Arc::new(RelayConfig {
        version: 1,
        relay_id: relay_id.relay_id.clone(),
        zone: "z1".into(),
        gateways: vec![RelayGateway {
            agent_id: GW.into(),
            account_id: gw_id.account_id.clone(),
            vpc_id: gw_id.vpc_id.clone(),
        }],
        revoked_certs: Default::default(),
    }));
    let relay = start_relay_server(RelayServerOptions::loopback(), &relay_id, rx).await.unwrap();
    let relay_target = RelayTarget {
        relay_id: relay_id.relay_id.clone(),
        address: relay.local_addr().to_string(),
        zone: "z1".into(),
        server_name: relay_server_name(&relay_id.relay_id),
    };
    let gateway_config = |relays: Vec<RelayTarget>| AgentConfig {
        version: 1,
        agent_id: GW.into(),
        zone: "z1".into(),
        gateway: GatewayRole {
            consumers: vec![ConsumerVpc { account_id: ep_id.account_id.clone(), vpc_id: ep_id.vpc_id.clone() }],
            resources: vec![GatewayResource {
                resource_configuration_id: RCFG.into(),
                resource_gateway_id: "rgw-00000000000000001".into(),
                owner_account_id: "acct-000000000001".into(),
                target: Target::Ip { address: target.ip() },
                port_ranges: vec![PortRange::single(target.port()).unwrap()],
                allowed: vec![AllowedEndpoint { vpc_endpoint_id: VPCE.into(), consumer: 0 }],
                proxy_protocol: false,
                limits: None,
            }],
            ..Default::default()
        },
        relays,
        ..Default::default()
    };
    let (_direct_gw_cfg, rx) = watch::channel(Arc::new(gateway_config(vec![])));
    let direct_gw = start_data_plane(DataPlaneOptions::loopback(), &gw_id, rx).await.unwrap();
    let (_relayed_gw_cfg, rx) = watch::channel(Arc::new(gateway_config(vec![relay_target.clone()])));
    let relayed_gw = start_data_plane(DataPlaneOptions::outbound_only(), &gw_id, rx).await.unwrap();

    let endpoint_config = |address: std::net::IpAddr, gateway: GatewayTarget| AgentConfig {
        version: 1,
        agent_id: EP.into(),
        account_id: ep_id.account_id.clone(),
        vpc_id: ep_id.vpc_id.clone(),
        zone: "z1".into(),
        region: "local".into(),
        address_pool: "127.80.0.0/16".into(),
        endpoints: vec![EndpointConfig {
            vpc_endpoint_id: VPCE.into(),
            resources: vec![EndpointResource {
                resource_configuration_id: RCFG.into(),
                address,
                port_ranges: vec![PortRange::single(target.port()).unwrap()],
                dns_names: vec![],
                dns_records: vec![],
                gateways: vec![gateway],
            }],
        }],
        ..Default::default()
    };
    let direct_addr: std::net::IpAddr = "127.80.0.1".parse().unwrap();
    let relayed_addr: std::net::IpAddr = "127.80.0.2".parse().unwrap();
    let gw_target = |address: String, relays: Vec<RelayTarget>| GatewayTarget {
        agent_id: GW.into(),
        address,
        zone: "z1".into(),
        server_name: agent_server_name(GW),
        relays,
    };
    let endpoint_opts = || DataPlaneOptions { tunnel_listen: None, ..DataPlaneOptions::loopback() };
    let (_e1, rx) = watch::channel(Arc::new(endpoint_config(
        direct_addr,
        gw_target(direct_gw.tunnel_addr().unwrap().to_string(), vec![]),
    )));
    let direct_ep = start_data_plane(endpoint_opts(), &ep_id, rx).await.unwrap();
    let (_e2, rx) =
        watch::channel(Arc::new(endpoint_config(relayed_addr, gw_target(String::new(), vec![relay_target]))));
    let relayed_ep = start_data_plane(endpoint_opts(), &ep_id, rx).await.unwrap();
    for ep in [&direct_ep, &relayed_ep] {
        let served = ep.served();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !served.borrow().listeners.iter().any(|l| l.ready) {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    while relay.attachments(GW) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let haproxy = haproxy_2hop(target, dir.path());

    let mut paths: Vec<(&str, SocketAddr)> = vec![("direct (no proxy)", target)];
    if let Some((entry, _)) = &haproxy {
        paths.push(("haproxy-2hop", *entry));
    }
    paths.push(("trellis direct", SocketAddr::new(direct_addr, target.port())));
    paths.push(("trellis relayed", SocketAddr::new(relayed_addr, target.port())));
    println!("{:<20} {:>14} {:>14} {:>12}", "path", "1 stream Gb/s", "(best of 3)", "conn/s (x4)");
    let mut results = Vec::new();
    for (name, addr) in &paths {
        // Warm-up, then three runs of each.
        let _ = throughput(*addr).await;
        let mut runs = Vec::new();
        for _ in 0..3 {
            runs.push(throughput(*addr).await);
        }
        runs.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let _ = connection_rate(*addr, 4, Duration::from_secs(1)).await;
        let mut rates = Vec::new();
        for _ in 0..3 {
            rates.push(connection_rate(*addr, 4, Duration::from_secs(3)).await);
        }
        rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "{name:<20} {:>14.2} {:>14.2} {:>12.0}  (runs {runs:.2?}, rates {rates:.0?})",
            runs[1], runs[2], rates[1]
        );
        results.push((name.to_string(), runs[1], rates[1]));
    }
    if let Some(h) = results.iter().find(|r| r.0 == "haproxy-2hop").cloned() {
        for (name, gbps, rate) in &results {
            println!("{name:<20} throughput {:.2}x haproxy-2hop, new connections {:.2}x", gbps / h.1, rate / h.2);
        }
    }
    if let Some((_, children)) = haproxy {
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    relayed_ep.shutdown().await;
    direct_ep.shutdown().await;
    relayed_gw.shutdown().await;
    direct_gw.shutdown().await;
    relay.shutdown().await;
}
