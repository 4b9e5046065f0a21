//! Relays across real networks (issue 8, tests 1–3): the owner's site sits
//! behind a NAT router namespace that lets nothing in; its PostgreSQL and an
//! outbound-only gateway agent run there. The consumer's endpoint agent runs
//! in another namespace, two relays each in a namespace of their own, the
//! control plane in the root namespace; all meet on the lab's backbone.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_e2e::flow::{STATE_TIMEOUT, endpoint_address};
use trellis_e2e::postgres::{FRUITS, FRUITS_QUERY, psql, psql_with_timeout};
use trellis_e2e::relay::{ClientIdentity, Relay, RelayOptions, relay_hello, relay_token, wait_relay_healthy};
use trellis_e2e::{
    Agent, AgentOptions, ControlPlane, Lab, NatSite, Postgres, Proc, Site, Tenant, bins, require_root, wait_until,
};
use trellis_proto::relay::{Hello, RelayStatus};

const CONSUMER_POOL: &str = "10.0.9.0/24";
const OWNER_POOL: &str = "10.0.8.0/24";
/// The relays' port, inside namespaces of their own (their metrics: the next port).
const RELAY_PORT: u16 = 7444;

/// Everything one test runs. Fields drop in declaration order: processes
/// first, then the namespaces they ran in (the guards run on failure too).
struct World {
    endpoint_ip: String,
    owner_agent: Agent,
    consumer_agent: Agent,
    relays: Vec<Relay>,
    pg: Postgres,
    cp: ControlPlane,
    consumer_site: Site,
    _relay_sites: Vec<Site>,
    owner_site: NatSite,
    _lab: Lab,
}

impl World {
    /// Builds the lab, starts everything, and waits for the first query
    /// through the endpoint.
    fn start() -> World {
        let mut lab = Lab::new();
        let owner_site = lab.add_nat_site("trown");
        let consumer_site = lab.add_site("trcon");
        let relay_sites = vec![lab.add_site("trrla"), lab.add_site("trrlb")];

        // The owner's database listens on the site's LAN address only.
        let pg = Postgres::start(IpAddr::V4(owner_site.lan_addr), 5432, Some(&owner_site.ns));

        let cp = ControlPlane::start(IpAddr::V4(lab.root_addr()));
        // Relay a is in the agents' zone (tried first), relay b in another.
        let relays: Vec<Relay> = relay_sites
            .iter()
            .zip([("relay-a", "z1"), ("relay-b", "z2")])
            .map(|(site, (name, zone))| {
                let token = relay_token(&cp, zone);
                Relay::start(RelayOptions {
                    name,
                    control_plane_url: &cp.url,
                    join_token: &token,
                    bind_ip: IpAddr::V4(site.backbone_addr),
                    port: RELAY_PORT,
                    netns: Some(&site.ns),
                })
            })
            .collect();
        for relay in &relays {
            wait_relay_healthy(&cp, &relay.relay_id, 0, STATE_TIMEOUT);
        }

        let owner = Tenant::create(&cp, "owner-co");
        let consumer = Tenant::create(&cp, "consumer-co");
        let owner_vpc = owner.create_vpc("owner-vpc");
        let owner_subnet = owner.create_subnet(&owner_vpc, "z1", OWNER_POOL);
        let owner_token = owner.join_token(&owner_subnet);
        // Outbound-only: no tunnel listener, no advertised address.
        let owner_agent = Agent::start_endpoint_only(AgentOptions {
            name: "owner-gateway-agent",
            control_plane_url: &cp.url,
            join_token: &owner_token,
            bind_ip: IpAddr::V4(owner_site.lan_addr),
            netns: Some(&owner_site.ns),
            extra_args: vec!["--outbound-only".into()],
        });
        owner.wait_agent_online(&owner_subnet);
        let gateway = owner.create_gateway("owner-gw", &owner_vpc, &[&owner_subnet]);
        let config = owner.create_ip_config(
            "owner-db",
            gateway["id"].as_str().expect("gateway id"),
            &owner_site.lan_addr.to_string(),
            &["5432"],
        );
        let config_arn = config["arn"].as_str().expect("configuration arn").to_string();
        // The gateway agent attaches to both relays.
        for relay in &relays {
            wait_relay_healthy(&cp, &relay.relay_id, 1, STATE_TIMEOUT);
        }

        let consumer_vpc = consumer.create_vpc("consumer-vpc");
        let consumer_subnet = consumer.create_subnet(&consumer_vpc, "z1", CONSUMER_POOL);
        let consumer_token = consumer.join_token(&consumer_subnet);
        let consumer_agent = Agent::start(AgentOptions {
            name: "consumer-agent",
            control_plane_url: &cp.url,
            join_token: &consumer_token,
            bind_ip: IpAddr::V4(consumer_site.backbone_addr),
            netns: Some(&consumer_site.ns),
            extra_args: vec!["--manage-routes".into()],
        });
        consumer.wait_agent_online(&consumer_subnet);

        let share = owner.share("owner-db-share", &[&config_arn], &[consumer.id()]);
        let share_arn = share["resourceShareArn"].as_str().or(share["arn"].as_str()).expect("share arn").to_string();
        consumer.accept_invitation(&share_arn);
        let endpoint = consumer.create_endpoint(&consumer_vpc, &[&consumer_subnet], &config_arn);
        let endpoint_ip = endpoint_address(&endpoint).ip;

        let world = World {
            endpoint_ip,
            owner_agent,
            consumer_agent,
            relays,
            pg,
            cp,
            consumer_site,
            _relay_sites: relay_sites,
            owner_site,
            _lab: lab,
        };
        let answer = wait_until("psql through the endpoint in the consumer namespace", STATE_TIMEOUT, || {
            psql(Some(world.consumer_ns()), &world.endpoint_ip, 5432, FRUITS_QUERY).ok()
        });
        assert_eq!(answer, FRUITS);
        world
    }

    fn consumer_ns(&self) -> &str {
        self.consumer_site.ns.name()
    }

    /// A short query through the endpoint from the consumer namespace.
    fn query(&self, connect_timeout_secs: u32) -> Result<String, String> {
        psql_with_timeout(
            Some(self.consumer_ns()),
            &self.endpoint_ip,
            5432,
            "select name from whoami",
            connect_timeout_secs,
        )
    }
}

/// The agent id in an agent's state directory (`identity.json`).
fn agent_id(agent: &Agent) -> String {
    let path = agent.state_dir.join("identity.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).expect("identity.json is JSON");
    v["agentId"].as_str().expect("agentId in identity.json").to_string()
}

/// The sum of the samples of `name` (any labels) in a Prometheus text, or of
/// those whose labels contain `label` when given.
fn metric(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
        .filter(|l| label.is_none_or(|lb| l.contains(lb)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A TCP connection attempt from inside a namespace, with the harness's probe
/// (connect, then read until close): `Err` with the error when it fails.
fn probe_from(ns: &str, addr: SocketAddr, timeout_ms: u32) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bins::tcp_helper())
        .args(["probe", &addr.to_string(), &timeout_ms.to_string()])
        .output()
        .expect("run trellis-e2e-tcp probe");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Whether a probe error is a failed *connect* (not a read timeout after a connect).
fn connect_failed(err: &str) -> bool {
    ["No route to host", "Network is unreachable", "timed out", "Connection refused"].iter().any(|e| err.contains(e))
        && !err.contains("Resource temporarily unavailable")
}

#[test]
fn consumer_queries_a_database_behind_nat_through_a_relay_and_cannot_reach_the_site_directly() {
    require_root!();
    let started = Instant::now();
    let w = World::start();
    let owner_id = agent_id(&w.owner_agent);

    // The answer came from the owner's database, through a relay.
    assert_eq!(w.query(10).expect("psql through the endpoint"), w.pg.instance);
    // A relayed tunnel connection carries many flows and is logged when it closes; the bytes count as they go.
    wait_until("a relay to count bytes relayed to the gateway agent", STATE_TIMEOUT, || {
        w.relays
            .iter()
            .any(|r| {
                let m = r.metrics().unwrap_or_default();
                metric(&m, "trellis_relay_bytes_total", Some("to_gateway")) > 0.0
            })
            .then_some(())
    });
    for record in w.relays.iter().flat_map(Relay::access_log) {
        assert!(record.get("payload").is_none(), "the access log carries no payload: {record}");
    }
    for relay in &w.relays {
        let m = relay.metrics().expect("relay metrics");
        let attached = metric(&m, "trellis_relay_attachments", Some(owner_id.as_str()));
        assert!(attached >= 1.0, "{} holds attachments of {owner_id}:\n{m}", relay.relay_id);
    }

    // Nothing reaches inside the NAT site directly: neither the database
    // (the site's LAN address, or the router's public one) nor the gateway
    // agent (its metrics listener on the LAN address).
    let db = SocketAddr::new(IpAddr::V4(w.owner_site.lan_addr), 5432);
    let public_db = SocketAddr::new(IpAddr::V4(w.owner_site.public_addr), 5432);
    let agent_metrics = w.owner_agent.metrics_addr.expect("the gateway agent's metrics address");
    for addr in [db, public_db, agent_metrics] {
        let err =
            probe_from(w.consumer_ns(), addr, 1500).expect_err(&format!("{addr} is unreachable from the consumer"));
        assert!(connect_failed(&err), "the connection to {addr} fails at connect: {err}");
    }
    for (host, port) in [(w.owner_site.lan_addr, 5432), (w.owner_site.public_addr, 5432)] {
        let direct = psql_with_timeout(Some(w.consumer_ns()), &host.to_string(), port, "select 1", 2);
        assert!(direct.is_err(), "psql from the consumer straight to {host}:{port} fails, got {direct:?}");
    }
    // Positive control: inside the site the agent's listener is there.
    let inside = probe_from(w.owner_site.ns.name(), agent_metrics, 1500);
    assert!(
        inside.as_ref().is_err_and(|e| !connect_failed(e)) || inside.is_ok(),
        "inside the site the gateway agent's listener accepts: {inside:?}"
    );
    eprintln!("test 1 took {:?}", started.elapsed());
}

#[test]
fn one_of_two_relays_killed_new_connections_go_through_the_other_within_a_second_and_it_comes_back() {
    require_root!();
    let started = Instant::now();
    let mut w = World::start();

    // A connection held open through the endpoint.
    let mut long_cmd = Command::new("ip");
    long_cmd
        .args(["netns", "exec", w.consumer_ns(), "psql", "-X", "-A", "-t", "-q"])
        .args(["-h", &w.endpoint_ip, "-p", "5432", "-U", "postgres", "-d", "postgres"])
        .args(["-c", "select pg_sleep(120)"])
        .env("PGSSLMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "10");
    let log_dir = tempfile::tempdir().expect("temp dir for psql logs");
    let mut long = Proc::spawn("long-psql", long_cmd, log_dir.path());
    // Established: the database runs the query.
    wait_until("the long query to run in the owner's database", STATE_TIMEOUT, || {
        long.assert_running();
        let n = w.pg.psql("select count(*) from pg_stat_activity where query = 'select pg_sleep(120)'").ok()?;
        (n == "1").then_some(())
    });
    // It goes through the relay of the consumer's zone (z1, relay a): the
    // endpoint agent tries its own zone's relays first.
    let victim = 0;
    let flows = w.relays[victim].metrics().expect("relay metrics");
    assert!(metric(&flows, "trellis_relay_active_flows", None) >= 1.0, "relay a relays the long query:\n{flows}");
    let survivor = 1 - victim;
    let relayed_by =
        |relay: &Relay| metric(&relay.metrics().unwrap_or_default(), "trellis_relay_bytes_total", Some("to_gateway"));
    let survivor_bytes_before = relayed_by(&w.relays[survivor]);
    let victim_id = w.relays[victim].relay_id.clone();

    w.relays[victim].kill();
    let killed = Instant::now();
    let mut attempts = 0u32;
    let mut errors = Vec::new();
    let recovered = loop {
        attempts += 1;
        match w.query(2) {
            Ok(name) => break (killed.elapsed(), name),
            Err(e) => errors.push(format!("{:?}: {e}", killed.elapsed())),
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "no new connection within 15 s of killing relay {victim_id}; {attempts} attempts: {errors:#?}"
        );
    };
    let (elapsed, name) = recovered;
    eprintln!("first new connection {elapsed:?} after the kill, attempt {attempts}; failures: {errors:?}");
    assert_eq!(name, w.pg.instance);
    assert!(
        elapsed < Duration::from_secs(1),
        "a new connection succeeded {elapsed:?} after the kill (attempt {attempts}), not within 1 s; failures: {errors:?}"
    );
    assert_eq!(attempts, 1, "the first attempt after the kill succeeds (failures: {errors:?})");

    // The established connection through the killed relay broke.
    let status = long.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "the connection through the killed relay broke; psql: {}", long.output());
    // At the owner's end too: the gateway agent closed its connection to the
    // database (PostgreSQL's side waits in CLOSE-WAIT while pg_sleep runs).
    let owner_ns = w.owner_site.ns.name().to_string();
    wait_until("the gateway agent to close its leg to the database", Duration::from_secs(10), || {
        let out = Command::new("ip")
            .args(["netns", "exec", &owner_ns, "ss", "-Htn", "state", "close-wait", "( sport = :5432 )"])
            .output()
            .expect("run ss");
        (!String::from_utf8_lossy(&out.stdout).trim().is_empty()).then_some(())
    });
    // pg_sleep does not notice a closed client: end it, so the database stops at once.
    w.pg.psql("select pg_terminate_backend(pid) from pg_stat_activity where query = 'select pg_sleep(120)'")
        .expect("end the long query");

    // The new one went through the other relay.
    wait_until("the surviving relay to relay the new flow's bytes", STATE_TIMEOUT, || {
        (relayed_by(&w.relays[survivor]) > survivor_bytes_before).then_some(())
    });

    // Restarted with the same state directory, no manual step: the gateway re-attaches.
    let restart_at = Instant::now();
    w.relays[victim].restart();
    let entry = wait_relay_healthy(&w.cp, &victim_id, 1, STATE_TIMEOUT);
    eprintln!(
        "relay {victim_id} back with attached gateways {} after {:?}",
        entry["attachedGateways"],
        restart_at.elapsed()
    );
    wait_until("the restarted relay to hold an attachment", STATE_TIMEOUT, || {
        w.relays[victim].metrics().is_ok_and(|m| metric(&m, "trellis_relay_attachments", None) >= 1.0).then_some(())
    });
    assert_eq!(w.query(10).expect("a query after the restart"), w.pg.instance);
    eprintln!("test 2 took {:?}", started.elapsed());
}

#[test]
fn the_gateway_side_opens_nothing_toward_the_consumer_and_relays_refuse_unserved_gateways_and_unenrolled_peers() {
    require_root!();
    let started = Instant::now();
    let w = World::start();
    let owner_id = agent_id(&w.owner_agent);
    let consumer_id = agent_id(&w.consumer_agent);
    let ca = w.owner_agent.state_dir.join("ca.crt");

    // From the owner's site there is no route to the consumer's endpoint address.
    let endpoint = SocketAddr::new(w.endpoint_ip.parse().expect("endpoint ip"), 5432);
    let err =
        probe_from(w.owner_site.ns.name(), endpoint, 1500).expect_err("the endpoint is unreachable from the owner");
    assert!(connect_failed(&err), "the owner's connection to {endpoint} fails at connect: {err}");
    let back = psql_with_timeout(Some(w.owner_site.ns.name()), &w.endpoint_ip, 5432, "select 1", 2);
    assert!(back.is_err(), "psql from the owner's site to the consumer's endpoint fails, got {back:?}");

    for relay in &w.relays {
        let hello = |identity, gateway: &str| {
            relay_hello(
                relay.addr,
                &relay.server_name(),
                &ca,
                identity,
                &Hello::Connect { gateway_agent_id: gateway.to_string() },
            )
        };
        // Positive control: the consumer's agent may connect to the owner's gateway agent.
        let ok = hello(ClientIdentity::Agent(&w.consumer_agent.state_dir), &owner_id);
        assert_eq!(ok.as_ref().map(|a| a.status), Ok(RelayStatus::Ok), "consumer → gateway through {}", relay.relay_id);

        // The gateway side, with its own enrolled identity, cannot reach the consumer's agent.
        let back = hello(ClientIdentity::Agent(&w.owner_agent.state_dir), &consumer_id);
        assert_eq!(
            back.as_ref().map(|a| a.status),
            Ok(RelayStatus::NotServed),
            "gateway → consumer's endpoint agent through {}: {back:?}",
            relay.relay_id
        );
        // A gateway the relay does not serve.
        let other = hello(ClientIdentity::Agent(&w.consumer_agent.state_dir), "agent-0123456789abcdef0123456789abcdef");
        assert_eq!(
            other.as_ref().map(|a| a.status),
            Ok(RelayStatus::NotServed),
            "a Connect to an agent the relay does not serve: {other:?}"
        );
        // Peers without an enrolled identity get no answer at all.
        let self_signed = hello(ClientIdentity::SelfSigned, &owner_id);
        assert!(
            self_signed.as_ref().is_err_and(|e| e.contains("alert")),
            "a self-signed client certificate is refused at the TLS handshake, got {self_signed:?}"
        );
        let anonymous = hello(ClientIdentity::None, &owner_id);
        assert!(
            anonymous.as_ref().is_err_and(|e| e.contains("alert")),
            "a client without a certificate is refused at the TLS handshake, got {anonymous:?}"
        );
        eprintln!("{}: self-signed: {self_signed:?}; no certificate: {anonymous:?}", relay.relay_id);

        let m = relay.metrics().expect("relay metrics");
        assert!(
            metric(&m, "trellis_relay_flows_total", Some("not_served")) >= 2.0,
            "the relay counts the refused connects:\n{m}"
        );
        let refusals = metric(&m, "trellis_relay_refusals_total", Some("handshake_failed"));
        assert!(refusals >= 2.0, "the relay counts the two refused handshakes:\n{m}");
    }
    // The gateway agent still serves the consumer.
    assert_eq!(w.query(10).expect("a query after the refusals"), w.pg.instance);
    eprintln!("test 3 took {:?}", started.elapsed());
}
