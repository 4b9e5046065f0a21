//! Accounts (admin only): tenants, each created with its first API key.

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use trellis_model::schema::{ClientToken, Name};
use trellis_model::{Account, AccountId, OrganizationId};

use crate::list::{ListQuery, Page};
use crate::route::Caller::Admin;
use crate::route::{Route, RouteInfo, get, patch, post};

const TAG: &str = "accounts";

pub const CREATE: Route<CreateAccount, (), AccountWithKey> =
    post(TAG, "/v1/accounts", Admin, "Create an account and its first API key").body().created();
pub const LIST: Route<(), ListQuery, Page<Account>> = get(TAG, "/v1/accounts", Admin, "List accounts").query().json();
pub const GET: Route<(), (), Account> = get(TAG, "/v1/accounts/{id}", Admin, "Read an account").json();
pub const UPDATE: Route<UpdateAccount, (), Account> =
    patch(TAG, "/v1/accounts/{id}", Admin, "Move an account into or out of an organization").body().json();
pub const CREATE_API_KEY: Route<(), (), NewKey> =
    post(TAG, "/v1/accounts/{id}/apikeys", Admin, "Create another API key for an account").created();

pub const ROUTES: &[RouteInfo] = &[CREATE.info, LIST.info, GET.info, UPDATE.info, CREATE_API_KEY.info];

/// `POST /v1/accounts`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateAccount {
    #[schemars(with = "Name")]
    pub name: String,
    /// Put the account in this organization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<OrganizationId>")]
    pub organization_id: Option<String>,
    /// Idempotency token: a repeated create with the same token answers the first one's account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<ClientToken>")]
    pub client_token: Option<String>,
}

/// Distinguishes an absent field (`None`) from `null` (`Some(None)`).
fn double_option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// `PATCH /v1/accounts/{id}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateAccount {
    /// An organization id to join, or `null` to leave the current one; absent changes nothing.
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<OrganizationId>")]
    pub organization_id: Option<Option<String>>,
}

/// An account with the key created with it (absent when a clientToken replays the create).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccountWithKey {
    #[serde(flatten)]
    pub account: Account,
    /// The account's first API key, shown this once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
}

/// A new API key of an account, shown this once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewKey {
    pub account_id: AccountId,
    pub api_key: String,
}
