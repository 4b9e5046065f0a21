//! Relays (`trellis relay`): their join tokens, enrollment, config
//! long-poll, reports, and the admin's view of them.
//!
//! Admin routes (`/v1/relay-tokens`, `/v1/relays`) authenticate with the
//! admin key: relays belong to whoever operates Trellis, not to an account.
//! Relay routes authenticate as agent routes do: enroll by a join token's
//! secret, everything after by the client certificate the CA signed at
//! enrollment, looked up in the relays' own certificate index — so an agent
//! certificate opens no relay route and a relay certificate no agent route.

pub mod compile;
pub mod config;
pub mod enroll;
pub mod records;
pub mod report;
pub mod tokens;

use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use trellis_api::relays::{self, RelayView};
use trellis_api::{ListQuery, Page};
use trellis_model::{AgentStatus, Id, Relay, RelayId, Timestamp};
use trellis_store::{Filter, StoreError, Tx, TxExt};

use crate::api::{Json, PathId, Query, Routes, list_page, path_id};
use crate::auth::AdminAuth;
use crate::error::ApiError;
use crate::state::{AppState, now};
use crate::tls::PeerIdentity;
use records::{RelayCert, RelayRuntime, RevokedRelayCert};
use report::Heard;

/// A relay is healthy while its reports arrive at least this often (judged by
/// the last report heard, not the last written: see [`report::RelayMemo`]).
pub const HEALTHY_WITHIN: Duration = Duration::from_secs(15);

/// Routes of relay tokens, relays and the relay-facing API.
pub fn routes() -> Routes {
    Routes::new()
        .at(&relays::CREATE_TOKEN, tokens::create)
        .at(&relays::LIST_TOKENS, tokens::list)
        .at(&relays::GET_TOKEN, tokens::get)
        .at(&relays::DELETE_TOKEN, tokens::delete)
        .at(&relays::LIST, list)
        .at(&relays::GET, get_one)
        .at(&relays::DELETE, delete)
        .at(&relays::ENROLL, enroll::enroll)
        .at(&relays::CONFIG, config::config)
        .at(&relays::REPORT, report::report)
}

/// The relay a request comes from, found by its client certificate.
#[derive(Clone, Debug)]
pub struct RelayAuth(pub Relay);

impl FromRequestParts<AppState> for RelayAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let fingerprint =
            parts.extensions.get::<PeerIdentity>().and_then(|p| p.cert_sha256()).map(str::to_string).ok_or_else(
                || {
                    ApiError::unauthorized(
                        "this route needs the relay's client certificate; enroll the relay with a relay join token \
                         first and connect over HTTPS with the certificate from the enrollment",
                    )
                },
            )?;
        let now = now();
        let relay = state
            .read(move |tx| {
                let unknown = || {
                    ApiError::unauthorized(
                        "this client certificate belongs to no enrolled relay (an agent's, or a deleted relay's); \
                         enroll the relay with a new relay join token",
                    )
                };
                let cert = tx.get_obj::<RelayCert>(&fingerprint)?.ok_or_else(unknown)?;
                if cert.not_after <= now {
                    return Err(ApiError::unauthorized(
                        "this relay certificate has expired; enroll the relay again with a new relay join token",
                    ));
                }
                tx.get_obj::<Relay>(cert.relay_id.as_str())?.ok_or_else(unknown)
            })
            .await?;
        Ok(RelayAuth(relay))
    }
}

/// The relay as the API shows it at `now`, with what its reports said: the
/// last one `heard` (reports that change nothing are not written) or else
/// the stored runtime record.
fn view(tx: &mut dyn Tx, relay: Relay, now: Timestamp, heard: Option<Heard>) -> Result<RelayView, ApiError> {
    let runtime = tx.get_obj::<RelayRuntime>(relay.id.as_str())?.unwrap_or_default();
    let (last_seen_at, active_flows) = match heard {
        Some(h) if runtime.last_seen_at.is_none_or(|stored| stored <= h.at) => (Some(h.at), h.active_flows),
        _ => (runtime.last_seen_at, runtime.active_flows),
    };
    let healthy = last_seen_at.is_some_and(|seen| now < seen.plus(HEALTHY_WITHIN));
    Ok(RelayView {
        relay,
        last_seen_at,
        healthy,
        attached_gateways: runtime.attached.len() as u64,
        active_flows,
        config_version: runtime.config_version,
    })
}

async fn list(
    State(state): State<AppState>,
    _: AdminAuth,
    Query(query): Query<ListQuery>,
) -> Result<Json<Page<RelayView>>, ApiError> {
    let now = now();
    let memo = state.relay_reports.clone();
    let page = state
        .read(move |tx| {
            let relays: Page<Relay> = list_page(tx, Filter::default(), &query)?;
            let items = relays
                .items
                .into_iter()
                .map(|r| {
                    let heard = memo.heard(&r.id);
                    view(tx, r, now, heard)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Page { items, next_token: relays.next_token })
        })
        .await?;
    Ok(Json(page))
}

async fn get_one(
    State(state): State<AppState>,
    _: AdminAuth,
    PathId(raw): PathId,
) -> Result<Json<RelayView>, ApiError> {
    let id: RelayId = path_id(&raw)?;
    let now = now();
    let heard = state.relay_reports.heard(&id);
    let relay = state
        .read(move |tx| {
            let relay =
                tx.get_obj::<Relay>(id.as_str())?.ok_or_else(|| ApiError::not_found(RelayId::KIND, id.as_str()))?;
            view(tx, relay, now, heard)
        })
        .await?;
    Ok(Json(relay))
}

/// Deletes the relay: its certificate opens no relay route from now on and
/// is revoked (listed in the configs of agents that use relays until it
/// expires, so they refuse it), and every config that named it (the agents
/// attached to it, the endpoint agents reaching them, the other relays'
/// assignments) recompiles at once.
async fn delete(State(state): State<AppState>, _: AdminAuth, PathId(raw): PathId) -> Result<StatusCode, ApiError> {
    let id: RelayId = path_id(&raw)?;
    let deleted = id.clone();
    let now = now();
    state
        .write(move |tx| {
            if tx.get_obj::<Relay>(id.as_str())?.is_none() {
                return Err(ApiError::not_found(RelayId::KIND, id.as_str()));
            }
            for cert in tx.list_obj::<RelayCert>(&Filter::reference(id.as_str()))? {
                tx.delete_obj::<RelayCert>(&cert.id)?;
                if cert.not_after > now {
                    tx.insert_obj(&RevokedRelayCert {
                        id: cert.id.clone(),
                        relay_id: cert.relay_id.clone(),
                        not_after: cert.not_after,
                    })?;
                }
            }
            tx.delete_obj::<RelayRuntime>(id.as_str())?;
            tx.delete_obj::<Relay>(id.as_str())?;
            Ok(())
        })
        .await?;
    state.relay_configs.remove(&deleted);
    state.relay_reports.forget(&deleted);
    tracing::info!(relay = %deleted, "relay deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Marks ONLINE relays not seen for `offline_after` OFFLINE (agents' configs
/// then leave them out); returns how many.
pub fn mark_offline(tx: &mut dyn Tx, now: Timestamp, offline_after: Duration) -> Result<usize, StoreError> {
    let mut changed = 0;
    for mut relay in tx.list_obj::<Relay>(&Filter::default())? {
        if relay.status != AgentStatus::Online {
            continue;
        }
        let seen = tx.get_obj::<RelayRuntime>(relay.id.as_str())?.and_then(|r| r.last_seen_at);
        if seen.is_none_or(|seen| seen.plus(offline_after) < now) {
            relay.status = AgentStatus::Offline;
            tx.update_obj(&relay)?;
            changed += 1;
        }
    }
    Ok(changed)
}
