//! Resource share invitations: the receiver accepts or rejects; the sender may read them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_model::{ConfigurationType, ResourceConfigurationId, ResourceShareInvitation};

use crate::list::{ListQuery, Page, Paged};
use crate::route::Caller::Account;
use crate::route::{Route, RouteInfo, get, post};

const TAG: &str = "resourceshareinvitations";

pub const LIST: Route<(), InvitationListQuery, Page<InvitationView>> =
    get(TAG, "/v1/resourceshareinvitations", Account, "List received and sent invitations (?status=)").query().json();
pub const GET: Route<(), (), InvitationView> =
    get(TAG, "/v1/resourceshareinvitations/{id}", Account, "Read an invitation").json();
pub const ACCEPT: Route<(), (), InvitationView> =
    post(TAG, "/v1/resourceshareinvitations/{id}/accept", Account, "Accept a PENDING invitation").json();
pub const REJECT: Route<(), (), InvitationView> =
    post(TAG, "/v1/resourceshareinvitations/{id}/reject", Account, "Reject a PENDING invitation").json();

pub const ROUTES: &[RouteInfo] = &[LIST.info, GET.info, ACCEPT.info, REJECT.info];

/// Paging and `?status=`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InvitationListQuery {
    /// At most this many items (1-1000, default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_results: Option<usize>,
    /// The `nextToken` of the previous page: continue after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    /// Only the invitations in this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["PENDING", "ACCEPTED", "REJECTED", null]))]
    pub status: Option<String>,
}

impl Paged for InvitationListQuery {
    fn paging(&self) -> ListQuery {
        ListQuery { max_results: self.max_results, next_token: self.next_token.clone() }
    }
}

/// An invitation as the API shows it: the stored record and the resources its share holds now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InvitationView {
    #[serde(flatten)]
    pub invitation: ResourceShareInvitation,
    /// The resource configurations the share holds now (deleted ones are not listed).
    pub resources: Vec<SharedResource>,
}

/// One resource configuration of a share, as an invitation shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SharedResource {
    pub id: ResourceConfigurationId,
    pub arn: String,
    pub name: String,
    #[serde(rename = "type")]
    pub config_type: ConfigurationType,
    pub owner_account_id: String,
}
