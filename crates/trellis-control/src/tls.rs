//! The control plane's HTTPS listener: TLS 1.3 (rustls with the ring provider,
//! chosen explicitly, never a process-wide default) with an optional client
//! certificate verified against the control plane's CA.
//!
//! Account and admin routes authenticate with a bearer key and present no
//! certificate; agents present the certificate the CA signed at enrollment.
//! Every request carries a [`PeerIdentity`] extension naming that certificate
//! (by SHA-256), so agent routes can find the agent without trusting anything
//! the request body says.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::pki::sha256_hex;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Open connections beyond this wait in the listen backlog.
const MAX_CONNECTIONS: usize = 4096;
/// How long shutdown waits for in-flight requests before closing their connections.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (file descriptors exhausted, …) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Cancelled when the server shuts down; a request extension so long-polls
/// can answer at once instead of holding the drain.
#[derive(Clone, Debug, Default)]
pub struct ShutdownSignal(pub CancellationToken);

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
    Arc::new(rustls::crypto::ring::default_provider())
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
/// Each connection gets its own task: the handshake (bounded by a timeout),
/// then HTTP/1.1 with [`PeerIdentity`], [`ShutdownSignal`] and
/// `ConnectInfo<SocketAddr>` inserted into every request. On shutdown the listener stops accepting, idle
/// connections close, in-flight requests get a bounded time to finish, and
/// whatever is left is aborted before this returns.
pub async fn serve(listener: TcpListener, app: Router, tls: Arc<rustls::ServerConfig>, shutdown: CancellationToken) {
    let acceptor = TlsAcceptor::from(tls);
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = limit.clone().acquire_owned() => permit.expect("the connection semaphore is never closed"),
        };
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
        let acceptor = acceptor.clone();
        let app = app.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            serve_connection(stream, remote, acceptor, app, shutdown).await;
            drop(permit);
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::info!(open = connections.len(), "closing connections still busy after the drain timeout");
        connections.shutdown().await;
    }
}

async fn serve_connection(
    stream: TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    app: Router,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let tls = tokio::select! {
        () = shutdown.cancelled() => return,
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => match handshake {
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
    let peer = PeerIdentity(tls.get_ref().1.peer_certificates().and_then(|certs| certs.first()).map(|c| sha256_hex(c)));
    let request_shutdown = shutdown.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(peer.clone());
        req.extensions_mut().insert(ConnectInfo(remote));
        req.extensions_mut().insert(ShutdownSignal(request_shutdown.clone()));
        let app = app.clone();
        async move { Ok::<_, Infallible>(app.oneshot(req).await.unwrap_or_else(|never| match never {})) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%remote, error = %e, "connection ended with an error");
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
        let server = tokio::spawn(serve(listener, app, tls, shutdown.clone()));

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
