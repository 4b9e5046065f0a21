//! What a consumer sees before and after accepting a share, on the router
//! without sockets: invitations list the share's resources, usage of a shared
//! configuration is 403 for the consumer (404 for anyone else), and errors
//! repeat at most 64 characters of bad input.

mod support;

use axum::http::StatusCode;
use serde_json::{Value, json};
use support::Api;

fn resources(invitation: &Value) -> Vec<(String, String, String)> {
    invitation["resources"]
        .as_array()
        .unwrap_or_else(|| panic!("no resources in {invitation}"))
        .iter()
        .map(|r| {
            let field = |k: &str| r[k].as_str().unwrap_or_else(|| panic!("no {k} in {r}")).to_string();
            (field("name"), field("type"), field("ownerAccountId"))
        })
        .collect()
}

#[tokio::test]
async fn invitations_show_the_shared_resources_before_accepting() {
    let api = Api::new();
    let owner = api.account("owner").await;
    let consumer = api.account("consumer").await;
    let (db, cache) = api.two_configurations(&owner).await;
    api.create(
        "/v1/resourceshares",
        &owner.key,
        json!({"name": "for-consumer", "resourceArns": [db["arn"], cache["arn"]], "principals": [consumer.id]}),
    )
    .await;

    let (status, list) = api.get("/v1/resourceshareinvitations", &consumer.key).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let invitation = &list["items"][0];
    assert_eq!(invitation["status"], "PENDING", "{list}");
    let both = vec![
        ("orders-db".to_string(), "SINGLE".to_string(), owner.id.clone()),
        ("cache".to_string(), "SINGLE".to_string(), owner.id.clone()),
    ];
    assert_eq!(resources(invitation), both, "the list names what the share holds");
    assert_eq!(invitation["resources"][0]["arn"], db["arn"]);

    let id = invitation["id"].as_str().unwrap();
    let (status, one) = api.get(&format!("/v1/resourceshareinvitations/{id}"), &consumer.key).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(resources(&one), both, "get shows the same resources");
    let (_, sent) = api.get(&format!("/v1/resourceshareinvitations/{id}"), &owner.key).await;
    assert_eq!(resources(&sent), both, "the sender sees them too");

    // A configuration deleted meanwhile is simply no longer listed.
    let cache_id = cache["id"].as_str().unwrap();
    let (status, v) = api.call("DELETE", &format!("/v1/resourceconfigurations/{cache_id}"), &owner.key, None).await;
    assert!(status.is_success(), "{v}");
    let (_, one) = api.get(&format!("/v1/resourceshareinvitations/{id}"), &consumer.key).await;
    assert_eq!(resources(&one), both[..1]);

    let (status, accepted) =
        api.call("POST", &format!("/v1/resourceshareinvitations/{id}/accept"), &consumer.key, None).await;
    assert_eq!(status, StatusCode::OK, "{accepted}");
    assert_eq!(accepted["status"], "ACCEPTED");
    assert_eq!(resources(&accepted), both[..1], "the answer to accept lists them too");
}

#[tokio::test]
async fn usage_is_403_for_a_consumer_of_a_shared_configuration_and_404_for_others() {
    let api = Api::new();
    let owner = api.account("owner").await;
    let consumer = api.account("consumer").await;
    let stranger = api.account("stranger").await;
    let (db, _) = api.two_configurations(&owner).await;
    api.create(
        "/v1/resourceshares",
        &owner.key,
        json!({"name": "for-consumer", "resourceArns": [db["arn"]], "principals": [consumer.id]}),
    )
    .await;
    let usage = format!("/v1/resourceconfigurations/{}/usage", db["id"].as_str().unwrap());

    // Pending: the consumer cannot read the configuration yet, so it does not exist for it.
    let (status, body) = api.get(&usage, &consumer.key).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let (_, list) = api.get("/v1/resourceshareinvitations", &consumer.key).await;
    let id = list["items"][0]["id"].as_str().unwrap();
    api.call("POST", &format!("/v1/resourceshareinvitations/{id}/accept"), &consumer.key, None).await;

    let (status, body) = api.get(&usage, &consumer.key).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["message"].as_str().unwrap().contains("only the owner sees usage"), "{body}");
    let (status, body) = api.get(&usage, &stranger.key).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no existence leak to an account that cannot read it: {body}");
    let (status, body) = api.get(&usage, &owner.key).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn errors_repeat_at_most_64_characters_of_the_input() {
    let api = Api::new();
    let owner = api.account("owner").await;
    let long = "x".repeat(5000);
    let cut = format!("{}…", "x".repeat(64));
    for (path, body) in [
        ("/v1/vpcs", json!({"name": long})),
        ("/v1/subnets", json!({"vpcId": long, "zone": "z1", "cidrBlock": "10.0.9.0/24"})),
        ("/v1/resourceconfigurations", json!({"name": "db", "type": long})),
    ] {
        let (status, v) = api.call("POST", path, &owner.key, Some(body)).await;
        assert!(status.is_client_error(), "POST {path}: {status} {v}");
        let message = v["message"].as_str().unwrap();
        assert!(message.contains(&cut), "POST {path}: {message}");
        assert!(message.len() < 500, "POST {path}: {} characters: {message}", message.len());
    }
    let (status, v) = api.get(&format!("/v1/vpcs/{long}"), &owner.key).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert!(v["message"].as_str().unwrap().len() < 500, "{v}");
}
