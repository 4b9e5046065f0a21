//! Relays in the control plane, on the router: relay join tokens (admin),
//! enrollment, the relay's config long-poll and reports, the admin's view,
//! deletion, and which certificate opens which routes.

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};
use support::{Acct, Api, csr, fingerprint};

/// A relay join token made by the admin.
async fn relay_token(api: &Api, zone: Option<&str>) -> String {
    let body = match zone {
        Some(z) => json!({"zone": z}),
        None => json!({}),
    };
    let v = api.create("/v1/relay-tokens", &api.admin, body).await;
    v["token"].as_str().unwrap().to_string()
}

async fn enroll_relay(api: &Api, token: &str, advertise: &str) -> (StatusCode, Value) {
    let body = json!({"joinToken": token, "csrPem": csr(), "advertise": advertise, "hostname": "relay-host"});
    api.call_as("POST", "/v1/relays/enroll", None, Some(body)).await
}

/// Enrolls a relay of `zone`; returns (relay id, certificate fingerprint).
async fn relay(api: &Api, zone: &str, advertise: &str) -> (String, String) {
    let token = relay_token(api, Some(zone)).await;
    let (status, body) = enroll_relay(api, &token, advertise).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    (body["relayId"].as_str().unwrap().to_string(), fingerprint(body["certificatePem"].as_str().unwrap()))
}

/// A VPC and a subnet of `zone` of `owner`; returns the subnet id.
async fn subnet(api: &Api, owner: &Acct, zone: &str, cidr: &str) -> String {
    let vpc = api.create("/v1/vpcs", &owner.key, json!({"name": "site"})).await;
    let subnet =
        api.create("/v1/subnets", &owner.key, json!({"vpcId": vpc["id"], "zone": zone, "cidrBlock": cidr})).await;
    subnet["id"].as_str().unwrap().to_string()
}

/// Enrolls an agent into `subnet`; returns (agent id, certificate fingerprint).
async fn agent(api: &Api, owner: &Acct, subnet: &str, outbound_only: bool) -> (String, String) {
    let token = api.create("/v1/agent-tokens", &owner.key, json!({"subnetId": subnet})).await;
    let mut body = json!({"joinToken": token["token"], "csrPem": csr(), "hostname": "gw-host"});
    if outbound_only {
        body["outboundOnly"] = json!(true);
    } else {
        body["advertise"] = json!("192.0.2.50:7443");
    }
    let (status, body) = api.call_as("POST", "/v1/agents/enroll", None, Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    (body["agentId"].as_str().unwrap().to_string(), fingerprint(body["certificatePem"].as_str().unwrap()))
}

async fn relay_config(api: &Api, relay_cert: &str, after: u64, wait: u64) -> (StatusCode, Value) {
    api.call_as("GET", &format!("/v1/relays/self/config?after={after}&waitSeconds={wait}"), Some(relay_cert), None)
        .await
}

async fn agent_config(api: &Api, agent_cert: &str) -> Value {
    let (status, body) =
        api.call_as("GET", "/v1/agents/self/config?after=0&waitSeconds=0", Some(agent_cert), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn gateway_ids(config: &Value) -> Vec<String> {
    config["gateways"].as_array().unwrap().iter().map(|g| g["agentId"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn relay_tokens_are_for_the_admin_and_enroll_one_relay() {
    let api = Api::new();
    let acct = api.account("acme").await;
    let (status, body) = api.call("POST", "/v1/relay-tokens", &acct.key, Some(json!({}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(api.get("/v1/relay-tokens", &acct.key).await.0, StatusCode::FORBIDDEN);
    let (status, body) = api.call("POST", "/v1/relay-tokens", &api.admin, Some(json!({"zone": "Not A Zone"}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, _) = api.call("POST", "/v1/relay-tokens", &api.admin, Some(json!({"expiresInSeconds": 5}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    let created = api.create("/v1/relay-tokens", &api.admin, json!({"zone": "z1"})).await;
    let token = created["token"].as_str().unwrap();
    assert!(token.starts_with("trellis1."), "{created}");
    assert_eq!((created["state"].as_str(), created["zone"].as_str()), (Some("VALID"), Some("z1")));

    let (status, body) = enroll_relay(&api, token, "relay.example.com:7000").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["zone"], "z1");
    let relay_id = body["relayId"].as_str().unwrap();
    assert!(relay_id.starts_with("relay-"), "{body}");

    // Single use: the second enrollment is refused and says why.
    let (status, body) = enroll_relay(&api, token, "relay.example.com:7000").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body["message"].as_str().unwrap().contains("already used"), "{body}");

    let id = created["id"].as_str().unwrap();
    let (status, view) = api.get(&format!("/v1/relay-tokens/{id}"), &api.admin).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!((view["state"].as_str(), view["relayId"].as_str()), (Some("USED"), Some(relay_id)));
    assert!(view.get("token").is_none() && !view.to_string().contains(token), "never the secret: {view}");
    let (_, list) = api.get("/v1/relay-tokens", &api.admin).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(api.call("DELETE", &format!("/v1/relay-tokens/{id}"), &api.admin, None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(api.get(&format!("/v1/relay-tokens/{id}"), &api.admin).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn agent_and_relay_tokens_do_not_enroll_each_other() {
    let api = Api::new();
    let acct = api.account("acme").await;
    let subnet = subnet(&api, &acct, "z1", "10.0.9.0/24").await;
    let agent_token = api.create("/v1/agent-tokens", &acct.key, json!({"subnetId": subnet})).await;
    let (status, body) = enroll_relay(&api, agent_token["token"].as_str().unwrap(), "192.0.2.1:7000").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["message"].as_str().unwrap().contains("agent's join token"), "{body}");

    let relay_token = relay_token(&api, None).await;
    let body = json!({"joinToken": relay_token, "csrPem": csr(), "hostname": "h"});
    let (status, body) = api.call_as("POST", "/v1/agents/enroll", None, Some(body)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["message"].as_str().unwrap().contains("relay's join token"), "{body}");
    // Neither attempt used the token.
    assert_eq!(enroll_relay(&api, &relay_token, "192.0.2.1:7000").await.0, StatusCode::OK);
}

/// `token` with its secret replaced by `secret` (64 lower-case hex).
fn with_secret(token: &str, secret: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 4, "{token}");
    format!("{}.{}.{secret}.{}", parts[0], parts[1], parts[3])
}

/// `token` with its id replaced by one no token has.
fn with_unknown_id(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!("{}.jt-00000000000000ff.{}.{}", parts[0], parts[2], parts[3])
}

#[tokio::test]
async fn a_wrong_secret_does_not_tell_which_kind_of_token_an_id_names() {
    let api = Api::new();
    let acct = api.account("acme").await;
    let subnet = subnet(&api, &acct, "z1", "10.0.9.0/24").await;
    let wrong = "e".repeat(64);

    // A relay token's id with a wrong secret, given to agent enrollment: as if the id were unknown.
    let relay_token = relay_token(&api, None).await;
    let enroll_agent = |token: String| {
        let body = json!({"joinToken": token, "csrPem": csr(), "hostname": "h"});
        api.call_as("POST", "/v1/agents/enroll", None, Some(body))
    };
    let guessed = enroll_agent(with_secret(&relay_token, &wrong)).await;
    let unknown = enroll_agent(with_unknown_id(&relay_token)).await;
    assert_eq!(unknown.0, StatusCode::UNAUTHORIZED, "{}", unknown.1);
    assert_eq!(guessed, unknown, "a wrong secret learns nothing about the token");
    assert!(!guessed.1.to_string().contains("relay"), "{}", guessed.1);

    // An agent token's id with a wrong secret, given to relay enrollment: the same.
    let agent_token = api.create("/v1/agent-tokens", &acct.key, json!({"subnetId": subnet})).await;
    let agent_token = agent_token["token"].as_str().unwrap();
    let guessed = enroll_relay(&api, &with_secret(agent_token, &wrong), "192.0.2.1:7000").await;
    let unknown = enroll_relay(&api, &with_unknown_id(agent_token), "192.0.2.1:7000").await;
    assert_eq!(unknown.0, StatusCode::UNAUTHORIZED, "{}", unknown.1);
    assert_eq!(guessed, unknown, "a wrong secret learns nothing about the token");
    assert!(!guessed.1.to_string().contains("agent's"), "{}", guessed.1);

    // With the right secret, each still says which command the token is for, and is not used up.
    let (_, body) = enroll_relay(&api, agent_token, "192.0.2.1:7000").await;
    assert!(body["message"].as_str().unwrap().contains("agent's join token"), "{body}");
    let (_, body) = enroll_agent(relay_token.clone()).await;
    assert!(body["message"].as_str().unwrap().contains("relay's join token"), "{body}");
    assert_eq!(enroll_relay(&api, &relay_token, "192.0.2.1:7000").await.0, StatusCode::OK);
}

#[tokio::test]
async fn the_relay_certificate_names_a_relay_and_no_agent() {
    let api = Api::new();
    let token = relay_token(&api, Some("z1")).await;
    let (_, body) = enroll_relay(&api, &token, "192.0.2.1:7000").await;
    let id = body["relayId"].as_str().unwrap();
    use rustls::pki_types::pem::PemObject;
    let der =
        rustls::pki_types::CertificateDer::from_pem_slice(body["certificatePem"].as_str().unwrap().as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let sans = &cert.subject_alternative_name().unwrap().unwrap().value.general_names;
    let names: Vec<String> = sans.iter().map(|n| n.to_string()).collect();
    assert!(names.iter().any(|n| n.contains(&trellis_proto::relay_server_name(id))), "{names:?}");
    assert!(names.iter().any(|n| n.contains(&trellis_proto::relay_identity_uri(id))), "{names:?}");
    for name in sans {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            // What an agent's TLS peer check parses: a relay's certificate passes as no agent.
            assert_eq!(trellis_proto::AgentIdentityUri::parse(uri), None, "{uri}");
        }
    }
    assert_eq!(body["caPem"].as_str().unwrap(), api.state.ca.cert_pem());
}

#[tokio::test]
async fn a_relay_serves_exactly_the_outbound_only_agents_and_they_get_the_relays() {
    let api = Api::new();
    let (relay_a, relay_a_cert) = relay(&api, "z1", "192.0.2.1:7000").await;
    let (relay_b, _) = relay(&api, "z2", "192.0.2.2:7000").await;
    let (status, empty) = relay_config(&api, &relay_a_cert, 0, 0).await;
    assert_eq!(status, StatusCode::OK, "{empty}");
    assert_eq!((empty["relayId"].as_str(), empty["zone"].as_str()), (Some(relay_a.as_str()), Some("z1")));
    assert!(gateway_ids(&empty).is_empty());
    let version = empty["version"].as_u64().unwrap();
    assert_ne!(version, 0);

    // The relay's long-poll wakes when an outbound-only agent enrolls.
    let waiting = {
        let router = api.router.clone();
        let cert = relay_a_cert.clone();
        tokio::spawn(async move {
            let mut req = axum::http::Request::builder()
                .uri(format!("/v1/relays/self/config?after={version}&waitSeconds=20"))
                .body(axum::body::Body::empty())
                .unwrap();
            req.extensions_mut().insert(trellis_control::tls::PeerIdentity(Some(cert)));
            let started = std::time::Instant::now();
            let resp = tower::ServiceExt::oneshot(router, req).await.unwrap();
            (resp.status(), started.elapsed())
        })
    };
    let owner = api.account("owner").await;
    let subnet = subnet(&api, &owner, "z2", "10.0.9.0/24").await;
    let (outbound, outbound_cert) = agent(&api, &owner, &subnet, true).await;
    let (direct, _) = agent(&api, &owner, &subnet, false).await;
    let (status, waited) = tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(waited < Duration::from_secs(10), "woken by the enrollment, not the deadline");

    let (_, config) = relay_config(&api, &relay_a_cert, 0, 0).await;
    assert_eq!(gateway_ids(&config), vec![outbound.clone()], "only the outbound-only agent, not {direct}");
    assert_eq!(config["gateways"][0]["accountId"], owner.id.as_str());

    // The agent attaches to both relays, its own zone's (z2) first.
    let config = agent_config(&api, &outbound_cert).await;
    let relays: Vec<&str> =
        config["relays"].as_array().unwrap().iter().map(|r| r["relayId"].as_str().unwrap()).collect();
    assert_eq!(relays, vec![relay_b.as_str(), relay_a.as_str()]);
    assert_eq!(config["relays"][0]["address"], "192.0.2.2:7000");
    assert_eq!(config["relays"][0]["serverName"], trellis_proto::relay_server_name(&relay_b));

    // The Agent object shows the mode.
    let (_, shown) = api.get(&format!("/v1/agents/{outbound}"), &owner.key).await;
    assert_eq!((shown["outboundOnly"].as_bool(), shown["advertise"].is_null()), (Some(true), true), "{shown}");

    // Enrolling with both an address and outboundOnly is refused.
    let token = api.create("/v1/agent-tokens", &owner.key, json!({"subnetId": subnet})).await;
    let body = json!({"joinToken": token["token"], "csrPem": csr(), "hostname": "h", "advertise": "192.0.2.9:7443", "outboundOnly": true});
    assert_eq!(api.call_as("POST", "/v1/agents/enroll", None, Some(body)).await.0, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn an_agent_turning_outbound_only_by_report_moves_into_relay_configs() {
    // A mode change is taken at most once per liveness interval: 1 s here.
    let api = api_with_offline_after(Duration::from_secs(4));
    let (_, relay_cert) = relay(&api, "z1", "192.0.2.1:7000").await;
    let owner = api.account("owner").await;
    let subnet = subnet(&api, &owner, "z1", "10.0.9.0/24").await;
    let (agent_id, agent_cert) = agent(&api, &owner, &subnet, false).await;
    let (_, before) = relay_config(&api, &relay_cert, 0, 0).await;
    assert!(gateway_ids(&before).is_empty());

    let report = json!({"configVersion": 0, "bootId": "b1", "listeners": [], "usage": [], "outboundOnly": true});
    let (status, body) = api.call_as("POST", "/v1/agents/self/report", Some(&agent_cert), Some(report)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, after) = relay_config(&api, &relay_cert, 0, 0).await;
    assert_eq!(gateway_ids(&after), vec![agent_id.clone()]);
    let (_, shown) = api.get(&format!("/v1/agents/{agent_id}"), &owner.key).await;
    assert_eq!((shown["outboundOnly"].as_bool(), shown["advertise"].is_null()), (Some(true), true), "{shown}");

    // Reporting a listener address again makes it a direct agent (once the interval has passed).
    let report =
        json!({"configVersion": 0, "bootId": "b2", "listeners": [], "usage": [], "advertise": "192.0.2.7:7443"});
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(
            api.call_as("POST", "/v1/agents/self/report", Some(&agent_cert), Some(report.clone())).await.0,
            StatusCode::NO_CONTENT
        );
        let (_, back) = relay_config(&api, &relay_cert, 0, 0).await;
        if gateway_ids(&back).is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still served by the relay after 10 s: {back}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_agent_flipping_its_mode_on_every_report_changes_relay_configs_at_most_once_per_interval() {
    let api = Api::new();
    let (_, relay_cert) = relay(&api, "z1", "192.0.2.1:7000").await;
    let owner = api.account("owner").await;
    let subnet = subnet(&api, &owner, "z1", "10.0.9.0/24").await;
    let (agent_id, agent_cert) = agent(&api, &owner, &subnet, false).await;
    let outbound = json!({"configVersion": 0, "bootId": "b1", "listeners": [], "usage": [], "outboundOnly": true});
    let direct = json!({"configVersion": 0, "bootId": "b1", "listeners": [], "usage": [],
                        "outboundOnly": false, "advertise": "192.0.2.50:7443"});

    let (_, first) = relay_config(&api, &relay_cert, 0, 0).await;
    let mut versions = vec![first["version"].as_u64().unwrap()];
    for _ in 0..10 {
        for report in [&outbound, &direct] {
            let (status, body) =
                api.call_as("POST", "/v1/agents/self/report", Some(&agent_cert), Some(report.clone())).await;
            assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
            let (_, config) = relay_config(&api, &relay_cert, 0, 0).await;
            let version = config["version"].as_u64().unwrap();
            if versions.last() != Some(&version) {
                versions.push(version);
            }
        }
    }
    // Within one liveness interval (15 s by default) 20 reports flipped the mode: one change took.
    assert_eq!(versions.len(), 2, "relay config versions seen: {versions:?}");
    let (_, config) = relay_config(&api, &relay_cert, 0, 0).await;
    assert_eq!(gateway_ids(&config), vec![agent_id.clone()], "the first change holds");
    let (_, shown) = api.get(&format!("/v1/agents/{agent_id}"), &owner.key).await;
    assert_eq!(shown["outboundOnly"], true, "{shown}");
}

#[tokio::test]
async fn a_mode_change_held_back_applies_with_a_later_report() {
    // Liveness interval 1 s.
    let api = api_with_offline_after(Duration::from_secs(4));
    let (_, relay_cert) = relay(&api, "z1", "192.0.2.1:7000").await;
    let owner = api.account("owner").await;
    let subnet = subnet(&api, &owner, "z1", "10.0.9.0/24").await;
    let (agent_id, agent_cert) = agent(&api, &owner, &subnet, false).await;
    let report = |boot: &str, outbound_only: bool| {
        let mut r =
            json!({"configVersion": 0, "bootId": boot, "listeners": [], "usage": [], "outboundOnly": outbound_only});
        if !outbound_only {
            r["advertise"] = json!("192.0.2.50:7443");
        }
        api.call_as("POST", "/v1/agents/self/report", Some(&agent_cert), Some(r))
    };
    assert_eq!(report("b1", true).await.0, StatusCode::NO_CONTENT);
    // Restarted at once as a direct agent: too soon, the relay keeps it for now...
    assert_eq!(report("b2", false).await.0, StatusCode::NO_CONTENT);
    assert_eq!(gateway_ids(&relay_config(&api, &relay_cert, 0, 0).await.1), vec![agent_id.clone()]);
    // ...and its next reports make it direct once the interval has passed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !gateway_ids(&relay_config(&api, &relay_cert, 0, 0).await.1).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the held-back change never applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(report("b2", false).await.0, StatusCode::NO_CONTENT);
    }
    let (_, shown) = api.get(&format!("/v1/agents/{agent_id}"), &owner.key).await;
    assert_eq!((shown["outboundOnly"].as_bool(), shown["advertise"].as_str()), (Some(false), Some("192.0.2.50:7443")));
}

#[tokio::test]
async fn reports_keep_relays_seen_and_repeated_ones_write_nothing() {
    let api = Api::new();
    let (relay_id, relay_cert) = relay(&api, "z1", "192.0.2.1:7000").await;
    let owner = api.account("owner").await;
    let subnet = subnet(&api, &owner, "z1", "10.0.9.0/24").await;
    let (outbound, _) = agent(&api, &owner, &subnet, true).await;

    let (status, shown) = api.get(&format!("/v1/relays/{relay_id}"), &api.admin).await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!((shown["zone"].as_str(), shown["advertise"].as_str()), (Some("z1"), Some("192.0.2.1:7000")));
    assert_eq!((shown["status"].as_str(), shown["healthy"].as_bool()), (Some("ONLINE"), Some(true)));
    let enrolled_seen = shown["lastSeenAt"].clone();

    // Attached ids the relay does not serve are dropped.
    let report = json!({"configVersion": 3, "bootId": "boot-1", "attached": [outbound, "agent-0000000000000000f"],
                        "activeFlows": 7, "advertise": "192.0.2.11:7000"});
    let (status, body) = api.call_as("POST", "/v1/relays/self/report", Some(&relay_cert), Some(report.clone())).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, shown) = api.get(&format!("/v1/relays/{relay_id}"), &api.admin).await;
    assert_eq!(shown["attachedGateways"], 1, "{shown}");
    assert_eq!((shown["activeFlows"].as_u64(), shown["configVersion"].as_u64()), (Some(7), Some(3)));
    assert_eq!(shown["advertise"], "192.0.2.11:7000", "the reported address replaces the enrolled one");
    assert!(shown["lastSeenAt"].as_str() >= enrolled_seen.as_str());

    // The same report again: nothing written.
    let revision = api.state.store.revision().unwrap();
    let (status, _) = api.call_as("POST", "/v1/relays/self/report", Some(&relay_cert), Some(report)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(api.state.store.revision().unwrap(), revision, "an unchanged report writes nothing");

    // A bad body changes nothing.
    let bad = json!({"configVersion": 3, "bootId": "has spaces", "activeFlows": 1});
    assert_eq!(
        api.call_as("POST", "/v1/relays/self/report", Some(&relay_cert), Some(bad)).await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let (_, list) = api.get("/v1/relays", &api.admin).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"][0]["relayId"], relay_id.as_str());
    let acct = api.account("other").await;
    assert_eq!(api.get("/v1/relays", &acct.key).await.0, StatusCode::FORBIDDEN);
}

/// A control plane with this offline timeout (liveness writes are due every quarter of it).
fn api_with_offline_after(offline_after: Duration) -> Api {
    Api::with_settings(trellis_control::Settings { offline_after, ..trellis_control::Settings::default() })
}

fn stored_runtime(api: &Api, relay_id: &str) -> trellis_control::relays::records::RelayRuntime {
    use trellis_store::TxExt;
    let id = relay_id.to_string();
    trellis_store::read_with(api.state.store.as_ref(), |tx| tx.get_obj(&id)).unwrap().unwrap()
}

#[tokio::test]
async fn reports_differing_only_in_active_flows_write_nothing_until_liveness_is_due() {
    // Liveness is written every 2 s.
    let api = api_with_offline_after(Duration::from_secs(8));
    let (relay_id, relay_cert) = relay(&api, "z1", "192.0.2.1:7000").await;
    let report = |flows: u64| json!({"configVersion": 1, "bootId": "boot-1", "activeFlows": flows});
    let send = |flows: u64| api.call_as("POST", "/v1/relays/self/report", Some(&relay_cert), Some(report(flows)));
    let started = std::time::Instant::now();
    assert_eq!(send(1).await.0, StatusCode::NO_CONTENT);
    assert_eq!(stored_runtime(&api, &relay_id).active_flows, 1);

    // A busy relay: every report has another count, none writes.
    let revision = api.state.store.revision().unwrap();
    for flows in 2..=6 {
        assert_eq!(send(flows).await.0, StatusCode::NO_CONTENT);
    }
    // (Unless the machine took the whole 2 s for these few calls.)
    if started.elapsed() < Duration::from_secs(2) {
        assert_eq!(api.state.store.revision().unwrap(), revision, "only activeFlows changed: nothing written");
    }

    // Once liveness is due, the next report writes, with the latest count.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while api.state.store.revision().unwrap() == revision {
        assert!(std::time::Instant::now() < deadline, "no liveness write within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(send(9).await.0, StatusCode::NO_CONTENT);
    }
    assert_eq!(stored_runtime(&api, &relay_id).active_flows, 9);

    // Anything else that changes still writes at once.
    let revision = api.state.store.revision().unwrap();
    let attached = json!({"configVersion": 2, "bootId": "boot-1", "activeFlows": 9});
    api.call_as("POST", "/v1/relays/self/report", Some(&relay_cert), Some(attached)).await;
    assert_ne!(api.state.store.revision().unwrap(), revision, "a new config version is written at once");
}

#[tokio::test]
async fn an_idle_relay_reporting_every_5_s_stays_healthy_with_a_long_offline_timeout() {
    // Liveness is written every 30 s; a relay reports every 5 s.
    let api = api_with_offline_after(Duration::from_secs(120));
    let (relay_id, relay_cert) = relay(&api, "z1", "192.0.2.1:7000").await;
    let report = |flows: u64| json!({"configVersion": 1, "bootId": "boot-1", "activeFlows": flows});
    let send = |flows: u64| api.call_as("POST", "/v1/relays/self/report", Some(&relay_cert), Some(report(flows)));
    assert_eq!(send(0).await.0, StatusCode::NO_CONTENT);

    // 25 s later (its last liveness write that long ago, as happens between writes)...
    let mut runtime = stored_runtime(&api, &relay_id);
    let written = trellis_model::Timestamp::new(std::time::SystemTime::now() - Duration::from_secs(25));
    runtime.last_seen_at = Some(written);
    api.state.write(move |tx| Ok(trellis_store::TxExt::update_obj(tx, &runtime)?)).await.unwrap();

    // ...a report that changes nothing but the flow count arrives and writes nothing.
    let revision = api.state.store.revision().unwrap();
    assert_eq!(send(3).await.0, StatusCode::NO_CONTENT);
    assert_eq!(api.state.store.revision().unwrap(), revision);
    let (_, shown) = api.get(&format!("/v1/relays/{relay_id}"), &api.admin).await;
    assert_eq!(shown["healthy"], true, "a report arrived just now: {shown}");
    assert!(shown["lastSeenAt"].as_str() > Some(written.to_string().as_str()), "the report heard: {shown}");
    assert_eq!(shown["activeFlows"], 3, "{shown}");
    let (_, list) = api.get("/v1/relays", &api.admin).await;
    assert_eq!(
        (list["items"][0]["healthy"].as_bool(), list["items"][0]["activeFlows"].as_u64()),
        (Some(true), Some(3))
    );
}

#[tokio::test]
async fn certificates_open_only_their_own_kind_of_routes() {
    let api = Api::new();
    let (_, relay_cert) = relay(&api, "z1", "192.0.2.1:7000").await;
    let owner = api.account("owner").await;
    let subnet = subnet(&api, &owner, "z1", "10.0.9.0/24").await;
    let (_, agent_cert) = agent(&api, &owner, &subnet, true).await;

    let (status, body) = relay_config(&api, &agent_cert, 0, 0).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "an agent certificate on a relay route: {body}");
    let report = json!({"configVersion": 0, "bootId": "b", "activeFlows": 0});
    assert_eq!(
        api.call_as("POST", "/v1/relays/self/report", Some(&agent_cert), Some(report)).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, body) =
        api.call_as("GET", "/v1/agents/self/config?after=0&waitSeconds=0", Some(&relay_cert), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a relay certificate on an agent route: {body}");
    let report = json!({"configVersion": 0, "bootId": "b", "listeners": [], "usage": []});
    assert_eq!(
        api.call_as("POST", "/v1/agents/self/report", Some(&relay_cert), Some(report)).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, body) = relay_config(&api, "", 0, 0).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = api.call_as("GET", "/v1/relays/self/config", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["message"].as_str().unwrap().contains("relay's client certificate"), "{body}");
}

#[tokio::test]
async fn a_deleted_relay_is_gone_from_every_config_and_its_certificate_opens_nothing() {
    let api = Api::new();
    let (relay_a, relay_a_cert) = relay(&api, "z1", "192.0.2.1:7000").await;
    let (relay_b, relay_b_cert) = relay(&api, "z1", "192.0.2.2:7000").await;
    let owner = api.account("owner").await;
    let subnet = subnet(&api, &owner, "z1", "10.0.9.0/24").await;
    let (outbound, agent_cert) = agent(&api, &owner, &subnet, true).await;
    let relays_of = |config: &Value| -> Vec<String> {
        config["relays"]
            .as_array()
            .map_or(vec![], |r| r.iter().map(|r| r["relayId"].as_str().unwrap().into()).collect())
    };
    let mut sorted = vec![relay_a.clone(), relay_b.clone()];
    sorted.sort();
    assert_eq!(relays_of(&agent_config(&api, &agent_cert).await), sorted);
    assert_eq!(gateway_ids(&relay_config(&api, &relay_b_cert, 0, 0).await.1), vec![outbound.clone()]);

    let acct = api.account("other").await;
    assert_eq!(api.call("DELETE", &format!("/v1/relays/{relay_a}"), &acct.key, None).await.0, StatusCode::FORBIDDEN);
    assert_eq!(api.call("DELETE", &format!("/v1/relays/{relay_a}"), &api.admin, None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(api.get(&format!("/v1/relays/{relay_a}"), &api.admin).await.0, StatusCode::NOT_FOUND);
    assert_eq!(api.call("DELETE", &format!("/v1/relays/{relay_a}"), &api.admin, None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(relay_config(&api, &relay_a_cert, 0, 0).await.0, StatusCode::UNAUTHORIZED);
    let report = json!({"configVersion": 0, "bootId": "b", "activeFlows": 0});
    assert_eq!(
        api.call_as("POST", "/v1/relays/self/report", Some(&relay_a_cert), Some(report)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(relays_of(&agent_config(&api, &agent_cert).await), vec![relay_b.clone()]);
    let (_, list) = api.get("/v1/relays", &api.admin).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn silent_relays_go_offline_and_leave_agents_configs() {
    let api = Api::new();
    let (relay_id, relay_cert) = relay(&api, "z1", "192.0.2.1:7000").await;
    let owner = api.account("owner").await;
    let subnet = subnet(&api, &owner, "z1", "10.0.9.0/24").await;
    let (_, agent_cert) = agent(&api, &owner, &subnet, true).await;
    assert_eq!(agent_config(&api, &agent_cert).await["relays"].as_array().unwrap().len(), 1);

    let later = trellis_model::Timestamp::new(std::time::SystemTime::now() + Duration::from_secs(3600));
    let marked = api
        .state
        .write(move |tx| Ok(trellis_control::relays::mark_offline(tx, later, Duration::from_secs(60))?))
        .await
        .unwrap();
    assert_eq!(marked, 1);
    let (_, shown) = api.get(&format!("/v1/relays/{relay_id}"), &api.admin).await;
    assert_eq!(shown["status"], "OFFLINE");
    let config = agent_config(&api, &agent_cert).await;
    assert!(config.get("relays").is_none(), "an offline relay is left out: {config}");

    // Its next report brings it back.
    let report = json!({"configVersion": 0, "bootId": "b", "activeFlows": 0});
    api.call_as("POST", "/v1/relays/self/report", Some(&relay_cert), Some(report)).await;
    assert_eq!(agent_config(&api, &agent_cert).await["relays"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_deleted_relays_certificate_is_revoked_in_the_configs_of_agents_using_relays_until_it_expires() {
    let api = Api::new();
    let (relay_a, relay_a_cert) = relay(&api, "z1", "192.0.2.1:7000").await;
    let (_, relay_b_cert) = relay(&api, "z1", "192.0.2.2:7000").await;
    let owner = api.account("owner").await;
    let subnet = subnet(&api, &owner, "z1", "10.0.9.0/24").await;
    let (_, outbound_cert) = agent(&api, &owner, &subnet, true).await;
    let (_, direct_cert) = agent(&api, &owner, &subnet, false).await;
    let revoked_of = |config: &Value| -> Vec<String> {
        config["revokedRelayCerts"]
            .as_array()
            .map_or(vec![], |c| c.iter().map(|c| c.as_str().unwrap().to_string()).collect())
    };
    assert!(revoked_of(&agent_config(&api, &outbound_cert).await).is_empty());

    assert_eq!(api.call("DELETE", &format!("/v1/relays/{relay_a}"), &api.admin, None).await.0, StatusCode::NO_CONTENT);
    // The gateway agent that was attached to it refuses its certificate from now on.
    let config = agent_config(&api, &outbound_cert).await;
    assert_eq!(revoked_of(&config), vec![relay_a_cert.clone()], "{config}");
    assert!(!revoked_of(&config).contains(&relay_b_cert));
    // An agent that uses no relay is not told.
    assert!(agent_config(&api, &direct_cert).await.get("revokedRelayCerts").is_none());
    // Relays themselves refuse every relay certificate already; theirs do not list it.
    assert!(relay_config(&api, &relay_b_cert, 0, 0).await.1.get("revokedCerts").is_none());

    // Once the certificate has expired the revocation is dropped (the CA's signature fails then).
    let later = trellis_model::Timestamp::new(std::time::SystemTime::now() + Duration::from_secs(2 * 365 * 24 * 3600));
    let dropped =
        api.state.write(move |tx| Ok(trellis_control::server::drop_expired_revocations(tx, later)?)).await.unwrap();
    assert_eq!(dropped, 1);
    assert!(agent_config(&api, &outbound_cert).await.get("revokedRelayCerts").is_none());
}
