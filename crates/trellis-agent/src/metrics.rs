//! Prometheus metrics of the data plane and the `/metrics` HTTP listener.
//!
//! Every series is labelled by role (`gateway` or `endpoint`), resource
//! configuration, VPC endpoint and consumer account. Label values come from the
//! agent's config, never straight from a peer's request, so a peer cannot grow
//! the number of series (unknown ids are counted as `unknown`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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

/// The agent's metric families and their registry.
pub struct Metrics {
    registry: Registry,
    pub active_connections: Family<FlowLabels, Gauge>,
    pub connections: Family<FlowLabels, Counter>,
    pub rejected_connections: Family<FlowLabels, Counter>,
    pub bytes_in: Family<FlowLabels, Counter>,
    pub bytes_out: Family<FlowLabels, Counter>,
    pub dns_queries: Family<Vec<(String, String)>, Counter>,
}

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
        Self { registry, active_connections, connections, rejected_connections, bytes_in, bytes_out, dns_queries }
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
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.encode())
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub(crate) async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(metrics);
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
        tracing::error!(?addr, error = %e, "metrics listener failed");
    }
}
