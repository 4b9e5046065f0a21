//! The sharing rule: may an account use (read, and create endpoints to) a
//! resource configuration?
//!
//! Yes when the account owns it, or when an ACTIVE share of the owner names
//! the configuration (or, for a CHILD, its GROUP) and the account as a
//! principal, and either the account accepted that share's invitation or
//! both accounts are in the same organization.

use crate::ids::{AccountId, OrganizationId, ResourceShareId};
use crate::objects::{ResourceConfiguration, ResourceShare, ResourceShareInvitation};
use crate::status::{InvitationStatus, ShareStatus};

/// An account as the sharing rule sees it.
#[derive(Clone, Copy, Debug)]
pub struct Principal<'a> {
    pub account_id: &'a AccountId,
    pub organization_id: Option<&'a OrganizationId>,
}

/// Why an account may use a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// The account owns the configuration.
    Owner,
    /// An active share grants it (accepted, or inside one organization).
    Shared(ResourceShareId),
    /// Neither: the caller must answer "not found or not shared with you".
    Denied,
}

impl Access {
    pub fn is_allowed(&self) -> bool {
        !matches!(self, Access::Denied)
    }
}

/// Whether two accounts are in the same organization (no invitation needed between them).
pub fn same_organization(a: Option<&OrganizationId>, b: Option<&OrganizationId>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a == b)
}

/// Applies the sharing rule.
///
/// `shares` and `invitations` may contain unrelated records; only the
/// owner's active shares of this configuration (or its group) that name the
/// caller count, with the caller's invitations for them.
pub fn configuration_access(
    caller: Principal<'_>,
    owner: Principal<'_>,
    config: &ResourceConfiguration,
    shares: &[ResourceShare],
    invitations: &[ResourceShareInvitation],
) -> Access {
    if caller.account_id == &config.account_id {
        return Access::Owner;
    }
    if owner.account_id != &config.account_id {
        return Access::Denied;
    }
    let shared_id = config.resource_configuration_group_id.as_ref().unwrap_or(&config.id);
    let same_org = same_organization(caller.organization_id, owner.organization_id);
    shares
        .iter()
        .filter(|s| s.account_id == config.account_id && s.status == ShareStatus::Active)
        .filter(|s| s.principals.contains(caller.account_id) && s.shares_configuration(shared_id))
        .find(|s| {
            same_org
                || invitations.iter().any(|i| {
                    i.resource_share_id == s.id
                        && &i.receiver_account_id == caller.account_id
                        && i.status == InvitationStatus::Accepted
                })
        })
        .map_or(Access::Denied, |s| Access::Shared(s.id.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::*;
    use crate::objects::*;
    use crate::status::ResourceStatus;
    use crate::time::Timestamp;

    const R: &str = "local";

    fn acct(n: u8) -> AccountId {
        AccountId::generate(&[n; 16])
    }

    fn config(owner: &AccountId, n: u8, group: Option<ResourceConfigurationId>) -> ResourceConfiguration {
        let id = ResourceConfigurationId::generate(&[n; 16]);
        ResourceConfiguration {
            arn: ResourceConfiguration::arn_for(R, owner, &id),
            id,
            account_id: owner.clone(),
            name: "db".into(),
            config_type: if group.is_some() { ConfigurationType::Child } else { ConfigurationType::Single },
            status: ResourceStatus::Active,
            resource_gateway_id: ResourceGatewayId::generate(&[1; 16]),
            resource_configuration_group_id: group,
            resource_configuration_definition: None,
            port_ranges: vec![],
            protocol: Protocol::Tcp,
            custom_domain_name: None,
            proxy_protocol: Default::default(),
            per_consumer_limits: None,
            created_at: Timestamp::from_unix_seconds(0),
        }
    }

    fn share(owner: &AccountId, cfg: &ResourceConfiguration, to: &AccountId) -> ResourceShare {
        ResourceShare::new(
            ResourceShareId::generate(&[9; 16]),
            owner.clone(),
            "s".into(),
            vec![cfg.arn.clone()],
            vec![to.clone()],
            R,
            Timestamp::from_unix_seconds(0),
        )
    }

    fn invitation(s: &ResourceShare, to: &AccountId, status: InvitationStatus) -> ResourceShareInvitation {
        let mut i = ResourceShareInvitation::new(
            ResourceShareInvitationId::generate(&[8; 16]),
            s,
            to.clone(),
            R,
            Timestamp::from_unix_seconds(0),
        );
        i.status = status;
        i
    }

    fn p(a: &AccountId) -> Principal<'_> {
        Principal { account_id: a, organization_id: None }
    }

    #[test]
    fn the_owner_may_always_use_its_configuration() {
        let o = acct(1);
        let c = config(&o, 1, None);
        assert_eq!(configuration_access(p(&o), p(&o), &c, &[], &[]), Access::Owner);
    }

    #[test]
    fn a_share_is_usable_only_after_its_invitation_is_accepted() {
        let (o, c_acct) = (acct(1), acct(2));
        let c = config(&o, 1, None);
        let s = share(&o, &c, &c_acct);
        assert_eq!(configuration_access(p(&c_acct), p(&o), &c, std::slice::from_ref(&s), &[]), Access::Denied);
        let pending = invitation(&s, &c_acct, InvitationStatus::Pending);
        assert_eq!(configuration_access(p(&c_acct), p(&o), &c, std::slice::from_ref(&s), &[pending]), Access::Denied);
        let rejected = invitation(&s, &c_acct, InvitationStatus::Rejected);
        assert_eq!(configuration_access(p(&c_acct), p(&o), &c, std::slice::from_ref(&s), &[rejected]), Access::Denied);
        let accepted = invitation(&s, &c_acct, InvitationStatus::Accepted);
        assert_eq!(
            configuration_access(p(&c_acct), p(&o), &c, std::slice::from_ref(&s), &[accepted]),
            Access::Shared(s.id)
        );
    }

    #[test]
    fn an_accepted_share_grants_nothing_to_other_accounts_or_configurations() {
        let (o, c_acct, third) = (acct(1), acct(2), acct(3));
        let c = config(&o, 1, None);
        let other = config(&o, 2, None);
        let s = share(&o, &c, &c_acct);
        let accepted = invitation(&s, &c_acct, InvitationStatus::Accepted);
        let shares = [s];
        let invs = [accepted];
        assert_eq!(configuration_access(p(&third), p(&o), &c, &shares, &invs), Access::Denied);
        assert_eq!(configuration_access(p(&c_acct), p(&o), &other, &shares, &invs), Access::Denied);
    }

    #[test]
    fn same_organization_needs_no_invitation() {
        let (o, c_acct) = (acct(1), acct(2));
        let org = OrganizationId::generate(&[4; 16]);
        let other_org = OrganizationId::generate(&[5; 16]);
        let c = config(&o, 1, None);
        let s = share(&o, &c, &c_acct);
        let owner = Principal { account_id: &o, organization_id: Some(&org) };
        let member = Principal { account_id: &c_acct, organization_id: Some(&org) };
        let outsider = Principal { account_id: &c_acct, organization_id: Some(&other_org) };
        assert!(configuration_access(member, owner, &c, std::slice::from_ref(&s), &[]).is_allowed());
        assert!(!configuration_access(outsider, owner, &c, &[s], &[]).is_allowed());
    }

    #[test]
    fn a_revoked_or_deleting_share_grants_nothing() {
        let (o, c_acct) = (acct(1), acct(2));
        let c = config(&o, 1, None);
        let mut s = share(&o, &c, &c_acct);
        let accepted = invitation(&s, &c_acct, InvitationStatus::Accepted);
        s.status = ShareStatus::Deleting;
        assert_eq!(configuration_access(p(&c_acct), p(&o), &c, &[s], std::slice::from_ref(&accepted)), Access::Denied);
        assert_eq!(configuration_access(p(&c_acct), p(&o), &c, &[], &[accepted]), Access::Denied);
    }

    #[test]
    fn children_are_reached_through_their_groups_share() {
        let (o, c_acct) = (acct(1), acct(2));
        let mut group = config(&o, 1, None);
        group.config_type = ConfigurationType::Group;
        let child = config(&o, 2, Some(group.id.clone()));
        let s = share(&o, &group, &c_acct);
        let accepted = invitation(&s, &c_acct, InvitationStatus::Accepted);
        assert!(configuration_access(p(&c_acct), p(&o), &child, &[s], &[accepted]).is_allowed());
    }

    #[test]
    fn a_share_by_someone_other_than_the_owner_grants_nothing() {
        let (o, c_acct, thief) = (acct(1), acct(2), acct(3));
        let c = config(&o, 1, None);
        let s = share(&thief, &c, &c_acct);
        let accepted = invitation(&s, &c_acct, InvitationStatus::Accepted);
        assert_eq!(configuration_access(p(&c_acct), p(&o), &c, &[s], &[accepted]), Access::Denied);
    }
}
