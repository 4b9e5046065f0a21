//! Subnets: one zone of a VPC with the address pool its endpoints draw from.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use trellis_api::VpcListQuery;
use trellis_api::subnets::{self, CreateSubnet};
use trellis_model::{AddressPool, ResourceGateway, Subnet, SubnetId, VpcEndpoint, VpcId, validate_name, validate_zone};
use trellis_store::{Filter, Object, Tx, TxExt};

use super::idempotency::create_once;
use super::vpcs::{AGENT_KIND, count_refs};
use super::{ClientToken, Json, Page, Paged, PathId, Query, Routes, created, get_owned, list_page, path_id};
use crate::auth::AccountAuth;
use crate::error::{ApiError, invalid_reference};
use crate::state::{AppState, now, seed};

/// Record kind of the agent routes' join tokens (which reference their subnet).
const AGENT_TOKEN_KIND: &str = "agent-token";

pub fn routes() -> Routes {
    Routes::new()
        .at(&subnets::CREATE, create)
        .at(&subnets::LIST, list)
        .at(&subnets::GET, read)
        .at(&subnets::DELETE, delete)
}

/// Pool addresses held by endpoints in `subnet` (any account's).
pub fn used_addresses(tx: &mut dyn Tx, subnet: &SubnetId) -> Result<BTreeSet<Ipv4Addr>, ApiError> {
    let endpoints = tx.list_obj::<VpcEndpoint>(&Filter::reference(subnet.as_str()))?;
    Ok(endpoints
        .iter()
        .flat_map(|e| e.addresses_in(subnet).collect::<Vec<_>>())
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .collect())
}

/// The subnet with its current `availableIpAddressCount`.
pub fn with_count(tx: &mut dyn Tx, mut subnet: Subnet) -> Result<Subnet, ApiError> {
    let used = used_addresses(tx, &subnet.id)?;
    subnet.available_ip_address_count = subnet.cidr_block.available_count(&used);
    Ok(subnet)
}

async fn create(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    Json(body): Json<CreateSubnet>,
) -> Result<Response, ApiError> {
    let vpc_id = VpcId::parse(&body.vpc_id).map_err(|e| invalid_reference("vpcId", e))?;
    validate_zone(&body.zone)?;
    let pool = AddressPool::parse(&body.cidr_block)?;
    if let Some(name) = &body.name {
        validate_name(name)?;
    }
    let token = ClientToken::new(me.id.as_str(), "subnets", body.client_token.as_deref(), &body)?;
    let (id, now, region) = (SubnetId::generate(&seed()?), now(), st.region().to_string());
    let outcome = st
        .write(move |tx| {
            create_once(tx, token.as_ref(), now, |tx| {
                let vpc = get_owned::<trellis_model::Vpc>(tx, &me.id, vpc_id.as_str(), "VPC")?;
                let siblings = tx.list_obj::<Subnet>(&Filter::reference(vpc.id.as_str()))?;
                if let Some(s) = siblings.iter().find(|s| s.zone == body.zone) {
                    return Err(ApiError::conflict(
                        "ZoneTaken",
                        format!(
                            "VPC {} already has subnet {} in zone {}; a VPC has one subnet per zone",
                            vpc.id, s.id, s.zone
                        ),
                    ));
                }
                if let Some(s) = siblings.iter().find(|s| {
                    s.cidr_block.net().contains(&pool.net().network())
                        || pool.net().contains(&s.cidr_block.net().network())
                }) {
                    return Err(ApiError::conflict(
                        "CidrOverlap",
                        format!(
                            "cidrBlock {pool} overlaps {} of subnet {} in the same VPC; pick a separate block",
                            s.cidr_block, s.id
                        ),
                    ));
                }
                let subnet = Subnet::new(
                    id.clone(),
                    me.id.clone(),
                    vpc.id,
                    body.zone.clone(),
                    pool,
                    body.name.clone(),
                    &region,
                    now,
                );
                tx.insert_obj(&subnet)?;
                Ok(subnet)
            })
            .map(|o| match o {
                super::Created::New(s) => Ok(super::Created::New(s)),
                super::Created::Replayed(s) => with_count(tx, s).map(super::Created::Replayed),
            })?
        })
        .await?;
    Ok(created(outcome))
}

async fn list(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    Query(q): Query<VpcListQuery>,
) -> Result<Json<Page<Subnet>>, ApiError> {
    let vpc =
        q.vpc_id.as_deref().map(VpcId::parse).transpose().map_err(|e| ApiError::bad_request(format!("vpcId: {e}")))?;
    let page = st
        .read(move |tx| {
            let filter = match &vpc {
                Some(v) => Filter::account_and_reference(me.id.as_str(), v.as_str()),
                None => Filter::account(me.id.as_str()),
            };
            let page = list_page::<Subnet>(tx, filter, &q.paging())?;
            let items = page.items.into_iter().map(|s| with_count(tx, s)).collect::<Result<Vec<_>, _>>()?;
            Ok(Page { items, next_token: page.next_token })
        })
        .await?;
    Ok(Json(page))
}

async fn read(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<Json<Subnet>, ApiError> {
    let id: SubnetId = path_id(&raw)?;
    st.read(move |tx| {
        let s = get_owned::<Subnet>(tx, &me.id, id.as_str(), "subnet")?;
        with_count(tx, s)
    })
    .await
    .map(Json)
}

async fn delete(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<StatusCode, ApiError> {
    let id: SubnetId = path_id(&raw)?;
    st.write(move |tx| {
        let subnet = get_owned::<Subnet>(tx, &me.id, id.as_str(), "subnet")?;
        for (kind, what) in
            [(ResourceGateway::KIND, "resource gateways"), (VpcEndpoint::KIND, "VPC endpoints"), (AGENT_KIND, "agents")]
        {
            let n = count_refs(tx, kind, subnet.id.as_str())?;
            if n > 0 {
                return Err(ApiError::conflict(
                    "ResourceInUse",
                    format!("subnet {} is still used by {n} {what}; delete them first", subnet.id),
                ));
            }
        }
        // Join tokens for the subnet can never enroll an agent once it is gone.
        for token in tx.list(AGENT_TOKEN_KIND, &Filter::reference(subnet.id.as_str()))? {
            tx.delete(AGENT_TOKEN_KIND, &token.id)?;
        }
        tx.delete_obj::<Subnet>(subnet.id.as_str())?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}
