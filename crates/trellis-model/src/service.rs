//! Endpoint services (`vpce-svc-`): a provider's service (several targets
//! behind one name, load-balanced and health-checked by the provider's
//! agents) that consumers reach with `Interface` endpoints, the second half
//! of PrivateLink. Validation of a service's settings lives here, pure; the
//! API turns its errors into 4xx answers that name the field.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::dns::is_reserved_dns_name;
use crate::ids::*;
use crate::time::Timestamp;
use crate::validate::{validate_domain_name, validate_resource_ip};

/// Most targets one service may have.
pub const MAX_TARGETS: usize = 64;
/// Most port mappings one service may have.
pub const MAX_PORTS: usize = 32;
/// Most principals one service may allow (besides `*`).
pub const MAX_PRINCIPALS: usize = 5_000;

/// Where a service's traffic goes: an IP, or a DNS name resolved by the
/// provider's agents in the provider's network.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum ServiceTarget {
    IpAddress(IpAddr),
    DomainName(String),
}

impl std::fmt::Display for ServiceTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceTarget::IpAddress(ip) => write!(f, "{ip}"),
            ServiceTarget::DomainName(name) => f.write_str(name),
        }
    }
}

/// A port consumers connect to and the target port it maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
}

/// How new connections spread over healthy targets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LoadBalancing {
    #[default]
    LeastConnections,
    RoundRobin,
    SourceHash,
}

/// How targets are checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HealthCheckProtocol {
    /// A TCP connection that opens.
    #[default]
    Tcp,
    /// An HTTP GET of `path` that answers 2xx or 3xx.
    Http,
}

/// Active health checks run by the provider's agents (AWS target-group fields).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    pub protocol: HealthCheckProtocol,
    /// The port to check; absent = each mapping's target port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// For HTTP: the path to GET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub interval_seconds: u32,
    pub timeout_seconds: u32,
    pub healthy_threshold_count: u32,
    pub unhealthy_threshold_count: u32,
}

impl Default for HealthCheck {
    /// AWS's Network Load Balancer defaults: TCP every 30 s, 10 s timeout,
    /// 5 passes to be healthy, 2 failures to be unhealthy.
    fn default() -> Self {
        Self {
            protocol: HealthCheckProtocol::Tcp,
            port: None,
            path: None,
            interval_seconds: 30,
            timeout_seconds: 10,
            healthy_threshold_count: 5,
            unhealthy_threshold_count: 2,
        }
    }
}

/// Whether targets get a PROXY protocol header first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ProxyProtocol {
    #[default]
    None,
    V2,
}

/// What one consumer account may use of a service or resource, per gateway agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ConsumerLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bits_per_second: Option<u64>,
}

/// State of an endpoint service (AWS names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ServiceState {
    Available,
    Deleting,
}

/// A target's health as the provider's agents last reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct TargetHealthView {
    pub target: String,
    pub target_port: u16,
    /// `HEALTHY`, `UNHEALTHY` or `INITIAL` (no check finished yet), as the agents see it.
    pub state: String,
    /// How many of the reporting agents see it so.
    pub agents: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A provider's endpoint service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct VpcEndpointService {
    pub id: VpcEndpointServiceId,
    pub service_id: VpcEndpointServiceId,
    /// `trellis.vpce.<region>.<service id>`: what consumers ask for.
    pub service_name: String,
    pub arn: String,
    pub account_id: AccountId,
    pub name: String,
    pub vpc_id: VpcId,
    /// Subnets whose agents run the service (accept, balance, check health).
    pub subnet_ids: Vec<SubnetId>,
    pub targets: Vec<ServiceTarget>,
    pub ports: Vec<ServicePort>,
    pub acceptance_required: bool,
    pub load_balancing: LoadBalancing,
    pub health_check: HealthCheck,
    pub proxy_protocol: ProxyProtocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_consumer_limits: Option<ConsumerLimits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_dns_name: Option<String>,
    /// Account ids, or `*` for any account, that may see and connect to the service.
    #[serde(default)]
    pub allowed_principals: Vec<String>,
    pub state: ServiceState,
    /// Filled in when the API answers, from the provider agents' reports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_health: Vec<TargetHealthView>,
    pub created_at: Timestamp,
}

/// The service name of `id` in `region`.
pub fn service_name(region: &str, id: &VpcEndpointServiceId) -> String {
    format!("trellis.vpce.{region}.{id}")
}

/// The service id a service name (or a bare id) names, if it is one of this region.
pub fn parse_service_name(region: &str, name: &str) -> Option<VpcEndpointServiceId> {
    let id = name.strip_prefix(&format!("trellis.vpce.{region}.")).unwrap_or(name);
    VpcEndpointServiceId::parse(id).ok()
}

impl VpcEndpointService {
    pub fn arn_for(region: &str, account_id: &AccountId, id: &VpcEndpointServiceId) -> String {
        crate::arn::Arn::new(crate::arn::kinds::VPC_ENDPOINT_SERVICE, region, account_id.as_str(), id.as_str())
            .to_string()
    }

    /// Whether `account` may see the service and connect to it.
    pub fn allows(&self, account: &AccountId) -> bool {
        &self.account_id == account || self.allowed_principals.iter().any(|p| p == "*" || p == account.as_str())
    }
}

/// A setting of a service that breaks its rule: names the field and what to write.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ServiceSettingError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> ServiceSettingError {
    ServiceSettingError { field, message: message.into() }
}

/// Checks targets: 1 to [`MAX_TARGETS`], each an IP address a gateway can
/// dial or a DNS name, no duplicates.
pub fn validate_targets(targets: &[ServiceTarget]) -> Result<Vec<ServiceTarget>, ServiceSettingError> {
    if targets.is_empty() || targets.len() > MAX_TARGETS {
        return Err(bad(
            "targets",
            format!("give 1 to {MAX_TARGETS} targets, each {{\"ipAddress\": ...}} or {{\"domainName\": ...}}"),
        ));
    }
    let mut out: Vec<ServiceTarget> = Vec::with_capacity(targets.len());
    for t in targets {
        let checked = match t {
            ServiceTarget::IpAddress(ip) => ServiceTarget::IpAddress(
                validate_resource_ip(&ip.to_string()).map_err(|e| bad("targets", e.to_string()))?,
            ),
            ServiceTarget::DomainName(name) => {
                ServiceTarget::DomainName(validate_domain_name(name).map_err(|e| bad("targets", e.to_string()))?)
            }
        };
        if out.contains(&checked) {
            return Err(bad("targets", format!("{checked} is listed twice")));
        }
        out.push(checked);
    }
    Ok(out)
}

/// Checks ports: 1 to [`MAX_PORTS`] mappings of ports 1–65535, each consumer-facing port once.
pub fn validate_ports(ports: &[(u32, Option<u32>)]) -> Result<Vec<ServicePort>, ServiceSettingError> {
    if ports.is_empty() || ports.len() > MAX_PORTS {
        return Err(bad("ports", format!("give 1 to {MAX_PORTS} ports, for example [{{\"port\": 443}}]")));
    }
    let port = |p: u32, field| {
        u16::try_from(p).ok().filter(|&p| p > 0).ok_or_else(|| bad(field, format!("{p} is not a port from 1 to 65535")))
    };
    let mut out: Vec<ServicePort> = Vec::with_capacity(ports.len());
    for &(p, target) in ports {
        let p = port(p, "ports")?;
        let target_port = port(target.unwrap_or(u32::from(p)), "ports")?;
        if out.iter().any(|o| o.port == p) {
            return Err(bad("ports", format!("port {p} is listed twice")));
        }
        out.push(ServicePort { port: p, target_port });
    }
    Ok(out)
}

/// Checks a health check against AWS's ranges: interval 5–300 s, timeout
/// 2–120 s and shorter than the interval, thresholds 2–10, an HTTP path
/// starting with `/`.
pub fn validate_health_check(check: &HealthCheck) -> Result<HealthCheck, ServiceSettingError> {
    let range = |field: &'static str, v: u32, lo: u32, hi: u32| {
        if (lo..=hi).contains(&v) { Ok(()) } else { Err(bad(field, format!("{v} is out of range; use {lo} to {hi}"))) }
    };
    range("healthCheck.intervalSeconds", check.interval_seconds, 5, 300)?;
    range("healthCheck.timeoutSeconds", check.timeout_seconds, 2, 120)?;
    if check.timeout_seconds >= check.interval_seconds {
        return Err(bad("healthCheck.timeoutSeconds", "must be shorter than intervalSeconds"));
    }
    range("healthCheck.healthyThresholdCount", check.healthy_threshold_count, 2, 10)?;
    range("healthCheck.unhealthyThresholdCount", check.unhealthy_threshold_count, 2, 10)?;
    if check.port == Some(0) {
        return Err(bad("healthCheck.port", "0 is not a port; use 1 to 65535, or leave it out for the target port"));
    }
    let path = match (check.protocol, &check.path) {
        (HealthCheckProtocol::Http, None) => Some("/".to_string()),
        (HealthCheckProtocol::Http, Some(p)) => {
            let ok = p.starts_with('/') && p.len() <= 1024 && p.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err(bad("healthCheck.path", "must start with / and hold at most 1024 printable characters"));
            }
            Some(p.clone())
        }
        (HealthCheckProtocol::Tcp, Some(_)) => {
            return Err(bad("healthCheck.path", "only HTTP checks take a path"));
        }
        (HealthCheckProtocol::Tcp, None) => None,
    };
    Ok(HealthCheck { path, ..check.clone() })
}

/// Checks per-consumer limits: at least one connection, at least 64 kbit/s.
pub fn validate_limits(limits: &ConsumerLimits) -> Result<Option<ConsumerLimits>, ServiceSettingError> {
    if limits.max_connections == Some(0) {
        return Err(bad("perConsumerLimits.maxConnections", "must be at least 1 (leave it out for no limit)"));
    }
    if limits.max_bits_per_second.is_some_and(|b| b < 64_000) {
        return Err(bad("perConsumerLimits.maxBitsPerSecond", "must be at least 64000 (leave it out for no limit)"));
    }
    Ok((limits.max_connections.is_some() || limits.max_bits_per_second.is_some()).then_some(*limits))
}

/// Checks a private DNS name: a domain name outside the reserved zone.
pub fn validate_private_dns_name(name: &str) -> Result<String, ServiceSettingError> {
    let name = validate_domain_name(name).map_err(|e| bad("privateDnsName", e.to_string()))?;
    if is_reserved_dns_name(&name) {
        return Err(bad("privateDnsName", "names under trellis.internal are Trellis's own; use a domain you own"));
    }
    Ok(name)
}

/// Checks principals: `*` or account ids.
pub fn validate_principals(principals: &[String]) -> Result<Vec<String>, ServiceSettingError> {
    if principals.len() > MAX_PRINCIPALS {
        return Err(bad("principals", format!("at most {MAX_PRINCIPALS} principals at once")));
    }
    principals
        .iter()
        .map(|p| match p.as_str() {
            "*" => Ok("*".to_string()),
            other => AccountId::parse(other).map(|a| a.to_string()).map_err(|_| {
                bad(
                    "principals",
                    format!("{:?} is not an account id (acct- and 12 digits) or *", crate::clip_echo(other)),
                )
            }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_ports_and_checks_follow_their_rules() {
        assert!(validate_targets(&[]).is_err());
        let two =
            [ServiceTarget::IpAddress("10.0.1.5".parse().unwrap()), ServiceTarget::DomainName("API-2.Internal".into())];
        assert_eq!(validate_targets(&two).unwrap()[1], ServiceTarget::DomainName("api-2.internal".into()));
        assert!(validate_targets(&[two[0].clone(), two[0].clone()]).unwrap_err().message.contains("twice"));
        assert!(validate_targets(&[ServiceTarget::IpAddress("0.0.0.0".parse().unwrap())]).is_err());

        assert_eq!(
            validate_ports(&[(443, Some(8443)), (80, None)]).unwrap()[1],
            ServicePort { port: 80, target_port: 80 }
        );
        assert!(validate_ports(&[(443, None), (443, Some(1))]).is_err());
        assert_eq!(validate_ports(&[(70000, None)]).unwrap_err().field, "ports");

        let http = HealthCheck { protocol: HealthCheckProtocol::Http, ..HealthCheck::default() };
        assert_eq!(validate_health_check(&http).unwrap().path.as_deref(), Some("/"));
        let fast = HealthCheck { interval_seconds: 5, timeout_seconds: 5, ..HealthCheck::default() };
        assert_eq!(validate_health_check(&fast).unwrap_err().field, "healthCheck.timeoutSeconds");
        let odd = HealthCheck { healthy_threshold_count: 11, ..HealthCheck::default() };
        assert_eq!(validate_health_check(&odd).unwrap_err().field, "healthCheck.healthyThresholdCount");
        let tcp_path = HealthCheck { path: Some("/x".into()), ..HealthCheck::default() };
        assert!(validate_health_check(&tcp_path).is_err());
    }

    #[test]
    fn principals_limits_and_names() {
        assert_eq!(validate_principals(&["*".into(), "acct-123456789012".into()]).unwrap().len(), 2);
        assert!(validate_principals(&["everyone".into()]).unwrap_err().message.contains("not an account id"));
        assert_eq!(validate_limits(&ConsumerLimits::default()).unwrap(), None);
        assert!(validate_limits(&ConsumerLimits { max_connections: Some(0), ..Default::default() }).is_err());
        assert!(validate_private_dns_name("api.trellis.internal").is_err());
        assert_eq!(validate_private_dns_name("API.orders.example").unwrap(), "api.orders.example");
    }

    #[test]
    fn service_names_round_trip() {
        let id = VpcEndpointServiceId::generate(&[3; 16]);
        let name = service_name("eu-1", &id);
        assert_eq!(name, format!("trellis.vpce.eu-1.{id}"));
        assert_eq!(parse_service_name("eu-1", &name), Some(id.clone()));
        assert_eq!(parse_service_name("eu-1", id.as_str()), Some(id));
        assert_eq!(parse_service_name("us-1", &name), None);
    }

    #[test]
    fn targets_serialize_as_the_api_writes_them() {
        let t: Vec<ServiceTarget> =
            serde_json::from_str(r#"[{"ipAddress": "10.0.1.5"}, {"domainName": "api-2.internal"}]"#).unwrap();
        assert_eq!(t[0], ServiceTarget::IpAddress("10.0.1.5".parse().unwrap()));
        assert_eq!(serde_json::to_value(&t[1]).unwrap(), serde_json::json!({"domainName": "api-2.internal"}));
    }
}
