//! The agent config: everything one agent needs to serve, compiled by the
//! control plane from the desired state and fetched by the agent with a
//! long-poll (`GET /v1/agents/self/config?after=<version>`).
//!
//! An agent serves exactly what its latest config says, nothing more: a
//! resource or endpoint missing from the config is revoked.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::PortRange;

/// The whole config of one agent, with a version that only grows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentConfig {
    /// Monotonic per agent; the long-poll returns only a version greater than `after`.
    pub version: u64,
    pub agent_id: String,
    pub account_id: String,
    pub vpc_id: String,
    pub subnet_id: String,
    pub zone: String,
    /// Region label used in DNS names (`<vpce>.<rcfg>.<region>.trellis.internal`).
    pub region: String,
    /// The subnet's endpoint address pool (CIDR), which the agent may make local.
    pub address_pool: String,
    /// Gateway role: resources this agent lets consumers reach.
    pub gateway: GatewayRole,
    /// Endpoint role: endpoint addresses this agent listens on.
    pub endpoints: Vec<EndpointConfig>,
}

/// What a gateway agent accepts and dials.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayRole {
    /// Endpoint agents allowed to open streams, by certificate fingerprint.
    pub peers: Vec<PeerAgent>,
    /// Resources reachable through this gateway agent.
    pub resources: Vec<GatewayResource>,
}

/// An endpoint agent known to a gateway, identified by its TLS client certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAgent {
    pub agent_id: String,
    pub account_id: String,
    pub vpc_id: String,
    /// Lower-case hex SHA-256 of the peer's certificate DER.
    pub cert_sha256: String,
}

/// One SINGLE or CHILD resource configuration served by a gateway agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayResource {
    pub resource_configuration_id: String,
    pub resource_gateway_id: String,
    pub owner_account_id: String,
    pub target: Target,
    pub port_ranges: Vec<PortRange>,
    /// Endpoints allowed to reach this resource right now.
    pub allowed: Vec<AllowedEndpoint>,
}

/// Where a gateway dials: an IP, or a DNS name resolved in the owner's network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase", tag = "type")]
pub enum Target {
    Ip { address: IpAddr },
    Dns { domain_name: String },
}

/// An endpoint (in a consumer VPC and account) allowed to use a resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllowedEndpoint {
    pub vpc_endpoint_id: String,
    pub consumer_account_id: String,
    pub consumer_vpc_id: String,
}

/// A VPC endpoint served by this (endpoint) agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointConfig {
    pub vpc_endpoint_id: String,
    pub resources: Vec<EndpointResource>,
}

/// One resource reachable through an endpoint, at its own address and ports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointResource {
    pub resource_configuration_id: String,
    /// Address from this agent's subnet pool; the agent listens here.
    pub address: IpAddr,
    /// The resource's own ports; the agent listens on each.
    pub port_ranges: Vec<PortRange>,
    /// Names the agent's DNS listener answers with `address`.
    pub dns_names: Vec<String>,
    /// Gateway agents to tunnel to, own zone first.
    pub gateways: Vec<GatewayTarget>,
}

/// A gateway agent an endpoint agent can dial.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayTarget {
    pub agent_id: String,
    /// `host:port` the gateway agent advertised.
    pub address: String,
    pub zone: String,
    /// DNS SAN of the gateway agent's certificate, checked by TLS.
    pub server_name: String,
}

/// The DNS SAN the control plane's CA puts in an agent's certificate.
pub fn agent_server_name(agent_id: &str) -> String {
    format!("{agent_id}.agents.trellis.internal")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_camel_case_on_the_wire_like_the_rest_of_the_config() {
        let dns = Target::Dns { domain_name: "db.internal".into() };
        assert_eq!(
            serde_json::to_value(&dns).unwrap(),
            serde_json::json!({"type": "dns", "domainName": "db.internal"})
        );
        let ip = Target::Ip { address: "10.0.0.10".parse().unwrap() };
        assert_eq!(serde_json::to_value(&ip).unwrap(), serde_json::json!({"type": "ip", "address": "10.0.0.10"}));
        let back: Target = serde_json::from_value(serde_json::json!({"type": "dns", "domainName": "x.y"})).unwrap();
        assert_eq!(back, Target::Dns { domain_name: "x.y".into() });
    }
}
