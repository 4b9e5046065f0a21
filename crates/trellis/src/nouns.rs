//! The API verbs, `trellis <noun> <verb>`: their flags and the HTTP request each
//! one makes. Flags are kebab-case versions of the API's camelCase fields.
//!
//! Each verb fills in its route's request type from `trellis_api` and sends
//! it to that route's constant, so a body can only hold the fields the
//! handler takes (see `docs/contributing-api.md` for adding a noun).
//!
//! Pure: turning a parsed verb into an [`ApiRequest`] does no I/O, so every
//! route is tested without a server.

use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use trellis_api::accounts::{CreateAccount, UpdateAccount};
use trellis_api::agents::CreateAgentToken;
use trellis_api::configurations::{CreateConfiguration, DefinitionInput, DnsInput, IpInput, UpdateConfiguration};
use trellis_api::domains::CreateDomainVerification;
use trellis_api::endpoints::CreateEndpoint;
use trellis_api::gateways::CreateGateway;
use trellis_api::invitations::InvitationListQuery;
use trellis_api::notifications::{CreateConnectionNotification, UpdateConnectionNotification};
use trellis_api::organizations::CreateOrganization;
use trellis_api::relays::CreateRelayToken;
use trellis_api::services::{
    ConnectionIds, CreateService, HealthCheckInput, LimitsInput, ModifyPermissions, PortInput, TargetInput,
    UpdateService,
};
use trellis_api::shares::CreateShare;
use trellis_api::subnets::CreateSubnet;
use trellis_api::vpcs::{CreateVpc, UpdateVpc};
use trellis_api::{
    AgentListQuery, ListQuery, VpcListQuery, accounts, agents, configurations, domains, endpoints, gateways,
    invitations, notifications, organizations, relays, services, shares, subnets, vpcs,
};
use trellis_model::IpAddressType;
use trellis_proto::PortRange;

use crate::client::ApiRequest;

/// An object's id, or its ARN where the API accepts one.
#[derive(Debug, Args)]
pub struct IdArg {
    /// Id (or ARN) of the object
    #[arg(value_name = "ID")]
    pub id: String,
}

/// Paging flags of every list.
#[derive(Debug, Args, Default)]
pub struct ListArgs {
    /// Ask for at most this many items
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_results: Option<u32>,

    /// Continue a previous list from its nextToken
    #[arg(long, value_name = "TOKEN")]
    pub next_token: Option<String>,
}

/// Flags every create takes.
#[derive(Debug, Args, Default)]
pub struct CreateArgs {
    /// Idempotency token: repeating a create with the same token returns the same object
    #[arg(long, value_name = "TOKEN")]
    pub client_token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AccountVerb {
    /// Create an account and its first API key (shown once)
    Create {
        /// Account name
        #[arg(long)]
        name: String,
        /// Put the account in this organization
        #[arg(long, value_name = "ID")]
        organization_id: Option<String>,
        #[command(flatten)]
        create: CreateArgs,
    },
    /// List accounts
    List(ListArgs),
    /// Show one account
    Get(IdArg),
    /// Move an account into an organization, or out of it
    #[command(group(ArgGroup::new("org").required(true).args(["organization_id", "no_organization"])))]
    Update {
        #[command(flatten)]
        target: IdArg,
        /// Organization to join
        #[arg(long, value_name = "ID")]
        organization_id: Option<String>,
        /// Leave the current organization
        #[arg(long)]
        no_organization: bool,
    },
    /// Create a new API key for an account (shown once)
    CreateApiKey(IdArg),
}

#[derive(Debug, Subcommand)]
pub enum OrganizationVerb {
    /// Create an organization
    Create {
        /// Organization name
        #[arg(long)]
        name: String,
        #[command(flatten)]
        create: CreateArgs,
    },
    /// List organizations
    List(ListArgs),
    /// Show one organization
    Get(IdArg),
}

#[derive(Debug, Subcommand)]
pub enum VpcVerb {
    /// Create a VPC
    Create {
        /// VPC name
        #[arg(long)]
        name: String,
        #[command(flatten)]
        create: CreateArgs,
    },
    /// List VPCs
    List(ListArgs),
    /// Show one VPC
    Get(IdArg),
    /// Rename a VPC
    Update {
        #[command(flatten)]
        target: IdArg,
        /// New name
        #[arg(long)]
        name: String,
    },
    /// Delete a VPC (refused while it has subnets, gateways or endpoints)
    Delete(IdArg),
}

#[derive(Debug, Subcommand)]
pub enum SubnetVerb {
    /// Create a subnet: one zone of a VPC and its endpoint address pool
    Create {
        /// VPC of the subnet
        #[arg(long = "vpc", visible_alias = "vpc-id", value_name = "VPC_ID")]
        vpc_id: String,
        /// Zone name, e.g. z1 (one subnet per zone per VPC)
        #[arg(long)]
        zone: String,
        /// IPv4 pool (/16 to /28) for endpoint addresses, e.g. 10.0.9.0/24
        #[arg(long, value_name = "CIDR")]
        cidr_block: String,
        /// Subnet name
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        create: CreateArgs,
    },
    /// List subnets
    List {
        /// Only the subnets of this VPC
        #[arg(long = "vpc", visible_alias = "vpc-id", value_name = "VPC_ID")]
        vpc_id: Option<String>,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Show one subnet
    Get(IdArg),
    /// Delete a subnet
    Delete(IdArg),
}

#[derive(Debug, Subcommand)]
pub enum AgentTokenVerb {
    /// Create a single-use join token for an agent in a subnet
    Create {
        /// Subnet the agent joins
        #[arg(long = "subnet", visible_alias = "subnet-id", value_name = "SUBNET_ID")]
        subnet_id: String,
        /// How long the token stays valid, 60s to 24h (default 1h)
        #[arg(long, value_name = "DURATION", value_parser = parse_expiry)]
        expires_in: Option<u64>,
        #[command(flatten)]
        create: CreateArgs,
    },
    /// List join tokens (never shows the secret)
    List(ListArgs),
    /// Show one join token (never shows the secret)
    Get(IdArg),
    /// Delete (revoke) a join token
    Delete(IdArg),
}

#[derive(Debug, Subcommand)]
pub enum RelayTokenVerb {
    /// Create a single-use join token for a relay (`trellis relay`)
    Create {
        /// Zone the relay serves first (agents of this zone prefer it)
        #[arg(long)]
        zone: Option<String>,
        /// How long the token stays valid, 60s to 24h (default 1h)
        #[arg(long, value_name = "DURATION", value_parser = parse_expiry)]
        expires_in: Option<u64>,
    },
    /// List relay join tokens (never shows the secret)
    List(ListArgs),
    /// Show one relay join token (never shows the secret)
    Get(IdArg),
    /// Delete (revoke) a relay join token
    Delete(IdArg),
}

#[derive(Debug, Subcommand)]
pub enum RelaysVerb {
    /// List enrolled relays with their zone, address, last report and health
    List(ListArgs),
    /// Show one relay
    Get(IdArg),
    /// Delete a relay (its certificate stops working; agents' configs drop it)
    Delete(IdArg),
}

#[derive(Debug, Subcommand)]
pub enum AgentVerb {
    /// List enrolled agents
    List(ListArgs),
    /// Show one agent
    Get(IdArg),
    /// Delete an agent (its certificate stops being accepted)
    Delete(IdArg),
}

#[derive(Debug, Subcommand)]
pub enum ResourceGatewayVerb {
    /// Create a resource gateway in one or more subnets (zones) of a VPC
    Create {
        /// Gateway name
        #[arg(long)]
        name: String,
        /// VPC of the gateway
        #[arg(long = "vpc", visible_alias = "vpc-identifier", value_name = "VPC_ID")]
        vpc_identifier: String,
        /// Subnet of the gateway (repeatable)
        #[arg(long = "subnet", visible_alias = "subnet-id", value_name = "SUBNET_ID", required = true)]
        subnet_ids: Vec<String>,
        /// Address type
        #[arg(long, value_name = "TYPE", value_parser = parse_ip_address_type)]
        ip_address_type: Option<IpAddressType>,
        #[command(flatten)]
        create: CreateArgs,
    },
    /// List resource gateways
    List(ListArgs),
    /// Show one resource gateway
    Get(IdArg),
    /// Delete a resource gateway (refused while configurations use it)
    Delete(IdArg),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConfigurationType {
    #[value(name = "SINGLE")]
    Single,
    #[value(name = "GROUP")]
    Group,
    #[value(name = "CHILD")]
    Child,
}

impl ConfigurationType {
    fn as_api(self) -> &'static str {
        match self {
            Self::Single => "SINGLE",
            Self::Group => "GROUP",
            Self::Child => "CHILD",
        }
    }
}

/// Where a configuration's resource is: `--ip` or `--dns-name`.
#[derive(Debug, Args, Default)]
pub struct DefinitionArgs {
    /// IP address of the resource, as the gateway reaches it
    #[arg(long, value_name = "IP", conflicts_with = "dns_name")]
    pub ip: Option<std::net::IpAddr>,

    /// DNS name of the resource, resolved in the owner's network
    #[arg(long, value_name = "NAME")]
    pub dns_name: Option<String>,

    /// Address type to resolve --dns-name to (IPV4, IPV6, DUALSTACK)
    #[arg(long, value_name = "TYPE", requires = "dns_name", value_parser = parse_ip_address_type)]
    pub dns_ip_address_type: Option<IpAddressType>,
}

impl DefinitionArgs {
    fn input(&self) -> Option<DefinitionInput> {
        if let Some(ip) = self.ip {
            return Some(DefinitionInput {
                ip_resource: Some(IpInput { ip_address: ip.to_string() }),
                dns_resource: None,
            });
        }
        let dns = DnsInput { domain_name: self.dns_name.clone()?, ip_address_type: self.dns_ip_address_type };
        Some(DefinitionInput { ip_resource: None, dns_resource: Some(dns) })
    }
}

#[derive(Debug, Subcommand)]
pub enum ResourceConfigurationVerb {
    /// Create a resource configuration (SINGLE, GROUP or CHILD)
    Create {
        /// Configuration name
        #[arg(long)]
        name: String,
        /// SINGLE (one resource), GROUP (a set of CHILD resources) or CHILD
        #[arg(long = "type", value_enum, ignore_case = true, value_name = "TYPE")]
        config_type: ConfigurationType,
        /// Resource gateway (SINGLE, GROUP)
        #[arg(long = "gateway", visible_alias = "resource-gateway", value_name = "RGW_ID")]
        resource_gateway_identifier: Option<String>,
        /// GROUP configuration a CHILD belongs to
        #[arg(long = "group", visible_alias = "resource-configuration-group", value_name = "RCFG_ID")]
        resource_configuration_group_identifier: Option<String>,
        #[command(flatten)]
        definition: DefinitionArgs,
        /// Port or port range, e.g. 5432 or 8000-8100 (repeatable)
        #[arg(long = "port-range", value_name = "RANGE")]
        port_ranges: Vec<PortRange>,
        /// Protocol
        #[arg(long, default_value = "TCP")]
        protocol: String,
        /// Custom DNS name served for the resource when an endpoint enables private DNS
        #[arg(long, value_name = "NAME")]
        custom_domain_name: Option<String>,
        #[command(flatten)]
        consumers: ConsumerArgs,
        #[command(flatten)]
        create: CreateArgs,
    },
    /// List resource configurations (yours and those shared with you)
    List(ListArgs),
    /// Show one resource configuration
    Get(IdArg),
    /// Change a configuration's ports, definition, PROXY protocol or per-consumer limits
    #[command(group(ArgGroup::new("change").required(true).multiple(true).args([
        "port_ranges", "ip", "dns_name", "proxy_protocol", "max_connections", "max_bits_per_second"
    ])))]
    Update {
        #[command(flatten)]
        target: IdArg,
        /// New port ranges, replacing the old ones (repeatable)
        #[arg(long = "port-range", value_name = "RANGE")]
        port_ranges: Vec<PortRange>,
        #[command(flatten)]
        definition: DefinitionArgs,
        #[command(flatten)]
        consumers: ConsumerArgs,
    },
    /// Delete a resource configuration
    Delete(IdArg),
    /// Who uses a resource: connections and bytes per consumer account and endpoint
    Usage(IdArg),
}

#[derive(Debug, Subcommand)]
pub enum ResourceShareVerb {
    /// Share resource configurations with accounts
    Create {
        /// Share name
        #[arg(long)]
        name: String,
        /// ARN of a resource configuration to share (repeatable)
        #[arg(long = "resource-arn", value_name = "ARN", required = true)]
        resource_arns: Vec<String>,
        /// Account id to share with (repeatable)
        #[arg(long = "principal", value_name = "ACCOUNT_ID")]
        principals: Vec<String>,
        #[command(flatten)]
        create: CreateArgs,
    },
    /// List your resource shares
    List(ListArgs),
    /// Show one resource share
    Get(IdArg),
    /// Delete a resource share: consumers lose access and their connections close
    Delete(IdArg),
}

#[derive(Debug, Subcommand)]
pub enum InvitationVerb {
    /// List resource share invitations
    List(ListArgs),
    /// Show one invitation
    Get(IdArg),
    /// Accept a pending invitation
    Accept(IdArg),
    /// Reject a pending invitation
    Reject(IdArg),
}

#[derive(Debug, Subcommand)]
pub enum VpcEndpointVerb {
    /// Create a Resource endpoint (a configuration shared with you) or an Interface endpoint (a service)
    Create {
        /// VPC of the endpoint
        #[arg(long = "vpc", visible_alias = "vpc-id", value_name = "VPC_ID")]
        vpc_id: String,
        /// Subnet to get an address in (repeatable)
        #[arg(long = "subnet", visible_alias = "subnet-id", value_name = "SUBNET_ID", required = true)]
        subnet_ids: Vec<String>,
        #[command(flatten)]
        target: EndpointTargetArgs,
        /// Also serve the configuration's custom domain name, or the service's private DNS name
        #[arg(long)]
        private_dns_enabled: bool,
        #[command(flatten)]
        create: CreateArgs,
    },
    /// List VPC endpoints
    List(ListArgs),
    /// Show one VPC endpoint, with its addresses and DNS names
    Get(IdArg),
    /// Delete a VPC endpoint
    Delete(IdArg),
}

/// What an endpoint connects to: exactly one of the two.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct EndpointTargetArgs {
    /// Resource configuration, by ARN or id (a Resource endpoint)
    #[arg(long = "resource-configuration", visible_alias = "resource-configuration-arn", value_name = "ARN|ID")]
    pub resource_configuration: Option<String>,
    /// Endpoint service, by name (trellis.vpce.<region>.vpce-svc-…) or id (an Interface endpoint)
    #[arg(long = "service-name", value_name = "NAME|ID")]
    pub service_name: Option<String>,
}

/// A `--target`: an IP address, or a DNS name resolved in the provider's network.
fn parse_target(s: &str) -> Result<TargetInput, String> {
    if s.is_empty() {
        return Err("give an IP address or a DNS name".into());
    }
    Ok(match s.parse::<std::net::IpAddr>() {
        Ok(ip) => TargetInput { ip_address: Some(ip.to_string()), domain_name: None },
        Err(_) => TargetInput { ip_address: None, domain_name: Some(s.to_string()) },
    })
}

/// A `--port`: `443`, or `443:8443` (consumers' port : targets' port).
fn parse_port(s: &str) -> Result<PortInput, String> {
    let num = |p: &str| p.parse::<u16>().ok().filter(|&p| p > 0).map(u32::from);
    let bad = || format!("{s:?} is not a port (1-65535) or PORT:TARGET_PORT, e.g. 443:8443");
    match s.split_once(':') {
        None => Ok(PortInput { port: num(s).ok_or_else(bad)?, target_port: None }),
        Some((p, t)) => Ok(PortInput { port: num(p).ok_or_else(bad)?, target_port: Some(num(t).ok_or_else(bad)?) }),
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
#[value(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LoadBalancingArg {
    LeastConnections,
    RoundRobin,
    SourceHash,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
#[value(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HealthProtocolArg {
    Tcp,
    Http,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
#[value(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ProxyProtocolArg {
    None,
    V2,
}

/// Shows a `ValueEnum` as the API writes it.
fn api_value(v: impl ValueEnum) -> String {
    v.to_possible_value().map(|p| p.get_name().to_string()).unwrap_or_default()
}

/// `--proxy-protocol` and per-consumer limits: services and resource configurations.
#[derive(Debug, Args, Default)]
pub struct ConsumerArgs {
    /// NONE or V2: send a PROXY v2 header (consumer account, VPC and endpoint) before the first byte
    #[arg(long, value_enum, ignore_case = true, value_name = "NONE|V2")]
    proxy_protocol: Option<ProxyProtocolArg>,
    /// Most concurrent connections of one consumer account (per gateway agent)
    #[arg(long, value_name = "N")]
    max_connections: Option<u32>,
    /// Most bits per second of one consumer account, each way (per gateway agent)
    #[arg(long, value_name = "BPS")]
    max_bits_per_second: Option<u64>,
}

impl ConsumerArgs {
    fn proxy_protocol(&self) -> Option<String> {
        self.proxy_protocol.map(api_value)
    }

    fn limits(&self) -> Option<LimitsInput> {
        (self.max_connections.is_some() || self.max_bits_per_second.is_some()).then_some(LimitsInput {
            max_connections: self.max_connections,
            max_bits_per_second: self.max_bits_per_second,
        })
    }
}

/// The settings of an endpoint service that create and update share.
#[derive(Debug, Args)]
pub struct ServiceSettingsArgs {
    /// A target: an IP address or a DNS name resolved in your network (repeatable)
    #[arg(long = "target", value_name = "IP|NAME", value_parser = parse_target)]
    targets: Vec<TargetInput>,
    /// A port consumers connect to, optionally mapped: 443 or 443:8443 (repeatable)
    #[arg(long = "port", value_name = "PORT[:TARGET_PORT]", value_parser = parse_port)]
    ports: Vec<PortInput>,
    /// Whether you accept each endpoint before it connects (default true)
    #[arg(long, value_name = "BOOL")]
    acceptance_required: Option<bool>,
    /// How connections spread over healthy targets
    #[arg(long, value_enum, ignore_case = true)]
    load_balancing: Option<LoadBalancingArg>,
    /// Health check protocol: TCP connect, or HTTP GET expecting 2xx/3xx
    #[arg(long, value_enum, ignore_case = true)]
    health_check_protocol: Option<HealthProtocolArg>,
    /// Port to check (default each target port)
    #[arg(long, value_name = "PORT")]
    health_check_port: Option<u32>,
    /// Path of an HTTP check (default /)
    #[arg(long, value_name = "PATH")]
    health_check_path: Option<String>,
    /// Seconds between checks (5-300, default 30)
    #[arg(long, value_name = "SECONDS")]
    health_check_interval: Option<u32>,
    /// Seconds a check may take (2-120, default 10)
    #[arg(long, value_name = "SECONDS")]
    health_check_timeout: Option<u32>,
    /// Passes before a target is healthy (2-10, default 5)
    #[arg(long, value_name = "N")]
    healthy_threshold: Option<u32>,
    /// Failures before a target is unhealthy (2-10, default 2)
    #[arg(long, value_name = "N")]
    unhealthy_threshold: Option<u32>,
    #[command(flatten)]
    consumers: ConsumerArgs,
    /// A name under a verified domain of yours, answered in consumers' VPCs that enable private DNS
    #[arg(long, value_name = "NAME")]
    private_dns_name: Option<String>,
}

impl ServiceSettingsArgs {
    fn health_check(&self) -> Option<HealthCheckInput> {
        let input = HealthCheckInput {
            protocol: self.health_check_protocol.map(api_value),
            port: self.health_check_port,
            path: self.health_check_path.clone(),
            interval_seconds: self.health_check_interval,
            timeout_seconds: self.health_check_timeout,
            healthy_threshold_count: self.healthy_threshold,
            unhealthy_threshold_count: self.unhealthy_threshold,
        };
        (input != HealthCheckInput::default()).then_some(input)
    }

    fn update(&self) -> UpdateService {
        UpdateService {
            targets: (!self.targets.is_empty()).then(|| self.targets.clone()),
            ports: (!self.ports.is_empty()).then(|| self.ports.clone()),
            acceptance_required: self.acceptance_required,
            load_balancing: self.load_balancing.map(api_value),
            health_check: self.health_check(),
            proxy_protocol: self.consumers.proxy_protocol(),
            per_consumer_limits: self.consumers.limits(),
            private_dns_name: self.private_dns_name.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum EndpointServiceVerb {
    /// Publish an endpoint service: targets behind one name, balanced and health-checked by your agents
    Create {
        /// Service name
        #[arg(long)]
        name: String,
        /// Your VPC
        #[arg(long = "vpc", visible_alias = "vpc-id", value_name = "VPC_ID")]
        vpc_id: String,
        /// Subnet whose agents (started with --advertise) run the service (repeatable)
        #[arg(long = "subnet", visible_alias = "subnet-id", value_name = "SUBNET_ID", required = true)]
        subnet_ids: Vec<String>,
        #[command(flatten)]
        settings: ServiceSettingsArgs,
        #[command(flatten)]
        create: CreateArgs,
    },
    /// List your endpoint services
    List(ListArgs),
    /// List the endpoint services you may connect to
    Available(ListArgs),
    /// Show one endpoint service, with its targets' health
    Get(IdArg),
    /// Change a service's targets, ports or settings (the flags given replace the old values)
    Update {
        #[command(flatten)]
        target: IdArg,
        #[command(flatten)]
        settings: ServiceSettingsArgs,
    },
    /// Delete an endpoint service (reject its endpoints first)
    Delete(IdArg),
    /// Show the principals allowed to connect
    Permissions(IdArg),
    /// Allow or disallow accounts (* = any account); disallowed accounts' endpoints stop working
    #[command(group(ArgGroup::new("change").required(true).multiple(true).args(["add", "remove"])))]
    ModifyPermissions {
        #[command(flatten)]
        target: IdArg,
        /// Account id or * to allow (repeatable)
        #[arg(long = "add-principal", value_name = "ACCOUNT_ID|*")]
        add: Vec<String>,
        /// Account id or * to disallow (repeatable)
        #[arg(long = "remove-principal", value_name = "ACCOUNT_ID|*")]
        remove: Vec<String>,
    },
    /// List the endpoints connected (or asking to connect) to a service
    Connections {
        #[command(flatten)]
        target: IdArg,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Accept endpoints waiting for acceptance
    Accept {
        #[command(flatten)]
        target: IdArg,
        /// Endpoint id (repeatable)
        #[arg(long = "endpoint", value_name = "VPCE_ID", required = true)]
        endpoints: Vec<String>,
    },
    /// Reject endpoints: they stop working and their open connections close
    Reject {
        #[command(flatten)]
        target: IdArg,
        /// Endpoint id (repeatable)
        #[arg(long = "endpoint", value_name = "VPCE_ID", required = true)]
        endpoints: Vec<String>,
    },
    /// Who uses the service: connections and bytes per consumer account and endpoint
    Usage(IdArg),
}

impl EndpointServiceVerb {
    pub fn request(&self) -> ApiRequest {
        match self {
            Self::Create { name, vpc_id, subnet_ids, settings, create } => {
                let u = settings.update();
                ApiRequest::send(
                    &services::CREATE,
                    &CreateService {
                        name: name.clone(),
                        vpc_id: vpc_id.clone(),
                        subnet_ids: subnet_ids.clone(),
                        targets: u.targets.unwrap_or_default(),
                        ports: u.ports.unwrap_or_default(),
                        acceptance_required: u.acceptance_required,
                        load_balancing: u.load_balancing,
                        health_check: u.health_check,
                        proxy_protocol: u.proxy_protocol,
                        per_consumer_limits: u.per_consumer_limits,
                        private_dns_name: u.private_dns_name,
                        client_token: create.token(),
                    },
                )
            }
            Self::List(l) => ApiRequest::list(&services::LIST, &l.query()),
            Self::Available(l) => ApiRequest::list(&services::AVAILABLE, &l.query()),
            Self::Get(t) => ApiRequest::at(&services::GET, &t.id),
            Self::Update { target, settings } => ApiRequest::send_to(&services::UPDATE, &target.id, &settings.update()),
            Self::Delete(t) => ApiRequest::at(&services::DELETE, &t.id),
            Self::Permissions(t) => ApiRequest::at(&services::PERMISSIONS, &t.id),
            Self::ModifyPermissions { target, add, remove } => ApiRequest::send_to(
                &services::MODIFY_PERMISSIONS,
                &target.id,
                &ModifyPermissions { add_allowed_principals: add.clone(), remove_allowed_principals: remove.clone() },
            ),
            Self::Connections { target, list } => {
                ApiRequest::list_at(&services::CONNECTIONS, &target.id, &list.query())
            }
            Self::Accept { target, endpoints } => ApiRequest::send_to(
                &services::ACCEPT,
                &target.id,
                &ConnectionIds { vpc_endpoint_ids: endpoints.clone() },
            ),
            Self::Reject { target, endpoints } => ApiRequest::send_to(
                &services::REJECT,
                &target.id,
                &ConnectionIds { vpc_endpoint_ids: endpoints.clone() },
            ),
            Self::Usage(t) => ApiRequest::at(&services::USAGE, &t.id),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum DomainVerificationVerb {
    /// Start verifying a domain: prints the TXT record to publish in its DNS
    Create {
        /// Domain to verify, e.g. example.com (covers every name under it)
        #[arg(long, value_name = "DOMAIN")]
        domain_name: String,
        #[command(flatten)]
        create: CreateArgs,
    },
    /// List domain verifications
    List(ListArgs),
    /// Show one domain verification, with its TXT record and status
    Get(IdArg),
    /// Delete a domain verification (its domain stops counting as verified)
    Delete(IdArg),
}

#[derive(Debug, Subcommand)]
pub enum ConnectionNotificationVerb {
    /// Subscribe a webhook to events of your endpoint service or endpoint, or account-wide (neither)
    #[command(group(ArgGroup::new("scope").args(["service_id", "vpc_endpoint_id"])))]
    Create {
        /// Endpoint service of yours: events about endpoints connecting to it
        #[arg(long, value_name = "VPCE_SVC_ID")]
        service_id: Option<String>,
        /// Endpoint of yours: events about it
        #[arg(long, value_name = "VPCE_ID")]
        vpc_endpoint_id: Option<String>,
        /// Event to send (repeatable): Connect, Accept, Reject, Delete (service or endpoint);
        /// ResourceShareInvitation, ResourceEndpointCreate (account-wide)
        #[arg(long = "event", value_name = "EVENT", required = true)]
        connection_events: Vec<String>,
        /// http(s) URL the events are POSTed to (the API's `url`)
        #[arg(long, value_name = "URL")]
        webhook_url: String,
        /// Secret that signs every delivery (Trellis-Signature), 1-256 characters; never shown again
        #[arg(long, env = "TRELLIS_WEBHOOK_SECRET", value_name = "SECRET", hide_env_values = true)]
        secret: String,
        #[command(flatten)]
        create: CreateArgs,
    },
    /// List your connection notifications
    List(ListArgs),
    /// Show one connection notification (never its secret)
    Get(IdArg),
    /// Change a notification's URL, events or secret
    #[command(group(ArgGroup::new("change").required(true).multiple(true).args(["connection_events", "webhook_url", "secret"])))]
    Update {
        #[command(flatten)]
        target: IdArg,
        /// Events, replacing the old list (repeatable)
        #[arg(long = "event", value_name = "EVENT")]
        connection_events: Vec<String>,
        /// New http(s) URL (the API's `url`)
        #[arg(long, value_name = "URL")]
        webhook_url: Option<String>,
        /// New secret (from now on every attempt is signed with it)
        #[arg(long, value_name = "SECRET")]
        secret: Option<String>,
    },
    /// Delete a connection notification, its pending deliveries and its log
    Delete(IdArg),
    /// The deliveries log, newest first: each event and every attempt's status
    Deliveries {
        #[command(flatten)]
        target: IdArg,
        #[command(flatten)]
        list: ListArgs,
    },
}

fn parse_expiry(s: &str) -> Result<u64, String> {
    let secs = match s.parse::<u64>() {
        Ok(n) => n,
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 3600, 30m or 2h"))?
            .as_secs(),
    };
    if !(60..=86_400).contains(&secs) {
        return Err(format!("{s:?} is outside 60s-24h"));
    }
    Ok(secs)
}

/// `IPV4`, `IPV6` or `DUALSTACK` (any case), as the API spells them.
fn parse_ip_address_type(s: &str) -> Result<IpAddressType, String> {
    serde_json::from_value(s.to_ascii_uppercase().into())
        .map_err(|_| format!("{s:?} is not an address type; write IPV4, IPV6 or DUALSTACK"))
}

impl ListArgs {
    fn query(&self) -> ListQuery {
        ListQuery { max_results: self.max_results.map(|n| n as usize), next_token: self.next_token.clone() }
    }

    /// The paging, and only the objects of `vpc_id` when given.
    fn in_vpc(&self, vpc_id: Option<String>) -> VpcListQuery {
        let ListQuery { max_results, next_token } = self.query();
        VpcListQuery { max_results, next_token, vpc_id }
    }
}

impl CreateArgs {
    fn token(&self) -> Option<String> {
        self.client_token.clone()
    }
}

impl AccountVerb {
    pub fn request(&self) -> ApiRequest {
        match self {
            Self::Create { name, organization_id, create } => ApiRequest::send(
                &accounts::CREATE,
                &CreateAccount {
                    name: name.clone(),
                    organization_id: organization_id.clone(),
                    client_token: create.token(),
                },
            ),
            Self::List(l) => ApiRequest::list(&accounts::LIST, &l.query()),
            Self::Get(t) => ApiRequest::at(&accounts::GET, &t.id),
            // `--no-organization` sends an explicit null: leave the organization.
            Self::Update { target, organization_id, no_organization: _ } => ApiRequest::send_to(
                &accounts::UPDATE,
                &target.id,
                &UpdateAccount { organization_id: Some(organization_id.clone()) },
            ),
            Self::CreateApiKey(t) => ApiRequest::at(&accounts::CREATE_API_KEY, &t.id),
        }
    }
}

impl OrganizationVerb {
    pub fn request(&self) -> ApiRequest {
        match self {
            Self::Create { name, create } => ApiRequest::send(
                &organizations::CREATE,
                &CreateOrganization { name: name.clone(), client_token: create.token() },
            ),
            Self::List(l) => ApiRequest::list(&organizations::LIST, &l.query()),
            Self::Get(t) => ApiRequest::at(&organizations::GET, &t.id),
        }
    }
}

impl VpcVerb {
    pub fn request(&self) -> ApiRequest {
        match self {
            Self::Create { name, create } => {
                ApiRequest::send(&vpcs::CREATE, &CreateVpc { name: name.clone(), client_token: create.token() })
            }
            Self::List(l) => ApiRequest::list(&vpcs::LIST, &l.query()),
            Self::Get(t) => ApiRequest::at(&vpcs::GET, &t.id),
            Self::Update { target, name } => {
                ApiRequest::send_to(&vpcs::UPDATE, &target.id, &UpdateVpc { name: Some(name.clone()) })
            }
            Self::Delete(t) => ApiRequest::at(&vpcs::DELETE, &t.id),
        }
    }
}

impl SubnetVerb {
    pub fn request(&self) -> ApiRequest {
        match self {
            Self::Create { vpc_id, zone, cidr_block, name, create } => ApiRequest::send(
                &subnets::CREATE,
                &CreateSubnet {
                    vpc_id: vpc_id.clone(),
                    zone: zone.clone(),
                    cidr_block: cidr_block.clone(),
                    name: name.clone(),
                    client_token: create.token(),
                },
            ),
            Self::List { vpc_id, list } => ApiRequest::list(&subnets::LIST, &list.in_vpc(vpc_id.clone())),
            Self::Get(t) => ApiRequest::at(&subnets::GET, &t.id),
            Self::Delete(t) => ApiRequest::at(&subnets::DELETE, &t.id),
        }
    }
}

impl AgentTokenVerb {
    pub fn request(&self) -> ApiRequest {
        match self {
            // Join tokens take no clientToken (a replay could not show the secret again).
            Self::Create { subnet_id, expires_in, create: _ } => ApiRequest::send(
                &agents::CREATE_TOKEN,
                &CreateAgentToken { subnet_id: subnet_id.clone(), expires_in_seconds: *expires_in },
            ),
            Self::List(l) => ApiRequest::list(&agents::LIST_TOKENS, &l.query()),
            Self::Get(t) => ApiRequest::at(&agents::GET_TOKEN, &t.id),
            Self::Delete(t) => ApiRequest::at(&agents::DELETE_TOKEN, &t.id),
        }
    }
}

impl RelayTokenVerb {
    pub fn request(&self) -> ApiRequest {
        match self {
            Self::Create { zone, expires_in } => ApiRequest::send(
                &relays::CREATE_TOKEN,
                &CreateRelayToken { zone: zone.clone(), expires_in_seconds: *expires_in },
            ),
            Self::List(l) => ApiRequest::list(&relays::LIST_TOKENS, &l.query()),
            Self::Get(t) => ApiRequest::at(&relays::GET_TOKEN, &t.id),
            Self::Delete(t) => ApiRequest::at(&relays::DELETE_TOKEN, &t.id),
        }
    }
}

impl RelaysVerb {
    pub fn request(&self) -> ApiRequest {
        match self {
            Self::List(l) => ApiRequest::list(&relays::LIST, &l.query()),
            Self::Get(t) => ApiRequest::at(&relays::GET, &t.id),
            Self::Delete(t) => ApiRequest::at(&relays::DELETE, &t.id),
        }
    }
}

impl AgentVerb {
    pub fn request(&self) -> ApiRequest {
        match self {
            Self::List(l) => {
                let ListQuery { max_results, next_token } = l.query();
                ApiRequest::list(&agents::LIST, &AgentListQuery { max_results, next_token, ..Default::default() })
            }
            Self::Get(t) => ApiRequest::at(&agents::GET, &t.id),
            Self::Delete(t) => ApiRequest::at(&agents::DELETE, &t.id),
        }
    }
}

impl ResourceGatewayVerb {
    pub fn request(&self) -> ApiRequest {
        match self {
            Self::Create { name, vpc_identifier, subnet_ids, ip_address_type, create } => ApiRequest::send(
                &gateways::CREATE,
                &CreateGateway {
                    name: name.clone(),
                    vpc_identifier: vpc_identifier.clone(),
                    subnet_ids: subnet_ids.clone(),
                    ip_address_type: *ip_address_type,
                    client_token: create.token(),
                },
            ),
            Self::List(l) => ApiRequest::list(&gateways::LIST, &l.query()),
            Self::Get(t) => ApiRequest::at(&gateways::GET, &t.id),
            Self::Delete(t) => ApiRequest::at(&gateways::DELETE, &t.id),
        }
    }
}

/// `--port-range` flags as the API's `portRanges`: absent when none is given.
fn port_ranges(ranges: &[PortRange]) -> Option<Vec<String>> {
    (!ranges.is_empty()).then(|| ranges.iter().map(PortRange::to_string).collect())
}

impl ResourceConfigurationVerb {
    pub fn request(&self) -> ApiRequest {
        match self {
            Self::Create {
                name,
                config_type,
                resource_gateway_identifier,
                resource_configuration_group_identifier,
                definition,
                port_ranges: ranges,
                protocol,
                custom_domain_name,
                consumers,
                create,
            } => ApiRequest::send(
                &configurations::CREATE,
                &CreateConfiguration {
                    name: name.clone(),
                    config_type: config_type.as_api().to_string(),
                    resource_gateway_identifier: resource_gateway_identifier.clone(),
                    resource_configuration_group_identifier: resource_configuration_group_identifier.clone(),
                    resource_configuration_definition: definition.input(),
                    port_ranges: port_ranges(ranges),
                    protocol: Some(protocol.clone()),
                    custom_domain_name: custom_domain_name.clone(),
                    proxy_protocol: consumers.proxy_protocol(),
                    per_consumer_limits: consumers.limits(),
                    client_token: create.token(),
                },
            ),
            Self::List(l) => ApiRequest::list(&configurations::LIST, &l.query()),
            Self::Get(t) => ApiRequest::at(&configurations::GET, &t.id),
            Self::Update { target, port_ranges: ranges, definition, consumers } => ApiRequest::send_to(
                &configurations::UPDATE,
                &target.id,
                &UpdateConfiguration {
                    port_ranges: port_ranges(ranges),
                    resource_configuration_definition: definition.input(),
                    proxy_protocol: consumers.proxy_protocol(),
                    per_consumer_limits: consumers.limits(),
                },
            ),
            Self::Delete(t) => ApiRequest::at(&configurations::DELETE, &t.id),
            Self::Usage(t) => ApiRequest::at(&configurations::USAGE, &t.id),
        }
    }
}

impl ResourceShareVerb {
    pub fn request(&self) -> ApiRequest {
        match self {
            Self::Create { name, resource_arns, principals, create } => ApiRequest::send(
                &shares::CREATE,
                &CreateShare {
                    name: name.clone(),
                    resource_arns: resource_arns.clone(),
                    principals: principals.clone(),
                    client_token: create.token(),
                },
            ),
            Self::List(l) => ApiRequest::list(&shares::LIST, &l.query()),
            Self::Get(t) => ApiRequest::at(&shares::GET, &t.id),
            Self::Delete(t) => ApiRequest::at(&shares::DELETE, &t.id),
        }
    }
}

impl InvitationVerb {
    pub fn request(&self) -> ApiRequest {
        match self {
            Self::List(l) => {
                let ListQuery { max_results, next_token } = l.query();
                ApiRequest::list(&invitations::LIST, &InvitationListQuery { max_results, next_token, status: None })
            }
            Self::Get(t) => ApiRequest::at(&invitations::GET, &t.id),
            Self::Accept(t) => ApiRequest::at(&invitations::ACCEPT, &t.id),
            Self::Reject(t) => ApiRequest::at(&invitations::REJECT, &t.id),
        }
    }
}

impl VpcEndpointVerb {
    pub fn request(&self) -> ApiRequest {
        match self {
            Self::Create { vpc_id, subnet_ids, target, private_dns_enabled, create } => {
                let kind = if target.service_name.is_some() { "Interface" } else { "Resource" };
                ApiRequest::send(
                    &endpoints::CREATE,
                    &CreateEndpoint {
                        vpc_endpoint_type: kind.into(),
                        vpc_id: vpc_id.clone(),
                        subnet_ids: subnet_ids.clone(),
                        resource_configuration_arn: target.resource_configuration.clone(),
                        service_name: target.service_name.clone(),
                        private_dns_enabled: *private_dns_enabled,
                        client_token: create.token(),
                        ..Default::default()
                    },
                )
            }
            Self::List(l) => ApiRequest::list(&endpoints::LIST, &l.in_vpc(None)),
            Self::Get(t) => ApiRequest::at(&endpoints::GET, &t.id),
            Self::Delete(t) => ApiRequest::at(&endpoints::DELETE, &t.id),
        }
    }
}

impl DomainVerificationVerb {
    pub fn request(&self) -> ApiRequest {
        match self {
            Self::Create { domain_name, create } => ApiRequest::send(
                &domains::CREATE,
                &CreateDomainVerification { domain_name: domain_name.clone(), client_token: create.token() },
            ),
            Self::List(l) => ApiRequest::list(&domains::LIST, &l.query()),
            Self::Get(t) => ApiRequest::at(&domains::GET, &t.id),
            Self::Delete(t) => ApiRequest::at(&domains::DELETE, &t.id),
        }
    }
}

impl ConnectionNotificationVerb {
    pub fn request(&self) -> ApiRequest {
        match self {
            Self::Create { service_id, vpc_endpoint_id, connection_events, webhook_url, secret, create } => {
                ApiRequest::send(
                    &notifications::CREATE,
                    &CreateConnectionNotification {
                        service_id: service_id.clone(),
                        vpc_endpoint_id: vpc_endpoint_id.clone(),
                        connection_events: connection_events.clone(),
                        url: webhook_url.clone(),
                        secret: secret.clone(),
                        client_token: create.token(),
                    },
                )
            }
            Self::List(l) => ApiRequest::list(&notifications::LIST, &l.query()),
            Self::Get(t) => ApiRequest::at(&notifications::GET, &t.id),
            Self::Update { target, connection_events, webhook_url, secret } => ApiRequest::send_to(
                &notifications::UPDATE,
                &target.id,
                &UpdateConnectionNotification {
                    connection_events: (!connection_events.is_empty()).then(|| connection_events.clone()),
                    url: webhook_url.clone(),
                    secret: secret.clone(),
                },
            ),
            Self::Delete(t) => ApiRequest::at(&notifications::DELETE, &t.id),
            Self::Deliveries { target, list } => {
                ApiRequest::list_at(&notifications::DELIVERIES, &target.id, &list.query())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use reqwest::Method;
    use serde_json::json;

    use crate::cli::{AgentCommand, Cli, Command};
    use crate::client::ApiRequest;
    use clap::Parser;

    fn request(args: &str) -> ApiRequest {
        let argv = std::iter::once("trellis").chain(args.split_whitespace());
        let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("`trellis {args}` does not parse: {e}"));
        match cli.command {
            Command::Account(v) => v.request(),
            Command::Organization(v) => v.request(),
            Command::Vpc(v) => v.request(),
            Command::Subnet(v) => v.request(),
            Command::AgentToken(v) => v.request(),
            Command::Agent(AgentCommand { verb: Some(v), .. }) => v.request(),
            Command::RelayToken(v) => v.request(),
            Command::Relays(v) => v.request(),
            Command::ResourceGateway(v) => v.request(),
            Command::ResourceConfiguration(v) => v.request(),
            Command::ResourceShare(v) => v.request(),
            Command::Invitation(v) => v.request(),
            Command::VpcEndpoint(v) => v.request(),
            Command::DomainVerification(v) => v.request(),
            Command::EndpointService(v) => v.request(),
            Command::ConnectionNotification(v) => v.request(),
            other => panic!("`trellis {args}` is not an API verb: {other:?}"),
        }
    }

    fn check(args: &str, method: Method, path: &str, body: Option<serde_json::Value>) {
        let req = request(args);
        assert_eq!((&req.method, req.path.as_str()), (&method, path), "trellis {args}");
        assert_eq!(req.body, body, "trellis {args}");
    }

    type Case = (&'static str, Method, &'static str, Option<serde_json::Value>);

    /// A verb, and the method, path and body it must send.
    fn cases() -> Vec<Case> {
        use Method as M;
        let none = None;
        let empty = Some(json!({}));
        vec![
            ("account create --name acme", M::POST, "/v1/accounts", Some(json!({"name": "acme"}))),
            ("account list", M::GET, "/v1/accounts", none.clone()),
            ("account get acct-000000000001", M::GET, "/v1/accounts/acct-000000000001", none.clone()),
            (
                "account update acct-1 --organization-id o-abc",
                M::PATCH,
                "/v1/accounts/acct-1",
                Some(json!({"organizationId": "o-abc"})),
            ),
            (
                "account update acct-1 --no-organization",
                M::PATCH,
                "/v1/accounts/acct-1",
                Some(json!({"organizationId": null})),
            ),
            ("account create-api-key acct-1", M::POST, "/v1/accounts/acct-1/apikeys", empty.clone()),
            ("organization create --name org1", M::POST, "/v1/organizations", Some(json!({"name": "org1"}))),
            ("organization list", M::GET, "/v1/organizations", none.clone()),
            ("organization get o-1", M::GET, "/v1/organizations/o-1", none.clone()),
            ("vpc create --name prod", M::POST, "/v1/vpcs", Some(json!({"name": "prod"}))),
            ("vpc list", M::GET, "/v1/vpcs", none.clone()),
            ("vpc get vpc-1", M::GET, "/v1/vpcs/vpc-1", none.clone()),
            ("vpc update vpc-1 --name next", M::PATCH, "/v1/vpcs/vpc-1", Some(json!({"name": "next"}))),
            ("vpc delete vpc-1", M::DELETE, "/v1/vpcs/vpc-1", none.clone()),
            (
                "subnet create --vpc vpc-1 --zone z1 --cidr-block 10.0.9.0/24",
                M::POST,
                "/v1/subnets",
                Some(json!({"vpcId": "vpc-1", "zone": "z1", "cidrBlock": "10.0.9.0/24"})),
            ),
            ("subnet list", M::GET, "/v1/subnets", none.clone()),
            ("subnet get subnet-1", M::GET, "/v1/subnets/subnet-1", none.clone()),
            ("subnet delete subnet-1", M::DELETE, "/v1/subnets/subnet-1", none.clone()),
            (
                "agent-token create --subnet subnet-1 --expires-in 2h",
                M::POST,
                "/v1/agent-tokens",
                Some(json!({"subnetId": "subnet-1", "expiresInSeconds": 7200})),
            ),
            ("agent-token list", M::GET, "/v1/agent-tokens", none.clone()),
            ("agent-token get jt-1", M::GET, "/v1/agent-tokens/jt-1", none.clone()),
            ("agent-token delete jt-1", M::DELETE, "/v1/agent-tokens/jt-1", none.clone()),
            ("agent list", M::GET, "/v1/agents", none.clone()),
            ("agent get agent-1", M::GET, "/v1/agents/agent-1", none.clone()),
            ("agent delete agent-1", M::DELETE, "/v1/agents/agent-1", none.clone()),
            (
                "relay-token create --zone z1 --expires-in 2h",
                M::POST,
                "/v1/relay-tokens",
                Some(json!({"zone": "z1", "expiresInSeconds": 7200})),
            ),
            ("relay-token create", M::POST, "/v1/relay-tokens", empty.clone()),
            ("relay-token list", M::GET, "/v1/relay-tokens", none.clone()),
            ("relay-token get jt-1", M::GET, "/v1/relay-tokens/jt-1", none.clone()),
            ("relay-token delete jt-1", M::DELETE, "/v1/relay-tokens/jt-1", none.clone()),
            ("relays list", M::GET, "/v1/relays", none.clone()),
            ("relays get relay-1", M::GET, "/v1/relays/relay-1", none.clone()),
            ("relays delete relay-1", M::DELETE, "/v1/relays/relay-1", none.clone()),
            (
                "resource-gateway create --name gw --vpc vpc-1 --subnet subnet-1 --subnet subnet-2",
                M::POST,
                "/v1/resourcegateways",
                Some(json!({"name": "gw", "vpcIdentifier": "vpc-1", "subnetIds": ["subnet-1", "subnet-2"]})),
            ),
            ("resource-gateway list", M::GET, "/v1/resourcegateways", none.clone()),
            ("resource-gateway get rgw-1", M::GET, "/v1/resourcegateways/rgw-1", none.clone()),
            ("resource-gateway delete rgw-1", M::DELETE, "/v1/resourcegateways/rgw-1", none.clone()),
            (
                "resource-configuration create --name db --type SINGLE --gateway rgw-1 --ip 10.0.0.10 \
                 --port-range 5432 --port-range 8000-8100",
                M::POST,
                "/v1/resourceconfigurations",
                Some(json!({
                    "name": "db", "type": "SINGLE", "resourceGatewayIdentifier": "rgw-1",
                    "resourceConfigurationDefinition": {"ipResource": {"ipAddress": "10.0.0.10"}},
                    "portRanges": ["5432", "8000-8100"], "protocol": "TCP",
                })),
            ),
            (
                "resource-configuration create --name web --type child --group rcfg-g --dns-name web.internal \
                 --dns-ip-address-type IPV4 --port-range 443 --custom-domain-name web.example.com",
                M::POST,
                "/v1/resourceconfigurations",
                Some(json!({
                    "name": "web", "type": "CHILD", "resourceConfigurationGroupIdentifier": "rcfg-g",
                    "resourceConfigurationDefinition": {"dnsResource": {"domainName": "web.internal", "ipAddressType": "IPV4"}},
                    "portRanges": ["443"], "protocol": "TCP", "customDomainName": "web.example.com",
                })),
            ),
            (
                "resource-configuration create --name grp --type GROUP --gateway rgw-1 --port-range 1-65535",
                M::POST,
                "/v1/resourceconfigurations",
                Some(json!({
                    "name": "grp", "type": "GROUP", "resourceGatewayIdentifier": "rgw-1",
                    "portRanges": ["1-65535"], "protocol": "TCP",
                })),
            ),
            ("resource-configuration list", M::GET, "/v1/resourceconfigurations", none.clone()),
            ("resource-configuration get rcfg-1", M::GET, "/v1/resourceconfigurations/rcfg-1", none.clone()),
            (
                "resource-configuration update rcfg-1 --port-range 5433",
                M::PATCH,
                "/v1/resourceconfigurations/rcfg-1",
                Some(json!({"portRanges": ["5433"]})),
            ),
            (
                "resource-configuration update rcfg-1 --ip 10.0.0.11",
                M::PATCH,
                "/v1/resourceconfigurations/rcfg-1",
                Some(json!({"resourceConfigurationDefinition": {"ipResource": {"ipAddress": "10.0.0.11"}}})),
            ),
            ("resource-configuration delete rcfg-1", M::DELETE, "/v1/resourceconfigurations/rcfg-1", none.clone()),
            ("resource-configuration usage rcfg-1", M::GET, "/v1/resourceconfigurations/rcfg-1/usage", none.clone()),
            (
                "resource-share create --name s --resource-arn arn:a --principal acct-000000000002",
                M::POST,
                "/v1/resourceshares",
                Some(json!({"name": "s", "resourceArns": ["arn:a"], "principals": ["acct-000000000002"]})),
            ),
            ("resource-share list", M::GET, "/v1/resourceshares", none.clone()),
            ("resource-share get rs-1", M::GET, "/v1/resourceshares/rs-1", none.clone()),
            ("resource-share delete rs-1", M::DELETE, "/v1/resourceshares/rs-1", none.clone()),
            ("invitation list", M::GET, "/v1/resourceshareinvitations", none.clone()),
            ("invitation get rsi-1", M::GET, "/v1/resourceshareinvitations/rsi-1", none.clone()),
            ("invitation accept rsi-1", M::POST, "/v1/resourceshareinvitations/rsi-1/accept", empty.clone()),
            ("invitation reject rsi-1", M::POST, "/v1/resourceshareinvitations/rsi-1/reject", empty.clone()),
            (
                "vpc-endpoint create --vpc vpc-2 --subnet subnet-9 --resource-configuration arn:x --private-dns-enabled",
                M::POST,
                "/v1/vpcendpoints",
                Some(json!({
                    "vpcEndpointType": "Resource", "vpcId": "vpc-2", "subnetIds": ["subnet-9"],
                    "resourceConfigurationArn": "arn:x", "privateDnsEnabled": true,
                })),
            ),
            (
                "vpc-endpoint create --vpc vpc-2 --subnet subnet-9 --service-name trellis.vpce.local.vpce-svc-1",
                M::POST,
                "/v1/vpcendpoints",
                Some(json!({
                    "vpcEndpointType": "Interface", "vpcId": "vpc-2", "subnetIds": ["subnet-9"],
                    "serviceName": "trellis.vpce.local.vpce-svc-1", "privateDnsEnabled": false,
                })),
            ),
            ("vpc-endpoint list", M::GET, "/v1/vpcendpoints", none.clone()),
            ("vpc-endpoint get vpce-1", M::GET, "/v1/vpcendpoints/vpce-1", none.clone()),
            (
                "endpoint-service create --name orders --vpc vpc-1 --subnet subnet-1 --target 10.0.1.5 \
                 --target api-2.internal --port 443:8443 --acceptance-required false --load-balancing round_robin \
                 --health-check-protocol http --health-check-path /healthz --health-check-interval 5 \
                 --health-check-timeout 2 --healthy-threshold 2 --unhealthy-threshold 2 --proxy-protocol v2 \
                 --max-connections 10 --max-bits-per-second 1000000 --private-dns-name api.orders.example",
                M::POST,
                "/v1/vpcendpointservices",
                Some(json!({
                    "name": "orders", "vpcId": "vpc-1", "subnetIds": ["subnet-1"],
                    "targets": [{"ipAddress": "10.0.1.5"}, {"domainName": "api-2.internal"}],
                    "ports": [{"port": 443, "targetPort": 8443}], "acceptanceRequired": false,
                    "loadBalancing": "ROUND_ROBIN",
                    "healthCheck": {"protocol": "HTTP", "path": "/healthz", "intervalSeconds": 5, "timeoutSeconds": 2,
                                    "healthyThresholdCount": 2, "unhealthyThresholdCount": 2},
                    "proxyProtocol": "V2", "perConsumerLimits": {"maxConnections": 10, "maxBitsPerSecond": 1000000},
                    "privateDnsName": "api.orders.example",
                })),
            ),
            ("endpoint-service list", M::GET, "/v1/vpcendpointservices", none.clone()),
            ("endpoint-service available", M::GET, "/v1/vpcendpointservices/available", none.clone()),
            ("endpoint-service get vpce-svc-1", M::GET, "/v1/vpcendpointservices/vpce-svc-1", none.clone()),
            (
                "endpoint-service update vpce-svc-1 --target 10.0.1.6 --port 80",
                M::PATCH,
                "/v1/vpcendpointservices/vpce-svc-1",
                Some(json!({"targets": [{"ipAddress": "10.0.1.6"}], "ports": [{"port": 80}]})),
            ),
            ("endpoint-service delete vpce-svc-1", M::DELETE, "/v1/vpcendpointservices/vpce-svc-1", none.clone()),
            (
                "endpoint-service permissions vpce-svc-1",
                M::GET,
                "/v1/vpcendpointservices/vpce-svc-1/permissions",
                none.clone(),
            ),
            (
                "endpoint-service modify-permissions vpce-svc-1 --add-principal acct-000000000002 --remove-principal *",
                M::POST,
                "/v1/vpcendpointservices/vpce-svc-1/permissions",
                Some(json!({"addAllowedPrincipals": ["acct-000000000002"], "removeAllowedPrincipals": ["*"]})),
            ),
            (
                "endpoint-service connections vpce-svc-1",
                M::GET,
                "/v1/vpcendpointservices/vpce-svc-1/connections",
                none.clone(),
            ),
            (
                "endpoint-service accept vpce-svc-1 --endpoint vpce-1",
                M::POST,
                "/v1/vpcendpointservices/vpce-svc-1/connections/accept",
                Some(json!({"vpcEndpointIds": ["vpce-1"]})),
            ),
            (
                "endpoint-service reject vpce-svc-1 --endpoint vpce-1 --endpoint vpce-2",
                M::POST,
                "/v1/vpcendpointservices/vpce-svc-1/connections/reject",
                Some(json!({"vpcEndpointIds": ["vpce-1", "vpce-2"]})),
            ),
            ("endpoint-service usage vpce-svc-1", M::GET, "/v1/vpcendpointservices/vpce-svc-1/usage", none.clone()),
            ("vpc-endpoint delete vpce-1", M::DELETE, "/v1/vpcendpoints/vpce-1", none.clone()),
            (
                "domain-verification create --domain-name example.com --client-token t-2",
                M::POST,
                "/v1/domainverifications",
                Some(json!({"domainName": "example.com", "clientToken": "t-2"})),
            ),
            ("domain-verification list", M::GET, "/v1/domainverifications", none.clone()),
            ("domain-verification get dv-1", M::GET, "/v1/domainverifications/dv-1", none.clone()),
            ("domain-verification delete dv-1", M::DELETE, "/v1/domainverifications/dv-1", none.clone()),
            (
                "connection-notification create --service-id vpce-svc-0123456789abcdef0 --event Connect --event Accept \
                 --webhook-url https://hooks.example.com/t --secret s3cret --client-token t-3",
                M::POST,
                "/v1/connectionnotifications",
                Some(json!({
                    "serviceId": "vpce-svc-0123456789abcdef0", "connectionEvents": ["Connect", "Accept"],
                    "url": "https://hooks.example.com/t", "secret": "s3cret", "clientToken": "t-3",
                })),
            ),
            (
                "connection-notification create --event ResourceShareInvitation --webhook-url http://h/x --secret s",
                M::POST,
                "/v1/connectionnotifications",
                Some(json!({"connectionEvents": ["ResourceShareInvitation"], "url": "http://h/x", "secret": "s"})),
            ),
            ("connection-notification list", M::GET, "/v1/connectionnotifications", none.clone()),
            ("connection-notification get vpce-nfn-1", M::GET, "/v1/connectionnotifications/vpce-nfn-1", none.clone()),
            (
                "connection-notification update vpce-nfn-1 --event Reject --webhook-url https://h/y --secret n",
                M::PATCH,
                "/v1/connectionnotifications/vpce-nfn-1",
                Some(json!({"connectionEvents": ["Reject"], "url": "https://h/y", "secret": "n"})),
            ),
            (
                "connection-notification delete vpce-nfn-1",
                M::DELETE,
                "/v1/connectionnotifications/vpce-nfn-1",
                none.clone(),
            ),
            (
                "connection-notification deliveries vpce-nfn-1",
                M::GET,
                "/v1/connectionnotifications/vpce-nfn-1/deliveries",
                none,
            ),
        ]
    }

    #[test]
    fn every_noun_and_verb_maps_to_its_route() {
        for (args, method, path, body) in cases() {
            check(args, method, path, body);
        }
    }

    /// The documented route a request goes to (`{id}` matches any segment).
    fn route_of(req: &ApiRequest) -> &'static trellis_api::RouteInfo {
        let segments = |p: &str| p.split('/').map(str::to_string).collect::<Vec<_>>();
        let sent = segments(&req.path);
        trellis_api::routes()
            .find(|r| {
                let route = segments(r.path);
                r.method.as_str().eq_ignore_ascii_case(req.method.as_str())
                    && route.len() == sent.len()
                    && route.iter().zip(&sent).all(|(a, b)| a == "{id}" || a == b)
            })
            .unwrap_or_else(|| panic!("{} {} is no documented route", req.method, req.path))
    }

    /// Every body a verb sends fits its route's documented request schema, and
    /// every route that takes a body (but the agents' own) is sent by a verb.
    #[test]
    fn every_body_fits_its_routes_documented_schema() {
        let doc = trellis_api::openapi::document();
        let mut sent = std::collections::BTreeSet::new();
        let extra = [
            "resource-gateway create --name gw --vpc v --subnet s --ip-address-type ipv4 --client-token t",
            "resource-configuration update rcfg-1 --dns-name db.internal --dns-ip-address-type DUALSTACK --port-range 1",
            "subnet create --vpc v --zone z --cidr-block 10.0.0.0/24 --name n --client-token t",
            "account create --name a --organization-id o-1 --client-token t",
            "agent-token create --subnet s",
            "resource-configuration update rcfg-1 --proxy-protocol V2 --max-connections 5",
            "resource-configuration create --name db --type SINGLE --gateway g --ip 10.0.0.1 --port-range 1 \
             --proxy-protocol none --max-bits-per-second 64000",
        ];
        let verbs = cases().into_iter().map(|c| c.0).chain(extra);
        for args in verbs {
            let req = request(args);
            let route = route_of(&req);
            sent.insert(route.path.to_string() + " " + route.method.as_str());
            let op = &doc["paths"][route.path][route.method.as_str()];
            match (&req.body, route.body) {
                (Some(body), Some(_)) => {
                    let schema = &op["requestBody"]["content"]["application/json"]["schema"];
                    trellis_api::check::validate(&doc, schema, body)
                        .unwrap_or_else(|e| panic!("`trellis {args}` sends a body off its schema: {e}\n{body}"));
                }
                (body, None) => assert!(body.is_none() || body == &Some(json!({})), "`trellis {args}`: {body:?}"),
                (None, Some(_)) => panic!("`trellis {args}` sends no body to {}", route.path),
            }
        }
        let by_users =
            |r: &&trellis_api::RouteInfo| matches!(r.caller, trellis_api::Caller::Account | trellis_api::Caller::Admin);
        for route in trellis_api::routes().filter(|r| r.body.is_some()).filter(by_users) {
            assert!(
                sent.contains(&(route.path.to_string() + " " + route.method.as_str())),
                "no verb sends {} {}",
                route.method.as_str(),
                route.path
            );
        }
    }

    #[test]
    fn creates_carry_the_client_token() {
        let req = request("vpc create --name prod --client-token t-1");
        assert_eq!(req.body, Some(json!({"name": "prod", "clientToken": "t-1"})));
        let req = request("vpc-endpoint create --vpc v --subnet s --resource-configuration arn:x --client-token t");
        assert_eq!(req.body.unwrap()["clientToken"], "t");
    }

    #[test]
    fn lists_pass_paging_and_filters_as_query() {
        let req = request("subnet list --vpc vpc-1 --max-results 5 --next-token abc");
        assert_eq!(
            req.query,
            [("maxResults", "5"), ("nextToken", "abc"), ("vpcId", "vpc-1")].map(|(k, v)| (k.into(), v.into()))
        );
    }

    #[test]
    fn arns_in_paths_are_percent_encoded() {
        let req =
            request("resource-configuration get arn:trellis:vpc-lattice:local:acct-1:resourceconfiguration/rcfg-1");
        assert_eq!(
            req.path,
            "/v1/resourceconfigurations/arn%3Atrellis%3Avpc-lattice%3Alocal%3Aacct-1%3Aresourceconfiguration%2Frcfg-1"
        );
    }

    #[test]
    fn invalid_flags_fail_at_parse_time() {
        for bad in [
            "resource-configuration create --name db --type SINGLE --port-range 0",
            "resource-configuration create --name db --type SINGLE --port-range 9-1",
            "resource-configuration create --name db --type TRIPLE",
            "resource-configuration create --name db --type SINGLE --ip 10.0.0.1 --dns-name x",
            "resource-configuration create --name db --type SINGLE --ip not-an-ip",
            "resource-configuration update rcfg-1",
            "agent-token create --subnet s --expires-in 10s",
            "agent-token create --subnet s --expires-in 2d",
            "relay-token create --expires-in 10s",
            "account update acct-1",
            "account update acct-1 --organization-id o --no-organization",
            "resource-share create --name s --principal acct-1",
            "vpc-endpoint create --vpc v --resource-configuration arn:x",
            "vpc-endpoint create --vpc v --subnet s",
            "vpc-endpoint create --vpc v --subnet s --resource-configuration arn:x --service-name n",
            "endpoint-service create --name s --vpc v --subnet s --port 0",
            "endpoint-service create --name s --vpc v --subnet s --port 1:x",
            "endpoint-service modify-permissions vpce-svc-1",
            "endpoint-service accept vpce-svc-1",
            "vpc list --max-results 0",
            "connection-notification create --service-id s --vpc-endpoint-id e --event Connect --webhook-url u --secret s",
            "connection-notification create --webhook-url u --secret s",
            "connection-notification update vpce-nfn-1",
        ] {
            let argv = std::iter::once("trellis").chain(bad.split_whitespace());
            assert!(Cli::try_parse_from(argv).is_err(), "`trellis {bad}` should be rejected");
        }
    }

    #[test]
    fn every_noun_help_lists_its_verbs() {
        use clap::CommandFactory;
        let expected: &[(&str, &[&str])] = &[
            ("account", &["create", "list", "get", "update", "create-api-key"]),
            ("organization", &["create", "list", "get"]),
            ("vpc", &["create", "list", "get", "update", "delete"]),
            ("subnet", &["create", "list", "get", "delete"]),
            ("agent-token", &["create", "list", "get", "delete"]),
            ("agent", &["list", "get", "delete"]),
            ("relay-token", &["create", "list", "get", "delete"]),
            ("relays", &["list", "get", "delete"]),
            ("resource-gateway", &["create", "list", "get", "delete"]),
            ("resource-configuration", &["create", "list", "get", "update", "delete", "usage"]),
            ("resource-share", &["create", "list", "get", "delete"]),
            ("invitation", &["list", "get", "accept", "reject"]),
            ("vpc-endpoint", &["create", "list", "get", "delete"]),
            (
                "endpoint-service",
                &[
                    "create",
                    "list",
                    "available",
                    "get",
                    "update",
                    "delete",
                    "permissions",
                    "modify-permissions",
                    "connections",
                    "accept",
                    "reject",
                    "usage",
                ],
            ),
            ("domain-verification", &["create", "list", "get", "delete"]),
            ("connection-notification", &["create", "list", "get", "update", "delete", "deliveries"]),
        ];
        let cmd = Cli::command();
        for (noun, verbs) in expected {
            let sub = cmd.find_subcommand(noun).unwrap_or_else(|| panic!("no noun {noun}"));
            for verb in *verbs {
                assert!(sub.find_subcommand(verb).is_some(), "{noun} has no verb {verb}");
            }
        }
    }
}
