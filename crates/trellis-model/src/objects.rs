//! The stored objects, serialized exactly as the API returns them (camelCase).
//!
//! Constructors take `region` (for ARNs) and `now`; they never draw ids or
//! read the clock themselves.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::arn::{Arn, kinds};
use crate::ids::*;
use crate::pool::AddressPool;
use crate::ports::PortRange;
use crate::status::*;
use crate::time::Timestamp;

fn arn(kind: (&str, &str), region: &str, account: &str, id: &str) -> String {
    Arn::new(kind, region, account, id).to_string()
}

/// A tenant. API keys belong to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Account {
    pub id: AccountId,
    pub account_id: AccountId,
    pub arn: String,
    pub name: String,
    pub organization_id: Option<OrganizationId>,
    pub created_at: Timestamp,
}

impl Account {
    pub fn new(
        id: AccountId,
        name: String,
        organization_id: Option<OrganizationId>,
        region: &str,
        now: Timestamp,
    ) -> Self {
        Self {
            arn: arn(kinds::ACCOUNT, region, id.as_str(), id.as_str()),
            account_id: id.clone(),
            id,
            name,
            organization_id,
            created_at: now,
        }
    }
}

/// An API key, stored by the SHA-256 (lowercase hex) of the secret; the secret is never stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKey {
    /// Lowercase hex SHA-256 of the key.
    pub id: String,
    /// `None` for the administrator key.
    pub account_id: Option<AccountId>,
    pub created_at: Timestamp,
}

/// Accounts whose shares to each other need no invitation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Organization {
    pub id: OrganizationId,
    pub organization_id: OrganizationId,
    pub arn: String,
    pub name: String,
    pub created_at: Timestamp,
}

impl Organization {
    pub fn new(id: OrganizationId, name: String, region: &str, now: Timestamp) -> Self {
        Self {
            arn: arn(kinds::ORGANIZATION, region, "", id.as_str()),
            organization_id: id.clone(),
            id,
            name,
            created_at: now,
        }
    }
}

/// A network where agents run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Vpc {
    pub id: VpcId,
    pub vpc_id: VpcId,
    pub arn: String,
    pub account_id: AccountId,
    pub name: String,
    pub created_at: Timestamp,
}

impl Vpc {
    pub fn new(id: VpcId, account_id: AccountId, name: String, region: &str, now: Timestamp) -> Self {
        Self {
            arn: arn(kinds::VPC, region, account_id.as_str(), id.as_str()),
            vpc_id: id.clone(),
            id,
            account_id,
            name,
            created_at: now,
        }
    }
}

/// One zone of a VPC, with the address pool endpoints in that zone draw from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Subnet {
    pub id: SubnetId,
    pub subnet_id: SubnetId,
    pub arn: String,
    pub account_id: AccountId,
    pub vpc_id: VpcId,
    pub zone: String,
    pub cidr_block: AddressPool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Free pool addresses; computed from the endpoints when the API answers.
    #[serde(default)]
    pub available_ip_address_count: u64,
    pub created_at: Timestamp,
}

impl Subnet {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: SubnetId,
        account_id: AccountId,
        vpc_id: VpcId,
        zone: String,
        cidr_block: AddressPool,
        name: Option<String>,
        region: &str,
        now: Timestamp,
    ) -> Self {
        Self {
            arn: arn(kinds::SUBNET, region, account_id.as_str(), id.as_str()),
            subnet_id: id.clone(),
            id,
            account_id,
            vpc_id,
            zone,
            available_ip_address_count: cidr_block.usable_count(),
            cidr_block,
            name,
            created_at: now,
        }
    }
}

/// IP address family of a gateway or a DNS resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum IpAddressType {
    #[default]
    Ipv4,
    Ipv6,
    Dualstack,
}

/// Point of ingress into the owner's VPC, in one or more of its subnets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ResourceGateway {
    pub id: ResourceGatewayId,
    pub arn: String,
    pub account_id: AccountId,
    pub name: String,
    pub status: GatewayStatus,
    pub vpc_identifier: VpcId,
    pub subnet_ids: Vec<SubnetId>,
    pub ip_address_type: IpAddressType,
    pub created_at: Timestamp,
}

impl ResourceGateway {
    /// A gateway as created: `CREATE_IN_PROGRESS`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: ResourceGatewayId,
        account_id: AccountId,
        name: String,
        vpc: VpcId,
        subnet_ids: Vec<SubnetId>,
        ip_address_type: IpAddressType,
        region: &str,
        now: Timestamp,
    ) -> Self {
        Self {
            arn: arn(kinds::RESOURCE_GATEWAY, region, account_id.as_str(), id.as_str()),
            id,
            account_id,
            name,
            status: ResourceStatus::CreateInProgress,
            vpc_identifier: vpc,
            subnet_ids,
            ip_address_type,
            created_at: now,
        }
    }
}

/// SINGLE (one resource), GROUP (a set of CHILD resources shared together) or CHILD.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ConfigurationType {
    Single,
    Group,
    Child,
}

/// Transport protocol of a resource; TCP only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Protocol {
    #[default]
    Tcp,
}

/// Where a resource is: `{"ipResource": {...}}` or `{"dnsResource": {...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum ResourceDefinition {
    IpResource(IpResource),
    DnsResource(DnsResource),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct IpResource {
    pub ip_address: IpAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct DnsResource {
    /// RFC 1123 name, resolved by the gateway agent in the owner's network.
    pub domain_name: String,
    #[serde(default)]
    pub ip_address_type: IpAddressType,
}

/// A resource (SINGLE, CHILD) or a group of resources (GROUP) behind a gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ResourceConfiguration {
    pub id: ResourceConfigurationId,
    pub arn: String,
    pub account_id: AccountId,
    pub name: String,
    #[serde(rename = "type")]
    pub config_type: ConfigurationType,
    pub status: ConfigurationStatus,
    /// The gateway; a CHILD carries its GROUP's.
    pub resource_gateway_id: ResourceGatewayId,
    /// The GROUP of a CHILD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_configuration_group_id: Option<ResourceConfigurationId>,
    /// Where the resource is (SINGLE, CHILD); none for a GROUP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_configuration_definition: Option<ResourceDefinition>,
    /// Ports of the resource (SINGLE, CHILD) or ports children may use (GROUP).
    pub port_ranges: Vec<PortRange>,
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_domain_name: Option<String>,
    /// Whether gateways send a PROXY protocol v2 header to the resource first.
    #[serde(default)]
    pub proxy_protocol: crate::service::ProxyProtocol,
    /// What one consumer account may use, on each gateway agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_consumer_limits: Option<crate::service::ConsumerLimits>,
    pub created_at: Timestamp,
}

impl ResourceConfiguration {
    pub fn arn_for(region: &str, account_id: &AccountId, id: &ResourceConfigurationId) -> String {
        arn(kinds::RESOURCE_CONFIGURATION, region, account_id.as_str(), id.as_str())
    }

    /// Whether this configuration is a resource an endpoint can reach (SINGLE or CHILD).
    pub fn is_resource(&self) -> bool {
        self.config_type != ConfigurationType::Group
    }
}

/// Shares resource configurations with accounts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ResourceShare {
    pub id: ResourceShareId,
    pub arn: String,
    pub resource_share_arn: String,
    pub account_id: AccountId,
    pub name: String,
    pub status: ShareStatus,
    /// ARNs of SINGLE or GROUP resource configurations of the owner.
    pub resource_arns: Vec<String>,
    pub principals: Vec<AccountId>,
    pub created_at: Timestamp,
}

impl ResourceShare {
    pub fn new(
        id: ResourceShareId,
        account_id: AccountId,
        name: String,
        resource_arns: Vec<String>,
        principals: Vec<AccountId>,
        region: &str,
        now: Timestamp,
    ) -> Self {
        let share_arn = arn(kinds::RESOURCE_SHARE, region, account_id.as_str(), id.as_str());
        Self {
            arn: share_arn.clone(),
            resource_share_arn: share_arn,
            id,
            account_id,
            name,
            status: ShareStatus::Active,
            resource_arns,
            principals,
            created_at: now,
        }
    }

    /// Ids of the shared configurations (ARNs that do not parse are skipped).
    pub fn resource_configuration_ids(&self) -> Vec<ResourceConfigurationId> {
        self.resource_arns
            .iter()
            .filter_map(|a| a.parse::<Arn>().ok()?.id_of(kinds::RESOURCE_CONFIGURATION).ok())
            .collect()
    }

    pub fn shares_configuration(&self, id: &ResourceConfigurationId) -> bool {
        self.resource_configuration_ids().contains(id)
    }
}

/// An offer of a share to one account outside the owner's organization.
/// Owned (in the store) by the receiver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ResourceShareInvitation {
    pub id: ResourceShareInvitationId,
    pub arn: String,
    pub resource_share_invitation_arn: String,
    pub resource_share_id: ResourceShareId,
    pub resource_share_arn: String,
    pub resource_share_name: String,
    pub sender_account_id: AccountId,
    pub receiver_account_id: AccountId,
    pub status: InvitationStatus,
    pub created_at: Timestamp,
}

impl ResourceShareInvitation {
    pub fn new(
        id: ResourceShareInvitationId,
        share: &ResourceShare,
        receiver: AccountId,
        region: &str,
        now: Timestamp,
    ) -> Self {
        let inv_arn = arn(kinds::RESOURCE_SHARE_INVITATION, region, receiver.as_str(), id.as_str());
        Self {
            arn: inv_arn.clone(),
            resource_share_invitation_arn: inv_arn,
            id,
            resource_share_id: share.id.clone(),
            resource_share_arn: share.resource_share_arn.clone(),
            resource_share_name: share.name.clone(),
            sender_account_id: share.account_id.clone(),
            receiver_account_id: receiver,
            status: InvitationStatus::Pending,
            created_at: now,
        }
    }
}

/// Kind of VPC endpoint: to a resource configuration, or to an endpoint service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum VpcEndpointType {
    Resource,
    Interface,
}

/// One name and address of one resource (or of the service) of an endpoint in one subnet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct DnsEntry {
    /// The resource (a `Resource` endpoint's SINGLE or CHILD); none on an `Interface` endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_configuration_id: Option<ResourceConfigurationId>,
    pub dns_name: String,
    pub ip_addresses: Vec<IpAddr>,
    pub subnet_id: SubnetId,
}

/// Which custom domain names (a resource's `customDomainName`) a consumer's
/// DNS answers for an endpoint with private DNS enabled (VPC Lattice's
/// `privateDnsPreference`). Names Trellis generates are always answered;
/// reserved names never are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PrivateDnsPreference {
    /// Only names under a domain the resource's owner verified (the default).
    #[default]
    VerifiedDomainsOnly,
    /// Any custom name, verified or not: the consumer trusts the provider.
    AllDomains,
    /// Only names under the consumer's `privateDnsSpecifiedDomains`.
    SpecifiedDomainsOnly,
}

/// A consumer's entry point, inside its VPC, to a resource configuration
/// (`Resource`) or to an endpoint service (`Interface`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct VpcEndpoint {
    pub id: VpcEndpointId,
    pub vpc_endpoint_id: VpcEndpointId,
    pub arn: String,
    pub account_id: AccountId,
    pub vpc_endpoint_type: VpcEndpointType,
    pub vpc_id: VpcId,
    pub subnet_ids: Vec<SubnetId>,
    /// `Resource` endpoints: the SINGLE or GROUP configuration and its owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_configuration_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_configuration_id: Option<ResourceConfigurationId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_configuration_owner_id: Option<AccountId>,
    /// `Interface` endpoints: the endpoint service and its provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<VpcEndpointServiceId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_owner_id: Option<AccountId>,
    pub private_dns_enabled: bool,
    #[serde(default)]
    pub private_dns_preference: PrivateDnsPreference,
    /// Domains whose custom names are answered under `SPECIFIED_DOMAINS_ONLY`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub private_dns_specified_domains: Vec<String>,
    pub state: EndpointState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// One entry per (resource, subnet), plus one per custom domain name when private DNS is on.
    pub dns_entries: Vec<DnsEntry>,
    pub created_at: Timestamp,
}

impl VpcEndpoint {
    pub fn arn_for(region: &str, account_id: &AccountId, id: &VpcEndpointId) -> String {
        arn(kinds::VPC_ENDPOINT, region, account_id.as_str(), id.as_str())
    }

    /// Every pool address this endpoint holds in `subnet`.
    pub fn addresses_in<'a>(&'a self, subnet: &'a SubnetId) -> impl Iterator<Item = IpAddr> + 'a {
        self.dns_entries.iter().filter(move |e| &e.subnet_id == subnet).flat_map(|e| e.ip_addresses.iter().copied())
    }

    /// Ids of the resources (SINGLE or CHILD configurations) this endpoint reaches.
    pub fn resource_ids(&self) -> Vec<ResourceConfigurationId> {
        let mut ids: Vec<_> = self.dns_entries.iter().filter_map(|e| e.resource_configuration_id.clone()).collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Whether `resource` is one of [`VpcEndpoint::resource_ids`] (without collecting them).
    pub fn reaches_resource(&self, resource: &ResourceConfigurationId) -> bool {
        self.dns_entries.iter().any(|e| e.resource_configuration_id.as_ref() == Some(resource))
    }

    /// Whether this is a `Resource` endpoint to `config` (a SINGLE or GROUP id).
    pub fn is_for_configuration(&self, config: &ResourceConfigurationId) -> bool {
        self.resource_configuration_id.as_ref() == Some(config)
    }

    /// The account whose resource or service this endpoint reaches.
    pub fn provider(&self) -> Option<&AccountId> {
        self.resource_configuration_owner_id.as_ref().or(self.service_owner_id.as_ref())
    }
}

/// An enrolled data-plane process in one subnet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Agent {
    pub id: AgentId,
    pub agent_id: AgentId,
    pub arn: String,
    pub account_id: AccountId,
    pub vpc_id: VpcId,
    pub subnet_id: SubnetId,
    pub zone: String,
    pub hostname: String,
    /// `host:port` where endpoint agents reach this agent's tunnel listener.
    pub advertise: Option<String>,
    /// Started with `--outbound-only`: no tunnel listener; endpoint agents
    /// reach it through the relays it attaches to.
    #[serde(default)]
    pub outbound_only: bool,
    /// Lowercase hex SHA-256 of the agent certificate's DER.
    pub cert_sha256: String,
    pub status: AgentStatus,
    pub last_seen_at: Option<Timestamp>,
    pub config_version: u64,
    pub created_at: Timestamp,
}

impl Agent {
    pub fn arn_for(region: &str, account_id: &AccountId, id: &AgentId) -> String {
        arn(kinds::AGENT, region, account_id.as_str(), id.as_str())
    }
}

/// The store reference every outbound-only agent carries, so relay configs
/// list exactly those agents (never an id: ids have a kind prefix and a hex body).
pub const OUTBOUND_ONLY_REF: &str = "outbound-only";

/// A relay (`trellis relay`): a process at a reachable address where
/// outbound-only gateway agents keep connections, so endpoint agents reach
/// them. Relays belong to whoever operates Trellis (the admin), not to an account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Relay {
    pub id: RelayId,
    pub relay_id: RelayId,
    /// The zone agents prefer it in (from its join token; empty for none).
    pub zone: String,
    pub hostname: String,
    /// `host:port` where agents reach the relay.
    pub advertise: String,
    /// Lowercase hex SHA-256 of the relay certificate's DER.
    pub cert_sha256: String,
    /// ONLINE while it reports; OFFLINE after the control plane's offline
    /// delay without a report (agents' configs then leave it out).
    pub status: AgentStatus,
    pub created_at: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        Timestamp::from_unix_seconds(1_700_000_000)
    }

    #[test]
    fn objects_serialize_with_the_api_field_names() {
        let acct = AccountId::parse("acct-123456789012").unwrap();
        let vpc = Vpc::new(VpcId::generate(&[1; 16]), acct.clone(), "prod".into(), "local", now());
        let v = serde_json::to_value(&vpc).unwrap();
        assert_eq!(v["vpcId"], v["id"]);
        assert_eq!(v["accountId"], "acct-123456789012");
        assert_eq!(v["createdAt"], "2023-11-14T22:13:20Z");
        assert!(v["arn"].as_str().unwrap().starts_with("arn:trellis:ec2:local:acct-123456789012:vpc/vpc-"));

        let cfg = ResourceConfiguration {
            id: ResourceConfigurationId::generate(&[2; 16]),
            arn: "x".into(),
            account_id: acct,
            name: "db".into(),
            config_type: ConfigurationType::Single,
            status: ResourceStatus::Active,
            resource_gateway_id: ResourceGatewayId::generate(&[3; 16]),
            resource_configuration_group_id: None,
            resource_configuration_definition: Some(ResourceDefinition::IpResource(IpResource {
                ip_address: "10.0.0.10".parse().unwrap(),
            })),
            port_ranges: vec!["5432".parse().unwrap()],
            protocol: Protocol::Tcp,
            custom_domain_name: None,
            proxy_protocol: Default::default(),
            per_consumer_limits: None,
            created_at: now(),
        };
        let v = serde_json::to_value(&cfg).unwrap();
        assert_eq!(v["type"], "SINGLE");
        assert_eq!(v["status"], "ACTIVE");
        assert_eq!(v["protocol"], "TCP");
        assert_eq!(v["portRanges"][0], "5432");
        assert_eq!(v["resourceConfigurationDefinition"]["ipResource"]["ipAddress"], "10.0.0.10");
        assert!(v.get("resourceConfigurationGroupId").is_none());
        let back: ResourceConfiguration = serde_json::from_value(v).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn dns_definitions_default_to_ipv4() {
        let d: ResourceDefinition = serde_json::from_str(r#"{"dnsResource":{"domainName":"db.internal"}}"#).unwrap();
        assert_eq!(
            d,
            ResourceDefinition::DnsResource(DnsResource {
                domain_name: "db.internal".into(),
                ip_address_type: IpAddressType::Ipv4
            })
        );
    }

    #[test]
    fn shares_list_their_configuration_ids_from_arns() {
        let acct = AccountId::parse("acct-123456789012").unwrap();
        let rcfg = ResourceConfigurationId::generate(&[5; 16]);
        let share = ResourceShare::new(
            ResourceShareId::generate(&[6; 16]),
            acct.clone(),
            "s".into(),
            vec![ResourceConfiguration::arn_for("local", &acct, &rcfg)],
            vec![],
            "local",
            now(),
        );
        assert!(share.shares_configuration(&rcfg));
        assert_eq!(share.arn, share.resource_share_arn);
        assert!(share.resource_share_arn.contains(":resource-share/rs-"));
    }
}
