//! The agent config: everything one agent needs to serve, compiled by the
//! control plane from the desired state and fetched by the agent with a
//! long-poll (`GET /v1/agents/self/config?after=<version>`).
//!
//! An agent serves exactly what its latest config says, nothing more: a
//! resource or endpoint missing from the config is revoked.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::PortRange;
pub use trellis_model::{ConsumerLimits, HealthCheck, HealthCheckProtocol, LoadBalancing, ServicePort};

/// The whole config of one agent, with a version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct AgentConfig {
    /// Names this content for the long-poll, which answers when the control
    /// plane's version differs from the agent's (`after`); never 0.
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
    /// Outbound-only gateway agents (`trellis agent --outbound-only`): the
    /// relays to keep attached connections to, so endpoint agents reach this
    /// agent through them. Empty for an agent with a tunnel listener.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<RelayTarget>,
    /// Lower-case hex SHA-256 of certificates of deleted relays that have not
    /// expired yet, in the configs of agents that use relays: such an agent
    /// refuses a relay presenting one (and drops its attachments and relayed
    /// flows through it) even though the CA signed it. Sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_relay_certs: Vec<String>,
}

/// A set of hex strings, lower-cased as they are read (the control plane
/// sends lower case; a hand-written config may not).
fn lower_case_set<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeSet<String>, D::Error> {
    let items = Vec::<String>::deserialize(d)?;
    Ok(items.into_iter().map(|s| s.to_ascii_lowercase()).collect())
}

/// Whether `cert_sha256` (hex, either case) is in `set` (lower-case hex).
fn revoked(set: &BTreeSet<String>, cert_sha256: &str) -> bool {
    if cert_sha256.bytes().any(|b| b.is_ascii_uppercase()) {
        set.contains(&cert_sha256.to_ascii_lowercase())
    } else {
        set.contains(cert_sha256)
    }
}

impl AgentConfig {
    /// Whether the relay certificate with SHA-256 `cert_sha256` (hex) was
    /// revoked. A scan: relays are few, and it runs once per relay dial.
    pub fn is_relay_revoked(&self, cert_sha256: &str) -> bool {
        self.revoked_relay_certs.iter().any(|c| c.eq_ignore_ascii_case(cert_sha256))
    }
}

/// What a gateway agent accepts and dials.
///
/// Sized for thousands of consumers: each consumer VPC is listed once in
/// `consumers`, and each allowed endpoint refers to its VPC by index, so the
/// config grows by one short entry per consumer and one per endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct GatewayRole {
    /// Consumer VPCs with at least one endpoint allowed here. An agent whose
    /// certificate names another (account, VPC) is refused at the TLS handshake.
    #[serde(default)]
    pub consumers: Vec<ConsumerVpc>,
    /// Resources reachable through this gateway agent.
    #[serde(default)]
    pub resources: Vec<GatewayResource>,
    /// Endpoint services this agent runs: it balances their connections
    /// over their targets and checks the targets' health.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<GatewayService>,
    /// Lower-case hex SHA-256 of certificates of deleted agents of the
    /// consumer VPCs that have not expired yet: refused even though the CA
    /// signed them. A set (a sorted array on the wire): every tunnel
    /// connection and every flow's admission looks the peer up in it.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty", deserialize_with = "lower_case_set")]
    pub revoked_certs: BTreeSet<String>,
    /// Endpoints on this gateway's resources that still exist but may not
    /// connect, with the control plane's reason (for the access log when it
    /// closes their flows).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_endpoints: Vec<RevokedEndpoint>,
}

impl GatewayRole {
    /// The consumer VPC an allowed endpoint belongs to.
    pub fn consumer(&self, allowed: &AllowedEndpoint) -> Option<&ConsumerVpc> {
        self.consumers.get(allowed.consumer as usize)
    }

    /// Whether the certificate with SHA-256 `cert_sha256` (hex, either case)
    /// of a consumer's agent was revoked.
    pub fn is_revoked(&self, cert_sha256: &str) -> bool {
        revoked(&self.revoked_certs, cert_sha256)
    }

    /// Whether an agent of `account_id`'s VPC `vpc_id` may open tunnels here at all.
    ///
    /// The control plane lists `consumers` sorted (account, then VPC), so a
    /// known consumer is found by binary search: this runs on every flow. A
    /// miss is confirmed by a scan, so a hand-written unsorted list still works.
    pub fn knows_consumer(&self, account_id: &str, vpc_id: &str) -> bool {
        let key = (account_id, vpc_id);
        self.consumers.binary_search_by(|c| (c.account_id.as_str(), c.vpc_id.as_str()).cmp(&key)).is_ok()
            || self.consumers.iter().any(|c| c.vpc_id == vpc_id && c.account_id == account_id)
    }
}

/// A consumer VPC (and its account) that has endpoints allowed on a gateway.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ConsumerVpc {
    pub account_id: String,
    pub vpc_id: String,
}

/// One SINGLE or CHILD resource configuration served by a gateway agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct GatewayResource {
    pub resource_configuration_id: String,
    pub resource_gateway_id: String,
    pub owner_account_id: String,
    pub target: Target,
    pub port_ranges: Vec<PortRange>,
    /// Endpoints allowed to reach this resource right now, sorted by id.
    pub allowed: Vec<AllowedEndpoint>,
    /// Send a PROXY protocol v2 header to the target before any byte.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
    /// What one consumer account may use, on this gateway agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ConsumerLimits>,
}

/// One endpoint service run by a gateway agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct GatewayService {
    pub service_id: String,
    pub owner_account_id: String,
    /// Where connections go: IPs, or DNS names resolved in the provider's network.
    pub targets: Vec<Target>,
    /// Consumer-facing ports and the target ports they map to.
    pub ports: Vec<ServicePort>,
    pub load_balancing: LoadBalancing,
    pub health_check: HealthCheck,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ConsumerLimits>,
    /// Interface endpoints allowed to connect right now, sorted by id.
    pub allowed: Vec<AllowedEndpoint>,
}

impl GatewayService {
    /// The allowed entry of `vpc_endpoint_id` (binary search: `allowed` is sorted).
    pub fn allowed_endpoint(&self, vpc_endpoint_id: &str) -> Option<&AllowedEndpoint> {
        self.allowed
            .binary_search_by(|a| a.vpc_endpoint_id.as_str().cmp(vpc_endpoint_id))
            .ok()
            .map(|i| &self.allowed[i])
    }

    /// The target port of consumer-facing `port`.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports.iter().find(|p| p.port == port).map(|p| p.target_port)
    }
}

impl GatewayResource {
    /// The allowed entry of `vpc_endpoint_id` (binary search: `allowed` is sorted).
    pub fn allowed_endpoint(&self, vpc_endpoint_id: &str) -> Option<&AllowedEndpoint> {
        self.allowed
            .binary_search_by(|a| a.vpc_endpoint_id.as_str().cmp(vpc_endpoint_id))
            .ok()
            .map(|i| &self.allowed[i])
    }
}

/// Where a gateway dials: an IP, or a DNS name resolved in the owner's network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase", tag = "type")]
pub enum Target {
    Ip { address: IpAddr },
    Dns { domain_name: String },
}

/// An endpoint allowed to use a resource, with the index of its VPC in [`GatewayRole::consumers`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct AllowedEndpoint {
    pub vpc_endpoint_id: String,
    pub consumer: u32,
}

/// An endpoint that exists but may not connect, and why (as the control plane knows it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RevokedEndpoint {
    pub vpc_endpoint_id: String,
    pub reason: String,
}

/// A VPC endpoint served by this (endpoint) agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct EndpointConfig {
    pub vpc_endpoint_id: String,
    pub resources: Vec<EndpointResource>,
}

/// One resource reachable through an endpoint, at its own address and ports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct EndpointResource {
    pub resource_configuration_id: String,
    /// Address from this agent's subnet pool; the agent listens here.
    pub address: IpAddr,
    /// The resource's own ports; the agent listens on each.
    pub port_ranges: Vec<PortRange>,
    /// Names the agent's DNS listener answers with `address`.
    pub dns_names: Vec<String>,
    /// Names answered with other addresses: an interface endpoint's regional
    /// name (every subnet's address) and its zonal names (each zone's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_records: Vec<DnsRecord>,
    /// Gateway agents to tunnel to, own zone first.
    pub gateways: Vec<GatewayTarget>,
}

/// A name and the addresses the agent's DNS answers for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct DnsRecord {
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

/// A gateway agent an endpoint agent can dial.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct GatewayTarget {
    pub agent_id: String,
    /// `host:port` the gateway agent advertised; empty for an outbound-only
    /// agent, which is reached through `relays` only.
    pub address: String,
    pub zone: String,
    /// DNS SAN of the gateway agent's certificate, checked by TLS.
    pub server_name: String,
    /// Relays the gateway agent keeps attached connections to, the endpoint
    /// agent's zone first. A direct `address` is preferred when there is one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<RelayTarget>,
}

/// A relay (`trellis relay`): where agents meet when a gateway agent accepts
/// no inbound connection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RelayTarget {
    pub relay_id: String,
    /// `host:port` the relay advertised.
    pub address: String,
    pub zone: String,
    /// DNS SAN of the relay's certificate ([`relay_server_name`]), checked by TLS.
    pub server_name: String,
}

/// The config of one relay, fetched with a long-poll
/// (`GET /v1/relays/self/config?after=<version>`): which gateway agents it
/// serves. A relay forwards a flow only to a gateway agent listed here, and
/// only from a peer whose certificate the CA signed and that is not revoked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RelayConfig {
    /// As [`AgentConfig::version`]; never 0.
    pub version: u64,
    pub relay_id: String,
    pub zone: String,
    /// Gateway agents that may attach to this relay and receive flows through
    /// it, sorted by agent id.
    pub gateways: Vec<RelayGateway>,
    /// Lower-case hex SHA-256 of certificates of deleted agents that have not
    /// expired yet: refused even though the CA signed them. A set: the relay
    /// looks up every connecting agent, and the list grows with every deleted
    /// agent until its certificate expires.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty", deserialize_with = "lower_case_set")]
    pub revoked_certs: BTreeSet<String>,
}

impl RelayConfig {
    /// Whether the certificate with SHA-256 `cert_sha256` (hex, either case) was revoked.
    pub fn is_revoked(&self, cert_sha256: &str) -> bool {
        revoked(&self.revoked_certs, cert_sha256)
    }

    /// The entry of gateway agent `agent_id` (binary search: `gateways` is sorted).
    pub fn gateway(&self, agent_id: &str) -> Option<&RelayGateway> {
        self.gateways.binary_search_by(|g| g.agent_id.as_str().cmp(agent_id)).ok().map(|i| &self.gateways[i])
    }
}

/// A gateway agent a relay serves, as its certificate names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RelayGateway {
    pub agent_id: String,
    pub account_id: String,
    pub vpc_id: String,
}

/// The DNS SAN the control plane's CA puts in an agent's certificate.
pub fn agent_server_name(agent_id: &str) -> String {
    format!("{agent_id}.agents.trellis.internal")
}

/// The DNS SAN the control plane's CA puts in a relay's certificate.
pub fn relay_server_name(relay_id: &str) -> String {
    format!("{relay_id}.relays.trellis.internal")
}

/// The URI SAN the control plane's CA writes in a relay's certificate.
pub fn relay_identity_uri(relay_id: &str) -> String {
    format!("trellis:relay/{relay_id}")
}

/// Who an agent certificate names: the URI SAN the control plane's CA writes
/// at enrollment (`trellis:agent/<agent>?account=<account>&vpc=<vpc>`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AgentIdentityUri {
    pub agent_id: String,
    pub account_id: String,
    pub vpc_id: String,
}

impl AgentIdentityUri {
    const PREFIX: &'static str = "trellis:agent/";

    /// The URI SAN text.
    pub fn to_uri(&self) -> String {
        format!("{}{}?account={}&vpc={}", Self::PREFIX, self.agent_id, self.account_id, self.vpc_id)
    }

    /// Parses a URI SAN written by [`AgentIdentityUri::to_uri`]; `None` for anything else.
    pub fn parse(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(Self::PREFIX)?;
        let (agent_id, query) = rest.split_once('?')?;
        let (account, vpc) = query.split_once('&')?;
        let account_id = account.strip_prefix("account=")?;
        let vpc_id = vpc.strip_prefix("vpc=")?;
        let plain =
            |s: &str| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        (plain(agent_id) && plain(account_id) && plain(vpc_id)).then(|| Self {
            agent_id: agent_id.to_string(),
            account_id: account_id.to_string(),
            vpc_id: vpc_id.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_config_looks_revoked_certificates_up_in_either_case_and_keeps_its_wire_form() {
        let json = format!(
            r#"{{"version":3,"relayId":"r","zone":"z","gateways":[],"revokedCerts":["{}","{}"]}}"#,
            "cd".repeat(32),
            "ab".repeat(32)
        );
        let config: RelayConfig = serde_json::from_str(&json).unwrap();
        assert!(config.is_revoked(&"ab".repeat(32)));
        assert!(config.is_revoked(&"CD".repeat(32)));
        assert!(!config.is_revoked(&"ef".repeat(32)));
        let back = serde_json::to_value(&config).unwrap();
        assert_eq!(
            back["revokedCerts"],
            serde_json::json!(["ab".repeat(32), "cd".repeat(32)]),
            "sorted, an array as before"
        );
        let none = serde_json::to_value(RelayConfig::default()).unwrap();
        assert!(none.get("revokedCerts").is_none());
    }

    #[test]
    fn agent_identity_uris_round_trip_and_refuse_anything_else() {
        let id = AgentIdentityUri {
            agent_id: "agent-0123456789abcdef0".into(),
            account_id: "acct-000000000001".into(),
            vpc_id: "vpc-0123456789abcdef0".into(),
        };
        assert_eq!(
            id.to_uri(),
            "trellis:agent/agent-0123456789abcdef0?account=acct-000000000001&vpc=vpc-0123456789abcdef0"
        );
        assert_eq!(AgentIdentityUri::parse(&id.to_uri()), Some(id));
        for bad in [
            "",
            "https://example.com",
            "trellis:agent/a?vpc=v&account=x",
            "trellis:agent/a?account=x",
            "trellis:agent/?account=x&vpc=v",
            "trellis:agent/a b?account=x&vpc=v",
            "trellis:agent/a?account=x&vpc=v&extra=1",
        ] {
            assert_eq!(AgentIdentityUri::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn consumers_are_found_in_sorted_and_hand_written_lists() {
        let vpc = |a: &str, v: &str| ConsumerVpc { account_id: a.into(), vpc_id: v.into() };
        let mut role = GatewayRole {
            consumers: (0..50).map(|i| vpc(&format!("acct-{i:03}"), &format!("vpc-{i:03}"))).collect(),
            ..GatewayRole::default()
        };
        assert!(role.knows_consumer("acct-017", "vpc-017"));
        assert!(!role.knows_consumer("acct-017", "vpc-018"), "another account's VPC");
        assert!(!role.knows_consumer("acct-999", "vpc-017"));
        role.consumers.reverse();
        assert!(role.knows_consumer("acct-017", "vpc-017"), "unsorted lists still work");
        assert!(!role.knows_consumer("acct-017", "vpc-018"));
    }

    #[test]
    fn allowed_endpoints_are_found_by_binary_search() {
        let resource = GatewayResource {
            resource_configuration_id: "rcfg-1".into(),
            resource_gateway_id: "rgw-1".into(),
            owner_account_id: "acct-o".into(),
            target: Target::Ip { address: "10.0.0.5".parse().unwrap() },
            port_ranges: vec![],
            allowed: ["vpce-a", "vpce-b", "vpce-c"]
                .iter()
                .enumerate()
                .map(|(i, id)| AllowedEndpoint { vpc_endpoint_id: id.to_string(), consumer: i as u32 })
                .collect(),
            proxy_protocol: false,
            limits: None,
        };
        assert_eq!(resource.allowed_endpoint("vpce-b").map(|a| a.consumer), Some(1));
        assert_eq!(resource.allowed_endpoint("vpce-d"), None);
    }

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
