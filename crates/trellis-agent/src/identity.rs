//! The agent's identity: its private key, the certificate the control plane's
//! CA signed for it, the CA itself, and the ids the control plane assigned.
//!
//! Stored in the state directory so later starts need no join token:
//! `agent.key` (PEM, mode 0600), `agent.crt`, `ca.crt` and `identity.json`.
//! The key is generated on this host and never leaves it.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

const KEY_FILE: &str = "agent.key";
const CERT_FILE: &str = "agent.crt";
const CA_FILE: &str = "ca.crt";
const IDENTITY_FILE: &str = "identity.json";

/// Everything the agent needs to prove who it is and to check its peers.
pub struct AgentIdentity {
    pub agent_id: String,
    pub account_id: String,
    pub vpc_id: String,
    pub subnet_id: String,
    /// The agent's certificate (DER), with DNS SAN `trellis_proto::agent_server_name(agent_id)`.
    pub cert: CertificateDer<'static>,
    /// The agent's private key (PKCS#8 DER).
    pub key: PrivateKeyDer<'static>,
    /// The control plane's CA certificate (DER); the only root the agent trusts.
    pub ca: CertificateDer<'static>,
}

impl Clone for AgentIdentity {
    fn clone(&self) -> Self {
        Self {
            agent_id: self.agent_id.clone(),
            account_id: self.account_id.clone(),
            vpc_id: self.vpc_id.clone(),
            subnet_id: self.subnet_id.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
        }
    }
}

impl std::fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentIdentity")
            .field("agent_id", &self.agent_id)
            .field("account_id", &self.account_id)
            .field("vpc_id", &self.vpc_id)
            .field("subnet_id", &self.subnet_id)
            .field("key", &"***")
            .finish_non_exhaustive()
    }
}

/// `identity.json`: the ids, and how this identity was enrolled.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IdentityFile {
    agent_id: String,
    account_id: String,
    vpc_id: String,
    subnet_id: String,
    control_plane: String,
    /// Absent in state directories written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    join_token_id: Option<String>,
}

/// How a stored identity was enrolled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enrollment {
    /// The control plane URL given at enrollment (normalized).
    pub control_plane: String,
    /// The id of the join token used (`jt-…`); `None` for state written before it was recorded.
    pub join_token_id: Option<String>,
}

/// Why the stored identity could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A state file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// A state file exists but does not parse; the state directory is damaged.
    #[error("{path} is damaged ({reason}); remove the state directory and enroll again with a new join token")]
    Corrupt { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io { path: path.to_path_buf(), source }
}

impl AgentIdentity {
    /// SHA-256 of this agent's certificate, lower-case hex (what gateways list in `revokedCerts` once it is deleted).
    pub fn cert_sha256(&self) -> String {
        crate::tls::cert_sha256(&self.cert)
    }

    /// Whether `state_dir` holds an identity (its `identity.json` exists).
    pub fn exists(state_dir: &Path) -> bool {
        state_dir.join(IDENTITY_FILE).exists()
    }

    /// Reads the identity stored in `state_dir`, and how it was enrolled.
    pub fn load(state_dir: &Path) -> Result<(Self, Enrollment), IdentityError> {
        let read = |name: &str| {
            let path = state_dir.join(name);
            fs::read(&path).map_err(io_err(&path)).map(|b| (path, b))
        };
        let (path, bytes) = read(IDENTITY_FILE)?;
        let ids: IdentityFile = serde_json::from_slice(&bytes)
            .map_err(|e| IdentityError::Corrupt { path: path.clone(), reason: e.to_string() })?;
        let (path, bytes) = read(KEY_FILE)?;
        let key = PrivateKeyDer::from_pem_slice(&bytes)
            .map_err(|e| IdentityError::Corrupt { path, reason: e.to_string() })?;
        let (path, bytes) = read(CERT_FILE)?;
        let cert = CertificateDer::from_pem_slice(&bytes)
            .map_err(|e| IdentityError::Corrupt { path, reason: e.to_string() })?;
        let (path, bytes) = read(CA_FILE)?;
        let ca = CertificateDer::from_pem_slice(&bytes)
            .map_err(|e| IdentityError::Corrupt { path, reason: e.to_string() })?;
        Ok((
            Self {
                agent_id: ids.agent_id,
                account_id: ids.account_id,
                vpc_id: ids.vpc_id,
                subnet_id: ids.subnet_id,
                cert,
                key,
                ca,
            },
            Enrollment { control_plane: ids.control_plane, join_token_id: ids.join_token_id },
        ))
    }

    /// Writes the identity into `state_dir` (created with mode 0700 when missing).
    /// `identity.json` is written last, so a crash never leaves a half identity that [`exists`](Self::exists).
    pub fn store(&self, state_dir: &Path, enrollment: &Enrollment) -> Result<(), IdentityError> {
        ensure_private_dir(state_dir)?;
        let key_pem = pem("PRIVATE KEY", self.key.secret_der());
        write_atomic(&state_dir.join(KEY_FILE), key_pem.as_bytes(), true)?;
        write_atomic(&state_dir.join(CERT_FILE), pem("CERTIFICATE", &self.cert).as_bytes(), false)?;
        write_atomic(&state_dir.join(CA_FILE), pem("CERTIFICATE", &self.ca).as_bytes(), false)?;
        let ids = IdentityFile {
            agent_id: self.agent_id.clone(),
            account_id: self.account_id.clone(),
            vpc_id: self.vpc_id.clone(),
            subnet_id: self.subnet_id.clone(),
            control_plane: enrollment.control_plane.clone(),
            join_token_id: enrollment.join_token_id.clone(),
        };
        // Serializing a struct of strings cannot fail.
        let json = serde_json::to_vec_pretty(&ids).expect("identity serializes");
        write_atomic(&state_dir.join(IDENTITY_FILE), &json, false)
    }
}

/// PEM-encodes DER bytes with the given label.
pub(crate) fn pem(label: &str, der: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(TABLE[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII.
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Creates `dir` (mode 0700 on Unix) if it does not exist.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<(), IdentityError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io_err(dir))
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers
/// see the old or the new content, never a mix. `private` makes the file 0600.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> Result<(), IdentityError> {
    let tmp = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, if private { 0o600 } else { 0o644 });
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(&tmp).map_err(io_err(&tmp))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io_err(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_encoding_round_trips_through_rustls_parser() {
        for len in [0usize, 1, 2, 3, 47, 48, 49, 100] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let text = pem("CERTIFICATE", &der);
            if len > 0 {
                assert_eq!(CertificateDer::from_pem_slice(text.as_bytes()).unwrap().as_ref(), &der[..]);
            }
        }
    }

    /// An agent upgraded from a build on ring keeps its identity: the state
    /// in `testdata/ring-identity` was written by that build (`trellis dev`,
    /// 2026-12-03). Its key loads into the tunnel's TLS configurations and
    /// signs what its certificate's public key verifies.
    #[test]
    fn an_identity_written_by_the_ring_build_loads_and_its_key_signs() {
        use aws_lc_rs::signature::{self, KeyPair as _};
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/ring-identity");
        let (id, enrollment) = AgentIdentity::load(&fixture).unwrap();
        assert_eq!(id.agent_id, "agent-2185e4bdffad656c9");
        assert_eq!(enrollment.control_plane, "https://127.0.0.1:42079");
        crate::tls::tunnel_client_config(&id).unwrap();
        crate::tls::tunnel_server_config(&id, std::sync::Arc::new(crate::tls::AnyAgent)).unwrap();
        let key = signature::EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, id.key.secret_der())
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&id.cert).unwrap();
        let public = cert.public_key().subject_public_key.data.to_vec();
        assert_eq!(key.public_key().as_ref(), &public[..], "the key belongs to the certificate");
        let sig = key.sign(&aws_lc_rs::rand::SystemRandom::new(), b"tunnel").unwrap();
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &public)
            .verify(b"tunnel", sig.as_ref())
            .unwrap();
    }

    #[test]
    fn identity_survives_a_restart_and_the_key_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let id = crate::testing::TestCa::new().issue("agent-0123456789abcdef0", "acct-000000000001", "vpc-1");
        assert!(!AgentIdentity::exists(&state));
        let enrollment = Enrollment {
            control_plane: "https://cp.example:8443".into(),
            join_token_id: Some("jt-0123456789abcdef".into()),
        };
        id.store(&state, &enrollment).unwrap();
        assert!(AgentIdentity::exists(&state));
        let (loaded, stored) = AgentIdentity::load(&state).unwrap();
        assert_eq!(stored, enrollment);
        assert_eq!(loaded.agent_id, id.agent_id);
        assert_eq!(loaded.cert, id.cert);
        assert_eq!(loaded.key.secret_der(), id.key.secret_der());
        assert_eq!(loaded.ca, id.ca);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(state.join(KEY_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
