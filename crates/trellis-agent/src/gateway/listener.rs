//! The gateway's tunnel listener: mutual TLS 1.3, one stream per connection.
//!
//! Per connection: TLS handshake (client certificate verified against the CA
//! and admitted only when it names a consumer VPC of the current config and is
//! not revoked), read the `OpenRequest` (pooled connections wait a few seconds
//! at most before it arrives), authorize it against the *current* config, dial
//! the resource, answer, then splice. Every connection re-checks its peer, and
//! every open stream its grant, whenever the config changes, and is closed as
//! soon as either is gone. Anything a peer does wrong closes that peer's
//! connection only.
//!
//! Bounded: a cap on all connections (accepting waits when it is reached), a
//! smaller one on connections still in the handshake (more are closed at
//! once), and per peer certificate a cap on connections and on connections
//! still waiting for their open request (see [`super::admission`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_proto::AgentConfig;
use trellis_proto::stream::{OpenRequest, OpenResponse, OpenStatus, decode_open_request, encode_open_response};

use super::admission::{PeerLimit, PeerTable};
use super::authorize::{Denial, Destination, Grant, admit_peer, authorize, recheck};
use super::consumers::{ConsumerLimiter, Paced};
use super::dial::{DialError, describe, dial};
use super::services::{ActiveGuard, ServiceDialError, ServiceRuntime};
use crate::access_log::AccessLog;
use crate::flow::{FlowInfo, OpenFlow, reject};
use crate::frame_io::{ReadFrameError, read_frame};
use crate::metrics::{FlowLabels, Metrics, Role};
use crate::read_ahead::ReadAhead;
use crate::splice::{SpliceEnd, splice};
use crate::tls::peer_identity;
use crate::usage::{UsageKey, UsageTable};

/// Deadlines of the gateway side.
#[derive(Clone, Copy, Debug)]
pub struct GatewayTimeouts {
    /// TLS handshake.
    pub handshake: Duration,
    /// From handshake to `OpenRequest`. Endpoint agents retire their warm
    /// connections before this (see `PoolSettings::max_idle`).
    pub open_request: Duration,
    /// Connecting to the resource (resolution included).
    pub dial: Duration,
}

impl Default for GatewayTimeouts {
    fn default() -> Self {
        Self { handshake: Duration::from_secs(10), open_request: Duration::from_secs(10), dial: Duration::from_secs(5) }
    }
}

/// Everything a gateway connection needs, shared by all of them.
pub struct GatewayContext {
    pub config: watch::Receiver<Arc<AgentConfig>>,
    pub metrics: Arc<Metrics>,
    pub usage: Arc<UsageTable>,
    pub access_log: AccessLog,
    pub timeouts: GatewayTimeouts,
    /// Caps concurrent tunnel connections (idle pooled ones included).
    pub connections: Arc<Semaphore>,
    /// Caps connections still in the TLS handshake.
    pub handshakes: Arc<Semaphore>,
    /// Caps connections per peer certificate.
    pub peers: Arc<PeerTable>,
    /// Endpoint services: target health, open connections, balancers.
    pub services: Arc<ServiceRuntime>,
    /// Per-consumer limits of resources and services.
    pub consumers: Arc<ConsumerLimiter>,
}

/// Accepts tunnel connections on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ctx: Arc<GatewayContext>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let permit = tokio::select! {
            p = ctx.connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = shutdown.cancelled() => return,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "tunnel accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let Ok(handshake) = ctx.handshakes.clone().try_acquire_owned() else {
            ctx.metrics.count_tunnel_refused("handshake_budget");
            tracing::debug!(%peer, "too many tunnel handshakes in progress; closing");
            continue;
        };
        let ctx = ctx.clone();
        let acceptor = acceptor.clone();
        let cancel = shutdown.child_token();
        tracker.spawn(async move {
            handle(tcp, peer, acceptor, handshake, ctx, cancel).await;
            drop(permit);
        });
    }
}

async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    handshake_permit: OwnedSemaphorePermit,
    ctx: Arc<GatewayContext>,
    cancel: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    set_keepalive(&tcp);
    serve_stream(ReadAhead::new(tcp), peer, acceptor, handshake_permit, ctx, cancel).await;
}

/// Serves one tunnel connection whose TCP (or relayed) stream is `io`: the
/// gateway is the TLS server whichever side opened the connection, so a flow
/// through a relay is served exactly like a direct one.
pub(crate) async fn serve_stream(
    io: ReadAhead,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    handshake_permit: OwnedSemaphorePermit,
    ctx: Arc<GatewayContext>,
    cancel: CancellationToken,
) {
    // Futures that finish before the splice are boxed, and so is the TLS stream, so that the
    // state this task keeps for the life of an idle connection stays small (memory per connection).
    let handshake = Box::pin(acceptor.accept(io));
    let mut tls = match tokio::time::timeout(ctx.timeouts.handshake, handshake).await {
        Ok(Ok(tls)) => Box::new(tls),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "tunnel TLS handshake failed");
            return;
        }
        Err(_) => {
            ctx.metrics.count_tunnel_refused("handshake_timeout");
            tracing::debug!(%peer, "tunnel TLS handshake timed out");
            return;
        }
    };
    drop(handshake_permit);
    let Some(peer_id) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(peer_identity) else {
        // The verifier requires a CA-signed client certificate, and the CA names every agent in it.
        tracing::debug!(%peer, "tunnel peer certificate names no agent; closing");
        return;
    };
    let mut config_rx = ctx.config.clone();
    // Resumed sessions skip the certificate verifier: admit again. The peer is
    // authenticated, so it is told why (its open request gets this answer).
    let admitted = admit_peer(&config_rx.borrow_and_update().gateway, &peer_id);
    if let Err(denial) = admitted {
        ctx.metrics.count_tunnel_refused(refusal_label(&denial));
        tracing::debug!(%peer, agent = %peer_id.agent_id, reason = %denial, "refusing a resumed tunnel session");
        respond(&mut tls, OpenStatus::Denied, denial.to_string()).await;
        let _ = tls.shutdown().await;
        return;
    }
    let mut slot = match ctx.peers.enter(&peer_id.cert_sha256) {
        Ok(slot) => slot,
        Err(limit) => {
            ctx.metrics.count_tunnel_refused(match limit {
                PeerLimit::Connections(_) => "peer_connections",
                PeerLimit::Pending(_) => "peer_pending",
            });
            tracing::debug!(%peer, agent = %peer_id.agent_id, reason = %limit, "closing tunnel connection");
            return;
        }
    };
    // While waiting for the open request, a config that no longer admits the peer closes the connection.
    let peer_dropped = async {
        loop {
            if config_rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            if let Err(denial) = admit_peer(&config_rx.borrow_and_update().gateway, &peer_id) {
                return denial;
            }
        }
    };
    let read = tokio::select! {
        r = tokio::time::timeout(ctx.timeouts.open_request, read_frame(&mut tls, decode_open_request)) => r,
        denial = peer_dropped => {
            ctx.metrics.count_tunnel_refused(refusal_label(&denial));
            tracing::debug!(%peer, agent = %peer_id.agent_id, reason = %denial, "closing idle tunnel connection");
            let _ = tls.shutdown().await;
            return;
        }
        () = cancel.cancelled() => return,
    };
    slot.opened();
    let started = SystemTime::now();
    let (req, leftover) = match read {
        Ok(Ok(x)) => x,
        Ok(Err(ReadFrameError::Protocol(e))) => {
            tracing::warn!(%peer, error = %e, "malformed open request; closing this tunnel connection");
            respond(&mut tls, OpenStatus::BadRequest, e.to_string()).await;
            let _ = tls.shutdown().await;
            return;
        }
        // Idle pooled connection closed by the endpoint, or a broken connection: nothing to log.
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "tunnel connection ended before an open request");
            return;
        }
        Err(_) => {
            ctx.metrics.count_tunnel_refused("open_request_timeout");
            tracing::debug!(%peer, "no open request in time; closing idle tunnel connection");
            let _ = tls.shutdown().await;
            return;
        }
    };
    let decision = authorize(&config_rx.borrow_and_update(), &peer_id, &req);
    let grant = match decision {
        Ok(g) => g,
        Err(denial) => {
            deny(&ctx, &req, &denial, started);
            respond(&mut tls, OpenStatus::Denied, denial.to_string()).await;
            let _ = tls.shutdown().await;
            return;
        }
    };
    let mut info = FlowInfo {
        role: Role::Gateway,
        vpc_endpoint_id: req.vpc_endpoint_id.clone(),
        resource_configuration_id: req.resource_configuration_id.clone(),
        consumer_account_id: grant.consumer_account_id.clone(),
        client_addr: req.client_addr.to_string(),
        target: match &grant.destination {
            Destination::Resource { target, port } => describe(target, *port),
            Destination::Service { service_id, .. } => service_id.clone(),
        },
    };
    let usage = ctx.usage.cell(UsageKey {
        vpc_endpoint_id: req.vpc_endpoint_id.clone(),
        resource_configuration_id: req.resource_configuration_id.clone(),
        consumer_account_id: grant.consumer_account_id.clone(),
    });
    let refuse = |info: &FlowInfo, status: OpenStatus, message: String| {
        reject(
            info,
            &info.labels(),
            &ctx.metrics,
            Some(&usage),
            &ctx.access_log,
            started,
            status.as_str(),
            Some(message),
        );
    };
    // The owner's limit on this consumer's connections, counted until the flow ends.
    let slot = match &grant.limits {
        Some(limits) => match ctx.consumers.enter(&req.resource_configuration_id, &grant.consumer_account_id, limits) {
            Ok(slot) => Some(slot),
            Err(too_many) => {
                ctx.metrics.count_limited(&req.resource_configuration_id, &grant.consumer_account_id, "connections");
                refuse(&info, OpenStatus::Denied, too_many.to_string());
                respond(&mut tls, OpenStatus::Denied, too_many.to_string()).await;
                let _ = tls.shutdown().await;
                return;
            }
        },
        None => None,
    };
    let dialed = tokio::select! {
        r = Box::pin(connect(&ctx, &config_rx, &grant.destination, req.client_addr)) => r,
        () = cancel.cancelled() => return,
    };
    let (mut target, described, _on_target) = match dialed {
        Ok(t) => t,
        Err((status, message)) => {
            refuse(&info, status, message.clone());
            respond(&mut tls, status, message).await;
            let _ = tls.shutdown().await;
            return;
        }
    };
    info.target = described;
    if grant.proxy_protocol {
        let header = proxy_header(&req, &grant, &target);
        if let Err(e) = target.write_all(&header).await {
            let message = format!("the target closed before the PROXY header was written: {e}");
            refuse(&info, OpenStatus::Unreachable, message.clone());
            respond(&mut tls, OpenStatus::Unreachable, message).await;
            let _ = tls.shutdown().await;
            return;
        }
    }
    if !respond(&mut tls, OpenStatus::Ok, String::new()).await {
        return;
    }
    let flow = OpenFlow::open(info, ctx.metrics.clone(), Some(usage), ctx.access_log.clone(), started);
    if !leftover.is_empty() {
        if let Err(e) = target.write_all(&leftover).await {
            flow.finish("error", Some(e.to_string()));
            return;
        }
        flow.add_in(leftover.len() as u64);
    }
    let revoked = async {
        loop {
            if config_rx.changed().await.is_err() {
                // The config publisher is gone: the agent is shutting down, which `cancel` covers.
                std::future::pending::<()>().await;
            }
            let still = recheck(&config_rx.borrow_and_update(), &peer_id, &req);
            if let Err(d) = still {
                return d;
            }
        }
    };
    tokio::pin!(revoked);
    let mut revocation: Option<Denial> = None;
    let stop = async {
        tokio::select! {
            d = &mut revoked => revocation = Some(d),
            () = cancel.cancelled() => {}
        }
    };
    let end = match slot.as_ref().and_then(|s| s.pace.clone()) {
        Some(pace) => {
            let paced = Paced::new(
                target,
                pace,
                ctx.metrics.clone(),
                &req.resource_configuration_id,
                &grant.consumer_account_id,
            );
            splice(tls, paced, |n| flow.add_in(n), |n| flow.add_out(n), stop).await
        }
        None => splice(tls, target, |n| flow.add_in(n), |n| flow.add_out(n), stop).await,
    };
    drop(slot);
    match (end, revocation) {
        (SpliceEnd::Closed, _) => flow.finish("closed", None),
        (SpliceEnd::Error(e), _) => flow.finish("error", Some(e.to_string())),
        (SpliceEnd::Stopped, Some(d)) => {
            tracing::info!(endpoint = %req.vpc_endpoint_id, resource = %req.resource_configuration_id, reason = %d, "closing revoked connection");
            flow.finish("revoked", Some(d.to_string()))
        }
        (SpliceEnd::Stopped, None) => flow.finish("shutdown", None),
    }
}

/// Connects to where `destination` says: the resource's target, or a healthy
/// target of the service picked by its balancer. Returns the stream, the
/// target for the access log, and (for a service) the hold on the target
/// that counts the connection for least-connections.
async fn connect(
    ctx: &GatewayContext,
    config: &watch::Receiver<Arc<AgentConfig>>,
    destination: &Destination,
    client: SocketAddr,
) -> Result<(TcpStream, String, Option<ActiveGuard>), (OpenStatus, String)> {
    let status_of = |e: &DialError| match e {
        DialError::Timeout { .. } => OpenStatus::Timeout,
        DialError::Unreachable { .. } => OpenStatus::Unreachable,
    };
    match destination {
        Destination::Resource { target, port } => match dial(target, *port, ctx.timeouts.dial).await {
            Ok(stream) => Ok((stream, describe(target, *port), None)),
            Err(e) => Err((status_of(&e), e.to_string())),
        },
        Destination::Service { service_id, port } => {
            let service = config.borrow().gateway.services.iter().find(|s| &s.service_id == service_id).cloned();
            let Some(service) = service else {
                return Err((OpenStatus::Denied, format!("service {service_id} is not served by this gateway")));
            };
            match ctx.services.connect(&service, *port, client.ip(), ctx.timeouts.dial).await {
                Ok((stream, target, guard)) => Ok((stream, target, Some(guard))),
                Err(ServiceDialError::Dial(e)) => Err((status_of(&e), e.to_string())),
                Err(e @ ServiceDialError::NoHealthyTarget(_)) => Err((OpenStatus::Unreachable, e.to_string())),
            }
        }
    }
}

/// The PROXY protocol v2 header for a stream: the consumer's client, the
/// target dialed, and TLVs naming the endpoint, the consumer and what it reached.
/// Numbers connections for the PROXY header's unique id.
static NEXT_CONNECTION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn proxy_header(req: &OpenRequest, grant: &Grant, target: &TcpStream) -> Vec<u8> {
    let dialed = target.peer_addr().unwrap_or_else(|_| SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0));
    trellis_proto::proxy_v2::encode(&trellis_proto::proxy_v2::Caller {
        client: req.client_addr,
        target: dialed,
        vpc_endpoint_id: &req.vpc_endpoint_id,
        consumer_account_id: &grant.consumer_account_id,
        consumer_vpc_id: &grant.consumer_vpc_id,
        target_id: &req.resource_configuration_id,
        connection: NEXT_CONNECTION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    })
}

/// Counts and logs a denied request. Metric labels and usage keys use ids
/// from the config only when the request names a known (endpoint, resource)
/// pair, so a peer cannot invent series; the access log records what was asked.
fn deny(ctx: &GatewayContext, req: &OpenRequest, denial: &Denial, started: SystemTime) {
    let config = ctx.config.borrow().clone();
    let resource =
        config.gateway.resources.iter().find(|r| r.resource_configuration_id == req.resource_configuration_id);
    let known = resource
        .and_then(|r| r.allowed_endpoint(&req.vpc_endpoint_id))
        .and_then(|a| Some((a, config.gateway.consumer(a)?)))
        .filter(|_| matches!(denial, Denial::PortNotAllowed { .. }));
    let unknown = "unknown";
    let labels = FlowLabels::new(
        Role::Gateway,
        resource.map_or(unknown, |r| r.resource_configuration_id.as_str()),
        known.map_or(unknown, |(a, _)| a.vpc_endpoint_id.as_str()),
        known.map_or(unknown, |(_, c)| c.account_id.as_str()),
    );
    let usage = known.map(|(a, c)| {
        ctx.usage.cell(UsageKey {
            vpc_endpoint_id: a.vpc_endpoint_id.clone(),
            resource_configuration_id: req.resource_configuration_id.clone(),
            consumer_account_id: c.account_id.clone(),
        })
    });
    let info = FlowInfo {
        role: Role::Gateway,
        vpc_endpoint_id: req.vpc_endpoint_id.clone(),
        resource_configuration_id: req.resource_configuration_id.clone(),
        consumer_account_id: known.map_or(unknown, |(_, c)| c.account_id.as_str()).to_string(),
        client_addr: req.client_addr.to_string(),
        target: String::new(),
    };
    tracing::info!(endpoint = %req.vpc_endpoint_id, resource = %req.resource_configuration_id, reason = %denial, "denied open request");
    reject(
        &info,
        &labels,
        &ctx.metrics,
        usage.as_deref(),
        &ctx.access_log,
        started,
        "denied",
        Some(denial.to_string()),
    );
}

/// The metric label of a peer that is no longer admitted.
fn refusal_label(denial: &Denial) -> &'static str {
    match denial {
        Denial::RevokedPeer(_) => "revoked_certificate",
        _ => "not_a_consumer",
    }
}

/// Sends an `OpenResponse`; false when the peer is gone.
async fn respond(tls: &mut TlsStream<ReadAhead>, status: OpenStatus, message: String) -> bool {
    let mut out = Vec::new();
    encode_open_response(&OpenResponse::new(status, message), &mut out);
    tls.write_all(&out).await.is_ok() && tls.flush().await.is_ok()
}

/// TCP keepalive so dead peers of long-lived tunnels are noticed.
pub(crate) fn set_keepalive(tcp: &TcpStream) {
    let ka = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(15));
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
}
