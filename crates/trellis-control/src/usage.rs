//! `GET /v1/resourceconfigurations/{id}/usage`: who uses the owner's resource.
//!
//! Sums the counters gateway agents report (see `agents::report`) per
//! consumer account, endpoint and resource, over agents and boots. Totals,
//! rejections and bytes add up across boots; active connections count only
//! from an agent's current boot while it is ONLINE, since a restarted or
//! silent agent's old connections are gone. Only the owner may ask: a
//! consumer that can read the configuration (it was shared with it) gets 403,
//! anyone else the same 404 as for an unknown configuration (no existence leak).

use std::collections::{BTreeMap, HashMap};

use axum::extract::State;
pub use trellis_api::configurations::{UsageItem, UsageReport};
use trellis_model::{AccountId, Agent, AgentStatus, Id, ResourceConfiguration, ResourceConfigurationId};
use trellis_store::{Filter, Tx, TxExt};

use crate::agents::records::{AgentRuntime, UsageRecord};
use crate::api::{Json, PathId, Routes, get_owned, path_id};
use crate::auth::AccountAuth;
use crate::error::ApiError;
use crate::state::AppState;

/// Routes of usage reporting.
pub fn routes() -> Routes {
    Routes::new().at(&trellis_api::configurations::USAGE, usage)
}

/// Sums the usage of `config` (and, for a GROUP, of its children).
pub fn aggregate(tx: &mut dyn Tx, config: &ResourceConfiguration) -> Result<UsageReport, ApiError> {
    let items = sum(tx, &config.account_id, config.id.as_str())?;
    Ok(UsageReport { resource_configuration_id: config.id.to_string(), items })
}

/// Sums the usage records of `owner` that reference `subject` (a resource
/// configuration, its GROUP, or an endpoint service) per consumer account,
/// endpoint and resource, over agents and boots.
pub fn sum(tx: &mut dyn Tx, owner: &AccountId, subject: &str) -> Result<Vec<UsageItem>, ApiError> {
    let records: Vec<UsageRecord> = tx.list_obj(&Filter::account_and_reference(owner.as_str(), subject))?;
    // Per agent: the boot whose active connections count now (None: none count).
    let mut live_boot: HashMap<String, Option<String>> = HashMap::new();
    let mut items: BTreeMap<(String, String, String), UsageItem> = BTreeMap::new();
    for r in records {
        let agent_id = r.agent_id.to_string();
        if !live_boot.contains_key(&agent_id) {
            let online = tx.get_obj::<Agent>(&agent_id)?.is_some_and(|a| a.status == AgentStatus::Online);
            let boot = match online {
                true => tx.get_obj::<AgentRuntime>(&agent_id)?.and_then(|rt| rt.boot_id),
                false => None,
            };
            live_boot.insert(agent_id.clone(), boot);
        }
        let live = live_boot[&agent_id].as_deref() == Some(r.boot_id.as_str());
        let key =
            (r.consumer_account_id.to_string(), r.vpc_endpoint_id.to_string(), r.resource_configuration_id.clone());
        let item = items.entry(key.clone()).or_insert_with(|| UsageItem {
            consumer_account_id: key.0,
            vpc_endpoint_id: key.1,
            resource_configuration_id: key.2,
            ..UsageItem::default()
        });
        if live {
            item.active_connections = item.active_connections.saturating_add(r.active_connections);
        }
        let totals = r.previous_boots.plus_boot_of(&r);
        item.total_connections = item.total_connections.saturating_add(totals.total_connections);
        item.rejected_connections = item.rejected_connections.saturating_add(totals.rejected_connections);
        item.bytes_in = item.bytes_in.saturating_add(totals.bytes_in);
        item.bytes_out = item.bytes_out.saturating_add(totals.bytes_out);
    }
    Ok(items.into_values().collect())
}

async fn usage(
    State(state): State<AppState>,
    AccountAuth(account): AccountAuth,
    PathId(raw): PathId,
) -> Result<Json<UsageReport>, ApiError> {
    let id: ResourceConfigurationId = path_id(&raw)?;
    let report = state
        .read(move |tx| {
            let config =
                match get_owned::<ResourceConfiguration>(tx, &account.id, id.as_str(), ResourceConfigurationId::KIND) {
                    Ok(config) => config,
                    Err(not_owned) => {
                        // Tells a consumer why, without telling anyone else that the configuration exists.
                        crate::api::configurations::get_visible(tx, &account, id.as_str()).map_err(|_| not_owned)?;
                        return Err(ApiError::forbidden(format!(
                            "only the owner sees usage of resource configuration {id}; it is shared with your account, \
                         which may use it but not see who else does"
                        )));
                    }
                };
            aggregate(tx, &config)
        })
        .await?;
    Ok(Json(report))
}
