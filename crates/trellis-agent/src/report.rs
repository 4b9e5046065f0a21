//! Reports to the control plane every `report_interval`, and at once whenever
//! the served state changes (a new config applied, a listener became ready or
//! failed): the config version served, listener readiness, and cumulative
//! gateway usage counters under this boot's id.
//!
//! Reports go out on a fixed interval, with no backoff, so they double as the
//! agent's probe of the control plane: the first report that gets through
//! after failures wakes the config long-poll ([`ControlPlaneBack`]), which may
//! be sleeping in a long backoff, so revocations made once the control plane
//! is back reach the data plane within seconds.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use trellis_proto::agent_api::AgentReport;

use crate::control_client::ControlClient;
use crate::endpoint::ServedState;
use crate::usage::UsageTable;

/// Signalled when the control plane answers again after a failure; the
/// config long-poll waits on it during its backoff.
pub type ControlPlaneBack = Arc<Notify>;

/// The report for the current state.
pub fn build_report(boot_id: &str, advertise: Option<&str>, served: &ServedState, usage: &UsageTable) -> AgentReport {
    AgentReport {
        config_version: served.config_version,
        boot_id: boot_id.to_string(),
        listeners: served.listeners.clone(),
        usage: usage.snapshot(),
        advertise: advertise.map(str::to_string),
    }
}

/// Sends reports until `shutdown`; signals `control_plane_back` when a report
/// gets through after failures.
#[allow(clippy::too_many_arguments)]
pub async fn run_reporter(
    client: ControlClient,
    interval: Duration,
    boot_id: String,
    advertise: Option<String>,
    mut served: watch::Receiver<ServedState>,
    usage: Arc<UsageTable>,
    control_plane_back: ControlPlaneBack,
    shutdown: CancellationToken,
) {
    let mut failures: u64 = 0;
    loop {
        let report = build_report(&boot_id, advertise.as_deref(), &served.borrow_and_update(), &usage);
        let sent = tokio::select! {
            r = client.report(&report) => r,
            () = shutdown.cancelled() => return,
        };
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
}
