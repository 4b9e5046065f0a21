//! Cumulative gateway-side usage per (endpoint, resource, consumer account),
//! reported to the control plane so owners can see who uses their resources.
//! Counters start at zero with each boot id and only grow (except `active`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use trellis_proto::agent_api::UsageCounters;

/// Which (endpoint, resource, consumer account) a counter set belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UsageKey {
    pub vpc_endpoint_id: String,
    pub resource_configuration_id: String,
    pub consumer_account_id: String,
}

/// Live counters of one key, updated while connections run.
#[derive(Debug, Default)]
pub struct UsageCell {
    pub active: AtomicU64,
    pub total: AtomicU64,
    pub rejected: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// All usage counters of this boot.
#[derive(Debug, Default)]
pub struct UsageTable {
    cells: Mutex<HashMap<UsageKey, Arc<UsageCell>>>,
}

impl UsageTable {
    /// The counters of `key`, created at zero on first use.
    pub fn cell(&self, key: UsageKey) -> Arc<UsageCell> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
        let mut cells = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        cells.entry(key).or_default().clone()
    }

    /// A copy of every counter, sorted for stable reports.
    pub fn snapshot(&self) -> Vec<UsageCounters> {
        let cells = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<UsageCounters> = cells
            .iter()
            .map(|(k, c)| UsageCounters {
                vpc_endpoint_id: k.vpc_endpoint_id.clone(),
                resource_configuration_id: k.resource_configuration_id.clone(),
                consumer_account_id: k.consumer_account_id.clone(),
                active_connections: c.active.load(Ordering::Relaxed),
                total_connections: c.total.load(Ordering::Relaxed),
                rejected_connections: c.rejected.load(Ordering::Relaxed),
                bytes_in: c.bytes_in.load(Ordering::Relaxed),
                bytes_out: c.bytes_out.load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.resource_configuration_id, &a.vpc_endpoint_id, &a.consumer_account_id).cmp(&(
                &b.resource_configuration_id,
                &b.vpc_endpoint_id,
                &b.consumer_account_id,
            ))
        });
        out
    }
}
