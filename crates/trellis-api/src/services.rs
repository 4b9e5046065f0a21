//! Endpoint services (`vpce-svc-`): a provider publishes a service (targets
//! behind one name, balanced and health-checked by its agents), allows
//! principals, and accepts or rejects the consumers' Interface endpoints.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_model::schema::{ClientToken, DomainName, Name};
use trellis_model::{
    AccountId, EndpointState, ServicePort, SubnetId, Timestamp, VpcEndpointId, VpcEndpointService,
    VpcEndpointServiceId, VpcId,
};

use crate::configurations::UsageItem;
use crate::list::{ListQuery, Page};
use crate::route::Caller::Account;
use crate::route::{Route, RouteInfo, delete, get, patch, post};

const TAG: &str = "vpcendpointservices";

pub const CREATE: Route<CreateService, (), VpcEndpointService> =
    post(TAG, "/v1/vpcendpointservices", Account, "Publish an endpoint service").body().created();
pub const LIST: Route<(), ListQuery, Page<VpcEndpointService>> =
    get(TAG, "/v1/vpcendpointservices", Account, "List own endpoint services").query().json();
pub const AVAILABLE: Route<(), ListQuery, Page<AvailableService>> =
    get(TAG, "/v1/vpcendpointservices/available", Account, "List the endpoint services this account may connect to")
        .query()
        .json();
pub const GET: Route<(), (), VpcEndpointService> =
    get(TAG, "/v1/vpcendpointservices/{id}", Account, "Read an endpoint service, with its targets' health").json();
pub const UPDATE: Route<UpdateService, (), VpcEndpointService> =
    patch(TAG, "/v1/vpcendpointservices/{id}", Account, "Change an endpoint service's settings").body().json();
pub const DELETE: Route =
    delete(TAG, "/v1/vpcendpointservices/{id}", Account, "Delete an endpoint service that has no active endpoints");
pub const PERMISSIONS: Route<(), (), Permissions> =
    get(TAG, "/v1/vpcendpointservices/{id}/permissions", Account, "Read the allowed principals").json();
pub const MODIFY_PERMISSIONS: Route<ModifyPermissions, (), Permissions> = post(
    TAG,
    "/v1/vpcendpointservices/{id}/permissions",
    Account,
    "Add or remove allowed principals (removing one revokes its endpoints)",
)
.body()
.json();
pub const CONNECTIONS: Route<(), ListQuery, Page<Connection>> =
    get(TAG, "/v1/vpcendpointservices/{id}/connections", Account, "List the endpoints connected to the service")
        .query()
        .json();
pub const ACCEPT: Route<ConnectionIds, (), ConnectionOutcome> =
    post(TAG, "/v1/vpcendpointservices/{id}/connections/accept", Account, "Accept endpoints waiting for acceptance")
        .body()
        .json();
pub const REJECT: Route<ConnectionIds, (), ConnectionOutcome> =
    post(TAG, "/v1/vpcendpointservices/{id}/connections/reject", Account, "Reject (and cut off) endpoints")
        .body()
        .json();
pub const USAGE: Route<(), (), ServiceUsage> =
    get(TAG, "/v1/vpcendpointservices/{id}/usage", Account, "Usage per consumer account and endpoint").json();

pub const ROUTES: &[RouteInfo] = &[
    CREATE.info,
    LIST.info,
    AVAILABLE.info,
    GET.info,
    UPDATE.info,
    DELETE.info,
    PERMISSIONS.info,
    MODIFY_PERMISSIONS.info,
    CONNECTIONS.info,
    ACCEPT.info,
    REJECT.info,
    USAGE.info,
];

/// One target: `{"ipAddress": ...}` or `{"domainName": ...}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetInput {
    /// An address the provider's agents dial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<std::net::IpAddr>")]
    pub ip_address: Option<String>,
    /// A name the provider's agents resolve in the provider's network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<DomainName>")]
    pub domain_name: Option<String>,
}

/// A port consumers connect to, and the targets' port (default the same).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortInput {
    #[schemars(range(min = 1, max = 65535))]
    pub port: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub target_port: Option<u32>,
}

/// Health check settings; absent fields keep their defaults (TCP every 30 s,
/// 10 s timeout, healthy after 5 passes, unhealthy after 2 failures).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheckInput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["TCP", "HTTP", null]))]
    pub protocol: Option<String>,
    /// The port to check (default each mapping's target port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u32>,
    /// For HTTP: the path to GET (default `/`); 2xx and 3xx pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 300))]
    pub interval_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 120))]
    pub timeout_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 10))]
    pub healthy_threshold_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 10))]
    pub unhealthy_threshold_count: Option<u32>,
}

/// What one consumer account may use, on each of the provider's agents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsInput {
    /// Concurrent connections; the next one is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<u32>,
    /// Bandwidth each way, paced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 64000))]
    pub max_bits_per_second: Option<u64>,
}

/// `POST /v1/vpcendpointservices`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateService {
    #[schemars(with = "Name")]
    pub name: String,
    /// The provider's VPC.
    #[schemars(with = "VpcId")]
    pub vpc_id: String,
    /// Subnets of that VPC whose agents (started with `--advertise`) run the service.
    #[schemars(with = "Vec<SubnetId>", length(min = 1), extend("uniqueItems" = true))]
    pub subnet_ids: Vec<String>,
    #[schemars(length(min = 1, max = 64))]
    pub targets: Vec<TargetInput>,
    #[schemars(length(min = 1, max = 32))]
    pub ports: Vec<PortInput>,
    /// Whether the provider accepts each endpoint (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acceptance_required: Option<bool>,
    /// `LEAST_CONNECTIONS` (default), `ROUND_ROBIN` or `SOURCE_HASH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["LEAST_CONNECTIONS", "ROUND_ROBIN", "SOURCE_HASH", null]))]
    pub load_balancing: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckInput>,
    /// `NONE` (default) or `V2`: a PROXY v2 header before the first byte to each target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["NONE", "V2", null]))]
    pub proxy_protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_consumer_limits: Option<LimitsInput>,
    /// A name under a verified domain of the account, answered in consumers' VPCs that enable private DNS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<DomainName>")]
    pub private_dns_name: Option<String>,
    /// Idempotency token: a repeated create with the same token answers the first one's service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<ClientToken>")]
    pub client_token: Option<String>,
}

/// `PATCH /v1/vpcendpointservices/{id}`: the fields given replace the service's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateService {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub targets: Option<Vec<TargetInput>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub ports: Option<Vec<PortInput>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acceptance_required: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["LEAST_CONNECTIONS", "ROUND_ROBIN", "SOURCE_HASH", null]))]
    pub load_balancing: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckInput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["NONE", "V2", null]))]
    pub proxy_protocol: Option<String>,
    /// Replaces the limits; `{}` removes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_consumer_limits: Option<LimitsInput>,
    /// Replaces the private DNS name; `""` removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_dns_name: Option<String>,
}

/// `POST /v1/vpcendpointservices/{id}/permissions`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModifyPermissions {
    /// Account ids, or `*` for any account.
    #[serde(default)]
    #[schemars(length(max = 5000), extend("uniqueItems" = true))]
    pub add_allowed_principals: Vec<String>,
    /// Principals to remove; their accounts' endpoints stop working within seconds.
    #[serde(default)]
    #[schemars(length(max = 5000), extend("uniqueItems" = true))]
    pub remove_allowed_principals: Vec<String>,
}

/// The principals allowed to see and connect to a service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Permissions {
    pub service_id: String,
    pub allowed_principals: Vec<String>,
}

/// A service as a consumer allowed to use it sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AvailableService {
    pub service_id: VpcEndpointServiceId,
    /// What `POST /v1/vpcendpoints` takes as `serviceName`.
    pub service_name: String,
    pub name: String,
    pub owner: AccountId,
    /// The ports an endpoint listens on.
    pub ports: Vec<u16>,
    /// Zones the service runs in; an endpoint needs a subnet in one of them.
    pub zones: Vec<String>,
    pub acceptance_required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_dns_name: Option<String>,
}

impl AvailableService {
    pub fn ports_of(ports: &[ServicePort]) -> Vec<u16> {
        ports.iter().map(|p| p.port).collect()
    }
}

/// One endpoint connected (or asking to connect) to a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    pub vpc_endpoint_id: VpcEndpointId,
    pub vpc_endpoint_owner: AccountId,
    pub vpc_endpoint_state: EndpointState,
    pub vpc_id: VpcId,
    pub created_at: Timestamp,
}

/// `POST .../connections/accept|reject`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionIds {
    #[schemars(with = "Vec<VpcEndpointId>", length(min = 1, max = 1000), extend("uniqueItems" = true))]
    pub vpc_endpoint_ids: Vec<String>,
}

/// The endpoints an accept or reject could not move, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionOutcome {
    pub unsuccessful: Vec<UnsuccessfulItem>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnsuccessfulItem {
    pub vpc_endpoint_id: String,
    pub error: String,
}

/// `GET /v1/vpcendpointservices/{id}/usage`: per consumer account and endpoint,
/// summed over the provider's agents and their restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceUsage {
    pub service_id: String,
    /// `resourceConfigurationId` of each item is the service id.
    pub items: Vec<UsageItem>,
}
