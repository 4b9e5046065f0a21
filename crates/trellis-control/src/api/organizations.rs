//! Organizations (admin only): accounts in one organization share without invitations.

use axum::extract::State;
use axum::response::Response;
use trellis_api::organizations::{self, CreateOrganization};
use trellis_model::{Organization, OrganizationId, validate_name};
use trellis_store::{Filter, TxExt};

use super::idempotency::{ADMIN_SCOPE, create_once};
use super::{ClientToken, Json, ListQuery, Page, PathId, Query, Routes, created, paginate, path_id};
use crate::auth::AdminAuth;
use crate::error::ApiError;
use crate::state::{AppState, now, seed};

pub fn routes() -> Routes {
    Routes::new().at(&organizations::CREATE, create).at(&organizations::LIST, list).at(&organizations::GET, read)
}

async fn create(
    State(st): State<AppState>,
    _: AdminAuth,
    Json(body): Json<CreateOrganization>,
) -> Result<Response, ApiError> {
    validate_name(&body.name)?;
    let token = ClientToken::new(ADMIN_SCOPE, "organizations", body.client_token.as_deref(), &body)?;
    let (id, now, region) = (OrganizationId::generate(&seed()?), now(), st.region().to_string());
    let outcome = st
        .write(move |tx| {
            create_once(tx, token.as_ref(), now, |tx| {
                let org = Organization::new(id.clone(), body.name.clone(), &region, now);
                tx.insert_obj(&org)?;
                Ok(org)
            })
        })
        .await?;
    Ok(created(outcome))
}

async fn list(
    State(st): State<AppState>,
    _: AdminAuth,
    Query(q): Query<ListQuery>,
) -> Result<Json<Page<Organization>>, ApiError> {
    let all = st.read(|tx| Ok(tx.list_obj::<Organization>(&Filter::default())?)).await?;
    Ok(Json(paginate(all, |o| o.id.to_string(), &q)?))
}

async fn read(State(st): State<AppState>, _: AdminAuth, PathId(raw): PathId) -> Result<Json<Organization>, ApiError> {
    let id: OrganizationId = path_id(&raw)?;
    st.read(move |tx| {
        tx.get_obj::<Organization>(id.as_str())?.ok_or_else(|| ApiError::not_found("organization", id.as_str()))
    })
    .await
    .map(Json)
}
