//! Relay join tokens: `POST/GET/DELETE /v1/relay-tokens` (admin).
//!
//! The same format and handling as agent join tokens ([`crate::agents::tokens`]):
//! `trellis1.<id>.<secret>.<ca sha256>`, the secret shown once and stored as
//! its SHA-256, single use, 60 s – 24 h (default 1 h).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use trellis_api::relays::{CreateRelayToken, CreatedRelayToken, RelayTokenView};
use trellis_model::{JoinTokenId, Timestamp, validate_zone};
use trellis_store::{Filter, TxExt};

use super::records::RelayToken;
use crate::agents::tokens::{lifetime, new_token, printed, token_state};
use crate::api::{Json, ListQuery, PathId, Query, paginate, path_id};
use crate::auth::AdminAuth;
use crate::error::ApiError;
use crate::state::{AppState, now};

/// A relay token as the API shows it at `now`: never the secret.
pub fn view(token: &RelayToken, now: Timestamp) -> RelayTokenView {
    RelayTokenView {
        id: token.id.clone(),
        token_id: token.id.clone(),
        zone: token.zone.clone(),
        expires_at: token.expires_at,
        created_at: token.created_at,
        state: token_state(token.used_at, token.expires_at, now).to_string(),
        used_at: token.used_at,
        relay_id: token.relay_id.clone(),
    }
}

pub(super) async fn create(
    State(state): State<AppState>,
    _: AdminAuth,
    Json(req): Json<CreateRelayToken>,
) -> Result<Response, ApiError> {
    let expires_in = lifetime(req.expires_in_seconds)?;
    let zone = req.zone.unwrap_or_default();
    if !zone.is_empty() {
        validate_zone(&zone).map_err(|e| ApiError::invalid("ValidationError", e.to_string()))?;
    }
    let (token_id, secret, secret_sha256) = new_token()?;
    let created_at = now();
    let record = RelayToken {
        id: token_id.clone(),
        zone,
        secret_sha256,
        expires_at: created_at.plus(expires_in),
        created_at,
        used_at: None,
        relay_id: None,
    };
    let stored = record.clone();
    state.write(move |tx| Ok(tx.insert_obj(&stored)?)).await?;
    let body = CreatedRelayToken { view: view(&record, created_at), token: printed(&state, &token_id, secret) };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub(super) async fn list(
    State(state): State<AppState>,
    _: AdminAuth,
    Query(query): Query<ListQuery>,
) -> Result<Json<crate::api::Page<RelayTokenView>>, ApiError> {
    let tokens = state.read(move |tx| Ok(tx.list_obj::<RelayToken>(&Filter::default())?)).await?;
    let now = now();
    let views = tokens.iter().map(|t| view(t, now)).collect();
    Ok(Json(paginate(views, |t: &RelayTokenView| t.id.to_string(), &query)?))
}

fn find(tx: &mut dyn trellis_store::Tx, id: &JoinTokenId) -> Result<RelayToken, ApiError> {
    tx.get_obj::<RelayToken>(id.as_str())?.ok_or_else(|| ApiError::not_found("relay join token", id.as_str()))
}

pub(super) async fn get(
    State(state): State<AppState>,
    _: AdminAuth,
    PathId(raw): PathId,
) -> Result<Json<RelayTokenView>, ApiError> {
    let id: JoinTokenId = path_id(&raw)?;
    let token = state.read(move |tx| find(tx, &id)).await?;
    Ok(Json(view(&token, now())))
}

/// Deletes a token; an unused one can no longer enroll. A relay it enrolled stays.
pub(super) async fn delete(
    State(state): State<AppState>,
    _: AdminAuth,
    PathId(raw): PathId,
) -> Result<StatusCode, ApiError> {
    let id: JoinTokenId = path_id(&raw)?;
    state
        .write(move |tx| {
            find(tx, &id)?;
            tx.delete_obj::<RelayToken>(id.as_str())?;
            Ok(())
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
