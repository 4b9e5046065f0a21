//! The gateway's authorization check, pure: given the current config, the
//! peer's certificate hash and an open request, allow (and say what to dial)
//! or deny (and say why). Run for every new stream and again for every open
//! stream whenever the config changes, so revocation closes live connections.

use trellis_proto::stream::OpenRequest;
use trellis_proto::{AgentConfig, Target};

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
    /// The client certificate is not one of this gateway's peers.
    #[error("this gateway does not know the connecting agent")]
    UnknownPeer,
    /// The resource is not served by this gateway (any more).
    #[error("resource {0} is not served by this gateway")]
    UnknownResource(String),
    /// The endpoint is not (or no longer) allowed to reach the resource.
    #[error("endpoint {endpoint} is not allowed to reach {resource}")]
    EndpointNotAllowed { endpoint: String, resource: String },
    /// The port is outside the resource's port ranges.
    #[error("port {port} is not open on {resource}")]
    PortNotAllowed { port: u16, resource: String },
}

/// Checks `req` from the peer whose certificate hashes to `peer_cert_sha256`.
pub fn authorize(config: &AgentConfig, peer_cert_sha256: &str, req: &OpenRequest) -> Result<Grant, Denial> {
    let peer = config
        .gateway
        .peers
        .iter()
        .find(|p| p.cert_sha256.eq_ignore_ascii_case(peer_cert_sha256))
        .ok_or(Denial::UnknownPeer)?;
    let resource = config
        .gateway
        .resources
        .iter()
        .find(|r| r.resource_configuration_id == req.resource_configuration_id)
        .ok_or_else(|| Denial::UnknownResource(req.resource_configuration_id.clone()))?;
    let allowed = resource
        .allowed
        .iter()
        .find(|a| a.vpc_endpoint_id == req.vpc_endpoint_id && a.consumer_vpc_id == peer.vpc_id)
        .ok_or_else(|| Denial::EndpointNotAllowed {
            endpoint: req.vpc_endpoint_id.clone(),
            resource: req.resource_configuration_id.clone(),
        })?;
    if !resource.port_ranges.iter().any(|r| r.contains(req.port)) {
        return Err(Denial::PortNotAllowed { port: req.port, resource: req.resource_configuration_id.clone() });
    }
    Ok(Grant {
        target: resource.target.clone(),
        consumer_account_id: allowed.consumer_account_id.clone(),
        owner_account_id: resource.owner_account_id.clone(),
        peer_agent_id: peer.agent_id.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::{AllowedEndpoint, GatewayResource, GatewayRole, PeerAgent, PortRange};

    fn config() -> AgentConfig {
        AgentConfig {
            version: 1,
            gateway: GatewayRole {
                peers: vec![PeerAgent {
                    agent_id: "agent-c".into(),
                    account_id: "acct-c".into(),
                    vpc_id: "vpc-c".into(),
                    cert_sha256: "ab".repeat(32),
                }],
                resources: vec![GatewayResource {
                    resource_configuration_id: "rcfg-1".into(),
                    resource_gateway_id: "rgw-1".into(),
                    owner_account_id: "acct-o".into(),
                    target: Target::Ip { address: "10.0.0.5".parse().unwrap() },
                    port_ranges: vec!["5432".parse().unwrap(), PortRange::new(8000, 8100).unwrap()],
                    allowed: vec![AllowedEndpoint {
                        vpc_endpoint_id: "vpce-1".into(),
                        consumer_account_id: "acct-c".into(),
                        consumer_vpc_id: "vpc-c".into(),
                    }],
                }],
            },
            ..Default::default()
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
        let grant = authorize(&config(), &"AB".repeat(32), &req("vpce-1", "rcfg-1", 8050)).unwrap();
        assert_eq!(grant.consumer_account_id, "acct-c");
        assert_eq!(grant.peer_agent_id, "agent-c");
    }

    #[test]
    fn unknown_certificate_is_denied() {
        assert_eq!(authorize(&config(), &"cd".repeat(32), &req("vpce-1", "rcfg-1", 5432)), Err(Denial::UnknownPeer));
    }

    #[test]
    fn other_endpoint_resource_or_port_is_denied() {
        let peer = "ab".repeat(32);
        assert!(matches!(
            authorize(&config(), &peer, &req("vpce-2", "rcfg-1", 5432)),
            Err(Denial::EndpointNotAllowed { .. })
        ));
        assert!(matches!(authorize(&config(), &peer, &req("vpce-1", "rcfg-2", 5432)), Err(Denial::UnknownResource(_))));
        assert!(matches!(
            authorize(&config(), &peer, &req("vpce-1", "rcfg-1", 5433)),
            Err(Denial::PortNotAllowed { port: 5433, .. })
        ));
    }

    #[test]
    fn endpoint_id_from_another_vpc_is_denied() {
        // The peer is a real agent, but of another VPC than the allowed endpoint's.
        let mut c = config();
        c.gateway.peers[0].vpc_id = "vpc-other".into();
        assert!(matches!(
            authorize(&c, &"ab".repeat(32), &req("vpce-1", "rcfg-1", 5432)),
            Err(Denial::EndpointNotAllowed { .. })
        ));
    }

    #[test]
    fn revoked_share_refuses_the_stream() {
        let mut c = config();
        c.gateway.resources[0].allowed.clear();
        assert!(authorize(&c, &"ab".repeat(32), &req("vpce-1", "rcfg-1", 5432)).is_err());
    }
}
