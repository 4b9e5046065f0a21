//! Agents: join tokens, the account's view of its agents, and the routes
//! agents call (enroll with a join token, then the config long-poll and
//! reports with the certificate from the enrollment).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_model::{Agent, AgentId, JoinTokenId, SubnetId, Timestamp, VpcId};
use trellis_proto::AgentConfig;
use trellis_proto::agent_api::{AgentReport, EnrollRequest, EnrollResponse};

use crate::list::{AgentListQuery, ListQuery, Page};
use crate::route::Caller::{Account, AgentCert, JoinToken};
use crate::route::{Route, RouteInfo, delete, get, post};

const TAG: &str = "agents";

pub const CREATE_TOKEN: Route<CreateAgentToken, (), CreatedToken> =
    post(TAG, "/v1/agent-tokens", Account, "Create a single-use join token for a subnet").body().created();
pub const LIST_TOKENS: Route<(), ListQuery, Page<TokenView>> =
    get(TAG, "/v1/agent-tokens", Account, "List join tokens (without secrets)").query().json();
pub const GET_TOKEN: Route<(), (), TokenView> =
    get(TAG, "/v1/agent-tokens/{id}", Account, "Read a join token (without secret)").json();
pub const DELETE_TOKEN: Route = delete(TAG, "/v1/agent-tokens/{id}", Account, "Revoke a join token");
pub const LIST: Route<(), AgentListQuery, Page<Agent>> =
    get(TAG, "/v1/agents", Account, "List agents (?vpcId=&subnetId=)").query().json();
pub const GET: Route<(), (), Agent> = get(TAG, "/v1/agents/{id}", Account, "Read an agent").json();
pub const DELETE: Route = delete(TAG, "/v1/agents/{id}", Account, "Remove an agent");
pub const ENROLL: Route<EnrollRequest, (), EnrollResponse> =
    post(TAG, "/v1/agents/enroll", JoinToken, "Enroll an agent: join token + CSR → certificate").body().json();
pub const CONFIG: Route<(), ConfigQuery, AgentConfig> =
    get(TAG, "/v1/agents/self/config", AgentCert, "Long-poll the agent's config (?after=&waitSeconds=)")
        .query()
        .json()
        .or(&[(304, "no newer config within waitSeconds")]);
pub const REPORT: Route<AgentReport> =
    post(TAG, "/v1/agents/self/report", AgentCert, "Report listener readiness and usage").body().no_content();

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

/// `POST /v1/agent-tokens`. Unknown fields are ignored, not rejected.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateAgentToken {
    /// The subnet the agent joins.
    #[schemars(with = "SubnetId")]
    pub subnet_id: String,
    /// How long the token stays valid: 60 to 86400 seconds (default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 86400))]
    pub expires_in_seconds: Option<u64>,
}

/// A join token as the API shows it: never the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenView {
    pub id: JoinTokenId,
    pub token_id: JoinTokenId,
    pub account_id: String,
    pub vpc_id: VpcId,
    pub subnet_id: SubnetId,
    pub expires_at: Timestamp,
    pub created_at: Timestamp,
    /// `VALID`, `USED` or `EXPIRED`.
    #[schemars(extend("enum" = ["VALID", "USED", "EXPIRED"]))]
    pub state: String,
    pub used_at: Option<Timestamp>,
    /// The agent the token enrolled.
    pub agent_id: Option<AgentId>,
}

/// The answer to a create: the view plus the whole token, shown this once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedToken {
    #[serde(flatten)]
    pub view: TokenView,
    /// `trellis1.<id>.<secret>.<ca sha256>`: give it to `trellis agent` (TRELLIS_JOIN_TOKEN).
    pub token: String,
}

/// Query of `GET /v1/agents/self/config`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigQuery {
    /// The version the agent has; 0 (or absent) for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// How long to wait for a different config (default 25, at most 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_seconds: Option<u64>,
    /// SHA-256 of the content the agent holds as `after` (its JSON with
    /// version 0): when it equals the current content, the agent keeps its
    /// version and nothing is resent (after a control-plane restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub have: Option<String>,
}
