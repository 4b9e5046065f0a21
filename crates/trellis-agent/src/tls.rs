//! rustls configurations, all on the aws-lc-rs provider and trusting only the
//! control plane's CA: the tunnel server (gateway role, mutual TLS 1.3), the
//! tunnel client (endpoint role, with session resumption) and the HTTPS client
//! to the control plane.

use std::sync::Arc;

use rustls::client::Resumption;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, ClientConfig, DistinguishedName, RootCertStore, ServerConfig};

use crate::identity::AgentIdentity;

/// Why a TLS configuration could not be built from an identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA certificate could not be used as a trust anchor.
    #[error("the control plane's CA certificate is unusable: {0}")]
    BadCa(String),
    /// rustls refused the certificate or key.
    #[error("the agent's certificate or key is unusable ({0}); remove the state directory and enroll again")]
    BadIdentity(#[source] rustls::Error),
}

/// The one crypto provider of the tree.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The provider of the tunnel: aws-lc-rs with AES-128-GCM preferred. Tunnel bytes
/// are bulk data; on CPUs with AES instructions AES-128 does 10 rounds per
/// block to AES-256's 14 (both sides list it first, so it is what they agree
/// on; the other suites stay as fallbacks).
pub fn tunnel_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Lower-case hex SHA-256 of a certificate's DER bytes.
pub fn cert_sha256(cert: &CertificateDer<'_>) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.as_ref()))
}

/// A tunnel peer as its certificate names it (the CA wrote these at enrollment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub agent_id: String,
    pub account_id: String,
    pub vpc_id: String,
    /// Lower-case hex SHA-256 of the certificate DER.
    pub cert_sha256: String,
}

/// Reads who a CA-verified agent certificate names; `None` when it carries no
/// Trellis agent identity (never the case for certificates the CA issued to agents).
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<PeerIdentity> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let sans = parsed.subject_alternative_name().ok()??;
    let id = sans.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => trellis_proto::AgentIdentityUri::parse(uri),
        _ => None,
    })?;
    Some(PeerIdentity {
        agent_id: id.agent_id,
        account_id: id.account_id,
        vpc_id: id.vpc_id,
        cert_sha256: cert_sha256(cert),
    })
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).map_err(|e| TlsError::BadCa(e.to_string()))?;
    Ok(Arc::new(roots))
}

/// Decides whether a CA-verified tunnel peer may finish its handshake.
pub trait PeerAdmission: Send + Sync + std::fmt::Debug {
    /// `Err` refuses the handshake (the peer gets a TLS alert).
    fn admit(&self, peer: &PeerIdentity) -> Result<(), Refusal>;
}

/// Why a tunnel handshake was refused after the certificate chain verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The certificate belongs to a deleted agent.
    Revoked,
    /// The certificate names no (account, VPC) this gateway serves.
    NotAConsumer,
}

/// Admits every agent certificate the CA signed (tests and tools; a gateway
/// uses its config, see `gateway::admission`).
#[derive(Debug)]
pub struct AnyAgent;

impl PeerAdmission for AnyAgent {
    fn admit(&self, _peer: &PeerIdentity) -> Result<(), Refusal> {
        Ok(())
    }
}

/// The tunnel's client-certificate verifier: the CA's chain check (webpki),
/// then the certificate must name a Trellis agent that `admission` accepts.
#[derive(Debug)]
struct AdmittingVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    admission: Arc<dyn PeerAdmission>,
}

impl ClientCertVerifier for AdmittingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.chain.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.chain.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.chain.verify_client_cert(end_entity, intermediates, now)?;
        let refused = |e| Err(rustls::Error::InvalidCertificate(e));
        let Some(peer) = peer_identity(end_entity) else {
            return refused(CertificateError::ApplicationVerificationFailure);
        };
        match self.admission.admit(&peer) {
            Ok(()) => Ok(verified),
            Err(Refusal::Revoked) => refused(CertificateError::Revoked),
            Err(Refusal::NotAConsumer) => refused(CertificateError::ApplicationVerificationFailure),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// Server side of the tunnel: TLS 1.3 only, client certificate required,
/// verified against the CA and then by `admission` (on a gateway: the
/// certificate must name a consumer VPC of the current config and must not be
/// revoked), so strangers never get past the handshake. Resumed sessions skip
/// the verifier: the listener checks admission again after every handshake.
pub fn tunnel_server_config(
    id: &AgentIdentity,
    admission: Arc<dyn PeerAdmission>,
) -> Result<Arc<ServerConfig>, TlsError> {
    mutual_server_config(&id.ca, &id.cert, &id.key, admission, TUNNEL_ALPN)
}

/// The relay's side of its outer TLS sessions: as [`tunnel_server_config`]
/// (TLS 1.3, a CA-signed agent certificate required and admitted by
/// `admission`), with the relay's certificate and ALPN.
pub fn relay_server_config(
    ca: &CertificateDer<'static>,
    cert: &CertificateDer<'static>,
    key: &rustls::pki_types::PrivateKeyDer<'static>,
    admission: Arc<dyn PeerAdmission>,
) -> Result<Arc<ServerConfig>, TlsError> {
    mutual_server_config(ca, cert, key, admission, crate::relay_wire::RELAY_ALPN)
}

fn mutual_server_config(
    ca: &CertificateDer<'static>,
    cert: &CertificateDer<'static>,
    key: &rustls::pki_types::PrivateKeyDer<'static>,
    admission: Arc<dyn PeerAdmission>,
    alpn: &[u8],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = tunnel_provider();
    let chain = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider.clone())
        .build()
        .map_err(|e| TlsError::BadCa(e.to_string()))?;
    let verifier = Arc::new(AdmittingVerifier { chain, admission });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::BadIdentity)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert.clone()], key.clone_key())
        .map_err(TlsError::BadIdentity)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// ALPN of the tunnel, so a tunnel port is never mistaken for anything else.
pub const TUNNEL_ALPN: &[u8] = b"trellis/1";

/// Client side of the tunnel: TLS 1.3 only, presents the agent's certificate,
/// verifies the gateway's against the CA and the gateway's server name, and
/// resumes sessions so pooled connections refill cheaply.
pub fn tunnel_client_config(id: &AgentIdentity) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(tunnel_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::BadIdentity)?
        .with_root_certificates(roots(&id.ca)?)
        .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(TlsError::BadIdentity)?;
    config.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
    config.resumption = Resumption::in_memory_sessions(256);
    Ok(Arc::new(config))
}

/// An agent's side of its outer TLS sessions with relays: the tunnel client
/// (TLS 1.3, the agent's certificate, the CA only, session resumption) with
/// the relay ALPN; the relay's server name (`relay_server_name`) is checked.
pub fn relay_client_config(tunnel: &ClientConfig) -> Arc<ClientConfig> {
    let mut config = tunnel.clone();
    config.alpn_protocols = vec![crate::relay_wire::RELAY_ALPN.to_vec()];
    Arc::new(config)
}

/// HTTPS client to the control plane once the CA is pinned: trusts only the
/// CA, and presents the agent's certificate when there is one.
pub fn control_client_config(
    ca: &CertificateDer<'static>,
    id: Option<&AgentIdentity>,
) -> Result<ClientConfig, TlsError> {
    control_client_config_with_cert(ca, id.map(|id| (&id.cert, &id.key)))
}

/// [`control_client_config`] with any client certificate (an agent's or a relay's).
pub fn control_client_config_with_cert(
    ca: &CertificateDer<'static>,
    client_cert: Option<(&CertificateDer<'static>, &rustls::pki_types::PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::BadIdentity)?
        .with_root_certificates(roots(ca)?);
    let mut config = match client_cert {
        Some((cert, key)) => {
            builder.with_client_auth_cert(vec![cert.clone()], key.clone_key()).map_err(TlsError::BadIdentity)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// An HTTPS client config that accepts any server certificate. Used for one
/// request only: fetching the CA, whose hash is then checked against the join
/// token before anything secret is sent. Signatures are still verified, so
/// the server must hold the key of the certificate it shows.
pub fn unverified_client_config() -> ClientConfig {
    let provider = provider();
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        // The aws-lc-rs provider supports the default protocol versions.
        .expect("aws-lc-rs supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert { provider }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

#[derive(Debug)]
struct AcceptAnyServerCert {
    provider: Arc<CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    /// `.cargo/config.toml` builds aws-lc without its CPU jitter entropy
    /// source (the kernel's getrandom(2) seeds it, as it seeded ring): with
    /// it, every process spent about 30 ms of CPU at its first random
    /// number, which made each CLI call six times slower. Cargo passes the
    /// variable to this crate's compilation as to aws-lc-sys's build script.
    #[test]
    fn aws_lc_is_built_without_jitter_entropy() {
        assert_eq!(
            option_env!("AWS_LC_SYS_NO_JITTER_ENTROPY"),
            Some("1"),
            "build from the repository (its .cargo/config.toml sets AWS_LC_SYS_NO_JITTER_ENTROPY=1)"
        );
    }
}
