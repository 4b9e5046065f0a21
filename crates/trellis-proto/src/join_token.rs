//! The agent join token: `trellis1.<token id>.<secret>.<ca sha256 hex>`.
//!
//! Like kubeadm's `--discovery-token-ca-cert-hash`, the token carries the
//! SHA-256 of the control plane's CA certificate (DER), so an agent on a hostile
//! network pins the CA before it sends anything secret. The token id names the
//! token in the store; the secret is compared against its stored hash.

use std::fmt;
use std::str::FromStr;

const PREFIX: &str = "trellis1";

/// A parsed join token. `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public id of the token (`jt-` + hex).
    pub token_id: String,
    /// The secret half, hex; only its hash is stored by the control plane.
    pub secret: String,
    /// Lower-case hex SHA-256 of the CA certificate's DER bytes.
    pub ca_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinTokenError {
    #[error(
        "the join token is malformed: expected trellis1.<id>.<secret>.<ca-hash> as printed by `trellis agent-token create`"
    )]
    Malformed,
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl FromStr for JoinToken {
    type Err = JoinTokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('.');
        let (Some(prefix), Some(id), Some(secret), Some(ca), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JoinTokenError::Malformed);
        };
        let id_ok = id.strip_prefix("jt-").is_some_and(|h| is_lower_hex(h, 16));
        if prefix != PREFIX || !id_ok || !is_lower_hex(secret, 64) || !is_lower_hex(ca, 64) {
            return Err(JoinTokenError::Malformed);
        }
        Ok(Self { token_id: id.to_string(), secret: secret.to_string(), ca_sha256: ca.to_string() })
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{}.{}.{}", self.token_id, self.secret, self.ca_sha256)
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("token_id", &self.token_id)
            .field("secret", &"***")
            .field("ca_sha256", &self.ca_sha256)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_hides_secret() {
        let t =
            JoinToken { token_id: format!("jt-{}", "a".repeat(16)), secret: "b".repeat(64), ca_sha256: "c".repeat(64) };
        let parsed: JoinToken = t.to_string().parse().unwrap();
        assert_eq!(parsed, t);
        assert!(!format!("{t:?}").contains(&"b".repeat(64)));
    }

    #[test]
    fn garbage_is_rejected() {
        for bad in ["", "garbage", "trellis1.x.y.z", "trellis1...", "trellis2.jt-aaaaaaaaaaaaaaaa.b.c"] {
            assert_eq!(bad.parse::<JoinToken>(), Err(JoinTokenError::Malformed));
        }
    }
}
