//! VPCs: networks of an account where agents run.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use trellis_api::vpcs::{self, CreateVpc, UpdateVpc};
use trellis_model::{AccountId, ResourceGateway, Subnet, Vpc, VpcEndpoint, VpcId, validate_name};
use trellis_store::{Filter, Object, Tx, TxExt};

use super::idempotency::create_once;
use super::{ClientToken, Json, PathId, Routes, created, get_owned, path_id};
use crate::auth::AccountAuth;
use crate::error::ApiError;
use crate::state::{AppState, now, seed};

/// Record kind of B's agents; counted raw so this module does not depend on their shape.
pub const AGENT_KIND: &str = <trellis_model::Agent as Object>::KIND;

pub fn routes() -> Routes {
    Routes::new()
        .at(&vpcs::CREATE, create)
        .at(&vpcs::LIST, super::list_owned::<Vpc>)
        .at(&vpcs::GET, super::read_owned::<Vpc>)
        .at(&vpcs::UPDATE, update)
        .at(&vpcs::DELETE, delete)
}

async fn create(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    Json(body): Json<CreateVpc>,
) -> Result<Response, ApiError> {
    validate_name(&body.name)?;
    let token = ClientToken::new(me.id.as_str(), "vpcs", body.client_token.as_deref(), &body)?;
    let (id, now, region) = (VpcId::generate(&seed()?), now(), st.region().to_string());
    let outcome = st
        .write(move |tx| {
            create_once(tx, token.as_ref(), now, |tx| {
                let vpc = Vpc::new(id.clone(), me.id.clone(), body.name.clone(), &region, now);
                tx.insert_obj(&vpc)?;
                Ok(vpc)
            })
        })
        .await?;
    Ok(created(outcome))
}

async fn update(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
    Json(body): Json<UpdateVpc>,
) -> Result<Json<Vpc>, ApiError> {
    let id: VpcId = path_id(&raw)?;
    if let Some(name) = &body.name {
        validate_name(name)?;
    }
    st.write(move |tx| {
        let mut vpc = get_owned::<Vpc>(tx, &me.id, id.as_str(), "VPC")?;
        if let Some(name) = &body.name {
            vpc.name = name.clone();
            tx.update_obj(&vpc)?;
        }
        Ok(vpc)
    })
    .await
    .map(Json)
}

/// How many records of `kind` reference `id`.
pub fn count_refs(tx: &mut dyn Tx, kind: &str, id: &str) -> Result<usize, ApiError> {
    Ok(tx.list(kind, &Filter::reference(id))?.len())
}

async fn delete(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<StatusCode, ApiError> {
    let id: VpcId = path_id(&raw)?;
    st.write(move |tx| {
        let vpc = get_owned::<Vpc>(tx, &me.id, id.as_str(), "VPC")?;
        in_use(tx, &me.id, &vpc)?;
        tx.delete_obj::<Vpc>(vpc.id.as_str())?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

fn in_use(tx: &mut dyn Tx, _me: &AccountId, vpc: &Vpc) -> Result<(), ApiError> {
    for (kind, what) in [
        (Subnet::KIND, "subnets"),
        (ResourceGateway::KIND, "resource gateways"),
        (VpcEndpoint::KIND, "VPC endpoints"),
        (AGENT_KIND, "agents"),
    ] {
        let n = count_refs(tx, kind, vpc.id.as_str())?;
        if n > 0 {
            return Err(ApiError::conflict(
                "ResourceInUse",
                format!("VPC {} still has {n} {what}; delete them first", vpc.id),
            ));
        }
    }
    Ok(())
}

impl super::Owned for Vpc {
    type Id = VpcId;
    const WHAT: &'static str = "VPC";
}
