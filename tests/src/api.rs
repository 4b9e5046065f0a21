//! A raw HTTP client for the control plane's JSON API, trusting only the
//! control plane's own CA (`<data-dir>/ca.pem`). Used where a test needs the
//! exact status code or must send bytes the CLI never would.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reqwest::blocking::{Client, RequestBuilder};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

/// An HTTP answer: status, body as text, and body as JSON (`Null` if not JSON).
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub text: String,
    pub json: Value,
}

impl Response {
    /// The JSON body, after asserting a 2xx status.
    pub fn ok(self, what: &str) -> Value {
        assert!((200..300).contains(&self.status), "{what}: expected 2xx, got {} {}", self.status, self.text);
        self.json
    }

    /// Asserts the status and returns the JSON body.
    pub fn expect_status(self, status: u16, what: &str) -> Value {
        assert_eq!(self.status, status, "{what}: expected {status}, got {} {}", self.status, self.text);
        self.json
    }

    /// The `message` of an error body (empty if absent).
    pub fn message(&self) -> &str {
        self.json.get("message").and_then(Value::as_str).unwrap_or("")
    }
}

/// A client bound to one control plane URL and, optionally, one API key.
#[derive(Clone)]
pub struct Api {
    base: String,
    key: Option<String>,
    client: Client,
}

/// A rustls client config that trusts exactly the CA certificates in `ca_pem`.
pub fn tls_config_trusting(ca_pem: &Path) -> rustls::ClientConfig {
    tls_builder(ca_pem).with_no_client_auth()
}

fn tls_builder(ca_pem: &Path) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_pem)
        .unwrap_or_else(|e| panic!("read CA certificate {}: {e}", ca_pem.display()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("parse CA certificate {}: {e}", ca_pem.display()));
    assert!(!certs.is_empty(), "{} holds no certificate", ca_pem.display());
    for cert in certs {
        roots.add(cert).unwrap_or_else(|e| panic!("add CA certificate from {}: {e}", ca_pem.display()));
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default protocol versions")
        .with_root_certificates(roots)
}

impl Api {
    /// A client for `base` (e.g. `https://127.0.0.1:4443`) trusting `ca_pem`.
    pub fn new(base: &str, ca_pem: &Path, key: Option<&str>) -> Api {
        let client = Client::builder()
            .tls_backend_preconfigured(tls_config_trusting(ca_pem))
            .timeout(Duration::from_secs(30))
            .no_proxy()
            .build()
            .expect("build the HTTP client");
        Api { base: base.trim_end_matches('/').to_string(), key: key.map(str::to_string), client }
    }

    /// A client that authenticates with a TLS client certificate (as an agent
    /// does on the agent-facing routes) instead of an API key.
    pub fn with_client_cert(base: &str, ca_pem: &Path, cert_pem: &Path, key_pem: &Path) -> Api {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_pem)
            .and_then(|i| i.collect::<Result<_, _>>())
            .unwrap_or_else(|e| panic!("read certificate {}: {e}", cert_pem.display()));
        let key =
            PrivateKeyDer::from_pem_file(key_pem).unwrap_or_else(|e| panic!("read key {}: {e}", key_pem.display()));
        let tls =
            tls_builder(ca_pem).with_client_auth_cert(chain, key).expect("the agent's key matches its certificate");
        let client = Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(Duration::from_secs(30))
            .no_proxy()
            .build()
            .expect("build the HTTP client");
        Api { base: base.trim_end_matches('/').to_string(), key: None, client }
    }

    /// The same client with another API key (`None`: no Authorization header).
    pub fn with_key(&self, key: Option<&str>) -> Api {
        Api { base: self.base.clone(), key: key.map(str::to_string), client: self.client.clone() }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn get(&self, path: &str) -> Response {
        self.send(self.client.get(self.url(path)))
    }

    pub fn delete(&self, path: &str) -> Response {
        self.send(self.client.delete(self.url(path)))
    }

    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.send(self.client.post(self.url(path)).json(body))
    }

    pub fn patch(&self, path: &str, body: &Value) -> Response {
        self.send(self.client.patch(self.url(path)).json(body))
    }

    /// POSTs `body` verbatim as `application/json`, valid or not.
    pub fn post_raw(&self, path: &str, body: &str) -> Response {
        self.send(self.client.post(self.url(path)).header("content-type", "application/json").body(body.to_string()))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// GET that reports a transport failure (server not up yet) as `Err`.
    pub fn try_get(&self, path: &str) -> Result<Response, String> {
        self.try_send(self.client.get(self.url(path)))
    }

    fn send(&self, req: RequestBuilder) -> Response {
        self.try_send(req).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_send(&self, mut req: RequestBuilder) -> Result<Response, String> {
        if let Some(key) = &self.key {
            req = req.bearer_auth(key);
        }
        let resp = req.send().map_err(|e| format!("HTTP request to {} failed: {e:#}", self.base))?;
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Response { status, text, json })
    }
}
