//! Records the agent routes keep besides the model's objects: join tokens,
//! the certificate → agent index, per-agent config numbering, and usage
//! counters. None of them is ever returned to a client as stored.

use serde::{Deserialize, Serialize};
use trellis_model::{
    AccountId, AgentId, JoinTokenId, ResourceConfigurationId, SubnetId, Timestamp, VpcEndpointId, VpcId,
};
use trellis_store::Object;

/// A join token, stored by the SHA-256 of its secret (the secret itself is shown once).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentToken {
    pub id: JoinTokenId,
    pub account_id: AccountId,
    pub vpc_id: VpcId,
    pub subnet_id: SubnetId,
    /// Lower-case hex SHA-256 of the secret half of the token.
    pub secret_sha256: String,
    pub expires_at: Timestamp,
    pub created_at: Timestamp,
    /// When the token enrolled an agent; a token is single use.
    pub used_at: Option<Timestamp>,
    pub agent_id: Option<AgentId>,
}

impl Object for AgentToken {
    const KIND: &'static str = "agent-token";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn account_id(&self) -> &str {
        self.account_id.as_str()
    }
    fn refs(&self) -> Vec<String> {
        vec![self.subnet_id.to_string()]
    }
}

/// Index from an agent certificate (by SHA-256 of its DER) to its agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentCert {
    /// Lower-case hex SHA-256 of the certificate DER.
    pub id: String,
    pub agent_id: AgentId,
    pub account_id: AccountId,
    pub not_after: Timestamp,
}

impl Object for AgentCert {
    const KIND: &'static str = "agent-cert";
    fn id(&self) -> &str {
        &self.id
    }
    fn account_id(&self) -> &str {
        self.account_id.as_str()
    }
    fn refs(&self) -> Vec<String> {
        vec![self.agent_id.to_string()]
    }
}

/// The certificate of a deleted agent that has not expired yet: gateways of
/// its VPC's providers refuse it although the CA signed it. Removed once expired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevokedCert {
    /// Lower-case hex SHA-256 of the certificate DER.
    pub id: String,
    pub account_id: AccountId,
    pub vpc_id: VpcId,
    pub agent_id: AgentId,
    pub not_after: Timestamp,
}

impl Object for RevokedCert {
    const KIND: &'static str = "revoked-cert";
    fn id(&self) -> &str {
        &self.id
    }
    fn account_id(&self) -> &str {
        self.account_id.as_str()
    }
    fn refs(&self) -> Vec<String> {
        vec![self.vpc_id.to_string()]
    }
}

/// What the control plane remembers of a running agent: liveness and its
/// current boot. Kept apart from the [`trellis_model::Agent`] record so the
/// reports every few seconds never touch anything an agent config is compiled from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRuntime {
    /// The agent id.
    pub id: AgentId,
    pub account_id: AccountId,
    /// Boot id of the latest report; usage of older boots no longer has active connections.
    pub boot_id: Option<String>,
    /// When a report last arrived (written at most every few seconds, see `report`).
    #[serde(default)]
    pub last_seen_at: Option<Timestamp>,
    /// The config version the agent said it serves.
    #[serde(default)]
    pub config_version: u64,
}

impl Object for AgentRuntime {
    const KIND: &'static str = "agent-runtime";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn account_id(&self) -> &str {
        self.account_id.as_str()
    }
}

/// Gateway usage of one (agent, endpoint, resource): the counters of the
/// agent's current boot as last reported, plus the totals of its earlier boots.
///
/// Agents report counters cumulative since their boot, so the current boot's
/// values are replaced, never added to: a lost report loses nothing and a
/// repeated one counts once. When a report arrives from a new boot, the old
/// boot's totals fold into `previous_boots`, so there is one record per
/// (agent, endpoint, resource) however often the agent restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageRecord {
    /// `<agent>/<endpoint>/<resource>`.
    pub id: String,
    /// The owner of the resource (the gateway agent's account).
    pub account_id: AccountId,
    pub agent_id: AgentId,
    /// The boot the current counters belong to.
    pub boot_id: String,
    pub vpc_endpoint_id: VpcEndpointId,
    /// The resource configuration (a SINGLE or CHILD), or the endpoint service.
    pub resource_configuration_id: String,
    /// The GROUP of a CHILD resource, so group usage finds its children's.
    pub resource_configuration_group_id: Option<ResourceConfigurationId>,
    pub consumer_account_id: AccountId,
    pub active_connections: u64,
    pub total_connections: u64,
    pub rejected_connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Totals of the agent's earlier boots (active connections excluded).
    #[serde(default)]
    pub previous_boots: BootTotals,
    pub updated_at: Timestamp,
}

/// Counters summed over finished boots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootTotals {
    pub total_connections: u64,
    pub rejected_connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl BootTotals {
    /// These totals plus a finished boot's counters (saturating: a peer's numbers never wrap).
    pub fn plus_boot_of(self, r: &UsageRecord) -> Self {
        Self {
            total_connections: self.total_connections.saturating_add(r.total_connections),
            rejected_connections: self.rejected_connections.saturating_add(r.rejected_connections),
            bytes_in: self.bytes_in.saturating_add(r.bytes_in),
            bytes_out: self.bytes_out.saturating_add(r.bytes_out),
        }
    }
}

impl UsageRecord {
    pub fn record_id(agent: &AgentId, endpoint: &VpcEndpointId, resource: &str) -> String {
        format!("{agent}/{endpoint}/{resource}")
    }
}

impl Object for UsageRecord {
    const KIND: &'static str = "usage-counter";
    fn id(&self) -> &str {
        &self.id
    }
    fn account_id(&self) -> &str {
        self.account_id.as_str()
    }
    fn refs(&self) -> Vec<String> {
        let mut refs =
            vec![self.resource_configuration_id.clone(), self.vpc_endpoint_id.to_string(), self.agent_id.to_string()];
        refs.extend(self.resource_configuration_group_id.iter().map(|g| g.to_string()));
        refs
    }
}

/// The health of the service targets one agent checks, as its last report
/// with health said (agents send it when it changes): one record per agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetHealthRecord {
    /// The agent's id.
    pub id: String,
    /// The provider (the agent's account).
    pub account_id: AccountId,
    pub agent_id: AgentId,
    pub targets: Vec<trellis_proto::agent_api::TargetHealthReport>,
    pub updated_at: Timestamp,
}

impl Object for TargetHealthRecord {
    const KIND: &'static str = "target-health";
    fn id(&self) -> &str {
        &self.id
    }
    fn account_id(&self) -> &str {
        self.account_id.as_str()
    }
    /// The services whose targets it holds, so a service's view is one lookup.
    fn refs(&self) -> Vec<String> {
        let mut refs: Vec<String> = self.targets.iter().map(|t| t.service_id.clone()).collect();
        refs.sort();
        refs.dedup();
        refs
    }
}
