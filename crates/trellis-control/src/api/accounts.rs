//! Accounts (admin only): create with a first API key, list, read, move
//! between organizations, issue more keys.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use trellis_api::accounts::{self, AccountWithKey, CreateAccount, NewKey, UpdateAccount};
use trellis_model::{Account, AccountId, Organization, OrganizationId, VpcEndpoint, validate_name};
use trellis_store::{Filter, Tx, TxExt};

use super::endpoints::reassess_endpoints_of;
use super::idempotency::{ADMIN_SCOPE, create_once};
use super::{ClientToken, Json, ListQuery, Page, PathId, Query, Routes, created, paginate, path_id};
use crate::auth::{AdminAuth, generate_key, insert_key};
use crate::error::ApiError;
use crate::state::{AppState, now, seed};

pub fn routes() -> Routes {
    Routes::new()
        .at(&accounts::CREATE, create)
        .at(&accounts::LIST, list)
        .at(&accounts::GET, read)
        .at(&accounts::UPDATE, update)
        .at(&accounts::CREATE_API_KEY, create_key)
}

fn organization_ref(tx: &mut dyn Tx, raw: &str) -> Result<OrganizationId, ApiError> {
    let id = OrganizationId::parse(raw).map_err(|e| crate::error::invalid_reference("organizationId", e))?;
    if tx.get_obj::<Organization>(id.as_str())?.is_none() {
        return Err(ApiError::invalid("ValidationError", format!("organization {id} does not exist")));
    }
    Ok(id)
}

async fn create(
    State(st): State<AppState>,
    _: AdminAuth,
    Json(body): Json<CreateAccount>,
) -> Result<Response, ApiError> {
    validate_name(&body.name)?;
    let token = ClientToken::new(ADMIN_SCOPE, "accounts", body.client_token.as_deref(), &body)?;
    let (id, key, now, region) = (AccountId::generate(&seed()?), generate_key()?, now(), st.region().to_string());
    let outcome = st
        .write(move |tx| {
            let mut fresh = false;
            let outcome = create_once(tx, token.as_ref(), now, |tx| {
                let org = body.organization_id.as_deref().map(|o| organization_ref(tx, o)).transpose()?;
                let account = Account::new(id.clone(), body.name.clone(), org, &region, now);
                tx.insert_obj(&account)?;
                insert_key(tx, &key, Some(&account.id), now)?;
                fresh = true;
                Ok(account)
            })?;
            Ok(outcome.map(|account| AccountWithKey { account, api_key: fresh.then(|| key.clone()) }))
        })
        .await?;
    Ok(created(outcome))
}

async fn list(
    State(st): State<AppState>,
    _: AdminAuth,
    Query(q): Query<ListQuery>,
) -> Result<Json<Page<Account>>, ApiError> {
    let all = st.read(|tx| Ok(tx.list_obj::<Account>(&Filter::default())?)).await?;
    Ok(Json(paginate(all, |a| a.id.to_string(), &q)?))
}

async fn read(State(st): State<AppState>, _: AdminAuth, PathId(raw): PathId) -> Result<Json<Account>, ApiError> {
    let id: AccountId = path_id(&raw)?;
    st.read(move |tx| tx.get_obj::<Account>(id.as_str())?.ok_or_else(|| ApiError::not_found("account", id.as_str())))
        .await
        .map(Json)
}

async fn update(
    State(st): State<AppState>,
    _: AdminAuth,
    PathId(raw): PathId,
    Json(body): Json<UpdateAccount>,
) -> Result<Json<Account>, ApiError> {
    let id: AccountId = path_id(&raw)?;
    st.write(move |tx| {
        let mut account =
            tx.get_obj::<Account>(id.as_str())?.ok_or_else(|| ApiError::not_found("account", id.as_str()))?;
        if let Some(org) = &body.organization_id {
            account.organization_id = org.as_deref().map(|o| organization_ref(tx, o)).transpose()?;
            tx.update_obj(&account)?;
            // Shares that relied on the old organization may no longer grant access:
            // the account's endpoints, and other accounts' endpoints on its configurations.
            let mut consumers: BTreeMap<_, BTreeSet<AccountId>> = BTreeMap::new();
            let own = tx.list_obj::<VpcEndpoint>(&Filter::account(account.id.as_str()))?;
            let on_mine = tx.list_obj::<VpcEndpoint>(&Filter::reference(account.id.as_str()))?;
            for e in own.into_iter().chain(on_mine) {
                if let Some(config) = e.resource_configuration_id {
                    consumers.entry(config).or_default().insert(e.account_id);
                }
            }
            for (config, accounts) in &consumers {
                reassess_endpoints_of(tx, config, &accounts.iter().cloned().collect::<Vec<_>>())?;
            }
        }
        Ok(account)
    })
    .await
    .map(Json)
}

async fn create_key(
    State(st): State<AppState>,
    _: AdminAuth,
    PathId(raw): PathId,
) -> Result<(StatusCode, Json<NewKey>), ApiError> {
    let id: AccountId = path_id(&raw)?;
    let (key, now) = (generate_key()?, now());
    st.write(move |tx| {
        if tx.get_obj::<Account>(id.as_str())?.is_none() {
            return Err(ApiError::not_found("account", id.as_str()));
        }
        insert_key(tx, &key, Some(&id), now)?;
        Ok(NewKey { account_id: id.clone(), api_key: key.clone() })
    })
    .await
    .map(|k| (StatusCode::CREATED, Json(k)))
}
