//! Resource share invitations: the receiver accepts or rejects; the sender may read them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_model::{ConfigurationType, ResourceConfigurationId, ResourceShareInvitation};

use crate::list::{Page, list_query};
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

list_query! {
    /// Paging and `?status=`.
    InvitationListQuery {
        /// Only the invitations in this status.
        #[schemars(extend("enum" = ["PENDING", "ACCEPTED", "REJECTED", null]))]
        status: Option<String>,
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
