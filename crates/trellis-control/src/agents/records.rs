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

/// What the control plane remembers of an agent between requests: the
/// number and content hash of its latest config, and its current boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRuntime {
    /// The agent id.
    pub id: AgentId,
    pub account_id: AccountId,
    /// Version of the latest compiled config; only grows.
    pub config_version: u64,
    /// SHA-256 of that config's JSON with version 0.
    pub config_sha256: String,
    /// Boot id of the latest report; usage of older boots no longer has active connections.
    pub boot_id: Option<String>,
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

/// Cumulative counters of one (agent, boot, endpoint, resource), as last reported.
///
/// Agents report counters cumulative since their boot, so the stored value is
/// replaced, never added to: a lost report loses nothing and a repeated one
/// counts once. The usage of a resource is the sum over agents and boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageRecord {
    /// `<agent>/<boot>/<endpoint>/<resource>`.
    pub id: String,
    /// The owner of the resource (the gateway agent's account).
    pub account_id: AccountId,
    pub agent_id: AgentId,
    pub boot_id: String,
    pub vpc_endpoint_id: VpcEndpointId,
    pub resource_configuration_id: ResourceConfigurationId,
    /// The GROUP of a CHILD resource, so group usage finds its children's.
    pub resource_configuration_group_id: Option<ResourceConfigurationId>,
    pub consumer_account_id: AccountId,
    pub active_connections: u64,
    pub total_connections: u64,
    pub rejected_connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub updated_at: Timestamp,
}

impl UsageRecord {
    pub fn record_id(
        agent: &AgentId,
        boot_id: &str,
        endpoint: &VpcEndpointId,
        resource: &ResourceConfigurationId,
    ) -> String {
        format!("{agent}/{boot_id}/{endpoint}/{resource}")
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
        let mut refs = vec![
            self.resource_configuration_id.to_string(),
            self.vpc_endpoint_id.to_string(),
            self.agent_id.to_string(),
        ];
        refs.extend(self.resource_configuration_group_id.iter().map(|g| g.to_string()));
        refs
    }
}
