//! Endpoint services (`vpce-svc-`): the provider → customer direction.
//!
//! A provider publishes a service run by its agents in the service's subnets
//! (they balance connections over the targets and check their health),
//! allows principals (`*` = any account), and accepts or rejects the Interface
//! endpoints consumers create to it (`api/endpoints.rs`). Removing a principal
//! or rejecting an endpoint revokes like an unshare: the next compile of the
//! provider's agents lists the endpoint as revoked, so new connections are
//! refused and open ones closed.
//!
//! Only allowed principals see a service (in `available`, or as an endpoint's
//! target); anyone else gets the same 404 as for a service that does not exist.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use trellis_api::configurations::UsageItem;
use trellis_api::services::{
    self, AvailableService, Connection, ConnectionIds, ConnectionOutcome, CreateService, HealthCheckInput, LimitsInput,
    ModifyPermissions, Permissions, PortInput, ServiceUsage, TargetInput, UnsuccessfulItem, UpdateService,
};
use trellis_model::{
    Account, AccountId, Agent, AgentStatus, ConsumerLimits, EndpointState, HealthCheck, HealthCheckProtocol,
    LoadBalancing, ProxyProtocol, ServiceSettingError, ServiceState, ServiceTarget, Subnet, TargetHealthView,
    VpcEndpoint, VpcEndpointId, VpcEndpointService, VpcEndpointServiceId, name_is_under, validate_health_check,
    validate_limits, validate_name, validate_ports, validate_principals, validate_private_dns_name, validate_targets,
};
use trellis_store::{Filter, Tx, TxExt};

use super::gateways::{parse_subnet_ids, subnets_in_vpc};
use super::idempotency::create_once;
use super::{ClientToken, Json, ListQuery, Page, PathId, Query, Routes, created, get_owned, path_id};
use crate::agents::records::TargetHealthRecord;
use crate::auth::AccountAuth;
use crate::error::{ApiError, invalid_reference};
use crate::notify::{self, Event, EventKind};
use crate::state::{AppState, now, seed};

pub fn routes() -> Routes {
    Routes::new()
        .at(&services::CREATE, create)
        .at(&services::LIST, super::list_owned::<VpcEndpointService>)
        .at(&services::AVAILABLE, available)
        .at(&services::GET, read)
        .at(&services::UPDATE, update)
        .at(&services::DELETE, delete)
        .at(&services::PERMISSIONS, permissions)
        .at(&services::MODIFY_PERMISSIONS, modify_permissions)
        .at(&services::CONNECTIONS, connections)
        .at(&services::ACCEPT, accept)
        .at(&services::REJECT, reject)
        .at(&services::USAGE, usage)
}

impl super::Owned for VpcEndpointService {
    type Id = VpcEndpointServiceId;
    const WHAT: &'static str = "endpoint service";
}

impl From<ServiceSettingError> for ApiError {
    fn from(e: ServiceSettingError) -> Self {
        ApiError::invalid("ValidationError", e.to_string())
    }
}

/// Most subnets whose agents run one service.
const MAX_SERVICE_SUBNETS: usize = 16;

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::invalid("ValidationError", message.into())
}

fn checked_targets(targets: &[TargetInput]) -> Result<Vec<ServiceTarget>, ApiError> {
    let parsed = targets
        .iter()
        .enumerate()
        .map(|(i, t)| match (&t.ip_address, &t.domain_name) {
            (Some(ip), None) => ip.parse::<IpAddr>().map(ServiceTarget::IpAddress).map_err(|_| {
                invalid(format!(
                    "targets[{i}].ipAddress {:?} is not an IP address; write one like 10.0.1.5",
                    trellis_model::clip_echo(ip)
                ))
            }),
            (None, Some(name)) => Ok(ServiceTarget::DomainName(name.clone())),
            _ => Err(invalid(format!("targets[{i}] needs exactly one of ipAddress and domainName"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(validate_targets(&parsed)?)
}

fn checked_ports(ports: &[PortInput]) -> Result<Vec<trellis_model::ServicePort>, ApiError> {
    let pairs: Vec<(u32, Option<u32>)> = ports.iter().map(|p| (p.port, p.target_port)).collect();
    Ok(validate_ports(&pairs)?)
}

fn checked_health(input: Option<&HealthCheckInput>, base: &HealthCheck) -> Result<HealthCheck, ApiError> {
    let Some(input) = input else { return Ok(base.clone()) };
    let protocol = match input.protocol.as_deref() {
        None => base.protocol,
        Some("TCP") => HealthCheckProtocol::Tcp,
        Some("HTTP") => HealthCheckProtocol::Http,
        Some(other) => {
            return Err(invalid(format!(
                "healthCheck.protocol {:?} is not TCP or HTTP",
                trellis_model::clip_echo(other)
            )));
        }
    };
    let port = match input.port {
        None => base.port,
        Some(p) => Some(
            u16::try_from(p)
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| invalid(format!("healthCheck.port {p} is not a port from 1 to 65535")))?,
        ),
    };
    // A protocol change drops a path that only the old protocol took.
    let path = match (&input.path, protocol) {
        (Some(p), _) => Some(p.clone()),
        (None, HealthCheckProtocol::Http) if base.protocol == HealthCheckProtocol::Http => base.path.clone(),
        (None, _) => None,
    };
    let check = HealthCheck {
        protocol,
        port,
        path,
        interval_seconds: input.interval_seconds.unwrap_or(base.interval_seconds),
        timeout_seconds: input.timeout_seconds.unwrap_or(base.timeout_seconds),
        healthy_threshold_count: input.healthy_threshold_count.unwrap_or(base.healthy_threshold_count),
        unhealthy_threshold_count: input.unhealthy_threshold_count.unwrap_or(base.unhealthy_threshold_count),
    };
    Ok(validate_health_check(&check)?)
}

fn parse_load_balancing(raw: &str) -> Result<LoadBalancing, ApiError> {
    match raw {
        "LEAST_CONNECTIONS" => Ok(LoadBalancing::LeastConnections),
        "ROUND_ROBIN" => Ok(LoadBalancing::RoundRobin),
        "SOURCE_HASH" => Ok(LoadBalancing::SourceHash),
        other => Err(invalid(format!(
            "loadBalancing {:?} is not LEAST_CONNECTIONS, ROUND_ROBIN or SOURCE_HASH",
            trellis_model::clip_echo(other)
        ))),
    }
}

pub fn parse_proxy_protocol(raw: &str) -> Result<ProxyProtocol, ApiError> {
    match raw {
        "NONE" => Ok(ProxyProtocol::None),
        "V2" => Ok(ProxyProtocol::V2),
        other => Err(invalid(format!("proxyProtocol {:?} is not NONE or V2", trellis_model::clip_echo(other)))),
    }
}

/// Per-consumer limits from the API's shape (`{}` = none).
pub fn checked_limits(input: &LimitsInput) -> Result<Option<ConsumerLimits>, ApiError> {
    let limits =
        ConsumerLimits { max_connections: input.max_connections, max_bits_per_second: input.max_bits_per_second };
    Ok(validate_limits(&limits)?)
}

/// A private DNS name the provider may publish: under one of its verified domains.
fn checked_private_dns_name(tx: &mut dyn Tx, owner: &AccountId, name: &str) -> Result<String, ApiError> {
    let name = validate_private_dns_name(name)?;
    let verified = crate::domain_verification::verified_domains(tx, owner)?;
    if verified.iter().any(|d| name_is_under(&name, d)) {
        return Ok(name);
    }
    Err(ApiError::invalid(
        "DomainNotVerified",
        format!(
            "privateDnsName {name} is not under a verified domain of your account; verify its domain first \
             (POST /v1/domainverifications, then publish the TXT record it answers)"
        ),
    ))
}

async fn create(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    Json(body): Json<CreateService>,
) -> Result<Response, ApiError> {
    validate_name(&body.name)?;
    let vpc_id = trellis_model::VpcId::parse(&body.vpc_id).map_err(|e| invalid_reference("vpcId", e))?;
    let subnet_ids = parse_subnet_ids(&body.subnet_ids)?;
    if subnet_ids.len() > MAX_SERVICE_SUBNETS {
        return Err(invalid(format!("subnetIds: at most {MAX_SERVICE_SUBNETS} subnets (one per zone is enough)")));
    }
    let targets = checked_targets(&body.targets)?;
    let ports = checked_ports(&body.ports)?;
    let health_check = checked_health(body.health_check.as_ref(), &HealthCheck::default())?;
    let load_balancing = body.load_balancing.as_deref().map(parse_load_balancing).transpose()?.unwrap_or_default();
    let proxy_protocol = body.proxy_protocol.as_deref().map(parse_proxy_protocol).transpose()?.unwrap_or_default();
    let per_consumer_limits = body.per_consumer_limits.as_ref().map(checked_limits).transpose()?.flatten();
    let token = ClientToken::new(me.id.as_str(), "vpcendpointservices", body.client_token.as_deref(), &body)?;
    let (id, now, region) = (VpcEndpointServiceId::generate(&seed()?), now(), st.region().to_string());
    let outcome = st
        .write(move |tx| {
            create_once(tx, token.as_ref(), now, |tx| {
                let vpc = get_owned::<trellis_model::Vpc>(tx, &me.id, vpc_id.as_str(), "VPC")?;
                subnets_in_vpc(tx, &me.id, &vpc.id, &subnet_ids)?;
                let private_dns_name =
                    body.private_dns_name.as_deref().map(|n| checked_private_dns_name(tx, &me.id, n)).transpose()?;
                let service = VpcEndpointService {
                    id: id.clone(),
                    service_id: id.clone(),
                    service_name: trellis_model::service_name(&region, &id),
                    arn: VpcEndpointService::arn_for(&region, &me.id, &id),
                    account_id: me.id.clone(),
                    name: body.name.clone(),
                    vpc_id: vpc.id,
                    subnet_ids: subnet_ids.clone(),
                    targets: targets.clone(),
                    ports: ports.clone(),
                    acceptance_required: body.acceptance_required.unwrap_or(true),
                    load_balancing,
                    health_check: health_check.clone(),
                    proxy_protocol,
                    per_consumer_limits,
                    private_dns_name,
                    allowed_principals: Vec::new(),
                    state: ServiceState::Available,
                    target_health: Vec::new(),
                    created_at: now,
                };
                tx.insert_obj(&service)?;
                Ok(service)
            })
        })
        .await?;
    Ok(created(outcome))
}

/// The health of `service`'s targets as its online agents last reported it.
fn target_health(tx: &mut dyn Tx, service: &VpcEndpointService) -> Result<Vec<TargetHealthView>, ApiError> {
    let records: Vec<TargetHealthRecord> =
        tx.list_obj(&Filter::account_and_reference(service.account_id.as_str(), service.id.as_str()))?;
    let mut views: BTreeMap<(String, u16, String), TargetHealthView> = BTreeMap::new();
    for record in records {
        let serving = tx
            .get_obj::<Agent>(record.agent_id.as_str())?
            .is_some_and(|a| a.status == AgentStatus::Online && service.subnet_ids.contains(&a.subnet_id));
        if !serving {
            continue;
        }
        for t in record.targets.iter().filter(|t| t.service_id == service.id.as_str()) {
            let view =
                views.entry((t.target.clone(), t.target_port, t.state.clone())).or_insert_with(|| TargetHealthView {
                    target: t.target.clone(),
                    target_port: t.target_port,
                    state: t.state.clone(),
                    agents: 0,
                    reason: None,
                });
            view.agents += 1;
            if view.reason.is_none() {
                view.reason.clone_from(&t.reason);
            }
        }
    }
    Ok(views.into_values().collect())
}

async fn read(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<Json<VpcEndpointService>, ApiError> {
    let id: VpcEndpointServiceId = path_id(&raw)?;
    let service = st
        .read(move |tx| {
            let mut service = get_owned::<VpcEndpointService>(tx, &me.id, id.as_str(), "endpoint service")?;
            service.target_health = target_health(tx, &service)?;
            Ok(service)
        })
        .await?;
    Ok(Json(service))
}

async fn update(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
    Json(body): Json<UpdateService>,
) -> Result<Json<VpcEndpointService>, ApiError> {
    let id: VpcEndpointServiceId = path_id(&raw)?;
    let targets = body.targets.as_deref().map(checked_targets).transpose()?;
    let ports = body.ports.as_deref().map(checked_ports).transpose()?;
    let load_balancing = body.load_balancing.as_deref().map(parse_load_balancing).transpose()?;
    let proxy_protocol = body.proxy_protocol.as_deref().map(parse_proxy_protocol).transpose()?;
    let limits = body.per_consumer_limits.as_ref().map(checked_limits).transpose()?;
    let service = st
        .write(move |tx| {
            let mut service = get_owned::<VpcEndpointService>(tx, &me.id, id.as_str(), "endpoint service")?;
            service.health_check = checked_health(body.health_check.as_ref(), &service.health_check)?;
            if let Some(t) = &targets {
                service.targets.clone_from(t);
            }
            if let Some(p) = &ports {
                service.ports.clone_from(p);
            }
            if let Some(a) = body.acceptance_required {
                service.acceptance_required = a;
            }
            if let Some(lb) = load_balancing {
                service.load_balancing = lb;
            }
            if let Some(pp) = proxy_protocol {
                service.proxy_protocol = pp;
            }
            if let Some(l) = limits {
                service.per_consumer_limits = l;
            }
            match body.private_dns_name.as_deref() {
                None => {}
                Some("") => service.private_dns_name = None,
                Some(name) => service.private_dns_name = Some(checked_private_dns_name(tx, &me.id, name)?),
            }
            tx.update_obj(&service)?;
            service.target_health = target_health(tx, &service)?;
            Ok(service)
        })
        .await?;
    Ok(Json(service))
}

/// Every endpoint of `service` (any account).
fn endpoints_of(tx: &mut dyn Tx, service: &VpcEndpointServiceId) -> Result<Vec<VpcEndpoint>, ApiError> {
    let endpoints: Vec<VpcEndpoint> = tx.list_obj(&Filter::reference(service.as_str()))?;
    Ok(endpoints.into_iter().filter(|e| e.service_id.as_ref() == Some(service)).collect())
}

async fn delete(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<StatusCode, ApiError> {
    let id: VpcEndpointServiceId = path_id(&raw)?;
    st.write(move |tx| {
        let service = get_owned::<VpcEndpointService>(tx, &me.id, id.as_str(), "endpoint service")?;
        let active: Vec<String> = endpoints_of(tx, &service.id)?
            .into_iter()
            .filter(|e| !matches!(e.state, EndpointState::Rejected | EndpointState::Deleting))
            .map(|e| e.id.to_string())
            .collect();
        if !active.is_empty() {
            return Err(ApiError::conflict(
                "DependencyViolation",
                format!(
                    "service {} has {} endpoint(s) that are not rejected ({}); reject them first \
                     (POST /v1/vpcendpointservices/{}/connections/reject)",
                    service.id,
                    active.len(),
                    active.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                    service.id
                ),
            ));
        }
        tx.delete_obj::<VpcEndpointService>(service.id.as_str())?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

fn permissions_of(service: &VpcEndpointService) -> Permissions {
    Permissions { service_id: service.id.to_string(), allowed_principals: service.allowed_principals.clone() }
}

async fn permissions(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<Json<Permissions>, ApiError> {
    let id: VpcEndpointServiceId = path_id(&raw)?;
    let service =
        st.read(move |tx| get_owned::<VpcEndpointService>(tx, &me.id, id.as_str(), "endpoint service")).await?;
    Ok(Json(permissions_of(&service)))
}

async fn modify_permissions(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
    Json(body): Json<ModifyPermissions>,
) -> Result<Json<Permissions>, ApiError> {
    let id: VpcEndpointServiceId = path_id(&raw)?;
    let add = validate_principals(&body.add_allowed_principals)
        .map_err(|e| invalid(format!("addAllowedPrincipals: {}", e.message)))?;
    let remove = validate_principals(&body.remove_allowed_principals)
        .map_err(|e| invalid(format!("removeAllowedPrincipals: {}", e.message)))?;
    if let Some(both) = add.iter().find(|p| remove.contains(p)) {
        return Err(invalid(format!("{both} is both added and removed; list it once")));
    }
    let service = st
        .write(move |tx| {
            let mut service = get_owned::<VpcEndpointService>(tx, &me.id, id.as_str(), "endpoint service")?;
            let mut principals: BTreeSet<String> = service.allowed_principals.iter().cloned().collect();
            principals.extend(add.iter().cloned());
            for p in &remove {
                principals.remove(p);
            }
            if principals.len() > trellis_model::MAX_PRINCIPALS {
                return Err(invalid(format!(
                    "a service may allow at most {} principals; use * to allow any account",
                    trellis_model::MAX_PRINCIPALS
                )));
            }
            service.allowed_principals = principals.into_iter().collect();
            tx.update_obj(&service)?;
            if !remove.is_empty() {
                fail_disallowed_endpoints(tx, &service)?;
            }
            Ok(service)
        })
        .await?;
    Ok(Json(permissions_of(&service)))
}

/// Marks `Failed` (with a reason) the endpoints whose account the service no
/// longer allows; their agents' next configs revoke them. Re-allowing the
/// account lets them serve again (the consumer's agent reports them back to
/// `Available`).
fn fail_disallowed_endpoints(tx: &mut dyn Tx, service: &VpcEndpointService) -> Result<(), ApiError> {
    for mut endpoint in endpoints_of(tx, &service.id)? {
        if service.allows(&endpoint.account_id) || !endpoint.state.can_move_to(EndpointState::Failed) {
            continue;
        }
        endpoint.state = EndpointState::Failed;
        endpoint.failure_reason =
            Some(format!("account {} is no longer allowed to use service {}", endpoint.account_id, service.id));
        tx.update_obj(&endpoint)?;
    }
    Ok(())
}

/// Loads a service `me` may see: its own, or one that allows it. Anyone else
/// gets the 404 of a service that does not exist.
pub fn visible_service(
    tx: &mut dyn Tx,
    me: &Account,
    id: &VpcEndpointServiceId,
) -> Result<VpcEndpointService, ApiError> {
    match tx.get_obj::<VpcEndpointService>(id.as_str())? {
        Some(s) if s.allows(&me.id) && s.state == ServiceState::Available => Ok(s),
        _ => Err(ApiError::not_found("endpoint service", id.as_str())),
    }
}

async fn available(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    Query(q): Query<ListQuery>,
) -> Result<Json<Page<AvailableService>>, ApiError> {
    let page = st
        .read(move |tx| {
            // One page from each list the account can be in (by its id, by `*`, its own),
            // merged by id: at most three pages read, however many services exist.
            let max = super::page_size(&q)?;
            let after = q.next_token.as_deref();
            let mut found: BTreeMap<String, VpcEndpointService> = BTreeMap::new();
            let filters = [
                Filter::reference(me.id.as_str()).page(after, max + 1),
                Filter::reference("*").page(after, max + 1),
                Filter::account(me.id.as_str()).page(after, max + 1),
            ];
            for filter in &filters {
                for s in tx.list_obj::<VpcEndpointService>(filter)? {
                    if s.allows(&me.id) && s.state == ServiceState::Available {
                        found.insert(s.id.to_string(), s);
                    }
                }
            }
            let found: BTreeMap<String, VpcEndpointService> = found.into_iter().take(max + 1).collect();
            let mut items = Vec::with_capacity(found.len());
            for s in found.into_values() {
                let mut zones = BTreeSet::new();
                for subnet in &s.subnet_ids {
                    zones.extend(tx.get_obj::<Subnet>(subnet.as_str())?.map(|s| s.zone));
                }
                items.push(AvailableService {
                    service_id: s.id.clone(),
                    service_name: s.service_name.clone(),
                    name: s.name.clone(),
                    owner: s.account_id.clone(),
                    ports: AvailableService::ports_of(&s.ports),
                    zones: zones.into_iter().collect(),
                    acceptance_required: s.acceptance_required,
                    private_dns_name: s.private_dns_name.clone(),
                });
            }
            Ok(super::page_of(items, |s: &AvailableService| s.service_id.to_string(), max))
        })
        .await?;
    Ok(Json(page))
}

async fn connections(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
    Query(q): Query<ListQuery>,
) -> Result<Json<Page<Connection>>, ApiError> {
    let id: VpcEndpointServiceId = path_id(&raw)?;
    let page = st
        .read(move |tx| {
            let service = get_owned::<VpcEndpointService>(tx, &me.id, id.as_str(), "endpoint service")?;
            let max = super::page_size(&q)?;
            let endpoints: Vec<VpcEndpoint> =
                tx.list_obj(&Filter::reference(service.id.as_str()).page(q.next_token.as_deref(), max + 1))?;
            let items = endpoints
                .into_iter()
                .filter(|e| e.service_id.as_ref() == Some(&service.id))
                .map(|e| Connection {
                    vpc_endpoint_id: e.id,
                    vpc_endpoint_owner: e.account_id,
                    vpc_endpoint_state: e.state,
                    vpc_id: e.vpc_id,
                    created_at: e.created_at,
                })
                .collect();
            Ok(super::page_of(items, |c: &Connection| c.vpc_endpoint_id.to_string(), max))
        })
        .await?;
    Ok(Json(page))
}

/// What an accept or reject does to one endpoint.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Decision {
    Accept,
    Reject,
}

async fn decide(
    st: AppState,
    me: Account,
    raw: String,
    body: ConnectionIds,
    decision: Decision,
) -> Result<Json<ConnectionOutcome>, ApiError> {
    let id: VpcEndpointServiceId = path_id(&raw)?;
    if body.vpc_endpoint_ids.is_empty() || body.vpc_endpoint_ids.len() > 1000 {
        return Err(invalid("vpcEndpointIds: give 1 to 1000 endpoint ids"));
    }
    let ids: Vec<VpcEndpointId> = body
        .vpc_endpoint_ids
        .iter()
        .map(|e| VpcEndpointId::parse(e))
        .collect::<Result<_, _>>()
        .map_err(|e| invalid_reference("vpcEndpointIds", e))?;
    super::no_duplicates("vpcEndpointIds", &ids)?;
    let now = now();
    let outcome = st
        .write(move |tx| {
            let service = get_owned::<VpcEndpointService>(tx, &me.id, id.as_str(), "endpoint service")?;
            let mut unsuccessful = Vec::new();
            // Every id must name an endpoint of this service, or nothing moves.
            let mut endpoints = Vec::with_capacity(ids.len());
            for ep_id in &ids {
                match tx.get_obj::<VpcEndpoint>(ep_id.as_str())?.filter(|e| e.service_id.as_ref() == Some(&service.id))
                {
                    Some(endpoint) => endpoints.push(endpoint),
                    None => {
                        return Err(invalid(format!(
                            "vpcEndpointIds: {ep_id} is not an endpoint of service {}; \
                             GET /v1/vpcendpointservices/{}/connections lists them",
                            service.id, service.id
                        )));
                    }
                }
            }
            for mut endpoint in endpoints {
                let ep_id = endpoint.id.clone();
                let fail = |error: String| UnsuccessfulItem { vpc_endpoint_id: ep_id.to_string(), error };
                let target = match decision {
                    Decision::Accept if endpoint.state == EndpointState::PendingAcceptance => EndpointState::Pending,
                    Decision::Accept => {
                        unsuccessful.push(fail(format!(
                            "endpoint {ep_id} is {}; only PendingAcceptance endpoints can be accepted",
                            endpoint.state
                        )));
                        continue;
                    }
                    Decision::Reject => EndpointState::Rejected,
                };
                if endpoint.state == target {
                    continue;
                }
                match endpoint.state.transition(target) {
                    Ok(state) => {
                        endpoint.state = state;
                        endpoint.failure_reason = None;
                        tx.update_obj(&endpoint)?;
                        let kind = match decision {
                            Decision::Accept => EventKind::Accept,
                            Decision::Reject => EventKind::Reject,
                        };
                        notify::record(tx, &Event::endpoint(kind, &endpoint), now)?;
                    }
                    Err(e) => unsuccessful.push(fail(e.to_string())),
                }
            }
            Ok(ConnectionOutcome { unsuccessful })
        })
        .await?;
    Ok(Json(outcome))
}

async fn accept(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
    Json(body): Json<ConnectionIds>,
) -> Result<Json<ConnectionOutcome>, ApiError> {
    decide(st, me, raw, body, Decision::Accept).await
}

async fn reject(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
    Json(body): Json<ConnectionIds>,
) -> Result<Json<ConnectionOutcome>, ApiError> {
    decide(st, me, raw, body, Decision::Reject).await
}

async fn usage(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<Json<ServiceUsage>, ApiError> {
    let id: VpcEndpointServiceId = path_id(&raw)?;
    let report = st
        .read(move |tx| {
            let service = get_owned::<VpcEndpointService>(tx, &me.id, id.as_str(), "endpoint service")?;
            let items: Vec<UsageItem> = crate::usage::sum(tx, &service.account_id, service.id.as_str())?;
            Ok(ServiceUsage { service_id: service.id.to_string(), items })
        })
        .await?;
    Ok(Json(report))
}
