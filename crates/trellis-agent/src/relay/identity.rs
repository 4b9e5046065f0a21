//! The relay's identity: its private key, the certificate the control plane's
//! CA signed for it (DNS SAN `relay_server_name(id)`, URI SAN
//! `relay_identity_uri(id)`), the CA, and the ids the control plane assigned.
//!
//! Stored in the state directory so a restart needs no join token:
//! `relay.key` (PEM, mode 0600), `relay.crt`, `ca.crt` and `relay.json`
//! (written last). The key is generated on this host and never leaves it.

use std::fs;
use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::identity::{IdentityError, ensure_private_dir, pem, write_atomic};

const KEY_FILE: &str = "relay.key";
const CERT_FILE: &str = "relay.crt";
const CA_FILE: &str = "ca.crt";
const IDENTITY_FILE: &str = "relay.json";

/// Everything a relay needs to prove who it is and to check its peers.
pub struct RelayIdentity {
    pub relay_id: String,
    pub zone: String,
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    /// The control plane's CA certificate; the only root the relay trusts.
    pub ca: CertificateDer<'static>,
}

impl Clone for RelayIdentity {
    fn clone(&self) -> Self {
        Self {
            relay_id: self.relay_id.clone(),
            zone: self.zone.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
        }
    }
}

impl std::fmt::Debug for RelayIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayIdentity")
            .field("relay_id", &self.relay_id)
            .field("zone", &self.zone)
            .field("key", &"***")
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IdentityFile {
    relay_id: String,
    zone: String,
    control_plane: String,
    join_token_id: Option<String>,
}

/// How a stored relay identity was enrolled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayEnrollment {
    pub control_plane: String,
    pub join_token_id: Option<String>,
}

impl RelayIdentity {
    /// Whether `state_dir` holds a relay identity.
    pub fn exists(state_dir: &Path) -> bool {
        state_dir.join(IDENTITY_FILE).exists()
    }

    /// Reads the identity stored in `state_dir`.
    pub fn load(state_dir: &Path) -> Result<(Self, RelayEnrollment), IdentityError> {
        let read = |name: &str| {
            let path = state_dir.join(name);
            fs::read(&path).map_err(|source| IdentityError::Io { path: path.clone(), source }).map(|b| (path, b))
        };
        let corrupt = |path: std::path::PathBuf, reason: String| IdentityError::Corrupt { path, reason };
        let (path, bytes) = read(IDENTITY_FILE)?;
        let ids: IdentityFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(path, e.to_string()))?;
        let (path, bytes) = read(KEY_FILE)?;
        let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| corrupt(path, e.to_string()))?;
        let (path, bytes) = read(CERT_FILE)?;
        let cert = CertificateDer::from_pem_slice(&bytes).map_err(|e| corrupt(path, e.to_string()))?;
        let (path, bytes) = read(CA_FILE)?;
        let ca = CertificateDer::from_pem_slice(&bytes).map_err(|e| corrupt(path, e.to_string()))?;
        Ok((
            Self { relay_id: ids.relay_id, zone: ids.zone, cert, key, ca },
            RelayEnrollment { control_plane: ids.control_plane, join_token_id: ids.join_token_id },
        ))
    }

    /// Writes the identity into `state_dir` (created with mode 0700 when missing).
    pub fn store(&self, state_dir: &Path, enrollment: &RelayEnrollment) -> Result<(), IdentityError> {
        ensure_private_dir(state_dir)?;
        write_atomic(&state_dir.join(KEY_FILE), pem("PRIVATE KEY", self.key.secret_der()).as_bytes(), true)?;
        write_atomic(&state_dir.join(CERT_FILE), pem("CERTIFICATE", &self.cert).as_bytes(), false)?;
        write_atomic(&state_dir.join(CA_FILE), pem("CERTIFICATE", &self.ca).as_bytes(), false)?;
        let ids = IdentityFile {
            relay_id: self.relay_id.clone(),
            zone: self.zone.clone(),
            control_plane: enrollment.control_plane.clone(),
            join_token_id: enrollment.join_token_id.clone(),
        };
        // A struct of strings always serializes.
        let json = serde_json::to_vec_pretty(&ids).expect("relay identity serializes");
        write_atomic(&state_dir.join(IDENTITY_FILE), &json, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_identity_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let id = crate::testing::TestCa::new().issue_relay("relay-0000000000000001", "z1");
        let enrollment =
            RelayEnrollment { control_plane: "https://cp:8443".into(), join_token_id: Some("rt-1".into()) };
        assert!(!RelayIdentity::exists(dir.path()));
        id.store(dir.path(), &enrollment).unwrap();
        let (loaded, stored) = RelayIdentity::load(dir.path()).unwrap();
        assert_eq!(stored, enrollment);
        assert_eq!((loaded.relay_id.as_str(), loaded.zone.as_str()), ("relay-0000000000000001", "z1"));
        assert_eq!(loaded.cert, id.cert);
        assert_eq!(loaded.key.secret_der(), id.key.secret_der());
    }
}
