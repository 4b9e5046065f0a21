//! Endpoint listeners: for every (endpoint, resource) in the config, listen on
//! its address at each of the resource's ports, and follow config changes —
//! new listeners are bound, removed ones closed together with their
//! connections. Readiness per (endpoint, resource) is published for reports.
//!
//! Bounded: an endpoint may have at most [`MAX_LISTENERS_PER_ENDPOINT`]
//! listeners, and all endpoints together at most the agent's listener budget
//! (from its open-files limit). An endpoint over either bound gets none of its
//! listeners and reports why; the others keep all of theirs, whatever the ids.
//! Endpoints already serving keep their share before new ones get any.
//!
//! Endpoint addresses come from the subnet's pool. An address must be local to
//! this host before it can be bound; see [`super::routes`] for how the agent
//! (or the operator) makes a pool local.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_proto::agent_api::ListenerStatus;
use trellis_proto::stream::OpenRequest;
use trellis_proto::{AgentConfig, MAX_LISTENERS_PER_ENDPOINT};

use super::pool::GatewayKey;
use super::proxy::{EndpointContext, serve_client};
use super::routes::RouteManager;
use crate::shards::bind_listeners;

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
    budget: usize,
    mut routes: RouteManager,
    served: watch::Sender<ServedState>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut config_rx = ctx.config.clone();
    let mut open: HashMap<ListenerKey, CancellationToken> = HashMap::new();
    loop {
        let config = config_rx.borrow_and_update().clone();
        routes = apply_routes(routes, &config).await;
        let state = reconcile(&config, budget, &ctx, &mut open, &tracker, &shutdown);
        served.send_replace(state);
        tokio::select! {
            r = config_rx.changed() => if r.is_err() { break },
            () = shutdown.cancelled() => break,
        }
    }
    for (_, cancel) in open.drain() {
        cancel.cancel();
    }
    let _ = tokio::task::spawn_blocking(move || routes.remove_all()).await;
}

/// Makes the config's address pool local when it must be (see [`RouteManager::apply`]):
/// off the runtime, since that runs `ip route` and binds a probe socket per address.
async fn apply_routes(mut routes: RouteManager, config: &AgentConfig) -> RouteManager {
    if !routes.is_enabled() {
        return routes;
    }
    let pool = config.address_pool.clone();
    let addresses: Vec<std::net::IpAddr> =
        config.endpoints.iter().flat_map(|e| e.resources.iter().map(|r| r.address)).collect();
    match tokio::task::spawn_blocking(move || {
        routes.apply(&pool, addresses.into_iter());
        routes
    })
    .await
    {
        Ok(routes) => routes,
        Err(e) => {
            tracing::error!(error = %e, "managing the address pool's route failed; no longer managing it");
            RouteManager::new(false)
        }
    }
}

/// The listeners to hold for `config` within `budget`, and the error of each
/// (endpoint, resource) pair that gets none. Pure.
///
/// Endpoints over [`MAX_LISTENERS_PER_ENDPOINT`] fail whole. The rest are
/// granted whole or not at all: first those in `serving` (so a new endpoint
/// never takes an old one's listeners), then the smallest first, by id on
/// ties.
fn plan(
    config: &AgentConfig,
    budget: usize,
    serving: &HashSet<&str>,
) -> (Vec<ListenerKey>, BTreeMap<(String, String), String>) {
    let mut errors = BTreeMap::new();
    let mut fail = |endpoint: &trellis_proto::EndpointConfig, why: &str| {
        for r in &endpoint.resources {
            errors.insert((endpoint.vpc_endpoint_id.clone(), r.resource_configuration_id.clone()), why.to_string());
        }
    };
    let mut candidates = Vec::new();
    for endpoint in &config.endpoints {
        let asks: u64 =
            endpoint.resources.iter().flat_map(|r| &r.port_ranges).map(|range| u64::from(range.len())).sum();
        if asks > u64::from(MAX_LISTENERS_PER_ENDPOINT) {
            fail(
                endpoint,
                &format!(
                    "endpoint {} asks for {asks} listeners; an endpoint may have at most {MAX_LISTENERS_PER_ENDPOINT} (narrow the resource's port ranges)",
                    endpoint.vpc_endpoint_id
                ),
            );
            continue;
        }
        // At most MAX_LISTENERS_PER_ENDPOINT here.
        let asks = asks as usize;
        candidates.push((!serving.contains(endpoint.vpc_endpoint_id.as_str()), asks, endpoint));
    }
    candidates.sort_by(|a, b| (a.0, a.1, &a.2.vpc_endpoint_id).cmp(&(b.0, b.1, &b.2.vpc_endpoint_id)));
    let mut used = 0usize;
    let mut granted: HashSet<&str> = HashSet::new();
    for (_, asks, endpoint) in candidates {
        if used + asks <= budget {
            used += asks;
            granted.insert(endpoint.vpc_endpoint_id.as_str());
        } else {
            fail(
                endpoint,
                &format!(
                    "endpoint {} asks for {asks} listeners, but this agent's other endpoints already use {used} of its {budget} (a budget from its open-files limit, divided by its data-plane threads: each listens once per thread); raise the limit, run fewer threads (--worker-threads) or serve the endpoint from another agent",
                    endpoint.vpc_endpoint_id
                ),
            );
        }
    }
    let desired = config
        .endpoints
        .iter()
        .filter(|e| granted.contains(e.vpc_endpoint_id.as_str()))
        .flat_map(|e| e.resources.iter().map(move |r| (e, r)))
        .flat_map(|(e, r)| {
            r.port_ranges.iter().flat_map(|range| range.ports()).map(move |port| ListenerKey {
                vpc_endpoint_id: e.vpc_endpoint_id.clone(),
                resource_configuration_id: r.resource_configuration_id.clone(),
                addr: SocketAddr::new(r.address, port),
            })
        })
        .collect();
    (desired, errors)
}

fn reconcile(
    config: &AgentConfig,
    budget: usize,
    ctx: &Arc<EndpointContext>,
    open: &mut HashMap<ListenerKey, CancellationToken>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> ServedState {
    let serving: HashSet<&str> = open.keys().map(|k| k.vpc_endpoint_id.as_str()).collect();
    let (desired, mut errors) = plan(config, budget, &serving);
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut gateways: HashSet<GatewayKey> = HashSet::new();
    for endpoint in &config.endpoints {
        for resource in &endpoint.resources {
            let pair = (endpoint.vpc_endpoint_id.clone(), resource.resource_configuration_id.clone());
            gateways.extend(resource.gateways.iter().map(GatewayKey::from));
            if resource.gateways.is_empty() {
                errors.entry(pair.clone()).or_insert_with(|| "no gateway agent serves this resource yet".into());
            }
            pairs.push(pair);
        }
    }
    ctx.pools.retain(&gateways);
    ctx.pools.relay_health.lock().unwrap_or_else(|e| e.into_inner()).set_revoked(&config.revoked_relay_certs);

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
        // One socket per data-plane thread; each accepts and serves on its own.
        let shards = ctx.pools.shards();
        match bind_listeners(key.addr, shards.len(), true) {
            Ok(listeners) => {
                tracing::info!(endpoint = %key.vpc_endpoint_id, resource = %key.resource_configuration_id, addr = %key.addr, "listening");
                let cancel = shutdown.child_token();
                open.insert(key.clone(), cancel.clone());
                for (index, listener) in listeners.into_iter().enumerate() {
                    let accept = accept_loop(listener, key.clone(), ctx.clone(), tracker.clone(), cancel.clone());
                    shards.spawn(index, tracker, accept);
                }
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

/// Accepts clients on `listener` (its `TCP_NODELAY` set: accepted sockets
/// inherit it, no setsockopt per client) and serves each on this thread.
async fn accept_loop(
    listener: std::net::TcpListener,
    key: ListenerKey,
    ctx: Arc<EndpointContext>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(addr = %key.addr, error = %e, "cannot register an endpoint listener");
            return;
        }
    };
    // The port clients connected to, for their open requests (no getsockname per client).
    let port = listener.local_addr().map_or(key.addr.port(), |a| a.port());
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = cancel.cancelled() => return,
        };
        match accepted {
            Ok((client, client_addr)) => {
                let ctx = ctx.clone();
                let req = OpenRequest {
                    vpc_endpoint_id: key.vpc_endpoint_id.clone(),
                    resource_configuration_id: key.resource_configuration_id.clone(),
                    port,
                    client_addr,
                };
                tracker.spawn(serve_client(client, req, ctx, cancel.clone()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::{EndpointConfig, EndpointResource, PortRange};

    #[tokio::test]
    async fn accepted_clients_inherit_nodelay_from_the_listener() {
        let listener = bind_listeners("127.0.0.1:0".parse().unwrap(), 1, true).unwrap().remove(0);
        let listener = TcpListener::from_std(listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap(), "serve_client relies on it and sets nothing per client");
    }

    fn endpoint(id: &str, ports: &[(u16, u16)]) -> EndpointConfig {
        EndpointConfig {
            vpc_endpoint_id: id.into(),
            resources: ports
                .iter()
                .enumerate()
                .map(|(i, (a, b))| EndpointResource {
                    resource_configuration_id: format!("rcfg-{i}"),
                    address: format!("127.77.0.{}", i + 1).parse().unwrap(),
                    port_ranges: vec![PortRange::new(*a, *b).unwrap()],
                    dns_names: vec![],
                    dns_records: vec![],
                    gateways: vec![],
                })
                .collect(),
        }
    }

    fn config(endpoints: Vec<EndpointConfig>) -> AgentConfig {
        AgentConfig { version: 1, endpoints, ..Default::default() }
    }

    fn granted(desired: &[ListenerKey]) -> Vec<&str> {
        let mut ids: Vec<&str> = desired.iter().map(|k| k.vpc_endpoint_id.as_str()).collect();
        ids.dedup();
        ids
    }

    #[test]
    fn an_endpoint_over_its_cap_gets_nothing_and_costs_the_others_nothing() {
        // Two resources that add up to more than the cap, though each alone would fit.
        let c = config(vec![endpoint("vpce-a", &[(1, 1000), (2001, 2100)]), endpoint("vpce-b", &[(5432, 5432)])]);
        let (desired, errors) = plan(&c, 10_000, &HashSet::new());
        assert_eq!(granted(&desired), ["vpce-b"]);
        assert_eq!(errors.len(), 2, "each pair of the failed endpoint says why: {errors:?}");
        assert!(errors.values().all(|e| e.contains("asks for 1100 listeners")), "{errors:?}");
    }

    #[test]
    fn the_agent_budget_is_granted_whole_endpoints_smallest_first_serving_ones_kept() {
        let c =
            config(vec![endpoint("vpce-a", &[(1, 10)]), endpoint("vpce-b", &[(1, 6)]), endpoint("vpce-c", &[(1, 3)])]);
        let (desired, errors) = plan(&c, 12, &HashSet::new());
        assert_eq!(granted(&desired), ["vpce-b", "vpce-c"]);
        assert_eq!(desired.len(), 9, "no partial endpoint");
        assert!(errors[&("vpce-a".to_string(), "rcfg-0".to_string())].contains("already use 9 of its 12"));
        // An endpoint that is serving keeps its listeners when a smaller one arrives.
        let serving = HashSet::from(["vpce-a"]);
        let (desired, _) = plan(&c, 12, &serving);
        assert_eq!(granted(&desired), ["vpce-a"]);
    }
}
