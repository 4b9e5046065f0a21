//! VPC endpoints of type `Resource`: a consumer's addresses and DNS names for
//! a resource configuration it owns or that is shared with it and accepted.
//!
//! At create, each resource (the SINGLE configuration, or every CHILD of a
//! GROUP) gets one address per endpoint subnet from that subnet's pool; the
//! endpoint starts `Pending` and turns `Available` when an agent reports its
//! listeners ready. Deleting the endpoint frees its addresses.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use trellis_model::{
    Account, ConfigurationType, EndpointState, Pools, ResourceConfiguration, ResourceConfigurationId, ResourceGateway,
    Subnet, Vpc, VpcEndpoint, VpcEndpointId, VpcEndpointType, VpcId, check_zone_overlap, kinds, parse_identifier,
    plan_dns_entries,
};
use trellis_store::{Filter, Tx, TxExt};

use super::configurations::{access_to, children};
use super::gateways::{parse_subnet_ids, subnets_in_vpc};
use super::idempotency::create_once;
use super::subnets::used_addresses;
use super::{ClientToken, Json, ListQuery, Page, PathId, Query, created, get_owned, paginate, path_id};
use crate::auth::AccountAuth;
use crate::error::{ApiError, invalid_reference};
use crate::state::{AppState, now, seed};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/vpcendpoints", post(create).get(list))
        .route("/v1/vpcendpoints/{id}", get(super::read_owned::<VpcEndpoint>).delete(delete))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateEndpoint {
    pub vpc_endpoint_type: String,
    pub vpc_id: String,
    pub subnet_ids: Vec<String>,
    pub resource_configuration_arn: String,
    #[serde(default)]
    pub private_dns_enabled: bool,
    pub client_token: Option<String>,
}

fn not_shared(id: &str) -> ApiError {
    ApiError::invalid(
        "ResourceNotShared",
        format!(
            "resource configuration {id} was not found or is not shared with your account; \
             ask its owner to share it and accept the invitation"
        ),
    )
}

async fn create(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    Json(body): Json<CreateEndpoint>,
) -> Result<Response, ApiError> {
    if body.vpc_endpoint_type != "Resource" {
        return Err(ApiError::invalid(
            "ValidationError",
            format!("vpcEndpointType {:?} is not supported; use \"Resource\"", body.vpc_endpoint_type),
        ));
    }
    let vpc_id = VpcId::parse(&body.vpc_id).map_err(|e| invalid_reference("vpcId", e))?;
    let subnet_ids = parse_subnet_ids(&body.subnet_ids)?;
    let config_id: ResourceConfigurationId =
        parse_identifier(&body.resource_configuration_arn, kinds::RESOURCE_CONFIGURATION)
            .map_err(|e| invalid_reference("resourceConfigurationArn", e))?;
    let token = ClientToken::new(me.id.as_str(), "vpcendpoints", body.client_token.as_deref(), &body)?;
    let (id, now, region) = (VpcEndpointId::generate(&seed()?), now(), st.region().to_string());
    let outcome = st
        .write(move |tx| {
            create_once(tx, token.as_ref(), now, |tx| {
                let vpc = get_owned::<Vpc>(tx, &me.id, vpc_id.as_str(), "VPC")?;
                let subnets = subnets_in_vpc(tx, &me.id, &vpc.id, &subnet_ids)?;
                for (i, s) in subnets.iter().enumerate() {
                    if let Some(other) = subnets[..i].iter().find(|o| o.zone == s.zone) {
                        return Err(ApiError::invalid(
                            "ValidationError",
                            format!(
                                "subnets {} and {} are both in zone {}; give one subnet per zone",
                                other.id, s.id, s.zone
                            ),
                        ));
                    }
                }
                let config = tx
                    .get_obj::<ResourceConfiguration>(config_id.as_str())?
                    .ok_or_else(|| not_shared(config_id.as_str()))?;
                if !access_to(tx, &me, &config)?.is_allowed() {
                    return Err(not_shared(config_id.as_str()));
                }
                if config.config_type == ConfigurationType::Child {
                    return Err(ApiError::invalid(
                        "ValidationError",
                        format!("{} is a CHILD configuration; create the endpoint for its GROUP", config.id),
                    ));
                }
                if !config.status.is_serving() {
                    return Err(ApiError::conflict(
                        "InvalidState",
                        format!("resource configuration {} is {}; it must be ACTIVE", config.id, config.status),
                    ));
                }
                let gateway = tx
                    .get_obj::<ResourceGateway>(config.resource_gateway_id.as_str())?
                    .ok_or_else(|| ApiError::internal(format!("gateway of {} is missing", config.id)))?;
                let mut gateway_subnets = Vec::new();
                for sid in &gateway.subnet_ids {
                    gateway_subnets.extend(tx.get_obj::<Subnet>(sid.as_str())?);
                }
                check_zone_overlap(&subnets, &gateway_subnets)?;
                let resources = match config.config_type {
                    ConfigurationType::Group => children(tx, &config)?,
                    _ => vec![config.clone()],
                };
                let mut used = Vec::new();
                for s in &subnets {
                    used.extend(used_addresses(tx, &s.id)?.into_iter().map(|ip| (s.id.clone(), ip.into())));
                }
                let refs: Vec<&ResourceConfiguration> = resources.iter().collect();
                let dns_entries =
                    plan_dns_entries(&id, &region, &refs, &subnets, body.private_dns_enabled, &mut Pools::new(used))?;
                let endpoint = VpcEndpoint {
                    arn: VpcEndpoint::arn_for(&region, &me.id, &id),
                    vpc_endpoint_id: id.clone(),
                    id: id.clone(),
                    account_id: me.id.clone(),
                    vpc_endpoint_type: VpcEndpointType::Resource,
                    vpc_id: vpc.id,
                    subnet_ids: subnet_ids.clone(),
                    resource_configuration_arn: config.arn.clone(),
                    resource_configuration_id: config.id.clone(),
                    resource_configuration_owner_id: config.account_id.clone(),
                    private_dns_enabled: body.private_dns_enabled,
                    state: EndpointState::Pending,
                    failure_reason: None,
                    dns_entries,
                    created_at: now,
                };
                tx.insert_obj(&endpoint)?;
                Ok(endpoint)
            })
        })
        .await?;
    Ok(created(outcome))
}

async fn list(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    Query(q): Query<ListQuery>,
) -> Result<Json<Page<VpcEndpoint>>, ApiError> {
    let vpc =
        q.vpc_id.as_deref().map(VpcId::parse).transpose().map_err(|e| ApiError::bad_request(format!("vpcId: {e}")))?;
    let all = st
        .read(move |tx| {
            Ok(tx.list_obj::<VpcEndpoint>(&Filter {
                account_id: Some(me.id.as_str()),
                reference: vpc.as_ref().map(|v| v.as_str()),
            })?)
        })
        .await?;
    Ok(Json(paginate(all, |e| e.id.to_string(), &q)?))
}

async fn delete(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<StatusCode, ApiError> {
    let id: VpcEndpointId = path_id(&raw)?;
    st.write(move |tx| {
        let endpoint = get_owned::<VpcEndpoint>(tx, &me.id, id.as_str(), "VPC endpoint")?;
        // The record goes at once, with its addresses; agents stop serving it from their next config.
        endpoint.state.transition(EndpointState::Deleting)?;
        tx.delete_obj::<VpcEndpoint>(endpoint.id.as_str())?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// Marks `Failed` (with a reason) every endpoint on `config` whose account lost access to it.
///
/// Called after a share is deleted. Such endpoints keep their record (the
/// consumer deletes it) but no agent serves them any more; re-sharing and
/// accepting lets the agents serve them again and report them `Available`.
pub fn reassess_endpoints_of(tx: &mut dyn Tx, config: &ResourceConfigurationId) -> Result<(), ApiError> {
    let Some(cfg) = tx.get_obj::<ResourceConfiguration>(config.as_str())? else { return Ok(()) };
    let endpoints = tx.list_obj::<VpcEndpoint>(&Filter { account_id: None, reference: Some(config.as_str()) })?;
    for mut endpoint in endpoints.into_iter().filter(|e| &e.resource_configuration_id == config) {
        let Some(consumer) = tx.get_obj::<Account>(endpoint.account_id.as_str())? else { continue };
        if access_to(tx, &consumer, &cfg)?.is_allowed() || endpoint.state == EndpointState::Failed {
            continue;
        }
        if let Ok(state) = endpoint.state.transition(EndpointState::Failed) {
            endpoint.state = state;
            endpoint.failure_reason =
                Some(format!("resource configuration {config} is no longer shared with account {}", consumer.id));
            tx.update_obj(&endpoint)?;
        }
    }
    Ok(())
}

impl super::Owned for VpcEndpoint {
    type Id = VpcEndpointId;
    const WHAT: &'static str = "VPC endpoint";
}
