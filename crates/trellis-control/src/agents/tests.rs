//! Fixtures shared by the compiler and agent route tests, and the router
//! tests of tokens, enrollment, config long-poll, reports and usage.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use serde_json::{Value, json};
use tower::ServiceExt;
use trellis_model::*;
use trellis_proto::AgentConfig;
use trellis_proto::agent_api::{AgentReport, EnrollResponse, ListenerStatus, UsageCounters};
use trellis_proto::join_token::JoinToken;
use trellis_store::sqlite::SqliteStore;
use trellis_store::{Filter, Tx, TxExt, read_with, write_with};

use super::records::{AgentToken, TargetHealthRecord, UsageRecord};
use crate::pki::{Ca, sha256_hex};
use crate::state::{AppState, Settings};
use crate::tls::PeerIdentity;

pub(crate) const REGION: &str = "local";

pub(crate) fn t0() -> Timestamp {
    Timestamp::from_unix_seconds(1_700_000_000)
}

fn seed(kind: u8, n: u8) -> Seed {
    let mut s = [n; 16];
    s[0] = kind;
    s
}

pub(crate) fn account(n: u8) -> Account {
    Account::new(AccountId::generate(&seed(1, n)), format!("acct{n}"), None, REGION, t0())
}

pub(crate) fn vpc(owner: &Account, n: u8) -> Vpc {
    Vpc::new(VpcId::generate(&seed(2, n)), owner.id.clone(), format!("vpc{n}"), REGION, t0())
}

pub(crate) fn subnet(vpc: &Vpc, zone: &str, cidr: &str, n: u8) -> Subnet {
    Subnet::new(
        SubnetId::generate(&seed(3, n)),
        vpc.account_id.clone(),
        vpc.id.clone(),
        zone.into(),
        AddressPool::parse(cidr).unwrap(),
        None,
        REGION,
        t0(),
    )
}

pub(crate) fn agent(subnet: &Subnet, n: u8, advertise: Option<&str>) -> Agent {
    let id = AgentId::generate(&seed(4, n));
    Agent {
        arn: Agent::arn_for(REGION, &subnet.account_id, &id),
        agent_id: id.clone(),
        id,
        account_id: subnet.account_id.clone(),
        vpc_id: subnet.vpc_id.clone(),
        subnet_id: subnet.id.clone(),
        zone: subnet.zone.clone(),
        hostname: format!("host{n}"),
        advertise: advertise.map(str::to_string),
        cert_sha256: sha256_hex(&[n]),
        status: AgentStatus::Online,
        last_seen_at: Some(t0()),
        config_version: 0,
        created_at: t0(),
    }
}

/// An ONLINE agent in a subnet of its own (for tests that need just one).
pub(crate) fn agent_fixture(n: u8, last_seen: Timestamp) -> Agent {
    let a = account(n);
    let v = vpc(&a, n);
    let s = subnet(&v, "z1", "10.9.0.0/24", n);
    Agent { last_seen_at: Some(last_seen), ..agent(&s, n, None) }
}

pub(crate) fn gateway(vpc: &Vpc, subnets: &[&Subnet], n: u8) -> ResourceGateway {
    let mut gw = ResourceGateway::new(
        ResourceGatewayId::generate(&seed(5, n)),
        vpc.account_id.clone(),
        format!("gw{n}"),
        vpc.id.clone(),
        subnets.iter().map(|s| s.id.clone()).collect(),
        IpAddressType::Ipv4,
        REGION,
        t0(),
    );
    gw.status = ResourceStatus::Active;
    gw
}

pub(crate) fn configuration(
    gw: &ResourceGateway,
    n: u8,
    config_type: ConfigurationType,
    group: Option<&ResourceConfiguration>,
    definition: Option<ResourceDefinition>,
    ports: &[&str],
) -> ResourceConfiguration {
    let id = ResourceConfigurationId::generate(&seed(6, n));
    ResourceConfiguration {
        arn: ResourceConfiguration::arn_for(REGION, &gw.account_id, &id),
        id,
        account_id: gw.account_id.clone(),
        name: format!("cfg{n}"),
        config_type,
        status: ResourceStatus::Active,
        resource_gateway_id: gw.id.clone(),
        resource_configuration_group_id: group.map(|g| g.id.clone()),
        resource_configuration_definition: definition,
        port_ranges: ports.iter().map(|p| p.parse().unwrap()).collect(),
        protocol: Protocol::Tcp,
        custom_domain_name: None,
        proxy_protocol: Default::default(),
        per_consumer_limits: None,
        created_at: t0(),
    }
}

pub(crate) fn ip(address: &str) -> Option<ResourceDefinition> {
    Some(ResourceDefinition::IpResource(IpResource { ip_address: address.parse().unwrap() }))
}

pub(crate) fn share(owner: &Account, configs: &[&ResourceConfiguration], to: &Account, n: u8) -> ResourceShare {
    ResourceShare::new(
        ResourceShareId::generate(&seed(7, n)),
        owner.id.clone(),
        format!("share{n}"),
        configs.iter().map(|c| c.arn.clone()).collect(),
        vec![to.id.clone()],
        REGION,
        t0(),
    )
}

pub(crate) fn invitation(
    share: &ResourceShare,
    to: &Account,
    status: InvitationStatus,
    n: u8,
) -> ResourceShareInvitation {
    let mut i = ResourceShareInvitation::new(
        ResourceShareInvitationId::generate(&seed(8, n)),
        share,
        to.id.clone(),
        REGION,
        t0(),
    );
    i.status = status;
    i
}

/// An endpoint to `target` (SINGLE, or a GROUP with `resources` its children).
pub(crate) fn endpoint(
    vpc: &Vpc,
    subnets: &[&Subnet],
    target: &ResourceConfiguration,
    resources: &[&ResourceConfiguration],
    n: u8,
) -> VpcEndpoint {
    let id = VpcEndpointId::generate(&seed(9, n));
    let subnets: Vec<Subnet> = subnets.iter().map(|s| (*s).clone()).collect();
    let dns_entries = plan_dns_entries(&id, REGION, resources, &subnets, false, &mut Pools::default()).unwrap();
    VpcEndpoint {
        arn: VpcEndpoint::arn_for(REGION, &vpc.account_id, &id),
        vpc_endpoint_id: id.clone(),
        id,
        account_id: vpc.account_id.clone(),
        vpc_endpoint_type: VpcEndpointType::Resource,
        vpc_id: vpc.id.clone(),
        subnet_ids: subnets.iter().map(|s| s.id.clone()).collect(),
        resource_configuration_arn: Some(target.arn.clone()),
        resource_configuration_id: Some(target.id.clone()),
        resource_configuration_owner_id: Some(target.account_id.clone()),
        service_id: None,
        service_name: None,
        service_owner_id: None,
        private_dns_enabled: false,
        private_dns_preference: PrivateDnsPreference::default(),
        private_dns_specified_domains: vec![],
        state: EndpointState::Pending,
        failure_reason: None,
        dns_entries,
        created_at: t0(),
    }
}

/// An owner with a gateway in two zones and a database, a consumer with two
/// subnets and an endpoint in zone z1, and an accepted share between them.
pub(crate) struct World {
    pub owner: Account,
    pub consumer: Account,
    pub owner_vpc: Vpc,
    pub consumer_vpc: Vpc,
    pub owner_subnets: [Subnet; 2],
    pub consumer_subnets: [Subnet; 2],
    pub gw_agents: [Agent; 2],
    pub consumer_agents: [Agent; 2],
    pub gateway: ResourceGateway,
    pub db: ResourceConfiguration,
    pub share: ResourceShare,
    pub invitation: ResourceShareInvitation,
    pub endpoint: VpcEndpoint,
}

impl World {
    pub fn new() -> Self {
        let owner = account(1);
        let consumer = account(2);
        let owner_vpc = vpc(&owner, 1);
        let consumer_vpc = vpc(&consumer, 2);
        // Same CIDR on both sides: overlapping address plans are normal.
        let owner_subnets = [subnet(&owner_vpc, "z1", "10.0.9.0/24", 1), subnet(&owner_vpc, "z2", "10.0.10.0/24", 2)];
        let consumer_subnets =
            [subnet(&consumer_vpc, "z1", "10.0.9.0/24", 3), subnet(&consumer_vpc, "z2", "10.0.10.0/24", 4)];
        let gw_agents =
            [agent(&owner_subnets[0], 1, Some("192.0.2.1:7443")), agent(&owner_subnets[1], 2, Some("192.0.2.2:7443"))];
        let consumer_agents = [agent(&consumer_subnets[0], 3, None), agent(&consumer_subnets[1], 4, None)];
        let gateway = gateway(&owner_vpc, &[&owner_subnets[0], &owner_subnets[1]], 1);
        let db = configuration(&gateway, 1, ConfigurationType::Single, None, ip("10.0.0.10"), &["5432"]);
        let share = share(&owner, &[&db], &consumer, 1);
        let invitation = invitation(&share, &consumer, InvitationStatus::Accepted, 1);
        let endpoint = endpoint(&consumer_vpc, &[&consumer_subnets[0]], &db, &[&db], 1);
        Self {
            owner,
            consumer,
            owner_vpc,
            consumer_vpc,
            owner_subnets,
            consumer_subnets,
            gw_agents,
            consumer_agents,
            gateway,
            db,
            share,
            invitation,
            endpoint,
        }
    }

    pub fn insert(&self, tx: &mut dyn Tx) -> Result<(), trellis_store::StoreError> {
        tx.insert_obj(&self.owner)?;
        tx.insert_obj(&self.consumer)?;
        tx.insert_obj(&self.owner_vpc)?;
        tx.insert_obj(&self.consumer_vpc)?;
        for s in self.owner_subnets.iter().chain(&self.consumer_subnets) {
            tx.insert_obj(s)?;
        }
        for a in self.gw_agents.iter().chain(&self.consumer_agents) {
            tx.insert_obj(a)?;
        }
        tx.insert_obj(&self.gateway)?;
        tx.insert_obj(&self.db)?;
        tx.insert_obj(&self.share)?;
        tx.insert_obj(&self.invitation)?;
        tx.insert_obj(&self.endpoint)?;
        Ok(())
    }

    pub fn store(&self) -> SqliteStore {
        let store = SqliteStore::open_in_memory().unwrap();
        write_with(&store, |tx| self.insert(tx)).unwrap();
        store
    }
}

// ---------------------------------------------------------------------------
// Router tests.

struct Api {
    router: Router,
    state: AppState,
    owner_key: String,
    consumer_key: String,
    world: World,
    _dir: tempfile::TempDir,
}

impl Api {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let world = World::new();
        let store = world.store();
        let owner_key = crate::auth::generate_key().unwrap();
        let consumer_key = crate::auth::generate_key().unwrap();
        write_with(&store, |tx| {
            crate::auth::insert_key(tx, &owner_key, Some(&world.owner.id), t0())?;
            crate::auth::insert_key(tx, &consumer_key, Some(&world.consumer.id), t0())
        })
        .unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let state =
            AppState::new(Arc::new(store), Settings { region: REGION.into(), ..Settings::default() }, Arc::new(ca));
        Self { router: crate::api_router(state.clone()), state, owner_key, consumer_key, world, _dir: dir }
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        key: Option<&str>,
        peer: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(key) = key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Body::from(b.to_string())
            }
            None => Body::empty(),
        };
        let mut req = req.body(body).unwrap();
        req.extensions_mut().insert(PeerIdentity(peer.map(str::to_string)));
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        (status, value)
    }

    async fn create_token(&self, key: &str, subnet: &Subnet) -> String {
        let (status, body) =
            self.call("POST", "/v1/agent-tokens", Some(key), None, Some(json!({"subnetId": subnet.id}))).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["token"].as_str().unwrap().to_string()
    }

    async fn enroll(&self, token: &str, advertise: Option<&str>) -> (StatusCode, Value) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
        let body = json!({"joinToken": token, "csrPem": csr, "advertise": advertise, "hostname": "node-1"});
        self.call("POST", "/v1/agents/enroll", None, None, Some(body)).await
    }

    /// Enrolls an agent into `subnet` and returns (agent id, cert fingerprint).
    async fn enrolled(&self, key: &str, subnet: &Subnet, advertise: Option<&str>) -> (String, String) {
        let token = self.create_token(key, subnet).await;
        let (status, body) = self.enroll(&token, advertise).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let resp: EnrollResponse = serde_json::from_value(body).unwrap();
        let der = {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::from_pem_slice(resp.certificate_pem.as_bytes()).unwrap()
        };
        (resp.agent_id, sha256_hex(&der))
    }

    async fn config(&self, peer: &str, after: u64, wait: u64) -> (StatusCode, Value) {
        self.call("GET", &format!("/v1/agents/self/config?after={after}&waitSeconds={wait}"), None, Some(peer), None)
            .await
    }

    async fn report(&self, peer: &str, report: &AgentReport) -> StatusCode {
        self.call("POST", "/v1/agents/self/report", None, Some(peer), Some(serde_json::to_value(report).unwrap()))
            .await
            .0
    }

    fn read<T>(&self, f: impl FnMut(&mut dyn Tx) -> Result<T, trellis_store::StoreError>) -> T {
        read_with(&*self.state.store, f).unwrap()
    }
}

#[tokio::test]
async fn token_create_shows_the_secret_once_and_stores_its_hash() {
    let api = Api::new();
    let subnet = &api.world.owner_subnets[0];
    let (status, body) = api
        .call(
            "POST",
            "/v1/agent-tokens",
            Some(&api.owner_key),
            None,
            Some(json!({"subnetId": subnet.id, "expiresInSeconds": 600})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let token: JoinToken = body["token"].as_str().unwrap().parse().unwrap();
    assert_eq!(token.ca_sha256, api.state.ca.cert_sha256_hex());
    assert_eq!(body["tokenId"], token.token_id);
    assert_eq!(body["id"], token.token_id);
    assert_eq!(body["subnetId"], subnet.id.as_str());
    assert_eq!(body["state"], "VALID");
    assert!(body["expiresAt"].is_string());

    let stored: AgentToken = api.read(|tx| Ok(tx.get_obj::<AgentToken>(&token.token_id)?.unwrap()));
    assert_eq!(stored.secret_sha256, sha256_hex(token.secret.as_bytes()));
    assert!(!serde_json::to_string(&stored).unwrap().contains(&token.secret));

    let (status, list) = api.call("GET", "/v1/agent-tokens", Some(&api.owner_key), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(&token.secret), "lists never show the secret");
    let (status, one) =
        api.call("GET", &format!("/v1/agent-tokens/{}", token.token_id), Some(&api.owner_key), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(one.get("token").is_none());

    // Another account neither sees nor deletes it.
    let uri = format!("/v1/agent-tokens/{}", token.token_id);
    assert_eq!(api.call("GET", &uri, Some(&api.consumer_key), None, None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(api.call("DELETE", &uri, Some(&api.consumer_key), None, None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(api.call("DELETE", &uri, Some(&api.owner_key), None, None).await.0, StatusCode::NO_CONTENT);
    let (status, _) = api.enroll(&token.to_string(), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a deleted token enrolls nothing");
}

#[tokio::test]
async fn tokens_need_a_subnet_of_the_caller_and_a_sane_lifetime() {
    let api = Api::new();
    let theirs = &api.world.consumer_subnets[0];
    let (status, body) =
        api.call("POST", "/v1/agent-tokens", Some(&api.owner_key), None, Some(json!({"subnetId": theirs.id}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let mine = &api.world.owner_subnets[0];
    for bad in [0, 59, 86_401] {
        let body = json!({"subnetId": mine.id, "expiresInSeconds": bad});
        let (status, _) = api.call("POST", "/v1/agent-tokens", Some(&api.owner_key), None, Some(body)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    }
    let (status, _) = api.call("POST", "/v1/agent-tokens", None, None, Some(json!({"subnetId": mine.id}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn enrollment_signs_the_csr_and_creates_the_agent() {
    let api = Api::new();
    let subnet = &api.world.owner_subnets[1];
    let token = api.create_token(&api.owner_key, subnet).await;
    let (status, body) = api.enroll(&token, Some("192.0.2.7:7443")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let resp: EnrollResponse = serde_json::from_value(body).unwrap();
    assert!(resp.agent_id.starts_with("agent-") && resp.agent_id.len() == "agent-".len() + 17);
    assert_eq!(resp.subnet_id, subnet.id.as_str());
    assert_eq!(resp.vpc_id, api.world.owner_vpc.id.as_str());
    assert_eq!(resp.account_id, api.world.owner.id.as_str());
    assert_eq!(resp.ca_pem, api.state.ca.cert_pem());

    let (status, agent) =
        api.call("GET", &format!("/v1/agents/{}", resp.agent_id), Some(&api.owner_key), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(agent["zone"], "z2");
    assert_eq!(agent["advertise"], "192.0.2.7:7443");
    assert_eq!(agent["status"], "ONLINE");
    let (_, list) = api.call("GET", "/v1/agents", Some(&api.consumer_key), None, None).await;
    assert!(!list.to_string().contains(&resp.agent_id), "agents are private to their account");

    let (status, token_view) = api.call("GET", "/v1/agent-tokens", Some(&api.owner_key), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(token_view["items"][0]["state"], "USED");
    assert_eq!(token_view["items"][0]["agentId"], resp.agent_id.as_str());
}

#[tokio::test]
async fn bad_join_tokens_are_401_with_a_reason() {
    let api = Api::new();
    let subnet = &api.world.owner_subnets[0];

    let (status, body) = api.enroll("garbage", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body["message"].as_str().unwrap().contains("malformed"), "{body}");

    // Used once: the second enrollment is refused.
    let token = api.create_token(&api.owner_key, subnet).await;
    assert_eq!(api.enroll(&token, None).await.0, StatusCode::OK);
    let (status, body) = api.enroll(&token, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["message"].as_str().unwrap().contains("already used"), "{body}");

    // Expired.
    let token = api.create_token(&api.owner_key, subnet).await;
    let parsed: JoinToken = token.parse().unwrap();
    write_with(&*api.state.store, |tx| {
        let mut t = tx.get_obj::<AgentToken>(&parsed.token_id)?.unwrap();
        t.expires_at = Timestamp::from_unix_seconds(1);
        tx.update_obj(&t)
    })
    .unwrap();
    let (status, body) = api.enroll(&token, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["message"].as_str().unwrap().contains("expired"), "{body}");

    // Wrong secret, and a token of another control plane.
    let token: JoinToken = api.create_token(&api.owner_key, subnet).await.parse().unwrap();
    let wrong = JoinToken { secret: "0".repeat(64), ..token.clone() };
    let (status, body) = api.enroll(&wrong.to_string(), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["message"].as_str().unwrap().contains("not valid"), "{body}");
    let foreign = JoinToken { ca_sha256: "1".repeat(64), ..token.clone() };
    let (status, body) = api.enroll(&foreign.to_string(), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["message"].as_str().unwrap().contains("another control plane"), "{body}");

    // A failed attempt does not burn the token; bad input is a 422, not a 401.
    let (status, _) = api.enroll(&token.to_string(), Some("0.0.0.0:7443")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let body = json!({"joinToken": token.to_string(), "csrPem": "nope", "hostname": "h"});
    let (status, body) = api.call("POST", "/v1/agents/enroll", None, None, Some(body)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(api.enroll(&token.to_string(), None).await.0, StatusCode::OK);
}

#[tokio::test]
async fn config_needs_an_enrolled_certificate() {
    let api = Api::new();
    let (status, body) = api.call("GET", "/v1/agents/self/config", None, None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["message"].as_str().unwrap().contains("client certificate"));
    let (status, _) = api.config(&"ab".repeat(32), 0, 0).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn config_is_versioned_by_content_and_long_polls() {
    let api = Api::new();
    let (agent_id, cert) = api.enrolled(&api.owner_key, &api.world.owner_subnets[0], Some("192.0.2.9:7443")).await;
    let (status, body) = api.config(&cert, 0, 0).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let config: AgentConfig = serde_json::from_value(body).unwrap();
    assert_eq!(config.agent_id, agent_id);
    assert!(config.version >= 1);
    assert_eq!(config.zone, "z1");
    assert_eq!(config.address_pool, "10.0.9.0/24");
    assert_eq!(config.gateway.resources.len(), 1);
    assert_eq!(config.gateway.resources[0].resource_configuration_id, api.world.db.id.as_str());

    // Nothing new: 304 after the wait, and the version did not move.
    let (status, _) = api.config(&cert, config.version, 0).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    let (_, again) = api.config(&cert, 0, 0).await;
    assert_eq!(again["version"], config.version);

    // A waiting poll wakes up when the share is deleted, with the endpoint gone.
    let poll = {
        let router = api.router.clone();
        let cert = cert.clone();
        let uri = format!("/v1/agents/self/config?after={}&waitSeconds=30", config.version);
        tokio::spawn(async move {
            let mut req = Request::builder().uri(uri).body(Body::empty()).unwrap();
            req.extensions_mut().insert(PeerIdentity(Some(cert)));
            let resp = router.oneshot(req).await.unwrap();
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
            (status, serde_json::from_slice::<AgentConfig>(&bytes).ok())
        })
    };
    let share_id = api.world.share.id.clone();
    let (status, body) = api.call("GET", "/v1/agents", Some(&api.owner_key), None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    api.state
        .write(move |tx| {
            tx.delete_obj::<ResourceShare>(share_id.as_str())?;
            Ok(())
        })
        .await
        .unwrap();
    let (status, newer) = tokio::time::timeout(Duration::from_secs(20), poll).await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    let newer = newer.unwrap();
    assert_ne!(newer.version, config.version);
    assert!(newer.gateway.resources[0].allowed.is_empty(), "revocation shows up in the next config");
}

#[tokio::test]
async fn an_agent_gets_only_its_own_config() {
    let api = Api::new();
    let (_, owner_cert) = api.enrolled(&api.owner_key, &api.world.owner_subnets[0], Some("192.0.2.9:7443")).await;
    let (consumer_agent, consumer_cert) = api.enrolled(&api.consumer_key, &api.world.consumer_subnets[0], None).await;
    let (status, body) = api.config(&consumer_cert, 0, 0).await;
    assert_eq!(status, StatusCode::OK);
    let config: AgentConfig = serde_json::from_value(body).unwrap();
    assert_eq!(config.agent_id, consumer_agent);
    assert_eq!(config.vpc_id, api.world.consumer_vpc.id.as_str());
    assert!(config.gateway.resources.is_empty(), "the consumer's agent learns nothing of the owner's gateway");
    assert_eq!(config.endpoints.len(), 1);
    // The owner's gateway agent knows the consumer's VPC (its agents' certificates name it).
    let (status, body) = api.config(&owner_cert, 0, 0).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let owner_config: AgentConfig = serde_json::from_value(body).unwrap();
    assert!(owner_config.gateway.consumers.iter().any(|c| c.vpc_id == config.vpc_id));
    assert!(owner_config.endpoints.is_empty());
}

#[tokio::test]
async fn deleting_an_agent_revokes_its_certificate() {
    let api = Api::new();
    let (agent_id, cert) = api.enrolled(&api.owner_key, &api.world.owner_subnets[0], None).await;
    let uri = format!("/v1/agents/{agent_id}");
    assert_eq!(api.call("DELETE", &uri, Some(&api.consumer_key), None, None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(api.call("DELETE", &uri, Some(&api.owner_key), None, None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(api.config(&cert, 0, 0).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        api.report(&cert, &AgentReport { boot_id: "b".into(), ..Default::default() }).await,
        StatusCode::UNAUTHORIZED
    );
}

fn counters(world: &World, total: u64, active: u64, bytes: u64) -> UsageCounters {
    UsageCounters {
        vpc_endpoint_id: world.endpoint.id.to_string(),
        resource_configuration_id: world.db.id.to_string(),
        consumer_account_id: world.consumer.id.to_string(),
        active_connections: active,
        total_connections: total,
        rejected_connections: 1,
        bytes_in: bytes,
        bytes_out: 2 * bytes,
    }
}

#[tokio::test]
async fn reports_move_endpoints_and_usage_adds_up_over_boots() {
    let api = Api::new();
    let w = &api.world;
    let (consumer_agent, consumer_cert) = api.enrolled(&api.consumer_key, &w.consumer_subnets[0], None).await;
    let (gw_agent, gw_cert) = api.enrolled(&api.owner_key, &w.owner_subnets[0], Some("192.0.2.9:7443")).await;
    let endpoint_state = |api: &Api| {
        let id = w.endpoint.id.clone();
        api.read(move |tx| Ok(tx.get_obj::<VpcEndpoint>(id.as_str())?.unwrap()))
    };

    let listener = |ready: bool, error: Option<&str>| ListenerStatus {
        vpc_endpoint_id: w.endpoint.id.to_string(),
        resource_configuration_id: w.db.id.to_string(),
        ready,
        error: error.map(str::to_string),
    };
    // Not ready yet: stays Pending. Ready: Available. An error: Failed, with the reason.
    let mut report = AgentReport {
        config_version: 1,
        boot_id: "boot-1".into(),
        listeners: vec![listener(false, None)],
        usage: vec![],
        advertise: None,
        target_health: vec![],
        outbound_only: false,
    };
    assert_eq!(api.report(&consumer_cert, &report).await, StatusCode::NO_CONTENT);
    assert_eq!(endpoint_state(&api).state, EndpointState::Pending);
    report.listeners = vec![listener(true, None)];
    assert_eq!(api.report(&consumer_cert, &report).await, StatusCode::NO_CONTENT);
    assert_eq!(endpoint_state(&api).state, EndpointState::Available);
    report.listeners = vec![listener(false, Some("address in use"))];
    assert_eq!(api.report(&consumer_cert, &report).await, StatusCode::NO_CONTENT);
    let failed = endpoint_state(&api);
    assert_eq!(failed.state, EndpointState::Failed);
    assert!(failed.failure_reason.unwrap().contains("address in use"));
    report.listeners = vec![listener(true, None)];
    api.report(&consumer_cert, &report).await;
    assert_eq!(endpoint_state(&api).state, EndpointState::Available);
    let agent: Agent = {
        let id = consumer_agent.clone();
        api.read(move |tx| Ok(tx.get_obj::<Agent>(&id)?.unwrap()))
    };
    let (_, shown) = api.call("GET", &format!("/v1/agents/{}", agent.id), Some(&api.consumer_key), None, None).await;
    assert_eq!(shown["configVersion"], 1, "{shown}");
    assert!(shown["lastSeenAt"].is_string(), "{shown}");

    // The owner's gateway agent cannot move the consumer's endpoint.
    let hostile =
        AgentReport { boot_id: "x".into(), listeners: vec![listener(false, Some("evil"))], ..Default::default() };
    assert_eq!(api.report(&gw_cert, &hostile).await, StatusCode::NO_CONTENT);
    assert_eq!(endpoint_state(&api).state, EndpointState::Available);

    // Usage: boot 1 reports twice (cumulative, replaced), then the agent restarts as boot 2.
    let usage = |boot: &str, c: UsageCounters| AgentReport {
        config_version: 1,
        boot_id: boot.into(),
        listeners: vec![],
        usage: vec![c],
        advertise: None,
        target_health: vec![],
        outbound_only: false,
    };
    assert_eq!(api.report(&gw_cert, &usage("boot-1", counters(w, 5, 2, 100))).await, StatusCode::NO_CONTENT);
    assert_eq!(api.report(&gw_cert, &usage("boot-1", counters(w, 7, 3, 150))).await, StatusCode::NO_CONTENT);
    let uri = format!("/v1/resourceconfigurations/{}/usage", w.db.id);
    let (status, body) = api.call("GET", &uri, Some(&api.owner_key), None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let item = &body["items"][0];
    assert_eq!((item["totalConnections"].as_u64(), item["activeConnections"].as_u64()), (Some(7), Some(3)));
    assert_eq!((item["bytesIn"].as_u64(), item["bytesOut"].as_u64()), (Some(150), Some(300)));
    assert_eq!(item["consumerAccountId"], w.consumer.id.as_str());
    assert_eq!(item["vpcEndpointId"], w.endpoint.id.as_str());

    api.report(&gw_cert, &usage("boot-2", counters(w, 1, 1, 10))).await;
    let (_, body) = api.call("GET", &uri, Some(&api.owner_key), None, None).await;
    let item = &body["items"][0];
    assert_eq!(item["totalConnections"].as_u64(), Some(8), "boots add up");
    assert_eq!(item["activeConnections"].as_u64(), Some(1), "only the current boot has open connections");
    assert_eq!(item["rejectedConnections"].as_u64(), Some(2));
    assert_eq!(item["bytesIn"].as_u64(), Some(160));
    let records: Vec<UsageRecord> = api.read(|tx| tx.list_obj(&Filter::default()));
    assert_eq!(records.len(), 1, "one record per (agent, endpoint, resource), however many boots");
    assert_eq!(records[0].agent_id.as_str(), gw_agent);
    assert_eq!(records[0].previous_boots.total_connections, 7);

    // The consumer reporting usage of the owner's resource is ignored; the usage is the owner's to read.
    api.report(&consumer_cert, &usage("boot-9", counters(w, 1000, 0, 0))).await;
    let (_, body) = api.call("GET", &uri, Some(&api.owner_key), None, None).await;
    assert_eq!(body["items"][0]["totalConnections"].as_u64(), Some(8));
    let (status, _) = api.call("GET", &uri, Some(&api.consumer_key), None, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "the consumer may read the configuration, not its usage");
}

#[tokio::test]
async fn malformed_reports_are_rejected() {
    let api = Api::new();
    let (_, cert) = api.enrolled(&api.owner_key, &api.world.owner_subnets[0], None).await;
    let bad_boot = AgentReport { boot_id: "has spaces".into(), ..Default::default() };
    let (status, _) = api
        .call("POST", "/v1/agents/self/report", None, Some(&cert), Some(serde_json::to_value(&bad_boot).unwrap()))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = api.call("POST", "/v1/agents/self/report", None, Some(&cert), Some(json!({"nope": 1}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn routine_reports_do_not_wake_config_long_polls_but_a_moved_listener_does() {
    let api = Api::new();
    let (gateway_id, gateway_cert) =
        api.enrolled(&api.owner_key, &api.world.owner_subnets[0], Some("192.0.2.9:7443")).await;
    let address_of = |config: &AgentConfig| {
        let gateways = &config.endpoints[0].resources[0].gateways;
        gateways.iter().find(|g| g.agent_id == gateway_id).map(|g| g.address.clone())
    };
    let (_, endpoint_cert) = api.enrolled(&api.consumer_key, &api.world.consumer_subnets[0], None).await;
    let report = AgentReport { boot_id: "boot-1".into(), ..Default::default() };
    // The first report brings the agent online, which agents' configs reflect.
    assert_eq!(api.report(&gateway_cert, &report).await, StatusCode::NO_CONTENT);
    let (_, before) = api.config(&endpoint_cert, 0, 0).await;
    let before: AgentConfig = serde_json::from_value(before).unwrap();
    let endpoint_agent = AgentId::parse(&before.agent_id).unwrap();
    let mut changes = api.state.configs.subscribe(&endpoint_agent);
    changes.mark_unchanged();

    // Liveness and counters alone: nobody is woken.
    assert_eq!(api.report(&gateway_cert, &report).await, StatusCode::NO_CONTENT);
    assert!(!changes.has_changed().unwrap(), "a routine report woke the long-polls");

    // The gateway agent restarted on another port: endpoint agents must learn it.
    assert_eq!(address_of(&before).as_deref(), Some("192.0.2.9:7443"));
    let moved = AgentReport { advertise: Some("192.0.2.9:8443".into()), ..report.clone() };
    assert_eq!(api.report(&gateway_cert, &moved).await, StatusCode::NO_CONTENT);
    assert!(changes.has_changed().unwrap(), "a moved tunnel listener must wake the long-polls");
    let (status, after) = api.config(&endpoint_cert, before.version, 0).await;
    assert_eq!(status, StatusCode::OK);
    let after: AgentConfig = serde_json::from_value(after).unwrap();
    assert_eq!(address_of(&after).as_deref(), Some("192.0.2.9:8443"));

    // A nonsense advertise address is refused and changes nothing.
    let bad = AgentReport { advertise: Some("no port here".into()), ..report };
    assert_eq!(api.report(&gateway_cert, &bad).await, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = api.config(&endpoint_cert, after.version, 0).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
}

#[tokio::test]
async fn a_late_ready_report_does_not_undo_a_revocation() {
    let api = Api::new();
    let w = &api.world;
    let (_, consumer_cert) = api.enrolled(&api.consumer_key, &w.consumer_subnets[0], None).await;
    let endpoint_state = |api: &Api| {
        let id = w.endpoint.id.clone();
        api.read(move |tx| Ok(tx.get_obj::<VpcEndpoint>(id.as_str())?.unwrap().state))
    };
    let ready = AgentReport {
        boot_id: "boot-1".into(),
        listeners: vec![ListenerStatus {
            vpc_endpoint_id: w.endpoint.id.to_string(),
            resource_configuration_id: w.db.id.to_string(),
            ready: true,
            error: None,
        }],
        ..Default::default()
    };
    assert_eq!(api.report(&consumer_cert, &ready).await, StatusCode::NO_CONTENT);
    assert_eq!(endpoint_state(&api), EndpointState::Available);

    let uri = format!("/v1/resourceshares/{}", w.share.id);
    assert_eq!(api.call("DELETE", &uri, Some(&api.owner_key), None, None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(endpoint_state(&api), EndpointState::Failed);
    // The agent's report was built from its config before the revocation.
    assert_eq!(api.report(&consumer_cert, &ready).await, StatusCode::NO_CONTENT);
    assert_eq!(endpoint_state(&api), EndpointState::Failed, "readiness must not override lost access");
}

/// Attack (issue 6.1): `after` at u64::MAX made the long-poll write a new
/// version on every pass, forever. Now no value of `after`, `have` or
/// `waitSeconds` makes a long-poll write, and every poll returns by its deadline.
#[tokio::test]
async fn no_client_number_makes_a_long_poll_write_or_outlive_its_deadline() {
    let api = Api::new();
    let (_, cert) = api.enrolled(&api.owner_key, &api.world.owner_subnets[0], Some("192.0.2.9:7443")).await;
    let (status, body) = api.config(&cert, 0, 0).await;
    assert_eq!(status, StatusCode::OK);
    let current = body["version"].as_u64().unwrap();
    let revision = api.state.store.revision().unwrap();
    for query in [
        format!("after={}&waitSeconds=1", u64::MAX),
        format!("after={}&waitSeconds={}", u64::MAX - 1, u64::MAX),
        format!("after=18446744073709551615&have={}&waitSeconds=1", "ab".repeat(32)),
        format!("after={current}&have=not-a-hash&waitSeconds=1"),
    ] {
        let started = std::time::Instant::now();
        let (status, body) = api.call("GET", &format!("/v1/agents/self/config?{query}"), None, Some(&cert), None).await;
        // A number the agent cannot hold gets the current config at once; the
        // current version waits (at most the capped wait) and gets a 304.
        match status {
            StatusCode::OK => assert_eq!(body["version"].as_u64(), Some(current), "{query}"),
            StatusCode::NOT_MODIFIED => assert!(started.elapsed() < Duration::from_secs(5), "{query}"),
            other => panic!("{query}: {other} {body}"),
        }
        assert!(started.elapsed() < Duration::from_secs(62), "{query} outlived the longest wait");
    }
    assert_eq!(api.state.store.revision().unwrap(), revision, "a long-poll wrote to the store");
}

/// An agent that proves (by content hash) it holds the current config keeps
/// its version: a control plane that restarted resends nothing.
#[tokio::test]
async fn an_agent_holding_the_current_content_keeps_its_version() {
    let api = Api::new();
    let (_, cert) = api.enrolled(&api.owner_key, &api.world.owner_subnets[0], Some("192.0.2.9:7443")).await;
    let (_, body) = api.config(&cert, 0, 0).await;
    let config: AgentConfig = serde_json::from_value(body).unwrap();
    let have = crate::configs::content_sha256(&config).unwrap();
    // The version it holds is from before a restart: another number, the same content.
    let old = config.version + 1000;
    let (status, _) = api
        .call("GET", &format!("/v1/agents/self/config?after={old}&have={have}&waitSeconds=0"), None, Some(&cert), None)
        .await;
    assert_eq!(status, StatusCode::NOT_MODIFIED, "the same content is not resent");
    let (status, body) = api.config(&cert, 0, 0).await;
    assert_eq!((status, body["version"].as_u64()), (StatusCode::OK, Some(old)), "the agent's version was adopted");
    // A wrong hash gets the config.
    let (status, _) = api
        .call(
            "GET",
            &format!("/v1/agents/self/config?after={}&have={}&waitSeconds=0", old + 1, "0".repeat(64)),
            None,
            Some(&cert),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

/// Attack (issue 6.6): reports with invented endpoint ids and new boot ids
/// grew the store without limit. Now reports are cut to the agent's own
/// config, bounded in size, and usage keeps one record per (agent, endpoint,
/// resource) however often the agent restarts.
#[tokio::test]
async fn reports_cannot_grow_the_store() {
    let api = Api::new();
    let w = &api.world;
    let (_, gw_cert) = api.enrolled(&api.owner_key, &w.owner_subnets[0], Some("192.0.2.9:7443")).await;
    let invented = |n: usize| UsageCounters {
        vpc_endpoint_id: format!("vpce-{:017x}", n),
        resource_configuration_id: format!("rcfg-{:017x}", n),
        consumer_account_id: w.consumer.id.to_string(),
        total_connections: 1,
        ..UsageCounters::default()
    };
    let too_many = AgentReport {
        boot_id: "boot-1".into(),
        usage: (0..super::report::MAX_REPORT_ENTRIES + 1).map(invented).collect(),
        ..AgentReport::default()
    };
    assert_eq!(api.report(&gw_cert, &too_many).await, StatusCode::UNPROCESSABLE_ENTITY);
    let count = |api: &Api| api.read(|tx| Ok(tx.list_obj::<UsageRecord>(&Filter::default())?.len()));
    for boot in 0..20 {
        let mut usage: Vec<UsageCounters> = (0..50).map(invented).collect();
        usage.push(counters(w, boot + 1, 0, 10));
        let report = AgentReport { boot_id: format!("boot-{boot}"), usage, ..AgentReport::default() };
        assert_eq!(api.report(&gw_cert, &report).await, StatusCode::NO_CONTENT);
    }
    assert_eq!(count(&api), 1, "only the real (endpoint, resource) of the agent's config, once across 20 boots");
    let uri = format!("/v1/resourceconfigurations/{}/usage", w.db.id);
    let (_, body) = api.call("GET", &uri, Some(&api.owner_key), None, None).await;
    assert_eq!(body["items"][0]["totalConnections"].as_u64(), Some((1..=20).sum()), "earlier boots still count");

    // A report that changes nothing writes nothing.
    let quiet = AgentReport { boot_id: "boot-19".into(), ..AgentReport::default() };
    assert_eq!(api.report(&gw_cert, &quiet).await, StatusCode::NO_CONTENT);
    let revision = api.state.store.revision().unwrap();
    for _ in 0..5 {
        assert_eq!(api.report(&gw_cert, &quiet).await, StatusCode::NO_CONTENT);
    }
    assert_eq!(api.state.store.revision().unwrap(), revision, "idle reports wrote to the store");
}

#[tokio::test]
async fn target_health_reports_hold_only_the_agents_own_services_and_repeat_for_free() {
    use trellis_proto::agent_api::TargetHealthReport;
    let api = Api::new();
    let w = &api.world;
    let (_, gw_cert) = api.enrolled(&api.owner_key, &w.owner_subnets[0], Some("192.0.2.9:7443")).await;
    let body = json!({"name": "svc", "vpcId": w.owner_vpc.id, "subnetIds": [w.owner_subnets[0].id],
                      "targets": [{"ipAddress": "10.0.1.5"}], "ports": [{"port": 443}]});
    let (status, service) = api.call("POST", "/v1/vpcendpointservices", Some(&api.owner_key), None, Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{service}");
    let sid = service["id"].as_str().unwrap().to_string();
    let health = |service_id: &str, state: &str| TargetHealthReport {
        service_id: service_id.into(),
        target: "10.0.1.5".into(),
        target_port: 443,
        state: state.into(),
        reason: Some("x".repeat(5_000)),
    };
    // Another provider's (or an invented) service is dropped; reasons are cut.
    let report = AgentReport {
        boot_id: "boot-1".into(),
        target_health: vec![health(&sid, "UNHEALTHY"), health("vpce-svc-0123456789abcdef0", "HEALTHY")],
        ..AgentReport::default()
    };
    assert_eq!(api.report(&gw_cert, &report).await, StatusCode::NO_CONTENT);
    let (_, view) = api.call("GET", &format!("/v1/vpcendpointservices/{sid}"), Some(&api.owner_key), None, None).await;
    let seen = view["targetHealth"].as_array().unwrap();
    assert_eq!(seen.len(), 1, "{view}");
    assert_eq!((seen[0]["state"].as_str(), seen[0]["agents"].as_u64()), (Some("UNHEALTHY"), Some(1)));
    assert!(seen[0]["reason"].as_str().unwrap().len() <= 500, "the agent's text is cut");
    let records = api.read(|tx| tx.list_obj::<TargetHealthRecord>(&Filter::default()));
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].targets.len(), 1, "only the services the agent's config runs");

    // The same health again writes nothing.
    let revision = api.state.store.revision().unwrap();
    for _ in 0..3 {
        assert_eq!(api.report(&gw_cert, &report).await, StatusCode::NO_CONTENT);
    }
    assert_eq!(api.state.store.revision().unwrap(), revision, "a repeated health report wrote to the store");
}
