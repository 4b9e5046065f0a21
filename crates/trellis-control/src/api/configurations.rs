//! Resource configurations: SINGLE resources, GROUPs and their CHILDren,
//! behind a resource gateway. Owners manage them; accounts they are shared
//! with (and accepted) may read them.
//!
//! Rules: a CHILD belongs to a GROUP of the same account and inherits its
//! gateway; a CHILD's ports lie within its GROUP's; a GROUP cannot be deleted
//! while it has children. Creating a CHILD gives it an address in every
//! endpoint of its GROUP; deleting it frees them.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use trellis_api::configurations::{self, CreateConfiguration, DefinitionInput, UpdateConfiguration};
use trellis_model::{
    Access, Account, ConfigurationType, ConsumerLimits, DnsResource, EndpointState, IpResource, Pools, Protocol,
    ProxyProtocol, ResourceConfiguration, ResourceConfigurationId, ResourceDefinition, ResourceGateway,
    ResourceGatewayId, ResourceShare, ResourceStatus, ShareStatus, Subnet, VpcEndpoint, kinds, parse_identifier,
    parse_port_ranges, plan_dns_entries, ranges_cover, validate_domain_name, validate_name, validate_resource_ip,
};
use trellis_store::{Filter, Tx, TxExt};

use super::endpoints::reassess_listener_budget;
use super::idempotency::create_once;
use super::services::{checked_limits, parse_proxy_protocol};
use super::subnets::used_addresses;
use super::{
    ClientToken, Json, ListQuery, Page, PathId, Query, Routes, created, get_owned, page_of, page_size, path_id,
};
use crate::auth::AccountAuth;
use crate::error::{ApiError, invalid_reference};
use crate::state::{AppState, now, seed};

pub fn routes() -> Routes {
    Routes::new()
        .at(&configurations::CREATE, create)
        .at(&configurations::LIST, list)
        .at(&configurations::GET, read)
        .at(&configurations::UPDATE, update)
        .at(&configurations::DELETE, delete)
}

/// The definition a `resourceConfigurationDefinition` gives: exactly one of `ipResource` or `dnsResource`.
pub fn definition(input: &DefinitionInput) -> Result<ResourceDefinition, ApiError> {
    match (&input.ip_resource, &input.dns_resource) {
        (Some(ip), None) => {
            Ok(ResourceDefinition::IpResource(IpResource { ip_address: validate_resource_ip(&ip.ip_address)? }))
        }
        (None, Some(dns)) => Ok(ResourceDefinition::DnsResource(DnsResource {
            domain_name: validate_domain_name(&dns.domain_name)?,
            ip_address_type: dns.ip_address_type.unwrap_or_default(),
        })),
        _ => Err(ApiError::invalid(
            "ValidationError",
            "resourceConfigurationDefinition must hold exactly one of ipResource or dnsResource",
        )),
    }
}

fn parse_type(raw: &str) -> Result<ConfigurationType, ApiError> {
    match raw {
        "SINGLE" => Ok(ConfigurationType::Single),
        "GROUP" => Ok(ConfigurationType::Group),
        "CHILD" => Ok(ConfigurationType::Child),
        other => Err(ApiError::invalid("ValidationError", format!("type {other:?} is not SINGLE, GROUP or CHILD"))),
    }
}

/// A create request checked on its own, before the store is consulted.
struct Checked {
    config_type: ConfigurationType,
    gateway: Option<ResourceGatewayId>,
    group: Option<ResourceConfigurationId>,
    definition: Option<ResourceDefinition>,
    port_ranges: Option<Vec<trellis_model::PortRange>>,
    custom_domain_name: Option<String>,
    proxy_protocol: ProxyProtocol,
    per_consumer_limits: Option<ConsumerLimits>,
}

fn check(body: &CreateConfiguration) -> Result<Checked, ApiError> {
    validate_name(&body.name)?;
    let config_type = parse_type(&body.config_type)?;
    if let Some(p) = body.protocol.as_ref().filter(|p| *p != "TCP") {
        return Err(ApiError::invalid("ValidationError", format!("protocol {p:?} is not supported; use TCP")));
    }
    let gateway = body
        .resource_gateway_identifier
        .as_deref()
        .map(|g| parse_identifier::<ResourceGatewayId>(g, kinds::RESOURCE_GATEWAY))
        .transpose()
        .map_err(|e| invalid_reference("resourceGatewayIdentifier", e))?;
    let group = body
        .resource_configuration_group_identifier
        .as_deref()
        .map(|g| parse_identifier::<ResourceConfigurationId>(g, kinds::RESOURCE_CONFIGURATION))
        .transpose()
        .map_err(|e| invalid_reference("resourceConfigurationGroupIdentifier", e))?;
    let definition = body.resource_configuration_definition.as_ref().map(definition).transpose()?;
    let port_ranges = body.port_ranges.as_deref().map(parse_port_ranges).transpose()?;
    let custom_domain_name = body.custom_domain_name.as_deref().map(validate_domain_name).transpose()?;
    if let Some(name) = custom_domain_name.as_deref().filter(|n| trellis_model::is_reserved_dns_name(n)) {
        return Err(ApiError::invalid(
            "ValidationError",
            format!(
                "customDomainName {name} is in the {} zone, which Trellis keeps for the names it generates; \
                 use a name under a domain you own",
                trellis_model::RESERVED_ZONE
            ),
        ));
    }
    let invalid = |m: &str| Err(ApiError::invalid("ValidationError", m.to_string()));
    match config_type {
        ConfigurationType::Single | ConfigurationType::Group => {
            if gateway.is_none() {
                return invalid("resourceGatewayIdentifier is required for SINGLE and GROUP configurations");
            }
            if group.is_some() {
                return invalid("resourceConfigurationGroupIdentifier is only for CHILD configurations");
            }
            if port_ranges.is_none() {
                return invalid("portRanges is required for SINGLE and GROUP configurations, for example [\"5432\"]");
            }
        }
        ConfigurationType::Child => {
            if group.is_none() {
                return invalid("resourceConfigurationGroupIdentifier is required for a CHILD configuration");
            }
            if gateway.is_some() {
                return invalid("a CHILD configuration inherits its GROUP's gateway; omit resourceGatewayIdentifier");
            }
        }
    }
    match (config_type, &definition) {
        (ConfigurationType::Group, Some(_)) => {
            return invalid(
                "a GROUP has no resourceConfigurationDefinition; define its resources as CHILD configurations",
            );
        }
        (ConfigurationType::Single | ConfigurationType::Child, None) => {
            return invalid(
                "resourceConfigurationDefinition is required: {\"ipResource\": {\"ipAddress\": ...}} or {\"dnsResource\": {\"domainName\": ...}}",
            );
        }
        _ => {}
    }
    let proxy_protocol = body.proxy_protocol.as_deref().map(parse_proxy_protocol).transpose()?.unwrap_or_default();
    let per_consumer_limits = body.per_consumer_limits.as_ref().map(checked_limits).transpose()?.flatten();
    if config_type == ConfigurationType::Group
        && (proxy_protocol != ProxyProtocol::None || per_consumer_limits.is_some())
    {
        return invalid(
            "a GROUP carries no traffic itself; set proxyProtocol and perConsumerLimits on its CHILD configurations",
        );
    }
    Ok(Checked {
        config_type,
        gateway,
        group,
        definition,
        port_ranges,
        custom_domain_name,
        proxy_protocol,
        per_consumer_limits,
    })
}

async fn create(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    Json(body): Json<CreateConfiguration>,
) -> Result<Response, ApiError> {
    let checked = check(&body)?;
    let token = ClientToken::new(me.id.as_str(), "resourceconfigurations", body.client_token.as_deref(), &body)?;
    let (id, now, region) = (ResourceConfigurationId::generate(&seed()?), now(), st.region().to_string());
    let outcome = st
        .write(move |tx| {
            create_once(tx, token.as_ref(), now, |tx| {
                let (gateway_id, group, port_ranges) = match checked.config_type {
                    ConfigurationType::Child => {
                        let group_id = checked.group.clone().expect("checked: CHILD has a group");
                        let group = get_owned::<ResourceConfiguration>(
                            tx,
                            &me.id,
                            group_id.as_str(),
                            "resource configuration",
                        )?;
                        if group.config_type != ConfigurationType::Group {
                            return Err(ApiError::invalid(
                                "ValidationError",
                                format!(
                                    "resource configuration {} is {:?}, not a GROUP; a CHILD needs a GROUP",
                                    group.id, group.config_type
                                ),
                            ));
                        }
                        let ranges = match &checked.port_ranges {
                            Some(r) if !ranges_cover(&group.port_ranges, r) => {
                                return Err(ApiError::invalid(
                                    "InvalidPortRange",
                                    format!(
                                        "portRanges must lie within the GROUP's port ranges {}",
                                        fmt_ranges(&group.port_ranges)
                                    ),
                                ));
                            }
                            Some(r) => r.clone(),
                            None => group.port_ranges.clone(),
                        };
                        (group.resource_gateway_id.clone(), Some(group), ranges)
                    }
                    _ => {
                        let gw_id = checked.gateway.clone().expect("checked: SINGLE and GROUP have a gateway");
                        let gw = get_owned::<ResourceGateway>(tx, &me.id, gw_id.as_str(), "resource gateway")?;
                        if !gw.status.is_serving() {
                            return Err(ApiError::conflict(
                                "InvalidState",
                                format!("resource gateway {} is {}; it must be ACTIVE", gw.id, gw.status),
                            ));
                        }
                        (gw.id, None, checked.port_ranges.clone().expect("checked: SINGLE and GROUP have ports"))
                    }
                };
                let config = ResourceConfiguration {
                    arn: ResourceConfiguration::arn_for(&region, &me.id, &id),
                    id: id.clone(),
                    account_id: me.id.clone(),
                    name: body.name.clone(),
                    config_type: checked.config_type,
                    // Nothing to provision: gateway agents serve it from their next config.
                    status: ResourceStatus::CreateInProgress.transition(ResourceStatus::Active)?,
                    resource_gateway_id: gateway_id,
                    resource_configuration_group_id: group.as_ref().map(|g| g.id.clone()),
                    resource_configuration_definition: checked.definition.clone(),
                    port_ranges,
                    protocol: Protocol::Tcp,
                    custom_domain_name: checked.custom_domain_name.clone(),
                    proxy_protocol: checked.proxy_protocol,
                    per_consumer_limits: checked.per_consumer_limits,
                    created_at: now,
                };
                tx.insert_obj(&config)?;
                if let Some(group) = &group {
                    add_child_to_endpoints(tx, group, &config, &region)?;
                }
                Ok(config)
            })
        })
        .await?;
    Ok(created(outcome))
}

fn fmt_ranges(ranges: &[trellis_model::PortRange]) -> String {
    format!("[{}]", ranges.iter().map(|r| format!("\"{r}\"")).collect::<Vec<_>>().join(", "))
}

/// Gives a new CHILD one address per subnet in every endpoint of its GROUP.
///
/// The CHILD is the owner's to create whatever the consumers' pools hold: an
/// endpoint that cannot take one more address in a subnet (its pool is full,
/// or the endpoint holds its share of the pool) goes `Failed` with the reason,
/// keeps serving what it had, and takes nothing from the consumer's other endpoints.
fn add_child_to_endpoints(
    tx: &mut dyn Tx,
    group: &ResourceConfiguration,
    child: &ResourceConfiguration,
    region: &str,
) -> Result<(), ApiError> {
    let endpoints = tx.list_obj::<VpcEndpoint>(&Filter::reference(group.id.as_str()))?;
    for mut endpoint in endpoints.into_iter().filter(|e| e.is_for_configuration(&group.id)) {
        let mut subnets = Vec::new();
        let mut used = Vec::new();
        let mut full = None;
        for id in &endpoint.subnet_ids {
            if let Some(subnet) = tx.get_obj::<Subnet>(id.as_str())? {
                let cap = subnet.cidr_block.per_endpoint_cap();
                if endpoint.addresses_in(id).count() as u64 >= cap {
                    full = Some(format!(
                        "CHILD {} got no address: the endpoint already holds {cap} addresses of subnet {id}, \
                         the most one endpoint may take of its pool {}",
                        child.id, subnet.cidr_block
                    ));
                }
                used.extend(used_addresses(tx, id)?.into_iter().map(|ip| (id.clone(), ip.into())));
                subnets.push(subnet);
            }
        }
        let planned = match full {
            Some(reason) => Err(reason),
            None => plan_dns_entries(
                &endpoint.id,
                region,
                &[child],
                &subnets,
                endpoint.private_dns_enabled,
                &mut Pools::new(used),
            )
            .map_err(|e| format!("CHILD {} got no address: {e}", child.id)),
        };
        match planned {
            Ok(entries) => {
                endpoint.dns_entries.extend(entries);
                tx.update_obj(&endpoint)?;
                reassess_listener_budget(tx, &mut endpoint)?;
            }
            Err(reason) => {
                if endpoint.state.can_move_to(EndpointState::Failed) || endpoint.state == EndpointState::Failed {
                    endpoint.state = EndpointState::Failed;
                    endpoint.failure_reason = Some(reason);
                    tx.update_obj(&endpoint)?;
                }
            }
        }
    }
    Ok(())
}

/// Whether `me` may use `config` (see [`crate::access::access_to`]).
pub fn access_to(tx: &mut dyn Tx, me: &Account, config: &ResourceConfiguration) -> Result<Access, ApiError> {
    Ok(crate::access::access_to(tx, me, config)?)
}

/// One page of the configurations `me` may see: its own (paged by the store)
/// merged with those shared with it and their children (found through the
/// shares that name `me`, so the work follows what was shared with `me`).
fn visible_page(tx: &mut dyn Tx, me: &Account, q: &ListQuery) -> Result<Page<ResourceConfiguration>, ApiError> {
    let max = page_size(q)?;
    let after = q.next_token.as_deref();
    let mut out: BTreeMap<String, ResourceConfiguration> = BTreeMap::new();
    for c in tx.list_obj::<ResourceConfiguration>(&Filter::account(me.id.as_str()).page(after, max + 1))? {
        out.insert(c.id.to_string(), c);
    }
    let beyond = |id: &str| after.is_none_or(|a| id > a);
    let shares = tx.list_obj::<ResourceShare>(&Filter::reference(me.id.as_str()))?;
    for share in shares.iter().filter(|s| s.status == ShareStatus::Active && s.principals.contains(&me.id)) {
        for id in share.resource_configuration_ids() {
            let Some(config) = tx.get_obj::<ResourceConfiguration>(id.as_str())? else { continue };
            if config.account_id != share.account_id || !access_to(tx, me, &config)?.is_allowed() {
                continue;
            }
            if config.config_type == ConfigurationType::Group {
                let children = Filter::account_and_reference(config.account_id.as_str(), id.as_str());
                for child in tx.list_obj::<ResourceConfiguration>(&children.page(after, max + 1))? {
                    if child.resource_configuration_group_id.as_ref() == Some(&config.id) {
                        out.insert(child.id.to_string(), child);
                    }
                }
            }
            if beyond(config.id.as_str()) {
                out.insert(config.id.to_string(), config);
            }
        }
    }
    Ok(page_of(out.into_values().take(max + 1).collect(), |c| c.id.to_string(), max))
}

async fn list(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    Query(q): Query<ListQuery>,
) -> Result<Json<Page<ResourceConfiguration>>, ApiError> {
    st.read(move |tx| visible_page(tx, &me, &q)).await.map(Json)
}

/// Loads a configuration `me` may read (owner, or shared and accepted); 404 otherwise.
pub fn get_visible(tx: &mut dyn Tx, me: &Account, id: &str) -> Result<ResourceConfiguration, ApiError> {
    let not_found = || ApiError::not_found("resource configuration", id);
    let config = tx.get_obj::<ResourceConfiguration>(id)?.ok_or_else(not_found)?;
    if access_to(tx, me, &config)?.is_allowed() { Ok(config) } else { Err(not_found()) }
}

async fn read(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<Json<ResourceConfiguration>, ApiError> {
    let id: ResourceConfigurationId = path_id(&raw)?;
    st.read(move |tx| get_visible(tx, &me, id.as_str())).await.map(Json)
}

async fn update(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
    Json(body): Json<UpdateConfiguration>,
) -> Result<Json<ResourceConfiguration>, ApiError> {
    let id: ResourceConfigurationId = path_id(&raw)?;
    let ranges = body.port_ranges.as_deref().map(parse_port_ranges).transpose()?;
    let definition = body.resource_configuration_definition.as_ref().map(definition).transpose()?;
    let proxy_protocol = body.proxy_protocol.as_deref().map(parse_proxy_protocol).transpose()?;
    let limits = body.per_consumer_limits.as_ref().map(checked_limits).transpose()?;
    st.write(move |tx| {
        let mut config = get_owned::<ResourceConfiguration>(tx, &me.id, id.as_str(), "resource configuration")?;
        if (proxy_protocol.is_some_and(|p| p != ProxyProtocol::None) || limits.is_some_and(|l| l.is_some()))
            && config.config_type == ConfigurationType::Group
        {
            return Err(ApiError::invalid(
                "ValidationError",
                "a GROUP carries no traffic itself; set proxyProtocol and perConsumerLimits on its CHILD configurations",
            ));
        }
        if let Some(p) = proxy_protocol {
            config.proxy_protocol = p;
        }
        if let Some(l) = limits {
            config.per_consumer_limits = l;
        }
        if let Some(definition) = &definition {
            if config.config_type == ConfigurationType::Group {
                return Err(ApiError::invalid(
                    "ValidationError",
                    "a GROUP has no resourceConfigurationDefinition; update its CHILD configurations",
                ));
            }
            config.resource_configuration_definition = Some(definition.clone());
        }
        if let Some(ranges) = &ranges {
            match config.config_type {
                ConfigurationType::Child => {
                    let group_id = config.resource_configuration_group_id.clone().expect("a CHILD has a group");
                    let group =
                        get_owned::<ResourceConfiguration>(tx, &me.id, group_id.as_str(), "resource configuration")?;
                    if !ranges_cover(&group.port_ranges, ranges) {
                        return Err(ApiError::invalid(
                            "InvalidPortRange",
                            format!(
                                "portRanges must lie within the GROUP's port ranges {}",
                                fmt_ranges(&group.port_ranges)
                            ),
                        ));
                    }
                }
                ConfigurationType::Group => {
                    for child in children(tx, &config)? {
                        if !ranges_cover(ranges, &child.port_ranges) {
                            return Err(ApiError::conflict(
                                "ResourceInUse",
                                format!(
                                    "CHILD {} uses ports {} outside the new portRanges; change the child first",
                                    child.id,
                                    fmt_ranges(&child.port_ranges)
                                ),
                            ));
                        }
                    }
                }
                ConfigurationType::Single => {}
            }
            config.port_ranges = ranges.clone();
        }
        tx.update_obj(&config)?;
        if ranges.is_some() {
            // Endpoints that now ask for too many listeners fail (and recover) on their own.
            let shared = crate::access::shared_id(&config).clone();
            for mut endpoint in tx.list_obj::<VpcEndpoint>(&Filter::reference(shared.as_str()))? {
                if endpoint.is_for_configuration(&shared) {
                    reassess_listener_budget(tx, &mut endpoint)?;
                }
            }
        }
        Ok(config)
    })
    .await
    .map(Json)
}

/// The CHILD configurations of a GROUP.
pub fn children(tx: &mut dyn Tx, group: &ResourceConfiguration) -> Result<Vec<ResourceConfiguration>, ApiError> {
    Ok(tx
        .list_obj::<ResourceConfiguration>(&Filter::account_and_reference(
            group.account_id.as_str(),
            group.id.as_str(),
        ))?
        .into_iter()
        .filter(|c| c.resource_configuration_group_id.as_ref() == Some(&group.id))
        .collect())
}

async fn delete(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<StatusCode, ApiError> {
    let id: ResourceConfigurationId = path_id(&raw)?;
    st.write(move |tx| {
        let config = get_owned::<ResourceConfiguration>(tx, &me.id, id.as_str(), "resource configuration")?;
        let endpoints = tx.list_obj::<VpcEndpoint>(&Filter::reference(config.id.as_str()))?;
        match config.config_type {
            ConfigurationType::Group => {
                let n = children(tx, &config)?.len();
                if n > 0 {
                    return Err(ApiError::conflict(
                        "ResourceInUse",
                        format!("GROUP {} still has {n} CHILD configurations; delete them first", config.id),
                    ));
                }
            }
            ConfigurationType::Child => {
                // Free the child's addresses in its group's endpoints.
                for mut endpoint in endpoints.iter().cloned() {
                    endpoint.dns_entries.retain(|e| e.resource_configuration_id.as_ref() != Some(&config.id));
                    tx.update_obj(&endpoint)?;
                }
            }
            ConfigurationType::Single => {}
        }
        if config.config_type != ConfigurationType::Child {
            // Consumers' endpoints stay (theirs to delete) but serve nothing and hold no addresses.
            for mut endpoint in endpoints.into_iter().filter(|e| e.is_for_configuration(&config.id)) {
                endpoint.dns_entries.clear();
                endpoint.state =
                    endpoint.state.transition(trellis_model::EndpointState::Failed).unwrap_or(endpoint.state);
                endpoint.failure_reason =
                    Some(format!("resource configuration {} was deleted by its owner", config.id));
                tx.update_obj(&endpoint)?;
            }
            for mut share in
                tx.list_obj::<ResourceShare>(&Filter::account_and_reference(me.id.as_str(), config.id.as_str()))?
            {
                share.resource_arns.retain(|a| a != &config.arn);
                tx.update_obj(&share)?;
            }
        }
        tx.delete_obj::<ResourceConfiguration>(config.id.as_str())?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}
