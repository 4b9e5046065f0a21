//! First start: turn a join token into an agent identity. Later starts: load
//! the identity from the state directory. A join token given again must be
//! the one the identity was enrolled with (a restart with the same command
//! line); another token is an error, so a second agent pointed at the same
//! state directory never silently runs as the first one.
//!
//! Order matters for security: the CA is fetched without trust and pinned by
//! the hash in the token *before* the token's secret is sent; the key pair is
//! generated here and only a CSR leaves the host.

use std::path::Path;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use trellis_proto::agent_api::EnrollRequest;
use trellis_proto::join_token::{JoinToken, JoinTokenError};

use crate::control_client::{ControlClient, ControlError, fetch_pinned_ca, normalize_url};
use crate::identity::{AgentIdentity, Enrollment, IdentityError};
use crate::tls;

/// Why the agent could not obtain an identity.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// No identity in the state directory and no join token to make one.
    #[error(
        "{0} holds no agent identity; start the agent once with --join-token (create one with `trellis agent-token create`)"
    )]
    NoIdentity(String),
    /// No relay identity in the state directory and no relay join token to make one.
    #[error(
        "{0} holds no relay identity; start the relay once with --join-token (create one with `trellis relay-token create`)"
    )]
    NoRelayIdentity(String),
    /// The join token does not parse.
    #[error(transparent)]
    Token(#[from] JoinTokenError),
    /// Talking to the control plane failed (includes a CA that does not match the token).
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The stored identity could not be read or written.
    #[error(transparent)]
    State(#[from] IdentityError),
    /// The state directory holds another enrollment than the join token asks
    /// for; the message names the stored agent, its account and both tokens.
    #[error("{0}")]
    StateHoldsAnotherAgent(String),
    /// Key or CSR generation failed.
    #[error("could not generate the agent key or CSR: {0}")]
    KeyGen(String),
    /// The control plane's answer was unusable.
    #[error("the control plane's enrollment answer is unusable: {0}")]
    BadAnswer(String),
}

/// Loads the identity from `state_dir`, or enrolls with `join_token` when there is none.
pub async fn load_or_enroll(
    control_plane: &str,
    join_token: Option<&str>,
    state_dir: &Path,
    advertise: Option<&str>,
    outbound_only: bool,
) -> Result<AgentIdentity, EnrollError> {
    if AgentIdentity::exists(state_dir) {
        let (identity, enrollment) = AgentIdentity::load(state_dir)?;
        if let Some(token) = join_token {
            check_same_enrollment(state_dir, &identity, &enrollment, &token.parse()?)?;
        }
        if normalize_url(control_plane).ok().as_deref() != Some(enrollment.control_plane.as_str()) {
            tracing::warn!(
                enrolled_with = %enrollment.control_plane,
                control_plane = %control_plane,
                "this agent was enrolled with another control plane URL; using the new one with the stored CA"
            );
        }
        return Ok(identity);
    }
    let token = join_token.ok_or_else(|| EnrollError::NoIdentity(state_dir.display().to_string()))?;
    let identity = enroll(control_plane, token, advertise, outbound_only).await?;
    let token_id = token.parse::<JoinToken>().ok().map(|t| t.token_id);
    identity.store(state_dir, &Enrollment { control_plane: normalize_url(control_plane)?, join_token_id: token_id })?;
    tracing::info!(agent_id = %identity.agent_id, vpc_id = %identity.vpc_id, "enrolled");
    Ok(identity)
}

/// A join token given with a state directory that already holds an identity
/// must be the token that identity was enrolled with.
fn check_same_enrollment(
    state_dir: &Path,
    identity: &AgentIdentity,
    enrollment: &Enrollment,
    token: &JoinToken,
) -> Result<(), EnrollError> {
    let conflict = |enrolled_with: String| {
        EnrollError::StateHoldsAnotherAgent(format!(
            "{} already holds agent {} of account {} (VPC {}), enrolled {enrolled_with}; the join token {} given now is a different enrollment. Give each agent its own --state-dir, or restart {} without --join-token",
            state_dir.display(),
            identity.agent_id,
            identity.account_id,
            identity.vpc_id,
            token.token_id,
            identity.agent_id,
        ))
    };
    if !tls::cert_sha256(&identity.ca).eq_ignore_ascii_case(&token.ca_sha256) {
        return Err(conflict("with another control plane's CA".into()));
    }
    match &enrollment.join_token_id {
        Some(id) if *id == token.token_id => Ok(()),
        Some(id) => Err(conflict(format!("with join token {id}"))),
        None => {
            // State written before token ids were recorded: the same CA is all that can be checked.
            tracing::warn!(
                agent_id = %identity.agent_id,
                token_id = %token.token_id,
                "the state directory does not record which join token enrolled it; assuming it was this one"
            );
            Ok(())
        }
    }
}

/// Runs the enrollment exchange; stores nothing.
pub async fn enroll(
    control_plane: &str,
    join_token: &str,
    advertise: Option<&str>,
    outbound_only: bool,
) -> Result<AgentIdentity, EnrollError> {
    let token: JoinToken = join_token.parse()?;
    let ca = fetch_pinned_ca(control_plane, &token.ca_sha256).await?;
    let host = hostname();
    let (key, csr_pem) = key_and_csr(&host)?;
    let client = ControlClient::new(control_plane, &ca, None)?;
    let resp = client
        .enroll(&EnrollRequest {
            join_token: token.to_string(),
            csr_pem,
            advertise: advertise.map(str::to_string),
            hostname: host,
            outbound_only,
        })
        .await?;
    let cert = CertificateDer::from_pem_slice(resp.certificate_pem.as_bytes())
        .map_err(|e| EnrollError::BadAnswer(format!("certificatePem: {e}")))?;
    let answered_ca = CertificateDer::from_pem_slice(resp.ca_pem.as_bytes())
        .map_err(|e| EnrollError::BadAnswer(format!("caPem: {e}")))?;
    if answered_ca != ca {
        return Err(EnrollError::BadAnswer("caPem differs from the CA pinned by the join token".into()));
    }
    let identity = AgentIdentity {
        agent_id: resp.agent_id,
        account_id: resp.account_id,
        vpc_id: resp.vpc_id,
        subnet_id: resp.subnet_id,
        cert,
        key,
        ca,
    };
    // Building the tunnel config checks that the certificate chains to the CA and matches our key.
    tls::tunnel_client_config(&identity).map_err(|e| EnrollError::BadAnswer(e.to_string()))?;
    Ok(identity)
}

/// A fresh ECDSA P-256 key and a PEM CSR naming `host`.
pub(crate) fn key_and_csr(host: &str) -> Result<(PrivateKeyDer<'static>, String), EnrollError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| EnrollError::KeyGen(e.to_string()))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| EnrollError::KeyGen(e.to_string()))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, host);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).map_err(|e| EnrollError::KeyGen(e.to_string()))?;
    let csr_pem = csr.pem().map_err(|e| EnrollError::KeyGen(e.to_string()))?;
    Ok((PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())), csr_pem))
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_is_pem_and_names_the_host() {
        let (_key, csr) = key_and_csr("host-1").unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let params = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        assert!(format!("{:?}", params.params.distinguished_name).contains("host-1"));
    }

    #[tokio::test]
    async fn missing_state_and_token_says_how_to_fix_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_or_enroll("https://cp.example", None, dir.path(), None, false).await.unwrap_err();
        assert!(err.to_string().contains("--join-token"), "{err}");
    }

    fn token(id: &str, ca: &CertificateDer<'_>) -> String {
        JoinToken { token_id: id.into(), secret: "5".repeat(64), ca_sha256: tls::cert_sha256(ca) }.to_string()
    }

    fn stored(join_token_id: Option<&str>) -> (tempfile::TempDir, AgentIdentity) {
        let dir = tempfile::tempdir().unwrap();
        let id = crate::testing::TestCa::new().issue("agent-00000000000000001", "acct-000000000001", "vpc-1");
        let enrollment = Enrollment {
            control_plane: "https://cp.example/".into(),
            join_token_id: join_token_id.map(str::to_string),
        };
        id.store(dir.path(), &enrollment).unwrap();
        (dir, id)
    }

    #[tokio::test]
    async fn stored_identity_is_reused_without_a_token_or_with_the_same_one() {
        let (dir, id) = stored(Some("jt-0000000000000001"));
        let loaded = load_or_enroll("https://cp.example", None, dir.path(), None, false).await.unwrap();
        assert_eq!(loaded.agent_id, id.agent_id);
        // The same command line again: same token, nothing contacted.
        let same = token("jt-0000000000000001", &id.ca);
        let loaded = load_or_enroll("https://cp.example", Some(&same), dir.path(), None, false).await.unwrap();
        assert_eq!(loaded.agent_id, id.agent_id);
    }

    #[tokio::test]
    async fn another_join_token_for_an_enrolled_state_dir_is_an_error_naming_both() {
        let (dir, id) = stored(Some("jt-0000000000000001"));
        let other = token("jt-0000000000000002", &id.ca);
        let err = load_or_enroll("https://cp.example", Some(&other), dir.path(), None, false).await.unwrap_err();
        let msg = err.to_string();
        for part in [
            "agent-00000000000000001",
            "acct-000000000001",
            "jt-0000000000000001",
            "jt-0000000000000002",
            "--state-dir",
        ] {
            assert!(msg.contains(part), "{part} missing from: {msg}");
        }
        // A token of another control plane (another CA) is refused too, even for old state.
        let (dir, _) = stored(None);
        let foreign = token("jt-0000000000000003", &crate::testing::TestCa::new().cert());
        let err = load_or_enroll("https://cp.example", Some(&foreign), dir.path(), None, false).await.unwrap_err();
        assert!(err.to_string().contains("another control plane's CA"), "{err}");
        // A malformed token is refused, not ignored.
        assert!(load_or_enroll("https://cp.example", Some("garbage"), dir.path(), None, false).await.is_err());
    }
}
