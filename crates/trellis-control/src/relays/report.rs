//! `POST /v1/relays/self/report`: liveness, the address the relay is
//! reachable at, the gateway agents attached to it and its open flows.
//!
//! Liveness and counters go to the relay's [`RelayRuntime`], which no config
//! is compiled from; only an address change or coming back ONLINE touches the
//! relay itself (and so the configs that name it). A report that changes
//! nothing but its open-flow count (the usual case) writes nothing: liveness,
//! with the latest count, is written at most every few seconds, as for agents.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use trellis_model::{AgentStatus, Relay, RelayId, Timestamp};
use trellis_proto::RelayConfig;
use trellis_proto::agent_api::RelayReport;
use trellis_store::{Tx, TxExt};

use super::RelayAuth;
use super::records::RelayRuntime;
use crate::agents::enroll::validate_advertise;
use crate::api::Json;
use crate::error::ApiError;
use crate::state::{AppState, now};

/// What the last written report of each relay said, and when the last
/// report (written or not) arrived.
#[derive(Debug, Default)]
pub struct RelayMemo {
    seen: Mutex<HashMap<String, Seen>>,
}

#[derive(Debug)]
struct Seen {
    written: RelayReport,
    written_at: Instant,
    heard: Heard,
}

/// The last report a relay sent, as this process heard it (reports that
/// change nothing are not written, so the store's `lastSeenAt` lags behind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heard {
    pub at: Timestamp,
    pub active_flows: u64,
}

/// Whether two reports say the same of the relay's state. Open flows change
/// on almost every report of a busy relay: they are left out, and ride along
/// with the next liveness write.
fn same_state(a: &RelayReport, b: &RelayReport) -> bool {
    a.boot_id == b.boot_id
        && a.advertise == b.advertise
        && a.config_version == b.config_version
        && a.attached == b.attached
}

impl RelayMemo {
    /// Whether `report`, heard at `now`, needs no write; notes that it was heard.
    fn unchanged(&self, relay: &RelayId, report: &RelayReport, liveness_every: Duration, now: Timestamp) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(s) = seen.get_mut(relay.as_str()) else { return false };
        if !same_state(&s.written, report) || s.written_at.elapsed() >= liveness_every {
            return false;
        }
        s.heard = Heard { at: now, active_flows: report.active_flows };
        true
    }

    fn record(&self, relay: &RelayId, report: RelayReport, now: Timestamp) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let heard = Heard { at: now, active_flows: report.active_flows };
        seen.insert(relay.to_string(), Seen { written: report, written_at: Instant::now(), heard });
    }

    /// The last report heard from `relay` since this process started.
    pub fn heard(&self, relay: &RelayId) -> Option<Heard> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).get(relay.as_str()).map(|s| s.heard)
    }

    /// Forgets a deleted relay.
    pub fn forget(&self, relay: &RelayId) {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).remove(relay.as_str());
    }
}

fn validate_boot_id(boot_id: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&boot_id.len())
        && boot_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid("ValidationError", "bootId must be 1-64 letters, digits, hyphens or underscores"))
    }
}

/// Keeps only what the relay's config lets it report: attached gateways it serves.
fn within_config(config: &RelayConfig, mut report: RelayReport) -> RelayReport {
    report.attached.retain(|a| config.gateway(a).is_some());
    report.attached.sort();
    report.attached.dedup();
    report
}

pub(super) async fn report(
    State(state): State<AppState>,
    RelayAuth(relay): RelayAuth,
    Json(report): Json<RelayReport>,
) -> Result<StatusCode, ApiError> {
    validate_boot_id(&report.boot_id)?;
    let mut report = report;
    if let Some(advertise) = &report.advertise {
        report.advertise = Some(validate_advertise(advertise)?);
    }
    let compiled = state.relay_configs.current(&state, &relay.id).await?;
    let report = within_config(&compiled.config, report);
    let liveness_every = (state.settings.offline_after / 4).max(Duration::from_secs(1));
    let now = now();
    if state.relay_reports.unchanged(&relay.id, &report, liveness_every, now) {
        return Ok(StatusCode::NO_CONTENT);
    }
    let (id, written) = (relay.id.clone(), report.clone());
    state.write(move |tx| apply_report(tx, &id, &written, now)).await?;
    state.relay_reports.record(&relay.id, report, now);
    Ok(StatusCode::NO_CONTENT)
}

/// Applies one report (already cut to the relay's config) inside a write transaction.
pub fn apply_report(tx: &mut dyn Tx, relay_id: &RelayId, report: &RelayReport, now: Timestamp) -> Result<(), ApiError> {
    let mut relay: Relay =
        tx.get_obj(relay_id.as_str())?.ok_or_else(|| ApiError::unauthorized(super::compile::RELAY_DELETED))?;
    let moved = report.advertise.as_ref().filter(|a| **a != relay.advertise);
    if relay.status != AgentStatus::Online || moved.is_some() {
        if let Some(advertise) = moved {
            relay.advertise.clone_from(advertise);
        }
        relay.status = AgentStatus::Online;
        tx.update_obj(&relay)?;
    }
    let runtime = RelayRuntime {
        id: relay.id.to_string(),
        boot_id: Some(report.boot_id.clone()),
        last_seen_at: Some(now),
        config_version: report.config_version,
        attached: report.attached.clone(),
        active_flows: report.active_flows,
    };
    if tx.get_obj::<RelayRuntime>(&runtime.id)?.is_some() {
        tx.update_obj(&runtime)?;
    } else {
        tx.insert_obj(&runtime)?;
    }
    Ok(())
}
