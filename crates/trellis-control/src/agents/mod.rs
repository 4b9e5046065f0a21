//! Agents: join tokens, enrollment, the config long-poll, reports, and the
//! account's view of its agents.
//!
//! Account routes (`/v1/agent-tokens`, `/v1/agents`) authenticate with an API
//! key. Agent routes authenticate the one way an agent cannot fake: enroll by
//! the join token's secret, everything after by the TLS client certificate
//! the CA signed at enrollment ([`crate::tls::PeerIdentity`]). Nothing an
//! agent sends in a body names which agent it is.

pub mod config;
pub mod enroll;
pub mod records;
pub mod report;
pub mod tokens;

use axum::Router;
use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use trellis_model::{Agent, AgentId, Id};
use trellis_store::{Filter, TxExt};

use crate::api::{Json, ListQuery, PathId, Query, get_owned, paginate, path_id};
use crate::auth::AccountAuth;
use crate::error::ApiError;
use crate::state::{AppState, now};
use crate::tls::PeerIdentity;
use records::{AgentCert, AgentRuntime};

/// Routes of agent tokens, agents and the agent-facing API.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/agent-tokens", post(tokens::create).get(tokens::list))
        .route("/v1/agent-tokens/{id}", get(tokens::get).delete(tokens::delete))
        .route("/v1/agents", get(list))
        .route("/v1/agents/{id}", get(get_one).delete(delete))
        .route("/v1/agents/enroll", post(enroll::enroll))
        .route("/v1/agents/self/config", get(config::config))
        .route("/v1/agents/self/report", post(report::report))
}

/// The agent a request comes from, found by its client certificate.
#[derive(Clone, Debug)]
pub struct AgentAuth(pub Agent);

impl FromRequestParts<AppState> for AgentAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let fingerprint =
            parts.extensions.get::<PeerIdentity>().and_then(|p| p.cert_sha256()).map(str::to_string).ok_or_else(
                || {
                    ApiError::unauthorized(
                        "this route needs the agent's client certificate; enroll with a join token first \
                     and connect over HTTPS with the certificate from the enrollment",
                    )
                },
            )?;
        let now = now();
        let agent = state
            .read(move |tx| {
                let unknown = || {
                    ApiError::unauthorized(
                        "this client certificate belongs to no enrolled agent (it was deleted); enroll again with a new join token",
                    )
                };
                let cert = tx.get_obj::<AgentCert>(&fingerprint)?.ok_or_else(unknown)?;
                if cert.not_after <= now {
                    return Err(ApiError::unauthorized(
                        "this agent certificate has expired; enroll again with a new join token",
                    ));
                }
                tx.get_obj::<Agent>(cert.agent_id.as_str())?.ok_or_else(unknown)
            })
            .await?;
        Ok(AgentAuth(agent))
    }
}

/// Query of `GET /v1/agents`.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentListQuery {
    pub max_results: Option<usize>,
    pub next_token: Option<String>,
    pub vpc_id: Option<String>,
    pub subnet_id: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    AccountAuth(account): AccountAuth,
    Query(query): Query<AgentListQuery>,
) -> Result<Response, ApiError> {
    let account_id = account.id.clone();
    let agents = state
        .read(move |tx| Ok(tx.list_obj::<Agent>(&Filter { account_id: Some(account_id.as_str()), reference: None })?))
        .await?;
    let agents: Vec<Agent> = agents
        .into_iter()
        .filter(|a| query.vpc_id.as_deref().is_none_or(|v| a.vpc_id.as_str() == v))
        .filter(|a| query.subnet_id.as_deref().is_none_or(|s| a.subnet_id.as_str() == s))
        .collect();
    let page = ListQuery { max_results: query.max_results, next_token: query.next_token, ..ListQuery::default() };
    Ok(Json(paginate(agents, |a| a.id.to_string(), &page)?).into_response())
}

async fn get_one(
    State(state): State<AppState>,
    AccountAuth(account): AccountAuth,
    PathId(raw): PathId,
) -> Result<Json<Agent>, ApiError> {
    let id: AgentId = path_id(&raw)?;
    let agent = state.read(move |tx| get_owned::<Agent>(tx, &account.id, id.as_str(), AgentId::KIND)).await?;
    Ok(Json(agent))
}

/// Deletes the agent and revokes its certificate: its next request is a 401,
/// and it leaves every gateway's peer list with the next config.
async fn delete(
    State(state): State<AppState>,
    AccountAuth(account): AccountAuth,
    PathId(raw): PathId,
) -> Result<StatusCode, ApiError> {
    let id: AgentId = path_id(&raw)?;
    state
        .write(move |tx| {
            let agent = get_owned::<Agent>(tx, &account.id, id.as_str(), AgentId::KIND)?;
            for cert in tx.list_obj::<AgentCert>(&Filter { reference: Some(agent.id.as_str()), ..Filter::default() })? {
                tx.delete_obj::<AgentCert>(&cert.id)?;
            }
            tx.delete_obj::<AgentRuntime>(agent.id.as_str())?;
            tx.delete_obj::<Agent>(agent.id.as_str())?;
            Ok(())
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
pub(crate) mod tests;
