//! Across networks: an owner VPC and a consumer VPC in separate network
//! namespaces that use the SAME CIDR (10.0.0.0/24), joined only by a backbone
//! that carries the agents' traffic. The consumer reaches the owner's
//! 10.0.0.10 through its endpoint, while its own 10.0.0.10 stays its own.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use trellis_e2e::flow::{STATE_TIMEOUT, endpoint_address};
use trellis_e2e::postgres::{FRUITS, FRUITS_QUERY, psql};
use trellis_e2e::{Agent, AgentOptions, ControlPlane, Lab, Postgres, Proc, Tenant, bins, require_root, wait_until};

const LAN_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const CONSUMER_POOL: &str = "10.0.9.0/24";
const OWNER_POOL: &str = "10.0.8.0/24";

/// Runs the TCP helper's probe inside `ns`; returns what the server said.
fn probe(site: &trellis_e2e::Site, addr: &str) -> Result<String, String> {
    let out = site.command(bins::tcp_helper()).args(["probe", addr]).output().expect("run trellis-e2e-tcp probe");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

#[test]
fn consumer_in_an_overlapping_vpc_reaches_the_owners_database_through_its_endpoint() {
    require_root!();
    let mut lab = Lab::new();
    let owner_site = lab.add_site("trown");
    let consumer_site = lab.add_site("trcon");

    // Both VPCs have 10.0.0.10; each serves something different there.
    owner_site.add_local_address(IpAddr::V4(LAN_HOST));
    consumer_site.add_local_address(IpAddr::V4(LAN_HOST));
    let pg = Postgres::start(IpAddr::V4(LAN_HOST), 5432, Some(&owner_site.ns));
    let mut local_cmd = consumer_site.command(bins::tcp_helper());
    local_cmd.args(["serve", &format!("{LAN_HOST}:5432"), "consumer-local"]);
    let log_dir = tempfile::tempdir().expect("temp dir for helper logs");
    let mut local_service = Proc::spawn("consumer-local-service", local_cmd, log_dir.path());
    local_service.wait_for_line("the consumer-local service to listen", Duration::from_secs(10), |l| {
        l.starts_with("listening on").then_some(())
    });
    // The endpoint pools are addresses reserved for Trellis in each network;
    // the consumer agent makes its pool local itself (`--manage-routes`).

    // Nothing crosses between the VPCs except through Trellis.
    assert!(
        psql(Some(consumer_site.ns.name()), &LAN_HOST.to_string(), 5432, "select 1").is_err(),
        "the consumer's 10.0.0.10 is not the owner's database"
    );
    assert_eq!(probe(&consumer_site, &format!("{LAN_HOST}:5432")).as_deref(), Ok("consumer-local"));

    // The control plane runs in the root namespace, on the backbone.
    let cp = ControlPlane::start(IpAddr::V4(lab.root_addr()));
    let owner = Tenant::create(&cp, "owner-co");
    let consumer = Tenant::create(&cp, "consumer-co");

    let owner_vpc = owner.create_vpc("owner-vpc");
    let owner_subnet = owner.create_subnet(&owner_vpc, "z1", OWNER_POOL);
    let owner_token = owner.join_token(&owner_subnet);
    let _owner_agent = Agent::start(AgentOptions {
        name: "owner-agent",
        control_plane_url: &cp.url,
        join_token: &owner_token,
        bind_ip: IpAddr::V4(owner_site.backbone_addr),
        netns: Some(&owner_site.ns),
        extra_args: vec![],
    });
    owner.wait_agent_online(&owner_subnet);
    let gateway = owner.create_gateway("owner-gw", &owner_vpc, &[&owner_subnet]);
    let config = owner.create_ip_config("owner-db", gateway["id"].as_str().unwrap(), &LAN_HOST.to_string(), &["5432"]);
    let config_arn = config["arn"].as_str().expect("configuration arn").to_string();

    let consumer_vpc = consumer.create_vpc("consumer-vpc");
    let consumer_subnet = consumer.create_subnet(&consumer_vpc, "z1", CONSUMER_POOL);
    let consumer_token = consumer.join_token(&consumer_subnet);
    let _consumer_agent = Agent::start(AgentOptions {
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
    let address = endpoint_address(&endpoint);
    assert!(address.ip.starts_with("10.0.9."), "endpoint address {} is from the consumer pool", address.ip);

    // The consumer's psql, in the consumer VPC, reaches the owner's data.
    let answer = wait_until("psql through the endpoint in the consumer namespace", STATE_TIMEOUT, || {
        psql(Some(consumer_site.ns.name()), &address.ip, 5432, FRUITS_QUERY).ok()
    });
    assert_eq!(answer, FRUITS);
    let who = psql(Some(consumer_site.ns.name()), &address.ip, 5432, "select name from whoami").expect("psql");
    assert_eq!(who, pg.instance);
    // The source NAT: the database sees the owner agent, not a consumer address.
    let client = psql(Some(consumer_site.ns.name()), &address.ip, 5432, "select host(inet_client_addr())")
        .expect("psql inet_client_addr");
    assert!(
        !client.starts_with("10.0.9.") && client != consumer_site.backbone_addr.to_string() && !client.is_empty(),
        "the database sees an address of the owner's side (source NAT), not the consumer's: got {client:?}"
    );

    // And the consumer's own 10.0.0.10 is still its own.
    assert_eq!(probe(&consumer_site, &format!("{LAN_HOST}:5432")).as_deref(), Ok("consumer-local"));
    local_service.assert_running();
}
