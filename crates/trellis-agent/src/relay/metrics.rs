//! The relay's Prometheus metrics: idle attachments per gateway agent, open
//! connections and relayed flows, flows by outcome, bytes each way, refusals
//! by reason. Label values are gateway agent ids from the relay's config and
//! fixed words, never text a peer chose.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// The relay's metric families and their registry.
pub struct RelayMetrics {
    registry: Registry,
    /// Idle attachments per gateway agent.
    pub attachments: Family<Labels, Gauge>,
    pub connections: Gauge,
    pub active_flows: Gauge,
    pub flows: Family<Labels, Counter>,
    pub bytes: Family<Labels, Counter>,
    /// The two series of `bytes`, fetched once: the copy loop adds to them on every write.
    pub bytes_to_gateway: Counter,
    pub bytes_to_endpoint: Counter,
    pub refusals: Family<Labels, Counter>,
    /// Access-log lines dropped because the log's sink stopped taking them.
    pub access_log_dropped: Counter,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn label(key: &str, value: &str) -> Labels {
    vec![(key.to_string(), value.to_string())]
}

impl RelayMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("trellis_relay");
        let attachments = Family::<Labels, Gauge>::default();
        registry.register(
            "attachments",
            "Idle connections a gateway agent keeps attached, waiting for a flow",
            attachments.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Agent connections open now (handshaking, attached or relaying)",
            connections.clone(),
        );
        let active_flows = Gauge::default();
        registry.register(
            "active_flows",
            "Relayed tunnel connections open now (each carries any number of client flows)",
            active_flows.clone(),
        );
        let flows = Family::<Labels, Counter>::default();
        registry.register(
            "flows",
            "Relayed flows by outcome (closed, error, revoked, shutdown) and connects refused by status",
            flows.clone(),
        );
        let bytes = Family::<Labels, Counter>::default();
        registry.register("bytes", "Relayed bytes (ciphertext), by direction (to_gateway, to_endpoint)", bytes.clone());
        // Counters share their value with the family's series (a clone is a handle).
        let bytes_to_gateway = bytes.get_or_create(&label("direction", "to_gateway")).clone();
        let bytes_to_endpoint = bytes.get_or_create(&label("direction", "to_endpoint")).clone();
        let refusals = Family::<Labels, Counter>::default();
        registry.register("refusals", "Connections closed before relaying, by reason", refusals.clone());
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped_lines",
            "Access-log lines dropped because the log's file or stdout stopped taking them (16 MiB waited)",
            access_log_dropped.clone(),
        );
        Self {
            registry,
            attachments,
            connections,
            active_flows,
            flows,
            bytes,
            bytes_to_gateway,
            bytes_to_endpoint,
            refusals,
            access_log_dropped,
        }
    }

    pub fn set_attachments(&self, gateway: &str, n: usize) {
        self.attachments.get_or_create(&label("gateway", gateway)).set(n as i64);
    }

    pub fn forget_gateway(&self, gateway: &str) {
        self.attachments.remove(&label("gateway", gateway));
    }

    pub fn count_flow(&self, outcome: &str) {
        self.flows.get_or_create(&label("outcome", outcome)).inc();
    }

    pub fn count_refusal(&self, reason: &'static str) {
        self.refusals.get_or_create(&label("reason", reason)).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encode metrics");
        out
    }
}

impl crate::metrics::Exposition for RelayMetrics {
    fn encode(&self) -> String {
        RelayMetrics::encode(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_bytes_are_counted_on_counters_fetched_once_and_exposed_by_direction() {
        let m = RelayMetrics::new();
        m.bytes_to_gateway.inc_by(5);
        m.bytes_to_gateway.inc_by(2);
        m.bytes_to_endpoint.inc_by(11);
        let text = m.encode();
        assert!(text.contains("trellis_relay_bytes_total{direction=\"to_gateway\"} 7"), "{text}");
        assert!(text.contains("trellis_relay_bytes_total{direction=\"to_endpoint\"} 11"), "{text}");
    }
}
