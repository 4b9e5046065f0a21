//! One client connection on an endpoint address: pick a gateway agent (own
//! zone first, others on failure), send the `OpenRequest`, wait for the
//! `OpenResponse`, then splice. A refused open resets the client connection,
//! so the client sees a failure instead of an empty, clean close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use trellis_proto::stream::{OpenRequest, OpenResponse, OpenStatus, decode_open_response, encode_open_request};
use trellis_proto::{AgentConfig, GatewayTarget};

use super::pool::{GatewayKey, GatewayPools, Tunnel};
use crate::access_log::AccessLog;
use crate::flow::{FlowInfo, OpenFlow, reject};
use crate::frame_io::{ReadFrameError, read_frame};
use crate::metrics::{Metrics, Role};
use crate::splice::{SpliceEnd, splice};

/// Shared by every endpoint connection.
pub struct EndpointContext {
    pub config: watch::Receiver<Arc<AgentConfig>>,
    pub pools: Arc<GatewayPools>,
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    /// From sending the `OpenRequest` to receiving the `OpenResponse` (covers the gateway's dial).
    pub open_timeout: Duration,
}

/// Why a gateway agent did not open the stream.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    /// Could not connect or talk to the gateway agent: try another one.
    #[error("gateway agent {gateway}: {reason}")]
    Gateway { gateway: String, reason: String },
    /// The gateway answered with a refusal.
    #[error("gateway agent {gateway} answered {}: {}", .response.status, .response.message)]
    Refused { gateway: String, response: OpenResponse },
}

/// Gateways ordered for failover: those in `zone` first, config order otherwise.
pub fn order_gateways<'a>(gateways: &'a [GatewayTarget], zone: &str) -> Vec<&'a GatewayTarget> {
    let mut ordered: Vec<&GatewayTarget> = gateways.iter().collect();
    ordered.sort_by_key(|g| g.zone != zone);
    ordered
}

/// Serves one accepted client until it closes or `cancel` fires.
pub async fn serve_client(
    client: TcpStream,
    client_addr: SocketAddr,
    vpc_endpoint_id: String,
    resource_configuration_id: String,
    ctx: Arc<EndpointContext>,
    cancel: CancellationToken,
) {
    let started = SystemTime::now();
    let _ = client.set_nodelay(true);
    let port = client.local_addr().map(|a| a.port()).unwrap_or_default();
    let config = ctx.config.borrow().clone();
    let gateways: Vec<GatewayTarget> = config
        .endpoints
        .iter()
        .filter(|e| e.vpc_endpoint_id == vpc_endpoint_id)
        .flat_map(|e| e.resources.iter())
        .filter(|r| r.resource_configuration_id == resource_configuration_id)
        .flat_map(|r| order_gateways(&r.gateways, &config.zone).into_iter().cloned())
        .collect();
    let mut info = FlowInfo {
        role: Role::Endpoint,
        vpc_endpoint_id: vpc_endpoint_id.clone(),
        resource_configuration_id: resource_configuration_id.clone(),
        consumer_account_id: config.account_id.clone(),
        client_addr: client_addr.to_string(),
        target: String::new(),
    };
    let req = OpenRequest { vpc_endpoint_id, resource_configuration_id, port, client_addr };
    let mut last: Option<OpenError> = None;
    let mut opened = None;
    for gateway in &gateways {
        let attempt = tokio::select! {
            // Boxed: the handshake state of a fresh connection must not stay in this task's memory.
            r = Box::pin(open(&ctx, gateway, &req)) => r,
            () = cancel.cancelled() => return,
        };
        match attempt {
            Ok(x) => {
                info.target = gateway.address.clone();
                opened = Some(x);
                break;
            }
            Err(e) => {
                tracing::debug!(error = %e, "open through gateway agent failed");
                // Denied and BadRequest are the same answer from any gateway: stop there.
                let final_answer = matches!(
                    &e,
                    OpenError::Refused { response, .. }
                        if matches!(response.status, OpenStatus::Denied | OpenStatus::BadRequest)
                );
                last = Some(e);
                if final_answer {
                    break;
                }
            }
        }
    }
    let Some((tunnel, leftover)) = opened else {
        let (outcome, message) = match &last {
            Some(OpenError::Refused { response, .. }) => {
                (response.status.as_str(), last.as_ref().map(|e| e.to_string()))
            }
            Some(e) => ("unreachable", Some(e.to_string())),
            None => ("unreachable", Some("no gateway agent serves this resource".to_string())),
        };
        tracing::info!(endpoint = %req.vpc_endpoint_id, resource = %req.resource_configuration_id, client = %client_addr, outcome, message = message.as_deref().unwrap_or(""), "refusing client connection");
        reject(&info, &info.labels(), &ctx.metrics, None, &ctx.access_log, started, outcome, message);
        // Reset rather than close cleanly: the client must see that nothing answered.
        let _ = client.set_zero_linger();
        drop(client);
        return;
    };
    let flow = OpenFlow::open(info, ctx.metrics.clone(), None, ctx.access_log.clone(), started);
    let mut client = client;
    if !leftover.is_empty() {
        if let Err(e) = client.write_all(&leftover).await {
            flow.finish("error", Some(e.to_string()));
            return;
        }
        flow.add_out(leftover.len() as u64);
    }
    let end = splice(client, Box::new(tunnel), |n| flow.add_in(n), |n| flow.add_out(n), cancel.cancelled()).await;
    match end {
        SpliceEnd::Closed => flow.finish("closed", None),
        SpliceEnd::Error(e) => flow.finish("error", Some(e.to_string())),
        SpliceEnd::Stopped => {
            flow.finish("revoked", Some("the endpoint listener was removed or the agent stopped".into()))
        }
    }
}

/// Opens a stream through one gateway agent. A warm connection that turns out
/// dead is replaced once by a fresh one (nothing reached the resource yet).
async fn open(
    ctx: &EndpointContext,
    gateway: &GatewayTarget,
    req: &OpenRequest,
) -> Result<(Tunnel, Vec<u8>), OpenError> {
    let key = GatewayKey::from(gateway);
    let fail = |reason: String| OpenError::Gateway { gateway: gateway.address.clone(), reason };
    let mut frame = Vec::new();
    encode_open_request(req, &mut frame).map_err(|e| fail(e.to_string()))?;
    let (mut tunnel, mut warm) = ctx.pools.get(&key).await.map_err(|e| fail(e.to_string()))?;
    loop {
        match exchange(&mut tunnel, &frame, ctx.open_timeout).await {
            Ok((response, leftover)) if response.status == OpenStatus::Ok => return Ok((tunnel, leftover)),
            Ok((response, _)) => return Err(OpenError::Refused { gateway: gateway.address.clone(), response }),
            Err(ExchangeError::Dead(reason)) if warm => {
                tracing::debug!(gateway = %gateway.address, reason, "warm tunnel connection was dead; reconnecting");
                tunnel = ctx.pools.connect(&key).await.map_err(|e| fail(e.to_string()))?;
                warm = false;
            }
            Err(ExchangeError::Dead(reason) | ExchangeError::Other(reason)) => return Err(fail(reason)),
        }
    }
}

enum ExchangeError {
    /// The connection was closed or broken before any answer: safe to retry elsewhere.
    Dead(String),
    /// Timeout or protocol violation.
    Other(String),
}

async fn exchange(
    tunnel: &mut Tunnel,
    frame: &[u8],
    timeout: Duration,
) -> Result<(OpenResponse, Vec<u8>), ExchangeError> {
    if let Err(e) = tunnel.write_all(frame).await.and(tunnel.flush().await) {
        return Err(ExchangeError::Dead(describe_io(&e)));
    }
    match tokio::time::timeout(timeout, read_frame(tunnel, decode_open_response)).await {
        Err(_) => Err(ExchangeError::Other(format!("no answer within {timeout:?}"))),
        Ok(Ok(x)) => Ok(x),
        Ok(Err(ReadFrameError::Closed)) => Err(ExchangeError::Dead("closed before answering".into())),
        Ok(Err(ReadFrameError::Io(e))) => Err(ExchangeError::Dead(describe_io(&e))),
        Ok(Err(ReadFrameError::Protocol(e))) => {
            tracing::warn!(error = %e, "gateway agent broke the stream protocol; closing that connection");
            Err(ExchangeError::Other(e.to_string()))
        }
    }
}

/// An I/O error on a tunnel connection, with what it means when the gateway
/// refused this agent's certificate (its verdict arrives as a TLS alert after
/// the client's side of the handshake is done).
fn describe_io(e: &std::io::Error) -> String {
    use rustls::AlertDescription;
    let alert = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).and_then(|r| match r {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    });
    match alert {
        Some(AlertDescription::AccessDenied) => {
            "the gateway agent refused this agent's certificate: no endpoint of this VPC is allowed on it (yet)".into()
        }
        Some(AlertDescription::CertificateRevoked) => {
            "the gateway agent refused this agent's certificate as revoked (this agent was deleted)".into()
        }
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(id: &str, zone: &str) -> GatewayTarget {
        GatewayTarget { agent_id: id.into(), address: format!("{id}:7443"), zone: zone.into(), server_name: id.into() }
    }

    #[test]
    fn own_zone_gateways_come_first_in_config_order() {
        let gws = [gw("a", "z2"), gw("b", "z1"), gw("c", "z3"), gw("d", "z1")];
        let ids: Vec<&str> = order_gateways(&gws, "z1").iter().map(|g| g.agent_id.as_str()).collect();
        assert_eq!(ids, ["b", "d", "a", "c"]);
    }

    #[test]
    fn a_refused_certificate_is_explained() {
        let alert = |a| std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::AlertReceived(a));
        assert!(describe_io(&alert(rustls::AlertDescription::AccessDenied)).contains("no endpoint of this VPC"));
        assert!(describe_io(&alert(rustls::AlertDescription::CertificateRevoked)).contains("revoked"));
        let other = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(describe_io(&other), "reset");
    }
}
