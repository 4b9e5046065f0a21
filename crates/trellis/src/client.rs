//! HTTP client for the control plane's API, shared by the API verbs and `trellis dev`.
//!
//! TLS is rustls on the aws-lc-rs provider, trusting only the control plane's own CA:
//! the system's roots are deliberately not consulted, so an https URL needs the
//! CA (`--ca-cert`, the server's `DATA_DIR/ca.pem`).

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Serialize;
use serde_json::Value;
use trellis_api::{Route, RouteInfo};

use crate::secret::ApiKey;

/// One API call: method, path under the base URL, query and JSON body.
///
/// Built only from a `trellis_api` route constant and that route's own body
/// and query types, so the CLI sends what the handlers take.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    pub method: Method,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub body: Option<Value>,
}

impl ApiRequest {
    fn new(route: &RouteInfo, id: Option<&str>, body: Option<Value>) -> Self {
        debug_assert_eq!(route.has_id(), id.is_some(), "{} takes {{id}} exactly when an id is given", route.path);
        let method = match route.method {
            trellis_api::Method::Get => Method::GET,
            trellis_api::Method::Post => Method::POST,
            trellis_api::Method::Patch => Method::PATCH,
            trellis_api::Method::Delete => Method::DELETE,
        };
        let path = id.map_or_else(|| route.path.to_string(), |id| route.path_with(&encode_segment(id)));
        // A POST without a body type (accept, reject, a new API key) still sends `{}`.
        let body = body.or_else(|| (method == Method::POST).then(|| Value::Object(Default::default())));
        Self { method, path, query: Vec::new(), body }
    }

    /// `route` (a collection) with `body`.
    pub fn send<B: Serialize, Q, R>(route: &Route<B, Q, R>, body: &B) -> Self {
        Self::new(route, None, Some(json_of(body)))
    }

    /// `route` for the object `id`, with `body`.
    pub fn send_to<B: Serialize, Q, R>(route: &Route<B, Q, R>, id: &str, body: &B) -> Self {
        Self::new(route, Some(id), Some(json_of(body)))
    }

    /// `route` for the object `id`, without a body.
    pub fn at<Q, R>(route: &Route<(), Q, R>, id: &str) -> Self {
        Self::new(route, Some(id), None)
    }

    /// `route` (a list) with `query`: its fields that are set, in order.
    pub fn list<Q: Serialize, R>(route: &Route<(), Q, R>, query: &Q) -> Self {
        Self::listed(Self::new(route, None, None), query)
    }

    /// `route` (a list under the object `id`) with `query`.
    pub fn list_at<Q: Serialize, R>(route: &Route<(), Q, R>, id: &str, query: &Q) -> Self {
        Self::listed(Self::new(route, Some(id), None), query)
    }

    fn listed<Q: Serialize>(mut req: Self, query: &Q) -> Self {
        if let Value::Object(fields) = json_of(query) {
            for (key, value) in fields {
                match value {
                    Value::Null => {}
                    Value::String(text) => req.query.push((key, text)),
                    other => req.query.push((key, other.to_string())),
                }
            }
        }
        req
    }
}

/// A request type as JSON. Request types are plain structs of strings,
/// numbers, lists and options, which always serialize.
fn json_of<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("API request types serialize to JSON")
}

/// Percent-encodes one path segment (ids are plain; ARNs carry `:` and `/`).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A successful answer: the body exactly as the server sent it.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub body: String,
}

impl ApiResponse {
    /// The body as JSON; `Value::Null` for an empty body (204).
    pub fn json(&self) -> Result<Value, ClientError> {
        if self.body.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&self.body).map_err(|e| ClientError::Decode { reason: e.to_string() })
    }
}

/// Why an API call failed. The `Display` text is what the CLI prints after `error: `.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with an error status.
    #[error("{message} (HTTP {status}{})", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default())]
    Api { status: u16, code: Option<String>, message: String },
    /// No HTTP answer: connection refused, TLS failure, timeout, …
    #[error("cannot reach the control plane at {url}: {reason}")]
    Connect { url: String, reason: String },
    /// Missing or unusable client configuration (URL, key, CA file).
    #[error("{0}")]
    Config(String),
    /// The server answered 2xx with a body that is not JSON.
    #[error("the control plane's answer is not JSON: {reason}")]
    Decode { reason: String },
}

impl ClientError {
    /// Builds the error for a non-2xx answer from its status and body
    /// (`{"code", "message"}` from the API, or whatever a proxy sent).
    pub fn from_answer(status: StatusCode, body: &str) -> Self {
        #[derive(serde::Deserialize)]
        struct ErrorBody {
            code: Option<String>,
            message: Option<String>,
        }
        let parsed: Option<ErrorBody> = serde_json::from_str(body).ok();
        let (code, message) = match parsed {
            Some(ErrorBody { code, message: Some(message) }) => (code, message),
            Some(ErrorBody { code, message: None }) => {
                (code, status.canonical_reason().unwrap_or("request failed").to_string())
            }
            None => {
                let text = body.trim();
                let message = if text.is_empty() {
                    status.canonical_reason().unwrap_or("request failed").to_string()
                } else {
                    // Keep one line, bounded: this may be an HTML page from a proxy.
                    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
                    truncate(&line, 200)
                };
                (None, message)
            }
        };
        Self::Api { status: status.as_u16(), code, message }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max { s.to_string() } else { format!("{}…", s.chars().take(max).collect::<String>()) }
}

/// Where the CA certificate that signs the control plane's server certificate comes from.
#[derive(Debug, Clone)]
pub enum CaSource {
    /// A PEM file (`--ca-cert`).
    File(std::path::PathBuf),
    /// PEM bytes already in memory (`trellis dev`).
    Pem(Vec<u8>),
    /// None given: only plain http URLs work.
    None,
}

/// A client for one control plane, acting as one account (or admin).
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: Url,
    api_key: Option<ApiKey>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient").field("base", &self.base.as_str()).field("api_key", &self.api_key).finish()
    }
}

impl ApiClient {
    /// Builds a client for `base`. An https URL needs the CA; the system's roots are not used.
    pub fn new(base: Url, api_key: Option<ApiKey>, ca: &CaSource) -> Result<Self, ClientError> {
        let roots = load_roots(ca)?;
        if base.scheme() == "https" && roots.is_empty() {
            return Err(ClientError::Config(format!(
                "--ca-cert (TRELLIS_CA_CERT) is required for {base}: the control plane uses its own CA, so pass the ca.pem from its data directory (system roots are not used)"
            )));
        }
        let mut store = rustls::RootCertStore::empty();
        for cert in roots {
            store.add(cert).map_err(|e| ClientError::Config(format!("the CA certificate is not usable: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Config(format!("TLS set-up failed: {e}")))?
            .with_root_certificates(store)
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("trellis-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Config(format!("cannot build the HTTP client: {}", error_chain(&e))))?;
        Ok(Self { http, base, api_key })
    }

    /// The same client acting with another API key.
    pub fn with_api_key(&self, api_key: ApiKey) -> Self {
        Self { http: self.http.clone(), base: self.base.clone(), api_key: Some(api_key) }
    }

    /// The control plane's URL as given (no trailing slash).
    pub fn base_url(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// Sends `req`; a non-2xx answer is a [`ClientError::Api`].
    pub async fn send(&self, req: &ApiRequest) -> Result<ApiResponse, ClientError> {
        let url = self.url_for(req)?;
        let mut builder = self.http.request(req.method.clone(), url.clone());
        if let Some(key) = &self.api_key {
            builder = builder.bearer_auth(key.expose());
        }
        if let Some(body) = &req.body {
            builder = builder.json(body);
        }
        let connect_err = |e: reqwest::Error| ClientError::Connect { url: url.to_string(), reason: error_chain(&e) };
        let answer = builder.send().await.map_err(connect_err)?;
        let status = answer.status();
        let body = answer.text().await.map_err(connect_err)?;
        if status.is_success() { Ok(ApiResponse { body }) } else { Err(ClientError::from_answer(status, &body)) }
    }

    /// Sends `req` and parses the answer as JSON.
    pub async fn call(&self, req: &ApiRequest) -> Result<Value, ClientError> {
        self.send(req).await?.json()
    }

    fn url_for(&self, req: &ApiRequest) -> Result<Url, ClientError> {
        // Keep a base path (a control plane behind a path prefix): join without dropping it.
        let base = self.base.as_str().trim_end_matches('/');
        let mut url = Url::parse(&format!("{base}{}", req.path))
            .map_err(|e| ClientError::Config(format!("cannot build a URL from {base} and {}: {e}", req.path)))?;
        if !req.query.is_empty() {
            url.query_pairs_mut().extend_pairs(req.query.iter());
        }
        Ok(url)
    }
}

fn load_roots(ca: &CaSource) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let (pem, what) = match ca {
        CaSource::None => return Ok(Vec::new()),
        CaSource::Pem(pem) => (pem.clone(), "the control plane's CA".to_string()),
        CaSource::File(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| ClientError::Config(format!("cannot read the CA file {}: {e}", path.display())))?;
            (pem, path.display().to_string())
        }
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Config(format!("{what} is not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(ClientError::Config(format!(
            "{what} holds no PEM certificate (expected the control plane's ca.pem)"
        )));
    }
    Ok(certs)
}

/// An error and its causes on one line, with a hint for the usual TLS mistake.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = err.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    if parts.is_empty() {
        parts.push(err.to_string());
    }
    let mut line = parts.join(": ");
    if line.contains("UnknownIssuer") || line.contains("invalid peer certificate") {
        line.push_str(" (is --ca-cert the ca.pem of this control plane?)");
    }
    if line.contains("NotValidForName") {
        line.push_str(" (start the server with --tls-name for the host in --url)");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_error_shows_the_message_status_and_code() {
        let err = ClientError::from_answer(
            StatusCode::UNPROCESSABLE_ENTITY,
            r#"{"code":"InvalidPortRange","message":"port range \"0\" has a port outside 1-65535"}"#,
        );
        assert_eq!(err.to_string(), r#"port range "0" has a port outside 1-65535 (HTTP 422 InvalidPortRange)"#);
    }

    #[test]
    fn non_json_error_bodies_become_one_bounded_line() {
        let err = ClientError::from_answer(StatusCode::BAD_GATEWAY, "<html>\n<body>bad\n gateway</body></html>");
        assert_eq!(err.to_string(), "<html> <body>bad gateway</body></html> (HTTP 502)");
        let err = ClientError::from_answer(StatusCode::NOT_FOUND, "");
        assert_eq!(err.to_string(), "Not Found (HTTP 404)");
        let long = "x".repeat(1000);
        assert!(ClientError::from_answer(StatusCode::INTERNAL_SERVER_ERROR, &long).to_string().len() < 300);
    }

    #[test]
    fn connection_errors_name_the_url() {
        let err =
            ClientError::Connect { url: "https://127.0.0.1:1/v1/vpcs".into(), reason: "connection refused".into() };
        assert_eq!(
            err.to_string(),
            "cannot reach the control plane at https://127.0.0.1:1/v1/vpcs: connection refused"
        );
    }

    #[test]
    fn https_without_a_ca_is_refused_with_a_hint() {
        let err = ApiClient::new("https://127.0.0.1:1".parse().unwrap(), None, &CaSource::None).unwrap_err();
        assert!(err.to_string().contains("--ca-cert"), "{err}");
        assert!(ApiClient::new("http://127.0.0.1:1".parse().unwrap(), None, &CaSource::None).is_ok());
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let err = ApiClient::new("https://127.0.0.1:1".parse().unwrap(), None, &CaSource::File(path)).unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = ApiClient::new("https://127.0.0.1:1".parse().unwrap(), None, &CaSource::File(missing)).unwrap_err();
        assert!(err.to_string().contains("cannot read the CA file"), "{err}");
    }

    #[test]
    fn urls_keep_a_base_path_and_encode_the_query() {
        let client = ApiClient::new("http://h:1/prefix/".parse().unwrap(), None, &CaSource::None).unwrap();
        let query = trellis_api::VpcListQuery { vpc_id: Some("vpc-1 2".into()), ..Default::default() };
        let req = ApiRequest::list(&trellis_api::subnets::LIST, &query);
        assert_eq!(client.url_for(&req).unwrap().as_str(), "http://h:1/prefix/v1/subnets?vpcId=vpc-1+2");
    }

    #[tokio::test]
    async fn refused_connection_reports_the_url() {
        // Bind then drop a listener to get a loopback port that refuses connections.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client =
            ApiClient::new(format!("http://127.0.0.1:{port}").parse().unwrap(), None, &CaSource::None).unwrap();
        let err = client.send(&ApiRequest::list(&trellis_api::vpcs::LIST, &Default::default())).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("cannot reach the control plane at http://127.0.0.1:{port}/v1/vpcs: ")),
            "{text}"
        );
    }
}
