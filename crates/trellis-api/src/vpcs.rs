//! VPCs: networks of an account where agents run.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_model::Vpc;
use trellis_model::schema::{ClientToken, Name};

use crate::list::{ListQuery, Page};
use crate::route::Caller::Account;
use crate::route::{Route, RouteInfo, delete, get, patch, post};

const TAG: &str = "vpcs";

pub const CREATE: Route<CreateVpc, (), Vpc> = post(TAG, "/v1/vpcs", Account, "Create a VPC").body().created();
pub const LIST: Route<(), ListQuery, Page<Vpc>> = get(TAG, "/v1/vpcs", Account, "List VPCs").query().json();
pub const GET: Route<(), (), Vpc> = get(TAG, "/v1/vpcs/{id}", Account, "Read a VPC").json();
pub const UPDATE: Route<UpdateVpc, (), Vpc> = patch(TAG, "/v1/vpcs/{id}", Account, "Rename a VPC").body().json();
pub const DELETE: Route = delete(TAG, "/v1/vpcs/{id}", Account, "Delete a VPC without subnets, gateways or endpoints");

pub const ROUTES: &[RouteInfo] = &[CREATE.info, LIST.info, GET.info, UPDATE.info, DELETE.info];

/// `POST /v1/vpcs`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateVpc {
    #[schemars(with = "Name")]
    pub name: String,
    /// Idempotency token: a repeated create with the same token answers the first one's VPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<ClientToken>")]
    pub client_token: Option<String>,
}

/// `PATCH /v1/vpcs/{id}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateVpc {
    /// The new name; absent keeps the old one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Name>")]
    pub name: Option<String>,
}
