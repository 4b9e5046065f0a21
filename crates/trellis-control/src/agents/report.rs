//! `POST /v1/agents/self/report`: liveness, listener readiness and usage.
//!
//! - The agent becomes ONLINE with `lastSeenAt` now and the config version it serves.
//! - Endpoints it serves move to `Available` when every listener it reports
//!   for them is ready, to `Failed` (with the listener's error) when one failed.
//!   An agent can only move endpoints of its own account in its own subnet.
//! - Usage counters are cumulative per boot: each report replaces the stored
//!   counters of (agent, boot, endpoint, resource), so a lost report loses
//!   nothing and a repeated one counts once; a restart starts a new boot.
//!   Counters are accepted only for resources of the agent's own account.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use trellis_model::{
    Account, AccountId, Agent, AgentStatus, EndpointState, ResourceConfiguration, ResourceConfigurationId, Timestamp,
    VpcEndpoint, VpcEndpointId,
};
use trellis_proto::agent_api::{AgentReport, ListenerStatus, UsageCounters};
use trellis_store::{Tx, TxExt};

use super::AgentAuth;
use super::config::upsert;
use super::records::{AgentRuntime, UsageRecord};
use crate::api::Json;
use crate::error::ApiError;
use crate::state::{AppState, now};

/// Most listener or usage entries one report may carry.
pub const MAX_REPORT_ENTRIES: usize = 10_000;
const MAX_ERROR_LEN: usize = 500;

fn validate_boot_id(boot_id: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&boot_id.len())
        && boot_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid("ValidationError", "bootId must be 1-64 letters, digits, hyphens or underscores"))
    }
}

pub(super) async fn report(
    State(state): State<AppState>,
    AgentAuth(agent): AgentAuth,
    Json(report): Json<AgentReport>,
) -> Result<StatusCode, ApiError> {
    validate_boot_id(&report.boot_id)?;
    if report.listeners.len() > MAX_REPORT_ENTRIES || report.usage.len() > MAX_REPORT_ENTRIES {
        return Err(ApiError::invalid(
            "ValidationError",
            format!("a report may carry at most {MAX_REPORT_ENTRIES} listeners and {MAX_REPORT_ENTRIES} usage entries"),
        ));
    }
    let now = now();
    if let Some(advertise) = &report.advertise {
        super::enroll::validate_advertise(advertise)?;
    }
    // Most reports only refresh liveness and counters, which no agent config
    // depends on: wake the config long-polls only when one might change.
    state.write_then_notify_if(move |tx| Ok(((), apply_report(tx, &agent.id, &report, now)?))).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Applies one report inside a write transaction. Returns whether anything an
/// agent config depends on changed (the agent came back online, moved its
/// tunnel listener, or an endpoint changed state).
pub fn apply_report(
    tx: &mut dyn Tx,
    agent_id: &trellis_model::AgentId,
    report: &AgentReport,
    now: Timestamp,
) -> Result<bool, ApiError> {
    let mut agent: Agent = tx
        .get_obj(agent_id.as_str())?
        .ok_or_else(|| ApiError::unauthorized("this agent was deleted; enroll again with a new join token"))?;
    let mut relevant = agent.status != AgentStatus::Online;
    if let Some(advertise) = &report.advertise
        && agent.advertise.as_deref() != Some(advertise.as_str())
    {
        agent.advertise = Some(super::enroll::validate_advertise(advertise)?);
        relevant = true;
    }
    agent.status = AgentStatus::Online;
    agent.last_seen_at = Some(now);
    agent.config_version = report.config_version;
    tx.update_obj(&agent)?;

    let runtime = tx.get_obj::<AgentRuntime>(agent.id.as_str())?;
    if runtime.as_ref().and_then(|r| r.boot_id.as_deref()) != Some(report.boot_id.as_str()) {
        let record = match &runtime {
            Some(r) => AgentRuntime { boot_id: Some(report.boot_id.clone()), ..r.clone() },
            None => AgentRuntime {
                id: agent.id.clone(),
                account_id: agent.account_id.clone(),
                config_version: 0,
                config_sha256: String::new(),
                boot_id: Some(report.boot_id.clone()),
            },
        };
        upsert(tx, &record, runtime.is_some())?;
    }

    relevant |= apply_listeners(tx, &agent, &report.listeners)?;
    for counters in &report.usage {
        apply_usage(tx, &agent, &report.boot_id, counters, now)?;
    }
    Ok(relevant)
}

/// Whether the endpoint's account may still use its configuration.
fn endpoint_has_access(tx: &mut dyn Tx, endpoint: &VpcEndpoint) -> Result<bool, ApiError> {
    let Some(config) = tx.get_obj::<ResourceConfiguration>(endpoint.resource_configuration_id.as_str())? else {
        return Ok(false);
    };
    let Some(consumer) = tx.get_obj::<Account>(endpoint.account_id.as_str())? else { return Ok(false) };
    Ok(crate::api::configurations::access_to(tx, &consumer, &config)?.is_allowed())
}

/// Returns whether an endpoint changed state.
fn apply_listeners(tx: &mut dyn Tx, agent: &Agent, listeners: &[ListenerStatus]) -> Result<bool, ApiError> {
    let mut changed = false;
    let mut by_endpoint: BTreeMap<&str, Vec<&ListenerStatus>> = BTreeMap::new();
    for l in listeners {
        by_endpoint.entry(l.vpc_endpoint_id.as_str()).or_default().push(l);
    }
    for (endpoint_id, statuses) in by_endpoint {
        let Ok(endpoint_id) = VpcEndpointId::parse(endpoint_id) else { continue };
        let Some(mut endpoint) = tx.get_obj::<VpcEndpoint>(endpoint_id.as_str())? else { continue };
        if endpoint.account_id != agent.account_id || !endpoint.subnet_ids.contains(&agent.subnet_id) {
            continue;
        }
        let failure = statuses.iter().find_map(|l| {
            l.error.as_ref().map(|e| {
                let mut e: String = e.chars().filter(|c| !c.is_control()).take(MAX_ERROR_LEN).collect();
                if e.is_empty() {
                    e = "unknown error".into();
                }
                format!("listener for {} on agent {} failed: {e}", l.resource_configuration_id, agent.id)
            })
        });
        let (target, reason) = match failure {
            Some(reason) => (EndpointState::Failed, Some(reason)),
            None if statuses.iter().all(|l| l.ready) => (EndpointState::Available, None),
            None => continue,
        };
        // A report built from an older config can arrive after a revocation
        // failed this endpoint: readiness never overrides lost access.
        if target == EndpointState::Available && !endpoint_has_access(tx, &endpoint)? {
            continue;
        }
        let movable =
            matches!(endpoint.state, EndpointState::Pending | EndpointState::Available | EndpointState::Failed);
        if !movable || (endpoint.state == target && endpoint.failure_reason == reason) {
            continue;
        }
        endpoint.state = endpoint.state.transition(target)?;
        endpoint.failure_reason = reason;
        tx.update_obj(&endpoint)?;
        changed = true;
    }
    Ok(changed)
}

fn apply_usage(
    tx: &mut dyn Tx,
    agent: &Agent,
    boot_id: &str,
    counters: &UsageCounters,
    now: Timestamp,
) -> Result<(), ApiError> {
    let (Ok(endpoint_id), Ok(resource_id)) = (
        VpcEndpointId::parse(&counters.vpc_endpoint_id),
        ResourceConfigurationId::parse(&counters.resource_configuration_id),
    ) else {
        return Ok(());
    };
    let Some(resource) = tx.get_obj::<ResourceConfiguration>(resource_id.as_str())? else { return Ok(()) };
    if resource.account_id != agent.account_id {
        return Ok(());
    }
    let consumer = match tx.get_obj::<VpcEndpoint>(endpoint_id.as_str())? {
        Some(endpoint) => endpoint.account_id,
        None => match AccountId::parse(&counters.consumer_account_id) {
            Ok(account) => account,
            Err(_) => return Ok(()),
        },
    };
    let id = UsageRecord::record_id(&agent.id, boot_id, &endpoint_id, &resource_id);
    let record = UsageRecord {
        id: id.clone(),
        account_id: resource.account_id.clone(),
        agent_id: agent.id.clone(),
        boot_id: boot_id.to_string(),
        vpc_endpoint_id: endpoint_id,
        resource_configuration_id: resource_id,
        resource_configuration_group_id: resource.resource_configuration_group_id.clone(),
        consumer_account_id: consumer,
        active_connections: counters.active_connections,
        total_connections: counters.total_connections,
        rejected_connections: counters.rejected_connections,
        bytes_in: counters.bytes_in,
        bytes_out: counters.bytes_out,
        updated_at: now,
    };
    if tx.get_obj::<UsageRecord>(&id)?.is_some() {
        tx.update_obj(&record)?;
    } else {
        tx.insert_obj(&record)?;
    }
    Ok(())
}
