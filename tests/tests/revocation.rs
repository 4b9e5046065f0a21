//! Revocations other than the owner deleting the share (that one is in
//! `loopback.rs`): the consumer deletes its endpoint, so its address stops
//! answering and the sessions open through it close; and a consumer that
//! rejected the invitation gets no endpoint at all.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::json;
use trellis_e2e::flow::{endpoint_address, share_arn};
use trellis_e2e::net::free_port;
use trellis_e2e::postgres::{FRUITS, FRUITS_QUERY, PgSession, psql};
use trellis_e2e::{LoopbackPair, Postgres, wait_until};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// The bound for a revocation to refuse new connections.
const REVOKE_DEADLINE: Duration = Duration::from_secs(5);

#[test]
fn deleting_the_endpoint_refuses_new_connections_and_closes_open_sessions() {
    let pair = LoopbackPair::start();
    let pg = Postgres::start(LOCALHOST, free_port(LOCALHOST), None);
    let config = pair.owner.create_ip_config("orders-db", &pair.gateway_id, "127.0.0.1", &[&pg.port.to_string()]);
    let config_arn = config["arn"].as_str().expect("configuration arn").to_string();
    pair.share("orders-for-consumer", &config_arn);
    let endpoint = pair.create_endpoint(&config_arn);
    let endpoint_id = endpoint["vpcEndpointId"].as_str().or(endpoint["id"].as_str()).expect("endpoint id").to_string();
    let address = endpoint_address(&endpoint);
    let endpoint_addr = SocketAddr::new(address.ip.parse().expect("endpoint ip"), pg.port);

    assert_eq!(psql(None, &address.ip, pg.port, FRUITS_QUERY).expect("psql through the endpoint"), FRUITS);
    let mut open_session = PgSession::open(endpoint_addr, Duration::from_secs(10)).expect("a session to keep open");
    assert!(open_session.query("select 1").is_ok(), "the held session works before the revocation");

    pair.consumer.api.delete(&format!("/v1/vpcendpoints/{endpoint_id}")).expect_status(204, "delete the endpoint");
    let deleted_at = Instant::now();
    let refused_after = wait_until("the endpoint address to refuse connections", REVOKE_DEADLINE * 2, || {
        PgSession::open(endpoint_addr, Duration::from_secs(1)).is_err().then(|| deleted_at.elapsed())
    });
    assert!(refused_after <= REVOKE_DEADLINE, "still accepted {refused_after:?} after the endpoint was deleted");
    assert!(
        open_session.wait_closed(REVOKE_DEADLINE.saturating_sub(deleted_at.elapsed()) + Duration::from_secs(1)),
        "the session opened through the deleted endpoint is still open {:?} after the delete",
        deleted_at.elapsed()
    );
    pair.consumer.api.get(&format!("/v1/vpcendpoints/{endpoint_id}")).expect_status(404, "read the deleted endpoint");

    // The share itself still stands: a new endpoint works again.
    let again = pair.create_endpoint(&config_arn);
    let again_address = endpoint_address(&again);
    assert_eq!(psql(None, &again_address.ip, pg.port, FRUITS_QUERY).expect("psql through a new endpoint"), FRUITS);
}

#[test]
fn a_rejected_invitation_gives_no_endpoint_and_cannot_be_accepted_later() {
    let pair = LoopbackPair::start();
    let config = pair.owner.create_ip_config("reports-db", &pair.gateway_id, "127.0.0.1", &["5432"]);
    let config_arn = config["arn"].as_str().expect("configuration arn").to_string();
    let share = pair.owner.share("reports-for-consumer", &[&config_arn], &[pair.consumer.id()]);
    let arn = share_arn(&share);

    let invitations = pair.consumer.api.get("/v1/resourceshareinvitations").ok("list invitations");
    let invitation = invitations["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["resourceShareArn"] == arn.as_str()))
        .unwrap_or_else(|| panic!("no invitation for {arn} in {invitations}"))
        .clone();
    let id = invitation["id"].as_str().expect("invitation id");
    let rejected =
        pair.consumer.api.post(&format!("/v1/resourceshareinvitations/{id}/reject"), &json!({})).ok("reject");
    assert_eq!(rejected["status"], "REJECTED", "{rejected}");

    let body = json!({
        "vpcEndpointType": "Resource",
        "vpcId": pair.consumer_vpc,
        "subnetIds": [pair.consumer_subnet],
        "resourceConfigurationArn": config_arn,
    });
    let refused = pair.consumer.api.post("/v1/vpcendpoints", &body);
    assert_eq!(refused.status, 422, "an endpoint to a rejected share must be refused: {}", refused.text);
    assert!(!refused.message().is_empty(), "the refusal says why");
    let endpoints = pair.consumer.api.get("/v1/vpcendpoints").ok("list endpoints");
    assert_eq!(endpoints["items"].as_array().map(Vec::len), Some(0), "nothing half-created: {endpoints}");

    // A rejection is final: the invitation cannot be accepted afterwards.
    let late = pair.consumer.api.post(&format!("/v1/resourceshareinvitations/{id}/accept"), &json!({}));
    assert_eq!(late.status, 409, "accepting a rejected invitation: {}", late.text);
}
