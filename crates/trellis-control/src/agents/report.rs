//! `POST /v1/agents/self/report`: liveness, listener readiness and usage.
//!
//! - The agent is ONLINE, with `lastSeenAt` and the config version it serves
//!   (kept in its [`AgentRuntime`], which no config is compiled from).
//! - Endpoints it serves move to `Available` when every listener it reports
//!   for them is ready, to `Failed` (with the listener's error) when one failed.
//! - Usage counters are cumulative per boot; one record per (agent, endpoint,
//!   resource) holds the current boot's counters and the totals of earlier
//!   boots (see [`UsageRecord`]).
//!
//! A report is checked against the agent's own compiled config: listeners of
//! endpoints it does not serve and usage of resources its gateway does not
//! serve are dropped, so an agent can neither move other endpoints nor grow
//! the store with ids it invents. Reports that change nothing (the usual
//! case) write nothing: liveness is written at most every few seconds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use trellis_model::{
    Account, AccountId, Agent, AgentId, AgentStatus, EndpointState, ResourceConfiguration, ResourceConfigurationId,
    Timestamp, VpcEndpoint, VpcEndpointId, VpcEndpointService, VpcEndpointServiceId,
};
use trellis_proto::AgentConfig;
use trellis_proto::agent_api::{AgentReport, ListenerStatus, UsageCounters};
use trellis_store::{Tx, TxExt};

use super::AgentAuth;
use super::records::{AgentRuntime, BootTotals, TargetHealthRecord, UsageRecord};
use crate::api::Json;
use crate::error::ApiError;
use crate::state::{AppState, now};

/// Most listener or usage entries one report may carry (agents split larger ones).
pub const MAX_REPORT_ENTRIES: usize = 2_000;
const MAX_ERROR_LEN: usize = 500;

/// What the last report of each agent changed, so a report that changes
/// nothing is answered without a write; and when each agent last changed
/// its mode (outbound-only or direct).
///
/// A mode change wakes every relay's config (they list the outbound-only
/// agents), so one agent may change its mode at most once per liveness
/// interval: a report asking for another change sooner keeps the current
/// mode, and a later report (agents repeat their mode in every report)
/// applies it. An honest agent changes its mode only when restarted with
/// other flags, and never meets the limit.
#[derive(Debug, Default)]
pub struct ReportMemo {
    seen: Mutex<HashMap<String, Seen>>,
    /// When each agent last changed its mode (or was let change it).
    mode_changed: Mutex<HashMap<String, Instant>>,
}

#[derive(Debug, Clone, PartialEq)]
struct Seen {
    boot_id: String,
    advertise: Option<String>,
    outbound_only: Option<bool>,
    config_version: u64,
    listeners: u64,
    /// Digest of the last target health the agent sent (reports without health keep it).
    health: Option<u64>,
    written_at: Instant,
}

impl ReportMemo {
    fn unchanged(&self, agent: &AgentId, now: &Seen, liveness_every: Duration) -> bool {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.get(agent.as_str()).is_some_and(|s| {
            s.boot_id == now.boot_id
                && s.advertise == now.advertise
                && s.outbound_only == now.outbound_only
                && s.config_version == now.config_version
                && s.listeners == now.listeners
                && (now.health.is_none() || s.health == now.health)
                && s.written_at.elapsed() < liveness_every
        })
    }

    fn record(&self, agent: &AgentId, mut now: Seen) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if now.health.is_none() {
            now.health = seen.get(agent.as_str()).and_then(|s| s.health);
        }
        seen.insert(agent.to_string(), now);
    }

    /// Whether a report asking `agent` (outbound-only now: `current`) for
    /// mode `requested` (`None`: the mode stays) may change its mode now. A
    /// change let through counts from now on: it is claimed before the
    /// write, so concurrent reports cannot all change the mode.
    fn may_change_mode(&self, agent: &AgentId, current: bool, requested: Option<bool>, every: Duration) -> bool {
        if requested.is_none_or(|r| r == current) {
            return true;
        }
        let mut changed = self.mode_changed.lock().unwrap_or_else(PoisonError::into_inner);
        if changed.get(agent.as_str()).is_some_and(|at| at.elapsed() < every) {
            return false;
        }
        changed.insert(agent.to_string(), Instant::now());
        true
    }

    /// Forgets a deleted agent.
    pub fn forget(&self, agent: &AgentId) {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).remove(agent.as_str());
        self.mode_changed.lock().unwrap_or_else(PoisonError::into_inner).remove(agent.as_str());
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

fn digest(listeners: &[ListenerStatus]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for l in listeners {
        (&l.vpc_endpoint_id, &l.resource_configuration_id, l.ready, &l.error).hash(&mut h);
    }
    h.finish()
}

/// Keeps only what the agent's config lets it report: listeners of endpoints
/// it serves, usage of resources its gateway serves.
fn within_config(config: &AgentConfig, mut report: AgentReport) -> AgentReport {
    let served: HashSet<(&str, &str)> = config
        .endpoints
        .iter()
        .flat_map(|e| {
            e.resources.iter().map(move |r| (e.vpc_endpoint_id.as_str(), r.resource_configuration_id.as_str()))
        })
        .collect();
    report.listeners.retain(|l| served.contains(&(l.vpc_endpoint_id.as_str(), l.resource_configuration_id.as_str())));
    let services: HashSet<&str> = config.gateway.services.iter().map(|s| s.service_id.as_str()).collect();
    let resources: HashSet<&str> = config
        .gateway
        .resources
        .iter()
        .map(|r| r.resource_configuration_id.as_str())
        .chain(services.iter().copied())
        .collect();
    report.usage.retain(|u| resources.contains(u.resource_configuration_id.as_str()));
    report.target_health.retain(|t| services.contains(t.service_id.as_str()));
    for t in &mut report.target_health {
        t.target = t.target.chars().take(MAX_ERROR_LEN).collect();
        t.state = t.state.chars().take(16).collect();
        if let Some(reason) = &mut t.reason {
            *reason = reason.chars().filter(|c| !c.is_control()).take(MAX_ERROR_LEN).collect();
        }
    }
    report.listeners.sort_by(|a, b| {
        (&a.vpc_endpoint_id, &a.resource_configuration_id).cmp(&(&b.vpc_endpoint_id, &b.resource_configuration_id))
    });
    report
}

pub(super) async fn report(
    State(state): State<AppState>,
    AgentAuth(agent): AgentAuth,
    Json(report): Json<AgentReport>,
) -> Result<StatusCode, ApiError> {
    validate_boot_id(&report.boot_id)?;
    if report.listeners.len() > MAX_REPORT_ENTRIES
        || report.usage.len() > MAX_REPORT_ENTRIES
        || report.target_health.len() > MAX_REPORT_ENTRIES
    {
        return Err(ApiError::invalid(
            "ValidationError",
            format!(
                "a report may carry at most {MAX_REPORT_ENTRIES} listeners and {MAX_REPORT_ENTRIES} usage entries; \
                 send the rest in another report"
            ),
        ));
    }
    if let Some(advertise) = &report.advertise {
        super::enroll::validate_advertise(advertise)?;
        if report.outbound_only == Some(true) {
            return Err(ApiError::invalid(
                "ValidationError",
                "an outbound-only agent has no tunnel listener: give either advertise or outboundOnly, not both",
            ));
        }
    }
    let compiled = state.configs.current(&state, &agent.id).await?;
    let report = within_config(&compiled.config, report);
    let seen = Seen {
        boot_id: report.boot_id.clone(),
        advertise: report.advertise.clone(),
        outbound_only: report.outbound_only,
        config_version: report.config_version,
        listeners: digest(&report.listeners),
        health: (!report.target_health.is_empty()).then(|| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            report.target_health.hash(&mut h);
            h.finish()
        }),
        written_at: Instant::now(),
    };
    let liveness_every = (state.settings.offline_after / 4).max(Duration::from_secs(1));
    if report.usage.is_empty() && state.reports.unchanged(&agent.id, &seen, liveness_every) {
        return Ok(StatusCode::NO_CONTENT);
    }
    let requested = report.outbound_only.or(report.advertise.is_some().then_some(false));
    let may_change_mode = state.reports.may_change_mode(&agent.id, agent.outbound_only, requested, liveness_every);
    let (now, config) = (now(), compiled.config.clone());
    let id = agent.id.clone();
    state.write(move |tx| apply_report(tx, &id, &config, &report, now, may_change_mode)).await?;
    state.reports.record(&agent.id, seen);
    Ok(StatusCode::NO_CONTENT)
}

/// Applies one report (already cut to the agent's `config`) inside a write
/// transaction; a change of mode only if `may_change_mode` (else the mode
/// and address stay as they are).
pub fn apply_report(
    tx: &mut dyn Tx,
    agent_id: &AgentId,
    config: &AgentConfig,
    report: &AgentReport,
    now: Timestamp,
    may_change_mode: bool,
) -> Result<(), ApiError> {
    let mut agent: Agent = tx
        .get_obj(agent_id.as_str())?
        .ok_or_else(|| ApiError::unauthorized("this agent was deleted; enroll again with a new join token"))?;
    let mut moved = report.advertise.as_ref().filter(|a| agent.advertise.as_deref() != Some(a.as_str()));
    // An outbound-only agent has no listener: an address from before is gone.
    // An agent that reports a listener address is not outbound-only (whatever it enrolled as).
    let mut outbound_only = report.outbound_only.unwrap_or(agent.outbound_only && report.advertise.is_none());
    if outbound_only != agent.outbound_only && !may_change_mode {
        // Too soon after the last change (see [`ReportMemo`]): a later report applies it.
        outbound_only = agent.outbound_only;
        moved = None;
    }
    let mode = agent.outbound_only != outbound_only || (outbound_only && agent.advertise.is_some());
    if agent.status != AgentStatus::Online || moved.is_some() || mode {
        if let Some(advertise) = moved {
            agent.advertise = Some(super::enroll::validate_advertise(advertise)?);
        }
        agent.outbound_only = outbound_only;
        if agent.outbound_only {
            agent.advertise = None;
        }
        agent.status = AgentStatus::Online;
        tx.update_obj(&agent)?;
    }
    let runtime = tx.get_obj::<AgentRuntime>(agent.id.as_str())?;
    let previous_boot = runtime.as_ref().and_then(|r| r.boot_id.clone());
    let record = AgentRuntime {
        id: agent.id.clone(),
        account_id: agent.account_id.clone(),
        boot_id: Some(report.boot_id.clone()),
        last_seen_at: Some(now),
        config_version: report.config_version,
    };
    if runtime.is_some() {
        tx.update_obj(&record)?
    } else {
        tx.insert_obj(&record)?
    }
    if previous_boot.as_deref() != Some(report.boot_id.as_str()) {
        tracing::info!(agent = %agent.id, boot = %report.boot_id, "agent started a new boot");
    }

    apply_listeners(tx, &agent, &report.listeners)?;
    if !report.target_health.is_empty() {
        let stored = tx.get_obj::<TargetHealthRecord>(agent.id.as_str())?;
        // An agent that repeats the same health (a restart, a retried report) writes nothing.
        if stored.as_ref().map(|r| &r.targets) != Some(&report.target_health) {
            let record = TargetHealthRecord {
                id: agent.id.to_string(),
                account_id: agent.account_id.clone(),
                agent_id: agent.id.clone(),
                targets: report.target_health.clone(),
                updated_at: now,
            };
            if stored.is_some() { tx.update_obj(&record)? } else { tx.insert_obj(&record)? }
        }
    }
    for counters in &report.usage {
        apply_usage(tx, &agent, config, &report.boot_id, counters, now)?;
    }
    Ok(())
}

/// Whether the endpoint's account may still use its configuration or service.
fn endpoint_has_access(tx: &mut dyn Tx, endpoint: &VpcEndpoint) -> Result<bool, ApiError> {
    if let Some(service_id) = &endpoint.service_id {
        let service = tx.get_obj::<VpcEndpointService>(service_id.as_str())?;
        return Ok(service.is_some_and(|s| s.allows(&endpoint.account_id)));
    }
    let Some(config_id) = &endpoint.resource_configuration_id else { return Ok(true) };
    let Some(config) = tx.get_obj::<ResourceConfiguration>(config_id.as_str())? else {
        return Ok(false);
    };
    let Some(consumer) = tx.get_obj::<Account>(endpoint.account_id.as_str())? else { return Ok(false) };
    Ok(crate::access::access_to(tx, &consumer, &config)?.is_allowed())
}

/// Moves the endpoints whose listeners changed state.
fn apply_listeners(tx: &mut dyn Tx, agent: &Agent, listeners: &[ListenerStatus]) -> Result<(), ApiError> {
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
        let movable =
            matches!(endpoint.state, EndpointState::Pending | EndpointState::Available | EndpointState::Failed);
        if !movable || (endpoint.state == target && endpoint.failure_reason == reason) {
            continue;
        }
        // A report built from an older config can arrive after a revocation
        // failed this endpoint: readiness never overrides lost access.
        if target == EndpointState::Available && !endpoint_has_access(tx, &endpoint)? {
            continue;
        }
        endpoint.state = endpoint.state.transition(target)?;
        endpoint.failure_reason = reason;
        tx.update_obj(&endpoint)?;
    }
    Ok(())
}

/// The consumer account of usage of `endpoint` on `resource`, when the agent
/// may report it: an endpoint its config allows, or one that existed on the
/// resource (its flows may outlive a revocation).
fn consumer_of(
    tx: &mut dyn Tx,
    config: &AgentConfig,
    endpoint: &VpcEndpointId,
    resource: &ResourceConfiguration,
    known: Option<&UsageRecord>,
) -> Result<Option<AccountId>, ApiError> {
    if let Some(record) = known {
        return Ok(Some(record.consumer_account_id.clone()));
    }
    let allowed = config
        .gateway
        .resources
        .iter()
        .find(|r| r.resource_configuration_id == resource.id.as_str())
        .and_then(|r| r.allowed_endpoint(endpoint.as_str()))
        .and_then(|a| config.gateway.consumer(a));
    if let Some(consumer) = allowed {
        return Ok(AccountId::parse(&consumer.account_id).ok());
    }
    let shared = crate::access::shared_id(resource);
    Ok(tx.get_obj::<VpcEndpoint>(endpoint.as_str())?.filter(|e| e.is_for_configuration(shared)).map(|e| e.account_id))
}

fn apply_usage(
    tx: &mut dyn Tx,
    agent: &Agent,
    config: &AgentConfig,
    boot_id: &str,
    counters: &UsageCounters,
    now: Timestamp,
) -> Result<(), ApiError> {
    let Ok(endpoint_id) = VpcEndpointId::parse(&counters.vpc_endpoint_id) else { return Ok(()) };
    let subject = counters.resource_configuration_id.as_str();
    let id = UsageRecord::record_id(&agent.id, &endpoint_id, subject);
    let known = tx.get_obj::<UsageRecord>(&id)?;
    let (group, consumer) = if let Ok(service_id) = VpcEndpointServiceId::parse(subject) {
        let Some(service) = tx.get_obj::<VpcEndpointService>(service_id.as_str())? else { return Ok(()) };
        if service.account_id != agent.account_id {
            return Ok(());
        }
        let consumer = match &known {
            Some(r) => Some(r.consumer_account_id.clone()),
            None => tx
                .get_obj::<VpcEndpoint>(endpoint_id.as_str())?
                .filter(|e| e.service_id.as_ref() == Some(&service.id))
                .map(|e| e.account_id),
        };
        (None, consumer)
    } else {
        let Ok(resource_id) = ResourceConfigurationId::parse(subject) else { return Ok(()) };
        let Some(resource) = tx.get_obj::<ResourceConfiguration>(resource_id.as_str())? else { return Ok(()) };
        if resource.account_id != agent.account_id {
            return Ok(());
        }
        let consumer = consumer_of(tx, config, &endpoint_id, &resource, known.as_ref())?;
        (resource.resource_configuration_group_id.clone(), consumer)
    };
    let Some(consumer) = consumer else { return Ok(()) };
    let previous_boots = match &known {
        Some(r) if r.boot_id != boot_id => r.previous_boots.plus_boot_of(r),
        Some(r) => r.previous_boots,
        None => BootTotals::default(),
    };
    let record = UsageRecord {
        id,
        account_id: agent.account_id.clone(),
        agent_id: agent.id.clone(),
        boot_id: boot_id.to_string(),
        vpc_endpoint_id: endpoint_id,
        resource_configuration_id: subject.to_string(),
        resource_configuration_group_id: group,
        consumer_account_id: consumer,
        active_connections: counters.active_connections,
        total_connections: counters.total_connections,
        rejected_connections: counters.rejected_connections,
        bytes_in: counters.bytes_in,
        bytes_out: counters.bytes_out,
        previous_boots,
        updated_at: now,
    };
    if known.is_some() {
        tx.update_obj(&record)?
    } else {
        tx.insert_obj(&record)?
    }
    Ok(())
}
