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

use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use trellis_api::AgentListQuery;
use trellis_api::agents;
use trellis_model::{Agent, AgentId, Id};
use trellis_store::{Filter, Tx, TxExt};

use crate::api::{Json, Page, Paged, PathId, Query, Routes, get_owned, list_page, path_id};
use crate::auth::AccountAuth;
use crate::error::ApiError;
use crate::state::{AppState, now};
use crate::tls::PeerIdentity;
use records::{AgentCert, AgentRuntime, RevokedCert};

/// Routes of agent tokens, agents and the agent-facing API.
pub fn routes() -> Routes {
    Routes::new()
        .at(&agents::CREATE_TOKEN, tokens::create)
        .at(&agents::LIST_TOKENS, tokens::list)
        .at(&agents::GET_TOKEN, tokens::get)
        .at(&agents::DELETE_TOKEN, tokens::delete)
        .at(&agents::LIST, list)
        .at(&agents::GET, get_one)
        .at(&agents::DELETE, delete)
        .at(&agents::ENROLL, enroll::enroll)
        .at(&agents::CONFIG, config::config)
        .at(&agents::REPORT, report::report)
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

/// The agent as the API shows it: liveness and the served config version
/// come from its runtime record (reports write there, not to the agent).
fn with_runtime(tx: &mut dyn Tx, mut agent: Agent) -> Result<Agent, ApiError> {
    if let Some(runtime) = tx.get_obj::<AgentRuntime>(agent.id.as_str())? {
        agent.last_seen_at = runtime.last_seen_at.or(agent.last_seen_at);
        agent.config_version = runtime.config_version;
    }
    Ok(agent)
}

async fn list(
    State(state): State<AppState>,
    AccountAuth(account): AccountAuth,
    Query(query): Query<AgentListQuery>,
) -> Result<Response, ApiError> {
    let page = query.paging();
    let page = state
        .read(move |tx| {
            // Subnet ids and VPC ids are both refs of an agent; the subnet is the narrower.
            let scope = query.subnet_id.as_deref().or(query.vpc_id.as_deref());
            let filter = match scope {
                Some(r) => Filter::account_and_reference(account.id.as_str(), r),
                None => Filter::account(account.id.as_str()),
            };
            let mut agents: Page<Agent> = list_page(tx, filter, &page)?;
            agents.items.retain(|a| {
                query.vpc_id.as_deref().is_none_or(|v| a.vpc_id.as_str() == v)
                    && query.subnet_id.as_deref().is_none_or(|s| a.subnet_id.as_str() == s)
            });
            let items = agents.items.into_iter().map(|a| with_runtime(tx, a)).collect::<Result<Vec<_>, _>>()?;
            Ok(Page { items, next_token: agents.next_token })
        })
        .await?;
    Ok(Json(page).into_response())
}

async fn get_one(
    State(state): State<AppState>,
    AccountAuth(account): AccountAuth,
    PathId(raw): PathId,
) -> Result<Json<Agent>, ApiError> {
    let id: AgentId = path_id(&raw)?;
    let agent = state
        .read(move |tx| {
            let agent = get_owned::<Agent>(tx, &account.id, id.as_str(), AgentId::KIND)?;
            with_runtime(tx, agent)
        })
        .await?;
    Ok(Json(agent))
}

/// Deletes the agent and revokes its certificate: its next request is a 401,
/// and gateways of the providers its VPC uses refuse the certificate from
/// their next config on (until it expires).
async fn delete(
    State(state): State<AppState>,
    AccountAuth(account): AccountAuth,
    PathId(raw): PathId,
) -> Result<StatusCode, ApiError> {
    let id: AgentId = path_id(&raw)?;
    let now = now();
    let deleted = id.clone();
    state
        .write(move |tx| {
            let agent = get_owned::<Agent>(tx, &account.id, id.as_str(), AgentId::KIND)?;
            for cert in tx.list_obj::<AgentCert>(&Filter::reference(agent.id.as_str()))? {
                tx.delete_obj::<AgentCert>(&cert.id)?;
                if cert.not_after > now {
                    tx.insert_obj(&RevokedCert {
                        id: cert.id.clone(),
                        account_id: agent.account_id.clone(),
                        vpc_id: agent.vpc_id.clone(),
                        agent_id: agent.id.clone(),
                        not_after: cert.not_after,
                    })?;
                }
            }
            tx.delete_obj::<AgentRuntime>(agent.id.as_str())?;
            tx.delete_obj::<Agent>(agent.id.as_str())?;
            Ok(())
        })
        .await?;
    state.configs.remove(&deleted);
    state.reports.forget(&deleted);
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
pub(crate) mod tests;
