//! The gateway's authorization check, pure: given the current config, the
//! peer's identity (from its certificate) and an open request, allow (and say
//! what to dial) or deny (and say why). [`admit_peer`] runs at the TLS
//! handshake and whenever the config changes for every connection;
//! [`authorize`] runs for every new stream and [`recheck`] again for every open
//! stream whenever the config changes, so revocation closes live connections
//! and the access log says what was revoked.

use trellis_proto::stream::OpenRequest;
use trellis_proto::{AgentConfig, ConsumerLimits, ConsumerVpc, GatewayRole, Target};

use crate::tls::PeerIdentity;

/// Where an allowed stream goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// A resource: its target, on the port asked for.
    Resource { target: Target, port: u16 },
    /// An endpoint service: a healthy target picked by its balancer, on the
    /// target port the asked port maps to.
    Service { service_id: String, port: u16 },
}

/// What an allowed stream may do, and whom to account it to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub destination: Destination,
    pub consumer_account_id: String,
    pub consumer_vpc_id: String,
    pub owner_account_id: String,
    /// The endpoint agent that opened the stream.
    pub peer_agent_id: String,
    /// Send a PROXY protocol v2 header to the target first.
    pub proxy_protocol: bool,
    /// The owner's limits on one consumer account.
    pub limits: Option<ConsumerLimits>,
}

/// Why a stream is refused. The message is sent to the (authenticated) endpoint agent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// The peer's VPC has no endpoint allowed on this gateway (any more).
    #[error("no endpoint of VPC {vpc_id} (account {account_id}) may use this gateway")]
    UnknownPeer { account_id: String, vpc_id: String },
    /// The peer's certificate belongs to a deleted agent.
    #[error("the certificate of agent {0} was revoked (the agent was deleted)")]
    RevokedPeer(String),
    /// The resource or service is not served by this gateway (any more).
    #[error("resource {0} is not served by this gateway")]
    UnknownResource(String),
    /// The endpoint is not (or no longer) allowed to reach the resource.
    #[error("endpoint {endpoint} is not allowed to reach {resource}")]
    EndpointNotAllowed { endpoint: String, resource: String },
    /// The endpoint was revoked; the reason is the control plane's.
    #[error("endpoint {endpoint} was revoked: {reason}")]
    EndpointRevoked { endpoint: String, reason: String },
    /// An open stream's endpoint left the config entirely (and is not among the revoked ones).
    #[error("endpoint {0} was deleted or its resource is no longer served")]
    EndpointGone(String),
    /// The port is outside the resource's port ranges.
    #[error("port {port} is not open on {resource}")]
    PortNotAllowed { port: u16, resource: String },
}

/// Whether `peer` may hold tunnel connections to this gateway at all: its
/// certificate is not revoked and names a consumer VPC of `role`.
pub fn admit_peer(role: &GatewayRole, peer: &PeerIdentity) -> Result<(), Denial> {
    if role.is_revoked(&peer.cert_sha256) {
        return Err(Denial::RevokedPeer(peer.agent_id.clone()));
    }
    if !role.knows_consumer(&peer.account_id, &peer.vpc_id) {
        return Err(Denial::UnknownPeer { account_id: peer.account_id.clone(), vpc_id: peer.vpc_id.clone() });
    }
    Ok(())
}

/// Checks `req` from `peer` against the gateway role of `config`: a resource
/// or an endpoint service (whose id the open request carries in place of a
/// resource id) this gateway serves, an endpoint allowed on it from the
/// peer's VPC, and a port it opens.
pub fn authorize(config: &AgentConfig, peer: &PeerIdentity, req: &OpenRequest) -> Result<Grant, Denial> {
    let role = &config.gateway;
    admit_peer(role, peer)?;
    let id = &req.resource_configuration_id;
    let not_allowed = || match role.revoked_endpoints.iter().find(|r| r.vpc_endpoint_id == req.vpc_endpoint_id) {
        Some(revoked) => {
            Denial::EndpointRevoked { endpoint: req.vpc_endpoint_id.clone(), reason: revoked.reason.clone() }
        }
        None => Denial::EndpointNotAllowed { endpoint: req.vpc_endpoint_id.clone(), resource: id.clone() },
    };
    let peers_vpc = |c: &&ConsumerVpc| c.vpc_id == peer.vpc_id && c.account_id == peer.account_id;
    let grant = |destination, consumer: &ConsumerVpc, owner: &str, proxy_protocol, limits| Grant {
        destination,
        consumer_account_id: consumer.account_id.clone(),
        consumer_vpc_id: consumer.vpc_id.clone(),
        owner_account_id: owner.to_string(),
        peer_agent_id: peer.agent_id.clone(),
        proxy_protocol,
        limits,
    };
    if let Some(resource) = role.resources.iter().find(|r| &r.resource_configuration_id == id) {
        let consumer = resource
            .allowed_endpoint(&req.vpc_endpoint_id)
            .and_then(|a| role.consumer(a))
            .filter(peers_vpc)
            .ok_or_else(not_allowed)?;
        if !resource.port_ranges.iter().any(|r| r.contains(req.port)) {
            return Err(Denial::PortNotAllowed { port: req.port, resource: id.clone() });
        }
        let destination = Destination::Resource { target: resource.target.clone(), port: req.port };
        return Ok(grant(destination, consumer, &resource.owner_account_id, resource.proxy_protocol, resource.limits));
    }
    let service =
        role.services.iter().find(|s| &s.service_id == id).ok_or_else(|| Denial::UnknownResource(id.clone()))?;
    let consumer = service
        .allowed_endpoint(&req.vpc_endpoint_id)
        .and_then(|a| role.consumer(a))
        .filter(peers_vpc)
        .ok_or_else(not_allowed)?;
    if service.target_port(req.port).is_none() {
        return Err(Denial::PortNotAllowed { port: req.port, resource: id.clone() });
    }
    let destination = Destination::Service { service_id: id.clone(), port: req.port };
    Ok(grant(destination, consumer, &service.owner_account_id, service.proxy_protocol, service.limits))
}

/// [`authorize`] for a stream that was allowed until now: a denial that only
/// says the peer, resource or endpoint is unknown is replaced by what happened
/// to the endpoint, as far as the config tells (the control plane's reason
/// when it lists the endpoint as revoked; deleted or no longer served when it
/// vanished from every resource).
pub fn recheck(config: &AgentConfig, peer: &PeerIdentity, req: &OpenRequest) -> Result<Grant, Denial> {
    authorize(config, peer, req).map_err(|denial| explain(&config.gateway, req, denial))
}

fn explain(role: &GatewayRole, req: &OpenRequest, denial: Denial) -> Denial {
    match denial {
        Denial::UnknownPeer { .. } | Denial::UnknownResource(_) | Denial::EndpointNotAllowed { .. } => {
            let endpoint = &req.vpc_endpoint_id;
            if let Some(revoked) = role.revoked_endpoints.iter().find(|r| &r.vpc_endpoint_id == endpoint) {
                Denial::EndpointRevoked { endpoint: endpoint.clone(), reason: revoked.reason.clone() }
            } else if role.resources.iter().all(|r| r.allowed_endpoint(endpoint).is_none())
                && role.services.iter().all(|s| s.allowed_endpoint(endpoint).is_none())
            {
                Denial::EndpointGone(endpoint.clone())
            } else {
                denial
            }
        }
        Denial::RevokedPeer(_)
        | Denial::EndpointRevoked { .. }
        | Denial::EndpointGone(_)
        | Denial::PortNotAllowed { .. } => denial,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::{AllowedEndpoint, ConsumerVpc, GatewayResource, GatewayRole, PortRange, RevokedEndpoint};

    fn config() -> AgentConfig {
        AgentConfig {
            version: 1,
            gateway: GatewayRole {
                consumers: vec![
                    ConsumerVpc { account_id: "acct-b".into(), vpc_id: "vpc-b".into() },
                    ConsumerVpc { account_id: "acct-c".into(), vpc_id: "vpc-c".into() },
                ],
                resources: vec![GatewayResource {
                    resource_configuration_id: "rcfg-1".into(),
                    resource_gateway_id: "rgw-1".into(),
                    owner_account_id: "acct-o".into(),
                    target: Target::Ip { address: "10.0.0.5".parse().unwrap() },
                    port_ranges: vec!["5432".parse().unwrap(), PortRange::new(8000, 8100).unwrap()],
                    allowed: vec![
                        AllowedEndpoint { vpc_endpoint_id: "vpce-1".into(), consumer: 1 },
                        AllowedEndpoint { vpc_endpoint_id: "vpce-b".into(), consumer: 0 },
                    ],
                    proxy_protocol: false,
                    limits: None,
                }],
                services: vec![],
                revoked_certs: Default::default(),
                revoked_endpoints: vec![],
            },
            ..Default::default()
        }
    }

    fn peer(account: &str, vpc: &str) -> PeerIdentity {
        PeerIdentity {
            agent_id: "agent-c".into(),
            account_id: account.into(),
            vpc_id: vpc.into(),
            cert_sha256: "ab".repeat(32),
        }
    }

    fn req(endpoint: &str, resource: &str, port: u16) -> OpenRequest {
        OpenRequest {
            vpc_endpoint_id: endpoint.into(),
            resource_configuration_id: resource.into(),
            port,
            client_addr: "192.0.2.1:1000".parse().unwrap(),
        }
    }

    #[test]
    fn allowed_endpoint_gets_the_target() {
        let grant = authorize(&config(), &peer("acct-c", "vpc-c"), &req("vpce-1", "rcfg-1", 8050)).unwrap();
        assert_eq!(grant.consumer_account_id, "acct-c");
        assert_eq!(grant.peer_agent_id, "agent-c");
    }

    #[test]
    fn an_agent_of_an_unknown_vpc_is_denied() {
        assert!(matches!(
            authorize(&config(), &peer("acct-x", "vpc-x"), &req("vpce-1", "rcfg-1", 5432)),
            Err(Denial::UnknownPeer { .. })
        ));
        // A known VPC id under another account is not that VPC.
        assert!(matches!(
            authorize(&config(), &peer("acct-x", "vpc-c"), &req("vpce-1", "rcfg-1", 5432)),
            Err(Denial::UnknownPeer { .. })
        ));
    }

    #[test]
    fn a_revoked_certificate_is_denied() {
        let mut c = config();
        c.gateway.revoked_certs = serde_json::from_value(serde_json::json!({"revokedCerts": ["AB".repeat(32)]}))
            .map(|g: trellis_proto::GatewayRole| g.revoked_certs)
            .unwrap();
        assert!(matches!(
            authorize(&c, &peer("acct-c", "vpc-c"), &req("vpce-1", "rcfg-1", 5432)),
            Err(Denial::RevokedPeer(_))
        ));
    }

    #[test]
    fn other_endpoint_resource_or_port_is_denied() {
        let p = peer("acct-c", "vpc-c");
        assert!(matches!(
            authorize(&config(), &p, &req("vpce-2", "rcfg-1", 5432)),
            Err(Denial::EndpointNotAllowed { .. })
        ));
        assert!(matches!(authorize(&config(), &p, &req("vpce-1", "rcfg-2", 5432)), Err(Denial::UnknownResource(_))));
        assert!(matches!(
            authorize(&config(), &p, &req("vpce-1", "rcfg-1", 5433)),
            Err(Denial::PortNotAllowed { port: 5433, .. })
        ));
    }

    #[test]
    fn an_endpoint_of_another_vpc_is_denied() {
        // The peer is a real agent of a known consumer, but the endpoint belongs to another VPC.
        assert!(matches!(
            authorize(&config(), &peer("acct-b", "vpc-b"), &req("vpce-1", "rcfg-1", 5432)),
            Err(Denial::EndpointNotAllowed { .. })
        ));
    }

    #[test]
    fn revoked_share_refuses_the_stream_with_the_control_planes_reason() {
        let mut c = config();
        c.gateway.resources[0].allowed.retain(|a| a.vpc_endpoint_id != "vpce-1");
        c.gateway.revoked_endpoints =
            vec![RevokedEndpoint { vpc_endpoint_id: "vpce-1".into(), reason: "the resource share was deleted".into() }];
        let denial = authorize(&c, &peer("acct-c", "vpc-c"), &req("vpce-1", "rcfg-1", 5432)).unwrap_err();
        assert_eq!(denial.to_string(), "endpoint vpce-1 was revoked: the resource share was deleted");
    }

    #[test]
    fn a_revoked_open_stream_says_what_was_revoked() {
        let p = peer("acct-c", "vpc-c");
        let r = req("vpce-1", "rcfg-1", 5432);
        // The share was deleted: the endpoint left `allowed` and its VPC left `consumers`.
        let mut c = config();
        c.gateway.resources[0].allowed.retain(|a| a.vpc_endpoint_id != "vpce-1");
        c.gateway.consumers.truncate(1);
        c.gateway.revoked_endpoints =
            vec![RevokedEndpoint { vpc_endpoint_id: "vpce-1".into(), reason: "the resource share was deleted".into() }];
        assert_eq!(
            recheck(&c, &p, &r).unwrap_err().to_string(),
            "endpoint vpce-1 was revoked: the resource share was deleted"
        );
        // The endpoint was deleted: it is nowhere in the config any more.
        c.gateway.revoked_endpoints.clear();
        assert_eq!(
            recheck(&c, &p, &r).unwrap_err().to_string(),
            "endpoint vpce-1 was deleted or its resource is no longer served"
        );
        // The resource left the gateway.
        let mut c = config();
        c.gateway.resources.clear();
        assert_eq!(recheck(&c, &p, &r).unwrap_err(), Denial::EndpointGone("vpce-1".into()));
        // A deleted agent's certificate stays a certificate revocation.
        let mut c = config();
        c.gateway.revoked_certs = ["ab".repeat(32)].into();
        assert!(matches!(recheck(&c, &p, &r), Err(Denial::RevokedPeer(_))));
        // Still allowed: still granted.
        assert!(recheck(&config(), &p, &r).is_ok());
    }

    #[test]
    fn only_consumers_with_unrevoked_certificates_are_admitted() {
        let role = config().gateway;
        assert!(admit_peer(&role, &peer("acct-c", "vpc-c")).is_ok());
        assert!(matches!(admit_peer(&role, &peer("acct-x", "vpc-c")), Err(Denial::UnknownPeer { .. })));
        let mut revoked = role.clone();
        revoked.revoked_certs = ["ab".repeat(32)].into();
        assert!(matches!(admit_peer(&revoked, &peer("acct-c", "vpc-c")), Err(Denial::RevokedPeer(_))));
    }
}
