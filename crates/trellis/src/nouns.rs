//! The API verbs, `trellis <noun> <verb>`: their flags and the HTTP request each
//! one makes. Flags are kebab-case versions of the API's camelCase fields.
//!
//! Pure: turning a parsed verb into an [`ApiRequest`] does no I/O, so every
//! route is tested without a server.

use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use serde_json::{Map, Value};
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
        #[arg(long, value_name = "TYPE")]
        ip_address_type: Option<String>,
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
    #[arg(long, value_name = "TYPE", requires = "dns_name")]
    pub dns_ip_address_type: Option<String>,
}

impl DefinitionArgs {
    fn to_json(&self) -> Option<Value> {
        if let Some(ip) = self.ip {
            return Some(serde_json::json!({"ipResource": {"ipAddress": ip.to_string()}}));
        }
        let name = self.dns_name.as_ref()?;
        let mut dns = Map::new();
        dns.insert("domainName".into(), name.clone().into());
        put_opt(&mut dns, "ipAddressType", self.dns_ip_address_type.clone());
        Some(serde_json::json!({ "dnsResource": dns }))
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
        create: CreateArgs,
    },
    /// List resource configurations (yours and those shared with you)
    List(ListArgs),
    /// Show one resource configuration
    Get(IdArg),
    /// Change a configuration's ports or definition
    #[command(group(ArgGroup::new("change").required(true).multiple(true).args(["port_ranges", "ip", "dns_name"])))]
    Update {
        #[command(flatten)]
        target: IdArg,
        /// New port ranges, replacing the old ones (repeatable)
        #[arg(long = "port-range", value_name = "RANGE")]
        port_ranges: Vec<PortRange>,
        #[command(flatten)]
        definition: DefinitionArgs,
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
    /// Create a Resource endpoint for a configuration shared with you
    Create {
        /// VPC of the endpoint
        #[arg(long = "vpc", visible_alias = "vpc-id", value_name = "VPC_ID")]
        vpc_id: String,
        /// Subnet to get an address in (repeatable)
        #[arg(long = "subnet", visible_alias = "subnet-id", value_name = "SUBNET_ID", required = true)]
        subnet_ids: Vec<String>,
        /// Resource configuration, by ARN or id
        #[arg(long = "resource-configuration", visible_alias = "resource-configuration-arn", value_name = "ARN|ID")]
        resource_configuration: String,
        /// Also serve the configuration's custom domain name
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

fn put_opt(map: &mut Map<String, Value>, key: &str, value: Option<impl Into<Value>>) {
    if let Some(v) = value {
        map.insert(key.to_string(), v.into());
    }
}

/// A create body: the given fields plus `clientToken` when set.
fn create_body(fields: Value, create: &CreateArgs) -> Value {
    let mut map = match fields {
        Value::Object(map) => map,
        _ => unreachable!("create bodies are built from json! objects"),
    };
    map.retain(|_, v| !v.is_null());
    put_opt(&mut map, "clientToken", create.client_token.clone());
    Value::Object(map)
}

fn port_ranges_json(ranges: &[PortRange]) -> Value {
    ranges.iter().map(|r| Value::String(r.to_string())).collect()
}

fn list(path: &str, args: &ListArgs) -> ApiRequest {
    ApiRequest::get(path)
        .query_opt("maxResults", args.max_results.map(|n| n.to_string()))
        .query_opt("nextToken", args.next_token.clone())
}

fn item(collection: &str, id: &str) -> String {
    format!("{collection}/{}", encode_segment(id))
}

/// Percent-encodes one path segment (ids are plain; ARNs carry `:` and `/`).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl AccountVerb {
    pub fn request(&self) -> ApiRequest {
        const C: &str = "/v1/accounts";
        match self {
            Self::Create { name, organization_id, create } => ApiRequest::post(
                C,
                create_body(serde_json::json!({"name": name, "organizationId": organization_id}), create),
            ),
            Self::List(l) => list(C, l),
            Self::Get(t) => ApiRequest::get(&item(C, &t.id)),
            Self::Update { target, organization_id, no_organization: _ } => {
                // `--no-organization` sends an explicit null: leave the organization.
                ApiRequest::patch(&item(C, &target.id), serde_json::json!({"organizationId": organization_id}))
            }
            Self::CreateApiKey(t) => ApiRequest::post(&format!("{}/apikeys", item(C, &t.id)), serde_json::json!({})),
        }
    }
}

impl OrganizationVerb {
    pub fn request(&self) -> ApiRequest {
        const C: &str = "/v1/organizations";
        match self {
            Self::Create { name, create } => {
                ApiRequest::post(C, create_body(serde_json::json!({"name": name}), create))
            }
            Self::List(l) => list(C, l),
            Self::Get(t) => ApiRequest::get(&item(C, &t.id)),
        }
    }
}

impl VpcVerb {
    pub fn request(&self) -> ApiRequest {
        const C: &str = "/v1/vpcs";
        match self {
            Self::Create { name, create } => {
                ApiRequest::post(C, create_body(serde_json::json!({"name": name}), create))
            }
            Self::List(l) => list(C, l),
            Self::Get(t) => ApiRequest::get(&item(C, &t.id)),
            Self::Update { target, name } => ApiRequest::patch(&item(C, &target.id), serde_json::json!({"name": name})),
            Self::Delete(t) => ApiRequest::delete(&item(C, &t.id)),
        }
    }
}

impl SubnetVerb {
    pub fn request(&self) -> ApiRequest {
        const C: &str = "/v1/subnets";
        match self {
            Self::Create { vpc_id, zone, cidr_block, name, create } => ApiRequest::post(
                C,
                create_body(
                    serde_json::json!({"vpcId": vpc_id, "zone": zone, "cidrBlock": cidr_block, "name": name}),
                    create,
                ),
            ),
            Self::List { vpc_id, list: l } => list(C, l).query_opt("vpcId", vpc_id.clone()),
            Self::Get(t) => ApiRequest::get(&item(C, &t.id)),
            Self::Delete(t) => ApiRequest::delete(&item(C, &t.id)),
        }
    }
}

impl AgentTokenVerb {
    pub fn request(&self) -> ApiRequest {
        const C: &str = "/v1/agent-tokens";
        match self {
            Self::Create { subnet_id, expires_in, create } => ApiRequest::post(
                C,
                create_body(serde_json::json!({"subnetId": subnet_id, "expiresInSeconds": expires_in}), create),
            ),
            Self::List(l) => list(C, l),
            Self::Get(t) => ApiRequest::get(&item(C, &t.id)),
            Self::Delete(t) => ApiRequest::delete(&item(C, &t.id)),
        }
    }
}

impl AgentVerb {
    pub fn request(&self) -> ApiRequest {
        const C: &str = "/v1/agents";
        match self {
            Self::List(l) => list(C, l),
            Self::Get(t) => ApiRequest::get(&item(C, &t.id)),
            Self::Delete(t) => ApiRequest::delete(&item(C, &t.id)),
        }
    }
}

impl ResourceGatewayVerb {
    pub fn request(&self) -> ApiRequest {
        const C: &str = "/v1/resourcegateways";
        match self {
            Self::Create { name, vpc_identifier, subnet_ids, ip_address_type, create } => ApiRequest::post(
                C,
                create_body(
                    serde_json::json!({
                        "name": name,
                        "vpcIdentifier": vpc_identifier,
                        "subnetIds": subnet_ids,
                        "ipAddressType": ip_address_type,
                    }),
                    create,
                ),
            ),
            Self::List(l) => list(C, l),
            Self::Get(t) => ApiRequest::get(&item(C, &t.id)),
            Self::Delete(t) => ApiRequest::delete(&item(C, &t.id)),
        }
    }
}

impl ResourceConfigurationVerb {
    pub fn request(&self) -> ApiRequest {
        const C: &str = "/v1/resourceconfigurations";
        match self {
            Self::Create {
                name,
                config_type,
                resource_gateway_identifier,
                resource_configuration_group_identifier,
                definition,
                port_ranges,
                protocol,
                custom_domain_name,
                create,
            } => {
                let ports = (!port_ranges.is_empty()).then(|| port_ranges_json(port_ranges));
                ApiRequest::post(
                    C,
                    create_body(
                        serde_json::json!({
                            "name": name,
                            "type": config_type.as_api(),
                            "resourceGatewayIdentifier": resource_gateway_identifier,
                            "resourceConfigurationGroupIdentifier": resource_configuration_group_identifier,
                            "resourceConfigurationDefinition": definition.to_json(),
                            "portRanges": ports,
                            "protocol": protocol,
                            "customDomainName": custom_domain_name,
                        }),
                        create,
                    ),
                )
            }
            Self::List(l) => list(C, l),
            Self::Get(t) => ApiRequest::get(&item(C, &t.id)),
            Self::Update { target, port_ranges, definition } => {
                let mut body = Map::new();
                if !port_ranges.is_empty() {
                    body.insert("portRanges".into(), port_ranges_json(port_ranges));
                }
                put_opt(&mut body, "resourceConfigurationDefinition", definition.to_json());
                ApiRequest::patch(&item(C, &target.id), Value::Object(body))
            }
            Self::Delete(t) => ApiRequest::delete(&item(C, &t.id)),
            Self::Usage(t) => ApiRequest::get(&format!("{}/usage", item(C, &t.id))),
        }
    }
}

impl ResourceShareVerb {
    pub fn request(&self) -> ApiRequest {
        const C: &str = "/v1/resourceshares";
        match self {
            Self::Create { name, resource_arns, principals, create } => ApiRequest::post(
                C,
                create_body(
                    serde_json::json!({"name": name, "resourceArns": resource_arns, "principals": principals}),
                    create,
                ),
            ),
            Self::List(l) => list(C, l),
            Self::Get(t) => ApiRequest::get(&item(C, &t.id)),
            Self::Delete(t) => ApiRequest::delete(&item(C, &t.id)),
        }
    }
}

impl InvitationVerb {
    pub fn request(&self) -> ApiRequest {
        const C: &str = "/v1/resourceshareinvitations";
        match self {
            Self::List(l) => list(C, l),
            Self::Get(t) => ApiRequest::get(&item(C, &t.id)),
            Self::Accept(t) => ApiRequest::post(&format!("{}/accept", item(C, &t.id)), serde_json::json!({})),
            Self::Reject(t) => ApiRequest::post(&format!("{}/reject", item(C, &t.id)), serde_json::json!({})),
        }
    }
}

impl VpcEndpointVerb {
    pub fn request(&self) -> ApiRequest {
        const C: &str = "/v1/vpcendpoints";
        match self {
            Self::Create { vpc_id, subnet_ids, resource_configuration, private_dns_enabled, create } => {
                ApiRequest::post(
                    C,
                    create_body(
                        serde_json::json!({
                            "vpcEndpointType": "Resource",
                            "vpcId": vpc_id,
                            "subnetIds": subnet_ids,
                            "resourceConfigurationArn": resource_configuration,
                            "privateDnsEnabled": private_dns_enabled,
                        }),
                        create,
                    ),
                )
            }
            Self::List(l) => list(C, l),
            Self::Get(t) => ApiRequest::get(&item(C, &t.id)),
            Self::Delete(t) => ApiRequest::delete(&item(C, &t.id)),
        }
    }
}

impl DomainVerificationVerb {
    pub fn request(&self) -> ApiRequest {
        const C: &str = "/v1/domainverifications";
        match self {
            Self::Create { domain_name, create } => {
                ApiRequest::post(C, create_body(serde_json::json!({"domainName": domain_name}), create))
            }
            Self::List(l) => list(C, l),
            Self::Get(t) => ApiRequest::get(&item(C, &t.id)),
            Self::Delete(t) => ApiRequest::delete(&item(C, &t.id)),
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
            Command::ResourceGateway(v) => v.request(),
            Command::ResourceConfiguration(v) => v.request(),
            Command::ResourceShare(v) => v.request(),
            Command::Invitation(v) => v.request(),
            Command::VpcEndpoint(v) => v.request(),
            Command::DomainVerification(v) => v.request(),
            other => panic!("`trellis {args}` is not an API verb: {other:?}"),
        }
    }

    fn check(args: &str, method: Method, path: &str, body: Option<serde_json::Value>) {
        let req = request(args);
        assert_eq!((&req.method, req.path.as_str()), (&method, path), "trellis {args}");
        assert_eq!(req.body, body, "trellis {args}");
    }

    #[test]
    fn every_noun_and_verb_maps_to_its_route() {
        use Method as M;
        let none = None;
        let empty = Some(json!({}));
        let cases: Vec<(&str, Method, &str, Option<serde_json::Value>)> = vec![
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
            ("vpc-endpoint list", M::GET, "/v1/vpcendpoints", none.clone()),
            ("vpc-endpoint get vpce-1", M::GET, "/v1/vpcendpoints/vpce-1", none.clone()),
            ("vpc-endpoint delete vpce-1", M::DELETE, "/v1/vpcendpoints/vpce-1", none.clone()),
            (
                "domain-verification create --domain-name example.com --client-token t-2",
                M::POST,
                "/v1/domainverifications",
                Some(json!({"domainName": "example.com", "clientToken": "t-2"})),
            ),
            ("domain-verification list", M::GET, "/v1/domainverifications", none.clone()),
            ("domain-verification get dv-1", M::GET, "/v1/domainverifications/dv-1", none.clone()),
            ("domain-verification delete dv-1", M::DELETE, "/v1/domainverifications/dv-1", none),
        ];
        for (args, method, path, body) in cases {
            check(args, method, path, body);
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
            "account update acct-1",
            "account update acct-1 --organization-id o --no-organization",
            "resource-share create --name s --principal acct-1",
            "vpc-endpoint create --vpc v --resource-configuration arn:x",
            "vpc list --max-results 0",
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
            ("resource-gateway", &["create", "list", "get", "delete"]),
            ("resource-configuration", &["create", "list", "get", "update", "delete", "usage"]),
            ("resource-share", &["create", "list", "get", "delete"]),
            ("invitation", &["list", "get", "accept", "reject"]),
            ("vpc-endpoint", &["create", "list", "get", "delete"]),
            ("domain-verification", &["create", "list", "get", "delete"]),
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
