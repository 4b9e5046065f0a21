//! The control plane's HTTP API as the scale benchmark drives it: one
//! keep-alive HTTPS client (trusting only the control plane's CA) shared by
//! every account, each call carrying its own key; and a client that presents
//! an agent's certificate, to read that agent's config exactly as it is sent.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT_ENCODING, CONTENT_ENCODING, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

use crate::Res;

/// How often a call that the server asks to retry (429, 503) is retried.
const RETRIES: u32 = 20;

#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
}

/// The agent config as the control plane sent it.
pub struct SentConfig {
    pub bytes: usize,
    pub gzip: bool,
    pub body: Vec<u8>,
}

fn tls(ca_pem: &Path) -> Res<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_pem)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("read the CA certificate {}: {e}", ca_pem.display()))?;
    for cert in certs {
        roots.add(cert).map_err(|e| format!("the CA certificate {} is not usable: {e}", ca_pem.display()))?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_root_certificates(roots))
}

fn client(tls: rustls::ClientConfig) -> Res<reqwest::Client> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(64)
        .build()
        .map_err(|e| format!("build the HTTP client: {e}"))
}

fn retry_after(resp: &reqwest::Response) -> Duration {
    let secs = resp.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    Duration::from_secs(secs.unwrap_or(1).clamp(1, 30))
}

impl Api {
    /// A client for `base` (`https://127.0.0.1:PORT`) trusting the CA in `ca_pem`.
    pub fn new(base: &str, ca_pem: &Path) -> Res<Api> {
        let http = client(tls(ca_pem)?.with_no_client_auth())?;
        Ok(Api { http, base: base.trim_end_matches('/').to_string() })
    }

    /// A client that authenticates as the agent whose state directory is `state_dir`.
    pub fn as_agent(base: &str, ca_pem: &Path, state_dir: &Path) -> Res<Api> {
        let cert_file = state_dir.join("agent.crt");
        let key_file = state_dir.join("agent.key");
        let certs = CertificateDer::pem_file_iter(&cert_file)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("read {}: {e}", cert_file.display()))?;
        let key = PrivateKeyDer::from_pem_file(&key_file).map_err(|e| format!("read {}: {e}", key_file.display()))?;
        let config = tls(ca_pem)?.with_client_auth_cert(certs, key).map_err(|e| format!("agent identity: {e}"))?;
        Ok(Api { http: client(config)?, base: base.trim_end_matches('/').to_string() })
    }

    async fn send(&self, method: &Method, path: &str, key: &str, body: Option<&Value>) -> Res<reqwest::Response> {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.base)).bearer_auth(key);
        if let Some(body) = body {
            req = req.json(body);
        }
        req.send().await.map_err(|e| format!("{method} {path}: {}", chain(&e)))
    }

    /// One call that must succeed (2xx); retried when the server says so (429, 503).
    pub async fn call(&self, method: Method, path: &str, key: &str, body: Option<&Value>) -> Res<Value> {
        let mut tries = 0;
        loop {
            let resp = self.send(&method, path, key, body).await?;
            let status = resp.status();
            if (status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE) && tries < RETRIES
            {
                tries += 1;
                tokio::time::sleep(retry_after(&resp)).await;
                continue;
            }
            let text = resp.text().await.map_err(|e| format!("{method} {path}: reading the answer: {}", chain(&e)))?;
            if !status.is_success() {
                return Err(format!("{method} {path}: HTTP {status}: {}", text.trim()));
            }
            if text.trim().is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_str(&text).map_err(|e| format!("{method} {path}: the answer is not JSON ({e})"));
        }
    }

    pub async fn get(&self, path: &str, key: &str) -> Res<Value> {
        self.call(Method::GET, path, key, None).await
    }

    pub async fn post(&self, path: &str, key: &str, body: &Value) -> Res<Value> {
        self.call(Method::POST, path, key, Some(body)).await
    }

    /// One call, timed from sending the request to the last byte of the answer; it must succeed.
    pub async fn timed(&self, method: Method, path: &str, key: &str, body: Option<&Value>) -> Res<(Duration, Value)> {
        let started = Instant::now();
        let resp = self.send(&method, path, key, body).await?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| format!("{method} {path}: reading the answer: {}", chain(&e)))?;
        let took = started.elapsed();
        if !status.is_success() {
            return Err(format!("{method} {path}: HTTP {status}: {}", String::from_utf8_lossy(&bytes).trim()));
        }
        let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        Ok((took, value))
    }

    /// This agent's current config, at once (`after=0`), gzip-compressed or not, as sent.
    pub async fn agent_config(&self, gzip: bool) -> Res<SentConfig> {
        let mut req = self.http.get(format!("{}/v1/agents/self/config?after=0&waitSeconds=0", self.base));
        if gzip {
            req = req.header(ACCEPT_ENCODING, "gzip");
        }
        let resp = req.send().await.map_err(|e| format!("GET the agent's config: {}", chain(&e)))?;
        let status = resp.status();
        let encoded = resp.headers().get(CONTENT_ENCODING).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        let body = resp.bytes().await.map_err(|e| format!("GET the agent's config: {}", chain(&e)))?.to_vec();
        if status != StatusCode::OK {
            return Err(format!("GET the agent's config: HTTP {status}: {}", String::from_utf8_lossy(&body)));
        }
        Ok(SentConfig { bytes: body.len(), gzip: encoded, body })
    }
}

/// An error and its causes on one line.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut next = err.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// The first of `names` that is a string field of `v`.
pub fn field(v: &Value, names: &[&str]) -> Res<String> {
    names.iter().find_map(|n| v[*n].as_str()).map(str::to_string).ok_or_else(|| format!("none of {names:?} in {v}"))
}
