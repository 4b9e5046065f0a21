//! The owner → consumer flow on loopback with real processes, driven through
//! the `trellis` CLI as a user would: a control plane, an owner agent
//! (gateway), a consumer agent (endpoint) and a real PostgreSQL reached with
//! `psql`. Then the owner revokes and the consumer loses access.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_e2e::flow::{STATE_TIMEOUT, endpoint_address};
use trellis_e2e::net::{free_port, loopback_pool};
use trellis_e2e::postgres::{FRUITS, FRUITS_QUERY, PgSession, psql};
use trellis_e2e::{Agent, AgentOptions, Cli, ControlPlane, Postgres, wait_until};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// DESIGN §2: revoking stops new connections "within seconds"; the suite holds it to 5.
const REVOKE_DEADLINE: Duration = Duration::from_secs(5);

fn str_field(v: &Value, names: &[&str]) -> String {
    names.iter().find_map(|n| v[*n].as_str()).unwrap_or_else(|| panic!("none of {names:?} in {v}")).to_string()
}

/// `trellis <args>` until `field` of its JSON answer equals `want`.
fn cli_wait(cli: &Cli, args: &[&str], field: &str, want: &str) -> Value {
    wait_until(&format!("`trellis {}` to show {field}={want}", args.join(" ")), STATE_TIMEOUT, || {
        let v = cli.json(args);
        let state = v[field].as_str().unwrap_or_default().to_string();
        assert!(!state.to_ascii_uppercase().contains("FAILED"), "`trellis {}`: {v}", args.join(" "));
        (state == want).then_some(v)
    })
}

fn start_agent(cp: &ControlPlane, name: &str, token: &str) -> Agent {
    Agent::start(AgentOptions {
        name,
        control_plane_url: &cp.url,
        join_token: token,
        bind_ip: LOCALHOST,
        netns: None,
        extra_args: vec![],
    })
}

/// Waits until `trellis agent list` shows an ONLINE agent in `subnet`.
fn wait_online(cli: &Cli, subnet: &str) {
    wait_until(&format!("an ONLINE agent in {subnet}"), STATE_TIMEOUT, || {
        let list = cli.json(&["agent", "list"]);
        list["items"].as_array()?.iter().any(|a| a["subnetId"] == subnet && a["status"] == "ONLINE").then_some(())
    });
}

#[test]
fn consumer_reaches_shared_postgres_then_loses_it_when_the_share_is_deleted() {
    let pg = Postgres::start(LOCALHOST, free_port(LOCALHOST), None);
    let cp = ControlPlane::start(LOCALHOST);
    let admin = cp.cli(Some(&cp.admin_key));
    let owner_account = admin.json(&["account", "create", "--name", "owner-co"]);
    let consumer_account = admin.json(&["account", "create", "--name", "consumer-co"]);
    let owner = admin.with_key(&str_field(&owner_account, &["apiKey"]));
    let consumer = admin.with_key(&str_field(&consumer_account, &["apiKey"]));
    let consumer_id = str_field(&consumer_account, &["accountId", "id"]);

    // Owner: a VPC with one agent and a gateway in front of the database.
    let owner_vpc = str_field(&owner.json(&["vpc", "create", "--name", "owner-prod"]), &["vpcId", "id"]);
    let (owner_pool, _) = loopback_pool();
    let owner_subnet =
        owner.json(&["subnet", "create", "--vpc", &owner_vpc, "--zone", "z1", "--cidr-block", &owner_pool]);
    let owner_subnet = str_field(&owner_subnet, &["subnetId", "id"]);
    let owner_token = str_field(&owner.json(&["agent-token", "create", "--subnet", &owner_subnet]), &["token"]);
    let _owner_agent = start_agent(&cp, "owner-agent", &owner_token);
    wait_online(&owner, &owner_subnet);
    let gateway = owner.json(&[
        "resource-gateway",
        "create",
        "--name",
        "owner-gw",
        "--vpc",
        &owner_vpc,
        "--subnet",
        &owner_subnet,
    ]);
    let gateway_id = str_field(&gateway, &["id"]);
    cli_wait(&owner, &["resource-gateway", "get", &gateway_id], "status", "ACTIVE");
    let port = pg.port.to_string();
    let config = owner.json(&[
        "resource-configuration",
        "create",
        "--name",
        "orders-db",
        "--type",
        "SINGLE",
        "--gateway",
        &gateway_id,
        "--ip",
        "127.0.0.1",
        "--port-range",
        &port,
    ]);
    let config_id = str_field(&config, &["id"]);
    let config_arn = str_field(&config, &["arn"]);
    cli_wait(&owner, &["resource-configuration", "get", &config_id], "status", "ACTIVE");

    // Consumer: its own VPC and agent, with an address pool on loopback.
    let consumer_vpc = str_field(&consumer.json(&["vpc", "create", "--name", "consumer-app"]), &["vpcId", "id"]);
    let (consumer_pool, pool_base) = loopback_pool();
    let consumer_subnet =
        consumer.json(&["subnet", "create", "--vpc", &consumer_vpc, "--zone", "z1", "--cidr-block", &consumer_pool]);
    let consumer_subnet = str_field(&consumer_subnet, &["subnetId", "id"]);
    let consumer_token =
        str_field(&consumer.json(&["agent-token", "create", "--subnet", &consumer_subnet]), &["token"]);
    let _consumer_agent = start_agent(&cp, "consumer-agent", &consumer_token);
    wait_online(&consumer, &consumer_subnet);

    // Share, accept the invitation, create the endpoint.
    let share = owner.json(&[
        "resource-share",
        "create",
        "--name",
        "orders-share",
        "--resource-arn",
        &config_arn,
        "--principal",
        &consumer_id,
    ]);
    let share_id = str_field(&share, &["id"]);
    let share_arn = str_field(&share, &["resourceShareArn", "arn"]);
    let invitation = wait_until("the consumer's invitation", STATE_TIMEOUT, || {
        let list = consumer.json(&["invitation", "list"]);
        list["items"].as_array()?.iter().find(|i| i["resourceShareArn"] == share_arn.as_str()).cloned()
    });
    assert_eq!(invitation["status"], "PENDING", "{invitation}");
    let accepted = consumer.json(&["invitation", "accept", &str_field(&invitation, &["id"])]);
    assert_eq!(accepted["status"], "ACCEPTED", "{accepted}");
    let endpoint = consumer.json(&[
        "vpc-endpoint",
        "create",
        "--vpc",
        &consumer_vpc,
        "--subnet",
        &consumer_subnet,
        "--resource-configuration",
        &config_arn,
    ]);
    let endpoint_id = str_field(&endpoint, &["vpcEndpointId", "id"]);
    let endpoint = cli_wait(&consumer, &["vpc-endpoint", "get", &endpoint_id], "state", "Available");
    let address = endpoint_address(&endpoint);
    let endpoint_ip: Ipv4Addr = address.ip.parse().expect("endpoint address is IPv4");
    assert_eq!(
        endpoint_ip.octets()[..3],
        pool_base.octets()[..3],
        "the endpoint address {endpoint_ip} comes from the consumer's pool {consumer_pool}"
    );
    assert!(address.dns_name.ends_with(".trellis.internal"), "DNS name {:?}", address.dns_name);
    assert!(address.dns_name.contains(&config_id), "DNS name {:?} names the configuration", address.dns_name);

    // The real client, through the endpoint, at the resource's native port.
    let answer = psql(None, &address.ip, pg.port, FRUITS_QUERY).expect("psql through the endpoint");
    assert_eq!(answer, FRUITS);
    let who = psql(None, &address.ip, pg.port, "select name from whoami").expect("psql through the endpoint");
    assert_eq!(who, pg.instance, "the endpoint leads to the owner's database");

    // A session that stays open across the revocation.
    let endpoint_addr = SocketAddr::new(IpAddr::V4(endpoint_ip), pg.port);
    let mut open_session = PgSession::open(endpoint_addr, Duration::from_secs(10)).expect("open a session");
    assert_eq!(open_session.query("select count(*) from fruits").expect("query on the open session"), ["3"]);

    // The owner sees who uses the resource.
    let row = wait_until("usage with the consumer's connections and bytes", STATE_TIMEOUT, || {
        let usage = owner.json(&["resource-configuration", "usage", &config_id]);
        usage["items"]
            .as_array()?
            .iter()
            .find(|r| {
                r["consumerAccountId"] == consumer_id.as_str()
                    && r["totalConnections"].as_u64().unwrap_or(0) >= 3
                    && r["activeConnections"].as_u64().unwrap_or(0) >= 1
                    && r["bytesIn"].as_u64().unwrap_or(0) > 0
                    && r["bytesOut"].as_u64().unwrap_or(0) > 0
            })
            .cloned()
    });
    assert_eq!(row["vpcEndpointId"], endpoint_id.as_str(), "{row}");
    // The consumer cannot read the owner's usage.
    let denied = consumer.run(&["resource-configuration", "usage", &config_id, "--output", "json"]);
    assert!(!denied.success, "the consumer must not read the owner's usage: {}", denied.stdout);

    // Revoke: new connections stop within the deadline, the open one is closed.
    owner.json(&["resource-share", "delete", &share_id]);
    let revoked_at = Instant::now();
    let refused_after =
        wait_until("new connections to be refused after the share was deleted", REVOKE_DEADLINE * 2, || {
            PgSession::open(endpoint_addr, Duration::from_secs(1)).is_err().then(|| revoked_at.elapsed())
        });
    assert!(
        refused_after <= REVOKE_DEADLINE,
        "new connections were still accepted {refused_after:?} after the share was deleted (limit {REVOKE_DEADLINE:?})"
    );
    assert!(
        open_session.wait_closed(REVOKE_DEADLINE.saturating_sub(revoked_at.elapsed()) + Duration::from_secs(1)),
        "the session opened before the revocation is still open {:?} after it",
        revoked_at.elapsed()
    );
    let err = psql(None, &address.ip, pg.port, FRUITS_QUERY).expect_err("psql after revocation must fail");
    assert!(!err.is_empty(), "psql explains why it failed");
    // The owner's database itself is untouched.
    assert_eq!(pg.psql(FRUITS_QUERY).expect("direct psql"), FRUITS);
}
