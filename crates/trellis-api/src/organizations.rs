//! Organizations (admin only): accounts in one organization share without invitations.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_model::Organization;
use trellis_model::schema::{ClientToken, Name};

use crate::list::{ListQuery, Page};
use crate::route::Caller::Admin;
use crate::route::{Route, RouteInfo, get, post};

const TAG: &str = "organizations";

pub const CREATE: Route<CreateOrganization, (), Organization> =
    post(TAG, "/v1/organizations", Admin, "Create an organization").body().created();
pub const LIST: Route<(), ListQuery, Page<Organization>> =
    get(TAG, "/v1/organizations", Admin, "List organizations").query().json();
pub const GET: Route<(), (), Organization> = get(TAG, "/v1/organizations/{id}", Admin, "Read an organization").json();

pub const ROUTES: &[RouteInfo] = &[CREATE.info, LIST.info, GET.info];

/// `POST /v1/organizations`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateOrganization {
    #[schemars(with = "Name")]
    pub name: String,
    /// Idempotency token: a repeated create with the same token answers the first one's organization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<ClientToken>")]
    pub client_token: Option<String>,
}
