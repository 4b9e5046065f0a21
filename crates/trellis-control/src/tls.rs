//! The control plane's HTTPS listener: TLS 1.3 (rustls with the aws-lc-rs provider,
//! chosen explicitly, never a process-wide default) with an optional client
//! certificate verified against the control plane's CA.
//!
//! Account and admin routes authenticate with a bearer key and present no
//! certificate; agents present the certificate the CA signed at enrollment.
//! Every request carries a [`PeerIdentity`] extension naming that certificate
//! (by SHA-256), so agent routes can find the agent without trusting anything
//! the request body says.
//!
//! Nothing a client does holds the listener without a bound in time and
//! count: connections are admitted by [`crate::conn_limits`] (per address,
//! per agent certificate, and separate budgets for handshakes, anonymous
//! clients and agents), every stage of a connection has a deadline
//! ([`crate::conn_deadline`]), and request bodies have a size limit.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use http_body_util::Limited;
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::conn_deadline::{ConnClock, RequestBody, ResponseBody, Stage, TimedIo, Timeouts};
use crate::conn_limits::{Class, ConnLimits, Handshaking};
use crate::error::ApiError;
use crate::pki::sha256_hex;

/// How long shutdown waits for in-flight requests before closing their connections.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (file descriptors exhausted, …) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// hyper's read and write buffer cap per connection, which also caps the
/// request head (line and headers): generous for this API, and a bound on
/// what a slow client makes the server hold.
const MAX_HTTP_BUFFER: usize = 64 * 1024;
/// `Retry-After` of a 503 when anonymous request bodies are at their cap.
const BUSY_RETRY_AFTER_SECONDS: u64 = 5;

/// Cancelled when the server shuts down; a request extension so long-polls
/// can answer at once instead of holding the drain.
#[derive(Clone, Debug, Default)]
pub struct ShutdownSignal(pub CancellationToken);

/// The largest request body this request's connection accepts, as a request
/// extension (anonymous and agent connections differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyLimit(pub usize);

/// The client certificate a request arrived with, as a request extension.
///
/// `None` when the client presented no certificate. A present value is the
/// lower-case hex SHA-256 of a certificate DER that chains to the CA.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity(pub Option<String>);

impl PeerIdentity {
    /// The certificate fingerprint, if the client presented a certificate.
    pub fn cert_sha256(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

/// Errors building the TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate or key PEM does not parse.
    #[error("cannot read the {what} PEM: {reason}")]
    Pem { what: &'static str, reason: String },
    /// rustls refused the configuration (key does not match the certificate, …).
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built from the CA.
    #[error("cannot trust the CA for client certificates: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The one crypto provider of the tree.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Builds the listener's TLS config: TLS 1.3 only, `cert_pem`/`key_pem` as
/// the server identity, client certificates optional and, when present,
/// verified against `ca`.
pub fn server_config(
    ca: &CertificateDer<'static>,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = crypto_provider();
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { what: "server certificate", reason: e.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::Pem { what: "server certificate", reason: "no CERTIFICATE block".into() });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsError::Pem { what: "server key", reason: e.to_string() })?;
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `app` over TLS on `listener` until `shutdown` is cancelled.
///
/// Each connection admitted by `conns` gets its own task: the handshake
/// (bounded by a timeout), then HTTP/1.1 held to the deadlines of
/// [`crate::conn_deadline`], with [`PeerIdentity`], [`ShutdownSignal`],
/// [`BodyLimit`] and `ConnectInfo<SocketAddr>` inserted into every request.
/// A connection over a cap is closed at once. On shutdown the listener stops
/// accepting, idle connections close, in-flight requests get a bounded time
/// to finish, and whatever is left is aborted before this returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Arc<rustls::ServerConfig>,
    conns: Arc<ConnLimits>,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    // The listener enforces the body limits itself (per kind of connection).
    let app = app.layer(DefaultBodyLimit::disable());
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, remote) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        let handshaking = match conns.accept(remote.ip()) {
            Ok(handshaking) => handshaking,
            Err(refusal) => {
                tracing::debug!(%remote, %refusal, "connection refused");
                continue;
            }
        };
        let conn = Connection { remote, conns: conns.clone(), app: app.clone(), shutdown: shutdown.clone() };
        connections.spawn(conn.serve(stream, acceptor.clone(), handshaking));
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::info!(open = connections.len(), "closing connections still busy after the drain timeout");
        connections.shutdown().await;
    }
}

/// One accepted connection and what its requests need.
struct Connection {
    remote: SocketAddr,
    conns: Arc<ConnLimits>,
    app: Router,
    shutdown: CancellationToken,
}

impl Connection {
    async fn serve(self, stream: TcpStream, acceptor: TlsAcceptor, handshaking: Handshaking) {
        let (remote, limits) = (self.remote, self.conns.limits().clone());
        let _ = stream.set_nodelay(true);
        let tls = tokio::select! {
            () = self.shutdown.cancelled() => return,
            handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)) => match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            },
        };
        let cert = tls.get_ref().1.peer_certificates().and_then(|certs| certs.first()).map(|c| sha256_hex(c));
        let admitted = match self.conns.admit(handshaking, cert.as_deref()) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                tracing::debug!(%remote, %refusal, "connection refused after the handshake");
                return;
            }
        };
        let timeouts = Timeouts {
            idle: limits.idle_timeout,
            request_read: limits.request_read_timeout,
            response_write: limits.response_write_timeout,
        };
        let clock = ConnClock::new(timeouts, Instant::now());
        let requests = Arc::new(Requests {
            class: admitted.class,
            peer: PeerIdentity(cert),
            max_body: match admitted.class {
                Class::Public => limits.max_body_bytes,
                Class::Agent => limits.max_agent_body_bytes,
            },
            clock: clock.clone(),
            conn: self,
        });
        let service = hyper::service::service_fn({
            let requests = requests.clone();
            move |req| {
                let requests = requests.clone();
                async move { Ok::<_, Infallible>(requests.handle(req).await) }
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        // `clock` bounds the head, the body and idle time; hyper's own header
        // timer would also cut idle keep-alive connections at its timeout.
        builder.timer(TokioTimer::new()).header_read_timeout(None).max_buf_size(MAX_HTTP_BUFFER);
        let conn = builder.serve_connection(TokioIo::new(TimedIo::new(tls, clock.clone())), service);
        tokio::pin!(conn);
        let shutdown = requests.conn.shutdown.clone();
        let result = tokio::select! {
            result = conn.as_mut() => result,
            () = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        let conns = &requests.conn.conns;
        match clock.expired() {
            Some(Stage::Reading) => conns.count_request_read_timeout(),
            Some(Stage::Responding) => conns.count_response_write_timeout(),
            Some(Stage::Idle) => conns.count_idle_closed(),
            None => {}
        }
        if let Err(e) = result {
            tracing::debug!(%remote, error = %e, "connection ended with an error");
        }
        drop(admitted);
    }
}

/// What every request of one admitted connection shares.
struct Requests {
    conn: Connection,
    class: Class,
    peer: PeerIdentity,
    max_body: usize,
    clock: Arc<ConnClock>,
}

impl Requests {
    async fn handle(&self, req: Request<Incoming>) -> Response<ResponseBody<Body>> {
        let (mut parts, body) = req.into_parts();
        let body = RequestBody::new(body, self.clock.clone());
        let response = match self.body_reservation(&body) {
            Ok(reservation) => {
                parts.extensions.insert(self.peer.clone());
                parts.extensions.insert(ConnectInfo(self.conn.remote));
                parts.extensions.insert(ShutdownSignal(self.conn.shutdown.clone()));
                parts.extensions.insert(BodyLimit(self.max_body));
                let req = Request::from_parts(parts, Body::new(Limited::new(body, self.max_body)));
                let response = self.conn.app.clone().oneshot(req).await.unwrap_or_else(|never| match never {});
                drop(reservation);
                response
            }
            Err(refused) => refused.response(),
        };
        response.map(|body| ResponseBody::new(body, self.clock.clone()))
    }

    /// Checks a request's declared body size, and holds room for an anonymous
    /// body in the cap of anonymous bodies in flight until the handler answered.
    fn body_reservation(
        &self,
        body: &RequestBody<Incoming>,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, BodyRefusal> {
        if body.is_end_stream() {
            return Ok(None);
        }
        if body.size_hint().lower() > self.max_body as u64 {
            return Err(BodyRefusal::TooLarge(self.max_body));
        }
        if self.class == Class::Agent {
            return Ok(None);
        }
        let most = body.size_hint().upper().map_or(self.max_body, |n| n.min(self.max_body as u64) as usize);
        match self.conn.conns.reserve_public_body(most) {
            Some(permit) => Ok(Some(permit)),
            None => {
                tracing::debug!(remote = %self.conn.remote, "anonymous request bodies in flight at their cap");
                Err(BodyRefusal::Busy)
            }
        }
    }
}

/// Why a request was answered without reading its body.
#[derive(Clone, Copy, Debug)]
enum BodyRefusal {
    /// Its declared length is over the limit (the limit).
    TooLarge(usize),
    /// Anonymous bodies in flight are at their cap.
    Busy,
}

impl BodyRefusal {
    fn response(self) -> Response<Body> {
        let mut response = match self {
            BodyRefusal::TooLarge(max) => ApiError::body_too_large(Some(max)).into_response(),
            BodyRefusal::Busy => {
                let message = format!(
                    "the server is receiving too many request bodies at once; retry in {BUSY_RETRY_AFTER_SECONDS} seconds"
                );
                let mut busy = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "ServerBusy", message).into_response();
                busy.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(BUSY_RETRY_AFTER_SECONDS));
                busy
            }
        };
        // The body stays unread: close rather than read it to reuse the connection.
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Ca;
    use axum::Extension;
    use axum::routing::get;
    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsConnector;

    fn client_config(ca: &Ca, identity: Option<(String, String)>) -> Arc<rustls::ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots);
        let config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }

    async fn get_whoami(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> std::io::Result<String> {
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = TlsConnector::from(config).connect(name, tcp).await?;
        tls.write_all(b"GET /whoami HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await?;
        let mut out = String::new();
        tls.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn serves_requests_with_and_without_client_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let (cert, key) = ca.issue_server_cert(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        let tls = server_config(ca.cert_der(), &cert, &key).unwrap();
        let app = Router::new().route(
            "/whoami",
            get(|Extension(peer): Extension<PeerIdentity>| async move {
                peer.cert_sha256().unwrap_or("anonymous").to_string()
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let limits = crate::conn_limits::ListenerLimits {
            budgets: Some(crate::conn_limits::Budgets { handshakes: 8, public: 8, agents: 8 }),
            ..Default::default()
        };
        let conns = Arc::new(ConnLimits::new(limits));
        let server = tokio::spawn(serve(listener, app, tls, conns, shutdown.clone()));

        let anonymous = get_whoami(addr, client_config(&ca, None)).await.unwrap();
        assert!(anonymous.starts_with("HTTP/1.1 200"), "{anonymous}");
        assert!(anonymous.ends_with("anonymous"), "{anonymous}");

        let agent_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = CertificateParams::default().serialize_request(&agent_key).unwrap().pem().unwrap();
        let issued = ca.sign_agent_csr(&csr, "agent-0123456789abcdef0", "acct-000000000001", "vpc-1").unwrap();
        let identified =
            get_whoami(addr, client_config(&ca, Some((issued.pem.clone(), agent_key.serialize_pem())))).await.unwrap();
        assert!(identified.ends_with(&issued.sha256_hex), "{identified}");

        // A certificate from another CA fails the handshake instead of passing as anonymous.
        let other_dir = tempfile::tempdir().unwrap();
        let other = Ca::load_or_create(other_dir.path()).unwrap();
        let foreign = other.sign_agent_csr(&csr, "agent-0123456789abcdef0", "acct-000000000001", "vpc-1").unwrap();
        let rejected = get_whoami(addr, client_config(&ca, Some((foreign.pem, agent_key.serialize_pem())))).await;
        assert!(rejected.is_err() || !rejected.unwrap().contains("200 OK"));

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), server).await.expect("serve stops on shutdown").unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "the listener is closed after shutdown");
    }

    #[test]
    fn mismatched_key_is_a_configuration_error() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let (cert, _) = ca.issue_server_cert(&["localhost".into()]).unwrap();
        let (_, other_key) = ca.issue_server_cert(&["localhost".into()]).unwrap();
        assert!(server_config(ca.cert_der(), &cert, &other_key).is_err());
        assert!(matches!(server_config(ca.cert_der(), "nope", &other_key), Err(TlsError::Pem { .. })));
    }
}
