//! Endpoint services end to end, with real processes on loopback: a provider
//! publishes a service with three real targets behind its agent; a consumer
//! allowed by principal connects through an Interface endpoint after the
//! provider accepts; connections spread over the healthy targets and a stopped
//! target costs no client request; a third account sees nothing; removing
//! the consumer's principal closes its open connections; per-consumer limits
//! refuse the (N+1)th connection of one consumer but not another's, and pace
//! bandwidth.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use trellis_e2e::agent::{Agent, AgentOptions};
use trellis_e2e::flow::Tenant;
use trellis_e2e::net::{free_port, loopback_pool};
use trellis_e2e::{LoopbackPair, TcpService, wait_until};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// The bound for a revocation to refuse new connections.
const REVOKE_DEADLINE: Duration = Duration::from_secs(5);

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

/// The endpoint's address (its only subnet's).
fn address_of(endpoint: &Value) -> IpAddr {
    s(&endpoint["dnsEntries"][0]["ipAddresses"][0]).parse().expect("endpoint address")
}

/// Reads the line a greeter sends; `None` when the connection is refused or closed first.
fn greeting(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let line = text.trim().to_string();
    (!line.is_empty()).then_some(line)
}

/// A connection through which an echo service answers (held open by the test).
fn echo_session(addr: SocketAddr) -> Option<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    stream.write_all(b"ping").ok()?;
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).ok()?;
    (&buf == b"ping").then_some(stream)
}

/// Whether the peer closed `stream` (end of stream or a reset) within
/// `within`; a read that merely times out is not a close.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).expect("read timeout");
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

/// Publishes a service of the pair's owner with `targets` on `target_port`.
fn publish(pair: &LoopbackPair, name: &str, targets: &[IpAddr], port: u16, extra: Value) -> Value {
    let mut body = json!({
        "name": name, "vpcId": pair.owner_vpc, "subnetIds": [pair.owner_subnet],
        "targets": targets.iter().map(|ip| json!({"ipAddress": ip.to_string()})).collect::<Vec<_>>(),
        "ports": [{"port": port}],
        "healthCheck": {"protocol": "TCP", "intervalSeconds": 5, "timeoutSeconds": 2,
                        "healthyThresholdCount": 2, "unhealthyThresholdCount": 2},
    });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    pair.owner.api.post("/v1/vpcendpointservices", &body).ok("create endpoint service")
}

fn allow(pair: &LoopbackPair, service_id: &str, principal: &str) {
    let body = json!({"addAllowedPrincipals": [principal]});
    pair.owner.api.post(&format!("/v1/vpcendpointservices/{service_id}/permissions"), &body).ok("allow principal");
}

fn interface_endpoint(tenant: &Tenant, vpc: &str, subnet: &str, service: &Value) -> Value {
    let body = json!({"vpcEndpointType": "Interface", "vpcId": vpc, "subnetIds": [subnet], "serviceName": service["serviceName"]});
    tenant.api.post("/v1/vpcendpoints", &body).ok("create interface endpoint")
}

#[test]
fn a_service_spreads_over_healthy_targets_survives_a_stopped_one_and_revokes_a_removed_principal() {
    let pair = LoopbackPair::start();
    let port = free_port(Ipv4Addr::new(127, 0, 0, 2).into());
    let ips: Vec<IpAddr> = (2..=4).map(|i| Ipv4Addr::new(127, 0, 0, i).into()).collect();
    let mut targets: Vec<TcpService> = ips
        .iter()
        .zip(["target-a", "target-b", "target-c"])
        .map(|(ip, name)| TcpService::greeter(name, SocketAddr::new(*ip, port), name, None))
        .collect();
    let service = publish(&pair, "greeters", &ips, port, json!({}));
    let sid = s(&service["serviceId"]).to_string();
    assert_eq!(service["acceptanceRequired"], true, "{service}");

    // A third account: 404 for the service, 4xx for an endpoint to it.
    let stranger = Tenant::create(&pair.cp, "stranger-co");
    stranger.api.get(&format!("/v1/vpcendpointservices/{sid}")).expect_status(404, "a stranger reads the service");
    let svpc = stranger.create_vpc("stranger-net");
    let ssubnet = stranger.create_subnet(&svpc, "z1", &loopback_pool().0);
    let body = json!({"vpcEndpointType": "Interface", "vpcId": svpc, "subnetIds": [ssubnet], "serviceName": sid});
    let refused = stranger.api.post("/v1/vpcendpoints", &body);
    assert_eq!(refused.status, 422, "a stranger's endpoint: {}", refused.text);

    allow(&pair, &sid, pair.consumer.id());
    let endpoint = interface_endpoint(&pair.consumer, &pair.consumer_vpc, &pair.consumer_subnet, &service);
    let eid = s(&endpoint["id"]).to_string();
    assert_eq!(endpoint["state"], "PendingAcceptance", "{endpoint}");
    let addr = SocketAddr::new(address_of(&endpoint), port);
    let body = json!({"vpcEndpointIds": [eid]});
    pair.owner.api.post(&format!("/v1/vpcendpointservices/{sid}/connections/accept"), &body).ok("accept");
    pair.consumer.wait_status(&format!("/v1/vpcendpoints/{eid}"), "state", "Available");

    // Requests spread over all three healthy targets.
    let seen: BTreeSet<String> = wait_until("requests to reach every target", Duration::from_secs(30), || {
        let seen: BTreeSet<String> = (0..12).filter_map(|_| greeting(addr)).collect();
        (seen.len() == 3).then_some(seen)
    });
    assert_eq!(seen, ["target-a", "target-b", "target-c"].map(String::from).into());

    // A stopped target: once its checks fail (2 × 5 s), no request fails and none goes to it.
    targets.remove(1).proc.kill();
    let stopped_at = Instant::now();
    wait_until("the provider's agent to report target-b unhealthy", Duration::from_secs(40), || {
        let view = pair.owner.api.get(&format!("/v1/vpcendpointservices/{sid}")).ok("read service");
        view["targetHealth"]
            .as_array()?
            .iter()
            .any(|t| t["target"] == "127.0.0.3" && t["state"] == "UNHEALTHY")
            .then_some(())
    });
    assert!(stopped_at.elapsed() < Duration::from_secs(30), "detection took {:?}", stopped_at.elapsed());
    let answers: Vec<Option<String>> = (0..30).map(|_| greeting(addr)).collect();
    assert!(answers.iter().all(Option::is_some), "a request failed after the detection window: {answers:?}");
    let seen: BTreeSet<String> = answers.into_iter().flatten().collect();
    assert_eq!(seen, ["target-a", "target-c"].map(String::from).into(), "only healthy targets answer");
    let metrics = pair.owner_agent.metrics().expect("owner agent metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("trellis_service_target_healthy") && l.contains("127.0.0.3") && l.ends_with(" 0")),
        "the target's health shows in metrics:\n{metrics}"
    );

    // Revocation: an echo service, a session held open, then the principal removed.
    let echo_ip: IpAddr = Ipv4Addr::new(127, 0, 0, 5).into();
    let echo_port = free_port(echo_ip);
    let _echo = TcpService::echo("echo", SocketAddr::new(echo_ip, echo_port), None);
    let echo = publish(&pair, "echo", &[echo_ip], echo_port, json!({"acceptanceRequired": false}));
    let echo_id = s(&echo["serviceId"]).to_string();
    allow(&pair, &echo_id, pair.consumer.id());
    let echo_ep = interface_endpoint(&pair.consumer, &pair.consumer_vpc, &pair.consumer_subnet, &echo);
    let echo_eid = s(&echo_ep["id"]).to_string();
    assert_eq!(echo_ep["state"], "Pending", "no acceptance needed: {echo_ep}");
    pair.consumer.wait_status(&format!("/v1/vpcendpoints/{echo_eid}"), "state", "Available");
    let echo_addr = SocketAddr::new(address_of(&echo_ep), echo_port);
    let mut held = wait_until("an echo session", Duration::from_secs(10), || echo_session(echo_addr));

    let body = json!({"removeAllowedPrincipals": [pair.consumer.id()]});
    pair.owner.api.post(&format!("/v1/vpcendpointservices/{echo_id}/permissions"), &body).ok("remove principal");
    let removed_at = Instant::now();
    wait_until("new connections to be refused", REVOKE_DEADLINE * 2, || {
        echo_session(echo_addr).is_none().then_some(())
    });
    assert!(removed_at.elapsed() <= REVOKE_DEADLINE, "still served {:?} after the removal", removed_at.elapsed());
    assert!(closed_within(&mut held, REVOKE_DEADLINE), "the open session survived the removal of its principal");
    let ep = pair.consumer.api.get(&format!("/v1/vpcendpoints/{echo_eid}")).ok("read endpoint");
    assert_eq!(ep["state"], "Failed", "{ep}");
}

#[test]
fn per_consumer_limits_refuse_one_consumers_extra_connection_and_pace_its_bytes() {
    let pair = LoopbackPair::start();
    let echo_ip: IpAddr = Ipv4Addr::new(127, 0, 0, 6).into();
    let port = free_port(echo_ip);
    let _echo = TcpService::echo("echo", SocketAddr::new(echo_ip, port), None);
    let limits = json!({"acceptanceRequired": false, "perConsumerLimits": {"maxConnections": 2}});
    let service = publish(&pair, "limited", &[echo_ip], port, limits);
    let sid = s(&service["serviceId"]).to_string();
    allow(&pair, &sid, "*");

    let endpoint = interface_endpoint(&pair.consumer, &pair.consumer_vpc, &pair.consumer_subnet, &service);
    pair.consumer.wait_status(&format!("/v1/vpcendpoints/{}", s(&endpoint["id"])), "state", "Available");
    let addr = SocketAddr::new(address_of(&endpoint), port);

    // A second consumer with its own VPC and agent.
    let other = Tenant::create(&pair.cp, "other-co");
    let ovpc = other.create_vpc("other-net");
    let osubnet = other.create_subnet(&ovpc, "z1", &loopback_pool().0);
    let _other_agent = Agent::start_endpoint_only(AgentOptions {
        name: "other-agent",
        control_plane_url: &pair.cp.url,
        join_token: &other.join_token(&osubnet),
        bind_ip: LOCALHOST,
        netns: None,
        extra_args: Vec::new(),
    });
    other.wait_agent_online(&osubnet);
    let other_ep = interface_endpoint(&other, &ovpc, &osubnet, &service);
    other.wait_status(&format!("/v1/vpcendpoints/{}", s(&other_ep["id"])), "state", "Available");
    let other_addr = SocketAddr::new(address_of(&other_ep), port);

    let held: Vec<TcpStream> =
        (0..2).map(|i| wait_until(&format!("session {i}"), Duration::from_secs(10), || echo_session(addr))).collect();
    assert!(echo_session(addr).is_none(), "the third connection of one consumer must be refused");
    assert!(echo_session(other_addr).is_some(), "another consumer still connects");
    wait_until("the refusal to show in the service's usage", Duration::from_secs(20), || {
        let usage = pair.owner.api.get(&format!("/v1/vpcendpointservices/{sid}/usage")).ok("usage");
        usage["items"]
            .as_array()?
            .iter()
            .any(|i| i["consumerAccountId"] == pair.consumer.id() && i["rejectedConnections"].as_u64() >= Some(1))
            .then_some(())
    });
    drop(held);

    // Bandwidth: 8 Mbit/s = 1 MB/s each way; 3 MB through the echo takes about 3 s.
    let body = json!({"perConsumerLimits": {"maxBitsPerSecond": 8_000_000}});
    pair.owner.api.patch(&format!("/v1/vpcendpointservices/{sid}"), &body).ok("set a bandwidth limit");
    const BYTES: usize = 3_000_000;
    let elapsed = wait_until("a paced transfer", Duration::from_secs(60), || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
        let mut writer = stream.try_clone().ok()?;
        let started = Instant::now();
        let sender = std::thread::spawn(move || writer.write_all(&vec![7u8; BYTES]).is_ok());
        let mut got = vec![0u8; BYTES];
        stream.read_exact(&mut got).ok()?;
        let elapsed = started.elapsed();
        // Until the agent has the new config the transfer runs unpaced, far faster.
        (sender.join().ok()? && elapsed > Duration::from_millis(1500)).then_some(elapsed)
    });
    let expected = BYTES as f64 / 1_000_000.0;
    let off = (elapsed.as_secs_f64() - expected).abs() / expected;
    assert!(off <= 0.15, "3 MB at 1 MB/s took {elapsed:?} (expected {expected} s ± 15 %)");
}

/// haproxy answering every HTTP request with what it parsed from the PROXY
/// v2 header (`accept-proxy`): the client address, and the unique id TLV.
struct Haproxy {
    proc: trellis_e2e::Proc,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(addr: SocketAddr) -> Option<Haproxy> {
        let program =
            ["/usr/sbin/haproxy", "/usr/bin/haproxy"].into_iter().find(|p| std::path::Path::new(p).exists())?;
        let dir = tempfile::tempdir().expect("haproxy dir");
        let config = format!(
            "defaults\n  mode http\n  timeout connect 5s\n  timeout client 10s\n  timeout server 10s\n\
             frontend fe\n  bind {addr} accept-proxy\n  \
             http-request return status 200 content-type text/plain lf-string \"client=%ci unique=%[fc_pp_unique_id]\\n\"\n"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let mut cmd = std::process::Command::new(program);
        cmd.arg("-db").arg("-f").arg(&path);
        let proc = trellis_e2e::Proc::spawn("haproxy", cmd, dir.path());
        Some(Haproxy { proc, _dir: dir })
    }
}

#[test]
fn an_unmodified_haproxy_learns_the_consumer_account_and_endpoint_from_proxy_v2() {
    let ip: IpAddr = Ipv4Addr::new(127, 0, 0, 7).into();
    let port = free_port(ip);
    let Some(mut haproxy) = Haproxy::start(SocketAddr::new(ip, port)) else {
        assert!(std::env::var("CI").is_err(), "haproxy is missing on CI: scripts/test installs it");
        eprintln!("skipped: no haproxy (scripts/test installs Debian's haproxy)");
        return;
    };
    wait_until("haproxy to listen", Duration::from_secs(10), || {
        haproxy.proc.assert_running();
        TcpStream::connect(SocketAddr::new(ip, port)).ok()
    });
    let pair = LoopbackPair::start();
    let service = publish(&pair, "proxied", &[ip], port, json!({"acceptanceRequired": false, "proxyProtocol": "V2"}));
    allow(&pair, s(&service["serviceId"]), pair.consumer.id());
    let endpoint = interface_endpoint(&pair.consumer, &pair.consumer_vpc, &pair.consumer_subnet, &service);
    let eid = s(&endpoint["id"]).to_string();
    pair.consumer.wait_status(&format!("/v1/vpcendpoints/{eid}"), "state", "Available");
    let addr = SocketAddr::new(address_of(&endpoint), port);

    let body = wait_until("haproxy to answer through the endpoint", Duration::from_secs(15), || {
        trellis_e2e::agent::http_get_plain(addr, "/").ok()
    });
    let consumer = pair.consumer.id();
    assert!(body.contains(&format!("unique={consumer} {eid} ")), "haproxy did not see the caller: {body}");
    // The client address haproxy read from the header is the consumer's client, not the gateway.
    let client = body.split_whitespace().find_map(|w| w.strip_prefix("client=")).unwrap_or_default();
    assert!(client.starts_with("127."), "{body}");
}

#[test]
fn the_consumers_dns_answers_regional_zonal_and_verified_private_names() {
    let resolver_port = free_port(LOCALHOST);
    let opts = trellis_e2e::PairOptions {
        server_args: vec!["--dns-resolver".into(), format!("127.0.0.1:{resolver_port}")],
        ..Default::default()
    };
    let pair = LoopbackPair::start_with(opts);
    let ip: IpAddr = Ipv4Addr::new(127, 0, 0, 8).into();
    let port = free_port(ip);
    let _target = TcpService::greeter("named", SocketAddr::new(ip, port), "named", None);
    let mut service = publish(&pair, "named", &[ip], port, json!({"acceptanceRequired": false}));
    let sid = s(&service["serviceId"]).to_string();
    allow(&pair, &sid, pair.consumer.id());

    // The private name needs a verified domain first.
    let path = format!("/v1/vpcendpointservices/{sid}");
    let refused = pair.owner.api.patch(&path, &json!({"privateDnsName": "api.orders.example"}));
    assert_eq!(refused.status, 422, "an unverified name: {}", refused.text);
    assert!(refused.message().contains("verified domain"), "{}", refused.text);
    let dv = pair.owner.api.post("/v1/domainverifications", &json!({"domainName": "orders.example"})).ok("verify");
    let _dnsmasq =
        trellis_e2e::dns::Dnsmasq::start(resolver_port, &[(s(&dv["txtRecordName"]), s(&dv["txtRecordValue"]))]);
    // The first check ran before dnsmasq did; the verifier retries after 30 s.
    pair.owner.wait_status_for(
        &format!("/v1/domainverifications/{}", s(&dv["id"])),
        "status",
        "VERIFIED",
        Duration::from_secs(90),
    );
    service = pair.owner.api.patch(&path, &json!({"privateDnsName": "api.orders.example"})).ok("set the private name");
    assert_eq!(service["privateDnsName"], "api.orders.example");

    let body = json!({
        "vpcEndpointType": "Interface", "vpcId": pair.consumer_vpc, "subnetIds": [pair.consumer_subnet],
        "serviceName": service["serviceName"], "privateDnsEnabled": true,
    });
    let endpoint = pair.consumer.create_endpoint_from(&body);
    let address = match address_of(&endpoint) {
        IpAddr::V4(v4) => v4,
        other => panic!("an IPv4 endpoint address, not {other}"),
    };
    let dns = pair.consumer_agent.dns_addr.expect("the consumer agent's DNS listener");
    let eid = s(&endpoint["id"]);
    for name in [
        format!("{eid}.{sid}.local.trellis.internal"),
        format!("{eid}-z1.{sid}.local.trellis.internal"),
        "api.orders.example".to_string(),
    ] {
        let answer = wait_until(&format!("{name} in the consumer's DNS"), Duration::from_secs(15), || {
            trellis_e2e::dns::resolve_a(dns, &name).ok().filter(|a| !a.is_empty())
        });
        assert_eq!(answer, vec![address], "{name}");
        let greeting = greeting(SocketAddr::new(answer[0].into(), port));
        assert_eq!(greeting.as_deref(), Some("named"), "connecting by {name}");
    }
}
