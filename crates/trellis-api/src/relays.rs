//! Relays: their join tokens (admin), the admin's view of them, and the
//! routes a relay calls (enroll with a join token, then its config
//! long-poll and reports with the certificate from the enrollment).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_model::{JoinTokenId, Relay, RelayId, Timestamp};
use trellis_proto::RelayConfig;
use trellis_proto::agent_api::{RelayEnrollRequest, RelayEnrollResponse, RelayReport};

use crate::agents::ConfigQuery;
use crate::list::{ListQuery, Page};
use crate::route::Caller::{Admin, JoinToken, RelayCert};
use crate::route::{Route, RouteInfo, delete, get, post};

const TAG: &str = "relays";

pub const CREATE_TOKEN: Route<CreateRelayToken, (), CreatedRelayToken> =
    post(TAG, "/v1/relay-tokens", Admin, "Create a single-use join token for a relay").body().created();
pub const LIST_TOKENS: Route<(), ListQuery, Page<RelayTokenView>> =
    get(TAG, "/v1/relay-tokens", Admin, "List relay join tokens (without secrets)").query().json();
pub const GET_TOKEN: Route<(), (), RelayTokenView> =
    get(TAG, "/v1/relay-tokens/{id}", Admin, "Read a relay join token (without secret)").json();
pub const DELETE_TOKEN: Route = delete(TAG, "/v1/relay-tokens/{id}", Admin, "Revoke a relay join token");
pub const LIST: Route<(), ListQuery, Page<RelayView>> = get(TAG, "/v1/relays", Admin, "List relays").query().json();
pub const GET: Route<(), (), RelayView> = get(TAG, "/v1/relays/{id}", Admin, "Read a relay").json();
pub const DELETE: Route =
    delete(TAG, "/v1/relays/{id}", Admin, "Remove a relay (its certificate stops working, configs drop it)");
pub const ENROLL: Route<RelayEnrollRequest, (), RelayEnrollResponse> =
    post(TAG, "/v1/relays/enroll", JoinToken, "Enroll a relay: join token + CSR → certificate").body().json();
pub const CONFIG: Route<(), ConfigQuery, RelayConfig> =
    get(TAG, "/v1/relays/self/config", RelayCert, "Long-poll the relay's config (?after=&waitSeconds=)")
        .query()
        .json()
        .or(&[(304, "no newer config within waitSeconds")]);
pub const REPORT: Route<RelayReport> =
    post(TAG, "/v1/relays/self/report", RelayCert, "Report the relay's liveness, attached gateways and flows")
        .body()
        .no_content();

pub const ROUTES: &[RouteInfo] = &[
    CREATE_TOKEN.info,
    LIST_TOKENS.info,
    GET_TOKEN.info,
    DELETE_TOKEN.info,
    LIST.info,
    GET.info,
    DELETE.info,
    ENROLL.info,
    CONFIG.info,
    REPORT.info,
];

/// `POST /v1/relay-tokens`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateRelayToken {
    /// The zone the relay serves first (agents of this zone prefer it); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// How long the token stays valid: 60 to 86400 seconds (default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 86400))]
    pub expires_in_seconds: Option<u64>,
}

/// A relay join token as the API shows it: never the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayTokenView {
    pub id: JoinTokenId,
    pub token_id: JoinTokenId,
    /// The zone the relay will be in (empty for none).
    pub zone: String,
    pub expires_at: Timestamp,
    pub created_at: Timestamp,
    /// `VALID`, `USED` or `EXPIRED`.
    #[schemars(extend("enum" = ["VALID", "USED", "EXPIRED"]))]
    pub state: String,
    pub used_at: Option<Timestamp>,
    /// The relay the token enrolled.
    pub relay_id: Option<RelayId>,
}

/// The answer to a create: the view plus the whole token, shown this once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedRelayToken {
    #[serde(flatten)]
    pub view: RelayTokenView,
    /// `trellis1.<id>.<secret>.<ca sha256>`: give it to `trellis relay` (TRELLIS_JOIN_TOKEN).
    pub token: String,
}

/// A relay as the API shows it: the stored relay and what its reports say.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayView {
    #[serde(flatten)]
    pub relay: Relay,
    /// When a report last arrived (or the enrollment).
    pub last_seen_at: Option<Timestamp>,
    /// A report arrived within the last 15 seconds.
    pub healthy: bool,
    /// Gateway agents with at least one attached connection, as last reported.
    pub attached_gateways: u64,
    /// Relayed flows open, as last reported.
    pub active_flows: u64,
    /// The config version the relay said it serves (0 before its first report).
    pub config_version: u64,
}
