//! Connection notifications (DESIGN §8): the event hook handlers call inside
//! their write transaction ([`record`]), and the delivery worker ([`run`])
//! that POSTs signed webhooks beside the API.
//!
//! [`record`] is a transactional outbox: it writes one pending
//! `NotificationDelivery` per subscribed notification in the caller's
//! transaction, so an event is recorded if and only if the change commits.
//! It costs one indexed list per scope (service, endpoint, or account) when
//! nobody subscribes. It never does I/O: the worker delivers, outside any
//! transaction, so a slow or dead receiver never slows the API.

mod deliver;
pub mod sign;
pub mod target;

use std::time::Duration;

use trellis_model::{
    AccountId, ConnectionNotification, EndpointState, EventBody, NotificationDelivery, NotificationScope,
    ResourceConfigurationId, ResourceShareId, ResourceShareInvitation, ResourceShareInvitationId, RetrySchedule,
    Timestamp, VpcEndpoint, VpcEndpointId, VpcEndpointServiceId, delivery_id,
};
use trellis_store::{Filter, Tx, TxExt};

pub use deliver::run;
pub use trellis_model::ConnectionEvent as EventKind;

use crate::error::ApiError;

/// How the delivery worker sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookSettings {
    /// Deliver to loopback, link-local and private addresses too
    /// (`trellis server --allow-private-webhooks`; `trellis dev` and tests).
    pub allow_private: bool,
    /// When failed deliveries are tried again, and when they fail for good.
    pub retry: RetrySchedule,
    /// Deadline of one attempt (connect, TLS, request and the answer's head).
    pub timeout: Duration,
    /// Attempts in flight at once (one per notification at a time, to keep order).
    pub max_in_flight: usize,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            allow_private: false,
            retry: RetrySchedule::default(),
            timeout: Duration::from_secs(10),
            max_in_flight: 32,
        }
    }
}

impl WebhookSettings {
    /// Checks the settings; the error names the setting.
    pub fn validate(&self) -> Result<(), String> {
        self.retry.validate()?;
        if self.timeout.is_zero() {
            return Err("the webhook timeout must be greater than zero".into());
        }
        if self.max_in_flight == 0 {
            return Err("webhooks need at least one delivery in flight at a time".into());
        }
        Ok(())
    }
}

/// Something that happened, as handlers describe it to [`record`]. Build it
/// with [`Event::endpoint`], [`Event::invitation`] or
/// [`Event::resource_endpoint_created`]; fields that do not apply stay `None`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// Connection events: the service the endpoint connects to (its notifications get the event).
    pub service_id: Option<VpcEndpointServiceId>,
    /// Connection events: the endpoint (its notifications get the event).
    pub vpc_endpoint_id: Option<VpcEndpointId>,
    /// Account-wide events: the account told (the invitation's receiver, the configuration's owner).
    pub account_id: Option<AccountId>,
    pub service_name: Option<String>,
    pub vpc_endpoint_owner: Option<AccountId>,
    pub vpc_endpoint_state: Option<EndpointState>,
    pub resource_configuration_id: Option<ResourceConfigurationId>,
    pub resource_share_id: Option<ResourceShareId>,
    pub resource_share_arn: Option<String>,
    pub resource_share_name: Option<String>,
    pub resource_share_invitation_id: Option<ResourceShareInvitationId>,
    pub sender_account_id: Option<AccountId>,
}

impl Event {
    fn empty(kind: EventKind) -> Self {
        Self {
            kind,
            service_id: None,
            vpc_endpoint_id: None,
            account_id: None,
            service_name: None,
            vpc_endpoint_owner: None,
            vpc_endpoint_state: None,
            resource_configuration_id: None,
            resource_share_id: None,
            resource_share_arn: None,
            resource_share_name: None,
            resource_share_invitation_id: None,
            sender_account_id: None,
        }
    }

    /// A connection event (`Connect`, `Accept`, `Reject`, `Delete`) of
    /// `endpoint`, as it is after the change: told to the notifications on
    /// its service and on the endpoint itself.
    pub fn endpoint(kind: EventKind, endpoint: &VpcEndpoint) -> Self {
        Self {
            service_id: endpoint.service_id.clone(),
            vpc_endpoint_id: Some(endpoint.id.clone()),
            service_name: endpoint.service_name.clone(),
            vpc_endpoint_owner: Some(endpoint.account_id.clone()),
            vpc_endpoint_state: Some(endpoint.state),
            resource_configuration_id: endpoint.resource_configuration_id.clone(),
            ..Self::empty(kind)
        }
    }

    /// `ResourceShareInvitation`: told to the receiver's account-wide notifications.
    pub fn invitation(invitation: &ResourceShareInvitation) -> Self {
        Self {
            account_id: Some(invitation.receiver_account_id.clone()),
            resource_share_id: Some(invitation.resource_share_id.clone()),
            resource_share_arn: Some(invitation.resource_share_arn.clone()),
            resource_share_name: Some(invitation.resource_share_name.clone()),
            resource_share_invitation_id: Some(invitation.id.clone()),
            sender_account_id: Some(invitation.sender_account_id.clone()),
            ..Self::empty(EventKind::ResourceShareInvitation)
        }
    }

    /// `ResourceEndpointCreate`: a `Resource` endpoint was created; told to
    /// the configuration owner's account-wide notifications when the
    /// endpoint is another account's.
    pub fn resource_endpoint_created(endpoint: &VpcEndpoint) -> Self {
        Self {
            account_id: endpoint.resource_configuration_owner_id.clone(),
            vpc_endpoint_id: Some(endpoint.id.clone()),
            vpc_endpoint_owner: Some(endpoint.account_id.clone()),
            vpc_endpoint_state: Some(endpoint.state),
            resource_configuration_id: endpoint.resource_configuration_id.clone(),
            ..Self::empty(EventKind::ResourceEndpointCreate)
        }
    }

    fn body(&self, notification: &ConnectionNotification, event_id: String, now: Timestamp) -> EventBody {
        EventBody {
            event_id,
            event_type: self.kind,
            event_time: now,
            connection_notification_id: notification.id.clone(),
            account_id: notification.account_id.clone(),
            service_id: self.service_id.clone(),
            service_name: self.service_name.clone(),
            vpc_endpoint_id: self.vpc_endpoint_id.clone(),
            vpc_endpoint_owner: self.vpc_endpoint_owner.clone(),
            vpc_endpoint_state: self.vpc_endpoint_state,
            resource_configuration_id: self.resource_configuration_id.clone(),
            resource_share_id: self.resource_share_id.clone(),
            resource_share_arn: self.resource_share_arn.clone(),
            resource_share_name: self.resource_share_name.clone(),
            resource_share_invitation_id: self.resource_share_invitation_id.clone(),
            sender_account_id: self.sender_account_id.clone(),
        }
    }
}

/// The notifications that subscribe to `event`, each once.
fn subscribers(tx: &mut dyn Tx, event: &Event) -> Result<Vec<ConnectionNotification>, ApiError> {
    let mut found: Vec<ConnectionNotification> = Vec::new();
    if event.kind.is_connection_event() {
        let scopes = [
            event.service_id.clone().map(NotificationScope::Service),
            event.vpc_endpoint_id.clone().map(NotificationScope::Endpoint),
        ];
        for scope in scopes.into_iter().flatten() {
            let key = scope.store_ref();
            found.extend(tx.list_obj::<ConnectionNotification>(&Filter::reference(&key))?);
        }
    } else {
        let Some(account) = &event.account_id else { return Ok(Vec::new()) };
        if event.kind == EventKind::ResourceEndpointCreate && event.vpc_endpoint_owner.as_ref() == Some(account) {
            return Ok(Vec::new());
        }
        let key = NotificationScope::Account.store_ref();
        found = tx.list_obj::<ConnectionNotification>(&Filter::account_and_reference(account.as_str(), &key))?;
    }
    found.retain(|n| n.wants(event.kind));
    found.sort_by(|a, b| a.id.cmp(&b.id));
    found.dedup_by(|a, b| a.id == b.id);
    Ok(found)
}

/// Records a delivery for every notification that subscribes to this event,
/// in the caller's transaction (the event exists iff the change commits).
///
/// Each notification numbers its events; the delivery's id (and event id) is
/// `<notification id>-<sequence>`. Recording the event beyond the last
/// [`trellis_model::MAX_DELIVERIES_KEPT`] drops the oldest delivery of that
/// notification. The worker is woken after the commit (see `AppState::write`).
pub fn record(tx: &mut dyn Tx, event: &Event, now: Timestamp) -> Result<(), ApiError> {
    for mut notification in subscribers(tx, event)? {
        notification.last_sequence += 1;
        let sequence = notification.last_sequence;
        tx.update_obj(&notification)?;
        let event_id = delivery_id(&notification.id, sequence);
        let body = event.body(&notification, event_id, now);
        tx.insert_obj(&NotificationDelivery::new(&notification, sequence, body, now))?;
        if let Some(old) = sequence.checked_sub(trellis_model::MAX_DELIVERIES_KEPT).filter(|s| *s > 0) {
            tx.delete_obj::<NotificationDelivery>(&delivery_id(&notification.id, old))?;
        }
    }
    Ok(())
}

/// Deletes a notification with its secret and every delivery (pending ones
/// included) in the caller's transaction.
pub fn delete_notification(tx: &mut dyn Tx, notification: &ConnectionNotification) -> Result<(), ApiError> {
    let key = notification.id.to_string();
    for d in tx.list_obj::<NotificationDelivery>(&Filter::reference(&key))? {
        tx.delete_obj::<NotificationDelivery>(&d.event_id)?;
    }
    tx.delete_obj::<trellis_model::ConnectionNotificationSecret>(notification.id.as_str())?;
    tx.delete_obj::<ConnectionNotification>(notification.id.as_str())?;
    Ok(())
}
