//! The config compiler: desired state in the store → the one [`AgentConfig`]
//! of one agent.
//!
//! Pure over a store snapshot: it reads through the transaction it is given,
//! never writes, never reads the clock. The version is left at 0; the config
//! cache ([`crate::configs`]) numbers configs and records what each one read,
//! so the reads here decide which writes recompile which agents: read
//! narrowly (by id, or by the most specific reference), never whole kinds.
//!
//! Cost follows the agent's own config: a gateway's compile is linear in the
//! endpoints of its resources (their shares and invitations are loaded once
//! per resource, see [`ShareIndex`]); an endpoint agent's is linear in its
//! own endpoints and what was shared with its account. The store work of a
//! gateway's *re*compile follows what changed: its long lists (endpoints,
//! shares and invitations by reference) are kept decoded by the config cache
//! between compilations and only the records written since are read again
//! ([`crate::lists`]); what remains linear is work in memory.
//!
//! Authorization lives here as much as in the API: a gateway agent lets
//! through exactly the endpoints listed in its config, so a revoked share, a
//! rejected invitation or a deleted endpoint must disappear from the next
//! config this produces.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use trellis_model::{
    Access, Account, AccountId, Agent, AgentStatus, ConfigurationType, EndpointState, PrivateDnsPreference,
    ProxyProtocol, ResourceConfiguration, ResourceConfigurationId, ResourceDefinition, ResourceGateway, ResourceShare,
    ResourceShareInvitation, ServiceState, ServiceTarget, Subnet, VpcEndpoint, VpcEndpointService,
    interface_regional_name, is_reserved_dns_name, name_is_under,
};
use trellis_proto::{
    AgentConfig, AllowedEndpoint, ConsumerVpc, DnsRecord, EndpointConfig, EndpointResource, GatewayResource,
    GatewayRole, GatewayService, GatewayTarget, MAX_LISTENERS_PER_ENDPOINT, PortRange, RevokedEndpoint, Target,
    agent_server_name,
};
use trellis_store::{Filter, StoreError, Tx, TxExt};

use crate::access::{SentInvitations, ShareIndex, access_to, shared_id};
use crate::agents::records::RevokedCert;

/// Whether a gateway or configuration in this status should be in configs.
/// Creating ones are included so a new resource serves as soon as an agent runs.
fn compiles(status: trellis_model::ResourceStatus) -> bool {
    use trellis_model::ResourceStatus::*;
    matches!(status, CreateInProgress | Active | UpdateInProgress | UpdateFailed)
}

/// Whether an endpoint in this state gets listeners and may open streams.
fn endpoint_serves(state: EndpointState) -> bool {
    matches!(state, EndpointState::Pending | EndpointState::Available | EndpointState::Failed)
}

fn port_ranges(ranges: &[trellis_model::PortRange]) -> Vec<PortRange> {
    ranges
        .iter()
        // Both types hold validated ranges, so the conversion cannot fail.
        .filter_map(|r| PortRange::new(r.start(), r.end()).ok())
        .collect()
}

/// Listening sockets a set of resources asks of one agent.
pub fn listeners_needed<'a>(resources: impl IntoIterator<Item = &'a ResourceConfiguration>) -> u32 {
    resources.into_iter().flat_map(|r| r.port_ranges.iter()).map(|p| u32::from(p.end() - p.start()) + 1).sum()
}

/// How the reason of [`listener_budget_exceeded`] starts.
pub const LISTENER_BUDGET_REASON: &str = "the endpoint's resources ask for";

/// Why an endpoint may not listen for `resources` at all, if so.
pub fn listener_budget_exceeded<'a>(resources: impl IntoIterator<Item = &'a ResourceConfiguration>) -> Option<String> {
    let needed = listeners_needed(resources);
    (needed > MAX_LISTENERS_PER_ENDPOINT).then(|| {
        format!(
            "{LISTENER_BUDGET_REASON} {needed} listening ports; an endpoint may have at most \
             {MAX_LISTENERS_PER_ENDPOINT} (ask the resource's owner to narrow its portRanges)"
        )
    })
}

/// Where the long lists of a gateway's compilation come from: the config
/// cache's kept lists ([`crate::lists`]) at the snapshot's revision, or the store.
#[derive(Clone, Copy)]
pub struct KeptLists<'a> {
    pub cache: &'a crate::configs::ConfigCache,
    /// The revision of the snapshot the compilation reads.
    pub revision: u64,
}

/// Memoized reads shared by the parts of one compilation.
struct Snapshot<'a> {
    tx: &'a mut dyn Tx,
    lists: Option<KeptLists<'a>>,
    accounts: HashMap<AccountId, Option<Account>>,
    agents_by_subnet: HashMap<String, Vec<Agent>>,
    sent: HashMap<AccountId, SentInvitations>,
    verified: HashMap<AccountId, Vec<String>>,
    /// Every relay, read once, when an outbound-only agent is involved.
    relays: Option<Vec<trellis_model::Relay>>,
}

impl<'a> Snapshot<'a> {
    fn new(tx: &'a mut dyn Tx, lists: Option<KeptLists<'a>>) -> Self {
        Self {
            tx,
            lists,
            accounts: HashMap::new(),
            agents_by_subnet: HashMap::new(),
            sent: HashMap::new(),
            verified: HashMap::new(),
            relays: None,
        }
    }

    fn relays(&mut self) -> Result<&[trellis_model::Relay], StoreError> {
        if self.relays.is_none() {
            self.relays = Some(crate::relays::compile::all_relays(self.tx)?);
        }
        Ok(self.relays.as_deref().unwrap_or_default())
    }

    fn account(&mut self, id: &AccountId) -> Result<Option<Account>, StoreError> {
        if let Some(a) = self.accounts.get(id) {
            return Ok(a.clone());
        }
        let account: Option<Account> = self.tx.get_obj(id.as_str())?;
        self.accounts.insert(id.clone(), account.clone());
        Ok(account)
    }

    fn agents_in(&mut self, subnet_id: &str) -> Result<&[Agent], StoreError> {
        if !self.agents_by_subnet.contains_key(subnet_id) {
            let agents: Vec<Agent> = self
                .tx
                .list_obj::<Agent>(&Filter::reference(subnet_id))?
                .into_iter()
                .filter(|a| a.subnet_id.as_str() == subnet_id)
                .collect();
            self.agents_by_subnet.insert(subnet_id.to_string(), agents);
        }
        Ok(&self.agents_by_subnet[subnet_id])
    }

    /// Records of `T` that reference `reference`, in id order: kept between
    /// compilations when the config cache keeps lists, else from the store.
    fn by_reference<T>(&mut self, reference: &str) -> Result<Vec<Arc<T>>, StoreError>
    where
        T: trellis_store::Object + Send + Sync + 'static,
    {
        match self.lists {
            Some(kept) => kept.cache.by_reference(self.tx, kept.revision, reference),
            None => Ok(self.tx.list_obj::<T>(&Filter::reference(reference))?.into_iter().map(Arc::new).collect()),
        }
    }

    /// Every consumer's access to `shared` (SINGLE or GROUP) of `owner`.
    fn share_index(&mut self, owner: &Account, shared: &ResourceConfigurationId) -> Result<ShareIndex, StoreError> {
        if !self.sent.contains_key(&owner.id) {
            let invitations = self.by_reference::<ResourceShareInvitation>(owner.id.as_str())?;
            let sent = SentInvitations::new(&owner.id, invitations.iter().map(|i| &**i));
            self.sent.insert(owner.id.clone(), sent);
        }
        let shares = self.by_reference::<ResourceShare>(shared.as_str())?;
        Ok(ShareIndex::new(owner, shared, shares.iter().map(|s| &**s), &self.sent[&owner.id]))
    }

    /// Domains `owner` verified (lower case).
    fn verified_domains(&mut self, owner: &AccountId) -> Result<&[String], StoreError> {
        if !self.verified.contains_key(owner) {
            let domains = crate::domain_verification::verified_domains(self.tx, owner)?;
            self.verified.insert(owner.clone(), domains);
        }
        Ok(&self.verified[owner])
    }
}

/// Compiles the config of `agent` from the store snapshot `tx`.
///
/// Gateway role: every SINGLE/CHILD configuration behind a gateway in the
/// agent's subnet, each with the endpoints (of any account) that may use it
/// now; the consumer VPCs of those endpoints; revoked certificates of agents
/// of those VPCs; endpoints that exist but may not connect, with why.
/// Endpoint role: every endpoint in the agent's subnet with, per resource it
/// may still use, its address in that subnet, its ports and DNS names and the
/// gateway agents to tunnel to (own zone first). Output is sorted, so equal
/// state compiles to an equal config.
pub fn compile(tx: &mut dyn Tx, agent: &Agent, region: &str) -> Result<AgentConfig, StoreError> {
    compile_with(tx, agent, region, None)
}

/// [`compile`], taking the long lists of a gateway from `lists` when given.
pub fn compile_with(
    tx: &mut dyn Tx,
    agent: &Agent,
    region: &str,
    lists: Option<KeptLists<'_>>,
) -> Result<AgentConfig, StoreError> {
    let subnet: Option<Subnet> = tx.get_obj(agent.subnet_id.as_str())?;
    let (zone, address_pool) = match &subnet {
        Some(s) => (s.zone.clone(), s.cidr_block.to_string()),
        None => (agent.zone.clone(), String::new()),
    };
    let mut snap = Snapshot::new(tx, lists);
    let gateway = gateway_role(&mut snap, agent)?;
    let endpoints = endpoint_role(&mut snap, agent, &zone, region)?;
    let relays = relays_to_attach(&mut snap, agent)?;
    let revoked_relay_certs = revoked_relay_certs(&mut snap)?;
    Ok(AgentConfig {
        version: 0,
        agent_id: agent.id.to_string(),
        account_id: agent.account_id.to_string(),
        vpc_id: agent.vpc_id.to_string(),
        subnet_id: agent.subnet_id.to_string(),
        zone,
        region: region.to_string(),
        address_pool,
        gateway,
        endpoints,
        relays,
        revoked_relay_certs,
    })
}

/// Deleted relays' certificates not expired yet, for an agent whose config
/// names relays (it read them); none for others. Sorted.
fn revoked_relay_certs(snap: &mut Snapshot<'_>) -> Result<Vec<String>, StoreError> {
    if snap.relays.is_none() {
        return Ok(Vec::new());
    }
    let mut certs: Vec<String> = snap
        .tx
        .list_obj::<crate::relays::records::RevokedRelayCert>(&Filter::default())?
        .into_iter()
        .map(|c| c.id)
        .collect();
    certs.sort();
    Ok(certs)
}

/// An outbound-only agent's relays (see [`crate::relays::compile`]); none for others.
fn relays_to_attach(snap: &mut Snapshot<'_>, agent: &Agent) -> Result<Vec<trellis_proto::RelayTarget>, StoreError> {
    if !agent.outbound_only {
        return Ok(Vec::new());
    }
    let relays = snap.relays()?;
    Ok(crate::relays::compile::attach_to(relays, &agent.zone).into_iter().map(crate::relays::compile::target).collect())
}

/// Why an endpoint on a gateway's resource may not connect, if it may not.
fn refusal(
    snap: &mut Snapshot<'_>,
    ep: &VpcEndpoint,
    config: &ResourceConfiguration,
    shares: &ShareIndex,
) -> Result<Option<String>, StoreError> {
    if !endpoint_serves(ep.state) {
        return Ok(Some(match &ep.failure_reason {
            Some(reason) => format!("the endpoint is {:?}: {reason}", ep.state),
            None => format!("the endpoint is {:?}", ep.state),
        }));
    }
    if !shares.allows(snap.tx, &ep.account_id)? {
        return Ok(Some(format!(
            "resource configuration {} is no longer shared with account {} (the share was deleted, \
             or the account was removed from it, or the invitation was rejected)",
            shared_id(config),
            ep.account_id
        )));
    }
    Ok(None)
}

fn gateway_role(snap: &mut Snapshot<'_>, agent: &Agent) -> Result<GatewayRole, StoreError> {
    let gateways: Vec<ResourceGateway> =
        snap.tx.list_obj(&Filter::account_and_reference(agent.account_id.as_str(), agent.subnet_id.as_str()))?;
    let mut resources = Vec::new();
    let mut consumers: BTreeMap<ConsumerVpc, u32> = BTreeMap::new();
    let mut revoked: BTreeMap<String, String> = BTreeMap::new();
    let Some(owner) = snap.account(&agent.account_id)? else { return Ok(GatewayRole::default()) };
    for gw in gateways.iter().filter(|g| compiles(g.status) && g.subnet_ids.contains(&agent.subnet_id)) {
        let configs: Vec<ResourceConfiguration> =
            snap.tx.list_obj(&Filter::account_and_reference(gw.account_id.as_str(), gw.id.as_str()))?;
        // Endpoints and shares are per shared configuration (a SINGLE, or the GROUP of CHILDren).
        let mut per_shared: HashMap<ResourceConfigurationId, (Vec<Arc<VpcEndpoint>>, ShareIndex)> = HashMap::new();
        for config in configs {
            if !config.is_resource() || !compiles(config.status) || config.resource_gateway_id != gw.id {
                continue;
            }
            if config.config_type == ConfigurationType::Child && !group_serves(snap, &config)? {
                continue;
            }
            let target = match &config.resource_configuration_definition {
                Some(ResourceDefinition::IpResource(ip)) => Target::Ip { address: ip.ip_address },
                Some(ResourceDefinition::DnsResource(dns)) => Target::Dns { domain_name: dns.domain_name.clone() },
                None => continue,
            };
            let shared = shared_id(&config).clone();
            if !per_shared.contains_key(&shared) {
                let mut endpoints = snap.by_reference::<VpcEndpoint>(shared.as_str())?;
                endpoints.retain(|e| e.is_for_configuration(&shared));
                let shares = snap.share_index(&owner, &shared)?;
                per_shared.insert(shared.clone(), (endpoints, shares));
            }
            let (endpoints, shares) = &per_shared[&shared];
            let mut allowed = Vec::new();
            for ep in endpoints {
                if !ep.reaches_resource(&config.id) {
                    continue;
                }
                if let Some(reason) = refusal(snap, ep, &config, shares)? {
                    revoked.insert(ep.id.to_string(), reason);
                    continue;
                }
                let consumer = consumer_index(&mut consumers, &ep.account_id, &ep.vpc_id);
                allowed.push(AllowedEndpoint { vpc_endpoint_id: ep.id.to_string(), consumer });
            }
            allowed.sort_by(|a, b| a.vpc_endpoint_id.cmp(&b.vpc_endpoint_id));
            resources.push(GatewayResource {
                resource_configuration_id: config.id.to_string(),
                resource_gateway_id: gw.id.to_string(),
                owner_account_id: config.account_id.to_string(),
                target,
                port_ranges: port_ranges(&config.port_ranges),
                allowed,
                proxy_protocol: config.proxy_protocol == ProxyProtocol::V2,
                limits: config.per_consumer_limits,
            });
        }
    }
    resources.sort_by(|a, b| a.resource_configuration_id.cmp(&b.resource_configuration_id));
    let mut services = services_role(snap, agent, &mut consumers, &mut revoked)?;
    // Number consumers in sorted order so equal state compiles to an equal config.
    let renumber: HashMap<u32, u32> = consumers.values().enumerate().map(|(i, old)| (*old, i as u32)).collect();
    for allowed in
        resources.iter_mut().flat_map(|r| &mut r.allowed).chain(services.iter_mut().flat_map(|s| &mut s.allowed))
    {
        allowed.consumer = renumber[&allowed.consumer];
    }
    // Revocations are few (deleted agents' certificates until they expire):
    // one read of them all beats one read per consumer VPC.
    let consumer_vpcs: BTreeSet<&str> = consumers.keys().map(|c| c.vpc_id.as_str()).collect();
    let mut revoked_certs = BTreeSet::new();
    if !consumer_vpcs.is_empty() {
        for cert in snap.tx.list_obj::<RevokedCert>(&Filter::default())? {
            if consumer_vpcs.contains(cert.vpc_id.as_str()) {
                revoked_certs.insert(cert.id);
            }
        }
    }
    // An endpoint allowed for one resource and refused for another (a GROUP) is listed as allowed only.
    let allowed: BTreeSet<&str> = resources
        .iter()
        .flat_map(|r| r.allowed.iter())
        .chain(services.iter().flat_map(|s| s.allowed.iter()))
        .map(|a| a.vpc_endpoint_id.as_str())
        .collect();
    let revoked_endpoints = revoked
        .iter()
        .filter(|(id, _)| !allowed.contains(id.as_str()))
        .map(|(id, reason)| RevokedEndpoint { vpc_endpoint_id: id.clone(), reason: reason.clone() })
        .collect();
    Ok(GatewayRole {
        consumers: consumers.into_keys().collect(),
        resources,
        services,
        revoked_certs: revoked_certs.into_iter().collect(),
        revoked_endpoints,
    })
}

/// Number `vpc` of `account` in the consumers table.
fn consumer_index(consumers: &mut BTreeMap<ConsumerVpc, u32>, account: &AccountId, vpc: &trellis_model::VpcId) -> u32 {
    let next = consumers.len() as u32;
    *consumers.entry(ConsumerVpc { account_id: account.to_string(), vpc_id: vpc.to_string() }).or_insert(next)
}

/// Why an interface endpoint may not connect to `service`, if so.
fn service_refusal(ep: &VpcEndpoint, service: &VpcEndpointService) -> Option<String> {
    if ep.state == EndpointState::PendingAcceptance {
        return Some(format!("the endpoint waits for {} to accept it", service.id));
    }
    if !endpoint_serves(ep.state) {
        return Some(match &ep.failure_reason {
            Some(reason) => format!("the endpoint is {:?}: {reason}", ep.state),
            None => format!("the endpoint is {:?}", ep.state),
        });
    }
    if !service.allows(&ep.account_id) {
        return Some(format!("account {} is no longer allowed to use service {}", ep.account_id, service.id));
    }
    None
}

/// Endpoint services run by agents of `agent`'s subnet, with their allowed
/// interface endpoints (their VPCs join `consumers`; refused ones go to `revoked`).
fn services_role(
    snap: &mut Snapshot<'_>,
    agent: &Agent,
    consumers: &mut BTreeMap<ConsumerVpc, u32>,
    revoked: &mut BTreeMap<String, String>,
) -> Result<Vec<GatewayService>, StoreError> {
    let services: Vec<VpcEndpointService> =
        snap.tx.list_obj(&Filter::account_and_reference(agent.account_id.as_str(), agent.subnet_id.as_str()))?;
    let mut out = Vec::new();
    for service in services {
        if service.state != ServiceState::Available || !service.subnet_ids.contains(&agent.subnet_id) {
            continue;
        }
        let endpoints = snap.by_reference::<VpcEndpoint>(service.id.as_str())?;
        let mut allowed = Vec::new();
        for ep in endpoints.iter().filter(|e| e.service_id.as_ref() == Some(&service.id)) {
            match service_refusal(ep, &service) {
                Some(reason) => {
                    revoked.insert(ep.id.to_string(), reason);
                }
                None => allowed.push(AllowedEndpoint {
                    vpc_endpoint_id: ep.id.to_string(),
                    consumer: consumer_index(consumers, &ep.account_id, &ep.vpc_id),
                }),
            }
        }
        allowed.sort_by(|a, b| a.vpc_endpoint_id.cmp(&b.vpc_endpoint_id));
        out.push(GatewayService {
            service_id: service.id.to_string(),
            owner_account_id: service.account_id.to_string(),
            targets: service
                .targets
                .iter()
                .map(|t| match t {
                    ServiceTarget::IpAddress(ip) => Target::Ip { address: *ip },
                    ServiceTarget::DomainName(name) => Target::Dns { domain_name: name.clone() },
                })
                .collect(),
            ports: service.ports.clone(),
            load_balancing: service.load_balancing,
            health_check: service.health_check.clone(),
            proxy_protocol: service.proxy_protocol == ProxyProtocol::V2,
            limits: service.per_consumer_limits,
            allowed,
        });
    }
    out.sort_by(|a, b| a.service_id.cmp(&b.service_id));
    Ok(out)
}

/// A CHILD serves only while its GROUP exists and serves.
fn group_serves(snap: &mut Snapshot<'_>, child: &ResourceConfiguration) -> Result<bool, StoreError> {
    let Some(group_id) = &child.resource_configuration_group_id else {
        return Ok(false);
    };
    let group: Option<ResourceConfiguration> = snap.tx.get_obj(group_id.as_str())?;
    Ok(group.is_some_and(|g| g.config_type == ConfigurationType::Group && compiles(g.status)))
}

/// Whether the consumer's DNS answers `name`, a custom name of `config`, for `ep`.
fn custom_name_allowed(
    snap: &mut Snapshot<'_>,
    ep: &VpcEndpoint,
    config: &ResourceConfiguration,
    name: &str,
) -> Result<bool, StoreError> {
    if !ep.private_dns_enabled || is_reserved_dns_name(name) || config.custom_domain_name.as_deref() != Some(name) {
        return Ok(false);
    }
    Ok(match ep.private_dns_preference {
        PrivateDnsPreference::AllDomains => true,
        PrivateDnsPreference::SpecifiedDomainsOnly => {
            ep.private_dns_specified_domains.iter().any(|d| name_is_under(name, d))
        }
        PrivateDnsPreference::VerifiedDomainsOnly => {
            snap.verified_domains(&config.account_id)?.iter().any(|d| name_is_under(name, d))
        }
    })
}

fn endpoint_role(
    snap: &mut Snapshot<'_>,
    agent: &Agent,
    zone: &str,
    region: &str,
) -> Result<Vec<EndpointConfig>, StoreError> {
    let mut endpoints: Vec<VpcEndpoint> =
        snap.tx.list_obj(&Filter::account_and_reference(agent.account_id.as_str(), agent.subnet_id.as_str()))?;
    // The oldest endpoint keeps a custom name two endpoints claim.
    endpoints.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    let Some(me) = snap.account(&agent.account_id)? else { return Ok(Vec::new()) };
    let generated_suffix = format!(".{region}.trellis.internal");
    let mut claimed_names: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::new();
    for ep in endpoints {
        if !endpoint_serves(ep.state) || !ep.subnet_ids.contains(&agent.subnet_id) {
            continue;
        }
        if let Some(service_id) = &ep.service_id {
            if let Some(config) = interface_endpoint(snap, &ep, service_id, agent, (zone, region), &mut claimed_names)?
            {
                out.push(config);
            }
            continue;
        }
        // (address, dns names) of each resource of this endpoint in this subnet.
        let mut here: BTreeMap<String, (Option<IpAddr>, BTreeSet<String>)> = BTreeMap::new();
        for entry in ep.dns_entries.iter().filter(|e| e.subnet_id == agent.subnet_id) {
            let Some(resource) = &entry.resource_configuration_id else { continue };
            let slot = here.entry(resource.to_string()).or_default();
            if slot.0.is_none() {
                slot.0 = entry.ip_addresses.first().copied();
            }
            slot.1.insert(entry.dns_name.clone());
        }
        let mut usable = Vec::new();
        for (resource_id, (address, dns_names)) in here {
            let Some(address) = address else { continue };
            let Some(config) = snap.tx.get_obj::<ResourceConfiguration>(&resource_id)? else { continue };
            if !config.is_resource() || !compiles(config.status) {
                continue;
            }
            if config.config_type == ConfigurationType::Child && !group_serves(snap, &config)? {
                continue;
            }
            // A revoked share stops the listeners too, not only the gateway.
            if matches!(access_to(snap.tx, &me, &config)?, Access::Denied) {
                continue;
            }
            usable.push((config, address, dns_names));
        }
        // An endpoint over its listener budget serves nothing (the API shows it Failed with why).
        if listener_budget_exceeded(usable.iter().map(|(c, _, _)| c)).is_some() {
            continue;
        }
        let mut resources = Vec::new();
        for (config, address, dns_names) in usable {
            let Some(gw) = snap.tx.get_obj::<ResourceGateway>(config.resource_gateway_id.as_str())? else {
                continue;
            };
            let gateways = gateway_targets(snap, &gw, zone)?;
            let mut names = Vec::new();
            for name in dns_names {
                let generated = name.ends_with(&generated_suffix) && name.starts_with(ep.id.as_str());
                if generated || (custom_name_allowed(snap, &ep, &config, &name)? && claimed_names.insert(name.clone()))
                {
                    names.push(name);
                }
            }
            resources.push(EndpointResource {
                resource_configuration_id: config.id.to_string(),
                address,
                port_ranges: port_ranges(&config.port_ranges),
                dns_names: names,
                dns_records: Vec::new(),
                gateways,
            });
        }
        if !resources.is_empty() {
            out.push(EndpointConfig { vpc_endpoint_id: ep.id.to_string(), resources });
        }
    }
    out.sort_by(|a, b| a.vpc_endpoint_id.cmp(&b.vpc_endpoint_id));
    Ok(out)
}

/// What an endpoint agent serves of an interface endpoint: its address in
/// the agent's subnet on the service's ports, the endpoint's regional and
/// zonal names (and the service's private DNS name where the consumer's
/// preference allows it), and the provider's agents to tunnel to.
fn interface_endpoint(
    snap: &mut Snapshot<'_>,
    ep: &VpcEndpoint,
    service_id: &trellis_model::VpcEndpointServiceId,
    agent: &Agent,
    (zone, region): (&str, &str),
    claimed_names: &mut BTreeSet<String>,
) -> Result<Option<EndpointConfig>, StoreError> {
    let Some(service) = snap.tx.get_obj::<VpcEndpointService>(service_id.as_str())? else { return Ok(None) };
    if service.state != ServiceState::Available || service_refusal(ep, &service).is_some() {
        return Ok(None);
    }
    let Some(address) = ep.addresses_in(&agent.subnet_id).next() else { return Ok(None) };
    // Names: each entry is (name, address, subnet); a name with one address here is this agent's.
    let mut by_name: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
    for entry in &ep.dns_entries {
        let addrs = by_name.entry(entry.dns_name.as_str()).or_default();
        for ip in &entry.ip_addresses {
            if !addrs.contains(ip) {
                addrs.push(*ip);
            }
        }
    }
    let mut dns_records: Vec<DnsRecord> =
        by_name.into_iter().map(|(name, addresses)| DnsRecord { name: name.to_string(), addresses }).collect();
    if let Some(name) = &service.private_dns_name
        && ep.private_dns_enabled
        && private_name_allowed(snap, ep, &service.account_id, name)?
        && claimed_names.insert(name.clone())
    {
        let regional = interface_regional_name(&ep.id, &service.id, region);
        let addresses =
            dns_records.iter().find(|r| r.name == regional).map_or_else(|| vec![address], |r| r.addresses.clone());
        dns_records.push(DnsRecord { name: name.clone(), addresses });
    }
    let gateways = service_gateways(snap, &service, zone)?;
    let port_ranges = service.ports.iter().filter_map(|p| PortRange::single(p.port).ok()).collect();
    Ok(Some(EndpointConfig {
        vpc_endpoint_id: ep.id.to_string(),
        resources: vec![EndpointResource {
            resource_configuration_id: service.id.to_string(),
            address,
            port_ranges,
            dns_names: Vec::new(),
            dns_records,
            gateways,
        }],
    }))
}

/// Whether a provider's custom name (a service's private DNS name) may be
/// answered for `ep`: never a reserved name; then the consumer's preference.
fn private_name_allowed(
    snap: &mut Snapshot<'_>,
    ep: &VpcEndpoint,
    owner: &AccountId,
    name: &str,
) -> Result<bool, StoreError> {
    if is_reserved_dns_name(name) {
        return Ok(false);
    }
    Ok(match ep.private_dns_preference {
        PrivateDnsPreference::AllDomains => true,
        PrivateDnsPreference::SpecifiedDomainsOnly => {
            ep.private_dns_specified_domains.iter().any(|d| name_is_under(name, d))
        }
        PrivateDnsPreference::VerifiedDomainsOnly => {
            snap.verified_domains(owner)?.iter().any(|d| name_is_under(name, d))
        }
    })
}

/// The provider's agents that run `service` (in its subnets, advertising a
/// tunnel address): own zone first, online before offline.
fn service_gateways(
    snap: &mut Snapshot<'_>,
    service: &VpcEndpointService,
    zone: &str,
) -> Result<Vec<GatewayTarget>, StoreError> {
    agents_as_targets(snap, &service.account_id, &service.subnet_ids, zone)
}

/// The agents of `gw`'s subnets that advertise a tunnel address: own zone
/// first, then online before offline, then by zone and id.
fn gateway_targets(
    snap: &mut Snapshot<'_>,
    gw: &ResourceGateway,
    zone: &str,
) -> Result<Vec<GatewayTarget>, StoreError> {
    if !compiles(gw.status) {
        return Ok(Vec::new());
    }
    agents_as_targets(snap, &gw.account_id, &gw.subnet_ids, zone)
}

/// `account`'s agents in `subnets` that advertise a tunnel address or reach
/// relays (outbound-only, with at least one relay), as tunnel targets: own
/// zone first, then online before offline, then by zone and id.
fn agents_as_targets(
    snap: &mut Snapshot<'_>,
    account: &AccountId,
    subnets: &[trellis_model::SubnetId],
    zone: &str,
) -> Result<Vec<GatewayTarget>, StoreError> {
    let mut agents = Vec::new();
    for subnet in subnets {
        for a in snap.agents_in(subnet.as_str())? {
            if &a.account_id == account && (a.advertise.is_some() || a.outbound_only) {
                agents.push(a.clone());
            }
        }
    }
    agents.sort_by(|a, b| {
        let key = |x: &Agent| (x.zone != zone, x.status != AgentStatus::Online, x.zone.clone(), x.id.to_string());
        key(a).cmp(&key(b))
    });
    agents.dedup_by(|a, b| a.id == b.id);
    let mut targets = Vec::with_capacity(agents.len());
    for a in agents {
        let relays = relays_to_reach(snap, &a, zone)?;
        if a.advertise.is_none() && relays.is_empty() {
            continue;
        }
        targets.push(GatewayTarget {
            server_name: agent_server_name(a.id.as_str()),
            agent_id: a.id.to_string(),
            address: a.advertise.clone().unwrap_or_default(),
            zone: a.zone.clone(),
            relays,
        });
    }
    Ok(targets)
}

/// The relays an endpoint agent of `zone` reaches outbound-only agent `a`
/// through (see [`crate::relays::compile`]); none for an agent with a listener.
fn relays_to_reach(
    snap: &mut Snapshot<'_>,
    a: &Agent,
    zone: &str,
) -> Result<Vec<trellis_proto::RelayTarget>, StoreError> {
    if !a.outbound_only {
        return Ok(Vec::new());
    }
    Ok(crate::relays::compile::reach_through(snap.relays()?, &a.zone, zone))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::tests::*;
    use trellis_model::{InvitationStatus, OrganizationId, ResourceShare, ResourceShareInvitation, ShareStatus};
    use trellis_store::read_with;
    use trellis_store::sqlite::SqliteStore;
    use trellis_store::write_with;

    fn compile_for(store: &SqliteStore, agent: &Agent) -> AgentConfig {
        read_with(store, |tx| compile(tx, agent, REGION)).unwrap()
    }

    fn allowed(config: &AgentConfig) -> Vec<String> {
        config.gateway.resources.iter().flat_map(|r| r.allowed.iter().map(|a| a.vpc_endpoint_id.clone())).collect()
    }

    fn change(store: &SqliteStore, mut f: impl FnMut(&mut dyn Tx) -> Result<(), StoreError>) {
        write_with(store, |tx| f(tx)).unwrap();
    }

    #[test]
    fn a_shared_and_accepted_resource_reaches_the_consumers_endpoint() {
        let w = World::new();
        let store = w.store();
        let gw = compile_for(&store, &w.gw_agents[0]);
        assert_eq!(gw.agent_id, w.gw_agents[0].id.as_str());
        assert_eq!((gw.zone.as_str(), gw.address_pool.as_str(), gw.region.as_str()), ("z1", "10.0.9.0/24", REGION));
        assert_eq!(gw.gateway.resources.len(), 1);
        let db = &gw.gateway.resources[0];
        assert_eq!(db.resource_configuration_id, w.db.id.as_str());
        assert_eq!(db.resource_gateway_id, w.gateway.id.as_str());
        assert_eq!(db.owner_account_id, w.owner.id.as_str());
        assert_eq!(db.target, Target::Ip { address: "10.0.0.10".parse().unwrap() });
        assert_eq!(db.port_ranges, vec![PortRange::single(5432).unwrap()]);
        assert_eq!(db.allowed, vec![AllowedEndpoint { vpc_endpoint_id: w.endpoint.id.to_string(), consumer: 0 }]);
        // The consumer's VPC is the one consumer of the gateway.
        assert_eq!(
            gw.gateway.consumers,
            vec![ConsumerVpc { account_id: w.consumer.id.to_string(), vpc_id: w.consumer_vpc.id.to_string() }]
        );
        assert!(gw.endpoints.is_empty());
        // The gateway agent of the other zone serves the same resource.
        assert_eq!(allowed(&compile_for(&store, &w.gw_agents[1])), vec![w.endpoint.id.to_string()]);

        let consumer = compile_for(&store, &w.consumer_agents[0]);
        assert!(consumer.gateway.resources.is_empty() && consumer.gateway.consumers.is_empty());
        assert_eq!(consumer.endpoints.len(), 1);
        let ep = &consumer.endpoints[0];
        assert_eq!(ep.vpc_endpoint_id, w.endpoint.id.as_str());
        let r = &ep.resources[0];
        assert_eq!(r.resource_configuration_id, w.db.id.as_str());
        assert_eq!(r.address, w.endpoint.dns_entries[0].ip_addresses[0]);
        assert!(w.consumer_subnets[0].cidr_block.contains(match r.address {
            std::net::IpAddr::V4(v4) => v4,
            _ => panic!("an IPv4 pool address"),
        }));
        assert_eq!(r.dns_names, vec![format!("{}.{}.{REGION}.trellis.internal", w.endpoint.id, w.db.id)]);
        assert_eq!(r.port_ranges, vec![PortRange::single(5432).unwrap()]);
        let gws: Vec<_> =
            r.gateways.iter().map(|g| (g.agent_id.as_str(), g.zone.as_str(), g.address.as_str())).collect();
        assert_eq!(
            gws,
            vec![
                (w.gw_agents[0].id.as_str(), "z1", "192.0.2.1:7443"),
                (w.gw_agents[1].id.as_str(), "z2", "192.0.2.2:7443"),
            ]
        );
        assert_eq!(r.gateways[0].server_name, agent_server_name(w.gw_agents[0].id.as_str()));
        // The consumer agent of the other subnet has no endpoint.
        assert!(compile_for(&store, &w.consumer_agents[1]).endpoints.is_empty());
    }

    #[test]
    fn gateways_of_the_endpoint_agents_zone_come_first() {
        let w = World::new();
        // The same endpoint (same id), now in both consumer subnets.
        let ep = endpoint(&w.consumer_vpc, &[&w.consumer_subnets[0], &w.consumer_subnets[1]], &w.db, &[&w.db], 1);
        assert_eq!(ep.id, w.endpoint.id);
        let store = w.store();
        change(&store, |tx| tx.update_obj(&ep));
        let z2 = compile_for(&store, &w.consumer_agents[1]);
        let zones: Vec<_> = z2.endpoints[0].resources[0].gateways.iter().map(|g| g.zone.as_str()).collect();
        assert_eq!(zones, vec!["z2", "z1"]);
        // Still one consumer VPC.
        assert_eq!(compile_for(&store, &w.gw_agents[0]).gateway.consumers.len(), 1);
        // Within a zone, online agents come before offline ones.
        let mut offline = w.gw_agents[1].clone();
        offline.status = AgentStatus::Offline;
        let mut second = agent(&w.owner_subnets[1], 9, Some("192.0.2.3:7443"));
        second.status = AgentStatus::Online;
        change(&store, |tx| {
            tx.update_obj(&offline)?;
            tx.insert_obj(&second)
        });
        let z2 = compile_for(&store, &w.consumer_agents[1]);
        let order: Vec<_> = z2.endpoints[0].resources[0].gateways.iter().map(|g| g.agent_id.clone()).collect();
        assert_eq!(order, vec![second.id.to_string(), offline.id.to_string(), w.gw_agents[0].id.to_string()]);
    }

    #[test]
    fn without_a_share_the_gateway_allows_nobody() {
        let w = World::new();
        let store = w.store();
        change(&store, |tx| {
            tx.delete_obj::<ResourceShare>(w.share.id.as_str())?;
            Ok(())
        });
        let gw = compile_for(&store, &w.gw_agents[0]);
        assert!(allowed(&gw).is_empty(), "a deleted share revokes at once");
        assert!(gw.gateway.consumers.is_empty());
        assert!(compile_for(&store, &w.consumer_agents[0]).endpoints.is_empty(), "and stops the listeners");
    }

    #[test]
    fn pending_rejected_or_deleting_shares_allow_nobody() {
        for status in [InvitationStatus::Pending, InvitationStatus::Rejected] {
            let w = World::new();
            let store = w.store();
            let inv = ResourceShareInvitation { status, ..w.invitation.clone() };
            change(&store, |tx| tx.update_obj(&inv));
            assert!(allowed(&compile_for(&store, &w.gw_agents[0])).is_empty(), "{status:?}");
            assert!(compile_for(&store, &w.consumer_agents[0]).endpoints.is_empty(), "{status:?}");
        }
        let w = World::new();
        let store = w.store();
        let deleting = ResourceShare { status: ShareStatus::Deleting, ..w.share.clone() };
        change(&store, |tx| tx.update_obj(&deleting));
        assert!(allowed(&compile_for(&store, &w.gw_agents[0])).is_empty());
    }

    #[test]
    fn same_organization_needs_no_invitation() {
        let w = World::new();
        let store = w.store();
        let org = OrganizationId::generate(&[42u8; 16]);
        let owner = Account { organization_id: Some(org.clone()), ..w.owner.clone() };
        let consumer = Account { organization_id: Some(org), ..w.consumer.clone() };
        change(&store, |tx| {
            tx.delete_obj::<ResourceShareInvitation>(w.invitation.id.as_str())?;
            tx.update_obj(&owner)?;
            tx.update_obj(&consumer)
        });
        assert_eq!(allowed(&compile_for(&store, &w.gw_agents[0])), vec![w.endpoint.id.to_string()]);
    }

    #[test]
    fn the_owners_own_endpoint_needs_no_share() {
        let w = World::new();
        let store = w.store();
        let own = endpoint(&w.owner_vpc, &[&w.owner_subnets[1]], &w.db, &[&w.db], 2);
        change(&store, |tx| {
            tx.delete_obj::<ResourceShare>(w.share.id.as_str())?;
            tx.insert_obj(&own)
        });
        let gw = compile_for(&store, &w.gw_agents[0]);
        assert_eq!(allowed(&gw), vec![own.id.to_string()]);
        let consumers: Vec<_> = gw.gateway.consumers.iter().map(|c| c.vpc_id.as_str()).collect();
        assert_eq!(consumers, vec![w.owner_vpc.id.as_str()], "the owner's own VPC");
        // That agent plays both roles.
        let both = compile_for(&store, &w.gw_agents[1]);
        assert_eq!(both.endpoints.len(), 1);
        assert_eq!(both.gateway.resources.len(), 1);
    }

    #[test]
    fn deleting_or_rejected_endpoints_leave_both_roles() {
        for state in [EndpointState::Deleting, EndpointState::Rejected] {
            let w = World::new();
            let store = w.store();
            let ep = VpcEndpoint { state, ..w.endpoint.clone() };
            change(&store, |tx| tx.update_obj(&ep));
            assert!(allowed(&compile_for(&store, &w.gw_agents[0])).is_empty());
            assert!(compile_for(&store, &w.consumer_agents[0]).endpoints.is_empty());
        }
    }

    #[test]
    fn a_group_endpoint_serves_each_child_with_its_own_address() {
        let w = World::new();
        let store = w.store();
        let group = configuration(&w.gateway, 10, ConfigurationType::Group, None, None, &["1-65535"]);
        let dns = Some(ResourceDefinition::DnsResource(trellis_model::DnsResource {
            domain_name: "cache.internal".into(),
            ip_address_type: trellis_model::IpAddressType::Ipv4,
        }));
        let child_a = configuration(&w.gateway, 11, ConfigurationType::Child, Some(&group), dns, &["6379"]);
        let child_b = configuration(&w.gateway, 12, ConfigurationType::Child, Some(&group), ip("10.0.0.11"), &["80"]);
        let group_share = share(&w.owner, &[&group], &w.consumer, 2);
        let inv = invitation(&group_share, &w.consumer, InvitationStatus::Accepted, 2);
        let ep = endpoint(&w.consumer_vpc, &[&w.consumer_subnets[0]], &group, &[&child_a, &child_b], 3);
        change(&store, |tx| {
            tx.insert_obj(&group)?;
            tx.insert_obj(&child_a)?;
            tx.insert_obj(&child_b)?;
            tx.insert_obj(&group_share)?;
            tx.insert_obj(&inv)?;
            tx.insert_obj(&ep)
        });
        let gw = compile_for(&store, &w.gw_agents[0]);
        let ids: Vec<_> = gw.gateway.resources.iter().map(|r| r.resource_configuration_id.as_str()).collect();
        assert!(!ids.contains(&group.id.as_str()), "a GROUP is not a resource");
        let a = gw.gateway.resources.iter().find(|r| r.resource_configuration_id == child_a.id.as_str()).unwrap();
        assert_eq!(a.target, Target::Dns { domain_name: "cache.internal".into() });
        assert_eq!(a.allowed.len(), 1);
        assert_eq!(a.allowed[0].vpc_endpoint_id, ep.id.as_str());

        let consumer = compile_for(&store, &w.consumer_agents[0]);
        let group_ep = consumer.endpoints.iter().find(|e| e.vpc_endpoint_id == ep.id.as_str()).unwrap();
        assert_eq!(group_ep.resources.len(), 2);
        assert_ne!(group_ep.resources[0].address, group_ep.resources[1].address);
        let ports: Vec<_> = group_ep.resources.iter().map(|r| r.port_ranges[0].to_string()).collect();
        assert!(ports.contains(&"6379".to_string()) && ports.contains(&"80".to_string()));

        // Unsharing the group revokes every child.
        change(&store, |tx| {
            tx.delete_obj::<ResourceShare>(group_share.id.as_str())?;
            Ok(())
        });
        let gw = compile_for(&store, &w.gw_agents[0]);
        for child in [&child_a, &child_b] {
            let r = gw.gateway.resources.iter().find(|r| r.resource_configuration_id == child.id.as_str()).unwrap();
            assert!(r.allowed.is_empty());
        }
        let consumer = compile_for(&store, &w.consumer_agents[0]);
        assert!(consumer.endpoints.iter().all(|e| e.vpc_endpoint_id != ep.id.as_str()));
    }

    #[test]
    fn equal_state_compiles_to_equal_configs() {
        let w = World::new();
        let store = w.store();
        for agent in w.gw_agents.iter().chain(&w.consumer_agents) {
            assert_eq!(compile_for(&store, agent), compile_for(&store, agent));
        }
    }
}

#[cfg(test)]
mod custom_name_tests {
    use super::*;
    use crate::agents::tests::*;
    use trellis_model::{DomainVerification, DomainVerificationId, DomainVerificationStatus};
    use trellis_store::{read_with, write_with};

    const CUSTOM: &str = "db.orders.example.com";

    /// The world's endpoint with private DNS on and the owner's custom name on the database.
    fn setup(preference: PrivateDnsPreference, domains: &[&str]) -> (World, trellis_store::sqlite::SqliteStore) {
        let mut w = World::new();
        w.db.custom_domain_name = Some(CUSTOM.into());
        let subnets = [w.consumer_subnets[0].clone()];
        w.endpoint.private_dns_enabled = true;
        w.endpoint.private_dns_preference = preference;
        w.endpoint.private_dns_specified_domains = domains.iter().map(|d| d.to_string()).collect();
        w.endpoint.dns_entries =
            trellis_model::plan_dns_entries(&w.endpoint.id, REGION, &[&w.db], &subnets, true, &mut Default::default())
                .unwrap();
        let store = w.store();
        (w, store)
    }

    fn names(store: &trellis_store::sqlite::SqliteStore, agent: &Agent) -> Vec<String> {
        let config = read_with(store, |tx| compile(tx, agent, REGION)).unwrap();
        config.endpoints.iter().flat_map(|e| e.resources.iter().flat_map(|r| r.dns_names.clone())).collect()
    }

    fn verify(store: &trellis_store::sqlite::SqliteStore, owner: &Account, domain: &str, n: u8) {
        let mut v = DomainVerification::new(
            DomainVerificationId::generate(&[n; 16]),
            owner.id.clone(),
            domain.into(),
            &[n; 16],
            REGION,
            t0(),
        );
        v.status = DomainVerificationStatus::Verified;
        write_with(store, |tx| tx.insert_obj(&v)).unwrap();
    }

    #[test]
    fn an_unverified_custom_name_is_not_answered_by_default() {
        let (w, store) = setup(PrivateDnsPreference::VerifiedDomainsOnly, &[]);
        let got = names(&store, &w.consumer_agents[0]);
        assert_eq!(got.len(), 1, "only the generated name: {got:?}");
        assert!(got[0].ends_with(".trellis.internal"));
        // A domain the owner verified covers the name; another account's verification does not.
        verify(&store, &w.consumer, "example.com", 1);
        assert!(!names(&store, &w.consumer_agents[0]).contains(&CUSTOM.to_string()));
        verify(&store, &w.owner, "orders.example.com", 2);
        assert!(names(&store, &w.consumer_agents[0]).contains(&CUSTOM.to_string()));
    }

    #[test]
    fn the_consumer_decides_with_its_preference() {
        let (w, store) = setup(PrivateDnsPreference::AllDomains, &[]);
        assert!(names(&store, &w.consumer_agents[0]).contains(&CUSTOM.to_string()));
        let (w, store) = setup(PrivateDnsPreference::SpecifiedDomainsOnly, &["example.com"]);
        assert!(names(&store, &w.consumer_agents[0]).contains(&CUSTOM.to_string()));
        let (w, store) = setup(PrivateDnsPreference::SpecifiedDomainsOnly, &["example.org"]);
        assert!(!names(&store, &w.consumer_agents[0]).contains(&CUSTOM.to_string()));
    }

    #[test]
    fn reserved_names_and_other_endpoints_names_are_never_answered_as_custom_names() {
        // A name stored before reserved names were refused, or planted in an endpoint's entries.
        let (mut w, _) = setup(PrivateDnsPreference::AllDomains, &[]);
        let victim = "vpce-0123456789abcdef0.rcfg-0123456789abcdef0.local.trellis.internal";
        w.db.custom_domain_name = Some(victim.into());
        let mut entry = w.endpoint.dns_entries[0].clone();
        entry.dns_name = victim.into();
        w.endpoint.dns_entries.push(entry);
        let store = w.store();
        let got = names(&store, &w.consumer_agents[0]);
        assert!(!got.contains(&victim.to_string()), "{got:?}");
    }
}
