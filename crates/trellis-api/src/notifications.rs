//! Connection notifications: signed webhooks for Connect, Accept, Reject and
//! Delete on an account's endpoint services and endpoints, and (account-wide)
//! for share invitations it receives and resource endpoints others create to
//! its resources; with the log of every delivery and its attempts.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_model::schema::ClientToken;
use trellis_model::{
    ConnectionEvent, ConnectionNotification, NotificationDelivery, VpcEndpointId, VpcEndpointServiceId,
};

use crate::list::{ListQuery, Page};
use crate::route::Caller::Account;
use crate::route::{Route, RouteInfo, delete, get, patch, post};

const TAG: &str = "connectionnotifications";

pub const CREATE: Route<CreateConnectionNotification, (), ConnectionNotification> = post(
    TAG,
    "/v1/connectionnotifications",
    Account,
    "Subscribe a webhook to connection events of a service, an endpoint, or the account",
)
.body()
.created();
pub const LIST: Route<(), ListQuery, Page<ConnectionNotification>> =
    get(TAG, "/v1/connectionnotifications", Account, "List connection notifications").query().json();
pub const GET: Route<(), (), ConnectionNotification> =
    get(TAG, "/v1/connectionnotifications/{id}", Account, "Read a connection notification").json();
pub const UPDATE: Route<UpdateConnectionNotification, (), ConnectionNotification> =
    patch(TAG, "/v1/connectionnotifications/{id}", Account, "Change a connection notification's URL, events or secret")
        .body()
        .json();
pub const DELETE: Route = delete(
    TAG,
    "/v1/connectionnotifications/{id}",
    Account,
    "Delete a connection notification, its pending deliveries and its log",
);
pub const DELIVERIES: Route<(), ListQuery, Page<NotificationDelivery>> = get(
    TAG,
    "/v1/connectionnotifications/{id}/deliveries",
    Account,
    "The deliveries log: each event sent to the notification, newest first, with every attempt",
)
.query()
.json();

pub const ROUTES: &[RouteInfo] = &[CREATE.info, LIST.info, GET.info, UPDATE.info, DELETE.info, DELIVERIES.info];

/// `POST /v1/connectionnotifications`. At most one of `serviceId` and
/// `vpcEndpointId`; neither = account-wide.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateConnectionNotification {
    /// An endpoint service of yours: events about endpoints connecting to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<VpcEndpointServiceId>")]
    pub service_id: Option<String>,
    /// An endpoint of yours: events about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<VpcEndpointId>")]
    pub vpc_endpoint_id: Option<String>,
    /// `Connect`, `Accept`, `Reject`, `Delete` (service or endpoint);
    /// `ResourceShareInvitation`, `ResourceEndpointCreate` (account-wide).
    #[schemars(with = "Vec<ConnectionEvent>")]
    pub connection_events: Vec<String>,
    /// An `http` or `https` URL with a host; events are POSTed to it.
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// Signs every delivery (`Trellis-Signature`); stored, never answered. 1-256 characters.
    #[schemars(length(min = 1, max = 256))]
    pub secret: String,
    /// Idempotency token: a repeated create with the same token answers the first one's notification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<ClientToken>")]
    pub client_token: Option<String>,
}

impl std::fmt::Debug for CreateConnectionNotification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateConnectionNotification")
            .field("service_id", &self.service_id)
            .field("vpc_endpoint_id", &self.vpc_endpoint_id)
            .field("connection_events", &self.connection_events)
            .field("url", &self.url)
            .field("secret", &"***")
            .finish()
    }
}

/// `PATCH /v1/connectionnotifications/{id}`: absent fields keep their value.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateConnectionNotification {
    /// The events, replacing the old list (valid for the notification's scope).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Vec<ConnectionEvent>>")]
    pub connection_events: Option<Vec<String>>,
    /// The new URL; pending deliveries go there from their next attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub url: Option<String>,
    /// The new secret; signs every attempt from now on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub secret: Option<String>,
}

impl std::fmt::Debug for UpdateConnectionNotification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpdateConnectionNotification")
            .field("connection_events", &self.connection_events)
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .finish()
    }
}
