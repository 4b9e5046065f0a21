//! One client connection on an endpoint address: pick a gateway agent (own
//! zone first, the least loaded of those that answer, others on failure; see
//! `health.rs`), open a flow on a tunnel connection to it (an OPEN frame),
//! wait for its answer, then splice the client with the flow. A gateway that does not answer is marked down, so the next flows
//! skip it without paying the timeout again; when every gateway is down they
//! are all tried at once. A refused open resets the client connection, so the
//! client sees a failure instead of an empty, clean close.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use trellis_proto::stream::{OpenRequest, OpenResponse, OpenStatus};
use trellis_proto::{AgentConfig, GatewayTarget};

use super::health::FlowCount;
use super::pool::{GatewayKey, GatewayPools, Opened};
use crate::access_log::AccessLog;
use crate::flow::{FlowInfo, OpenFlow, reject_after_tries};
use crate::metrics::{Metrics, Role};
use crate::mux::MuxStream;
use crate::splice::{SpliceEnd, splice_attached};

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
    Gateway {
        gateway: String,
        reason: String,
        /// The gateway did not answer at all (timeout, refused): mark it down.
        silent: bool,
    },
    /// The gateway answered with a refusal.
    #[error("gateway agent {gateway} answered {}: {}", .response.status, .response.message)]
    Refused { gateway: String, response: OpenResponse },
    /// Every gateway agent was marked down; all were tried at once and none opened.
    #[error(
        "every gateway agent of this resource was marked down after failing to answer; tried all {} at once: {}",
        .tried.len(), .tried.join("; ")
    )]
    AllDown { tried: Vec<String> },
}

/// `agent-… (host:port)`: how logs name a gateway agent (`via relays` for an outbound-only one).
fn name(gateway: &GatewayTarget) -> String {
    format!("{} ({})", gateway.agent_id, where_is(gateway))
}

/// A gateway agent's address, or `via relays` when it has none.
fn where_is(gateway: &GatewayTarget) -> &str {
    if gateway.address.is_empty() { "via relays" } else { &gateway.address }
}

/// What the access log says about one failed attempt.
fn attempt_note(gateway: &GatewayTarget, e: &OpenError) -> String {
    let what = match e {
        OpenError::Gateway { reason, .. } => reason.clone(),
        OpenError::Refused { response, .. } => format!("answered {}: {}", response.status, response.message),
        OpenError::AllDown { .. } => e.to_string(),
    };
    format!("tried {}: {what}", name(gateway))
}

/// Serves one accepted client until it closes or `cancel` fires.
///
/// In two stages, for memory: choosing a gateway and opening the flow run in
/// a boxed future that is freed once the flow is open, so an open flow's
/// task holds only what splicing needs (docs/performance.md, "Idle connections").
/// `req` is what the flow will ask the gateway for: the endpoint and
/// resource the client's listener serves, the port it connected to and its
/// address.
pub fn serve_client(
    client: TcpStream,
    req: OpenRequest,
    ctx: Arc<EndpointContext>,
    cancel: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let opening = Box::pin(open_client_flow(client, req, ctx, cancel.clone()));
    async move {
        let Some((client, tunnel, flow, _slot)) = opening.await else { return };
        let end = splice_attached(client, tunnel, flow.counter_in(), flow.counter_out(), cancel.cancelled()).await;
        match end {
            SpliceEnd::Closed => flow.finish("closed", None),
            SpliceEnd::Error(e) => flow.finish("error", Some(e.to_string())),
            SpliceEnd::Stopped => {
                flow.finish("revoked", Some("the endpoint listener was removed or the agent stopped".into()))
            }
        }
    }
}

/// The first stage of [`serve_client`]: picks a gateway agent and opens a
/// flow through it. A client nothing opened for is reset, counted and logged
/// here (None).
async fn open_client_flow(
    client: TcpStream,
    req: OpenRequest,
    ctx: Arc<EndpointContext>,
    cancel: CancellationToken,
) -> Option<(TcpStream, MuxStream, OpenFlow, FlowCount)> {
    let started = SystemTime::now();
    let client_addr = req.client_addr;
    let config = ctx.config.borrow().clone();
    let gateways: Vec<GatewayTarget> = config
        .endpoints
        .iter()
        .filter(|e| e.vpc_endpoint_id == req.vpc_endpoint_id)
        .flat_map(|e| e.resources.iter())
        .filter(|r| r.resource_configuration_id == req.resource_configuration_id)
        .flat_map(|r| r.gateways.iter().cloned())
        .collect();
    let plan = ctx.pools.plan(&gateways, &config.zone);
    let mut info = FlowInfo {
        role: Role::Endpoint,
        vpc_endpoint_id: req.vpc_endpoint_id.clone(),
        resource_configuration_id: req.resource_configuration_id.clone(),
        consumer_account_id: config.account_id.clone(),
        client_addr: client_addr.to_string(),
        target: String::new(),
    };
    let mut last: Option<OpenError> = None;
    let mut opened = None;
    let mut tried: Vec<String> = Vec::new();
    let mut final_answer = false;
    for gateway in &plan.tries {
        let attempt = tokio::select! {
            r = open(&ctx, gateway, &req) => r,
            () = cancel.cancelled() => return None,
        };
        match attempt {
            Ok(x) => {
                opened = Some((*gateway, x));
                break;
            }
            Err(e) => {
                tracing::debug!(error = %e, "open through gateway agent failed");
                if let OpenError::Gateway { reason, silent: true, .. } = &e {
                    ctx.pools.mark_down(&GatewayKey::from(*gateway), reason);
                }
                tried.push(attempt_note(gateway, &e));
                // Denied and BadRequest are the same answer from any gateway: stop there.
                final_answer = matches!(
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
    if opened.is_none() && !final_answer && !plan.down.is_empty() {
        // Only gateways marked down are left: a memory must not turn a recovered
        // network into an outage, so try them all at once (one timeout, not one each).
        let attempt = tokio::select! {
            r = Box::pin(open_any(&ctx, &plan.down, &req, &mut tried)) => r,
            () = cancel.cancelled() => return None,
        };
        match attempt {
            Ok((gateway, x)) => opened = Some((gateway, x)),
            Err(e) => last = Some(e),
        }
    } else {
        for gateway in &plan.down {
            ctx.pools.count_skipped(&GatewayKey::from(*gateway));
        }
    }
    let Some((gateway, tunnel)) = opened else {
        let (outcome, message) = match &last {
            Some(OpenError::Refused { response, .. }) => {
                (response.status.as_str(), last.as_ref().map(|e| e.to_string()))
            }
            Some(e) => ("unreachable", Some(e.to_string())),
            None => ("unreachable", Some("no gateway agent serves this resource".to_string())),
        };
        tracing::info!(endpoint = %req.vpc_endpoint_id, resource = %req.resource_configuration_id, client = %client_addr, outcome, message = message.as_deref().unwrap_or(""), "refusing client connection");
        reject_after_tries(
            &info,
            &info.labels(),
            &ctx.metrics,
            None,
            &ctx.access_log,
            started,
            outcome,
            message,
            tried,
        );
        // Reset rather than close cleanly: the client must see that nothing answered.
        let _ = client.set_zero_linger();
        drop(client);
        return None;
    };
    if !tried.is_empty() {
        tracing::info!(endpoint = %req.vpc_endpoint_id, client = %client_addr, gateway = %gateway.agent_id, tried = %tried.join("; "), "flow failed over");
    }
    info.target = if gateway.address.is_empty() { name(gateway) } else { gateway.address.clone() };
    let slot = ctx.pools.open_flow(&GatewayKey::from(gateway));
    let flow = OpenFlow::open(info, ctx.metrics.clone(), None, ctx.access_log.clone(), started).with_tried(tried);
    Some((client, tunnel, flow, slot))
}

/// Opens a flow through one gateway agent. A flow opened on a connection
/// that turns out dead is opened once more on a fresh connection (nothing
/// reached the resource yet).
async fn open(ctx: &EndpointContext, gateway: &GatewayTarget, req: &OpenRequest) -> Result<MuxStream, OpenError> {
    let key = GatewayKey::from(gateway);
    let opened = ctx.pools.open(&key, req).await.map_err(|e| connect_failed(gateway, &e))?;
    let reused = opened.reused;
    match exchange(ctx, gateway, &key, opened).await {
        Err(ExchangeError::Dead(reason)) if reused => {
            tracing::debug!(gateway = %gateway.address, reason, "tunnel connection was dead; reconnecting");
            let opened = ctx.pools.open_fresh(&key, req).await.map_err(|e| connect_failed(gateway, &e))?;
            exchange(ctx, gateway, &key, opened).await.map_err(|e| e.into_open_error(gateway))
        }
        r => r.map_err(|e| e.into_open_error(gateway)),
    }
}

/// Waits for the answer to a flow just opened; a connection on which it
/// gets none is closed and its path (relay or direct address) marked down.
async fn exchange(
    ctx: &EndpointContext,
    gateway: &GatewayTarget,
    key: &GatewayKey,
    opened: Opened,
) -> Result<MuxStream, ExchangeError> {
    let result = answer(ctx, gateway, opened.stream).await;
    if let Err(ExchangeError::Silent(reason)) = &result {
        ctx.pools.connection_silent(key, &opened.via, reason);
    }
    result
}

fn connect_failed(gateway: &GatewayTarget, e: &std::io::Error) -> OpenError {
    OpenError::Gateway {
        gateway: gateway.address.clone(),
        reason: describe_io(e),
        silent: super::pool::is_unreachable(e),
    }
}

/// Waits for the gateway's answer to the flow's open request.
async fn answer(
    ctx: &EndpointContext,
    gateway: &GatewayTarget,
    mut stream: MuxStream,
) -> Result<MuxStream, ExchangeError> {
    let timeout = ctx.open_timeout;
    match tokio::time::timeout(timeout, stream.response()).await {
        Err(_) => Err(ExchangeError::Silent(format!("no answer to the open request within {timeout:?}"))),
        Ok(Ok(response)) if response.status == OpenStatus::Ok => Ok(stream),
        Ok(Ok(response)) => Err(ExchangeError::Refused(response)),
        Ok(Err(e)) => {
            let reason = match stream.connection_error() {
                Some(conn) => describe_io(&conn),
                None => describe_io(&e),
            };
            if e.kind() == std::io::ErrorKind::InvalidData {
                tracing::warn!(gateway = %gateway.address, error = %reason, "gateway agent broke the stream protocol; closing that connection");
                return Err(ExchangeError::Protocol(reason));
            }
            Err(ExchangeError::Dead(reason))
        }
    }
}

/// Connects to every gateway of `down` at once; the first to complete its
/// handshake is marked up and gets the open request. Failed attempts are
/// added to `notes`.
async fn open_any<'a>(
    ctx: &Arc<EndpointContext>,
    down: &[&'a GatewayTarget],
    req: &OpenRequest,
    notes: &mut Vec<String>,
) -> Result<(&'a GatewayTarget, MuxStream), OpenError> {
    let mut connects = JoinSet::new();
    for (i, gateway) in down.iter().enumerate() {
        let (pools, key) = (ctx.pools.clone(), GatewayKey::from(*gateway));
        connects.spawn(async move { (i, pools.connect(&key).await) });
    }
    let mut tried = Vec::new();
    while let Some(joined) = connects.join_next().await {
        // A connect task only ends by returning: nothing aborts it while the set is alive.
        let Ok((i, result)) = joined else { continue };
        let gateway = down[i];
        match result {
            Ok(connected) => {
                // The others are dropped (aborted) with the set.
                drop(connects);
                let key = GatewayKey::from(gateway);
                ctx.pools.mark_up(&key);
                let via = ctx.pools.adopt(&key, connected, ctx.pools.shards().current());
                let opened = match via.conn.open(req) {
                    Ok(stream) => exchange(ctx, gateway, &key, Opened { stream, reused: false, via })
                        .await
                        .map_err(|e| e.into_open_error(gateway)),
                    Err(_) => Err(OpenError::Gateway {
                        gateway: gateway.address.clone(),
                        reason: "the new tunnel connection closed at once".into(),
                        silent: false,
                    }),
                };
                return match opened {
                    Ok(x) => Ok((gateway, x)),
                    Err(e) => {
                        if let OpenError::Gateway { reason, silent: true, .. } = &e {
                            ctx.pools.mark_down(&key, reason);
                        }
                        notes.push(attempt_note(gateway, &e));
                        tried.push(attempt_note(gateway, &e));
                        match e {
                            OpenError::Refused { .. } => Err(e),
                            _ => Err(OpenError::AllDown { tried }),
                        }
                    }
                };
            }
            Err(e) => {
                let note = attempt_note(gateway, &connect_failed(gateway, &e));
                notes.push(note.clone());
                tried.push(note);
            }
        }
    }
    Err(OpenError::AllDown { tried })
}

enum ExchangeError {
    /// The connection was closed or broken before any answer: safe to retry elsewhere.
    Dead(String),
    /// No answer within the deadline: the gateway agent does not answer.
    Silent(String),
    /// The gateway broke the stream protocol.
    Protocol(String),
    /// The gateway answered with a refusal.
    Refused(OpenResponse),
}

impl ExchangeError {
    fn into_open_error(self, gateway: &GatewayTarget) -> OpenError {
        let fail =
            |reason: String, silent: bool| OpenError::Gateway { gateway: gateway.address.clone(), reason, silent };
        match self {
            Self::Dead(reason) | Self::Protocol(reason) => fail(reason, false),
            Self::Silent(reason) => fail(reason, true),
            Self::Refused(response) => OpenError::Refused { gateway: gateway.address.clone(), response },
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

    #[test]
    fn a_refused_certificate_is_explained() {
        let alert = |a| std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::AlertReceived(a));
        assert!(describe_io(&alert(rustls::AlertDescription::AccessDenied)).contains("no endpoint of this VPC"));
        assert!(describe_io(&alert(rustls::AlertDescription::CertificateRevoked)).contains("revoked"));
        let other = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(describe_io(&other), "reset");
    }

    #[tokio::test]
    async fn a_client_connections_task_stays_small() {
        use crate::endpoint::pool::PoolSettings;
        use crate::shards::Shards;
        let ca = crate::testing::TestCa::new();
        let identity = ca.issue("agent-0000000000000000b", "acct-000000000002", "vpc-00000000000000002");
        let (_config_tx, config) = watch::channel(Arc::new(AgentConfig::default()));
        let tracker = tokio_util::task::TaskTracker::new();
        let pools = Arc::new(GatewayPools::new(
            crate::tls::tunnel_client_config(&identity).unwrap(),
            PoolSettings::default(),
            Arc::new(Metrics::new()),
            Shards::inline(),
            tracker,
            CancellationToken::new(),
        ));
        let ctx = Arc::new(EndpointContext {
            config,
            pools,
            metrics: Arc::new(Metrics::new()),
            access_log: AccessLog::disabled(),
            open_timeout: Duration::from_secs(1),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _peer = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (client, client_addr) = listener.accept().await.unwrap();
        let req = OpenRequest {
            vpc_endpoint_id: "vpce-00000000000000001".into(),
            resource_configuration_id: "rcfg-00000000000000001".into(),
            port: 5432,
            client_addr,
        };
        let task = serve_client(client, req, ctx, CancellationToken::new());
        // Every idle proxied connection holds one of these for its whole life
        // (424 bytes here, 640 as spawned in a release build; 1,536 when
        // choosing the gateway and opening stayed in it: docs/performance.md,
        // "Idle connections").
        let size = std::mem::size_of_val(&task);
        assert!(size <= 512, "a client connection's task is {size} bytes");
    }
}
