//! Names on both sides of an endpoint.
//!
//! Consumer side: the consumer agent's DNS listener answers the endpoint's
//! name (`<vpce>.<rcfg>.<region>.trellis.internal`) with the endpoint address,
//! NXDOMAIN for other names under `trellis.internal`, and forwards everything
//! else to its upstream resolver (a stub on loopback here). In a consumer VPC
//! whose resolver is the agent, `psql -h <endpoint name>` just works.
//!
//! Owner side: a `dnsResource` configuration names its target by DNS name;
//! the gateway agent resolves it in the owner's own network.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use serde_json::json;
use trellis_e2e::dns::{StubUpstream, Transport, query, resolve_a};
use trellis_e2e::flow::{STATE_TIMEOUT, endpoint_address};
use trellis_e2e::net::free_port;
use trellis_e2e::postgres::{FRUITS, FRUITS_QUERY, psql, psql_conninfo};
use trellis_e2e::{
    Agent, AgentOptions, ControlPlane, Lab, LoopbackPair, PairOptions, Postgres, Tenant, require_root, wait_until,
};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent's upstream timeout (3 s) plus slack for a loaded machine.
const SERVFAIL_WITHIN: Duration = Duration::from_secs(6);
/// The owner's custom name for its database, answered by consumer agents
/// whose endpoint has private DNS enabled.
const CUSTOM_NAME: &str = "orders.acme.example";
/// An address from TEST-NET-2 that only the stub upstream hands out.
const PARTNER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

fn arn(v: &serde_json::Value) -> String {
    v["arn"].as_str().unwrap_or_else(|| panic!("no arn in {v}")).to_string()
}

#[test]
fn the_consumer_agent_answers_endpoint_names_and_forwards_other_names() {
    let upstream = StubUpstream::start(&[("partner.example", PARTNER_IP)]);
    let pg = Postgres::start(LOCALHOST, free_port(LOCALHOST), None);
    let env = LoopbackPair::start_with(PairOptions {
        consumer_agent_args: vec!["--dns-upstream".into(), upstream.addr.to_string()],
        ..PairOptions::default()
    });
    let config = env.owner.create_config(&json!({
        "name": "orders-db",
        "type": "SINGLE",
        "resourceGatewayIdentifier": env.gateway_id,
        "resourceConfigurationDefinition": { "ipResource": { "ipAddress": "127.0.0.1" } },
        "portRanges": [pg.port.to_string()],
        "protocol": "TCP",
        "customDomainName": CUSTOM_NAME,
    }));
    let share = env.share("orders-share", &arn(&config));
    let endpoint = env.consumer.create_endpoint_from(&json!({
        "vpcEndpointType": "Resource",
        "vpcId": env.consumer_vpc,
        "subnetIds": [env.consumer_subnet],
        "resourceConfigurationArn": arn(&config),
        "privateDnsEnabled": true,
    }));
    let at = endpoint_address(&endpoint);
    assert!(at.dns_name.ends_with(".trellis.internal"), "the first name is the generated one: {endpoint}");
    let endpoint_ip: Ipv4Addr = at.ip.parse().expect("endpoint address is IPv4");
    let dns = env.consumer_agent.dns_addr.expect("the consumer agent reports its DNS address");

    // The endpoint's name, over UDP and TCP, in any letter case.
    for (name, transport) in [
        (at.dns_name.clone(), Transport::Udp),
        (at.dns_name.clone(), Transport::Tcp),
        (at.dns_name.to_uppercase(), Transport::Udp),
    ] {
        let answer =
            query(dns, &name, RecordType::A, transport, QUERY_TIMEOUT).expect("an answer for the endpoint name");
        assert_eq!(answer.response_code, ResponseCode::NoError, "{name} over {transport:?}: {:?}", answer.message);
        assert!(answer.authoritative, "the agent is authoritative for endpoint names");
        assert_eq!(answer.addresses, vec![IpAddr::V4(endpoint_ip)], "{name} over {transport:?}");
    }
    // The owner's custom name is under no domain it verified, so by default
    // the consumer's DNS does not answer it: a provider cannot put names of its
    // choosing into a consumer's VPC.
    assert!(
        endpoint["dnsEntries"].as_array().expect("dnsEntries").iter().any(|e| e["dnsName"] == CUSTOM_NAME),
        "the endpoint lists the custom name: {endpoint}"
    );
    assert_ne!(resolve_a(dns, CUSTOM_NAME).ok(), Some(vec![endpoint_ip]), "an unverified custom name resolved");
    // A consumer that trusts the provider opts in (privateDnsPreference ALL_DOMAINS):
    // then the custom name answers with that endpoint's address.
    let trusting = env.consumer.create_endpoint_from(&json!({
        "vpcEndpointType": "Resource",
        "vpcId": env.consumer_vpc,
        "subnetIds": [env.consumer_subnet],
        "resourceConfigurationArn": arn(&config),
        "privateDnsEnabled": true,
        "privateDnsPreference": "ALL_DOMAINS",
    }));
    let trusting_ip: Ipv4Addr = endpoint_address(&trusting).ip.parse().expect("endpoint address is IPv4");
    wait_until("the custom name to resolve for the endpoint that opted in", STATE_TIMEOUT, || {
        (resolve_a(dns, CUSTOM_NAME).ok()? == vec![trusting_ip]).then_some(())
    });
    // An IPv4 endpoint has no AAAA record, which is not an error.
    let aaaa = query(dns, &at.dns_name, RecordType::AAAA, Transport::Udp, QUERY_TIMEOUT).expect("AAAA answer");
    assert_eq!((aaaa.response_code, aaaa.addresses.len()), (ResponseCode::NoError, 0), "{:?}", aaaa.message);

    // Other names under trellis.internal do not exist, and never leave the agent.
    let before = upstream.queries();
    let config_id = config["id"].as_str().expect("config id");
    let unknown = format!("vpce-0123456789abcdef0.{config_id}.local.trellis.internal");
    let nx = query(dns, &unknown, RecordType::A, Transport::Udp, QUERY_TIMEOUT).expect("an answer for an unknown name");
    assert_eq!(nx.response_code, ResponseCode::NXDomain, "{:?}", nx.message);
    assert!(nx.addresses.is_empty());
    assert_eq!(upstream.queries(), before, "names under trellis.internal are not forwarded");

    // Everything else goes to the upstream resolver, answer unchanged.
    assert_eq!(resolve_a(dns, "partner.example").expect("a forwarded answer"), vec![PARTNER_IP]);
    assert_eq!(upstream.queries(), before + 1, "the stub upstream saw the forwarded query");
    // An upstream that does not answer gives SERVFAIL, not silence.
    let started = Instant::now();
    let fail = query(dns, "silent.example", RecordType::A, Transport::Udp, QUERY_TIMEOUT).expect("an answer");
    assert_eq!(fail.response_code, ResponseCode::ServFail, "{:?}", fail.message);
    assert!(
        started.elapsed() < SERVFAIL_WITHIN,
        "SERVFAIL took {:?}; the agent gives up on its upstream after 3 s",
        started.elapsed()
    );

    // The name is private: only the agent knows it. A client resolves it there
    // and connects to the address it got.
    let resolved = resolve_a(dns, &at.dns_name).expect("resolve the endpoint name");
    let ip = resolved.first().expect("one address").to_string();
    assert_eq!(psql(None, &ip, pg.port, FRUITS_QUERY).expect("psql to the resolved address"), FRUITS);
    // libpq with the name as host and the resolved address as hostaddr: what
    // a client configured with the endpoint's name does once it has an answer.
    let conninfo = format!("host={} hostaddr={ip} port={}", at.dns_name, pg.port);
    assert_eq!(psql_conninfo(None, &conninfo, "select name from whoami").expect("psql by name"), pg.instance);

    // When the share is revoked the name disappears with the endpoint's access.
    env.owner.api.delete(&format!("/v1/resourceshares/{}", share["id"].as_str().expect("share id"))).ok("delete share");
    wait_until("the endpoint name to stop resolving after the share was deleted", STATE_TIMEOUT, || {
        let a = query(dns, &at.dns_name, RecordType::A, Transport::Udp, QUERY_TIMEOUT).ok()?;
        (a.response_code == ResponseCode::NXDomain && a.addresses.is_empty()).then_some(())
    });
    // The custom name is no longer the agent's to answer: it goes upstream,
    // which does not know it (the stub stays silent), so no address comes back.
    let custom = query(dns, CUSTOM_NAME, RecordType::A, Transport::Udp, QUERY_TIMEOUT).expect("an answer");
    assert!(custom.addresses.is_empty(), "a revoked custom name must not resolve: {:?}", custom.message);
}

#[test]
fn a_dns_resource_is_dialed_by_its_name_on_the_owner_side() {
    let pg = Postgres::start(LOCALHOST, free_port(LOCALHOST), None);
    let env = LoopbackPair::start();
    // `localhost` is a valid single-label domain name; it resolves to 127.0.0.1
    // (and ::1, where nothing listens: the gateway must try the next address).
    let config = env.owner.create_dns_config("orders-db", &env.gateway_id, "localhost", &[&pg.port.to_string()]);
    assert_eq!(
        config["resourceConfigurationDefinition"]["dnsResource"]["domainName"], "localhost",
        "the definition keeps the name: {config}"
    );
    env.share("orders-share", &arn(&config));
    let at = endpoint_address(&env.create_endpoint(&arn(&config)));
    assert_eq!(psql(None, &at.ip, pg.port, FRUITS_QUERY).expect("psql through a dnsResource"), FRUITS);
    assert_eq!(psql(None, &at.ip, pg.port, "select name from whoami").expect("psql"), pg.instance);

    // The gateway's access log names the target it dialed by name.
    let target = format!("localhost:{}", pg.port);
    wait_until("the gateway's access-log line for the dnsResource", STATE_TIMEOUT, || {
        env.owner_agent.access_log().into_iter().find(|r| r["role"] == "gateway" && r["target"] == target.as_str())
    });
}

/// The name of the owner's database, known only inside the owner's network.
const OWNER_DB_NAME: &str = "orders-db.owner.lan";
const OWNER_DB_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);

/// `getent hosts NAME` inside `ns`: what the namespace's resolver says.
fn getent(site: &trellis_e2e::Site, name: &str) -> Option<String> {
    let out = site.command("getent").args(["hosts", name]).output().expect("run getent");
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn names_resolve_where_they_belong_the_owners_in_its_network_the_endpoints_at_the_consumer_agent() {
    require_root!();
    let mut lab = Lab::new();
    let mut owner_site = lab.add_site("trown");
    let mut consumer_site = lab.add_site("trcon");
    // The owner's network has its own name for the database (its /etc/hosts,
    // seen only by programs started in that namespace).
    owner_site.ns.set_hosts(&format!("127.0.0.1 localhost\n{OWNER_DB_IP} {OWNER_DB_NAME}\n"));
    // The consumer's network uses its agent as its resolver (port 53 on the
    // agent's address in that namespace).
    let consumer_dns = SocketAddr::new(IpAddr::V4(consumer_site.backbone_addr), 53);
    consumer_site.ns.set_resolv_conf(&format!("nameserver {}\n", consumer_dns.ip()));
    owner_site.add_local_address(IpAddr::V4(OWNER_DB_IP));
    let pg = Postgres::start(IpAddr::V4(OWNER_DB_IP), 5432, Some(&owner_site.ns));

    assert_eq!(
        getent(&owner_site, OWNER_DB_NAME).as_deref().and_then(|l| l.split_whitespace().next()),
        Some("10.0.0.10"),
        "the owner's network resolves its own name"
    );
    assert_eq!(getent(&consumer_site, OWNER_DB_NAME), None, "the consumer's network does not know the owner's name");

    let cp = ControlPlane::start(IpAddr::V4(lab.root_addr()));
    let owner = Tenant::create(&cp, "owner-co");
    let consumer = Tenant::create(&cp, "consumer-co");
    let owner_vpc = owner.create_vpc("owner-vpc");
    let owner_subnet = owner.create_subnet(&owner_vpc, "z1", "10.0.8.0/24");
    let owner_agent = Agent::start(AgentOptions {
        name: "owner-agent",
        control_plane_url: &cp.url,
        join_token: &owner.join_token(&owner_subnet),
        bind_ip: IpAddr::V4(owner_site.backbone_addr),
        netns: Some(&owner_site.ns),
        extra_args: vec![],
    });
    owner.wait_agent_online(&owner_subnet);
    let gateway = owner.create_gateway("owner-gw", &owner_vpc, &[&owner_subnet]);
    let config = owner.create_config(&json!({
        "name": "orders-db",
        "type": "SINGLE",
        "resourceGatewayIdentifier": gateway["id"],
        "resourceConfigurationDefinition": { "dnsResource": { "domainName": OWNER_DB_NAME } },
        "portRanges": ["5432"],
        "protocol": "TCP",
        "customDomainName": CUSTOM_NAME,
    }));

    let consumer_vpc = consumer.create_vpc("consumer-vpc");
    let consumer_subnet = consumer.create_subnet(&consumer_vpc, "z1", "10.0.9.0/24");
    let consumer_agent = Agent::start(AgentOptions {
        name: "consumer-agent",
        control_plane_url: &cp.url,
        join_token: &consumer.join_token(&consumer_subnet),
        bind_ip: IpAddr::V4(consumer_site.backbone_addr),
        netns: Some(&consumer_site.ns),
        extra_args: vec!["--manage-routes".into(), "--dns-listen".into(), consumer_dns.to_string()],
    });
    assert_eq!(consumer_agent.dns_addr, Some(consumer_dns), "the consumer agent serves DNS where its VPC asks");
    consumer.wait_agent_online(&consumer_subnet);

    let share = owner.share("orders-share", &[&arn(&config)], &[consumer.id()]);
    consumer.accept_invitation(&trellis_e2e::flow::share_arn(&share));
    let at = endpoint_address(&consumer.create_endpoint_from(&json!({
        "vpcEndpointType": "Resource",
        "vpcId": consumer_vpc,
        "subnetIds": [consumer_subnet],
        "resourceConfigurationArn": arn(&config),
        "privateDnsEnabled": true,
        // The owner's custom name is not under a verified domain: this consumer trusts it anyway.
        "privateDnsPreference": "ALL_DOMAINS",
    })));

    // psql in the consumer VPC, by the endpoint's name, through the system
    // resolver (the agent), to the owner's database dialed by the owner's name.
    let consumer_ns = Some(consumer_site.ns.name());
    let answer = wait_until("psql by the endpoint's name in the consumer VPC", STATE_TIMEOUT, || {
        psql(consumer_ns, &at.dns_name, 5432, FRUITS_QUERY).ok()
    });
    assert_eq!(answer, FRUITS);
    assert_eq!(psql(consumer_ns, &at.dns_name, 5432, "select name from whoami").expect("psql by name"), pg.instance);
    assert_eq!(
        getent(&consumer_site, &at.dns_name).as_deref().and_then(|l| l.split_whitespace().next()),
        Some(at.ip.as_str()),
        "the consumer VPC's resolver gives the endpoint address"
    );
    // With private DNS, the owner's custom name works the same way there.
    assert_eq!(
        psql(consumer_ns, CUSTOM_NAME, 5432, "select name from whoami").expect("psql by custom name"),
        pg.instance
    );
    // Outside the consumer VPC the endpoint's name means nothing.
    let err = psql(Some(owner_site.ns.name()), &at.dns_name, 5432, "select 1").expect_err("the name is private");
    assert!(err.contains("translate host name") || err.contains("could not"), "psql says why: {err}");

    let target = format!("{OWNER_DB_NAME}:5432");
    wait_until("the gateway's access-log line naming the target by name", STATE_TIMEOUT, || {
        owner_agent.access_log().into_iter().find(|r| r["role"] == "gateway" && r["target"] == target.as_str())
    });
}
