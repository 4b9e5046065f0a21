//! HTTPS client for the agent-facing routes of the control plane
//! (docs/api.md): `GET /v1/ca.pem`, `POST /v1/agents/enroll`,
//! `GET /v1/agents/self/config` (long-poll) and `POST /v1/agents/self/report`.
//!
//! Trusts only the control plane's CA, which is pinned by the join token's hash
//! before anything secret is sent ([`fetch_pinned_ca`]). It never follows redirects.

use std::time::Duration;

use reqwest::StatusCode;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use trellis_proto::AgentConfig;
use trellis_proto::agent_api::{AgentReport, EnrollRequest, EnrollResponse};

use crate::identity::AgentIdentity;
use crate::tls;

/// Why a call to the control plane failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The control plane URL is not an `https://` URL.
    #[error("the control plane URL {0:?} must start with https:// (agents only talk TLS to the control plane)")]
    InvalidUrl(String),
    /// The CA served by the control plane is not the one the join token names.
    #[error(
        "the control plane's CA does not match the join token (token expects sha256 {expected}, server sent {actual}); \
         check --control-plane points at the server that issued the token, or that nothing intercepts the connection"
    )]
    CaMismatch { expected: String, actual: String },
    /// `/v1/ca.pem` did not contain a certificate.
    #[error("the control plane served an unusable CA certificate: {0}")]
    BadCa(String),
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The control plane could not be reached or the connection broke.
    #[error("could not reach the control plane at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The control plane answered with an error status.
    #[error("the control plane refused {what}: HTTP {status}: {message}")]
    Refused { what: &'static str, status: u16, code: String, message: String },
    /// The config the long-poll returned is not a config.
    #[error("the control plane sent a config that could not be read: {0}")]
    BadConfig(String),
    /// The answer did not parse.
    #[error("the control plane's answer to {what} could not be read: {source}")]
    BadAnswer {
        what: &'static str,
        #[source]
        source: reqwest::Error,
    },
}

impl ControlError {
    /// True for errors that retrying cannot fix (bad credentials, refused enrollment).
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Refused { status, .. } if (400..500).contains(status) && *status != 408 && *status != 429)
    }
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// Largest config the agent accepts, uncompressed.
const MAX_CONFIG_BYTES: u64 = 256 << 20;

/// Decompresses a gzip body, refusing more than [`MAX_CONFIG_BYTES`].
fn gunzip(body: &[u8]) -> Result<Vec<u8>, ControlError> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body)
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| ControlError::BadConfig(format!("the gzip body does not decompress: {e}")))?;
    if out.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ControlError::BadConfig(format!("the config is larger than {MAX_CONFIG_BYTES} bytes")));
    }
    Ok(out)
}

/// Normalizes and checks a control plane URL: `https://host[:port]`, no trailing slash.
pub fn normalize_url(url: &str) -> Result<String, ControlError> {
    let trimmed = url.trim().trim_end_matches('/');
    let rest = trimmed.strip_prefix("https://").ok_or_else(|| ControlError::InvalidUrl(url.to_string()))?;
    if rest.is_empty() || rest.contains(char::is_whitespace) {
        return Err(ControlError::InvalidUrl(url.to_string()));
    }
    Ok(trimmed.to_string())
}

fn build_http(config: rustls::ClientConfig, timeout: Option<Duration>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .no_proxy();
    if let Some(t) = timeout {
        builder = builder.timeout(t);
    }
    // Building only fails when the TLS backend is unknown, which a rustls 0.23 ClientConfig never is.
    builder.build().expect("reqwest client with a rustls config")
}

async fn refused(what: &'static str, resp: reqwest::Response) -> ControlError {
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    let (code, message) = match serde_json::from_str::<ApiError>(&body) {
        Ok(e) => (e.code, e.message),
        Err(_) => (String::new(), body.chars().take(300).collect()),
    };
    ControlError::Refused { what, status, code, message }
}

/// Fetches `{url}/v1/ca.pem` without trusting the server, and accepts the CA
/// only if the SHA-256 of its DER equals `expected_sha256` (from the join token).
pub async fn fetch_pinned_ca(url: &str, expected_sha256: &str) -> Result<CertificateDer<'static>, ControlError> {
    let base = normalize_url(url)?;
    let http = build_http(tls::unverified_client_config(), Some(Duration::from_secs(30)));
    let endpoint = format!("{base}/v1/ca.pem");
    let resp =
        http.get(&endpoint).send().await.map_err(|source| ControlError::Unreachable { url: base.clone(), source })?;
    if !resp.status().is_success() {
        return Err(refused("the CA download", resp).await);
    }
    let body = resp.bytes().await.map_err(|source| ControlError::BadAnswer { what: "the CA download", source })?;
    let ca = CertificateDer::from_pem_slice(&body).map_err(|e| ControlError::BadCa(e.to_string()))?;
    let actual = tls::cert_sha256(&ca);
    if !actual.eq_ignore_ascii_case(expected_sha256) {
        return Err(ControlError::CaMismatch { expected: expected_sha256.to_string(), actual });
    }
    Ok(ca)
}

/// A client of the control plane that trusts only the pinned CA.
#[derive(Clone, Debug)]
pub struct ControlClient {
    base: String,
    http: reqwest::Client,
}

impl ControlClient {
    /// A client for `url` trusting `ca`, presenting the agent's certificate when `identity` is given.
    pub fn new(
        url: &str,
        ca: &CertificateDer<'static>,
        identity: Option<&AgentIdentity>,
    ) -> Result<Self, ControlError> {
        Self::with_client_cert(url, ca, identity.map(|id| (&id.cert, &id.key)))
    }

    /// A client for `url` trusting `ca`, presenting `client_cert` (certificate and key) when given
    /// (an agent's or a relay's).
    pub fn with_client_cert(
        url: &str,
        ca: &CertificateDer<'static>,
        client_cert: Option<(&CertificateDer<'static>, &rustls::pki_types::PrivateKeyDer<'static>)>,
    ) -> Result<Self, ControlError> {
        let base = normalize_url(url)?;
        let config = tls::control_client_config_with_cert(ca, client_cert)?;
        // No overall timeout: long-polls set their own per request.
        Ok(Self { base, http: build_http(config, None) })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn unreachable(&self) -> impl FnOnce(reqwest::Error) -> ControlError + '_ {
        |source| ControlError::Unreachable { url: self.base.clone(), source }
    }

    /// `POST /v1/agents/enroll`.
    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, ControlError> {
        self.post_json("/v1/agents/enroll", "the enrollment", req, Duration::from_secs(30)).await
    }

    /// `POST {path}` with a JSON body; the JSON answer.
    pub async fn post_json<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        path: &str,
        what: &'static str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, ControlError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .timeout(timeout)
            .json(req)
            .send()
            .await
            .map_err(self.unreachable())?;
        if !resp.status().is_success() {
            return Err(refused(what, resp).await);
        }
        resp.json().await.map_err(|source| ControlError::BadAnswer { what, source })
    }

    /// `GET /v1/agents/self/config?after=V&waitSeconds=S&have=H`: `Some` when the
    /// control plane's config differs from version `after` (whose content hashes
    /// to `have`, see [`crate::config_cache::content_sha256`]), `None` when
    /// nothing changed within `wait`.
    pub async fn poll_config(
        &self,
        after: u64,
        have: Option<&str>,
        wait: Duration,
    ) -> Result<Option<AgentConfig>, ControlError> {
        self.poll_json("/v1/agents/self/config", after, have, wait).await
    }

    /// A config long-poll at `path` (`?after=V&waitSeconds=S&have=H`), as [`Self::poll_config`].
    pub async fn poll_json<T: DeserializeOwned>(
        &self,
        path: &str,
        after: u64,
        have: Option<&str>,
        wait: Duration,
    ) -> Result<Option<T>, ControlError> {
        let wait_seconds = wait.as_secs().clamp(0, 60);
        let mut query = vec![("after", after.to_string()), ("waitSeconds", wait_seconds.to_string())];
        if let Some(have) = have {
            query.push(("have", have.to_string()));
        }
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .query(&query)
            .header(reqwest::header::ACCEPT_ENCODING, "gzip")
            .timeout(Duration::from_secs(wait_seconds + 15))
            .send()
            .await
            .map_err(self.unreachable())?;
        match resp.status() {
            StatusCode::NOT_MODIFIED => Ok(None),
            s if s.is_success() => {
                let gzipped = resp
                    .headers()
                    .get(reqwest::header::CONTENT_ENCODING)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
                let body = resp
                    .bytes()
                    .await
                    .map_err(|source| ControlError::BadAnswer { what: "the config long-poll", source })?;
                let json = if gzipped { gunzip(&body)? } else { body.to_vec() };
                serde_json::from_slice(&json).map(Some).map_err(|e| ControlError::BadConfig(e.to_string()))
            }
            _ => Err(refused("the config long-poll", resp).await),
        }
    }

    /// `POST /v1/agents/self/report`.
    pub async fn report(&self, report: &AgentReport) -> Result<(), ControlError> {
        self.post("/v1/agents/self/report", "the usage report", report).await
    }

    /// `POST {path}` with a JSON body; any success status will do.
    pub async fn post<Req: Serialize + ?Sized>(
        &self,
        path: &str,
        what: &'static str,
        body: &Req,
    ) -> Result<(), ControlError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .timeout(Duration::from_secs(15))
            .json(body)
            .send()
            .await
            .map_err(self.unreachable())?;
        if !resp.status().is_success() {
            return Err(refused(what, resp).await);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestCa;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-route HTTPS server on 127.0.0.1:0 that answers every request with `body`.
    async fn https_server(ca: &TestCa, body: String) -> (String, tokio::task::JoinHandle<()>) {
        let (cert, key) = ca.server_cert(&["127.0.0.1"]);
        let config = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let acceptor = acceptor.clone();
                let body = body.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/x-pem-file\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                        body.len(),
                        body
                    );
                    let _ = tls.write_all(resp.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        (url, task)
    }

    #[tokio::test]
    async fn ca_matching_the_token_hash_is_accepted() {
        let ca = TestCa::new();
        let (url, server) = https_server(&ca, crate::identity::pem("CERTIFICATE", &ca.cert())).await;
        let expected = tls::cert_sha256(&ca.cert());
        let got = fetch_pinned_ca(&url, &expected).await.unwrap();
        assert_eq!(got, ca.cert());
        server.abort();
    }

    #[tokio::test]
    async fn ca_not_matching_the_token_hash_is_refused() {
        let served = TestCa::new();
        let pinned = TestCa::new();
        let (url, server) = https_server(&served, crate::identity::pem("CERTIFICATE", &served.cert())).await;
        let err = fetch_pinned_ca(&url, &tls::cert_sha256(&pinned.cert())).await.unwrap_err();
        assert!(matches!(err, ControlError::CaMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("the control plane's CA does not match the join token"));
        server.abort();
    }

    #[tokio::test]
    async fn pinned_client_refuses_a_server_from_another_ca() {
        let real = TestCa::new();
        let impostor = TestCa::new();
        let (url, server) = https_server(&impostor, "{}".into()).await;
        let client = ControlClient::new(&url, &real.cert(), None).unwrap();
        let err = client.poll_config(0, None, Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, ControlError::Unreachable { .. }), "{err:?}");
        server.abort();
    }

    #[test]
    fn only_https_urls_are_accepted() {
        assert_eq!(normalize_url("https://cp.example:8443/").unwrap(), "https://cp.example:8443");
        for bad in ["http://cp.example", "cp.example", "https://", "ftp://x"] {
            assert!(matches!(normalize_url(bad), Err(ControlError::InvalidUrl(_))), "{bad}");
        }
    }
}
