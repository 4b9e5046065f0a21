//! Reports to the control plane every `report_interval`, and at once whenever
//! the served state changes (a new config applied, a listener became ready or
//! failed): the config version served, listener readiness, and cumulative
//! gateway usage counters under this boot's id.
//!
//! Usage is sent only for counters that changed since the control plane last
//! took them, and long lists are split into several reports of at most
//! [`MAX_ENTRIES_PER_REPORT`] entries, so a busy gateway's reports stay small.
//!
//! Reports go out on a fixed interval, with no backoff, so they double as the
//! agent's probe of the control plane: the first report that gets through
//! after failures wakes the config long-poll ([`ControlPlaneBack`]), which may
//! be sleeping in a long backoff, so revocations made once the control plane
//! is back reach the data plane within seconds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use trellis_proto::agent_api::{AgentReport, TargetHealthReport, UsageCounters};

use crate::control_client::ControlClient;
use crate::endpoint::ServedState;
use crate::gateway::services::ServiceRuntime;
use crate::usage::UsageTable;

/// Signalled when the control plane answers again after a failure; the
/// config long-poll waits on it during its backoff.
pub type ControlPlaneBack = Arc<Notify>;

/// Most listener or usage entries in one report (the control plane takes up to 2,000).
pub const MAX_ENTRIES_PER_REPORT: usize = 1_000;

type UsageKey = (String, String, String);

fn usage_key(u: &UsageCounters) -> UsageKey {
    (u.vpc_endpoint_id.clone(), u.resource_configuration_id.clone(), u.consumer_account_id.clone())
}

/// The report for the current state, with every usage counter (and no target health).
pub fn build_report(boot_id: &str, advertise: Option<&str>, served: &ServedState, usage: &UsageTable) -> AgentReport {
    AgentReport {
        config_version: served.config_version,
        boot_id: boot_id.to_string(),
        listeners: served.listeners.clone(),
        usage: usage.snapshot(),
        advertise: advertise.map(str::to_string),
        target_health: Vec::new(),
        outbound_only: None,
    }
}

/// `report` with only the usage that differs from what was `acknowledged`,
/// split into reports of at most [`MAX_ENTRIES_PER_REPORT`] listeners and usage entries each.
pub fn split_report(report: AgentReport, acknowledged: &HashMap<UsageKey, UsageCounters>) -> Vec<AgentReport> {
    let changed: Vec<UsageCounters> =
        report.usage.into_iter().filter(|u| acknowledged.get(&usage_key(u)) != Some(u)).collect();
    let parts = changed.len().max(report.listeners.len()).div_ceil(MAX_ENTRIES_PER_REPORT).max(1);
    let mut listeners = report.listeners.chunks(MAX_ENTRIES_PER_REPORT);
    let mut usage = changed.chunks(MAX_ENTRIES_PER_REPORT);
    (0..parts)
        .map(|_| AgentReport {
            config_version: report.config_version,
            boot_id: report.boot_id.clone(),
            listeners: listeners.next().map(<[_]>::to_vec).unwrap_or_default(),
            usage: usage.next().map(<[_]>::to_vec).unwrap_or_default(),
            advertise: report.advertise.clone(),
            // The health of every target goes in the first part whole: the control plane replaces it.
            target_health: Vec::new(),
            outbound_only: report.outbound_only,
        })
        .enumerate()
        .map(|(i, mut part)| {
            if i == 0 {
                part.target_health.clone_from(&report.target_health);
            }
            part
        })
        .collect()
}

/// Sends reports until `shutdown`; signals `control_plane_back` when a report
/// gets through after failures.
#[allow(clippy::too_many_arguments)]
pub async fn run_reporter(
    client: ControlClient,
    interval: Duration,
    boot_id: String,
    advertise: Option<String>,
    outbound_only: bool,
    mut served: watch::Receiver<ServedState>,
    usage: Arc<UsageTable>,
    services: Arc<ServiceRuntime>,
    control_plane_back: ControlPlaneBack,
    shutdown: CancellationToken,
) {
    let mut failures: u64 = 0;
    let mut acknowledged: HashMap<UsageKey, UsageCounters> = HashMap::new();
    let mut health_changed = services.subscribe();
    // Target health is sent whole when it changed since the control plane last took it.
    let mut health_sent: Option<Vec<TargetHealthReport>> = None;
    loop {
        let mut report = build_report(&boot_id, advertise.as_deref(), &served.borrow_and_update(), &usage);
        report.outbound_only = Some(outbound_only);
        health_changed.borrow_and_update();
        let health = services.report();
        if health_sent.as_ref() != Some(&health) {
            report.target_health.clone_from(&health);
        }
        let mut sent = Ok(());
        for part in split_report(report, &acknowledged) {
            sent = tokio::select! {
                r = client.report(&part) => r,
                () = shutdown.cancelled() => return,
            };
            if sent.is_err() {
                break;
            }
            if !part.target_health.is_empty() {
                health_sent = Some(part.target_health.clone());
            }
            acknowledged.extend(part.usage.into_iter().map(|u| (usage_key(&u), u)));
        }
        match sent {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(failures, "usage reports reach the control plane again");
                    // A stored permit also covers a poller that is mid-request right now.
                    control_plane_back.notify_one();
                }
                failures = 0;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures, "could not send the usage report; will retry");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            r = served.changed() => if r.is_err() { return },
            r = health_changed.changed() => if r.is_err() { return },
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::UsageKey;
    use std::sync::atomic::Ordering;
    use trellis_proto::agent_api::ListenerStatus;

    #[test]
    fn report_carries_served_version_listeners_and_usage() {
        let usage = UsageTable::default();
        let cell = usage.cell(UsageKey {
            vpc_endpoint_id: "vpce-1".into(),
            resource_configuration_id: "rcfg-1".into(),
            consumer_account_id: "acct-1".into(),
        });
        cell.total.fetch_add(2, Ordering::Relaxed);
        cell.bytes_in.fetch_add(100, Ordering::Relaxed);
        let served = ServedState {
            config_version: 9,
            listeners: vec![ListenerStatus {
                vpc_endpoint_id: "vpce-1".into(),
                resource_configuration_id: "rcfg-1".into(),
                ready: true,
                error: None,
            }],
        };
        let r = build_report("boot-1", Some("127.0.0.1:7443"), &served, &usage);
        assert_eq!(r.advertise.as_deref(), Some("127.0.0.1:7443"));
        assert_eq!(r.config_version, 9);
        assert_eq!(r.boot_id, "boot-1");
        assert!(r.listeners[0].ready);
        assert_eq!((r.usage[0].total_connections, r.usage[0].bytes_in), (2, 100));
    }

    fn counters(n: usize, total: u64) -> UsageCounters {
        UsageCounters {
            vpc_endpoint_id: format!("vpce-{n}"),
            resource_configuration_id: "rcfg-1".into(),
            consumer_account_id: "acct-1".into(),
            total_connections: total,
            ..UsageCounters::default()
        }
    }

    #[test]
    fn only_changed_usage_is_sent_in_bounded_parts() {
        let report = AgentReport {
            boot_id: "b".into(),
            usage: (0..2_500).map(|n| counters(n, 1)).collect(),
            ..AgentReport::default()
        };
        let parts = split_report(report.clone(), &HashMap::new());
        assert_eq!(parts.iter().map(|p| p.usage.len()).collect::<Vec<_>>(), [1_000, 1_000, 500]);
        let acknowledged: HashMap<_, _> = report.usage.iter().map(|u| (usage_key(u), u.clone())).collect();
        let mut next = report.clone();
        next.usage[7].total_connections = 2;
        let parts = split_report(next, &acknowledged);
        assert_eq!(parts.len(), 1, "an unchanged report is still sent, for liveness");
        assert_eq!(parts[0].usage, vec![counters(7, 2)]);
    }
}
