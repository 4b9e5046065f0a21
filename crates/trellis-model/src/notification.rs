//! Connection notifications (DESIGN §8): signed webhooks an account
//! subscribes to for events on its endpoint services, its endpoints, or
//! (account-wide) share invitations it receives and endpoints other accounts
//! create to its resources.
//!
//! The outbox and the deliveries log are one thing: each event recorded for a
//! notification is one [`NotificationDelivery`], `Pending` until a receiver
//! answers 2xx (`Delivered`) or the retry schedule gives up (`Failed`), with
//! every attempt in it. Pure: the retry schedule takes `now` and the jitter.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::arn::{Arn, kinds};
use crate::ids::*;
use crate::status::EndpointState;
use crate::time::Timestamp;

/// Deliveries kept per notification: recording the next event drops the
/// oldest one beyond this (even one still pending), so a chatty source
/// cannot grow the store without bound.
pub const MAX_DELIVERIES_KEPT: u64 = 1000;
/// Attempts kept in one delivery's log (the first and the latest ones).
pub const MAX_ATTEMPTS_KEPT: usize = 50;
/// Most characters of a webhook secret.
pub const MAX_SECRET_CHARS: usize = 256;
/// Most characters of a webhook URL.
pub const MAX_URL_CHARS: usize = 2048;
/// The ref every pending delivery carries, so the delivery worker finds the
/// outbox with one indexed list.
pub const PENDING_DELIVERY_REF: &str = "delivery:pending";
/// The ref of account-wide notifications (no service, no endpoint).
pub const ACCOUNT_WIDE_REF: &str = "notification:account";

/// What a notification can be told about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ConnectionEvent {
    /// An endpoint asked to connect to the service (scope: service or endpoint).
    Connect,
    /// The provider accepted the endpoint's connection.
    Accept,
    /// The provider rejected the endpoint's connection.
    Reject,
    /// The endpoint was deleted.
    Delete,
    /// Account-wide: another account invited this one to a resource share.
    ResourceShareInvitation,
    /// Account-wide: another account created a `Resource` endpoint to one of this account's resource configurations.
    ResourceEndpointCreate,
}

impl ConnectionEvent {
    pub const ALL: [ConnectionEvent; 6] = [
        Self::Connect,
        Self::Accept,
        Self::Reject,
        Self::Delete,
        Self::ResourceShareInvitation,
        Self::ResourceEndpointCreate,
    ];

    /// The events about one service's or one endpoint's connections.
    pub const CONNECTION: [ConnectionEvent; 4] = [Self::Connect, Self::Accept, Self::Reject, Self::Delete];

    /// The events an account-wide notification takes.
    pub const ACCOUNT: [ConnectionEvent; 2] = [Self::ResourceShareInvitation, Self::ResourceEndpointCreate];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "Connect",
            Self::Accept => "Accept",
            Self::Reject => "Reject",
            Self::Delete => "Delete",
            Self::ResourceShareInvitation => "ResourceShareInvitation",
            Self::ResourceEndpointCreate => "ResourceEndpointCreate",
        }
    }

    /// Whether a connection event (about a service's or an endpoint's connections).
    pub fn is_connection_event(self) -> bool {
        Self::CONNECTION.contains(&self)
    }
}

impl fmt::Display for ConnectionEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not an event; use Connect, Accept, Reject, Delete (with serviceId or vpcEndpointId) or \
     ResourceShareInvitation, ResourceEndpointCreate (account-wide)"
)]
pub struct UnknownEvent(pub String);

impl FromStr for ConnectionEvent {
    type Err = UnknownEvent;
    fn from_str(s: &str) -> Result<Self, UnknownEvent> {
        Self::ALL.into_iter().find(|e| e.as_str() == s).ok_or_else(|| UnknownEvent(crate::clip_echo(s)))
    }
}

/// What a notification watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotificationScope {
    /// Endpoints connecting to this service of the account.
    Service(VpcEndpointServiceId),
    /// This endpoint of the account.
    Endpoint(VpcEndpointId),
    /// The account itself: invitations and resource endpoints.
    Account,
}

impl NotificationScope {
    /// The events this scope may subscribe to.
    pub fn events(&self) -> &'static [ConnectionEvent] {
        match self {
            Self::Service(_) | Self::Endpoint(_) => &ConnectionEvent::CONNECTION,
            Self::Account => &ConnectionEvent::ACCOUNT,
        }
    }

    /// Checks a subscription's events: at least one, none twice, each valid for the scope.
    pub fn check_events(&self, events: &[ConnectionEvent]) -> Result<(), String> {
        if events.is_empty() {
            return Err(format!("connectionEvents is empty; list at least one of {}", list(self.events())));
        }
        for (i, e) in events.iter().enumerate() {
            if events[..i].contains(e) {
                return Err(format!("connectionEvents lists {e} twice"));
            }
            if !self.events().contains(e) {
                let scope = match self {
                    Self::Service(_) => "a notification on a service (serviceId)",
                    Self::Endpoint(_) => "a notification on an endpoint (vpcEndpointId)",
                    Self::Account => "an account-wide notification (no serviceId, no vpcEndpointId)",
                };
                return Err(format!("connectionEvents: {e} is not an event of {scope}; use {}", list(self.events())));
            }
        }
        Ok(())
    }

    /// The indexed ref of notifications of this scope.
    pub fn store_ref(&self) -> String {
        match self {
            Self::Service(id) => id.to_string(),
            Self::Endpoint(id) => id.to_string(),
            Self::Account => ACCOUNT_WIDE_REF.to_string(),
        }
    }
}

fn list(events: &[ConnectionEvent]) -> String {
    events.iter().map(|e| e.as_str()).collect::<Vec<_>>().join(", ")
}

/// Checks a webhook secret: 1 to [`MAX_SECRET_CHARS`] characters.
pub fn check_secret(secret: &str) -> Result<(), String> {
    let n = secret.chars().count();
    if n == 0 {
        return Err("secret is empty; give 1 to 256 characters (e.g. 32 random bytes in hex)".into());
    }
    if n > MAX_SECRET_CHARS {
        return Err(format!("secret has {n} characters; give at most {MAX_SECRET_CHARS}"));
    }
    Ok(())
}

/// Whether a notification sends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ConnectionNotificationState {
    #[default]
    Enabled,
}

/// A subscription: signed webhooks to `url` for `connectionEvents` on a
/// service, an endpoint, or the account. The secret is stored apart
/// ([`ConnectionNotificationSecret`]) and never answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ConnectionNotification {
    pub id: ConnectionNotificationId,
    pub connection_notification_id: ConnectionNotificationId,
    pub arn: String,
    pub account_id: AccountId,
    /// The service whose connections are watched (events about endpoints connecting to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<VpcEndpointServiceId>,
    /// The endpoint watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpc_endpoint_id: Option<VpcEndpointId>,
    pub connection_events: Vec<ConnectionEvent>,
    /// Where events are POSTed.
    pub url: String,
    /// Always true: a secret signs every delivery; it is never answered.
    pub secret_set: bool,
    pub connection_notification_state: ConnectionNotificationState,
    /// Sequence number of the last event recorded for this notification (0: none yet).
    pub last_sequence: u64,
    pub created_at: Timestamp,
}

impl ConnectionNotification {
    pub fn new(
        id: ConnectionNotificationId,
        account_id: AccountId,
        scope: &NotificationScope,
        connection_events: Vec<ConnectionEvent>,
        url: String,
        region: &str,
        now: Timestamp,
    ) -> Self {
        let (service_id, vpc_endpoint_id) = match scope {
            NotificationScope::Service(s) => (Some(s.clone()), None),
            NotificationScope::Endpoint(e) => (None, Some(e.clone())),
            NotificationScope::Account => (None, None),
        };
        Self {
            arn: Arn::new(kinds::CONNECTION_NOTIFICATION, region, account_id.as_str(), id.as_str()).to_string(),
            connection_notification_id: id.clone(),
            id,
            account_id,
            service_id,
            vpc_endpoint_id,
            connection_events,
            url,
            secret_set: true,
            connection_notification_state: ConnectionNotificationState::Enabled,
            last_sequence: 0,
            created_at: now,
        }
    }

    pub fn scope(&self) -> NotificationScope {
        match (&self.service_id, &self.vpc_endpoint_id) {
            (Some(s), _) => NotificationScope::Service(s.clone()),
            (None, Some(e)) => NotificationScope::Endpoint(e.clone()),
            (None, None) => NotificationScope::Account,
        }
    }

    /// Whether this notification takes `event`.
    pub fn wants(&self, event: ConnectionEvent) -> bool {
        self.connection_notification_state == ConnectionNotificationState::Enabled
            && self.connection_events.contains(&event)
    }
}

/// The signing secret of a notification (same id), stored apart so no answer can carry it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionNotificationSecret {
    pub id: ConnectionNotificationId,
    pub account_id: AccountId,
    pub secret: String,
}

impl fmt::Debug for ConnectionNotificationSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionNotificationSecret").field("id", &self.id).field("secret", &"***").finish()
    }
}

/// Where a delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum DeliveryState {
    /// Not yet answered 2xx; retried on schedule.
    Pending,
    /// A receiver answered 2xx.
    Delivered,
    /// The retry schedule gave up (a day after the event).
    Failed,
}

/// One POST of a delivery and what came of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct DeliveryAttempt {
    pub at: Timestamp,
    /// The receiver's HTTP status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    /// Why there was no answer (refused address, DNS, connect, TLS, timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: u64,
}

impl DeliveryAttempt {
    /// Whether the receiver took the event (2xx).
    pub fn succeeded(&self) -> bool {
        self.status_code.is_some_and(|c| (200..300).contains(&c))
    }
}

/// The JSON body POSTed to the receiver. Fields that do not apply to the
/// event are absent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct EventBody {
    /// Unique per delivery and stable across its retries (also the `Trellis-Event-Id` header): dedupe on it.
    pub event_id: String,
    pub event_type: ConnectionEvent,
    /// When the event happened.
    pub event_time: Timestamp,
    pub connection_notification_id: ConnectionNotificationId,
    /// The account of the notification.
    pub account_id: AccountId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<VpcEndpointServiceId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpc_endpoint_id: Option<VpcEndpointId>,
    /// The account that owns the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpc_endpoint_owner: Option<AccountId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpc_endpoint_state: Option<EndpointState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_configuration_id: Option<ResourceConfigurationId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_share_id: Option<ResourceShareId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_share_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_share_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_share_invitation_id: Option<ResourceShareInvitationId>,
    /// The account that shared (invitations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_account_id: Option<AccountId>,
}

/// One event for one notification: the outbox entry and its log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct NotificationDelivery {
    /// `<notification id>-<sequence, 12 digits>`: unique, stable across retries.
    pub event_id: String,
    pub connection_notification_id: ConnectionNotificationId,
    pub account_id: AccountId,
    /// The notification's events are numbered 1, 2, …; delivered in this order.
    pub sequence: u64,
    pub event_type: ConnectionEvent,
    pub state: DeliveryState,
    /// The body POSTed (the same bytes on every attempt).
    pub event: EventBody,
    /// The last [`MAX_ATTEMPTS_KEPT`] attempts (the first one included), oldest first.
    pub attempts: Vec<DeliveryAttempt>,
    /// Attempts made, including any no longer kept in `attempts`.
    pub attempt_count: u32,
    /// When the next attempt is due (pending deliveries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<Timestamp>,
    pub created_at: Timestamp,
}

/// The event id (and store id) of a notification's `sequence`-th delivery;
/// ids sort in sequence order.
pub fn delivery_id(notification: &ConnectionNotificationId, sequence: u64) -> String {
    format!("{notification}-{sequence:012}")
}

impl NotificationDelivery {
    /// A pending delivery, due at once.
    pub fn new(notification: &ConnectionNotification, sequence: u64, event: EventBody, now: Timestamp) -> Self {
        Self {
            event_id: event.event_id.clone(),
            connection_notification_id: notification.id.clone(),
            account_id: notification.account_id.clone(),
            sequence,
            event_type: event.event_type,
            state: DeliveryState::Pending,
            event,
            attempts: Vec::new(),
            attempt_count: 0,
            next_attempt_at: Some(now),
            created_at: now,
        }
    }

    /// Adds an attempt to the log (keeping the first and the latest ones).
    pub fn log(&mut self, attempt: DeliveryAttempt) {
        if self.attempts.len() >= MAX_ATTEMPTS_KEPT {
            self.attempts.remove(1);
        }
        self.attempts.push(attempt);
        self.attempt_count = self.attempt_count.saturating_add(1);
    }

    /// Records `attempt` and moves on: `Delivered` on 2xx, else `Pending`
    /// again after `retry` (None: `Failed`).
    pub fn finish_attempt(&mut self, attempt: DeliveryAttempt, retry: Option<Duration>, now: Timestamp) {
        let ok = attempt.succeeded();
        self.log(attempt);
        match (ok, retry) {
            (true, _) => {
                self.state = DeliveryState::Delivered;
                self.next_attempt_at = None;
            }
            (false, Some(wait)) => self.next_attempt_at = Some(now.plus(wait)),
            (false, None) => {
                self.state = DeliveryState::Failed;
                self.next_attempt_at = None;
            }
        }
    }
}

/// When failed deliveries are tried again: `first_retry`, doubling up to
/// `max_retry`, each wait between half and all of its nominal value
/// (jitter), until `give_up_after` has passed since the event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetrySchedule {
    pub first_retry: Duration,
    pub max_retry: Duration,
    pub give_up_after: Duration,
}

impl Default for RetrySchedule {
    /// 1 s, 2 s, 4 s, … up to an hour between attempts, for a day.
    fn default() -> Self {
        Self {
            first_retry: Duration::from_secs(1),
            max_retry: Duration::from_secs(3600),
            give_up_after: Duration::from_secs(24 * 3600),
        }
    }
}

impl RetrySchedule {
    /// The nominal wait after the `failures`-th failed attempt (1-based).
    pub fn nominal(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        self.first_retry.saturating_mul(1 << doublings).min(self.max_retry)
    }

    /// The wait before the next attempt after `failures` failed ones, with
    /// `jitter` in [0, 1] (drawn by the caller); `None` when the next attempt
    /// would fall past `give_up_after` since `created` (the delivery fails).
    pub fn next(&self, failures: u32, jitter: f64, created: Timestamp, now: Timestamp) -> Option<Duration> {
        let nominal = self.nominal(failures);
        let wait = nominal.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        let deadline = created.system_time() + self.give_up_after;
        (now.system_time() + wait <= deadline).then_some(wait)
    }

    /// Checks the settings; the error names the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.first_retry.is_zero() || self.max_retry.is_zero() || self.give_up_after.is_zero() {
            return Err("webhook retry intervals and the give-up time must be greater than zero".into());
        }
        if self.max_retry < self.first_retry {
            return Err("the longest webhook retry wait must not be shorter than the first".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> Timestamp {
        Timestamp::from_unix_seconds(1_700_000_000 + secs)
    }

    #[test]
    fn events_parse_by_name_and_unknown_ones_say_what_to_write() {
        assert_eq!("Accept".parse::<ConnectionEvent>().unwrap(), ConnectionEvent::Accept);
        let err = "accept".parse::<ConnectionEvent>().unwrap_err().to_string();
        assert!(err.contains("\"accept\"") && err.contains("Connect, Accept"), "{err}");
        for e in ConnectionEvent::ALL {
            assert_eq!(serde_json::to_value(e).unwrap(), e.as_str());
        }
    }

    #[test]
    fn each_scope_takes_only_its_events() {
        let svc = NotificationScope::Service(VpcEndpointServiceId::generate(&[1; 16]));
        use ConnectionEvent::*;
        assert!(svc.check_events(&[Connect, Accept, Reject, Delete]).is_ok());
        assert!(svc.check_events(&[]).unwrap_err().contains("empty"));
        assert!(svc.check_events(&[Accept, Accept]).unwrap_err().contains("twice"));
        let err = svc.check_events(&[ResourceShareInvitation]).unwrap_err();
        assert!(err.contains("serviceId") && err.contains("use Connect"), "{err}");
        let acct = NotificationScope::Account;
        assert!(acct.check_events(&[ResourceShareInvitation, ResourceEndpointCreate]).is_ok());
        assert!(acct.check_events(&[Connect]).unwrap_err().contains("account-wide"));
    }

    #[test]
    fn secrets_are_1_to_256_characters() {
        assert!(check_secret("").is_err());
        assert!(check_secret("s").is_ok());
        assert!(check_secret(&"x".repeat(256)).is_ok());
        assert!(check_secret(&"x".repeat(257)).unwrap_err().contains("257"));
    }

    #[test]
    fn retries_double_with_jitter_and_stop_after_a_day() {
        let s = RetrySchedule::default();
        assert_eq!(s.nominal(1), Duration::from_secs(1));
        assert_eq!(s.nominal(2), Duration::from_secs(2));
        assert_eq!(s.nominal(13), Duration::from_secs(3600));
        assert_eq!(s.nominal(u32::MAX), Duration::from_secs(3600));
        assert_eq!(s.next(3, 1.0, t(0), t(10)), Some(Duration::from_secs(4)));
        assert_eq!(s.next(3, 0.0, t(0), t(10)), Some(Duration::from_secs(2)));
        assert_eq!(s.next(20, 1.0, t(0), t(23 * 3600)), Some(Duration::from_secs(3600)));
        assert_eq!(s.next(20, 1.0, t(0), t(23 * 3600 + 1)), None, "past a day it gives up");
        assert!(RetrySchedule { first_retry: Duration::ZERO, ..s }.validate().is_err());
        assert!(RetrySchedule { max_retry: Duration::from_millis(1), ..s }.validate().is_err());
    }

    #[test]
    fn the_log_keeps_the_first_and_the_latest_attempts() {
        let acct = AccountId::parse("acct-000000000001").unwrap();
        let n = ConnectionNotification::new(
            ConnectionNotificationId::generate(&[1; 16]),
            acct.clone(),
            &NotificationScope::Account,
            vec![ConnectionEvent::ResourceShareInvitation],
            "https://example.com/hook".into(),
            "local",
            t(0),
        );
        assert!(n.arn.contains(":vpc-endpoint-connection-notification/vpce-nfn-"), "{}", n.arn);
        let id = delivery_id(&n.id, 7);
        assert!(id.ends_with("-000000000007") && delivery_id(&n.id, 10) > id);
        let body = EventBody {
            event_id: id,
            event_type: ConnectionEvent::ResourceShareInvitation,
            event_time: t(0),
            connection_notification_id: n.id.clone(),
            account_id: acct,
            service_id: None,
            service_name: None,
            vpc_endpoint_id: None,
            vpc_endpoint_owner: None,
            vpc_endpoint_state: None,
            resource_configuration_id: None,
            resource_share_id: None,
            resource_share_arn: None,
            resource_share_name: None,
            resource_share_invitation_id: None,
            sender_account_id: None,
        };
        let mut d = NotificationDelivery::new(&n, 7, body, t(0));
        let failed = |i: u64| DeliveryAttempt { at: t(i), status_code: Some(500), error: None, duration_ms: i };
        for i in 0..(MAX_ATTEMPTS_KEPT as u64 + 10) {
            d.finish_attempt(failed(i), Some(Duration::from_secs(1)), t(i));
        }
        assert_eq!(d.state, DeliveryState::Pending);
        assert_eq!(d.attempts.len(), MAX_ATTEMPTS_KEPT);
        assert_eq!(d.attempt_count, MAX_ATTEMPTS_KEPT as u32 + 10);
        assert_eq!(d.attempts[0].duration_ms, 0, "the first attempt stays");
        assert_eq!(d.attempts.last().unwrap().duration_ms, MAX_ATTEMPTS_KEPT as u64 + 9);
        let ok = DeliveryAttempt { at: t(99), status_code: Some(204), error: None, duration_ms: 1 };
        d.finish_attempt(ok, None, t(99));
        assert_eq!((d.state, d.next_attempt_at), (DeliveryState::Delivered, None));
    }
}
