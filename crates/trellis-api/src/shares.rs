//! Resource shares: an owner shares SINGLE or GROUP configurations with accounts.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_model::schema::{ClientToken, IdOrArn, Name};
use trellis_model::{AccountId, ResourceConfigurationId, ResourceShare};

use crate::list::{ListQuery, Page};
use crate::route::Caller::Account;
use crate::route::{Route, RouteInfo, delete, get, post};

const TAG: &str = "resourceshares";

pub const CREATE: Route<CreateShare, (), ResourceShare> =
    post(TAG, "/v1/resourceshares", Account, "Share resource configurations with accounts")
        .body()
        .created()
        .or(&[(429, "the account creates shares faster than its rate limit; the message says when to retry")]);
pub const LIST: Route<(), ListQuery, Page<ResourceShare>> =
    get(TAG, "/v1/resourceshares", Account, "List own resource shares").query().json();
pub const GET: Route<(), (), ResourceShare> =
    get(TAG, "/v1/resourceshares/{id}", Account, "Read a resource share").json();
pub const DELETE: Route = delete(TAG, "/v1/resourceshares/{id}", Account, "Delete (revoke) a resource share");

pub const ROUTES: &[RouteInfo] = &[CREATE.info, LIST.info, GET.info, DELETE.info];

/// `POST /v1/resourceshares`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateShare {
    #[schemars(with = "Name")]
    pub name: String,
    /// ARNs (or ids) of the owner's SINGLE or GROUP configurations.
    #[serde(default)]
    #[schemars(with = "Vec<IdOrArn<ResourceConfigurationId>>", extend("uniqueItems" = true))]
    pub resource_arns: Vec<String>,
    /// Accounts to share with (at most 5000).
    #[serde(default)]
    #[schemars(with = "Vec<AccountId>", length(max = 5000), extend("uniqueItems" = true))]
    pub principals: Vec<String>,
    /// Idempotency token: a repeated create with the same token answers the first one's share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<ClientToken>")]
    pub client_token: Option<String>,
}
