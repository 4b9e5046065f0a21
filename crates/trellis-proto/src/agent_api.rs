//! Bodies of the agent-facing routes: enrollment, config long-poll, report.
//!
//! `POST /v1/agents/enroll` is authenticated by the join token; the other
//! routes by the agent's TLS client certificate.

use serde::{Deserialize, Serialize};

/// `POST /v1/agents/enroll`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct EnrollRequest {
    /// The whole join token as printed by `trellis agent-token create`.
    pub join_token: String,
    /// PEM certificate signing request; the key never leaves the agent's host.
    pub csr_pem: String,
    /// `host:port` where endpoint agents reach this agent's tunnel listener.
    pub advertise: Option<String>,
    pub hostname: String,
    /// `trellis agent --outbound-only`: the agent accepts no inbound
    /// connection and is reached through the relays of its config.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outbound_only: bool,
}

/// Answer to a successful enrollment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct EnrollResponse {
    pub agent_id: String,
    pub account_id: String,
    pub vpc_id: String,
    pub subnet_id: String,
    /// The agent's certificate, signed by the control plane's CA.
    pub certificate_pem: String,
    pub ca_pem: String,
}

/// `POST /v1/agents/self/report`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct AgentReport {
    /// The config version the agent is serving.
    pub config_version: u64,
    /// Random id chosen at agent start; usage counters are cumulative per boot.
    pub boot_id: String,
    /// State of every endpoint listener in the served config.
    pub listeners: Vec<ListenerStatus>,
    /// Cumulative gateway-side usage since `boot_id` started.
    pub usage: Vec<UsageCounters>,
    /// `host:port` where this agent's tunnel listener is reachable now; updates
    /// the address given at enrollment (an agent restarted on another port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Health of the targets of the endpoint services this agent runs, as its
    /// checks see them (sent when it changes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_health: Vec<TargetHealthReport>,
    /// The agent runs with `--outbound-only` (no tunnel listener, reached
    /// through relays); updates what enrollment said.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outbound_only: bool,
}

/// One target of one service, as an agent's health checks see it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct TargetHealthReport {
    pub service_id: String,
    /// The target as configured (IP or DNS name).
    pub target: String,
    pub target_port: u16,
    /// `INITIAL`, `HEALTHY` or `UNHEALTHY`.
    pub state: String,
    /// The last failed check's error, while unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ListenerStatus {
    pub vpc_endpoint_id: String,
    pub resource_configuration_id: String,
    pub ready: bool,
    /// Why the listener is not ready (bind failure, …).
    pub error: Option<String>,
}

/// Counters a gateway agent keeps per (endpoint, resource).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct UsageCounters {
    pub vpc_endpoint_id: String,
    pub resource_configuration_id: String,
    pub consumer_account_id: String,
    pub active_connections: u64,
    pub total_connections: u64,
    pub rejected_connections: u64,
    /// Bytes from the consumer to the resource.
    pub bytes_in: u64,
    /// Bytes from the resource to the consumer.
    pub bytes_out: u64,
}

/// `POST /v1/relays/enroll`: like an agent's enrollment, with a relay join
/// token (`POST /v1/relay-tokens`, admin).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RelayEnrollRequest {
    /// The whole join token as printed by `trellis relay-token create`.
    pub join_token: String,
    /// PEM certificate signing request; the key never leaves the relay's host.
    pub csr_pem: String,
    /// `host:port` where agents reach the relay.
    pub advertise: String,
    pub hostname: String,
}

/// Answer to a relay's enrollment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RelayEnrollResponse {
    pub relay_id: String,
    pub zone: String,
    /// The relay's certificate, signed by the control plane's CA; it names
    /// the relay (`trellis:relay/<id>`, `<id>.relays.trellis.internal`).
    pub certificate_pem: String,
    pub ca_pem: String,
}

/// `POST /v1/relays/self/report`, every few seconds: keeps the relay's
/// `lastSeenAt` and health current.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RelayReport {
    /// The config version the relay is serving.
    pub config_version: u64,
    /// Random id chosen at relay start.
    pub boot_id: String,
    /// `host:port` where the relay is reachable now (updates the enrollment's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Gateway agents with at least one attached connection now, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attached: Vec<String>,
    /// Relayed flows open now.
    pub active_flows: u64,
}
