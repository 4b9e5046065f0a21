//! Endpoint listeners: for every (endpoint, resource) in the config, listen on
//! its address at each of the resource's ports, and follow config changes —
//! new listeners are bound, removed ones closed together with their
//! connections. Readiness per (endpoint, resource) is published for reports.
//!
//! Endpoint addresses come from the subnet's pool. An address must be local to
//! this host before it can be bound; see [`super::routes`] for how the agent
//! (or the operator) makes a pool local.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_proto::AgentConfig;
use trellis_proto::agent_api::ListenerStatus;

use super::pool::GatewayKey;
use super::proxy::{EndpointContext, serve_client};
use super::routes::RouteManager;

/// Most ports one agent listens on, across all endpoints; beyond it listeners report an error.
pub const MAX_LISTENING_PORTS: usize = 4096;

/// What the endpoint role serves now: the config version applied and each listener's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServedState {
    pub config_version: u64,
    pub listeners: Vec<ListenerStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ListenerKey {
    vpc_endpoint_id: String,
    resource_configuration_id: String,
    addr: SocketAddr,
}

/// Runs the endpoint role until `shutdown`, publishing what it serves on `served`.
pub async fn run(
    ctx: Arc<EndpointContext>,
    mut routes: RouteManager,
    served: watch::Sender<ServedState>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut config_rx = ctx.config.clone();
    let mut open: HashMap<ListenerKey, CancellationToken> = HashMap::new();
    loop {
        let config = config_rx.borrow_and_update().clone();
        let state = reconcile(&config, &ctx, &mut routes, &mut open, &tracker, &shutdown);
        served.send_replace(state);
        tokio::select! {
            r = config_rx.changed() => if r.is_err() { break },
            () = shutdown.cancelled() => break,
        }
    }
    for (_, cancel) in open.drain() {
        cancel.cancel();
    }
    routes.remove_all();
}

fn reconcile(
    config: &AgentConfig,
    ctx: &Arc<EndpointContext>,
    routes: &mut RouteManager,
    open: &mut HashMap<ListenerKey, CancellationToken>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> ServedState {
    routes.apply(&config.address_pool, config.endpoints.iter().flat_map(|e| e.resources.iter().map(|r| r.address)));

    // Desired listeners, in config order, capped.
    let mut desired: Vec<ListenerKey> = Vec::new();
    let mut errors: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut gateways: HashSet<GatewayKey> = HashSet::new();
    for endpoint in &config.endpoints {
        for resource in &endpoint.resources {
            let pair = (endpoint.vpc_endpoint_id.clone(), resource.resource_configuration_id.clone());
            pairs.push(pair.clone());
            gateways.extend(resource.gateways.iter().map(GatewayKey::from));
            if resource.gateways.is_empty() {
                errors.insert(pair.clone(), "no gateway agent serves this resource yet".into());
            }
            for range in &resource.port_ranges {
                for port in range.ports() {
                    if desired.len() >= MAX_LISTENING_PORTS {
                        errors.entry(pair.clone()).or_insert_with(|| {
                            format!("this agent listens on at most {MAX_LISTENING_PORTS} ports; narrow the port ranges")
                        });
                        break;
                    }
                    desired.push(ListenerKey {
                        vpc_endpoint_id: pair.0.clone(),
                        resource_configuration_id: pair.1.clone(),
                        addr: SocketAddr::new(resource.address, port),
                    });
                }
            }
        }
    }
    ctx.pools.retain(&gateways);

    let wanted: HashSet<&ListenerKey> = desired.iter().collect();
    open.retain(|key, cancel| {
        let keep = wanted.contains(key);
        if !keep {
            tracing::info!(endpoint = %key.vpc_endpoint_id, resource = %key.resource_configuration_id, addr = %key.addr, "closing endpoint listener");
            cancel.cancel();
        }
        keep
    });
    for key in desired {
        if open.contains_key(&key) {
            continue;
        }
        match bind(key.addr) {
            Ok(listener) => {
                tracing::info!(endpoint = %key.vpc_endpoint_id, resource = %key.resource_configuration_id, addr = %key.addr, "listening");
                let cancel = shutdown.child_token();
                open.insert(key.clone(), cancel.clone());
                tracker.spawn(accept_loop(listener, key, ctx.clone(), tracker.clone(), cancel));
            }
            Err(e) => {
                let hint = if e.kind() == io::ErrorKind::AddrNotAvailable {
                    " (the address is not on this host: enable --manage-routes or add the subnet pool as a local route)"
                } else {
                    ""
                };
                errors
                    .entry((key.vpc_endpoint_id.clone(), key.resource_configuration_id.clone()))
                    .or_insert_with(|| format!("cannot listen on {}: {e}{hint}", key.addr));
            }
        }
    }

    pairs.dedup();
    let listeners = pairs
        .into_iter()
        .map(|pair| {
            let error = errors.remove(&pair);
            ListenerStatus { vpc_endpoint_id: pair.0, resource_configuration_id: pair.1, ready: error.is_none(), error }
        })
        .collect();
    ServedState { config_version: config.version, listeners }
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(
    listener: TcpListener,
    key: ListenerKey,
    ctx: Arc<EndpointContext>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = cancel.cancelled() => return,
        };
        match accepted {
            Ok((client, client_addr)) => {
                let ctx = ctx.clone();
                let (endpoint, resource) = (key.vpc_endpoint_id.clone(), key.resource_configuration_id.clone());
                tracker.spawn(serve_client(client, client_addr, endpoint, resource, ctx, cancel.child_token()));
            }
            Err(e) => {
                tracing::warn!(addr = %key.addr, error = %e, "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                    () = cancel.cancelled() => return,
                }
            }
        }
    }
}
