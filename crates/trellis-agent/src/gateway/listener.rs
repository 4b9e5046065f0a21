//! The gateway's tunnel listener: mutual TLS 1.3, many flows per connection
//! (stream protocol version 2, [`crate::mux`]).
//!
//! Per connection: TLS handshake (client certificate verified against the CA
//! and admitted only when it names a consumer VPC of the current config and is
//! not revoked), then the flows the endpoint agent opens on it. Per flow:
//! authorize its open request against the *current* config, dial the
//! resource, answer, then splice. Every connection re-checks its peer, and
//! every open flow its grant, whenever the config changes, and is closed as
//! soon as either is gone. Anything a peer does wrong in a frame closes that
//! flow only; [`serve_tunnel`] takes any authenticated byte stream, so relayed
//! connections are served the same way.
//!
//! Bounded: a cap on all connections (accepting waits when it is reached), a
//! smaller one on connections still in the handshake (more are closed at
//! once), every flow also takes one of the connection budget (it holds a
//! socket to the resource), and per peer certificate a cap on connections and
//! flows and on connections still waiting for their first flow (see
//! [`super::admission`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncBufRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_proto::AgentConfig;
use trellis_proto::stream::{OpenRequest, OpenResponse, OpenStatus};

use super::admission::{PeerLimit, PeerSlot, PeerTable};
use super::authorize::{Denial, Destination, Grant, admit_peer, authorize, recheck};
use super::consumers::{ConsumerLimiter, ConsumerSlot, Paced};
use super::dial::{DialError, describe, dial};
use super::services::{ActiveGuard, ServiceDialError, ServiceRuntime};
use crate::access_log::AccessLog;
use crate::flow::{FlowInfo, OpenFlow, reject};
use crate::metrics::{FlowLabels, Metrics, Role};
use crate::mux::{MuxConnection, MuxStream, Side};
use crate::read_ahead::ReadAhead;
use crate::splice::{SpliceEnd, splice, splice_attached};
use crate::tls::{PeerIdentity, peer_identity};
use crate::usage::{UsageKey, UsageTable};

/// Deadlines of the gateway side.
#[derive(Clone, Copy, Debug)]
pub struct GatewayTimeouts {
    /// TLS handshake; also how long a connection being closed may take to
    /// write its last frames to the peer (one that does not read is dropped).
    pub handshake: Duration,
    /// From handshake to the stream protocol's preface (an endpoint agent
    /// sends it at once); a connection that stays silent longer is closed.
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
    /// Tracks the flow tasks (shutdown waits for them).
    pub flows: TaskTracker,
    /// The data-plane threads: relayed tunnel connections of an
    /// outbound-only agent are spread over them (see `attach.rs`).
    pub shards: crate::shards::Shards,
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
    let here = ctx.shards.current();
    let loads: Vec<Gauge> = (0..ctx.shards.len()).map(|i| ctx.metrics.tunnel_connections_of(i)).collect();
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
        // The kernel picked this thread by a hash of the addresses: the connection goes to the
        // thread serving the fewest (this one on a tie), so one peer's connections spread over the
        // cores whatever their ports. Tunnel connections are few and long-lived; moving one costs
        // two epoll registrations.
        let thread = least_loaded(&loads, here);
        let counted = Counted::new(loads[thread].clone());
        let (ctx, acceptor, cancel) = (ctx.clone(), acceptor.clone(), shutdown.child_token());
        if thread == here {
            tracker.spawn(async move {
                handle(tcp, peer, acceptor, handshake, ctx, cancel).await;
                drop((permit, counted));
            });
            continue;
        }
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "could not hand a tunnel connection to another thread; closing it");
                continue;
            }
        };
        let shards = ctx.shards.clone();
        shards.spawn(thread, &tracker, async move {
            match TcpStream::from_std(tcp) {
                Ok(tcp) => handle(tcp, peer, acceptor, handshake, ctx, cancel).await,
                Err(e) => tracing::debug!(%peer, error = %e, "could not take over a tunnel connection; closing it"),
            }
            drop((permit, counted));
        });
    }
}

/// The thread serving the fewest tunnel connections, `here` among equals.
fn least_loaded(loads: &[Gauge], here: usize) -> usize {
    let mut best = here;
    for (thread, load) in loads.iter().enumerate() {
        if load.get() < loads[best].get() {
            best = thread;
        }
    }
    best
}

/// Counts a tunnel connection on its thread's gauge while it lives.
struct Counted(Gauge);

impl Counted {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
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

/// Serves one tunnel connection whose TCP (or relayed) stream is `io`: TLS
/// handshake (the gateway is the TLS server whichever side opened the
/// connection, so a relayed connection is served exactly like a direct
/// one), then the flows on it.
pub(crate) async fn serve_stream(
    io: ReadAhead,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    handshake_permit: OwnedSemaphorePermit,
    ctx: Arc<GatewayContext>,
    cancel: CancellationToken,
) {
    // Boxed: the handshake's state must not stay in this task's memory for the connection's life.
    let handshake = Box::pin(acceptor.accept(io));
    let tls = match tokio::time::timeout(ctx.timeouts.handshake, handshake).await {
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
    serve_tunnel(tls, peer, Arc::new(peer_id), ctx, cancel).await;
}

/// Serves the flows of one authenticated tunnel connection (any byte stream:
/// direct TLS, or TLS through a relay) until it closes, the peer is no longer
/// admitted, or `cancel`.
pub(crate) async fn serve_tunnel<S>(
    tunnel: S,
    peer: SocketAddr,
    peer_id: Arc<PeerIdentity>,
    ctx: Arc<GatewayContext>,
    cancel: CancellationToken,
) where
    S: AsyncBufRead + AsyncWrite + Unpin + Send,
{
    let mut config_rx = ctx.config.clone();
    // Resumed sessions skip the certificate verifier: admit again. The peer is
    // authenticated, so it is told why (its first open request gets this answer).
    let refused = admit_peer(&config_rx.borrow_and_update().gateway, &peer_id).err();
    let mut slot = match ctx.peers.enter(&peer_id.cert_sha256) {
        Ok(slot) => Some(slot),
        Err(limit) => {
            ctx.metrics.count_tunnel_refused(match limit {
                PeerLimit::Connections(_) | PeerLimit::Flows(_) => "peer_connections",
                PeerLimit::Pending(_) => "peer_pending",
            });
            tracing::debug!(%peer, agent = %peer_id.agent_id, reason = %limit, "closing tunnel connection");
            return;
        }
    };
    let conn = MuxConnection::new(Side::Gateway);
    let driver = crate::mux::run(conn.clone(), tunnel);
    tokio::pin!(driver);
    let accept = async {
        while let Some((stream, req)) = conn.accept().await {
            if let Some(slot) = slot.as_mut() {
                // The connection carries flows now: it no longer counts as waiting for one.
                slot.opened();
            }
            if let Some(denial) = &refused {
                ctx.metrics.count_tunnel_refused(refusal_label(denial));
                tracing::debug!(%peer, agent = %peer_id.agent_id, reason = %denial, "refusing a resumed tunnel session");
                stream.respond(&OpenResponse::new(OpenStatus::Denied, denial.to_string()));
                drop(stream);
                conn.close();
                return;
            }
            ctx.flows.spawn(serve_flow(stream, req, peer, peer_id.clone(), ctx.clone(), cancel.clone()));
        }
    };
    // A config that no longer admits the peer closes the connection (its open flows are
    // closed by their own checks, which say why in the access log).
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
    // An authenticated peer that does not speak (the version-2 preface) in time is closed.
    let open_request = ctx.timeouts.open_request;
    let silent = async {
        if tokio::time::timeout(open_request, conn.greeted()).await.is_ok() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = &mut driver => return,
        () = accept => {}
        () = silent => {
            ctx.metrics.count_tunnel_refused("open_request_timeout");
            tracing::debug!(%peer, "no stream protocol preface in time; closing tunnel connection");
            conn.close();
        }
        denial = peer_dropped => {
            ctx.metrics.count_tunnel_refused(refusal_label(&denial));
            tracing::debug!(%peer, agent = %peer_id.agent_id, reason = %denial, "closing tunnel connection of a peer no longer admitted");
            conn.close();
        }
        () = cancel.cancelled() => {
            conn.abort("the agent is shutting down");
            return;
        }
    }
    // Let the driver write what is queued (answers, resets) and close the stream, within a
    // deadline: a peer that stops reading must not keep the connection, its permit and its slot.
    tokio::select! {
        r = tokio::time::timeout(ctx.timeouts.handshake, &mut driver) => if r.is_err() {
            tracing::debug!(%peer, "tunnel peer did not read its last frames in time; dropping the connection");
            conn.abort("the peer did not read the connection's last frames in time");
        },
        () = cancel.cancelled() => conn.abort("the agent is shutting down"),
    }
    drop(slot);
}

/// One flow: authorize its open request against the current config, dial,
/// answer, splice, and close it as soon as its grant is gone.
///
/// In two stages, for memory: everything up to the answer (authorization,
/// the dial, refusals) runs in a boxed future that is freed once the flow is
/// open, so an open flow's task holds only what splicing and the revocation
/// check need (docs/performance.md, "Idle connections").
fn serve_flow(
    stream: MuxStream,
    req: OpenRequest,
    peer: SocketAddr,
    peer_id: Arc<PeerIdentity>,
    ctx: Arc<GatewayContext>,
    cancel: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let opening = Box::pin(open_flow(stream, req, peer, peer_id, ctx, cancel.clone()));
    async move {
        let Some((stream, target, flow, mut watch, hold)) = opening.await else { return };
        let mut revocation: Option<Denial> = None;
        let stop = async {
            tokio::select! {
                d = watch.revoked() => revocation = Some(d),
                () = cancel.cancelled() => {}
            }
        };
        let end = match target {
            Target::Plain(target) => splice_attached(target, stream, flow.counter_out(), flow.counter_in(), stop).await,
            // Rare (an owner's rate limit on this consumer): its copy loop's state is boxed.
            Target::Paced(paced) => {
                Box::pin(splice(stream, *paced, |n| flow.add_in(n), |n| flow.add_out(n), stop)).await
            }
        };
        drop(hold);
        match (end, revocation) {
            (SpliceEnd::Closed, _) => flow.finish("closed", None),
            (SpliceEnd::Error(e), _) => flow.finish("error", Some(e.to_string())),
            (SpliceEnd::Stopped, Some(d)) => {
                let req = &watch.req;
                tracing::info!(endpoint = %req.vpc_endpoint_id, resource = %req.resource_configuration_id, reason = %d, "closing revoked connection");
                flow.finish("revoked", Some(d.to_string()))
            }
            (SpliceEnd::Stopped, None) => flow.finish("shutdown", None),
        }
    }
}

/// What an open flow splices to: the target, or the target paced by the owner's limit on the consumer.
enum Target {
    Plain(TcpStream),
    Paced(Box<Paced<TcpStream>>),
}

/// What keeps an open flow authorized: its request and peer, re-checked against every new config.
struct GrantWatch {
    config_rx: watch::Receiver<Arc<AgentConfig>>,
    peer_id: Arc<PeerIdentity>,
    req: OpenRequest,
}

impl GrantWatch {
    /// Completes when a new config no longer grants the flow, with why.
    async fn revoked(&mut self) -> Denial {
        loop {
            if self.config_rx.changed().await.is_err() {
                // The config publisher is gone: the agent is shutting down, which `cancel` covers.
                std::future::pending::<()>().await;
            }
            if let Err(d) = recheck(&self.config_rx.borrow_and_update(), &self.peer_id, &self.req) {
                return d;
            }
        }
    }
}

/// What an open flow holds until it ends: its share of the connection budget, its
/// peer's and its consumer's, and (to a service) its hold on the target.
type FlowHold = (OwnedSemaphorePermit, PeerSlot, Option<ConsumerSlot>, Option<ActiveGuard>);

/// The first stage of [`serve_flow`]: everything up to the answer. A refused
/// flow is answered, counted and logged here (None); an opened one is
/// answered Ok and returned with what its second stage needs.
async fn open_flow(
    stream: MuxStream,
    req: OpenRequest,
    peer: SocketAddr,
    peer_id: Arc<PeerIdentity>,
    ctx: Arc<GatewayContext>,
    cancel: CancellationToken,
) -> Option<(MuxStream, Target, OpenFlow, GrantWatch, FlowHold)> {
    let started = SystemTime::now();
    let mut config_rx = ctx.config.clone();
    // Every flow holds one of the gateway's connection budget (it holds a socket to the
    // resource) and counts against its peer's share of it.
    let Ok(permit) = ctx.connections.clone().try_acquire_owned() else {
        ctx.metrics.count_tunnel_refused("connections");
        let message = "the gateway agent holds its most connections; try again later";
        stream.respond(&OpenResponse::new(OpenStatus::Unreachable, message));
        return None;
    };
    let peer_slot = match ctx.peers.enter_flow(&peer_id.cert_sha256) {
        Ok(slot) => slot,
        Err(limit) => {
            ctx.metrics.count_tunnel_refused("peer_connections");
            tracing::debug!(%peer, agent = %peer_id.agent_id, reason = %limit, "refusing a flow");
            stream.respond(&OpenResponse::new(OpenStatus::Denied, limit.to_string()));
            return None;
        }
    };
    let decision = authorize(&config_rx.borrow_and_update(), &peer_id, &req);
    let grant = match decision {
        Ok(g) => g,
        Err(denial) => {
            deny(&ctx, &req, &denial, started);
            stream.respond(&OpenResponse::new(OpenStatus::Denied, denial.to_string()));
            return None;
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
    // Logged before the answer, so an access log read after the refusal arrived holds it.
    let refuse = |info: &FlowInfo, status: OpenStatus, message: String| {
        reject(
            info,
            &info.labels(),
            &ctx.metrics,
            Some(&usage),
            &ctx.access_log,
            started,
            status.as_str(),
            Some(message.clone()),
        );
        stream.respond(&OpenResponse::new(status, message));
    };
    // The owner's limit on this consumer's connections, counted until the flow ends.
    let slot = match &grant.limits {
        Some(limits) => match ctx.consumers.enter(&req.resource_configuration_id, &grant.consumer_account_id, limits) {
            Ok(slot) => Some(slot),
            Err(too_many) => {
                ctx.metrics.count_limited(&req.resource_configuration_id, &grant.consumer_account_id, "connections");
                refuse(&info, OpenStatus::Denied, too_many.to_string());
                return None;
            }
        },
        None => None,
    };
    let dialed = tokio::select! {
        r = connect(&ctx, &config_rx, &grant.destination, req.client_addr) => r,
        () = cancel.cancelled() => return None,
    };
    let (mut target, described, on_target) = match dialed {
        Ok(t) => t,
        Err((status, message)) => {
            refuse(&info, status, message);
            return None;
        }
    };
    if let Some(described) = described {
        info.target = described;
    }
    if grant.proxy_protocol {
        let header = proxy_header(&req, &grant, &target);
        if let Err(e) = target.write_all(&header).await {
            refuse(
                &info,
                OpenStatus::Unreachable,
                format!("the target closed before the PROXY header was written: {e}"),
            );
            return None;
        }
    }
    stream.respond(&OpenResponse::new(OpenStatus::Ok, String::new()));
    let flow = OpenFlow::open(info, ctx.metrics.clone(), Some(usage), ctx.access_log.clone(), started);
    let target = match slot.as_ref().and_then(|s| s.pace.clone()) {
        Some(pace) => Target::Paced(Box::new(Paced::new(
            target,
            pace,
            ctx.metrics.clone(),
            &req.resource_configuration_id,
            &grant.consumer_account_id,
        ))),
        None => Target::Plain(target),
    };
    let watch = GrantWatch { config_rx, peer_id, req };
    Some((stream, target, flow, watch, (permit, peer_slot, slot, on_target)))
}

/// Connects to where `destination` says: the resource's target, or a healthy
/// target of the service picked by its balancer. Returns the stream, the
/// target picked for the access log (a service's; a resource's is known
/// before), and (for a service) the hold on the target that counts the
/// connection for least-connections.
async fn connect(
    ctx: &GatewayContext,
    config: &watch::Receiver<Arc<AgentConfig>>,
    destination: &Destination,
    client: SocketAddr,
) -> Result<(TcpStream, Option<String>, Option<ActiveGuard>), (OpenStatus, String)> {
    let status_of = |e: &DialError| match e {
        DialError::Timeout { .. } => OpenStatus::Timeout,
        DialError::Unreachable { .. } => OpenStatus::Unreachable,
    };
    match destination {
        Destination::Resource { target, port } => match dial(target, *port, ctx.timeouts.dial).await {
            Ok(stream) => Ok((stream, None, None)),
            Err(e) => Err((status_of(&e), e.to_string())),
        },
        Destination::Service { service_id, port } => {
            let service = config.borrow().gateway.services.iter().find(|s| &s.service_id == service_id).cloned();
            let Some(service) = service else {
                return Err((OpenStatus::Denied, format!("service {service_id} is not served by this gateway")));
            };
            match ctx.services.connect(&service, *port, client.ip(), ctx.timeouts.dial).await {
                Ok((stream, target, guard)) => Ok((stream, Some(target), Some(guard))),
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

/// TCP keepalive so dead peers of long-lived tunnels are noticed, and a user
/// timeout so a peer that stops acknowledging sent data (its host is gone, no
/// RST) fails the connection within [`USER_TIMEOUT`] (keepalive never probes
/// while data is unacknowledged).
pub(crate) fn set_keepalive(tcp: &TcpStream) {
    let ka = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(15));
    let sock = socket2::SockRef::from(tcp);
    let _ = sock.set_tcp_keepalive(&ka);
    set_user_timeout(&sock);
}

/// How long sent data may stay unacknowledged before a tunnel or relay connection fails.
pub(crate) const USER_TIMEOUT: Duration = Duration::from_secs(10);

/// `TCP_USER_TIMEOUT` of [`USER_TIMEOUT`] (Linux; elsewhere nothing).
pub(crate) fn set_user_timeout(sock: &socket2::SockRef<'_>) {
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let _ = sock.set_tcp_user_timeout(Some(USER_TIMEOUT));
    #[cfg(not(any(target_os = "android", target_os = "fuchsia", target_os = "linux")))]
    let _ = sock;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use trellis_proto::mux;

    #[tokio::test]
    async fn an_open_flows_task_holds_only_what_splicing_needs() {
        // A real flow: an endpoint-side connection opens it, the gateway side accepts it.
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (ep, gw) = (MuxConnection::new(Side::Endpoint), MuxConnection::new(Side::Gateway));
        tokio::spawn(crate::mux::run(ep.clone(), tokio::io::BufReader::new(a)));
        tokio::spawn(crate::mux::run(gw.clone(), tokio::io::BufReader::new(b)));
        let req = OpenRequest {
            vpc_endpoint_id: "vpce-00000000000000001".into(),
            resource_configuration_id: "rcfg-00000000000000001".into(),
            port: 80,
            client_addr: "127.0.0.1:9".parse().unwrap(),
        };
        let _opened = ep.open(&req).unwrap();
        let (stream, req) = gw.accept().await.unwrap();
        let ctx = context(crate::shards::Shards::inline(), GatewayTimeouts::default().handshake);
        let peer_id = Arc::new(PeerIdentity {
            agent_id: "agent-0000000000000000c".into(),
            account_id: "acct-000000000009".into(),
            vpc_id: "vpc-00000000000000009".into(),
            cert_sha256: "ab".repeat(32),
        });
        let task = serve_flow(stream, req, "127.0.0.1:9".parse().unwrap(), peer_id, ctx, CancellationToken::new());
        // Every idle proxied connection holds one of these for its whole life (1,408 bytes
        // now; 2,384 when the authorization and dial stayed in it: docs/performance.md).
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1_536, "an open flow's task is {size} bytes");
    }

    fn context(shards: crate::shards::Shards, handshake: Duration) -> Arc<GatewayContext> {
        let (_config_tx, config) = watch::channel(Arc::new(AgentConfig::default()));
        Arc::new(GatewayContext {
            config,
            metrics: Arc::new(Metrics::new()),
            usage: Arc::default(),
            access_log: AccessLog::disabled(),
            timeouts: GatewayTimeouts { handshake, ..GatewayTimeouts::default() },
            connections: Arc::new(Semaphore::new(16)),
            handshakes: Arc::new(Semaphore::new(16)),
            peers: Arc::new(PeerTable::new(4, 4)),
            services: Arc::default(),
            consumers: Arc::default(),
            flows: TaskTracker::new(),
            shards,
        })
    }

    #[tokio::test]
    async fn tunnel_connections_are_served_by_the_thread_with_the_fewest_whatever_the_kernel_picked() {
        let shards = crate::shards::Shards::start(2).unwrap();
        let ctx = context(shards.clone(), Duration::from_secs(30));
        let listeners = crate::shards::bind_listeners("127.0.0.1:0".parse().unwrap(), 2, true).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let id = crate::testing::TestCa::new().issue(
            "agent-0000000000000000a",
            "acct-000000000001",
            "vpc-00000000000000001",
        );
        let tls = crate::tls::tunnel_server_config(&id, Arc::new(crate::tls::AnyAgent)).unwrap();
        for (index, listener) in listeners.into_iter().enumerate() {
            let (tls, ctx, tracker2, shutdown) = (tls.clone(), ctx.clone(), tracker.clone(), shutdown.clone());
            shards.spawn(index, &tracker, async move {
                serve(TcpListener::from_std(listener).unwrap(), tls, ctx, tracker2, shutdown).await;
            });
        }
        let loads =
            |ctx: &GatewayContext| -> Vec<i64> { (0..2).map(|i| ctx.metrics.tunnel_connections_of(i).get()).collect() };
        // Connections that never start their handshake stay counted until its deadline.
        let mut held = Vec::new();
        for n in 1..=6 {
            held.push(TcpStream::connect(addr).await.unwrap());
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while loads(&ctx).iter().sum::<i64>() < n {
                assert!(tokio::time::Instant::now() < deadline, "connection {n} was not counted: {:?}", loads(&ctx));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        assert_eq!(loads(&ctx), vec![3, 3], "each thread serves half");
        assert!(ctx.metrics.encode().contains("trellis_tunnel_connections{thread=\"1\"} 3"));
        drop(held);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while loads(&ctx) != vec![0, 0] {
            assert!(tokio::time::Instant::now() < deadline, "closed connections stay counted: {:?}", loads(&ctx));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        shards.stop().await;
    }

    #[tokio::test]
    async fn a_refused_peer_that_stops_reading_loses_its_connection_and_slot_by_the_deadline() {
        // No consumers: the peer (as after a resumed TLS session) is no longer admitted.
        let ctx = context(crate::shards::Shards::inline(), Duration::from_millis(300));
        let peer_id = Arc::new(PeerIdentity {
            agent_id: "agent-0000000000000000c".into(),
            account_id: "acct-000000000009".into(),
            vpc_id: "vpc-00000000000000009".into(),
            cert_sha256: "ab".repeat(32),
        });
        // A pipe too small for the gateway's preface and refusal, which the peer never reads.
        let (mut raw, io) = tokio::io::duplex(16);
        let served = tokio::spawn(serve_tunnel(
            tokio::io::BufReader::new(io),
            "127.0.0.1:9".parse().unwrap(),
            peer_id.clone(),
            ctx.clone(),
            CancellationToken::new(),
        ));
        let mut frames = mux::PREFACE.to_vec();
        let req = OpenRequest {
            vpc_endpoint_id: "vpce-00000000000000001".into(),
            resource_configuration_id: "rcfg-00000000000000001".into(),
            port: 80,
            client_addr: "127.0.0.1:9".parse().unwrap(),
        };
        mux::encode_open(1, &req, &mut frames).unwrap();
        raw.write_all(&frames).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the connection of a peer that does not read was kept past the deadline")
            .unwrap();
        assert_eq!(ctx.peers.held(&peer_id.cert_sha256), (0, 0), "the peer's slot was not released");
        drop(raw);
    }
}
