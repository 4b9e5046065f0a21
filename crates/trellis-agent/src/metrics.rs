//! Prometheus metrics of the data plane and the `/metrics` HTTP listener
//! (plain HTTP/1.1, `GET /metrics` only, bounded in connections and time).
//!
//! Every series is labelled by role (`gateway` or `endpoint`), resource
//! configuration, VPC endpoint and consumer account. Label values come from the
//! agent's config, never straight from a peer's request, so a peer cannot grow
//! the number of series (unknown ids are counted as `unknown`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Which side of a tunnel a connection was counted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Gateway,
    Endpoint,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Endpoint => "endpoint",
        }
    }
}

/// The labels of every connection series.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FlowLabels {
    pub role: String,
    pub resource: String,
    pub endpoint: String,
    pub consumer_account: String,
}

impl FlowLabels {
    pub fn new(role: Role, resource: &str, endpoint: &str, consumer_account: &str) -> Self {
        Self {
            role: role.as_str().to_string(),
            resource: resource.to_string(),
            endpoint: endpoint.to_string(),
            consumer_account: consumer_account.to_string(),
        }
    }
}

/// One label set's series of an opening flow, looked up together.
#[derive(Clone)]
pub struct FlowSeries {
    pub active: Gauge,
    pub connections: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
}

/// The agent's metric families and their registry.
pub struct Metrics {
    registry: Registry,
    /// Every label set's [`FlowSeries`]: one lookup per opening flow instead of
    /// one per family. Families never drop a flow label set, so neither does this.
    flow_series: std::sync::RwLock<std::collections::HashMap<FlowLabels, FlowSeries>>,
    pub active_connections: Family<FlowLabels, Gauge>,
    pub connections: Family<FlowLabels, Counter>,
    pub rejected_connections: Family<FlowLabels, Counter>,
    pub bytes_in: Family<FlowLabels, Counter>,
    pub bytes_out: Family<FlowLabels, Counter>,
    pub dns_queries: Family<Vec<(String, String)>, Counter>,
    pub tunnel_refusals: Family<Vec<(String, String)>, Counter>,
    /// 1 when a service target is healthy (or not checked yet), 0 when unhealthy.
    pub target_healthy: Family<Vec<(String, String)>, Gauge>,
    /// Connections and bytes a consumer's limits refused or slowed.
    pub limited: Family<Vec<(String, String)>, Counter>,
    /// Endpoint side: 1 while a gateway agent is believed reachable, 0 while it is skipped.
    pub gateway_up: Family<Vec<(String, String)>, Gauge>,
    /// Endpoint side: flows that skipped a gateway agent because it was down.
    pub gateway_skipped: Family<Vec<(String, String)>, Counter>,
    /// Endpoint side: new tunnel connections by path (`direct`, or `relay` with its id).
    pub tunnel_connects: Family<Vec<(String, String)>, Counter>,
    /// Endpoint side: failed attempts through a relay, by relay and reason.
    pub relay_failures: Family<Vec<(String, String)>, Counter>,
    /// Endpoint side: 1 while a relay answers, 0 while it is marked down.
    pub relay_up: Family<Vec<(String, String)>, Gauge>,
    /// Access-log lines dropped because the log's sink stopped taking them.
    pub access_log_dropped: Counter,
    /// Gateway side: direct tunnel connections open (handshaking or serving), by data-plane thread.
    pub tunnel_connections: Family<Vec<(String, String)>, Gauge>,
}

/// Why an endpoint agent's attempt through a relay failed (`trellis_endpoint_relay_failures_total`).
pub const RELAY_FAILURE_REASONS: [&str; 7] =
    ["unreachable", "not_served", "unavailable", "busy", "bad_request", "revoked_certificate", "protocol"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let active_connections = Family::<FlowLabels, Gauge>::default();
        let connections = Family::<FlowLabels, Counter>::default();
        let rejected_connections = Family::<FlowLabels, Counter>::default();
        let bytes_in = Family::<FlowLabels, Counter>::default();
        let bytes_out = Family::<FlowLabels, Counter>::default();
        let dns_queries = Family::<Vec<(String, String)>, Counter>::default();
        registry.register("active_connections", "Proxied connections open now", active_connections.clone());
        registry.register("connections", "Proxied connections opened", connections.clone());
        registry.register(
            "rejected_connections",
            "Connections refused (denied, unreachable, timeout, bad request)",
            rejected_connections.clone(),
        );
        registry.register("bytes_in", "Bytes from the consumer toward the resource", bytes_in.clone());
        registry.register("bytes_out", "Bytes from the resource toward the consumer", bytes_out.clone());
        registry.register("dns_queries", "DNS queries answered, by how", dns_queries.clone());
        let tunnel_refusals = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "tunnel_refusals",
            "Tunnel connections refused or closed before an open request, by reason",
            tunnel_refusals.clone(),
        );
        let target_healthy = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "service_target_healthy",
            "1 while an endpoint service's target passes its health checks (or has no result yet), 0 while it fails them",
            target_healthy.clone(),
        );
        let limited = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "consumer_limited",
            "Connections refused (limit=connections) and pauses to pace bytes (limit=bandwidth) under a consumer's limits",
            limited.clone(),
        );
        let gateway_up = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "gateway_up",
            "Endpoint side: 1 while a gateway agent answers, 0 while it is marked down and probed in the background",
            gateway_up.clone(),
        );
        let gateway_skipped = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "gateway_skipped",
            "Endpoint side: new flows that skipped a gateway agent at once because it was marked down",
            gateway_skipped.clone(),
        );
        let tunnel_connects = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "tunnel_connects",
            "Endpoint side: new tunnel connections to gateway agents by the path they took (path=direct, or path=relay with the relay id)",
            tunnel_connects.clone(),
        );
        let relay_failures = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "endpoint_relay_failures",
            "Endpoint side: attempts to reach a gateway agent through a relay that failed, by relay and reason",
            relay_failures.clone(),
        );
        let relay_up = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "endpoint_relay_up",
            "Endpoint side: 1 while a relay of the config answers, 0 while it is marked down (tried last, probed)",
            relay_up.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped_lines",
            "Access-log lines dropped because the log's file or stdout stopped taking them (16 MiB waited)",
            access_log_dropped.clone(),
        );
        let tunnel_connections = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "tunnel_connections",
            "Gateway side: tunnel connections accepted and open now (handshaking or serving), by the data-plane thread that serves them (thread=0..N-1)",
            tunnel_connections.clone(),
        );
        Self {
            registry,
            flow_series: std::sync::RwLock::default(),
            active_connections,
            connections,
            rejected_connections,
            bytes_in,
            bytes_out,
            dns_queries,
            tunnel_refusals,
            target_healthy,
            limited,
            gateway_up,
            gateway_skipped,
            tunnel_connects,
            relay_failures,
            relay_up,
            access_log_dropped,
            tunnel_connections,
        }
    }

    /// The gauge of tunnel connections served by data-plane thread `thread`.
    pub(crate) fn tunnel_connections_of(&self, thread: usize) -> Gauge {
        self.tunnel_connections.get_or_create(&vec![("thread".to_string(), thread.to_string())]).clone()
    }

    /// The series of a flow with `labels` (created at their first flow).
    pub fn flow_series(&self, labels: &FlowLabels) -> FlowSeries {
        if let Some(series) = self.flow_series.read().unwrap_or_else(|e| e.into_inner()).get(labels) {
            return series.clone();
        }
        let series = FlowSeries {
            active: self.active_connections.get_or_create(labels).clone(),
            connections: self.connections.get_or_create(labels).clone(),
            bytes_in: self.bytes_in.get_or_create(labels).clone(),
            bytes_out: self.bytes_out.get_or_create(labels).clone(),
        };
        let mut all = self.flow_series.write().unwrap_or_else(|e| e.into_inner());
        all.entry(labels.clone()).or_insert(series).clone()
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encode metrics");
        out
    }

    pub(crate) fn count_dns(&self, how: &str) {
        self.dns_queries.get_or_create(&vec![("answer".to_string(), how.to_string())]).inc();
    }

    fn target_labels(service: &str, target: &str, port: u16) -> Vec<(String, String)> {
        vec![
            ("service".to_string(), service.to_string()),
            ("target".to_string(), target.to_string()),
            ("port".to_string(), port.to_string()),
        ]
    }

    /// Records a service target's health (labels come from the config, never from a peer).
    pub(crate) fn set_target_health(
        &self,
        service: &str,
        target: &str,
        port: u16,
        health: trellis_policy::health::Health,
    ) {
        let value = i64::from(health.serves());
        self.target_healthy.get_or_create(&Self::target_labels(service, target, port)).set(value);
    }

    /// Drops a target that left the config.
    pub(crate) fn forget_target(&self, service: &str, target: &str, port: u16) {
        self.target_healthy.remove(&Self::target_labels(service, target, port));
    }

    /// Counts a consumer limit at work: `limit` is `connections` or `bandwidth`.
    pub(crate) fn count_limited(&self, target: &str, consumer: &str, limit: &'static str) {
        self.limited
            .get_or_create(&vec![
                ("resource".to_string(), target.to_string()),
                ("consumer_account".to_string(), consumer.to_string()),
                ("limit".to_string(), limit.to_string()),
            ])
            .inc();
    }

    fn gateway_labels(agent_id: &str, address: &str) -> Vec<(String, String)> {
        vec![("gateway".to_string(), agent_id.to_string()), ("address".to_string(), address.to_string())]
    }

    /// Records whether a gateway agent is believed reachable (labels come from the config).
    pub(crate) fn set_gateway_up(&self, agent_id: &str, address: &str, up: bool) {
        self.gateway_up.get_or_create(&Self::gateway_labels(agent_id, address)).set(i64::from(up));
    }

    /// Counts a flow that skipped a down gateway agent.
    pub(crate) fn count_gateway_skipped(&self, agent_id: &str, address: &str) {
        self.gateway_skipped.get_or_create(&Self::gateway_labels(agent_id, address)).inc();
    }

    /// Drops the series of a gateway agent that left the config.
    pub(crate) fn forget_gateway(&self, agent_id: &str, address: &str) {
        let labels = Self::gateway_labels(agent_id, address);
        self.gateway_up.remove(&labels);
        self.gateway_skipped.remove(&labels);
    }

    /// Counts a new tunnel connection: direct, or through relay `relay` (an id from the config).
    pub(crate) fn count_tunnel_connect(&self, relay: Option<&str>) {
        let labels = match relay {
            None => vec![("path".to_string(), "direct".to_string())],
            Some(id) => vec![("path".to_string(), "relay".to_string()), ("relay".to_string(), id.to_string())],
        };
        self.tunnel_connects.get_or_create(&labels).inc();
    }

    /// Counts a failed attempt through `relay`; `reason` is one of [`RELAY_FAILURE_REASONS`].
    pub(crate) fn count_relay_failure(&self, relay: &str, reason: &'static str) {
        self.relay_failures
            .get_or_create(&vec![("relay".to_string(), relay.to_string()), ("reason".to_string(), reason.to_string())])
            .inc();
    }

    /// Records whether a relay of the config is up (answers) or marked down.
    pub(crate) fn set_relay_up(&self, relay: &str, up: bool) {
        self.relay_up.get_or_create(&vec![("relay".to_string(), relay.to_string())]).set(i64::from(up));
    }

    /// Drops every series of a relay that left the config.
    pub(crate) fn forget_relay(&self, relay: &str) {
        self.relay_up.remove(&vec![("relay".to_string(), relay.to_string())]);
        self.tunnel_connects
            .remove(&vec![("path".to_string(), "relay".to_string()), ("relay".to_string(), relay.to_string())]);
        for reason in RELAY_FAILURE_REASONS {
            self.relay_failures
                .remove(&vec![("relay".to_string(), relay.to_string()), ("reason".to_string(), reason.to_string())]);
        }
    }

    /// Counts a tunnel connection refused before its open request; `reason` is one of a fixed set.
    pub(crate) fn count_tunnel_refused(&self, reason: &'static str) {
        self.tunnel_refusals.get_or_create(&vec![("reason".to_string(), reason.to_string())]).inc();
    }
}

/// Connections the metrics listener serves at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 16;
/// A request's head must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this, whatever it is doing (scrapers reconnect).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

type Body = http_body_util::Full<hyper::body::Bytes>;

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Something `/metrics` can serve: the agent's metrics, or the relay's.
pub trait Exposition: Send + Sync + 'static {
    /// The Prometheus text exposition.
    fn encode(&self) -> String;
}

impl Exposition for Metrics {
    fn encode(&self) -> String {
        Metrics::encode(self)
    }
}

/// `GET /metrics` and nothing else.
fn route(method: &Method, path: &str, metrics: &impl Exposition) -> Response<Body> {
    match (method, path) {
        (&Method::GET, "/metrics") => {
            respond(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.encode())
        }
        (_, "/metrics") => {
            let mut resp = respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET /metrics\n".into());
            resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
            resp
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "only GET /metrics is served here\n".into()),
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown`: at most
/// [`MAX_CONNECTIONS`] at once, each request head within [`HEADER_TIMEOUT`],
/// each connection for [`CONNECTION_TIMEOUT`] at most, so idle or slow clients
/// cannot hold the listener.
pub(crate) async fn serve<M: Exposition>(
    listener: TcpListener,
    metrics: Arc<M>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::debug!(?addr, error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(?addr, "too many metrics connections; closing a new one");
            continue;
        };
        let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = route(req.method(), req.uri().path(), &*metrics);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => {}
                () = shutdown.cancelled() => {}
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_access_log_counts_its_dropped_lines_in_the_agents_metrics() {
        let m = Metrics::new();
        let log = crate::AccessLog::to_writer(Box::new(std::io::sink()));
        log.count_drops_in(m.access_log_dropped.clone());
        m.access_log_dropped.inc();
        assert!(m.encode().contains("trellis_access_log_dropped_lines_total 1"), "{}", m.encode());
    }

    #[test]
    fn only_get_metrics_is_served() {
        let m = Metrics::new();
        assert_eq!(route(&Method::GET, "/metrics", &m).status(), StatusCode::OK);
        assert_eq!(route(&Method::POST, "/metrics", &m).status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(route(&Method::GET, "/healthz", &m).status(), StatusCode::NOT_FOUND);
        assert_eq!(route(&Method::GET, "/", &m).status(), StatusCode::NOT_FOUND);
    }
}
