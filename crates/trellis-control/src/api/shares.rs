//! Resource shares: an owner shares SINGLE or GROUP configurations with
//! accounts. Principals outside the owner's organization get a PENDING
//! invitation; inside it the share is usable at once. Deleting a share
//! revokes it: consumers' endpoints stay but turn `Failed` with a reason,
//! and agents drop them from their next config.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use trellis_api::shares::{self, CreateShare};
use trellis_model::{
    Account, AccountId, ConfigurationType, ResourceConfiguration, ResourceConfigurationId, ResourceShare,
    ResourceShareId, ResourceShareInvitation, ResourceShareInvitationId, Seed, kinds, parse_identifier,
    same_organization, validate_name,
};
use trellis_store::{Filter, TxExt};

use super::endpoints::reassess_endpoints_of;
use super::idempotency::create_once;
use super::{ClientToken, Json, PathId, Routes, created, get_owned, no_duplicates, path_id};
use crate::auth::AccountAuth;
use crate::error::{ApiError, invalid_reference};
use crate::notify::{self, Event};
use crate::state::{AppState, now, seed};

/// Most principals one share may name.
pub const MAX_PRINCIPALS: usize = 5_000;

pub fn routes() -> Routes {
    Routes::new()
        .at(&shares::CREATE, create)
        .at(&shares::LIST, super::list_owned::<ResourceShare>)
        .at(&shares::GET, super::read_owned::<ResourceShare>)
        .at(&shares::DELETE, delete)
}

async fn create(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    Json(body): Json<CreateShare>,
) -> Result<Response, ApiError> {
    validate_name(&body.name)?;
    let config_ids = body
        .resource_arns
        .iter()
        .map(|a| parse_identifier::<ResourceConfigurationId>(a, kinds::RESOURCE_CONFIGURATION))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid_reference("resourceArns", e))?;
    no_duplicates("resourceArns", &config_ids)?;
    let principals = body
        .principals
        .iter()
        .map(|p| AccountId::parse(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid_reference("principals", e))?;
    no_duplicates("principals", &principals)?;
    if principals.contains(&me.id) {
        return Err(ApiError::invalid(
            "ValidationError",
            "principals lists your own account; you always reach your own resources",
        ));
    }
    if principals.len() > MAX_PRINCIPALS {
        return Err(ApiError::invalid(
            "ValidationError",
            format!("principals lists {} accounts; a share may name at most {MAX_PRINCIPALS}", principals.len()),
        ));
    }
    st.share_rate.take(me.id.as_str(), std::time::Instant::now()).map_err(|wait| {
        ApiError::too_many_requests(
            format!("this account creates shares faster than {} a minute", st.settings.shares_per_minute.max(1)),
            wait,
        )
    })?;
    let token = ClientToken::new(me.id.as_str(), "resourceshares", body.client_token.as_deref(), &body)?;
    let id = ResourceShareId::generate(&seed()?);
    let invitation_seeds = principals.iter().map(|_| seed()).collect::<Result<Vec<Seed>, _>>()?;
    let (now, region) = (now(), st.region().to_string());
    let outcome = st
        .write(move |tx| {
            create_once(tx, token.as_ref(), now, |tx| {
                let mut arns = Vec::with_capacity(config_ids.len());
                for cid in &config_ids {
                    let config =
                        get_owned::<ResourceConfiguration>(tx, &me.id, cid.as_str(), "resource configuration")?;
                    if config.config_type == ConfigurationType::Child {
                        return Err(ApiError::invalid(
                            "ValidationError",
                            format!(
                                "{} is a CHILD configuration, which cannot be shared alone; share its GROUP {}",
                                config.id,
                                config.resource_configuration_group_id.as_ref().map_or("", |g| g.as_str())
                            ),
                        ));
                    }
                    arns.push(config.arn);
                }
                // A principal that names no account gets no invitation, and the
                // answer is the same as for an existing one: a share must not
                // tell a tenant which account ids exist.
                let mut receivers = Vec::with_capacity(principals.len());
                for p in &principals {
                    receivers.extend(tx.get_obj::<Account>(p.as_str())?);
                }
                let share = ResourceShare::new(
                    id.clone(),
                    me.id.clone(),
                    body.name.clone(),
                    arns,
                    principals.clone(),
                    &region,
                    now,
                );
                tx.insert_obj(&share)?;
                for (receiver, seed) in receivers.iter().zip(&invitation_seeds) {
                    if same_organization(me.organization_id.as_ref(), receiver.organization_id.as_ref()) {
                        continue;
                    }
                    let invitation = ResourceShareInvitation::new(
                        ResourceShareInvitationId::generate(seed),
                        &share,
                        receiver.id.clone(),
                        &region,
                        now,
                    );
                    tx.insert_obj(&invitation)?;
                    notify::record(tx, &Event::invitation(&invitation), now)?;
                }
                Ok(share)
            })
        })
        .await?;
    Ok(created(outcome))
}

async fn delete(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<StatusCode, ApiError> {
    let id: ResourceShareId = path_id(&raw)?;
    st.write(move |tx| {
        let share = get_owned::<ResourceShare>(tx, &me.id, id.as_str(), "resource share")?;
        let invitations = tx.list_obj::<ResourceShareInvitation>(&Filter::reference(share.id.as_str()))?;
        for invitation in invitations.iter().filter(|i| i.resource_share_id == share.id) {
            tx.delete_obj::<ResourceShareInvitation>(invitation.id.as_str())?;
        }
        tx.delete_obj::<ResourceShare>(share.id.as_str())?;
        for config in share.resource_configuration_ids() {
            reassess_endpoints_of(tx, &config, &share.principals)?;
        }
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

impl super::Owned for ResourceShare {
    type Id = ResourceShareId;
    const WHAT: &'static str = "resource share";
}
