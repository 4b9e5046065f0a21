//! `trellis_store::Object` for the stored objects: record kinds and the refs
//! indexed for lookups (every endpoint of a configuration, every subnet of a VPC, …).

use trellis_store::Object;

use crate::domain::DomainVerification;
use crate::notification::*;
use crate::objects::*;
use crate::service::VpcEndpointService;

impl Object for Account {
    const KIND: &'static str = "account";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn account_id(&self) -> &str {
        self.id.as_str()
    }
    fn refs(&self) -> Vec<String> {
        self.organization_id.iter().map(|o| o.to_string()).collect()
    }
}

impl Object for ApiKey {
    const KIND: &'static str = "api-key";
    fn id(&self) -> &str {
        &self.id
    }
    fn account_id(&self) -> &str {
        self.account_id.as_ref().map_or("", |a| a.as_str())
    }
}

impl Object for Organization {
    const KIND: &'static str = "organization";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn account_id(&self) -> &str {
        ""
    }
}

impl Object for Vpc {
    const KIND: &'static str = "vpc";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn account_id(&self) -> &str {
        self.account_id.as_str()
    }
}

impl Object for Subnet {
    const KIND: &'static str = "subnet";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn account_id(&self) -> &str {
        self.account_id.as_str()
    }
    fn refs(&self) -> Vec<String> {
        vec![self.vpc_id.to_string()]
    }
}

impl Object for ResourceGateway {
    const KIND: &'static str = "resource-gateway";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn account_id(&self) -> &str {
        self.account_id.as_str()
    }
    fn refs(&self) -> Vec<String> {
        std::iter::once(self.vpc_identifier.to_string()).chain(self.subnet_ids.iter().map(|s| s.to_string())).collect()
    }
}

impl Object for ResourceConfiguration {
    const KIND: &'static str = "resource-configuration";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn account_id(&self) -> &str {
        self.account_id.as_str()
    }
    fn refs(&self) -> Vec<String> {
        std::iter::once(self.resource_gateway_id.to_string())
            .chain(self.resource_configuration_group_id.iter().map(|g| g.to_string()))
            .collect()
    }
}

impl Object for ResourceShare {
    const KIND: &'static str = "resource-share";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn account_id(&self) -> &str {
        self.account_id.as_str()
    }
    fn refs(&self) -> Vec<String> {
        self.resource_configuration_ids()
            .iter()
            .map(|c| c.to_string())
            .chain(self.principals.iter().map(|p| p.to_string()))
            .collect()
    }
}

impl Object for ResourceShareInvitation {
    const KIND: &'static str = "resource-share-invitation";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn account_id(&self) -> &str {
        self.receiver_account_id.as_str()
    }
    fn refs(&self) -> Vec<String> {
        vec![self.resource_share_id.to_string(), self.sender_account_id.to_string()]
    }
}

impl Object for VpcEndpoint {
    const KIND: &'static str = "vpc-endpoint";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn account_id(&self) -> &str {
        self.account_id.as_str()
    }
    /// The VPC, its subnets, the configuration or service, every resource in
    /// its DNS entries (the CHILD configurations of a GROUP endpoint) and the
    /// owner (provider) account.
    fn refs(&self) -> Vec<String> {
        let mut refs = vec![self.vpc_id.to_string()];
        refs.extend(self.resource_configuration_id.iter().map(|r| r.to_string()));
        refs.extend(self.service_id.iter().map(|s| s.to_string()));
        refs.extend(self.subnet_ids.iter().map(|s| s.to_string()));
        refs.extend(self.resource_ids().iter().map(|r| r.to_string()));
        refs.extend(self.provider().map(|p| p.to_string()));
        refs.sort();
        refs.dedup();
        refs
    }
}

impl Object for Agent {
    const KIND: &'static str = "agent";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn account_id(&self) -> &str {
        self.account_id.as_str()
    }
    /// Outbound-only agents also carry [`OUTBOUND_ONLY_REF`], so relay configs
    /// list exactly them (and no other agent's write wakes a relay).
    fn refs(&self) -> Vec<String> {
        let mut refs = vec![self.vpc_id.to_string(), self.subnet_id.to_string()];
        if self.outbound_only {
            refs.push(OUTBOUND_ONLY_REF.to_string());
        }
        refs
    }
}

impl Object for Relay {
    const KIND: &'static str = "relay";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    /// Relays are global (the admin's).
    fn account_id(&self) -> &str {
        ""
    }
}

impl Object for DomainVerification {
    const KIND: &'static str = "domain-verification";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn account_id(&self) -> &str {
        self.account_id.as_str()
    }
    /// The domain (lowercase), to find an account's verification of a domain.
    fn refs(&self) -> Vec<String> {
        vec![self.domain_name.to_ascii_lowercase()]
    }
}

impl Object for VpcEndpointService {
    const KIND: &'static str = "vpc-endpoint-service";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn account_id(&self) -> &str {
        self.account_id.as_str()
    }
    /// The VPC, the subnets whose agents run the service, and the allowed
    /// principals (so a consumer's `available` list is one lookup by its id, or `*`).
    fn refs(&self) -> Vec<String> {
        std::iter::once(self.vpc_id.to_string())
            .chain(self.subnet_ids.iter().map(|s| s.to_string()))
            .chain(self.allowed_principals.iter().cloned())
            .collect()
    }
}

impl Object for ConnectionNotification {
    const KIND: &'static str = "connection-notification";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn account_id(&self) -> &str {
        self.account_id.as_str()
    }
    /// The watched service or endpoint, or [`ACCOUNT_WIDE_REF`]: the one
    /// indexed list that finds a scope's subscribers.
    fn refs(&self) -> Vec<String> {
        vec![self.scope().store_ref()]
    }
}

impl Object for ConnectionNotificationSecret {
    const KIND: &'static str = "connection-notification-secret";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn account_id(&self) -> &str {
        self.account_id.as_str()
    }
}

impl Object for NotificationDelivery {
    const KIND: &'static str = "connection-notification-delivery";
    fn id(&self) -> &str {
        &self.event_id
    }
    fn account_id(&self) -> &str {
        self.account_id.as_str()
    }
    /// The notification, and [`PENDING_DELIVERY_REF`] while pending (the outbox).
    fn refs(&self) -> Vec<String> {
        let mut refs = vec![self.connection_notification_id.to_string()];
        if self.state == DeliveryState::Pending {
            refs.push(PENDING_DELIVERY_REF.to_string());
        }
        refs
    }
}
