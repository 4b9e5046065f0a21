//! Resource share invitations: the receiver accepts or rejects; only a
//! PENDING invitation moves (else 409). The sender may read them.
//!
//! Every answer lists what the share holds (`resources`: name, type, owner
//! account), computed when answering, so a consumer never accepts blind; a
//! resource deleted since the invitation was sent is simply not listed.

use std::collections::BTreeMap;

use axum::extract::State;
use trellis_api::invitations::{self, InvitationListQuery, InvitationView, SharedResource};
use trellis_model::{
    Account, InvitationStatus, ResourceConfiguration, ResourceConfigurationId, ResourceShare, ResourceShareInvitation,
    ResourceShareInvitationId, kinds, parse_identifier,
};
use trellis_store::{Filter, Tx, TxExt};

use super::{Json, Page, Paged, PathId, Query, Routes, paginate, path_id};
use crate::auth::AccountAuth;
use crate::error::ApiError;
use crate::state::AppState;

pub fn routes() -> Routes {
    Routes::new()
        .at(&invitations::LIST, list)
        .at(&invitations::GET, read)
        .at(&invitations::ACCEPT, accept)
        .at(&invitations::REJECT, reject)
}

/// The invitation with the resources its share holds now.
fn view(tx: &mut dyn Tx, invitation: ResourceShareInvitation) -> Result<InvitationView, ApiError> {
    let mut resources = Vec::new();
    if let Some(share) = tx.get_obj::<ResourceShare>(invitation.resource_share_id.as_str())? {
        for arn in &share.resource_arns {
            let Ok(id) = parse_identifier::<ResourceConfigurationId>(arn, kinds::RESOURCE_CONFIGURATION) else {
                continue;
            };
            match tx.get_obj::<ResourceConfiguration>(id.as_str())? {
                Some(config) if config.account_id == share.account_id => resources.push(SharedResource {
                    id: config.id,
                    arn: config.arn,
                    name: config.name,
                    config_type: config.config_type,
                    owner_account_id: config.account_id.to_string(),
                }),
                _ => {}
            }
        }
    }
    Ok(InvitationView { invitation, resources })
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
    Query(q): Query<InvitationListQuery>,
) -> Result<Json<Page<InvitationView>>, ApiError> {
    let status = q.status.as_deref().map(parse_status).transpose()?;
    let page = st
        .read(move |tx| {
            let mut out = BTreeMap::new();
            let received = tx.list_obj::<ResourceShareInvitation>(&Filter::account(me.id.as_str()))?;
            let sent = tx.list_obj::<ResourceShareInvitation>(&Filter::reference(me.id.as_str()))?;
            for i in received.into_iter().chain(sent.into_iter().filter(|i| i.sender_account_id == me.id)) {
                if status.is_none_or(|s| s == i.status) {
                    out.insert(i.id.to_string(), i);
                }
            }
            let page = paginate(out.into_values().collect(), |i| i.id.to_string(), &q.paging())?;
            let items = page.items.into_iter().map(|i| view(tx, i)).collect::<Result<Vec<_>, _>>()?;
            Ok(Page { items, next_token: page.next_token })
        })
        .await?;
    Ok(Json(page))
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
) -> Result<Json<InvitationView>, ApiError> {
    let id: ResourceShareInvitationId = path_id(&raw)?;
    st.read(move |tx| {
        let invitation = get_visible(tx, &me, &id)?;
        view(tx, invitation)
    })
    .await
    .map(Json)
}

async fn respond(
    st: AppState,
    me: Account,
    raw: String,
    to: InvitationStatus,
) -> Result<Json<InvitationView>, ApiError> {
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
        view(tx, invitation)
    })
    .await
    .map(Json)
}

async fn accept(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<Json<InvitationView>, ApiError> {
    respond(st, me, raw, InvitationStatus::Accepted).await
}

async fn reject(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<Json<InvitationView>, ApiError> {
    respond(st, me, raw, InvitationStatus::Rejected).await
}
