//! VPC endpoints of type `Resource`: a consumer's addresses and DNS names for
//! a resource configuration it owns or that is shared with it and accepted.
//!
//! At create, each resource (the SINGLE configuration, or every CHILD of a
//! GROUP) gets one address per endpoint subnet from that subnet's pool; the
//! endpoint starts `Pending` and turns `Available` when an agent reports its
//! listeners ready. Deleting the endpoint frees its addresses.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use trellis_api::VpcListQuery;
use trellis_api::endpoints::{self, CreateEndpoint};
use trellis_model::{
    Account, AccountId, ConfigurationType, EndpointState, Pools, PrivateDnsPreference, ResourceConfiguration,
    ResourceConfigurationId, ResourceGateway, Subnet, Timestamp, Vpc, VpcEndpoint, VpcEndpointId, VpcEndpointServiceId,
    VpcEndpointType, VpcId, check_zone_overlap, clip_echo, kinds, parse_identifier, parse_service_name,
    plan_dns_entries, plan_interface_entries, validate_domain_name,
};
use trellis_store::{Filter, Tx, TxExt};

use super::configurations::{access_to, children};
use super::gateways::{parse_subnet_ids, subnets_in_vpc};
use super::idempotency::create_once;
use super::services::visible_service;
use super::subnets::used_addresses;
use super::{
    ClientToken, Json, Page, Paged, PathId, Query, Routes, created, get_owned, list_page, no_duplicates, path_id,
};
use crate::auth::AccountAuth;
use crate::compile::{LISTENER_BUDGET_REASON, listener_budget_exceeded};
use crate::error::{ApiError, invalid_reference};
use crate::notify::{self, Event, EventKind};
use crate::state::{AppState, now, seed};

pub fn routes() -> Routes {
    Routes::new()
        .at(&endpoints::CREATE, create)
        .at(&endpoints::LIST, list)
        .at(&endpoints::GET, super::read_owned::<VpcEndpoint>)
        .at(&endpoints::DELETE, delete)
}

/// Most domains an endpoint may list in `privateDnsSpecifiedDomains`.
pub const MAX_SPECIFIED_DOMAINS: usize = 10;

/// Checks the private-DNS preference of a create or update.
pub fn private_dns_settings(
    preference: Option<&str>,
    domains: Option<&[String]>,
) -> Result<(PrivateDnsPreference, Vec<String>), ApiError> {
    let invalid = |m: String| ApiError::invalid("ValidationError", m);
    let preference = match preference {
        None | Some("VERIFIED_DOMAINS_ONLY") => PrivateDnsPreference::VerifiedDomainsOnly,
        Some("ALL_DOMAINS") => PrivateDnsPreference::AllDomains,
        Some("SPECIFIED_DOMAINS_ONLY") => PrivateDnsPreference::SpecifiedDomainsOnly,
        Some(other) => {
            return Err(invalid(format!(
                "privateDnsPreference {:?} is not VERIFIED_DOMAINS_ONLY, ALL_DOMAINS or SPECIFIED_DOMAINS_ONLY",
                other.chars().take(64).collect::<String>()
            )));
        }
    };
    let domains = domains.unwrap_or_default();
    if domains.len() > MAX_SPECIFIED_DOMAINS {
        return Err(invalid(format!("privateDnsSpecifiedDomains lists more than {MAX_SPECIFIED_DOMAINS} domains")));
    }
    let domains = domains.iter().map(|d| validate_domain_name(d)).collect::<Result<Vec<_>, _>>()?;
    no_duplicates("privateDnsSpecifiedDomains", &domains)?;
    match (preference, domains.is_empty()) {
        (PrivateDnsPreference::SpecifiedDomainsOnly, true) => Err(invalid(
            "SPECIFIED_DOMAINS_ONLY needs privateDnsSpecifiedDomains, for example [\"example.com\"]".into(),
        )),
        (PrivateDnsPreference::SpecifiedDomainsOnly, false) | (_, true) => Ok((preference, domains)),
        (_, false) => {
            Err(invalid("privateDnsSpecifiedDomains is only for privateDnsPreference SPECIFIED_DOMAINS_ONLY".into()))
        }
    }
}

/// What an endpoint connects to.
enum Target {
    Resource(ResourceConfigurationId),
    Service(VpcEndpointServiceId),
}

fn no_service(name: &str) -> ApiError {
    ApiError::invalid(
        "InvalidServiceName",
        format!(
            "service {name:?} was not found or does not allow your account; \
             GET /v1/vpcendpointservices/available lists the services you may connect to"
        ),
    )
}

/// Creates an Interface endpoint to a service that allows `me`: one address
/// per subnet, a regional and a zonal name per subnet; `PendingAcceptance`
/// when the provider accepts each endpoint (its own endpoints excepted).
fn create_interface(
    tx: &mut dyn Tx,
    me: &Account,
    mut endpoint: VpcEndpoint,
    subnets: &[Subnet],
    region: &str,
    now: Timestamp,
) -> Result<VpcEndpoint, ApiError> {
    let Some(service_id) = endpoint.service_id.clone() else {
        return Err(ApiError::internal("an Interface endpoint without a service"));
    };
    let service = visible_service(tx, me, &service_id).map_err(|_| no_service(service_id.as_str()))?;
    let mut service_subnets = Vec::new();
    for sid in &service.subnet_ids {
        service_subnets.extend(tx.get_obj::<Subnet>(sid.as_str())?);
    }
    check_zone_overlap(subnets, &service_subnets)?;
    let mut used = Vec::new();
    for s in subnets {
        used.extend(used_addresses(tx, &s.id)?.into_iter().map(|ip| (s.id.clone(), ip.into())));
    }
    endpoint.dns_entries = plan_interface_entries(&endpoint.id, &service.id, region, subnets, &mut Pools::new(used))?;
    endpoint.service_name = Some(service.service_name.clone());
    endpoint.service_owner_id = Some(service.account_id.clone());
    endpoint.state = if service.acceptance_required && service.account_id != me.id {
        EndpointState::PendingAcceptance
    } else {
        EndpointState::Pending
    };
    tx.insert_obj(&endpoint)?;
    // Connect, then Accept at once when nobody needs to accept it (as AWS's auto-accept does).
    notify::record(tx, &Event::endpoint(EventKind::Connect, &endpoint), now)?;
    if endpoint.state == EndpointState::Pending {
        notify::record(tx, &Event::endpoint(EventKind::Accept, &endpoint), now)?;
    }
    Ok(endpoint)
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
    let kind = match body.vpc_endpoint_type.as_str() {
        "Resource" => VpcEndpointType::Resource,
        "Interface" => VpcEndpointType::Interface,
        other => {
            return Err(ApiError::invalid(
                "ValidationError",
                format!("vpcEndpointType {:?} is not supported; use \"Resource\" or \"Interface\"", clip_echo(other)),
            ));
        }
    };
    let vpc_id = VpcId::parse(&body.vpc_id).map_err(|e| invalid_reference("vpcId", e))?;
    let subnet_ids = parse_subnet_ids(&body.subnet_ids)?;
    let target = match (kind, &body.resource_configuration_arn, &body.service_name) {
        (VpcEndpointType::Resource, Some(arn), None) => Target::Resource(
            parse_identifier(arn, kinds::RESOURCE_CONFIGURATION)
                .map_err(|e| invalid_reference("resourceConfigurationArn", e))?,
        ),
        (VpcEndpointType::Interface, None, Some(name)) => {
            Target::Service(parse_service_name(st.region(), name).ok_or_else(|| no_service(&clip_echo(name)))?)
        }
        (VpcEndpointType::Resource, _, _) => {
            return Err(ApiError::invalid(
                "ValidationError",
                "a Resource endpoint takes resourceConfigurationArn (and no serviceName)",
            ));
        }
        (VpcEndpointType::Interface, _, _) => {
            return Err(ApiError::invalid(
                "ValidationError",
                "an Interface endpoint takes serviceName (and no resourceConfigurationArn)",
            ));
        }
    };
    let (dns_preference, dns_domains) =
        private_dns_settings(body.private_dns_preference.as_deref(), body.private_dns_specified_domains.as_deref())?;
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
                // Everything but what it connects to, its names and addresses.
                let mut endpoint = VpcEndpoint {
                    arn: VpcEndpoint::arn_for(&region, &me.id, &id),
                    vpc_endpoint_id: id.clone(),
                    id: id.clone(),
                    account_id: me.id.clone(),
                    vpc_endpoint_type: VpcEndpointType::Resource,
                    vpc_id: vpc.id.clone(),
                    subnet_ids: subnet_ids.clone(),
                    resource_configuration_arn: None,
                    resource_configuration_id: None,
                    resource_configuration_owner_id: None,
                    service_id: None,
                    service_name: None,
                    service_owner_id: None,
                    private_dns_enabled: body.private_dns_enabled,
                    private_dns_preference: dns_preference,
                    private_dns_specified_domains: dns_domains.clone(),
                    state: EndpointState::Pending,
                    failure_reason: None,
                    dns_entries: Vec::new(),
                    created_at: now,
                };
                let config_id = match &target {
                    Target::Resource(config_id) => config_id,
                    Target::Service(service_id) => {
                        endpoint.vpc_endpoint_type = VpcEndpointType::Interface;
                        endpoint.service_id = Some(service_id.clone());
                        return create_interface(tx, &me, endpoint, &subnets, &region, now);
                    }
                };
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
                if let Some(reason) = listener_budget_exceeded(&resources) {
                    return Err(ApiError::invalid("ListenerLimitExceeded", reason));
                }
                for s in &subnets {
                    let cap = s.cidr_block.per_endpoint_cap();
                    if resources.len() as u64 > cap {
                        return Err(ApiError::invalid(
                            "AddressLimitExceeded",
                            format!(
                                "{} has {} resources but an endpoint may hold at most {cap} addresses of subnet {}'s \
                                 pool {}; use a subnet with a larger cidrBlock",
                                config.id,
                                resources.len(),
                                s.id,
                                s.cidr_block
                            ),
                        ));
                    }
                }
                let mut used = Vec::new();
                for s in &subnets {
                    used.extend(used_addresses(tx, &s.id)?.into_iter().map(|ip| (s.id.clone(), ip.into())));
                }
                let refs: Vec<&ResourceConfiguration> = resources.iter().collect();
                let dns_entries =
                    plan_dns_entries(&id, &region, &refs, &subnets, body.private_dns_enabled, &mut Pools::new(used))?;
                endpoint.resource_configuration_arn = Some(config.arn.clone());
                endpoint.resource_configuration_id = Some(config.id.clone());
                endpoint.resource_configuration_owner_id = Some(config.account_id.clone());
                endpoint.dns_entries = dns_entries;
                tx.insert_obj(&endpoint)?;
                notify::record(tx, &Event::resource_endpoint_created(&endpoint), now)?;
                Ok(endpoint)
            })
        })
        .await?;
    Ok(created(outcome))
}

async fn list(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    Query(q): Query<VpcListQuery>,
) -> Result<Json<Page<VpcEndpoint>>, ApiError> {
    let vpc =
        q.vpc_id.as_deref().map(VpcId::parse).transpose().map_err(|e| ApiError::bad_request(format!("vpcId: {e}")))?;
    let page = st
        .read(move |tx| {
            let filter = match &vpc {
                Some(v) => Filter::account_and_reference(me.id.as_str(), v.as_str()),
                None => Filter::account(me.id.as_str()),
            };
            list_page::<VpcEndpoint>(tx, filter, &q.paging())
        })
        .await?;
    Ok(Json(page))
}

async fn delete(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<StatusCode, ApiError> {
    let id: VpcEndpointId = path_id(&raw)?;
    let now = now();
    st.write(move |tx| {
        let endpoint = get_owned::<VpcEndpoint>(tx, &me.id, id.as_str(), "VPC endpoint")?;
        notify::record(tx, &Event::endpoint(EventKind::Delete, &endpoint), now)?;
        // The record goes at once, with its addresses; agents stop serving it from their next config.
        endpoint.state.transition(EndpointState::Deleting)?;
        tx.delete_obj::<VpcEndpoint>(endpoint.id.as_str())?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// Marks `Failed` (with a reason) the endpoints of `consumers` on `config` whose account lost access to it.
///
/// Called after a share is deleted, with the share's principals: the work
/// follows the consumers of that share, not every consumer of the resource.
/// Such endpoints keep their record (the consumer deletes it) but no agent
/// serves them any more; re-sharing and accepting lets the agents serve them
/// again and report them `Available`.
pub fn reassess_endpoints_of(
    tx: &mut dyn Tx,
    config: &ResourceConfigurationId,
    consumers: &[AccountId],
) -> Result<(), ApiError> {
    let Some(cfg) = tx.get_obj::<ResourceConfiguration>(config.as_str())? else { return Ok(()) };
    for consumer_id in consumers {
        let Some(consumer) = tx.get_obj::<Account>(consumer_id.as_str())? else { continue };
        if access_to(tx, &consumer, &cfg)?.is_allowed() {
            continue;
        }
        let endpoints =
            tx.list_obj::<VpcEndpoint>(&Filter::account_and_reference(consumer_id.as_str(), config.as_str()))?;
        for mut endpoint in endpoints.into_iter().filter(|e| e.is_for_configuration(config)) {
            if endpoint.state == EndpointState::Failed {
                continue;
            }
            if let Ok(state) = endpoint.state.transition(EndpointState::Failed) {
                endpoint.state = state;
                endpoint.failure_reason =
                    Some(format!("resource configuration {config} is no longer shared with account {}", consumer.id));
                tx.update_obj(&endpoint)?;
            }
        }
    }
    Ok(())
}

/// Fails an endpoint whose resources ask for more listening ports than one
/// endpoint may have (the consumer sees why in `failureReason`; its agents
/// serve nothing of it), and lifts that failure once they no longer do.
pub fn reassess_listener_budget(tx: &mut dyn Tx, endpoint: &mut VpcEndpoint) -> Result<(), ApiError> {
    let mut resources = Vec::new();
    for id in endpoint.resource_ids() {
        resources.extend(tx.get_obj::<ResourceConfiguration>(id.as_str())?);
    }
    let over = listener_budget_exceeded(&resources);
    let failed_for_budget = endpoint.state == EndpointState::Failed
        && endpoint.failure_reason.as_deref().is_some_and(|r| r.starts_with(LISTENER_BUDGET_REASON));
    match over {
        Some(reason)
            if endpoint.failure_reason.as_ref() != Some(&reason)
                && (endpoint.state.can_move_to(EndpointState::Failed) || failed_for_budget) =>
        {
            endpoint.state = EndpointState::Failed;
            endpoint.failure_reason = Some(reason);
            tx.update_obj(endpoint)?;
        }
        None if failed_for_budget => {
            endpoint.state = endpoint.state.transition(EndpointState::Pending)?;
            endpoint.failure_reason = None;
            tx.update_obj(endpoint)?;
        }
        _ => {}
    }
    Ok(())
}

impl super::Owned for VpcEndpoint {
    type Id = VpcEndpointId;
    const WHAT: &'static str = "VPC endpoint";
}
