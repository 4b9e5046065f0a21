//! Resource share invitations: the receiver accepts or rejects; only a
//! PENDING invitation moves (else 409). The sender may read them.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use trellis_model::{Account, InvitationStatus, ResourceShareInvitation, ResourceShareInvitationId};
use trellis_store::{Filter, Tx, TxExt};

use super::{Json, ListQuery, Page, PathId, Query, paginate, path_id};
use crate::auth::AccountAuth;
use crate::error::ApiError;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/resourceshareinvitations", get(list))
        .route("/v1/resourceshareinvitations/{id}", get(read))
        .route("/v1/resourceshareinvitations/{id}/accept", post(accept))
        .route("/v1/resourceshareinvitations/{id}/reject", post(reject))
}

fn parse_status(raw: &str) -> Result<InvitationStatus, ApiError> {
    match raw {
        "PENDING" => Ok(InvitationStatus::Pending),
        "ACCEPTED" => Ok(InvitationStatus::Accepted),
        "REJECTED" => Ok(InvitationStatus::Rejected),
        other => Err(ApiError::bad_request(format!("status {other:?} is not PENDING, ACCEPTED or REJECTED"))),
    }
}

async fn list(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    Query(q): Query<ListQuery>,
) -> Result<Json<Page<ResourceShareInvitation>>, ApiError> {
    let status = q.status.as_deref().map(parse_status).transpose()?;
    let all = st
        .read(move |tx| {
            let mut out = BTreeMap::new();
            let received = tx.list_obj::<ResourceShareInvitation>(&Filter::account(me.id.as_str()))?;
            let sent = tx.list_obj::<ResourceShareInvitation>(&Filter::reference(me.id.as_str()))?;
            for i in received.into_iter().chain(sent.into_iter().filter(|i| i.sender_account_id == me.id)) {
                if status.is_none_or(|s| s == i.status) {
                    out.insert(i.id.to_string(), i);
                }
            }
            Ok(out.into_values().collect::<Vec<_>>())
        })
        .await?;
    Ok(Json(paginate(all, |i| i.id.to_string(), &q)?))
}

/// An invitation `me` sent or received; 404 for anyone else.
fn get_visible(
    tx: &mut dyn Tx,
    me: &Account,
    id: &ResourceShareInvitationId,
) -> Result<ResourceShareInvitation, ApiError> {
    match tx.get_obj::<ResourceShareInvitation>(id.as_str())? {
        Some(i) if i.receiver_account_id == me.id || i.sender_account_id == me.id => Ok(i),
        _ => Err(ApiError::not_found("resource share invitation", id.as_str())),
    }
}

async fn read(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<Json<ResourceShareInvitation>, ApiError> {
    let id: ResourceShareInvitationId = path_id(&raw)?;
    st.read(move |tx| get_visible(tx, &me, &id)).await.map(Json)
}

async fn respond(
    st: AppState,
    me: Account,
    raw: String,
    to: InvitationStatus,
) -> Result<Json<ResourceShareInvitation>, ApiError> {
    let id: ResourceShareInvitationId = path_id(&raw)?;
    st.write(move |tx| {
        let mut invitation = get_visible(tx, &me, &id)?;
        if invitation.receiver_account_id != me.id {
            return Err(ApiError::forbidden(format!(
                "only the receiving account {} can answer invitation {}",
                invitation.receiver_account_id, invitation.id
            )));
        }
        invitation.status = invitation.status.transition(to).map_err(|_| {
            ApiError::conflict(
                "InvalidState",
                format!(
                    "invitation {} is already {}; only a PENDING invitation can be answered",
                    invitation.id, invitation.status
                ),
            )
        })?;
        tx.update_obj(&invitation)?;
        Ok(invitation)
    })
    .await
    .map(Json)
}

async fn accept(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<Json<ResourceShareInvitation>, ApiError> {
    respond(st, me, raw, InvitationStatus::Accepted).await
}

async fn reject(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<Json<ResourceShareInvitation>, ApiError> {
    respond(st, me, raw, InvitationStatus::Rejected).await
}
