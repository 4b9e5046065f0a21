//! VPC endpoints: a consumer's addresses and DNS names for a resource
//! configuration shared with it (`Resource`) or an endpoint service that
//! allows it (`Interface`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_model::schema::{ClientToken, DomainName, IdOrArn};
use trellis_model::{ResourceConfigurationId, SubnetId, VpcEndpoint, VpcId};

use crate::list::{Page, VpcListQuery};
use crate::route::Caller::Account;
use crate::route::{Route, RouteInfo, delete, get, post};

const TAG: &str = "vpcendpoints";

pub const CREATE: Route<CreateEndpoint, (), VpcEndpoint> =
    post(TAG, "/v1/vpcendpoints", Account, "Create a Resource or Interface VPC endpoint").body().created();
pub const LIST: Route<(), VpcListQuery, Page<VpcEndpoint>> =
    get(TAG, "/v1/vpcendpoints", Account, "List VPC endpoints (?vpcId=)").query().json();
pub const GET: Route<(), (), VpcEndpoint> = get(TAG, "/v1/vpcendpoints/{id}", Account, "Read a VPC endpoint").json();
pub const DELETE: Route = delete(TAG, "/v1/vpcendpoints/{id}", Account, "Delete a VPC endpoint and free its addresses");

pub const ROUTES: &[RouteInfo] = &[CREATE.info, LIST.info, GET.info, DELETE.info];

/// `POST /v1/vpcendpoints`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateEndpoint {
    /// `Resource` (a shared resource configuration) or `Interface` (an endpoint service).
    #[schemars(extend("enum" = ["Resource", "Interface"]))]
    pub vpc_endpoint_type: String,
    #[schemars(with = "VpcId")]
    pub vpc_id: String,
    /// Subnets of that VPC to get addresses in, one per zone.
    #[schemars(with = "Vec<SubnetId>", length(min = 1), extend("uniqueItems" = true))]
    pub subnet_ids: Vec<String>,
    /// For `Resource`: the resource configuration (ARN or id) shared with the account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<IdOrArn<ResourceConfigurationId>>")]
    pub resource_configuration_arn: Option<String>,
    /// For `Interface`: the service's name (`trellis.vpce.<region>.vpce-svc-…`) or id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// Also answer the configuration's custom domain name, or the service's private DNS name.
    #[serde(default)]
    pub private_dns_enabled: bool,
    /// `VERIFIED_DOMAINS_ONLY` (default), `ALL_DOMAINS` or `SPECIFIED_DOMAINS_ONLY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["VERIFIED_DOMAINS_ONLY", "ALL_DOMAINS", "SPECIFIED_DOMAINS_ONLY", null]))]
    pub private_dns_preference: Option<String>,
    /// The domains of `SPECIFIED_DOMAINS_ONLY` (at most 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Vec<DomainName>>")]
    pub private_dns_specified_domains: Option<Vec<String>>,
    /// Idempotency token: a repeated create with the same token answers the first one's endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<ClientToken>")]
    pub client_token: Option<String>,
}
