//! `GET /v1/agents/self/config?after=V&waitSeconds=S`: the config long-poll.
//!
//! The agent's config is compiled from the store on every wake-up. Versions
//! are numbered per agent by content: an [`AgentRuntime`] record keeps the
//! latest version and the SHA-256 of its content, so the version only grows
//! and grows only when the content changes. A request whose `after` is
//! behind gets the config at once; otherwise it waits on
//! [`AppState::changes`], re-compiling after each store change, until a
//! newer config exists (200) or `waitSeconds` pass (304).

use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use trellis_model::{Agent, AgentId};
use trellis_proto::AgentConfig;
use trellis_store::{StoreError, Tx, TxExt};

use super::AgentAuth;
use super::records::AgentRuntime;
use crate::api::{Json, Query};
use crate::compile::compile;
use crate::error::ApiError;
use crate::pki::sha256_hex;
use crate::state::AppState;
use crate::tls::ShutdownSignal;

pub const DEFAULT_WAIT_SECONDS: u64 = 25;
pub const MAX_WAIT_SECONDS: u64 = 60;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigQuery {
    /// The version the agent has; 0 (or absent) for none.
    pub after: Option<u64>,
    /// How long to wait for a newer config (default 25, at most 60).
    pub wait_seconds: Option<u64>,
}

fn content_sha256(config: &AgentConfig) -> Result<String, ApiError> {
    let json = serde_json::to_vec(config).map_err(|e| ApiError::internal(format!("encoding a config: {e}")))?;
    Ok(sha256_hex(&json))
}

/// The agent's config from `tx`, unnumbered, or a 401 when the agent was deleted.
fn compile_for(tx: &mut dyn Tx, agent_id: &AgentId, region: &str) -> Result<(AgentConfig, String), ApiError> {
    let agent: Agent = tx
        .get_obj(agent_id.as_str())?
        .ok_or_else(|| ApiError::unauthorized("this agent was deleted; enroll again with a new join token"))?;
    let config = compile(tx, &agent, region).map_err(ApiError::from)?;
    let hash = content_sha256(&config)?;
    Ok((config, hash))
}

/// The version to give `hash`, or `None` when `runtime` already numbers it and
/// `after` is not ahead of it.
fn next_version(runtime: Option<&AgentRuntime>, hash: &str, after: u64) -> Option<u64> {
    let current = runtime.map_or(0, |r| r.config_version);
    let same = runtime.is_some_and(|r| r.config_sha256 == hash);
    if same && after <= current {
        return None;
    }
    // An agent ahead of the store (the control plane's database was restored
    // from an older backup) gets a version above its own so it applies it.
    Some(current.max(after) + 1)
}

/// Compiles the agent's current config and gives it its version, recording a
/// new version only when the content changed.
pub async fn current_config(state: &AppState, agent_id: &AgentId, after: u64) -> Result<AgentConfig, ApiError> {
    let region = state.region().to_string();
    let id = agent_id.clone();
    let (mut config, hash, runtime) = state
        .read(move |tx| {
            let (config, hash) = compile_for(tx, &id, &region)?;
            let runtime = tx.get_obj::<AgentRuntime>(id.as_str())?;
            Ok((config, hash, runtime))
        })
        .await?;
    match next_version(runtime.as_ref(), &hash, after) {
        None => {
            config.version = runtime.map_or(0, |r| r.config_version);
            Ok(config)
        }
        Some(_) => {
            // Compile again inside the write so the number and the content are of one snapshot.
            let region = state.region().to_string();
            let id = agent_id.clone();
            state
                .write(move |tx| {
                    let (mut config, hash) = compile_for(tx, &id, &region)?;
                    let runtime = tx.get_obj::<AgentRuntime>(id.as_str())?;
                    config.version = match next_version(runtime.as_ref(), &hash, after) {
                        None => runtime.map_or(0, |r| r.config_version),
                        Some(version) => {
                            let record = AgentRuntime {
                                id: id.clone(),
                                account_id: trellis_model::AccountId::parse(&config.account_id)
                                    .map_err(|e| ApiError::internal(e.to_string()))?,
                                config_version: version,
                                config_sha256: hash.clone(),
                                boot_id: runtime.as_ref().and_then(|r| r.boot_id.clone()),
                            };
                            upsert(tx, &record, runtime.is_some())?;
                            version
                        }
                    };
                    Ok(config)
                })
                .await
        }
    }
}

pub(super) fn upsert(tx: &mut dyn Tx, record: &AgentRuntime, exists: bool) -> Result<(), StoreError> {
    if exists { tx.update_obj(record) } else { tx.insert_obj(record) }
}

pub(super) async fn config(
    State(state): State<AppState>,
    AgentAuth(agent): AgentAuth,
    shutdown: Option<Extension<ShutdownSignal>>,
    Query(query): Query<ConfigQuery>,
) -> Result<Response, ApiError> {
    let shutdown = shutdown.map(|Extension(ShutdownSignal(token))| token).unwrap_or_default();
    let after = query.after.unwrap_or(0);
    let wait = Duration::from_secs(query.wait_seconds.unwrap_or(DEFAULT_WAIT_SECONDS).min(MAX_WAIT_SECONDS));
    let deadline = tokio::time::Instant::now() + wait;
    let mut changes = state.changes.subscribe();
    loop {
        // Mark the current revision seen before compiling, so a change that
        // lands during the compile wakes the next wait.
        changes.borrow_and_update();
        let config = current_config(&state, &agent.id, after).await?;
        if config.version > after {
            return Ok(Json(config).into_response());
        }
        let woke = tokio::select! {
            changed = tokio::time::timeout_at(deadline, changes.changed()) => matches!(changed, Ok(Ok(()))),
            () = shutdown.cancelled() => false,
        };
        if !woke {
            // Nothing newer before the deadline, or the server is shutting down.
            return Ok(StatusCode::NOT_MODIFIED.into_response());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_model::AccountId;

    fn runtime(version: u64, hash: &str) -> AgentRuntime {
        AgentRuntime {
            id: AgentId::generate(&[1; 16]),
            account_id: AccountId::generate(&[2; 16]),
            config_version: version,
            config_sha256: hash.into(),
            boot_id: None,
        }
    }

    #[test]
    fn versions_grow_only_when_content_changes() {
        assert_eq!(next_version(None, "a", 0), Some(1));
        assert_eq!(next_version(Some(&runtime(3, "a")), "a", 0), None);
        assert_eq!(next_version(Some(&runtime(3, "a")), "a", 3), None);
        assert_eq!(next_version(Some(&runtime(3, "a")), "b", 3), Some(4));
        assert_eq!(next_version(Some(&runtime(3, "a")), "a", 9), Some(10), "an agent ahead of the store is overtaken");
    }
}
