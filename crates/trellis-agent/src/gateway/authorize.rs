//! The gateway's authorization check, pure: given the current config, the
//! peer's certificate hash and an open request, allow (and say what to dial)
//! or deny (and say why). Run for every new stream and again for every open
//! stream whenever the config changes, so revocation closes live connections.

use trellis_proto::stream::OpenRequest;
use trellis_proto::{AgentConfig, Target};

use crate::tls::PeerIdentity;

/// What an allowed stream may do, and whom to account it to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub target: Target,
    pub consumer_account_id: String,
    pub owner_account_id: String,
    /// The endpoint agent that opened the stream.
    pub peer_agent_id: String,
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
    /// The resource is not served by this gateway (any more).
    #[error("resource {0} is not served by this gateway")]
    UnknownResource(String),
    /// The endpoint is not (or no longer) allowed to reach the resource.
    #[error("endpoint {endpoint} is not allowed to reach {resource}")]
    EndpointNotAllowed { endpoint: String, resource: String },
    /// The endpoint was revoked; the reason is the control plane's.
    #[error("endpoint {endpoint} was revoked: {reason}")]
    EndpointRevoked { endpoint: String, reason: String },
    /// The port is outside the resource's port ranges.
    #[error("port {port} is not open on {resource}")]
    PortNotAllowed { port: u16, resource: String },
}

/// Checks `req` from `peer` against the gateway role of `config`.
pub fn authorize(config: &AgentConfig, peer: &PeerIdentity, req: &OpenRequest) -> Result<Grant, Denial> {
    let role = &config.gateway;
    if role.revoked_certs.iter().any(|c| c.eq_ignore_ascii_case(&peer.cert_sha256)) {
        return Err(Denial::RevokedPeer(peer.agent_id.clone()));
    }
    if !role.knows_consumer(&peer.account_id, &peer.vpc_id) {
        return Err(Denial::UnknownPeer { account_id: peer.account_id.clone(), vpc_id: peer.vpc_id.clone() });
    }
    let resource = role
        .resources
        .iter()
        .find(|r| r.resource_configuration_id == req.resource_configuration_id)
        .ok_or_else(|| Denial::UnknownResource(req.resource_configuration_id.clone()))?;
    let not_allowed = || match role.revoked_endpoints.iter().find(|r| r.vpc_endpoint_id == req.vpc_endpoint_id) {
        Some(revoked) => {
            Denial::EndpointRevoked { endpoint: req.vpc_endpoint_id.clone(), reason: revoked.reason.clone() }
        }
        None => Denial::EndpointNotAllowed {
            endpoint: req.vpc_endpoint_id.clone(),
            resource: req.resource_configuration_id.clone(),
        },
    };
    let consumer = resource
        .allowed_endpoint(&req.vpc_endpoint_id)
        .and_then(|a| role.consumer(a))
        .filter(|c| c.vpc_id == peer.vpc_id && c.account_id == peer.account_id)
        .ok_or_else(not_allowed)?;
    if !resource.port_ranges.iter().any(|r| r.contains(req.port)) {
        return Err(Denial::PortNotAllowed { port: req.port, resource: req.resource_configuration_id.clone() });
    }
    Ok(Grant {
        target: resource.target.clone(),
        consumer_account_id: consumer.account_id.clone(),
        owner_account_id: resource.owner_account_id.clone(),
        peer_agent_id: peer.agent_id.clone(),
    })
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
                }],
                revoked_certs: vec![],
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
        c.gateway.revoked_certs = vec!["AB".repeat(32)];
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
}
