//! API tests on the router, without sockets: the owner → consumer flow,
//! tenant isolation, input validation, idempotency, GROUP/CHILD rules,
//! state machines and atomicity.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt;
use trellis_api::check::validate_answer;
use trellis_api::{Caller, Method, RouteInfo};
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
        Self::with_settings(Settings::default())
    }

    fn with_settings(settings: Settings) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in_memory().unwrap();
        let admin = bootstrap_admin(&store).unwrap().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let state = AppState::new(Arc::new(store), settings, Arc::new(ca));
        Self { router: api_router(state), admin, _dir: dir }
    }

    async fn send(&self, req: Request<Body>) -> (StatusCode, Value) {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, value)
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
        self.send(req.body(body).unwrap()).await
    }

    async fn get(&self, path: &str, key: &str) -> (StatusCode, Value) {
        self.call("GET", path, key, None).await
    }

    async fn post(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        self.call("POST", path, key, Some(body)).await
    }

    async fn delete(&self, path: &str, key: &str) -> (StatusCode, Value) {
        self.call("DELETE", path, key, None).await
    }

    /// POST that must create; returns the object.
    async fn create(&self, path: &str, key: &str, body: Value) -> Value {
        let (status, v) = self.post(path, key, body).await;
        assert_eq!(status, StatusCode::CREATED, "POST {path}: {v}");
        v
    }

    async fn account(&self, name: &str) -> Acct {
        self.account_in(name, None).await
    }

    async fn account_in(&self, name: &str, org: Option<&str>) -> Acct {
        let v = self.create("/v1/accounts", &self.admin.clone(), json!({"name": name, "organizationId": org})).await;
        Acct { id: v["accountId"].as_str().unwrap().into(), key: v["apiKey"].as_str().unwrap().into() }
    }

    async fn vpc_with_subnet(&self, a: &Acct, zone: &str, cidr: &str) -> (String, String) {
        let vpc = self.create("/v1/vpcs", &a.key, json!({"name": "prod"})).await;
        let vpc_id = vpc["vpcId"].as_str().unwrap().to_string();
        let subnet =
            self.create("/v1/subnets", &a.key, json!({"vpcId": vpc_id, "zone": zone, "cidrBlock": cidr})).await;
        (vpc_id, subnet["subnetId"].as_str().unwrap().to_string())
    }

    /// Owner side: VPC, subnet in `zone`, gateway, and a SINGLE configuration; returns (gateway id, config).
    async fn owner_setup(&self, owner: &Acct, zone: &str) -> (String, Value) {
        let (vpc, subnet) = self.vpc_with_subnet(owner, zone, "10.0.9.0/24").await;
        let gw = self
            .create(
                "/v1/resourcegateways",
                &owner.key,
                json!({"name": "gw", "vpcIdentifier": vpc, "subnetIds": [subnet]}),
            )
            .await;
        let gw_id = gw["id"].as_str().unwrap().to_string();
        let cfg = self
            .create(
                "/v1/resourceconfigurations",
                &owner.key,
                json!({
                    "name": "db", "type": "SINGLE", "resourceGatewayIdentifier": gw_id,
                    "resourceConfigurationDefinition": {"ipResource": {"ipAddress": "10.0.0.10"}},
                    "portRanges": ["5432"], "protocol": "TCP"
                }),
            )
            .await;
        (gw_id, cfg)
    }

    async fn share(&self, owner: &Acct, arns: Vec<&str>, principals: Vec<&str>) -> Value {
        self.create(
            "/v1/resourceshares",
            &owner.key,
            json!({"name": "share", "resourceArns": arns, "principals": principals}),
        )
        .await
    }

    async fn accept_all(&self, consumer: &Acct) {
        let (_, list) = self.get("/v1/resourceshareinvitations?status=PENDING", &consumer.key).await;
        for inv in list["items"].as_array().unwrap() {
            let path = format!("/v1/resourceshareinvitations/{}/accept", inv["id"].as_str().unwrap());
            let (status, v) = self.call("POST", &path, &consumer.key, None).await;
            assert_eq!(status, StatusCode::OK, "{v}");
        }
    }

    async fn endpoint(&self, consumer: &Acct, vpc: &str, subnets: Vec<&str>, cfg_arn: &str) -> (StatusCode, Value) {
        self.post(
            "/v1/vpcendpoints",
            &consumer.key,
            json!({"vpcEndpointType": "Resource", "vpcId": vpc, "subnetIds": subnets, "resourceConfigurationArn": cfg_arn}),
        )
        .await
    }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

#[tokio::test]
async fn owner_shares_and_consumer_creates_an_endpoint() {
    let api = Api::new();
    let owner = api.account("acme").await;
    let consumer = api.account("globex").await;
    let (_, cfg) = api.owner_setup(&owner, "z1").await;
    assert_eq!(cfg["status"], "ACTIVE");
    assert_eq!(cfg["type"], "SINGLE");
    assert!(
        s(&cfg["arn"]).starts_with(&format!("arn:trellis:vpc-lattice:local:{}:resourceconfiguration/rcfg-", owner.id))
    );
    let (cvpc, csubnet) = api.vpc_with_subnet(&consumer, "z1", "10.0.9.0/24").await;

    // Not shared yet: invisible and unusable.
    let cfg_path = format!("/v1/resourceconfigurations/{}", s(&cfg["id"]));
    assert_eq!(api.get(&cfg_path, &consumer.key).await.0, StatusCode::NOT_FOUND);
    let (status, err) = api.endpoint(&consumer, &cvpc, vec![&csubnet], s(&cfg["arn"])).await;
    assert_eq!((status, s(&err["code"])), (StatusCode::UNPROCESSABLE_ENTITY, "ResourceNotShared"));

    let share = api.share(&owner, vec![s(&cfg["arn"])], vec![&consumer.id]).await;
    assert_eq!(share["status"], "ACTIVE");
    assert!(s(&share["resourceShareArn"]).contains(":resource-share/rs-"));

    // Invitation pending: still unusable.
    let (_, invs) = api.get("/v1/resourceshareinvitations", &consumer.key).await;
    let inv = &invs["items"][0];
    assert_eq!(inv["status"], "PENDING");
    assert_eq!(inv["senderAccountId"], owner.id.as_str());
    assert_eq!(inv["resourceShareArn"], share["resourceShareArn"]);
    let (status, _) = api.endpoint(&consumer, &cvpc, vec![&csubnet], s(&cfg["arn"])).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // The owner sees the invitation it sent.
    assert_eq!(api.get("/v1/resourceshareinvitations", &owner.key).await.1["items"][0]["id"], inv["id"]);

    api.accept_all(&consumer).await;
    let accept = format!("/v1/resourceshareinvitations/{}/accept", s(&inv["id"]));
    let (status, err) = api.call("POST", &accept, &consumer.key, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "accepting twice: {err}");
    let reject = format!("/v1/resourceshareinvitations/{}/reject", s(&inv["id"]));
    assert_eq!(api.call("POST", &reject, &consumer.key, None).await.0, StatusCode::CONFLICT);

    // Shared and accepted: readable, listed, usable. Same CIDR as the owner's on purpose.
    assert_eq!(api.get(&cfg_path, &consumer.key).await.0, StatusCode::OK);
    let (_, listed) = api.get("/v1/resourceconfigurations", &consumer.key).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    let (status, ep) = api.endpoint(&consumer, &cvpc, vec![&csubnet], s(&cfg["arn"])).await;
    assert_eq!(status, StatusCode::CREATED, "{ep}");
    assert_eq!(ep["state"], "Pending");
    assert_eq!(ep["vpcEndpointType"], "Resource");
    let entries = ep["dnsEntries"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["dnsName"], format!("{}.{}.local.trellis.internal", s(&ep["id"]), s(&cfg["id"])));
    assert_eq!(entries[0]["ipAddresses"], json!(["10.0.9.1"]));
    assert_eq!(entries[0]["subnetId"], csubnet.as_str());

    let (status, got) = api.get(&format!("/v1/vpcendpoints/{}", s(&ep["id"])), &consumer.key).await;
    assert_eq!((status, &got["id"]), (StatusCode::OK, &ep["id"]));
    let (_, sub) = api.get(&format!("/v1/subnets/{csubnet}"), &consumer.key).await;
    assert_eq!(sub["availableIpAddressCount"], 253);

    // Revoking the share: the endpoint stays, Failed with a reason, and the config is hidden again.
    let (status, _) = api.delete(&format!("/v1/resourceshares/{}", s(&share["id"])), &owner.key).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, got) = api.get(&format!("/v1/vpcendpoints/{}", s(&ep["id"])), &consumer.key).await;
    assert_eq!(got["state"], "Failed");
    assert!(s(&got["failureReason"]).contains("no longer shared"), "{got}");
    assert_eq!(api.get(&cfg_path, &consumer.key).await.0, StatusCode::NOT_FOUND);
    assert_eq!(api.get("/v1/resourceshareinvitations", &consumer.key).await.1["items"], json!([]));
}

#[tokio::test]
async fn other_accounts_see_nothing_and_use_nothing() {
    let api = Api::new();
    let owner = api.account("acme").await;
    let consumer = api.account("globex").await;
    let third = api.account("initech").await;
    let (gw, cfg) = api.owner_setup(&owner, "z1").await;
    api.share(&owner, vec![s(&cfg["arn"])], vec![&consumer.id]).await;
    let (_, invs) = api.get("/v1/resourceshareinvitations", &consumer.key).await;
    let inv_id = s(&invs["items"][0]["id"]).to_string();
    let (_, vpcs) = api.get("/v1/vpcs", &owner.key).await;
    let owner_vpc = s(&vpcs["items"][0]["id"]).to_string();

    for path in [
        format!("/v1/vpcs/{owner_vpc}"),
        format!("/v1/resourcegateways/{gw}"),
        format!("/v1/resourceconfigurations/{}", s(&cfg["id"])),
        format!("/v1/resourceshareinvitations/{inv_id}"),
    ] {
        let (status, v) = api.get(&path, &third.key).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {v}");
    }
    for path in [
        "/v1/vpcs",
        "/v1/resourcegateways",
        "/v1/resourceconfigurations",
        "/v1/resourceshares",
        "/v1/resourceshareinvitations",
        "/v1/subnets",
        "/v1/vpcendpoints",
    ] {
        let (status, v) = api.get(path, &third.key).await;
        assert_eq!((status, &v["items"]), (StatusCode::OK, &json!([])), "{path}");
    }
    assert_eq!(api.delete(&format!("/v1/resourcegateways/{gw}"), &third.key).await.0, StatusCode::NOT_FOUND);
    let accept = format!("/v1/resourceshareinvitations/{inv_id}/accept");
    assert_eq!(api.call("POST", &accept, &third.key, None).await.0, StatusCode::NOT_FOUND);
    let (status, _) = api
        .post("/v1/subnets", &third.key, json!({"vpcId": owner_vpc, "zone": "z9", "cidrBlock": "10.9.0.0/24"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The owner's own gateway is still there.
    assert_eq!(api.get(&format!("/v1/resourcegateways/{gw}"), &owner.key).await.0, StatusCode::OK);

    // The third account cannot reach the configuration, accepted invitation of another account or not.
    api.accept_all(&consumer).await;
    let (tvpc, tsubnet) = api.vpc_with_subnet(&third, "z1", "10.2.0.0/24").await;
    let (status, err) = api.endpoint(&third, &tvpc, vec![&tsubnet], s(&cfg["arn"])).await;
    assert_eq!((status, s(&err["code"])), (StatusCode::UNPROCESSABLE_ENTITY, "ResourceNotShared"));
    assert!(s(&err["message"]).contains("not found or is not shared"));
    // Nor can the consumer use the owner's subnets for its endpoint.
    let (_, osubnets) = api.get("/v1/subnets", &owner.key).await;
    let (cvpc, _) = api.vpc_with_subnet(&consumer, "z1", "10.1.0.0/24").await;
    let (status, _) = api.endpoint(&consumer, &cvpc, vec![s(&osubnets["items"][0]["id"])], s(&cfg["arn"])).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_input_is_refused_with_a_reason() {
    let api = Api::new();
    let a = api.account("acme").await;

    // Malformed JSON, wrong content type, unknown or missing fields: 400.
    let req = Request::post("/v1/vpcs")
        .header(header::AUTHORIZATION, format!("Bearer {}", a.key))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"name\": "))
        .unwrap();
    let (status, err) = api.send(req).await;
    assert_eq!((status, s(&err["code"])), (StatusCode::BAD_REQUEST, "BadRequest"));
    assert!(s(&err["message"]).contains("not valid JSON"), "{err}");
    let req = Request::post("/v1/vpcs")
        .header(header::AUTHORIZATION, format!("Bearer {}", a.key))
        .body(Body::from("{\"name\": \"prod\"}"))
        .unwrap();
    let (status, err) = api.send(req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(s(&err["message"]).contains("Content-Type"), "{err}");
    let (status, err) = api.post("/v1/vpcs", &a.key, json!({"name": "prod", "nmae": "x"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(s(&err["message"]).contains("nmae"), "{err}");
    assert_eq!(api.post("/v1/vpcs", &a.key, json!({})).await.0, StatusCode::BAD_REQUEST);

    // Invalid names, CIDRs, zones, port ranges: 422 with what to change.
    let (status, err) = api.post("/v1/vpcs", &a.key, json!({"name": "Prod_VPC"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(s(&err["message"]).contains("lowercase"), "{err}");
    assert_eq!(api.post("/v1/vpcs", &a.key, json!({"name": "vpc-x"})).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    let (vpc, subnet) = api.vpc_with_subnet(&a, "z1", "10.0.0.0/24").await;
    for (cidr, hint) in
        [("10.0.0.0/8", "/16 to /28"), ("10.1.0.1/24", "10.1.0.0/24"), ("fd00::/64", "IPv4"), ("nope", "CIDR")]
    {
        let (status, err) =
            api.post("/v1/subnets", &a.key, json!({"vpcId": vpc, "zone": "z2", "cidrBlock": cidr})).await;
        assert_eq!((status, s(&err["code"])), (StatusCode::UNPROCESSABLE_ENTITY, "InvalidCidrBlock"), "{cidr}");
        assert!(s(&err["message"]).contains(hint), "{cidr}: {err}");
    }
    let (status, _) =
        api.post("/v1/subnets", &a.key, json!({"vpcId": vpc, "zone": "Zone 2", "cidrBlock": "10.0.1.0/24"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, err) =
        api.post("/v1/subnets", &a.key, json!({"vpcId": vpc, "zone": "z1", "cidrBlock": "10.0.1.0/24"})).await;
    assert_eq!((status, s(&err["code"])), (StatusCode::CONFLICT, "ZoneTaken"));
    let (status, err) =
        api.post("/v1/subnets", &a.key, json!({"vpcId": vpc, "zone": "z2", "cidrBlock": "10.0.0.0/16"})).await;
    assert_eq!((status, s(&err["code"])), (StatusCode::CONFLICT, "CidrOverlap"));
    let gw = api
        .create("/v1/resourcegateways", &a.key, json!({"name": "gw", "vpcIdentifier": vpc, "subnetIds": [subnet]}))
        .await;
    for (ports, hint) in [
        (json!(["0"]), "1-65535"),
        (json!(["10-5"]), "smaller port first"),
        (json!([]), "at least one"),
        (json!(["80-90", "85"]), "overlap"),
    ] {
        let (status, err) = api
            .post(
                "/v1/resourceconfigurations",
                &a.key,
                json!({"name": "db", "type": "SINGLE", "resourceGatewayIdentifier": gw["id"],
                       "resourceConfigurationDefinition": {"ipResource": {"ipAddress": "10.0.0.10"}}, "portRanges": ports}),
            )
            .await;
        assert_eq!((status, s(&err["code"])), (StatusCode::UNPROCESSABLE_ENTITY, "InvalidPortRange"), "{ports}");
        assert!(s(&err["message"]).contains(hint), "{ports}: {err}");
    }
    for definition in [
        json!({"ipResource": {"ipAddress": "0.0.0.0"}}),
        json!({"ipResource": {"ipAddress": "224.0.0.1"}}),
        json!({"ipResource": {"ipAddress": "10.0.0"}}),
        json!({"dnsResource": {"domainName": "bad_name.example"}}),
        json!({}),
        json!({"ipResource": {"ipAddress": "10.0.0.1"}, "dnsResource": {"domainName": "db.example"}}),
    ] {
        let (status, err) = api
            .post(
                "/v1/resourceconfigurations",
                &a.key,
                json!({"name": "db", "type": "SINGLE", "resourceGatewayIdentifier": gw["id"],
                       "resourceConfigurationDefinition": definition, "portRanges": ["5432"]}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{definition}: {err}");
    }
    let (status, _) = api
        .post(
            "/v1/resourceconfigurations",
            &a.key,
            json!({"name": "db", "type": "SINGLE", "resourceGatewayIdentifier": gw["id"], "protocol": "UDP",
                   "resourceConfigurationDefinition": {"ipResource": {"ipAddress": "10.0.0.10"}}, "portRanges": ["53"]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // Unknown ids: 404, malformed or well-formed.
    for path in [
        "/v1/vpcs/vpc-0123456789abcdef0",
        "/v1/vpcs/nope",
        "/v1/resourceconfigurations/rcfg-0123456789abcdef0",
        "/v1/vpcendpoints/vpce-00000000000000000",
    ] {
        let (status, err) = api.get(path, &a.key).await;
        assert_eq!((status, s(&err["code"])), (StatusCode::NOT_FOUND, "NotFound"), "{path}");
    }
    let (status, _) = api
        .post(
            "/v1/subnets",
            &a.key,
            json!({"vpcId": "vpc-0123456789abcdef0", "zone": "z3", "cidrBlock": "10.3.0.0/24"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(api.get("/v1/nothing", &a.key).await.0, StatusCode::NOT_FOUND);
    assert_eq!(api.get("/v1/vpcs?maxResults=0", &a.key).await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn keys_are_checked_and_routes_are_split_between_admin_and_accounts() {
    let api = Api::new();
    let a = api.account("acme").await;
    let (status, err) = api.send(Request::get("/v1/vpcs").body(Body::empty()).unwrap()).await;
    assert_eq!((status, s(&err["code"])), (StatusCode::UNAUTHORIZED, "Unauthorized"));
    assert_eq!(api.get("/v1/vpcs", "trellis_wrong").await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(api.get("/v1/vpcs", &api.admin).await.0, StatusCode::FORBIDDEN);
    assert_eq!(api.get("/v1/accounts", &a.key).await.0, StatusCode::FORBIDDEN);
    assert_eq!(api.get("/v1/vpcs", &a.key).await.0, StatusCode::OK);
    // A second key works for the same account.
    let (status, k) = api.call("POST", &format!("/v1/accounts/{}/apikeys", a.id), &api.admin, None).await;
    assert_eq!(status, StatusCode::CREATED);
    api.create("/v1/vpcs", s(&k["apiKey"]), json!({"name": "two"})).await;
    assert_eq!(api.get("/v1/vpcs", &a.key).await.1["items"].as_array().unwrap().len(), 1);
    // Listing accounts never shows keys.
    let (_, accounts) = api.get("/v1/accounts", &api.admin).await;
    assert!(accounts["items"][0].get("apiKey").is_none());
    // Anyone may read the health, CA and OpenAPI routes.
    for path in ["/healthz", "/v1/ca.pem", "/v1/openapi.json"] {
        let (status, _) = api.send(Request::get(path).body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn client_tokens_make_creates_idempotent() {
    let api = Api::new();
    let a = api.account("acme").await;
    let first = api.create("/v1/vpcs", &a.key, json!({"name": "prod", "clientToken": "t-1"})).await;
    let (status, again) = api.post("/v1/vpcs", &a.key, json!({"name": "prod", "clientToken": "t-1"})).await;
    assert_eq!((status, &again["id"]), (StatusCode::OK, &first["id"]));
    let (status, err) = api.post("/v1/vpcs", &a.key, json!({"name": "other", "clientToken": "t-1"})).await;
    assert_eq!((status, s(&err["code"])), (StatusCode::CONFLICT, "IdempotencyConflict"));
    // Without a token, or with another token, a new object each time.
    let other = api.create("/v1/vpcs", &a.key, json!({"name": "prod"})).await;
    assert_ne!(other["id"], first["id"]);
    // Tokens are per account: another account's same token creates its own object.
    let b = api.account("globex").await;
    let theirs = api.create("/v1/vpcs", &b.key, json!({"name": "prod", "clientToken": "t-1"})).await;
    assert_ne!(theirs["id"], first["id"]);
    assert_eq!(api.get("/v1/vpcs", &a.key).await.1["items"].as_array().unwrap().len(), 2);
    // A failed create does not burn the token.
    let (status, _) = api
        .post(
            "/v1/subnets",
            &a.key,
            json!({"vpcId": first["id"], "zone": "z1", "cidrBlock": "10.0.0.0/8", "clientToken": "t-2"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    api.create(
        "/v1/subnets",
        &a.key,
        json!({"vpcId": first["id"], "zone": "z1", "cidrBlock": "10.0.0.0/24", "clientToken": "t-2"}),
    )
    .await;
}

#[tokio::test]
async fn groups_and_children_follow_their_rules() {
    let api = Api::new();
    let owner = api.account("acme").await;
    let consumer = api.account("globex").await;
    let (gw, single) = api.owner_setup(&owner, "z1").await;
    let cfg = |body: Value| api.post("/v1/resourceconfigurations", &owner.key, body);

    let (status, err) =
        cfg(json!({"name": "grp", "type": "GROUP", "resourceGatewayIdentifier": gw, "portRanges": ["5432"],
                                   "resourceConfigurationDefinition": {"ipResource": {"ipAddress": "10.0.0.1"}}}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "a GROUP has no definition: {err}");
    let (status, group) =
        cfg(json!({"name": "grp", "type": "GROUP", "resourceGatewayIdentifier": gw, "portRanges": ["5432", "6379"]}))
            .await;
    assert_eq!(status, StatusCode::CREATED, "{group}");
    let group_id = s(&group["id"]).to_string();
    let child = |name: &str, ip: &str, extra: Value| {
        let mut body = json!({"name": name, "type": "CHILD", "resourceConfigurationGroupIdentifier": group_id,
                              "resourceConfigurationDefinition": {"ipResource": {"ipAddress": ip}}});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    assert_eq!(cfg(json!({"name": "c", "type": "CHILD", "resourceConfigurationDefinition": {"ipResource": {"ipAddress": "10.0.0.1"}}})).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, err) =
        cfg(child("c0", "10.0.0.1", json!({"resourceConfigurationGroupIdentifier": single["id"]}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "a SINGLE is no group: {err}");
    assert_eq!(
        cfg(child("c0", "10.0.0.1", json!({"resourceGatewayIdentifier": gw}))).await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let (status, err) = cfg(child("c0", "10.0.0.1", json!({"portRanges": ["8080"]}))).await;
    assert_eq!((status, s(&err["code"])), (StatusCode::UNPROCESSABLE_ENTITY, "InvalidPortRange"));
    // Another account cannot attach a child to this group.
    let (status, _) = api.post("/v1/resourceconfigurations", &consumer.key, child("c0", "10.0.0.1", json!({}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, c1) = cfg(child("c1", "10.0.0.21", json!({"portRanges": ["5432"]}))).await;
    assert_eq!(status, StatusCode::CREATED, "{c1}");
    assert_eq!(c1["resourceGatewayId"], gw.as_str(), "a CHILD inherits its group's gateway");
    assert_eq!(c1["resourceConfigurationGroupId"], group_id.as_str());
    let (_, c2) = cfg(child("c2", "10.0.0.22", json!({}))).await;
    assert_eq!(c2["portRanges"], json!(["5432", "6379"]), "ports default to the group's");

    // A CHILD is never shared alone; the GROUP is.
    let (status, err) = api
        .post(
            "/v1/resourceshares",
            &owner.key,
            json!({"name": "s", "resourceArns": [c1["arn"]], "principals": [consumer.id]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(s(&err["message"]).contains("CHILD"), "{err}");
    api.share(&owner, vec![s(&group["arn"])], vec![&consumer.id]).await;
    api.accept_all(&consumer).await;

    // The consumer sees the group and its children, and gets one address per child.
    let (_, seen) = api.get("/v1/resourceconfigurations", &consumer.key).await;
    assert_eq!(seen["items"].as_array().unwrap().len(), 3);
    let (cvpc, csubnet) = api.vpc_with_subnet(&consumer, "z1", "10.1.0.0/24").await;
    let (status, _) = api.endpoint(&consumer, &cvpc, vec![&csubnet], s(&c1["arn"])).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "endpoints go to the group, not a child");
    let (status, ep) = api.endpoint(&consumer, &cvpc, vec![&csubnet], s(&group["arn"])).await;
    assert_eq!(status, StatusCode::CREATED, "{ep}");
    let ep_path = format!("/v1/vpcendpoints/{}", s(&ep["id"]));
    let ips = |ep: &Value| -> Vec<String> {
        ep["dnsEntries"].as_array().unwrap().iter().map(|e| s(&e["ipAddresses"][0]).to_string()).collect()
    };
    assert_eq!(ips(&ep), ["10.1.0.1", "10.1.0.2"]);
    let names: Vec<&str> = ep["dnsEntries"].as_array().unwrap().iter().map(|e| s(&e["dnsName"])).collect();
    for c in [&c1, &c2] {
        assert_eq!(names.iter().filter(|n| n.contains(s(&c["id"]))).count(), 1, "one name per child: {names:?}");
    }

    // A child added later gets an address in the existing endpoint; deleting it frees it.
    let (status, c3) = cfg(child("c3", "10.0.0.23", json!({}))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, ep_now) = api.get(&ep_path, &consumer.key).await;
    assert_eq!(ips(&ep_now), ["10.1.0.1", "10.1.0.2", "10.1.0.3"]);
    assert_eq!(
        api.delete(&format!("/v1/resourceconfigurations/{}", s(&c3["id"])), &owner.key).await.0,
        StatusCode::NO_CONTENT
    );
    let (_, ep_now) = api.get(&ep_path, &consumer.key).await;
    assert_eq!(ips(&ep_now), ["10.1.0.1", "10.1.0.2"]);

    // A GROUP with children cannot be deleted; its ports cannot shrink below a child's.
    let group_path = format!("/v1/resourceconfigurations/{group_id}");
    let (status, err) = api.delete(&group_path, &owner.key).await;
    assert_eq!((status, s(&err["code"])), (StatusCode::CONFLICT, "ResourceInUse"));
    let (status, _) = api.call("PATCH", &group_path, &owner.key, Some(json!({"portRanges": ["5432"]}))).await;
    assert_eq!(status, StatusCode::CONFLICT, "c2 uses 6379");
    let (status, patched) =
        api.call("PATCH", &group_path, &owner.key, Some(json!({"portRanges": ["5432", "6379-6380"]}))).await;
    assert_eq!((status, &patched["portRanges"]), (StatusCode::OK, &json!(["5432", "6379-6380"])));
    // The consumer may read but not change or delete it.
    assert_eq!(
        api.call("PATCH", &group_path, &consumer.key, Some(json!({"portRanges": ["5432"]}))).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(api.delete(&group_path, &consumer.key).await.0, StatusCode::NOT_FOUND);
    // The gateway cannot go while configurations use it.
    assert_eq!(api.delete(&format!("/v1/resourcegateways/{gw}"), &owner.key).await.0, StatusCode::CONFLICT);
    for c in [&c1, &c2] {
        api.delete(&format!("/v1/resourceconfigurations/{}", s(&c["id"])), &owner.key).await;
    }
    assert_eq!(api.delete(&group_path, &owner.key).await.0, StatusCode::NO_CONTENT);
    let (_, ep_now) = api.get(&ep_path, &consumer.key).await;
    assert_eq!(ep_now["state"], "Failed");
    assert_eq!(ep_now["dnsEntries"], json!([]));
}

#[tokio::test]
async fn endpoint_zones_must_overlap_the_gateways_zones() {
    let api = Api::new();
    let owner = api.account("acme").await;
    let (_, cfg) = api.owner_setup(&owner, "z1").await;
    let vpc = api.create("/v1/vpcs", &owner.key, json!({"name": "consumer-side"})).await;
    let z2 = api
        .create("/v1/subnets", &owner.key, json!({"vpcId": vpc["id"], "zone": "z2", "cidrBlock": "10.5.2.0/24"}))
        .await;
    let (status, err) = api.endpoint(&owner, s(&vpc["id"]), vec![s(&z2["id"])], s(&cfg["arn"])).await;
    assert_eq!((status, s(&err["code"])), (StatusCode::UNPROCESSABLE_ENTITY, "ZoneMismatch"));
    assert!(s(&err["message"]).contains("[z2]") && s(&err["message"]).contains("[z1]"), "{err}");
    assert_eq!(api.get("/v1/vpcendpoints", &owner.key).await.1["items"], json!([]), "a failed create leaves nothing");
    // With a subnet in z1 too it works, with one address in each subnet.
    let z1 = api
        .create("/v1/subnets", &owner.key, json!({"vpcId": vpc["id"], "zone": "z1", "cidrBlock": "10.5.1.0/24"}))
        .await;
    let (status, ep) = api.endpoint(&owner, s(&vpc["id"]), vec![s(&z2["id"]), s(&z1["id"])], s(&cfg["id"])).await;
    assert_eq!(status, StatusCode::CREATED, "the owner may use its own configuration, by id too: {ep}");
    assert_eq!(ep["dnsEntries"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn inside_one_organization_a_share_needs_no_invitation() {
    let api = Api::new();
    let org = api.create("/v1/organizations", &api.admin.clone(), json!({"name": "holding"})).await;
    let org_id = s(&org["organizationId"]);
    assert!(org_id.starts_with("o-"));
    let owner = api.account_in("acme", Some(org_id)).await;
    let sister = api.account_in("acme-labs", Some(org_id)).await;
    let (_, cfg) = api.owner_setup(&owner, "z1").await;
    api.share(&owner, vec![s(&cfg["arn"])], vec![&sister.id]).await;
    assert_eq!(api.get("/v1/resourceshareinvitations", &sister.key).await.1["items"], json!([]));
    let (vpc, subnet) = api.vpc_with_subnet(&sister, "z1", "10.1.0.0/24").await;
    let (status, ep) = api.endpoint(&sister, &vpc, vec![&subnet], s(&cfg["arn"])).await;
    assert_eq!(status, StatusCode::CREATED, "{ep}");
    // Leaving the organization ends the access.
    let (status, _) = api
        .call("PATCH", &format!("/v1/accounts/{}", sister.id), &api.admin, Some(json!({"organizationId": null})))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api.get(&format!("/v1/resourceconfigurations/{}", s(&cfg["id"])), &sister.key).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, ep) = api.get(&format!("/v1/vpcendpoints/{}", s(&ep["id"])), &sister.key).await;
    assert_eq!(ep["state"], "Failed", "{ep}");
    // Unknown organizations and principals are refused.
    let (status, _) =
        api.post("/v1/accounts", &api.admin, json!({"name": "x-corp", "organizationId": "o-0000000000"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn failed_creates_leave_nothing_behind() {
    let api = Api::new();
    let owner = api.account("acme").await;
    let consumer = api.account("globex").await;
    let (_, cfg) = api.owner_setup(&owner, "z1").await;
    // The second configuration does not exist: no share, and no invitation to the principal.
    let (status, err) = api
        .post(
            "/v1/resourceshares",
            &owner.key,
            json!({"name": "s", "resourceArns": [cfg["arn"], "rcfg-00000000000000000"], "principals": [consumer.id]}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    assert!(s(&err["message"]).contains("rcfg-00000000000000000"), "{err}");
    assert_eq!(api.get("/v1/resourceshares", &owner.key).await.1["items"], json!([]));
    assert_eq!(api.get("/v1/resourceshareinvitations", &consumer.key).await.1["items"], json!([]));

    // An endpoint that does not fit the pool takes no address.
    api.share(&owner, vec![s(&cfg["arn"])], vec![&consumer.id]).await;
    api.accept_all(&consumer).await;
    let (vpc, subnet) = api.vpc_with_subnet(&consumer, "z1", "10.1.0.0/28").await;
    for _ in 0..14 {
        let (status, ep) = api.endpoint(&consumer, &vpc, vec![&subnet], s(&cfg["arn"])).await;
        assert_eq!(status, StatusCode::CREATED, "{ep}");
    }
    let (status, err) = api.endpoint(&consumer, &vpc, vec![&subnet], s(&cfg["arn"])).await;
    assert_eq!((status, s(&err["code"])), (StatusCode::CONFLICT, "AddressPoolExhausted"));
    let (_, eps) = api.get("/v1/vpcendpoints", &consumer.key).await;
    assert_eq!(eps["items"].as_array().unwrap().len(), 14);
    assert_eq!(api.get(&format!("/v1/subnets/{subnet}"), &consumer.key).await.1["availableIpAddressCount"], 0);

    // Deleting an endpoint frees its address for the next one.
    let victim = &eps["items"][3];
    let freed = s(&victim["dnsEntries"][0]["ipAddresses"][0]).to_string();
    assert_eq!(
        api.delete(&format!("/v1/vpcendpoints/{}", s(&victim["id"])), &consumer.key).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.get(&format!("/v1/vpcendpoints/{}", s(&victim["id"])), &consumer.key).await.0,
        StatusCode::NOT_FOUND
    );
    let (status, ep) = api.endpoint(&consumer, &vpc, vec![&subnet], s(&cfg["arn"])).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(s(&ep["dnsEntries"][0]["ipAddresses"][0]), freed);
}

#[tokio::test]
async fn objects_in_use_cannot_be_deleted() {
    let api = Api::new();
    let a = api.account("acme").await;
    let (vpc, subnet) = api.vpc_with_subnet(&a, "z1", "10.0.0.0/24").await;
    let (status, err) = api.delete(&format!("/v1/vpcs/{vpc}"), &a.key).await;
    assert_eq!((status, s(&err["code"])), (StatusCode::CONFLICT, "ResourceInUse"));
    let gw = api
        .create("/v1/resourcegateways", &a.key, json!({"name": "gw", "vpcIdentifier": vpc, "subnetIds": [subnet]}))
        .await;
    assert_eq!(api.delete(&format!("/v1/subnets/{subnet}"), &a.key).await.0, StatusCode::CONFLICT);
    assert_eq!(api.delete(&format!("/v1/resourcegateways/{}", s(&gw["id"])), &a.key).await.0, StatusCode::NO_CONTENT);
    assert_eq!(api.delete(&format!("/v1/subnets/{subnet}"), &a.key).await.0, StatusCode::NO_CONTENT);
    assert_eq!(api.delete(&format!("/v1/vpcs/{vpc}"), &a.key).await.0, StatusCode::NO_CONTENT);
    assert_eq!(api.get(&format!("/v1/vpcs/{vpc}"), &a.key).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn every_documented_route_is_served() {
    let api = Api::new();
    let (status, doc) = api.send(Request::get("/v1/openapi.json").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    for route in trellis_api::routes() {
        let method = route.method.as_str();
        assert!(doc["paths"][route.path][method].is_object(), "{method} {}", route.path);
        let path = route.path.replace("{id}", "x");
        let req = Request::builder().method(method.to_uppercase().as_str()).uri(&path).body(Body::empty()).unwrap();
        let (status, body) = api.send(req).await;
        let unrouted = status == StatusCode::METHOD_NOT_ALLOWED
            || (status == StatusCode::NOT_FOUND && body["message"].as_str().is_some_and(|m| m.starts_with("no route")));
        assert!(!unrouted, "{method} {} is documented but not routed ({status}: {body})", route.path);
    }
    assert_eq!(doc, trellis_api::openapi::document(), "the server serves the generated document");
}

#[test]
fn every_served_route_is_documented() {
    let key = |r: &RouteInfo| (r.method, r.path);
    let mut served: Vec<_> = trellis_control::api::routes().served().iter().map(key).collect();
    let mut documented: Vec<_> = trellis_api::routes().map(key).collect();
    served.sort();
    documented.sort();
    assert_eq!(served, documented);
}

/// The backticked names of an error such as serde's "unknown field `x`,
/// expected one of `a`, `b`" after `after`.
fn ticked_after(message: &str, after: &str) -> Vec<String> {
    let rest = message.split_once(after).map_or("", |(_, rest)| rest);
    rest.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// Each handler deserializes its route's documented body type: a body with
/// an unknown field is refused with the list of the fields the handler
/// knows, which must be the schema's; a body-less call names a required field.
#[tokio::test]
async fn handlers_take_the_documented_body_types() {
    let api = Api::new();
    let acct = api.account("acme").await;
    let doc = trellis_api::openapi::document();
    let mut checked = 0;
    for route in
        trellis_api::routes().filter(|r| r.body.is_some() && !matches!(r.caller, Caller::AgentCert | Caller::RelayCert))
    {
        let method = route.method.as_str();
        let schema = &doc["paths"][route.path][method]["requestBody"]["content"]["application/json"]["schema"];
        let schema = &doc["components"]["schemas"][s(&schema["$ref"]).rsplit('/').next().unwrap()];
        let key = if route.caller == Caller::Admin { api.admin.clone() } else { acct.key.clone() };
        let path = route.path.replace("{id}", "x");
        let upper = method.to_uppercase();
        if schema["additionalProperties"] == false {
            let (status, err) = api.call(&upper, &path, &key, Some(json!({"notAField": 1}))).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {}: {err}", route.path);
            let mut known = ticked_after(s(&err["message"]), "expected");
            let mut documented: Vec<String> = schema["properties"].as_object().unwrap().keys().cloned().collect();
            known.sort();
            documented.sort();
            assert_eq!(known, documented, "{method} {}: {err}", route.path);
        } else {
            let (status, err) = api.call(&upper, &path, &key, Some(json!({}))).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {}: {err}", route.path);
            let missing = ticked_after(s(&err["message"]), "missing field");
            let required = schema["required"].as_array().unwrap();
            assert!(required.contains(&json!(missing[0])), "{method} {}: {err} vs {required:?}", route.path);
        }
        checked += 1;
    }
    assert!(checked >= 12, "only {checked} bodies checked");
}

/// Calls `route` and checks the status and the answer against the route's documented schema.
async fn documented(api: &Api, route: &RouteInfo, id: &str, key: &str, body: Option<Value>) -> Value {
    let path = route.path.replace("{id}", id);
    let method = route.method.as_str();
    let (status, answer) = api.call(&method.to_uppercase(), &path, key, body).await;
    assert_eq!(status.as_u16(), route.status, "{method} {path}: {answer}");
    let doc = trellis_api::openapi::document();
    let schema = &doc["paths"][route.path][method]["responses"][route.status.to_string()]["content"]["application/json"]
        ["schema"];
    if route.method != Method::Delete {
        validate_answer(&doc, schema, &answer)
            .unwrap_or_else(|e| panic!("{method} {path} answered off its schema: {e}\n{answer}"));
    }
    answer
}

/// Every answer of the owner → consumer flow fits its route's documented schema.
#[tokio::test]
async fn answers_fit_their_documented_schemas() {
    use trellis_api::{
        accounts, agents, configurations, domains, endpoints, gateways, invitations, notifications, organizations,
        services, shares, subnets, vpcs,
    };
    let api = Api::new();
    let admin = api.admin.clone();
    let org = documented(&api, &organizations::CREATE, "", &admin, Some(json!({"name": "org"}))).await;
    documented(&api, &organizations::LIST, "", &admin, None).await;
    documented(&api, &organizations::GET, s(&org["id"]), &admin, None).await;
    let owner = documented(&api, &accounts::CREATE, "", &admin, Some(json!({"name": "acme"}))).await;
    let consumer = documented(&api, &accounts::CREATE, "", &admin, Some(json!({"name": "globex"}))).await;
    let (o, c) = (s(&owner["apiKey"]).to_string(), s(&consumer["apiKey"]).to_string());
    let owner_id = s(&owner["id"]);
    documented(&api, &accounts::LIST, "", &admin, None).await;
    documented(&api, &accounts::GET, owner_id, &admin, None).await;
    documented(&api, &accounts::CREATE_API_KEY, owner_id, &admin, None).await;
    let patch = json!({"organizationId": org["id"]});
    documented(&api, &accounts::UPDATE, owner_id, &admin, Some(patch)).await;
    documented(&api, &accounts::UPDATE, owner_id, &admin, Some(json!({"organizationId": null}))).await;

    let vpc = documented(&api, &vpcs::CREATE, "", &o, Some(json!({"name": "prod"}))).await;
    documented(&api, &vpcs::UPDATE, s(&vpc["id"]), &o, Some(json!({"name": "next"}))).await;
    documented(&api, &vpcs::LIST, "", &o, None).await;
    documented(&api, &vpcs::GET, s(&vpc["id"]), &o, None).await;
    let body = json!({"vpcId": vpc["id"], "zone": "z1", "cidrBlock": "10.0.9.0/24", "name": "a"});
    let subnet = documented(&api, &subnets::CREATE, "", &o, Some(body)).await;
    documented(&api, &subnets::LIST, "", &o, None).await;
    documented(&api, &subnets::GET, s(&subnet["id"]), &o, None).await;
    let token = documented(&api, &agents::CREATE_TOKEN, "", &o, Some(json!({"subnetId": subnet["id"]}))).await;
    documented(&api, &agents::LIST_TOKENS, "", &o, None).await;
    documented(&api, &agents::GET_TOKEN, s(&token["id"]), &o, None).await;
    documented(&api, &agents::LIST, "", &o, None).await;
    let body = json!({"name": "gw", "vpcIdentifier": vpc["id"], "subnetIds": [subnet["id"]]});
    let gw = documented(&api, &gateways::CREATE, "", &o, Some(body)).await;
    documented(&api, &gateways::LIST, "", &o, None).await;
    documented(&api, &gateways::GET, s(&gw["id"]), &o, None).await;
    let body =
        json!({"name": "grp", "type": "GROUP", "resourceGatewayIdentifier": gw["id"], "portRanges": ["5000-6000"]});
    let group = documented(&api, &configurations::CREATE, "", &o, Some(body)).await;
    let body = json!({
        "name": "web", "type": "CHILD", "resourceConfigurationGroupIdentifier": group["id"],
        "resourceConfigurationDefinition": {"dnsResource": {"domainName": "web.internal"}},
        "customDomainName": "web.example.com", "clientToken": "t-1"
    });
    let child = documented(&api, &configurations::CREATE, "", &o, Some(body)).await;
    let body =
        json!({"resourceConfigurationDefinition": {"ipResource": {"ipAddress": "10.0.0.11"}}, "portRanges": ["5432"]});
    documented(&api, &configurations::UPDATE, s(&child["id"]), &o, Some(body)).await;
    documented(&api, &configurations::LIST, "", &o, None).await;
    documented(&api, &configurations::GET, s(&group["id"]), &o, None).await;
    documented(&api, &configurations::USAGE, s(&group["id"]), &o, None).await;
    let body = json!({"connectionEvents": ["ResourceShareInvitation"], "url": "https://hooks.example.com/t",
                      "secret": "s3cret"});
    let nfn = documented(&api, &notifications::CREATE, "", &c, Some(body)).await;
    let body = json!({"name": "s", "resourceArns": [group["arn"]], "principals": [consumer["id"]]});
    let share = documented(&api, &shares::CREATE, "", &o, Some(body)).await;
    documented(&api, &notifications::LIST, "", &c, None).await;
    documented(&api, &notifications::GET, s(&nfn["id"]), &c, None).await;
    let log = documented(&api, &notifications::DELIVERIES, s(&nfn["id"]), &c, None).await;
    assert_eq!(log["items"][0]["eventType"], "ResourceShareInvitation", "{log}");
    let body = json!({"url": "https://hooks.example.com/u", "secret": "n3w"});
    documented(&api, &notifications::UPDATE, s(&nfn["id"]), &c, Some(body)).await;
    documented(&api, &notifications::DELETE, s(&nfn["id"]), &c, None).await;
    documented(&api, &shares::LIST, "", &o, None).await;
    documented(&api, &shares::GET, s(&share["id"]), &o, None).await;
    let pending = documented(&api, &invitations::LIST, "", &c, None).await;
    let invitation = s(&pending["items"][0]["id"]).to_string();
    documented(&api, &invitations::GET, &invitation, &c, None).await;
    documented(&api, &invitations::ACCEPT, &invitation, &c, None).await;
    documented(&api, &configurations::LIST, "", &c, None).await;

    let cvpc = documented(&api, &vpcs::CREATE, "", &c, Some(json!({"name": "mine"}))).await;
    let body = json!({"vpcId": cvpc["id"], "zone": "z1", "cidrBlock": "10.0.9.0/24"});
    let csubnet = documented(&api, &subnets::CREATE, "", &c, Some(body)).await;
    let body = json!({
        "vpcEndpointType": "Resource", "vpcId": cvpc["id"], "subnetIds": [csubnet["id"]],
        "resourceConfigurationArn": group["arn"], "privateDnsEnabled": true, "privateDnsPreference": "ALL_DOMAINS"
    });
    let endpoint = documented(&api, &endpoints::CREATE, "", &c, Some(body)).await;
    documented(&api, &endpoints::LIST, "", &c, None).await;
    documented(&api, &endpoints::GET, s(&endpoint["id"]), &c, None).await;
    let dv = documented(&api, &domains::CREATE, "", &o, Some(json!({"domainName": "example.com"}))).await;
    documented(&api, &domains::LIST, "", &o, None).await;
    documented(&api, &domains::GET, s(&dv["id"]), &o, None).await;

    let body = json!({
        "name": "orders", "vpcId": vpc["id"], "subnetIds": [subnet["id"]],
        "targets": [{"ipAddress": "10.0.1.5"}, {"domainName": "api.internal"}], "ports": [{"port": 443}],
        "healthCheck": {"protocol": "HTTP"}, "proxyProtocol": "V2", "perConsumerLimits": {"maxConnections": 9}
    });
    let svc = documented(&api, &services::CREATE, "", &o, Some(body)).await;
    let sid = s(&svc["id"]).to_string();
    documented(&api, &services::LIST, "", &o, None).await;
    documented(&api, &services::GET, &sid, &o, None).await;
    documented(&api, &services::UPDATE, &sid, &o, Some(json!({"loadBalancing": "SOURCE_HASH"}))).await;
    let body = json!({"addAllowedPrincipals": [consumer["id"]]});
    documented(&api, &services::MODIFY_PERMISSIONS, &sid, &o, Some(body)).await;
    documented(&api, &services::PERMISSIONS, &sid, &o, None).await;
    documented(&api, &services::AVAILABLE, "", &c, None).await;
    let body = json!({
        "vpcEndpointType": "Interface", "vpcId": cvpc["id"], "subnetIds": [csubnet["id"]],
        "serviceName": svc["serviceName"]
    });
    let iface = documented(&api, &endpoints::CREATE, "", &c, Some(body)).await;
    documented(&api, &services::CONNECTIONS, &sid, &o, None).await;
    documented(&api, &services::ACCEPT, &sid, &o, Some(json!({"vpcEndpointIds": [iface["id"]]}))).await;
    documented(&api, &services::USAGE, &sid, &o, None).await;
    documented(&api, &services::REJECT, &sid, &o, Some(json!({"vpcEndpointIds": [iface["id"]]}))).await;
    documented(&api, &endpoints::DELETE, s(&iface["id"]), &c, None).await;
    documented(&api, &services::DELETE, &sid, &o, None).await;

    documented(&api, &domains::DELETE, s(&dv["id"]), &o, None).await;
    documented(&api, &endpoints::DELETE, s(&endpoint["id"]), &c, None).await;
    documented(&api, &shares::DELETE, s(&share["id"]), &o, None).await;
    documented(&api, &configurations::DELETE, s(&child["id"]), &o, None).await;
    documented(&api, &configurations::DELETE, s(&group["id"]), &o, None).await;
    documented(&api, &gateways::DELETE, s(&gw["id"]), &o, None).await;
    documented(&api, &agents::DELETE_TOKEN, s(&token["id"]), &o, None).await;
    documented(&api, &subnets::DELETE, s(&subnet["id"]), &o, None).await;
    documented(&api, &vpcs::DELETE, s(&vpc["id"]), &o, None).await;
}

/// Attack (issue 6.5): a provider PATCHed a shared configuration's ports to
/// 1024-65535 and a consumer's agent opened thousands of listeners, failing
/// another provider's endpoint; 13 CHILDren filled a /28 pool. Now one endpoint
/// may take a bounded share, and only that endpoint fails, with the reason.
#[tokio::test]
async fn one_providers_resources_cannot_take_a_consumers_ports_or_addresses() {
    let api = Api::new();
    let hostile = api.account("hostile").await;
    let honest = api.account("honest").await;
    let consumer = api.account("consumer").await;
    let (_, bad_cfg) = api.owner_setup(&hostile, "z1").await;
    let (_, good_cfg) = api.owner_setup(&honest, "z1").await;
    api.share(&hostile, vec![s(&bad_cfg["arn"])], vec![&consumer.id]).await;
    api.share(&honest, vec![s(&good_cfg["arn"])], vec![&consumer.id]).await;
    api.accept_all(&consumer).await;
    let (cvpc, csubnet) = api.vpc_with_subnet(&consumer, "z1", "10.0.9.0/28").await;
    let (status, bad_ep) = api.endpoint(&consumer, &cvpc, vec![&csubnet], s(&bad_cfg["arn"])).await;
    assert_eq!(status, StatusCode::CREATED, "{bad_ep}");
    let (status, good_ep) = api.endpoint(&consumer, &cvpc, vec![&csubnet], s(&good_cfg["arn"])).await;
    assert_eq!(status, StatusCode::CREATED, "{good_ep}");

    // Ports: the hostile owner widens its resource; only its endpoint fails, and says why.
    let bad_path = format!("/v1/resourceconfigurations/{}", s(&bad_cfg["id"]));
    let (status, v) = api.call("PATCH", &bad_path, &hostile.key, Some(json!({"portRanges": ["1024-65535"]}))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (_, got) = api.get(&format!("/v1/vpcendpoints/{}", s(&bad_ep["id"])), &consumer.key).await;
    assert_eq!(got["state"], "Failed", "{got}");
    assert!(s(&got["failureReason"]).contains("64512 listening ports"), "{got}");
    let (_, good) = api.get(&format!("/v1/vpcendpoints/{}", s(&good_ep["id"])), &consumer.key).await;
    assert_eq!(good["state"], "Pending", "the other provider's endpoint is untouched: {good}");
    // A new endpoint to the wide resource is refused outright.
    let (status, err) = api.endpoint(&consumer, &cvpc, vec![&csubnet], s(&bad_cfg["arn"])).await;
    assert_eq!((status, s(&err["code"])), (StatusCode::UNPROCESSABLE_ENTITY, "ListenerLimitExceeded"), "{err}");
    // Narrowing the ports again lifts the failure.
    api.call("PATCH", &bad_path, &hostile.key, Some(json!({"portRanges": ["5432"]}))).await;
    let (_, got) = api.get(&format!("/v1/vpcendpoints/{}", s(&bad_ep["id"])), &consumer.key).await;
    assert_eq!(got["state"], "Pending", "{got}");

    // Addresses: a GROUP endpoint in a /28 takes at most 4 addresses; the 5th CHILD fails that endpoint only.
    let (vpc_id, subnet_id) = api.vpc_with_subnet(&hostile, "z1", "10.1.9.0/24").await;
    let gw = api
        .create(
            "/v1/resourcegateways",
            &hostile.key,
            json!({"name": "gw2", "vpcIdentifier": vpc_id, "subnetIds": [subnet_id]}),
        )
        .await;
    let group = api
        .create(
            "/v1/resourceconfigurations",
            &hostile.key,
            json!({"name": "g", "type": "GROUP", "resourceGatewayIdentifier": gw["id"], "portRanges": ["1-65535"]}),
        )
        .await;
    let child = |n: u32| {
        json!({"name": format!("c{n}"), "type": "CHILD", "resourceConfigurationGroupIdentifier": group["id"],
               "resourceConfigurationDefinition": {"ipResource": {"ipAddress": format!("10.1.0.{n}")}},
               "portRanges": ["80"]})
    };
    api.create("/v1/resourceconfigurations", &hostile.key, child(1)).await;
    api.share(&hostile, vec![s(&group["arn"])], vec![&consumer.id]).await;
    api.accept_all(&consumer).await;
    let (status, group_ep) = api.endpoint(&consumer, &cvpc, vec![&csubnet], s(&group["arn"])).await;
    assert_eq!(status, StatusCode::CREATED, "{group_ep}");
    for n in 2..=6 {
        let (status, v) = api.post("/v1/resourceconfigurations", &hostile.key, child(n)).await;
        assert_eq!(status, StatusCode::CREATED, "the owner's CHILD is created whatever the consumers' pools hold: {v}");
    }
    let (_, got) = api.get(&format!("/v1/vpcendpoints/{}", s(&group_ep["id"])), &consumer.key).await;
    assert_eq!(got["dnsEntries"].as_array().unwrap().len(), 4, "{got}");
    assert_eq!(got["state"], "Failed", "{got}");
    assert!(s(&got["failureReason"]).contains("the most one endpoint may take"), "{got}");
    // The consumer can still give the honest provider's next endpoint an address.
    let (_, sub) = api.get(&format!("/v1/subnets/{csubnet}"), &consumer.key).await;
    assert!(sub["availableIpAddressCount"].as_u64().unwrap() >= 7, "{sub}");
    let (status, v) = api.endpoint(&consumer, &cvpc, vec![&csubnet], s(&good_cfg["arn"])).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
}

/// Attack (issue 6.4): a provider put names of its choosing (another
/// endpoint's generated name) into a consumer's DNS. Names in the reserved
/// zone are never custom names.
#[tokio::test]
async fn reserved_names_are_never_custom_names() {
    let api = Api::new();
    let owner = api.account("acme").await;
    let (gw, _) = api.owner_setup(&owner, "z1").await;
    for name in ["vpce-0123456789abcdef0.rcfg-0123456789abcdef0.local.trellis.internal", "TRELLIS.INTERNAL."] {
        let (status, err) = api
            .post(
                "/v1/resourceconfigurations",
                &owner.key,
                json!({"name": "db2", "type": "SINGLE", "resourceGatewayIdentifier": gw,
                       "resourceConfigurationDefinition": {"ipResource": {"ipAddress": "10.0.0.11"}},
                       "portRanges": ["5432"], "customDomainName": name}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{name}: {err}");
        assert!(s(&err["message"]).contains("trellis.internal"), "{err}");
    }
    let (_, list) = api.get("/v1/resourceconfigurations", &owner.key).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "nothing was created");
}

/// Attack (issue 6.10): "principal … is not an existing account" told any
/// tenant which account ids exist, and anyone could send anyone any number of
/// invitations. Now a missing and an existing principal get the same answer,
/// and share creation is rate-limited per account.
#[tokio::test]
async fn shares_do_not_reveal_accounts_and_are_rate_limited() {
    let api = Api::new();
    let owner = api.account("acme").await;
    let real = api.account("globex").await;
    let (_, cfg) = api.owner_setup(&owner, "z1").await;
    let missing = "acct-000000000001";
    assert_ne!(missing, real.id);
    let answer = |v: &Value| {
        let mut v = v.clone();
        for field in ["id", "arn", "resourceShareArn", "principals", "createdAt"] {
            v.as_object_mut().unwrap().remove(field);
        }
        v
    };
    let to_real = api.share(&owner, vec![s(&cfg["arn"])], vec![&real.id]).await;
    let to_missing = api.share(&owner, vec![s(&cfg["arn"])], vec![missing]).await;
    assert_eq!(answer(&to_real), answer(&to_missing), "the answers differ only by the principal");
    let (_, invs) = api.get("/v1/resourceshareinvitations", &real.key).await;
    assert_eq!(invs["items"].as_array().unwrap().len(), 1, "the real account got its invitation");

    // A burst, then 429 with the time to wait; another account is not affected.
    let mut limited = None;
    for _ in 0..100 {
        let (status, v) = api
            .post(
                "/v1/resourceshares",
                &owner.key,
                json!({"name": "spam", "resourceArns": [], "principals": [real.id]}),
            )
            .await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(v);
            break;
        }
        assert_eq!(status, StatusCode::CREATED, "{v}");
    }
    let limited = limited.expect("share creation is rate-limited");
    assert_eq!(limited["code"], "TooManyRequests");
    assert!(s(&limited["message"]).contains("try again in"), "{limited}");
    let (status, v) =
        api.post("/v1/resourceshares", &real.key, json!({"name": "mine", "resourceArns": [], "principals": []})).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
}

/// An operator who onboards many consumers raises the share rate
/// (`trellis server --shares-per-minute`): the burst is twice the rate, and
/// the 429 names the rate in force.
#[tokio::test]
async fn the_share_rate_limit_follows_the_server_setting() {
    for (per_minute, burst) in [(3, 6), (100, 200)] {
        let api = Api::with_settings(Settings { shares_per_minute: per_minute, ..Settings::default() });
        let owner = api.account("acme").await;
        let consumer = api.account("globex").await;
        let body = json!({"name": "s", "resourceArns": [], "principals": [consumer.id]});
        let started = std::time::Instant::now();
        for i in 0..burst {
            let (status, v) = api.post("/v1/resourceshares", &owner.key, body.clone()).await;
            assert_eq!(status, StatusCode::CREATED, "share {i} of a burst of {burst}: {v}");
        }
        // On a slow machine the bucket refills while the burst runs: those shares pass too.
        let mut refilled = 0;
        let v = loop {
            let (status, v) = api.post("/v1/resourceshares", &owner.key, body.clone()).await;
            if status == StatusCode::TOO_MANY_REQUESTS {
                break v;
            }
            assert_eq!(status, StatusCode::CREATED, "{v}");
            refilled += 1;
            let earned = started.elapsed().as_secs_f64() * f64::from(per_minute) / 60.0;
            assert!(f64::from(refilled) <= earned + 1.0, "{refilled} shares past the burst, {earned:.1} earned");
        };
        assert!(s(&v["message"]).contains(&format!("faster than {per_minute} a minute")), "{v}");
    }
}
