//! A control plane on the router, without sockets, for API tests.
#![allow(dead_code)]

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt;
use trellis_control::pki::Ca;
use trellis_control::{AppState, Settings, api_router, bootstrap_admin};
use trellis_store::sqlite::SqliteStore;

pub struct Api {
    pub router: Router,
    pub state: AppState,
    pub admin: String,
    _dir: tempfile::TempDir,
}

pub struct Acct {
    pub id: String,
    pub key: String,
}

impl Api {
    pub fn new() -> Self {
        Self::with_settings(Settings::default())
    }

    pub fn with_settings(settings: Settings) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in_memory().unwrap();
        let admin = bootstrap_admin(&store).unwrap().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let state = AppState::new(Arc::new(store), settings, Arc::new(ca));
        Self { router: api_router(state.clone()), state, admin, _dir: dir }
    }

    pub async fn call(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> (StatusCode, Value) {
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
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22).await.unwrap();
        let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        (status, value)
    }

    pub async fn get(&self, path: &str, key: &str) -> (StatusCode, Value) {
        self.call("GET", path, key, None).await
    }

    pub async fn create(&self, path: &str, key: &str, body: Value) -> Value {
        let (status, v) = self.call("POST", path, key, Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "POST {path}: {v}");
        v
    }

    pub async fn account(&self, name: &str) -> Acct {
        let v = self.create("/v1/accounts", &self.admin.clone(), json!({"name": name})).await;
        Acct { id: v["accountId"].as_str().unwrap().into(), key: v["apiKey"].as_str().unwrap().into() }
    }

    /// A VPC, a subnet, a gateway and two SINGLE configurations (`orders-db`, `cache`) of `owner`.
    pub async fn two_configurations(&self, owner: &Acct) -> (Value, Value) {
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

/// A new key and its PEM certificate signing request (for enrollments).
pub fn csr() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap()
}

/// Lower-case hex SHA-256 of a PEM certificate's DER: how the TLS layer names the peer.
pub fn fingerprint(cert_pem: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    trellis_control::pki::sha256_hex(&der)
}

impl Api {
    /// A call as a TLS peer presenting the certificate with fingerprint `peer` (an agent, a relay).
    pub async fn call_as(
        &self,
        method: &str,
        path: &str,
        peer: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let mut req = req.body(body).unwrap();
        req.extensions_mut().insert(trellis_control::tls::PeerIdentity(peer.map(str::to_string)));
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22).await.unwrap();
        let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        (status, value)
    }
}
