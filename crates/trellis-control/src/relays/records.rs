//! Records the relay routes keep besides [`trellis_model::Relay`]: join
//! tokens, the certificate → relay index, and what reports say. None is ever
//! returned to a client as stored. All are global (no account), like relays.

use serde::{Deserialize, Serialize};
use trellis_model::{JoinTokenId, RelayId, Timestamp};
use trellis_store::Object;

/// A relay join token, stored by the SHA-256 of its secret (the secret itself is shown once).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayToken {
    pub id: JoinTokenId,
    /// The zone the relay joins (empty for none).
    pub zone: String,
    /// Lower-case hex SHA-256 of the secret half of the token.
    pub secret_sha256: String,
    pub expires_at: Timestamp,
    pub created_at: Timestamp,
    /// When the token enrolled a relay; a token is single use.
    pub used_at: Option<Timestamp>,
    pub relay_id: Option<RelayId>,
}

impl Object for RelayToken {
    const KIND: &'static str = "relay-token";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn account_id(&self) -> &str {
        ""
    }
}

/// Index from a relay certificate (by SHA-256 of its DER) to its relay.
/// Deleting the relay deletes it: the certificate then opens no relay route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayCert {
    /// Lower-case hex SHA-256 of the certificate DER.
    pub id: String,
    pub relay_id: RelayId,
    pub not_after: Timestamp,
}

impl Object for RelayCert {
    const KIND: &'static str = "relay-cert";
    fn id(&self) -> &str {
        &self.id
    }
    fn account_id(&self) -> &str {
        ""
    }
    fn refs(&self) -> Vec<String> {
        vec![self.relay_id.to_string()]
    }
}

/// The certificate of a deleted relay that has not expired yet: agents that
/// use relays refuse it although the CA signed it. Removed once expired
/// (`server::drop_expired_revocations`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevokedRelayCert {
    /// Lower-case hex SHA-256 of the certificate DER.
    pub id: String,
    pub relay_id: RelayId,
    pub not_after: Timestamp,
}

impl Object for RevokedRelayCert {
    const KIND: &'static str = "revoked-relay-cert";
    fn id(&self) -> &str {
        &self.id
    }
    fn account_id(&self) -> &str {
        ""
    }
}

/// What the control plane remembers of a running relay. Kept apart from the
/// [`trellis_model::Relay`] so reports never touch anything a config is compiled from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayRuntime {
    /// The relay id.
    pub id: String,
    pub boot_id: Option<String>,
    pub last_seen_at: Option<Timestamp>,
    pub config_version: u64,
    /// Gateway agents attached now (only those the relay's config lists).
    pub attached: Vec<String>,
    pub active_flows: u64,
}

impl Object for RelayRuntime {
    const KIND: &'static str = "relay-runtime";
    fn id(&self) -> &str {
        &self.id
    }
    fn account_id(&self) -> &str {
        ""
    }
}
