//! Resource gateways: points of ingress into an owner's VPC, in one or more of its subnets.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use trellis_api::gateways::{self, CreateGateway};
use trellis_model::{
    AccountId, IpAddressType, ResourceConfiguration, ResourceGateway, ResourceGatewayId, ResourceStatus, Subnet,
    SubnetId, Vpc, VpcId, kinds, parse_identifier, validate_name,
};
use trellis_store::{Object, Tx, TxExt};

use super::idempotency::create_once;
use super::vpcs::count_refs;
use super::{ClientToken, Json, PathId, Routes, created, get_owned, no_duplicates, path_id};
use crate::auth::AccountAuth;
use crate::error::{ApiError, invalid_reference};
use crate::state::{AppState, now, seed};

pub fn routes() -> Routes {
    Routes::new()
        .at(&gateways::CREATE, create)
        .at(&gateways::LIST, super::list_owned::<ResourceGateway>)
        .at(&gateways::GET, super::read_owned::<ResourceGateway>)
        .at(&gateways::DELETE, delete)
}

/// Loads the subnets of `ids`, all owned by `me` and in `vpc`.
pub fn subnets_in_vpc(tx: &mut dyn Tx, me: &AccountId, vpc: &VpcId, ids: &[SubnetId]) -> Result<Vec<Subnet>, ApiError> {
    let mut subnets = Vec::with_capacity(ids.len());
    for id in ids {
        let subnet = get_owned::<Subnet>(tx, me, id.as_str(), "subnet")?;
        if &subnet.vpc_id != vpc {
            return Err(ApiError::invalid(
                "ValidationError",
                format!("subnet {} is in VPC {}, not in VPC {vpc}", subnet.id, subnet.vpc_id),
            ));
        }
        subnets.push(subnet);
    }
    Ok(subnets)
}

/// Parses a list of subnet ids from a body: non-empty, well-formed, no duplicates.
pub fn parse_subnet_ids(raw: &[String]) -> Result<Vec<SubnetId>, ApiError> {
    if raw.is_empty() {
        return Err(ApiError::invalid("ValidationError", "subnetIds is empty: give at least one subnet id"));
    }
    let ids = raw
        .iter()
        .map(|s| SubnetId::parse(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid_reference("subnetIds", e))?;
    no_duplicates("subnetIds", &ids)?;
    Ok(ids)
}

async fn create(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    Json(body): Json<CreateGateway>,
) -> Result<Response, ApiError> {
    validate_name(&body.name)?;
    let vpc_id: VpcId =
        parse_identifier(&body.vpc_identifier, kinds::VPC).map_err(|e| invalid_reference("vpcIdentifier", e))?;
    let subnet_ids = parse_subnet_ids(&body.subnet_ids)?;
    let ip_type = body.ip_address_type.unwrap_or_default();
    if ip_type != IpAddressType::Ipv4 {
        return Err(ApiError::invalid(
            "ValidationError",
            "ipAddressType must be IPV4; other types are not supported yet",
        ));
    }
    let token = ClientToken::new(me.id.as_str(), "resourcegateways", body.client_token.as_deref(), &body)?;
    let (id, now, region) = (ResourceGatewayId::generate(&seed()?), now(), st.region().to_string());
    let outcome = st
        .write(move |tx| {
            create_once(tx, token.as_ref(), now, |tx| {
                let vpc = get_owned::<Vpc>(tx, &me.id, vpc_id.as_str(), "VPC")?;
                subnets_in_vpc(tx, &me.id, &vpc.id, &subnet_ids)?;
                let mut gw = ResourceGateway::new(
                    id.clone(),
                    me.id.clone(),
                    body.name.clone(),
                    vpc.id,
                    subnet_ids.clone(),
                    ip_type,
                    &region,
                    now,
                );
                // Nothing to provision: the gateway agents of its subnets serve it from their next config.
                gw.status = gw.status.transition(ResourceStatus::Active)?;
                tx.insert_obj(&gw)?;
                Ok(gw)
            })
        })
        .await?;
    Ok(created(outcome))
}

async fn delete(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<StatusCode, ApiError> {
    let id: ResourceGatewayId = path_id(&raw)?;
    st.write(move |tx| {
        let gw = get_owned::<ResourceGateway>(tx, &me.id, id.as_str(), "resource gateway")?;
        let n = count_refs(tx, ResourceConfiguration::KIND, gw.id.as_str())?;
        if n > 0 {
            return Err(ApiError::conflict(
                "ResourceInUse",
                format!("resource gateway {} is used by {n} resource configurations; delete them first", gw.id),
            ));
        }
        tx.delete_obj::<ResourceGateway>(gw.id.as_str())?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

impl super::Owned for ResourceGateway {
    type Id = ResourceGatewayId;
    const WHAT: &'static str = "resource gateway";
}
