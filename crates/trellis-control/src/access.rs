//! The sharing rule (`trellis_model::configuration_access`) over the store,
//! with look-ups sized for thousands of consumers of one resource.
//!
//! Two shapes, because the two callers ask opposite questions:
//! - [`access_to`]: may *this* account use *this* configuration? Reads only
//!   the shares that name the account and its own invitations: work in
//!   proportion to what was shared with it, never to how many others a
//!   resource is shared with. API calls and endpoint agents' configs use it.
//! - [`ShareIndex`]: which of *all* consumers may use a configuration? Built
//!   from the shares of it and the invitations the owner sent (listed once,
//!   kept between compilations by [`crate::lists`]), it answers per consumer
//!   in O(1). Gateway agents' configs use it.
//!
//! Both read through the transaction they are given, so the config cache
//! records exactly the shares and invitations a config depended on.

use std::collections::HashMap;

use trellis_model::{
    Access, Account, AccountId, InvitationStatus, Principal, ResourceConfiguration, ResourceConfigurationId,
    ResourceShare, ResourceShareInvitation, ShareStatus, configuration_access, same_organization,
};
use trellis_store::{Filter, StoreError, Tx, TxExt};

/// The configuration whose shares decide access to `config`: its GROUP for a CHILD, else itself.
pub fn shared_id(config: &ResourceConfiguration) -> &ResourceConfigurationId {
    config.resource_configuration_group_id.as_ref().unwrap_or(&config.id)
}

/// Whether `me` may use `config` now: owner, or an active share of the owner
/// names `me` and `me` accepted it (or both are in one organization).
pub fn access_to(tx: &mut dyn Tx, me: &Account, config: &ResourceConfiguration) -> Result<Access, StoreError> {
    if me.id == config.account_id {
        return Ok(Access::Owner);
    }
    let shared = shared_id(config);
    let shares: Vec<ResourceShare> = tx
        .list_obj::<ResourceShare>(&Filter::reference(me.id.as_str()))?
        .into_iter()
        .filter(|s| s.account_id == config.account_id && s.status == ShareStatus::Active)
        .filter(|s| s.principals.contains(&me.id) && s.shares_configuration(shared))
        .collect();
    if shares.is_empty() {
        return Ok(Access::Denied);
    }
    let Some(owner) = tx.get_obj::<Account>(config.account_id.as_str())? else { return Ok(Access::Denied) };
    let mut invitations = Vec::new();
    if !same_organization(me.organization_id.as_ref(), owner.organization_id.as_ref()) {
        for share in &shares {
            invitations.extend(tx.list_obj::<ResourceShareInvitation>(&Filter::account_and_reference(
                me.id.as_str(),
                share.id.as_str(),
            ))?);
        }
    }
    Ok(configuration_access(
        Principal { account_id: &me.id, organization_id: me.organization_id.as_ref() },
        Principal { account_id: &owner.id, organization_id: owner.organization_id.as_ref() },
        config,
        &shares,
        &invitations,
    ))
}

/// Every consumer's access to one shared configuration (a SINGLE or a GROUP) of one owner.
#[derive(Debug)]
pub struct ShareIndex {
    owner: AccountId,
    owner_organization: Option<trellis_model::OrganizationId>,
    /// Principals of the owner's active shares of the configuration, and
    /// whether one of those shares' invitations to them was accepted.
    principals: HashMap<AccountId, bool>,
}

/// The invitations an owner sent, by (share, receiver): loaded once per
/// compilation and shared by every [`ShareIndex`] of that owner.
#[derive(Debug, Default)]
pub struct SentInvitations {
    accepted: HashMap<(String, AccountId), bool>,
}

impl SentInvitations {
    /// From the invitations that reference `owner` (its sent and received ones).
    pub fn new<'a>(owner: &AccountId, invitations: impl IntoIterator<Item = &'a ResourceShareInvitation>) -> Self {
        let mut accepted = HashMap::new();
        for inv in invitations.into_iter().filter(|inv| &inv.sender_account_id == owner) {
            accepted.insert(
                (inv.resource_share_id.to_string(), inv.receiver_account_id.clone()),
                inv.status == InvitationStatus::Accepted,
            );
        }
        Self { accepted }
    }
}

impl ShareIndex {
    /// From the shares that reference `shared` (a SINGLE or GROUP id): the
    /// owner's active ones decide.
    pub fn new<'a>(
        owner: &Account,
        shared: &ResourceConfigurationId,
        shares: impl IntoIterator<Item = &'a ResourceShare>,
        sent: &SentInvitations,
    ) -> Self {
        let mut principals: HashMap<AccountId, bool> = HashMap::new();
        for share in shares
            .into_iter()
            .filter(|s| s.account_id == owner.id && s.status == ShareStatus::Active && s.shares_configuration(shared))
        {
            for p in &share.principals {
                let accepted = sent.accepted.get(&(share.id.to_string(), p.clone())).copied().unwrap_or(false);
                *principals.entry(p.clone()).or_default() |= accepted;
            }
        }
        Self { owner: owner.id.clone(), owner_organization: owner.organization_id.clone(), principals }
    }

    /// Whether `consumer` may use the configuration; reads the consumer's
    /// account only when an organization could waive the invitation.
    pub fn allows(&self, tx: &mut dyn Tx, consumer: &AccountId) -> Result<bool, StoreError> {
        if consumer == &self.owner {
            return Ok(true);
        }
        match self.principals.get(consumer) {
            None => Ok(false),
            Some(true) => Ok(true),
            Some(false) if self.owner_organization.is_none() => Ok(false),
            Some(false) => {
                let account = tx.get_obj::<Account>(consumer.as_str())?;
                Ok(account
                    .is_some_and(|a| same_organization(a.organization_id.as_ref(), self.owner_organization.as_ref())))
            }
        }
    }
}
