//! Isolation: a third account sees nothing of the owner's objects, cannot use
//! them, and its agent is compiled a config without them; and connectivity is
//! one-way: the gateway side cannot open anything toward the consumer.

use std::net::{IpAddr, Ipv4Addr};

use serde_json::{Value, json};
use trellis_e2e::flow::endpoint_address;
use trellis_e2e::net::{free_port, loopback_pool};
use trellis_e2e::postgres::{FRUITS, FRUITS_QUERY, psql, startup_message};
use trellis_e2e::tunnel::{self, AgentCredentials, OpenOutcome};
use trellis_e2e::{Agent, AgentOptions, Api, ControlPlane, Postgres, Tenant};
use trellis_proto::stream::OpenStatus;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

struct World {
    cp: ControlPlane,
    pg: Postgres,
    owner: Tenant,
    consumer: Tenant,
    third: Tenant,
    owner_agent: Agent,
    consumer_agent: Agent,
    third_agent: Agent,
    vpc: String,
    subnet: String,
    gateway: Value,
    config: Value,
    share: Value,
    endpoint: Value,
}

fn agent(cp: &ControlPlane, tenant: &Tenant, name: &str, vpc_name: &str) -> (Agent, String, String) {
    let vpc = tenant.create_vpc(vpc_name);
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
}

/// Owner shares a database with the consumer (accepted, endpoint Available);
/// a third account has its own VPC and agent.
fn world() -> World {
    let pg = Postgres::start(LOCALHOST, free_port(LOCALHOST), None);
    let cp = ControlPlane::start(LOCALHOST);
    let owner = Tenant::create(&cp, "owner-co");
    let consumer = Tenant::create(&cp, "consumer-co");
    let third = Tenant::create(&cp, "third-co");
    let (owner_agent, vpc, subnet) = agent(&cp, &owner, "owner-agent", "owner-vpc");
    let gateway = owner.create_gateway("owner-gw", &vpc, &[&subnet]);
    let config =
        owner.create_ip_config("owner-db", gateway["id"].as_str().unwrap(), "127.0.0.1", &[&pg.port.to_string()]);
    let share = owner.share("owner-share", &[config["arn"].as_str().unwrap()], &[consumer.id()]);
    let (consumer_agent, c_vpc, c_subnet) = agent(&cp, &consumer, "consumer-agent", "consumer-vpc");
    consumer.accept_invitation(share["resourceShareArn"].as_str().or(share["arn"].as_str()).unwrap());
    let endpoint = consumer.create_endpoint(&c_vpc, &[&c_subnet], config["arn"].as_str().unwrap());
    let (third_agent, _, _) = agent(&cp, &third, "third-agent", "third-vpc");
    World {
        cp,
        pg,
        owner,
        consumer,
        third,
        owner_agent,
        consumer_agent,
        third_agent,
        vpc,
        subnet,
        gateway,
        config,
        share,
        endpoint,
    }
}

fn ids(list: &Value) -> Vec<String> {
    list["items"].as_array().into_iter().flatten().filter_map(|i| i["id"].as_str().map(str::to_string)).collect()
}

/// The agent's own config, fetched as the agent does (its client certificate).
fn agent_config(cp: &ControlPlane, agent: &Agent) -> Value {
    let creds = AgentCredentials::load(&agent.state_dir);
    let api = Api::with_client_cert(&cp.url, &cp.ca_pem, &creds.cert_pem, &creds.key_pem);
    api.get("/v1/agents/self/config?waitSeconds=0").ok("agent config")
}

#[test]
fn a_third_account_cannot_see_or_use_the_owners_objects_and_one_way_holds() {
    let w = world();
    let t = &w.third.api;
    let gw_id = w.gateway["id"].as_str().unwrap();
    let cfg_id = w.config["id"].as_str().unwrap();
    let cfg_arn = w.config["arn"].as_str().unwrap();
    let share_id = w.share["id"].as_str().unwrap();

    // Lists hold none of the owner's objects.
    for (path, owner_id) in [
        ("/v1/resourcegateways", gw_id),
        ("/v1/resourceconfigurations", cfg_id),
        ("/v1/resourceshares", share_id),
        ("/v1/vpcs", w.vpc.as_str()),
        ("/v1/subnets", w.subnet.as_str()),
    ] {
        let list = t.get(path).ok(path);
        assert!(!ids(&list).iter().any(|id| id == owner_id), "{path} of the third account shows {owner_id}: {list}");
    }
    // Reads, writes and usage of the owner's objects are 404, never 403 (no leak).
    for path in [
        format!("/v1/resourcegateways/{gw_id}"),
        format!("/v1/resourceconfigurations/{cfg_id}"),
        format!("/v1/resourceconfigurations/{cfg_id}/usage"),
        format!("/v1/resourceshares/{share_id}"),
        format!("/v1/vpcs/{}", w.vpc),
        format!("/v1/subnets/{}", w.subnet),
    ] {
        assert_eq!(t.get(&path).status, 404, "GET {path} as the third account");
    }
    for path in [format!("/v1/resourceshares/{share_id}"), format!("/v1/resourcegateways/{gw_id}")] {
        assert_eq!(t.delete(&path).status, 404, "DELETE {path} as the third account");
    }
    assert_eq!(w.owner.api.get(&format!("/v1/resourcegateways/{gw_id}")).status, 200, "the owner still has it");
    // The consumer may read the configuration shared with it, not the gateway behind it.
    assert_eq!(w.consumer.api.get(&format!("/v1/resourceconfigurations/{cfg_id}")).status, 200);
    assert_eq!(w.consumer.api.get(&format!("/v1/resourcegateways/{gw_id}")).status, 404);

    // An endpoint to a configuration not shared with it: a clear 4xx.
    let third_vpc = w.third.create_vpc("third-vpc-2");
    let (pool, _) = loopback_pool();
    let third_subnet = w.third.create_subnet(&third_vpc, "z1", &pool);
    let body = json!({
        "vpcEndpointType": "Resource",
        "vpcId": third_vpc,
        "subnetIds": [third_subnet],
        "resourceConfigurationArn": cfg_arn,
    });
    let resp = t.post("/v1/vpcendpoints", &body);
    assert!(matches!(resp.status, 404 | 422), "endpoint to an unshared configuration: {} {}", resp.status, resp.text);
    assert!(
        resp.message().contains("not found") || resp.message().contains("not shared"),
        "the message says why: {}",
        resp.text
    );

    // The third account's agent is compiled a config without the owner's resources.
    let third_cfg = agent_config(&w.cp, &w.third_agent).to_string();
    for secret in [cfg_id, gw_id, w.owner.id(), w.endpoint["id"].as_str().unwrap()] {
        assert!(!third_cfg.contains(secret), "the third agent's config mentions {secret}: {third_cfg}");
    }
    // (and the owner's and consumer's configs do hold what they serve: the check above can fail)
    assert!(agent_config(&w.cp, &w.owner_agent).to_string().contains(cfg_id));
    assert!(agent_config(&w.cp, &w.consumer_agent).to_string().contains(cfg_id));

    // One-way. Positive control first: the consumer agent's identity opens a
    // stream on the owner's gateway and reaches PostgreSQL.
    let endpoint_id = w.endpoint["id"].as_str().or(w.endpoint["vpcEndpointId"].as_str()).unwrap();
    let owner_creds = AgentCredentials::load(&w.owner_agent.state_dir);
    let consumer_creds = AgentCredentials::load(&w.consumer_agent.state_dir);
    let mut s = tunnel::connect(w.owner_agent.tunnel_addr, &owner_creds.server_name(), &consumer_creds)
        .expect("consumer agent → owner gateway TLS");
    let startup = startup_message();
    match tunnel::exchange_open(&mut s, &tunnel::open_request(endpoint_id, cfg_id, w.pg.port), &startup, 64) {
        OpenOutcome::Answered { response, rest, .. } => {
            assert_eq!(response.status, OpenStatus::Ok, "{response:?}");
            assert!(rest.first() == Some(&b'R'), "PostgreSQL answered the startup through the tunnel: {rest:?}");
        }
        other => panic!("the gateway did not answer the consumer's open request: {other:?}"),
    }

    // The gateway side cannot open toward the consumer: the owner agent's
    // identity on the consumer agent's tunnel listener gets nothing.
    match tunnel::connect(w.consumer_agent.tunnel_addr, &consumer_creds.server_name(), &owner_creds) {
        Err(_) => {} // refused at the handshake: fine
        Ok(mut s) => {
            match tunnel::exchange_open(&mut s, &tunnel::open_request(endpoint_id, cfg_id, w.pg.port), &startup, 64) {
                OpenOutcome::Answered { response, rest, .. } => {
                    assert_ne!(response.status, OpenStatus::Ok, "the consumer agent opened a stream for the owner");
                    assert!(rest.is_empty(), "no payload after a refusal: {rest:?}");
                }
                OpenOutcome::ClosedWithoutAnswer { bytes, .. } => {
                    assert!(bytes.is_empty(), "no payload from the consumer side: {bytes:?}")
                }
            }
        }
    }
    // Nor can the third account's agent use the owner's gateway with the consumer's endpoint id:
    // its certificate (same CA) names a VPC with no endpoint there, so the handshake fails.
    let third_creds = AgentCredentials::load(&w.third_agent.state_dir);
    match tunnel::connect(w.owner_agent.tunnel_addr, &owner_creds.server_name(), &third_creds) {
        Err(_) => {} // refused during the handshake
        Ok(mut s) => {
            // TLS 1.3: the client finishes before the server has judged its certificate.
            match tunnel::exchange_open(&mut s, &tunnel::open_request(endpoint_id, cfg_id, w.pg.port), &startup, 64) {
                OpenOutcome::Answered { response, .. } => {
                    panic!("a stranger's open request was answered: {response:?}")
                }
                OpenOutcome::ClosedWithoutAnswer { bytes, closed } => {
                    assert!(bytes.is_empty() && closed, "a stranger got {bytes:?} (closed: {closed})")
                }
            }
        }
    }

    // The legitimate path is unaffected by all of the above.
    let ep = w.consumer.api.get(&format!("/v1/vpcendpoints/{endpoint_id}")).ok("endpoint");
    let addr = endpoint_address(&ep);
    let answer = psql(None, &addr.ip, w.pg.port, FRUITS_QUERY);
    assert_eq!(answer.as_deref(), Ok(FRUITS));
}
