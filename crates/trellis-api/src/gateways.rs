//! Resource gateways: points of ingress into an owner's VPC, in one or more of its subnets.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_model::schema::{ClientToken, IdOrArn, Name};
use trellis_model::{IpAddressType, ResourceGateway, SubnetId, VpcId};

use crate::list::{ListQuery, Page};
use crate::route::Caller::Account;
use crate::route::{Route, RouteInfo, delete, get, post};

const TAG: &str = "resourcegateways";

pub const CREATE: Route<CreateGateway, (), ResourceGateway> =
    post(TAG, "/v1/resourcegateways", Account, "Create a resource gateway").body().created();
pub const LIST: Route<(), ListQuery, Page<ResourceGateway>> =
    get(TAG, "/v1/resourcegateways", Account, "List resource gateways").query().json();
pub const GET: Route<(), (), ResourceGateway> =
    get(TAG, "/v1/resourcegateways/{id}", Account, "Read a resource gateway").json();
pub const DELETE: Route = delete(TAG, "/v1/resourcegateways/{id}", Account, "Delete an unused resource gateway");

pub const ROUTES: &[RouteInfo] = &[CREATE.info, LIST.info, GET.info, DELETE.info];

/// `POST /v1/resourcegateways`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateGateway {
    #[schemars(with = "Name")]
    pub name: String,
    /// The VPC, by id or ARN.
    #[schemars(with = "IdOrArn<VpcId>")]
    pub vpc_identifier: String,
    /// Subnets (zones) of that VPC whose agents serve the gateway; at least one.
    #[schemars(with = "Vec<SubnetId>", length(min = 1), extend("uniqueItems" = true))]
    pub subnet_ids: Vec<String>,
    /// IPV4 (the default; the only type supported so far).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address_type: Option<IpAddressType>,
    /// Idempotency token: a repeated create with the same token answers the first one's gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<ClientToken>")]
    pub client_token: Option<String>,
}
