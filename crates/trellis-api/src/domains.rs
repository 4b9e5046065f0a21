//! Domain verifications: an account proves with a TXT record that it controls
//! a domain, so its custom names under that domain count as verified.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_model::DomainVerification;
use trellis_model::schema::{ClientToken, VerifiableDomain};

use crate::list::{ListQuery, Page};
use crate::route::Caller::Account;
use crate::route::{Route, RouteInfo, delete, get, post};

const TAG: &str = "domainverifications";

pub const CREATE: Route<CreateDomainVerification, (), DomainVerification> =
    post(TAG, "/v1/domainverifications", Account, "Start verifying a domain: answers the TXT record to publish")
        .body()
        .created();
pub const LIST: Route<(), ListQuery, Page<DomainVerification>> =
    get(TAG, "/v1/domainverifications", Account, "List domain verifications").query().json();
pub const GET: Route<(), (), DomainVerification> =
    get(TAG, "/v1/domainverifications/{id}", Account, "Read a domain verification").json();
pub const DELETE: Route = delete(
    TAG,
    "/v1/domainverifications/{id}",
    Account,
    "Delete a domain verification (its domain stops counting as verified)",
);

pub const ROUTES: &[RouteInfo] = &[CREATE.info, LIST.info, GET.info, DELETE.info];

/// `POST /v1/domainverifications`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateDomainVerification {
    /// The domain; a verification covers every name under it.
    #[schemars(with = "VerifiableDomain")]
    pub domain_name: String,
    /// Idempotency token: a repeated create with the same token answers the first one's verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<ClientToken>")]
    pub client_token: Option<String>,
}
