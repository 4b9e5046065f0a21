//! Resource configurations (SINGLE, GROUP, CHILD) behind a resource gateway,
//! and the usage of them that gateway agents report.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_model::schema::{ClientToken, DomainName, IdOrArn, Name};
use trellis_model::{IpAddressType, PortRange, ResourceConfiguration, ResourceConfigurationId, ResourceGatewayId};

use crate::list::{ListQuery, Page};
use crate::route::Caller::Account;
use crate::route::{Route, RouteInfo, delete, get, patch, post};
use crate::services::LimitsInput;

const TAG: &str = "resourceconfigurations";

pub const CREATE: Route<CreateConfiguration, (), ResourceConfiguration> =
    post(TAG, "/v1/resourceconfigurations", Account, "Create a SINGLE, GROUP or CHILD resource configuration")
        .body()
        .created();
pub const LIST: Route<(), ListQuery, Page<ResourceConfiguration>> =
    get(TAG, "/v1/resourceconfigurations", Account, "List own and shared resource configurations").query().json();
pub const GET: Route<(), (), ResourceConfiguration> =
    get(TAG, "/v1/resourceconfigurations/{id}", Account, "Read a resource configuration").json();
pub const UPDATE: Route<UpdateConfiguration, (), ResourceConfiguration> =
    patch(TAG, "/v1/resourceconfigurations/{id}", Account, "Change port ranges or definition").body().json();
pub const DELETE: Route = delete(TAG, "/v1/resourceconfigurations/{id}", Account, "Delete a resource configuration");
pub const USAGE: Route<(), (), UsageReport> =
    get(TAG, "/v1/resourceconfigurations/{id}/usage", Account, "Usage per consumer account and endpoint").json();

pub const ROUTES: &[RouteInfo] = &[CREATE.info, LIST.info, GET.info, UPDATE.info, DELETE.info, USAGE.info];

/// `{"ipAddress": ...}`: a resource at an IP address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpInput {
    /// The address the gateway agent dials, in the owner's network.
    #[schemars(with = "std::net::IpAddr")]
    pub ip_address: String,
}

/// `{"domainName": ..., "ipAddressType": ...}`: a resource at a DNS name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DnsInput {
    /// Resolved by the gateway agent in the owner's network.
    #[schemars(with = "DomainName")]
    pub domain_name: String,
    /// The address family the gateway resolves the name to (default IPV4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address_type: Option<IpAddressType>,
}

/// `{"ipResource": {...}}` or `{"dnsResource": {...}}`: exactly one of the two.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DefinitionInput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_resource: Option<IpInput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_resource: Option<DnsInput>,
}

/// `POST /v1/resourceconfigurations`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateConfiguration {
    #[schemars(with = "Name")]
    pub name: String,
    /// SINGLE (one resource), GROUP (a set of CHILD resources shared together) or CHILD.
    #[serde(rename = "type")]
    #[schemars(extend("enum" = ["SINGLE", "GROUP", "CHILD"]))]
    pub config_type: String,
    /// The gateway (id or ARN) of a SINGLE or GROUP; a CHILD inherits its GROUP's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<IdOrArn<ResourceGatewayId>>")]
    pub resource_gateway_identifier: Option<String>,
    /// The GROUP (id or ARN) of a CHILD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<IdOrArn<ResourceConfigurationId>>")]
    pub resource_configuration_group_identifier: Option<String>,
    /// Where the resource is (SINGLE, CHILD); a GROUP has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_configuration_definition: Option<DefinitionInput>,
    /// Ports of the resource (required for SINGLE and GROUP; a CHILD's default to, and lie within, its GROUP's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Vec<PortRange>>", length(min = 1))]
    pub port_ranges: Option<Vec<String>>,
    /// TCP, the only protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["TCP", null]))]
    pub protocol: Option<String>,
    /// The name consumers' DNS answers for the resource when their endpoint enables private DNS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<DomainName>")]
    pub custom_domain_name: Option<String>,
    /// `NONE` (default) or `V2`: the gateway sends a PROXY v2 header (consumer account, VPC,
    /// endpoint) to the resource before the first byte. A CHILD has its own setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["NONE", "V2", null]))]
    pub proxy_protocol: Option<String>,
    /// What one consumer account may use on each gateway agent. A CHILD has its own limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_consumer_limits: Option<LimitsInput>,
    /// Idempotency token: a repeated create with the same token answers the first one's configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<ClientToken>")]
    pub client_token: Option<String>,
}

/// `PATCH /v1/resourceconfigurations/{id}`: what is given replaces what was.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateConfiguration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Vec<PortRange>>", length(min = 1))]
    pub port_ranges: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_configuration_definition: Option<DefinitionInput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["NONE", "V2", null]))]
    pub proxy_protocol: Option<String>,
    /// Replaces the limits; `{}` removes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_consumer_limits: Option<LimitsInput>,
}

/// Usage of one resource by one endpoint, summed over agents and their restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageItem {
    pub consumer_account_id: String,
    pub vpc_endpoint_id: String,
    pub resource_configuration_id: String,
    /// Open now (counted from agents that are online).
    pub active_connections: u64,
    pub total_connections: u64,
    pub rejected_connections: u64,
    /// Bytes from the consumer to the resource.
    pub bytes_in: u64,
    /// Bytes from the resource to the consumer.
    pub bytes_out: u64,
}

/// `GET /v1/resourceconfigurations/{id}/usage`: per consumer account, endpoint and resource.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageReport {
    pub resource_configuration_id: String,
    pub items: Vec<UsageItem>,
}
