//! Accounting for one proxied connection: Prometheus series, gateway usage
//! counters and the access-log line, kept consistent in one place.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::access_log::{AccessLog, AccessRecord, millis, rfc3339};
use crate::metrics::{FlowLabels, Metrics, Role};
use crate::usage::UsageCell;

/// Who and what a connection is about, for logs and metrics.
#[derive(Clone, Debug)]
pub(crate) struct FlowInfo {
    pub role: Role,
    pub vpc_endpoint_id: String,
    pub resource_configuration_id: String,
    pub consumer_account_id: String,
    pub client_addr: String,
    pub target: String,
}

/// A connection from accept to close. Creating an [`OpenFlow`] counts it as
/// active; [`OpenFlow::finish`] (or drop) counts it as closed.
pub(crate) struct OpenFlow {
    info: FlowInfo,
    /// This flow's series, looked up once when it opens (each is a shared
    /// handle to the family's value): counting bytes hashes no labels.
    active: Gauge,
    /// Consumer → resource, and resource → consumer.
    bytes_in: ByteCount,
    bytes_out: ByteCount,
    usage: Option<Arc<UsageCell>>,
    access_log: AccessLog,
    started: SystemTime,
    started_at: Instant,
    /// Gateway agents that failed before this flow opened (endpoint side).
    tried: Vec<String>,
    finished: bool,
}

/// One direction's bytes: the flow's total (for its access-log line), its
/// Prometheus series and the gateway's usage counter.
#[derive(Clone)]
struct ByteCount {
    /// The flow's totals, in and out (for its access-log line); this direction's at `index`.
    totals: Arc<[AtomicU64; 2]>,
    index: usize,
    counted: Counter,
    usage: Option<Arc<UsageCell>>,
    usage_field: fn(&UsageCell) -> &AtomicU64,
}

impl ByteCount {
    fn add(&self, n: u64) {
        self.totals[self.index].fetch_add(n, Ordering::Relaxed);
        self.counted.inc_by(n);
        if let Some(u) = &self.usage {
            (self.usage_field)(u).fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl FlowInfo {
    /// The metric labels of this flow.
    pub fn labels(&self) -> FlowLabels {
        FlowLabels::new(self.role, &self.resource_configuration_id, &self.vpc_endpoint_id, &self.consumer_account_id)
    }
}

/// Counts a refused connection and writes its access-log line.
#[allow(clippy::too_many_arguments)]
pub(crate) fn reject(
    info: &FlowInfo,
    labels: &FlowLabels,
    metrics: &Metrics,
    usage: Option<&UsageCell>,
    access_log: &AccessLog,
    started: SystemTime,
    outcome: &str,
    message: Option<String>,
) {
    reject_after_tries(info, labels, metrics, usage, access_log, started, outcome, message, Vec::new());
}

/// [`reject`] for a flow that tried gateway agents (`tried`, for the access log).
#[allow(clippy::too_many_arguments)]
pub(crate) fn reject_after_tries(
    info: &FlowInfo,
    labels: &FlowLabels,
    metrics: &Metrics,
    usage: Option<&UsageCell>,
    access_log: &AccessLog,
    started: SystemTime,
    outcome: &str,
    message: Option<String>,
    tried: Vec<String>,
) {
    metrics.rejected_connections.get_or_create(labels).inc();
    if let Some(u) = usage {
        u.rejected.fetch_add(1, Ordering::Relaxed);
    }
    let end = SystemTime::now();
    access_log.write(&AccessRecord {
        start: rfc3339(started),
        end: rfc3339(end),
        role: info.role.as_str(),
        vpc_endpoint_id: &info.vpc_endpoint_id,
        consumer_account_id: &info.consumer_account_id,
        client_addr: &info.client_addr,
        resource_configuration_id: &info.resource_configuration_id,
        target: &info.target,
        bytes_in: 0,
        bytes_out: 0,
        duration_ms: millis(end.duration_since(started).unwrap_or_default()),
        outcome,
        message: message.as_deref(),
        tried: &tried,
    });
}

impl OpenFlow {
    pub fn open(
        info: FlowInfo,
        metrics: Arc<Metrics>,
        usage: Option<Arc<UsageCell>>,
        access_log: AccessLog,
        started: SystemTime,
    ) -> Self {
        let series = metrics.flow_series(&info.labels());
        let active = series.active;
        active.inc();
        series.connections.inc();
        // One allocation for both totals.
        let totals: Arc<[AtomicU64; 2]> = Arc::default();
        let bytes_in = ByteCount {
            totals: totals.clone(),
            index: 0,
            counted: series.bytes_in,
            usage: usage.clone(),
            usage_field: |u| &u.bytes_in,
        };
        let bytes_out = ByteCount {
            totals,
            index: 1,
            counted: series.bytes_out,
            usage: usage.clone(),
            usage_field: |u| &u.bytes_out,
        };
        if let Some(u) = &usage {
            u.active.fetch_add(1, Ordering::Relaxed);
            u.total.fetch_add(1, Ordering::Relaxed);
        }
        Self {
            info,
            active,
            bytes_in,
            bytes_out,
            usage,
            access_log,
            started,
            started_at: Instant::now(),
            tried: Vec::new(),
            finished: false,
        }
    }

    /// Notes the gateway agents that failed before this flow opened.
    pub fn with_tried(mut self, tried: Vec<String>) -> Self {
        self.tried = tried;
        self
    }

    /// Bytes moved from the consumer toward the resource.
    pub fn add_in(&self, n: u64) {
        self.bytes_in.add(n);
    }

    /// Bytes moved from the resource toward the consumer.
    pub fn add_out(&self, n: u64) {
        self.bytes_out.add(n);
    }

    /// [`OpenFlow::add_in`] for another task (a tunnel's driver moving an attached flow's bytes).
    pub fn counter_in(&self) -> impl Fn(u64) + Send + Sync + 'static {
        let count = self.bytes_in.clone();
        move |n| count.add(n)
    }

    /// [`OpenFlow::add_out`] for another task.
    pub fn counter_out(&self) -> impl Fn(u64) + Send + Sync + 'static {
        let count = self.bytes_out.clone();
        move |n| count.add(n)
    }

    /// Ends the flow with an outcome (`closed`, `revoked`, `shutdown`, `error`).
    pub fn finish(mut self, outcome: &str, message: Option<String>) {
        self.close(outcome, message);
    }

    fn close(&mut self, outcome: &str, message: Option<String>) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.active.dec();
        if let Some(u) = &self.usage {
            u.active.fetch_sub(1, Ordering::Relaxed);
        }
        let info = &self.info;
        self.access_log.write(&AccessRecord {
            start: rfc3339(self.started),
            end: rfc3339(SystemTime::now()),
            role: info.role.as_str(),
            vpc_endpoint_id: &info.vpc_endpoint_id,
            consumer_account_id: &info.consumer_account_id,
            client_addr: &info.client_addr,
            resource_configuration_id: &info.resource_configuration_id,
            target: &info.target,
            bytes_in: self.bytes_in.totals[0].load(Ordering::Relaxed),
            bytes_out: self.bytes_out.totals[1].load(Ordering::Relaxed),
            duration_ms: millis(self.started_at.elapsed()),
            outcome,
            message: message.as_deref(),
            tried: &self.tried,
        });
    }
}

impl Drop for OpenFlow {
    fn drop(&mut self) {
        self.close("error", Some("connection task ended unexpectedly".into()));
    }
}
