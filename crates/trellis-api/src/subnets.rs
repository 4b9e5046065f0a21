//! Subnets: one zone of a VPC with the address pool its endpoints draw from.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_model::schema::{ClientToken, Name, Zone};
use trellis_model::{AddressPool, Subnet, VpcId};

use crate::list::{Page, VpcListQuery};
use crate::route::Caller::Account;
use crate::route::{Route, RouteInfo, delete, get, post};

const TAG: &str = "subnets";

pub const CREATE: Route<CreateSubnet, (), Subnet> =
    post(TAG, "/v1/subnets", Account, "Create a subnet (one zone and address pool of a VPC)").body().created();
pub const LIST: Route<(), VpcListQuery, Page<Subnet>> =
    get(TAG, "/v1/subnets", Account, "List subnets (?vpcId=)").query().json();
pub const GET: Route<(), (), Subnet> = get(TAG, "/v1/subnets/{id}", Account, "Read a subnet").json();
pub const DELETE: Route = delete(TAG, "/v1/subnets/{id}", Account, "Delete an unused subnet");

pub const ROUTES: &[RouteInfo] = &[CREATE.info, LIST.info, GET.info, DELETE.info];

/// `POST /v1/subnets`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSubnet {
    #[schemars(with = "VpcId")]
    pub vpc_id: String,
    /// One subnet per zone per VPC.
    #[schemars(with = "Zone")]
    pub zone: String,
    /// The pool endpoint addresses in this zone come from.
    #[schemars(with = "AddressPool")]
    pub cidr_block: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Name>")]
    pub name: Option<String>,
    /// Idempotency token: a repeated create with the same token answers the first one's subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<ClientToken>")]
    pub client_token: Option<String>,
}
