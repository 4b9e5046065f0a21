//! What a consumer sees before and after accepting a share, on the router
//! without sockets: invitations list the share's resources, usage of a shared
//! configuration is 403 for the consumer (404 for anyone else), and errors
//! repeat at most 64 characters of bad input.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt;
use trellis_control::pki::Ca;
use trellis_control::{AppState, Settings, api_router, bootstrap_admin};
use trellis_store::sqlite::SqliteStore;

struct Api {
    router: Router,
    admin: String,
    _dir: tempfile::TempDir,
}

struct Acct {
    id: String,
    key: String,
}

impl Api {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in_memory().unwrap();
        let admin = bootstrap_admin(&store).unwrap().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let state = AppState::new(Arc::new(store), Settings::default(), Arc::new(ca));
        Self { router: api_router(state), admin, _dir: dir }
    }

    async fn call(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req =
            Request::builder().method(method).uri(path).header(header::AUTHORIZATION, format!("Bearer {key}"));
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let resp = self.router.clone().oneshot(req.body(body).unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        (status, value)
    }

    async fn get(&self, path: &str, key: &str) -> (StatusCode, Value) {
        self.call("GET", path, key, None).await
    }

    async fn create(&self, path: &str, key: &str, body: Value) -> Value {
        let (status, v) = self.call("POST", path, key, Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "POST {path}: {v}");
        v
    }

    async fn account(&self, name: &str) -> Acct {
        let v = self.create("/v1/accounts", &self.admin.clone(), json!({"name": name})).await;
        Acct { id: v["accountId"].as_str().unwrap().into(), key: v["apiKey"].as_str().unwrap().into() }
    }

    /// A VPC, a subnet, a gateway and two SINGLE configurations (`orders-db`, `cache`) of `owner`.
    async fn two_configurations(&self, owner: &Acct) -> (Value, Value) {
        let vpc = self.create("/v1/vpcs", &owner.key, json!({"name": "prod"})).await;
        let subnet = self
            .create("/v1/subnets", &owner.key, json!({"vpcId": vpc["id"], "zone": "z1", "cidrBlock": "10.0.9.0/24"}))
            .await;
        let gw = self
            .create(
                "/v1/resourcegateways",
                &owner.key,
                json!({"name": "gw", "vpcIdentifier": vpc["id"], "subnetIds": [subnet["id"]]}),
            )
            .await;
        let config = |name: &str, port: &str| {
            json!({
                "name": name, "type": "SINGLE", "resourceGatewayIdentifier": gw["id"],
                "resourceConfigurationDefinition": {"ipResource": {"ipAddress": "10.0.0.10"}},
                "portRanges": [port], "protocol": "TCP"
            })
        };
        let db = self.create("/v1/resourceconfigurations", &owner.key, config("orders-db", "5432")).await;
        let cache = self.create("/v1/resourceconfigurations", &owner.key, config("cache", "6379")).await;
        (db, cache)
    }
}

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
