//! The relay's listener: where outbound-only gateway agents attach and
//! endpoint agents connect to them.
//!
//! Per connection: mutual TLS 1.3 (a CA-signed agent certificate that is not
//! revoked, else the handshake fails), one hello within a deadline (a
//! malformed or oversized one is answered `bad_request` and closes that
//! connection only), then:
//! - `Attach`: the peer must be a gateway agent of the relay's config (agent,
//!   account and VPC as its certificate names them); the connection is kept
//!   as an idle attachment (bounded per gateway) until a flow claims it, the
//!   peer goes away, or the config stops serving it.
//! - `Connect {gateway}`: the gateway must be one the relay serves; the relay
//!   takes an idle attachment of it (waiting a bounded time for one), tells
//!   the gateway a flow arrives, and once it accepts answers the endpoint
//!   `ok`; both sides then leave the outer TLS and the relay copies the
//!   agents' end-to-end TLS both ways, half-close preserved.
//!
//! The relay never decrypts a relayed byte: it holds no key of the agents'
//! sessions. It never opens anything itself and never relays toward an
//! agent that did not attach.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_proto::RelayConfig;
use trellis_proto::relay::{Answer, Hello, RelayStatus, decode_accept, decode_hello, encode_answer, encode_flow};

use super::attachments::{Attachments, Claim, NoAttachment, RawStream, Taken};
use super::metrics::RelayMetrics;
use crate::access_log::{AccessLog, millis, rfc3339};
use crate::gateway::admission::{PeerLimit, PeerTable};
use crate::read_ahead::ReadAhead;
use crate::relay_wire::{RecordBounded, WireError, leave_server_tls, receive, send};
use crate::splice::{SpliceEnd, splice};
use crate::tls::{PeerAdmission, PeerIdentity, Refusal, peer_identity};

/// Deadlines and bounds of the relay.
#[derive(Clone, Copy, Debug)]
pub struct RelaySettings {
    /// TLS handshake.
    pub handshake: Duration,
    /// From handshake to hello.
    pub hello: Duration,
    /// How long a `Connect` waits for an idle attachment of its gateway.
    pub connect_wait: Duration,
    /// How long an attached gateway has to accept a flow.
    pub accept: Duration,
    /// Idle attachments kept per gateway agent.
    pub attachments_per_gateway: usize,
    /// `Connect`s waiting for an attachment at once.
    pub waiting_connects: usize,
    /// Of those, from one agent (by agent id): the rest is kept for the others.
    pub connects_per_peer: usize,
    /// `Connect`s of one agent at once, waiting or relaying: what one agent
    /// (of any account) may take of the relay's connections and of the
    /// attachments of the gateway agents it serves.
    pub flows_per_peer: usize,
    /// Agent connections at once (attachments, relayed flows' two sides, handshakes).
    pub connections: usize,
    /// Of those, still in the TLS handshake or before their hello.
    pub handshakes: usize,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            hello: Duration::from_secs(5),
            connect_wait: Duration::from_secs(2),
            accept: Duration::from_secs(3),
            attachments_per_gateway: 64,
            waiting_connects: 1024,
            connects_per_peer: 64,
            flows_per_peer: 512,
            connections: 4096,
            handshakes: 1024,
        }
    }
}

impl RelaySettings {
    /// Connection budgets from the process's open-files limit (the rest of the settings as default).
    /// One agent may have a sixteenth of the waiting connects and a quarter
    /// of the relayed flows (each takes two connections).
    pub fn from_open_files(open_files: u64) -> Self {
        // Relayed connections come in pairs: T of them, 2 T descriptors, every usable one.
        let pairs = crate::limits::usable_files(open_files) / 2;
        let handshakes = (pairs / 4).max(8);
        Self {
            connections: pairs * 2,
            handshakes,
            waiting_connects: handshakes,
            connects_per_peer: (handshakes / 16).max(8),
            flows_per_peer: (pairs / 4).max(16),
            ..Self::default()
        }
    }
}

/// Everything a relay connection needs, shared by all of them.
pub struct RelayContext {
    pub relay_id: String,
    pub config: watch::Receiver<Arc<RelayConfig>>,
    pub metrics: Arc<RelayMetrics>,
    pub attachments: Arc<Attachments>,
    pub access_log: AccessLog,
    pub settings: RelaySettings,
    pub connections: Arc<Semaphore>,
    pub handshakes: Arc<Semaphore>,
    pub waiting: Arc<Semaphore>,
    /// Connects per agent, waiting and relaying (`connects_per_peer`, `flows_per_peer`).
    pub peers: Arc<PeerTable>,
}

/// The relay's TLS admission: any agent certificate the CA signed, unless revoked.
#[derive(Debug)]
pub struct RelayAdmission {
    pub config: watch::Receiver<Arc<RelayConfig>>,
}

impl PeerAdmission for RelayAdmission {
    fn admit(&self, peer: &PeerIdentity) -> Result<(), Refusal> {
        if is_revoked(&self.config.borrow(), &peer.cert_sha256) { Err(Refusal::Revoked) } else { Ok(()) }
    }
}

fn is_revoked(config: &RelayConfig, cert_sha256: &str) -> bool {
    config.is_revoked(cert_sha256)
}

/// Whether `config` lets `peer` attach as a gateway.
fn serves_gateway(config: &RelayConfig, peer: &PeerIdentity) -> bool {
    config.gateway(&peer.agent_id).is_some_and(|g| g.account_id == peer.account_id && g.vpc_id == peer.vpc_id)
        && !is_revoked(config, &peer.cert_sha256)
}

/// Accepts agent connections on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ctx: Arc<RelayContext>,
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
                    tracing::warn!(error = %e, "relay accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let Ok(handshake) = ctx.handshakes.clone().try_acquire_owned() else {
            ctx.metrics.count_refusal("handshake_budget");
            continue;
        };
        let (ctx, acceptor, cancel) = (ctx.clone(), acceptor.clone(), shutdown.child_token());
        tracker.spawn(async move {
            ctx.metrics.connections.inc();
            handle(tcp, peer, acceptor, handshake, &ctx, cancel).await;
            ctx.metrics.connections.dec();
            drop(permit);
        });
    }
}

type Outer = TlsStream<RecordBounded<ReadAhead>>;

async fn handle(
    tcp: TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    handshake_permit: OwnedSemaphorePermit,
    ctx: &RelayContext,
    cancel: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    set_attachment_keepalive(&tcp);
    let accept = Box::pin(acceptor.accept(RecordBounded::new(ReadAhead::new(tcp))));
    let mut tls = match tokio::time::timeout(ctx.settings.handshake, accept).await {
        Ok(Ok(tls)) => Box::new(tls),
        Ok(Err(e)) => {
            ctx.metrics.count_refusal("handshake_failed");
            tracing::debug!(%addr, error = %e, "relay TLS handshake failed");
            return;
        }
        Err(_) => {
            ctx.metrics.count_refusal("handshake_timeout");
            return;
        }
    };
    let Some(peer) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(peer_identity) else {
        ctx.metrics.count_refusal("not_an_agent");
        return;
    };
    // Resumed sessions skip the certificate verifier: check revocation again.
    if is_revoked(&ctx.config.borrow(), &peer.cert_sha256) {
        ctx.metrics.count_refusal("revoked_certificate");
        return;
    }
    let hello = match tokio::time::timeout(ctx.settings.hello, receive(&mut *tls, decode_hello)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(e @ (WireError::Protocol(_) | WireError::Trailing(_)))) => {
            ctx.metrics.count_refusal("bad_hello");
            tracing::info!(%addr, agent = %peer.agent_id, error = %e, "malformed relay hello; closing this connection");
            answer(&mut tls, RelayStatus::BadRequest, e.to_string()).await;
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%addr, agent = %peer.agent_id, error = %e, "relay connection ended before its hello");
            return;
        }
        Err(_) => {
            ctx.metrics.count_refusal("hello_timeout");
            return;
        }
    };
    drop(handshake_permit);
    match hello {
        Hello::Attach => attach(tls, peer, addr, ctx, cancel).await,
        Hello::Connect { gateway_agent_id } => connect(tls, peer, addr, gateway_agent_id, ctx, cancel).await,
    }
}

/// Sends an answer; false when the peer is gone.
async fn answer(tls: &mut Outer, status: RelayStatus, message: String) -> bool {
    let mut out = Vec::new();
    encode_answer(&Answer::new(status, message), &mut out);
    send(tls, &out).await.is_ok()
}

/// Keeps an attachment until a flow claims it or it ends.
async fn attach(
    mut tls: Box<Outer>,
    peer: PeerIdentity,
    addr: SocketAddr,
    ctx: &RelayContext,
    cancel: CancellationToken,
) {
    if !serves_gateway(&ctx.config.borrow(), &peer) {
        ctx.metrics.count_refusal("attach_not_served");
        let message = format!(
            "relay {} does not serve gateway agent {} (account {}, VPC {}); only the gateway agents of its config may attach",
            ctx.relay_id, peer.agent_id, peer.account_id, peer.vpc_id
        );
        tracing::info!(%addr, agent = %peer.agent_id, "refusing an attach from an agent this relay does not serve");
        answer(&mut tls, RelayStatus::NotServed, message).await;
        return;
    }
    let (id, mut claim_rx) = match ctx.attachments.add(&peer.agent_id) {
        Ok(x) => x,
        Err(too_many) => {
            ctx.metrics.count_refusal("attachments_per_gateway");
            answer(&mut tls, RelayStatus::Busy, too_many.to_string()).await;
            return;
        }
    };
    if !answer(&mut tls, RelayStatus::Ok, String::new()).await {
        ctx.attachments.remove(&peer.agent_id, id);
        return;
    }
    tracing::debug!(%addr, gateway = %peer.agent_id, "gateway agent attached");
    let mut config_rx = ctx.config.clone();
    let mut probe = [0u8; 1];
    loop {
        tokio::select! {
            claim = &mut claim_rx => {
                // Err: the table dropped the entry (the relay is stopping).
                if let Ok(claim) = claim {
                    pair_attachment(tls, claim, &peer, ctx).await;
                }
                return;
            }
            r = tls.read(&mut probe) => {
                // An attached gateway sends nothing until a flow arrives: this is its end (or a violation).
                if let Ok(1..) = r {
                    tracing::info!(%addr, gateway = %peer.agent_id, "an attached gateway sent bytes before a flow; closing it");
                }
                ctx.attachments.remove(&peer.agent_id, id);
                return;
            }
            r = config_rx.changed() => {
                if r.is_err() || !serves_gateway(&config_rx.borrow_and_update(), &peer) {
                    ctx.attachments.remove(&peer.agent_id, id);
                    tracing::info!(gateway = %peer.agent_id, "closing an attachment: the relay no longer serves this gateway agent");
                    return;
                }
            }
            () = cancel.cancelled() => {
                ctx.attachments.remove(&peer.agent_id, id);
                return;
            }
        }
    }
}

/// Tells the attached gateway a flow arrives, waits for its accept, hands the raw stream to the flow.
async fn pair_attachment(mut tls: Box<Outer>, claim: Claim, peer: &PeerIdentity, ctx: &RelayContext) {
    let mut frame = Vec::new();
    if let Err(e) = encode_flow(&claim.from_agent_id, &mut frame) {
        let _ = claim.reply.send(Err(e.to_string()));
        return;
    }
    let exchange = async {
        send(&mut *tls, &frame).await?;
        receive(&mut *tls, decode_accept).await
    };
    let result = match tokio::time::timeout(ctx.settings.accept, exchange).await {
        Ok(Ok(())) => leave_server_tls(*tls).map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(format!("gateway agent {} did not accept: {e}", peer.agent_id)),
        Err(_) => Err(format!("gateway agent {} did not accept within {:?}", peer.agent_id, ctx.settings.accept)),
    };
    let _ = claim.reply.send(result);
}

/// One relayed flow's access-log line: who, to whom, bytes, time, outcome. Never payload.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RelayRecord<'a> {
    start: String,
    end: String,
    role: &'static str,
    relay_id: &'a str,
    from_agent_id: &'a str,
    from_account_id: &'a str,
    from_vpc_id: &'a str,
    from_addr: String,
    gateway_agent_id: &'a str,
    /// Bytes from the endpoint agent toward the gateway agent (ciphertext).
    bytes_to_gateway: u64,
    /// Bytes from the gateway agent toward the endpoint agent (ciphertext).
    bytes_to_endpoint: u64,
    duration_ms: u64,
    outcome: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

struct FlowLog<'a> {
    ctx: &'a RelayContext,
    peer: &'a PeerIdentity,
    addr: SocketAddr,
    gateway: &'a str,
    started: SystemTime,
}

impl FlowLog<'_> {
    fn write(&self, up: u64, down: u64, outcome: &str, message: Option<String>) {
        let end = SystemTime::now();
        self.ctx.metrics.count_flow(outcome);
        self.ctx.access_log.write_json(&RelayRecord {
            start: rfc3339(self.started),
            end: rfc3339(end),
            role: "relay",
            relay_id: &self.ctx.relay_id,
            from_agent_id: &self.peer.agent_id,
            from_account_id: &self.peer.account_id,
            from_vpc_id: &self.peer.vpc_id,
            from_addr: self.addr.to_string(),
            gateway_agent_id: self.gateway,
            bytes_to_gateway: up,
            bytes_to_endpoint: down,
            duration_ms: millis(end.duration_since(self.started).unwrap_or_default()),
            outcome,
            message,
        });
    }
}

async fn connect(
    mut tls: Box<Outer>,
    peer: PeerIdentity,
    addr: SocketAddr,
    gateway: String,
    ctx: &RelayContext,
    cancel: CancellationToken,
) {
    let log = FlowLog { ctx, peer: &peer, addr, gateway: &gateway, started: SystemTime::now() };
    let served = ctx.config.borrow().gateway(&gateway).is_some();
    if !served || gateway == peer.agent_id {
        let message = format!("relay {} does not serve gateway agent {gateway}", ctx.relay_id);
        log.write(0, 0, RelayStatus::NotServed.as_str(), Some(message.clone()));
        answer(&mut tls, RelayStatus::NotServed, message).await;
        return;
    }
    // Per agent first: one agent over its share never takes what others need.
    let mut peer_slot = match ctx.peers.enter(&peer.agent_id) {
        Ok(slot) => slot,
        Err(limit) => {
            let (reason, message) = match limit {
                PeerLimit::Pending(n) => (
                    "peer_connects",
                    format!(
                        "relay {} already has {n} connects of agent {} waiting for an attachment, the most one agent may have (connects_per_peer)",
                        ctx.relay_id, peer.agent_id
                    ),
                ),
                PeerLimit::Connections(n) | PeerLimit::Flows(n) => (
                    "peer_flows",
                    format!(
                        "relay {} already carries {n} connects of agent {} (waiting or relaying), the most one agent may have (flows_per_peer)",
                        ctx.relay_id, peer.agent_id
                    ),
                ),
            };
            ctx.metrics.count_refusal(reason);
            log.write(0, 0, RelayStatus::Busy.as_str(), Some(message.clone()));
            answer(&mut tls, RelayStatus::Busy, message).await;
            return;
        }
    };
    let Ok(waiting) = ctx.waiting.clone().try_acquire_owned() else {
        let message = format!("relay {} has too many connects waiting for attachments", ctx.relay_id);
        log.write(0, 0, RelayStatus::Busy.as_str(), Some(message.clone()));
        answer(&mut tls, RelayStatus::Busy, message).await;
        return;
    };
    let paired = tokio::select! {
        p = take_attachment(ctx, &gateway, &peer.agent_id) => p,
        () = cancel.cancelled() => return,
    };
    drop(waiting);
    let Some(gateway_stream) = paired else {
        let message = format!(
            "gateway agent {gateway} has no free attachment on relay {} (it is not connected to this relay, or all its attachments are busy)",
            ctx.relay_id
        );
        log.write(0, 0, RelayStatus::Unavailable.as_str(), Some(message.clone()));
        answer(&mut tls, RelayStatus::Unavailable, message).await;
        return;
    };
    // Paired: no longer waiting, still counted (until the flow ends) against `flows_per_peer`.
    peer_slot.opened();
    if !answer(&mut tls, RelayStatus::Ok, String::new()).await {
        log.write(0, 0, "error", Some("the endpoint agent left before the pipe started".into()));
        return;
    }
    let endpoint_stream = match leave_server_tls(*tls) {
        Ok(s) => s,
        Err(e) => {
            log.write(0, 0, "error", Some(e.to_string()));
            return;
        }
    };
    relay_flow(endpoint_stream, gateway_stream, &log, cancel).await;
}

/// Takes an idle attachment of `gateway` and pairs it. When all of them are
/// being paired (busy), waits up to `connect_wait` for the next one; when the
/// gateway agent has no attachment here at all, gives up at once (the
/// endpoint agent tries its next relay without waiting).
async fn take_attachment(ctx: &RelayContext, gateway: &str, from: &str) -> Option<RawStream> {
    let deadline = Instant::now() + ctx.settings.connect_wait;
    let mut first = true;
    loop {
        let arrived = match ctx.attachments.take(gateway) {
            Ok(taken) => {
                if let Some(stream) = claim_one(ctx, taken, from, deadline).await {
                    return Some(stream);
                }
                continue;
            }
            Err(NoAttachment::None(_)) if first => return None,
            Err(NoAttachment::Busy(arrived) | NoAttachment::None(arrived)) => arrived,
        };
        first = false;
        let notified = arrived.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // An attachment may have arrived between the take and the registration.
        if let Ok(taken) = ctx.attachments.take(gateway) {
            if let Some(stream) = claim_one(ctx, taken, from, deadline).await {
                return Some(stream);
            }
            continue;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return None;
        }
    }
}

/// Pairs the flow with a taken attachment (which counts as pairing until this returns).
async fn claim_one(ctx: &RelayContext, mut taken: Taken<'_>, from: &str, deadline: Instant) -> Option<RawStream> {
    let (reply, answer) = oneshot::channel();
    if !taken.send(Claim { from_agent_id: from.to_string(), reply }) {
        return None;
    }
    // The gateway has its own accept deadline; past ours the flow gives up on this one.
    let wait = (deadline + ctx.settings.accept).saturating_duration_since(Instant::now());
    match tokio::time::timeout(wait, answer).await {
        Ok(Ok(Ok(stream))) => Some(stream),
        Ok(Ok(Err(reason))) => {
            tracing::debug!(reason, "an attachment failed to pair; trying another");
            None
        }
        _ => None,
    }
}

/// Copies the agents' end-to-end TLS both ways until both sides finish, one
/// fails, the config stops serving the gateway or revokes the endpoint's
/// certificate, or the relay stops.
async fn relay_flow(endpoint: RawStream, gateway: RawStream, log: &FlowLog<'_>, cancel: CancellationToken) {
    let ctx = log.ctx;
    ctx.metrics.active_flows.inc();
    let up = std::sync::atomic::AtomicU64::new(0);
    let down = std::sync::atomic::AtomicU64::new(0);
    let mut config_rx = ctx.config.clone();
    let mut why: Option<&'static str> = None;
    let stop = async {
        loop {
            tokio::select! {
                r = config_rx.changed() => {
                    if r.is_err() {
                        std::future::pending::<()>().await;
                    }
                    let config = config_rx.borrow_and_update();
                    if config.gateway(log.gateway).is_none() || is_revoked(&config, &log.peer.cert_sha256) {
                        why = Some("revoked");
                        return;
                    }
                }
                () = cancel.cancelled() => {
                    why = Some("shutdown");
                    return;
                }
            }
        }
    };
    let metrics = &ctx.metrics;
    let to_gateway = |n: u64| {
        up.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        metrics.bytes_to_gateway.inc_by(n);
    };
    let to_endpoint = |n: u64| {
        down.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        metrics.bytes_to_endpoint.inc_by(n);
    };
    let end = splice(endpoint, gateway, to_gateway, to_endpoint, stop).await;
    ctx.metrics.active_flows.dec();
    let (up, down) = (up.into_inner(), down.into_inner());
    match end {
        SpliceEnd::Closed => log.write(up, down, "closed", None),
        SpliceEnd::Error(e) => log.write(up, down, "error", Some(e.to_string())),
        SpliceEnd::Stopped => log.write(up, down, why.unwrap_or("shutdown"), None),
    }
}

/// TCP keepalive for connections that idle for long (attachments behind NATs):
/// probes after 20 s of silence, every 5 s; and the user timeout of tunnel
/// connections, so a relayed connection whose peer stops acknowledging sent
/// data (host gone, no RST) fails within 10 s instead of the kernel's
/// retransmission minutes (keepalive never probes while data is unacknowledged).
pub(crate) fn set_attachment_keepalive(tcp: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(20))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let sock = socket2::SockRef::from(tcp);
    let _ = sock.set_tcp_keepalive(&ka);
    crate::gateway::listener::set_user_timeout(&sock);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn relayed_and_tunnel_sockets_fail_when_data_stays_unacknowledged() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        set_attachment_keepalive(&tcp);
        let sock = socket2::SockRef::from(&tcp);
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(Duration::from_secs(10)));
        assert!(sock.keepalive().unwrap());
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        crate::gateway::listener::set_keepalive(&tcp);
        let sock = socket2::SockRef::from(&tcp);
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(Duration::from_secs(10)));
        assert!(sock.keepalive().unwrap());
    }
}
