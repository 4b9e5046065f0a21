//! Join tokens: `POST/GET/DELETE /v1/agent-tokens`.
//!
//! A token is `trellis1.<id>.<secret>.<ca sha256>` (see
//! [`trellis_proto::join_token`]). The secret is shown once, in the answer to
//! the create; the store keeps only its SHA-256. A token enrolls one agent
//! into one subnet and expires (60 s – 24 h, default 1 h).
//!
//! Creates take no `clientToken`: replaying one would have to show the
//! secret again, which the store no longer has. Each create is a new token.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use trellis_api::agents::{CreateAgentToken, CreatedToken, TokenView};
use trellis_model::{Id, JoinTokenId, Subnet, SubnetId, Timestamp};
use trellis_proto::join_token::JoinToken;
use trellis_store::{Filter, TxExt};

use super::records::AgentToken;
use crate::api::{Json, ListQuery, PathId, Query, get_owned, paginate, path_id};
use crate::auth::AccountAuth;
use crate::error::ApiError;
use crate::pki::{random_hex, sha256_hex};
use crate::state::{AppState, now, seed};

pub const DEFAULT_EXPIRES_IN_SECONDS: u64 = 3600;
pub const MIN_EXPIRES_IN_SECONDS: u64 = 60;
pub const MAX_EXPIRES_IN_SECONDS: u64 = 86_400;

/// `VALID`, `USED` or `EXPIRED`: a join token's state at `now` (agent and relay tokens alike).
pub fn token_state(used_at: Option<Timestamp>, expires_at: Timestamp, now: Timestamp) -> &'static str {
    if used_at.is_some() {
        "USED"
    } else if expires_at <= now {
        "EXPIRED"
    } else {
        "VALID"
    }
}

/// The lifetime a create asks for (`expiresInSeconds`), checked against the bounds.
pub fn lifetime(expires_in_seconds: Option<u64>) -> Result<Duration, ApiError> {
    let expires_in = expires_in_seconds.unwrap_or(DEFAULT_EXPIRES_IN_SECONDS);
    if !(MIN_EXPIRES_IN_SECONDS..=MAX_EXPIRES_IN_SECONDS).contains(&expires_in) {
        return Err(ApiError::invalid(
            "ValidationError",
            format!(
                "expiresInSeconds must be from {MIN_EXPIRES_IN_SECONDS} to {MAX_EXPIRES_IN_SECONDS} (got {expires_in})"
            ),
        ));
    }
    Ok(Duration::from_secs(expires_in))
}

/// A new token's id, secret and the SHA-256 of the secret (all a store keeps).
pub fn new_token() -> Result<(JoinTokenId, String, String), ApiError> {
    let token_id = JoinTokenId::generate(&seed()?);
    let secret = random_hex(32);
    let secret_sha256 = sha256_hex(secret.as_bytes());
    Ok((token_id, secret, secret_sha256))
}

/// The whole token as printed once: `trellis1.<id>.<secret>.<ca sha256>`.
pub fn printed(state: &AppState, token_id: &JoinTokenId, secret: String) -> String {
    JoinToken { token_id: token_id.to_string(), secret, ca_sha256: state.ca.cert_sha256_hex().to_string() }.to_string()
}

/// A token as the API shows it at `now`: never the secret.
pub fn view(token: &AgentToken, now: Timestamp) -> TokenView {
    let state = token_state(token.used_at, token.expires_at, now);
    TokenView {
        id: token.id.clone(),
        token_id: token.id.clone(),
        account_id: token.account_id.to_string(),
        vpc_id: token.vpc_id.clone(),
        subnet_id: token.subnet_id.clone(),
        expires_at: token.expires_at,
        created_at: token.created_at,
        state: state.to_string(),
        used_at: token.used_at,
        agent_id: token.agent_id.clone(),
    }
}

pub(super) async fn create(
    State(state): State<AppState>,
    AccountAuth(account): AccountAuth,
    Json(req): Json<CreateAgentToken>,
) -> Result<Response, ApiError> {
    let expires_in = lifetime(req.expires_in_seconds)?;
    let subnet_id = SubnetId::parse(&req.subnet_id)?;
    let (token_id, secret, secret_sha256) = new_token()?;
    let created_at = now();
    let expires_at = created_at.plus(expires_in);
    let new_id = token_id.clone();
    let stored = state
        .write(move |tx| {
            let subnet = get_owned::<Subnet>(tx, &account.id, subnet_id.as_str(), SubnetId::KIND)?;
            let record = AgentToken {
                id: new_id.clone(),
                account_id: account.id.clone(),
                vpc_id: subnet.vpc_id.clone(),
                subnet_id: subnet.id.clone(),
                secret_sha256: secret_sha256.clone(),
                expires_at,
                created_at,
                used_at: None,
                agent_id: None,
            };
            tx.insert_obj(&record)?;
            Ok(record)
        })
        .await?;
    let body = CreatedToken { view: view(&stored, created_at), token: printed(&state, &token_id, secret) };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub(super) async fn list(
    State(state): State<AppState>,
    AccountAuth(account): AccountAuth,
    Query(query): Query<ListQuery>,
) -> Result<Json<crate::api::Page<TokenView>>, ApiError> {
    let tokens = state.read(move |tx| Ok(tx.list_obj::<AgentToken>(&Filter::account(account.id.as_str()))?)).await?;
    let now = now();
    let views = tokens.iter().map(|t| view(t, now)).collect();
    Ok(Json(paginate(views, |t: &TokenView| t.id.to_string(), &query)?))
}

pub(super) async fn get(
    State(state): State<AppState>,
    AccountAuth(account): AccountAuth,
    PathId(raw): PathId,
) -> Result<Json<TokenView>, ApiError> {
    let id: JoinTokenId = path_id(&raw)?;
    let token = state.read(move |tx| get_owned::<AgentToken>(tx, &account.id, id.as_str(), JoinTokenId::KIND)).await?;
    Ok(Json(view(&token, now())))
}

/// Deletes a token; an unused one can no longer enroll. Agents it enrolled stay.
pub(super) async fn delete(
    State(state): State<AppState>,
    AccountAuth(account): AccountAuth,
    PathId(raw): PathId,
) -> Result<StatusCode, ApiError> {
    let id: JoinTokenId = path_id(&raw)?;
    state
        .write(move |tx| {
            get_owned::<AgentToken>(tx, &account.id, id.as_str(), JoinTokenId::KIND)?;
            tx.delete_obj::<AgentToken>(id.as_str())?;
            Ok(())
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
