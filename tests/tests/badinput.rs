//! Bad input is answered precisely and hurts nobody: malformed JSON is 400,
//! invalid fields are 422 naming the field, unknown ids are 404, a garbage
//! join token stops the agent with one clear line, and a malformed open
//! request closes only that tunnel connection.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde_json::json;
use trellis_e2e::flow::endpoint_address;
use trellis_e2e::net::{free_port, loopback_pool};
use trellis_e2e::postgres::{FRUITS, FRUITS_QUERY, psql};
use trellis_e2e::tunnel::{self, AgentCredentials, OpenOutcome};
use trellis_e2e::{Agent, AgentOptions, ControlPlane, Postgres, Tenant};
use trellis_proto::stream::OpenStatus;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[test]
fn api_answers_bad_requests_with_the_right_status_and_a_message_naming_the_field() {
    let cp = ControlPlane::start(LOCALHOST);
    let owner = Tenant::create(&cp, "owner-co");
    let api = &owner.api;

    // No or a wrong key: 401.
    assert_eq!(cp.anonymous().get("/v1/vpcs").status, 401);
    assert_eq!(api.with_key(Some("not-a-key")).get("/v1/vpcs").status, 401);
    // Admin routes: 403 for an account key.
    assert_eq!(api.post("/v1/accounts", &json!({"name": "sneaky"})).status, 403);

    // Malformed JSON: 400.
    for body in ["{\"name\": ", "not json", "[1, 2", ""] {
        let resp = api.post_raw("/v1/vpcs", body);
        assert_eq!(resp.status, 400, "malformed body {body:?}: {}", resp.text);
        assert!(!resp.message().is_empty(), "a 400 carries a message: {}", resp.text);
    }

    // Invalid names: 422 naming the field (every violation listed at once). The
    // minimum length (contract: 3, model: 1) is not asserted until the two agree.
    let long = "x".repeat(41);
    let mut wrong = Vec::new();
    for name in ["UPPER", "", "bad_name", "-lead", "trail-", "dou--ble", "vpc-prefixed", long.as_str()] {
        let resp = api.post("/v1/vpcs", &json!({ "name": name }));
        if resp.status != 422 || !resp.message().contains("name") {
            wrong.push(format!("{name:?} → {} {}", resp.status, resp.text));
        }
    }
    assert!(wrong.is_empty(), "invalid VPC names must be 422 naming `name`:\n{}", wrong.join("\n"));
    let vpc = owner.create_vpc("good-vpc");
    for cidr in ["10.0.0.0/8", "10.0.0.0/30", "not-a-cidr", "300.0.0.0/24"] {
        let resp = api.post("/v1/subnets", &json!({ "vpcId": vpc, "zone": "z1", "cidrBlock": cidr }));
        assert_eq!(resp.status, 422, "cidr {cidr:?}: {}", resp.text);
        assert!(resp.message().contains("cidr") || resp.message().contains("CIDR"), "{}", resp.text);
    }
    let subnet = owner.create_subnet(&vpc, "z1", "10.0.9.0/24");
    let gw = api
        .post("/v1/resourcegateways", &json!({ "name": "good-gw", "vpcIdentifier": vpc, "subnetIds": [subnet] }))
        .ok("create gateway");
    let gw_id = gw["id"].as_str().unwrap();

    // Invalid port ranges: 422 naming portRanges.
    for ranges in [json!(["0"]), json!(["70000"]), json!(["10-5"]), json!(["abc"]), json!(["1-2-3"]), json!([])] {
        let body = json!({
            "name": "bad-ports",
            "type": "SINGLE",
            "resourceGatewayIdentifier": gw_id,
            "resourceConfigurationDefinition": { "ipResource": { "ipAddress": "10.0.0.10" } },
            "portRanges": ranges,
            "protocol": "TCP",
        });
        let resp = api.post("/v1/resourceconfigurations", &body);
        assert_eq!(resp.status, 422, "portRanges {ranges}: {}", resp.text);
        assert!(resp.message().contains("portRanges") || resp.message().contains("port"), "{}", resp.text);
    }
    let bad_ip = json!({
        "name": "bad-ip",
        "type": "SINGLE",
        "resourceGatewayIdentifier": gw_id,
        "resourceConfigurationDefinition": { "ipResource": { "ipAddress": "10.0.0.300" } },
        "portRanges": ["5432"],
        "protocol": "TCP",
    });
    let resp = api.post("/v1/resourceconfigurations", &bad_ip);
    assert!(matches!(resp.status, 400 | 422), "an invalid IP address: {} {}", resp.status, resp.text);

    // Unknown ids: 404, for well-formed and malformed ids alike.
    for path in [
        "/v1/vpcs/vpc-0123456789abcdef0",
        "/v1/subnets/subnet-0123456789abcdef0",
        "/v1/resourcegateways/rgw-0123456789abcdef0",
        "/v1/resourceconfigurations/rcfg-0123456789abcdef0",
        "/v1/resourceconfigurations/rcfg-0123456789abcdef0/usage",
        "/v1/resourceshares/rs-0123456789abcdef0",
        "/v1/resourceshareinvitations/rsi-0123456789abcdef0",
        "/v1/vpcendpoints/vpce-0123456789abcdef0",
        "/v1/agents/agent-0123456789abcdef0",
        "/v1/vpcs/garbage",
    ] {
        let resp = api.get(path);
        assert_eq!(resp.status, 404, "GET {path}: {}", resp.text);
        assert!(resp.json.get("code").is_some(), "errors are {{code, message}}: {}", resp.text);
    }
    assert_eq!(api.delete("/v1/resourceshares/rs-0123456789abcdef0").status, 404);
    let resp = api.post("/v1/resourceshareinvitations/rsi-0123456789abcdef0/accept", &json!({}));
    assert_eq!(resp.status, 404, "{}", resp.text);
    // The server survived all of it.
    assert_eq!(cp.anonymous().get("/healthz").status, 200);
}

#[test]
fn agent_with_a_garbage_join_token_exits_non_zero_with_a_clear_line() {
    let cp = ControlPlane::start(LOCALHOST);
    for (label, token) in [
        ("garbage", "garbage".to_string()),
        // well-formed, but no such token and the wrong CA hash
        ("unknown", format!("trellis1.jt-{}.{}.{}", "0".repeat(16), "a".repeat(64), "b".repeat(64))),
    ] {
        let mut agent = Agent::spawn(AgentOptions {
            name: &format!("agent-{label}-token"),
            control_plane_url: &cp.url,
            join_token: &token,
            bind_ip: LOCALHOST,
            netns: None,
            extra_args: vec![],
        });
        let status = agent.proc.wait_exit(Duration::from_secs(30));
        assert!(!status.success(), "an agent with a {label} join token must fail, got {status}");
        let output = agent.proc.output();
        let lower = output.to_ascii_lowercase();
        assert!(
            lower.contains("join token") || lower.contains("join-token") || lower.contains("ca "),
            "the {label}-token error says what is wrong: {output}"
        );
        assert!(!output.contains(&"a".repeat(64)), "the token secret is never printed: {output}");
        assert!(output.lines().count() <= 10, "one clear line, not a backtrace: {output}");
    }
}

#[test]
fn malformed_open_requests_close_only_their_tunnel_connection() {
    let pg = Postgres::start(LOCALHOST, free_port(LOCALHOST), None);
    let cp = ControlPlane::start(LOCALHOST);
    let owner = Tenant::create(&cp, "owner-co");
    let consumer = Tenant::create(&cp, "consumer-co");
    let start = |tenant: &Tenant, name: &str| {
        let vpc = tenant.create_vpc(&format!("{name}-vpc"));
        let (pool, _) = loopback_pool();
        let subnet = tenant.create_subnet(&vpc, "z1", &pool);
        let token = tenant.join_token(&subnet);
        let agent = Agent::start(AgentOptions {
            name,
            control_plane_url: &cp.url,
            join_token: &token,
            bind_ip: LOCALHOST,
            netns: None,
            extra_args: vec![],
        });
        tenant.wait_agent_online(&subnet);
        (agent, vpc, subnet)
    };
    let (owner_agent, vpc, subnet) = start(&owner, "owner");
    let gw = owner.create_gateway("owner-gw", &vpc, &[&subnet]);
    let cfg = owner.create_ip_config("owner-db", gw["id"].as_str().unwrap(), "127.0.0.1", &[&pg.port.to_string()]);
    let cfg_arn = cfg["arn"].as_str().unwrap();
    let share = owner.share("owner-share", &[cfg_arn], &[consumer.id()]);
    let (consumer_agent, c_vpc, c_subnet) = start(&consumer, "consumer");
    consumer.accept_invitation(share["resourceShareArn"].as_str().or(share["arn"].as_str()).unwrap());
    let ep = consumer.create_endpoint(&c_vpc, &[&c_subnet], cfg_arn);
    let addr = endpoint_address(&ep);
    assert_eq!(psql(None, &addr.ip, pg.port, FRUITS_QUERY).as_deref(), Ok(FRUITS));

    let owner_creds = AgentCredentials::load(&owner_agent.state_dir);
    let consumer_creds = AgentCredentials::load(&consumer_agent.state_dir);
    let server_name = owner_creds.server_name();
    // A pooled, healthy tunnel connection opened before the bad ones.
    let mut healthy = tunnel::connect(owner_agent.tunnel_addr, &server_name, &consumer_creds).expect("tunnel TLS");

    let mut truncated = tunnel::open_request(ep["id"].as_str().unwrap(), cfg["id"].as_str().unwrap(), pg.port);
    truncated[10] = 0xff; // announced body length far beyond the limit
    let mut wrong_version = tunnel::open_request("vpce-x", "rcfg-y", 1);
    wrong_version[4] = 99;
    for (label, bytes) in [
        ("not the protocol", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("oversized body", truncated),
        ("unknown version", wrong_version),
        ("random bytes", (0u8..=255).cycle().skip(7).take(2048).collect()),
    ] {
        let mut s = tunnel::connect(owner_agent.tunnel_addr, &server_name, &consumer_creds).expect("tunnel TLS");
        match tunnel::exchange_open(&mut s, &bytes, &[], 4096) {
            OpenOutcome::Answered { response, rest, closed } => {
                assert_eq!(response.status, OpenStatus::BadRequest, "{label}: {response:?}");
                assert!(rest.is_empty(), "{label}: no payload after a bad request");
                assert!(closed, "{label}: the gateway closes the flow after a bad request");
            }
            OpenOutcome::ClosedWithoutAnswer { bytes, closed } => {
                assert!(bytes.is_empty(), "{label}: {bytes:?}");
                assert!(closed, "{label}: the gateway closes the flow or the connection");
            }
        }
    }

    // The agent still serves: the pooled connection and new ones work.
    let request = tunnel::open_request(ep["id"].as_str().unwrap(), cfg["id"].as_str().unwrap(), pg.port);
    match tunnel::exchange_open(&mut healthy, &request, &trellis_e2e::postgres::startup_message(), 64) {
        OpenOutcome::Answered { response, rest, .. } => {
            assert_eq!(response.status, OpenStatus::Ok, "{response:?}");
            assert_eq!(rest.first(), Some(&b'R'), "PostgreSQL answers through the earlier connection");
        }
        other => panic!("the healthy connection broke: {other:?}"),
    }
    assert_eq!(psql(None, &addr.ip, pg.port, FRUITS_QUERY).as_deref(), Ok(FRUITS));
}
