//! Connection notifications (`/v1/connectionnotifications`): an account
//! subscribes a webhook to events of one of its endpoint services, one of its
//! endpoints, or itself (account-wide), and reads each notification's
//! deliveries log. Private to the account; the secret is write-only. Events
//! are recorded by `crate::notify::record` and delivered by its worker.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use trellis_api::notifications::{self, CreateConnectionNotification, UpdateConnectionNotification};
use trellis_model::{
    ConnectionEvent, ConnectionNotification, ConnectionNotificationId, ConnectionNotificationSecret,
    MAX_DELIVERIES_KEPT, NotificationDelivery, NotificationScope, VpcEndpoint, VpcEndpointId, VpcEndpointService,
    VpcEndpointServiceId, check_secret, delivery_id,
};
use trellis_store::{Filter, Object, TxExt};

use super::idempotency::create_once;
use super::{ClientToken, Json, ListQuery, Page, PathId, Query, Routes, created, get_owned, page_size, path_id};
use crate::auth::AccountAuth;
use crate::error::{ApiError, invalid_reference};
use crate::notify::target::check_url;
use crate::state::{AppState, now, seed};

/// Notifications one account may hold.
pub const MAX_PER_ACCOUNT: usize = 100;

pub fn routes() -> Routes {
    Routes::new()
        .at(&notifications::CREATE, create)
        .at(&notifications::LIST, super::list_owned::<ConnectionNotification>)
        .at(&notifications::GET, super::read_owned::<ConnectionNotification>)
        .at(&notifications::UPDATE, update)
        .at(&notifications::DELETE, delete)
        .at(&notifications::DELIVERIES, deliveries)
}

fn validation(message: impl Into<String>) -> ApiError {
    ApiError::invalid("ValidationError", message)
}

/// A URL the control plane will not call: 400 naming `url` and what to write.
fn checked_url(st: &AppState, raw: &str) -> Result<String, ApiError> {
    check_url(raw, st.settings.allow_private_webhooks)
        .map(|_| raw.to_string())
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "InvalidUrl", e))
}

fn parse_events(raw: &[String]) -> Result<Vec<ConnectionEvent>, ApiError> {
    raw.iter()
        .map(|e| e.parse::<ConnectionEvent>())
        .collect::<Result<_, _>>()
        .map_err(|e| validation(format!("connectionEvents: {e}")))
}

fn checked_secret(secret: &str) -> Result<(), ApiError> {
    check_secret(secret).map_err(validation)
}

async fn create(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    Json(body): Json<CreateConnectionNotification>,
) -> Result<Response, ApiError> {
    // A URL the server will not call is a 400 (as a malformed body), before the field rules' 422s.
    let url = checked_url(&st, &body.url)?;
    let scope = match (&body.service_id, &body.vpc_endpoint_id) {
        (Some(_), Some(_)) => {
            return Err(validation(
                "give serviceId (events of a service) or vpcEndpointId (events of an endpoint), not both; neither \
                 makes an account-wide notification",
            ));
        }
        (Some(s), None) => {
            NotificationScope::Service(VpcEndpointServiceId::parse(s).map_err(|e| invalid_reference("serviceId", e))?)
        }
        (None, Some(e)) => {
            NotificationScope::Endpoint(VpcEndpointId::parse(e).map_err(|e| invalid_reference("vpcEndpointId", e))?)
        }
        (None, None) => NotificationScope::Account,
    };
    let events = parse_events(&body.connection_events)?;
    scope.check_events(&events).map_err(validation)?;
    checked_secret(&body.secret)?;
    let token = ClientToken::new(me.id.as_str(), "connectionnotifications", body.client_token.as_deref(), &body)?;
    let (id, now, region) = (ConnectionNotificationId::generate(&seed()?), now(), st.region().to_string());
    let secret = body.secret.clone();
    let outcome = st
        .write(move |tx| {
            create_once(tx, token.as_ref(), now, |tx| {
                match &scope {
                    NotificationScope::Service(s) => {
                        owned_or_404::<VpcEndpointService>(tx, &me.id, s.as_str(), "serviceId", "VPC endpoint service")?
                    }
                    NotificationScope::Endpoint(e) => {
                        owned_or_404::<VpcEndpoint>(tx, &me.id, e.as_str(), "vpcEndpointId", "VPC endpoint")?
                    }
                    NotificationScope::Account => {}
                }
                let count = tx.list(<ConnectionNotification as Object>::KIND, &Filter::account(me.id.as_str()))?.len();
                if count >= MAX_PER_ACCOUNT {
                    return Err(ApiError::conflict(
                        "LimitExceeded",
                        format!(
                            "this account has {count} connection notifications, the most it may have; delete ones \
                             it no longer needs (DELETE /v1/connectionnotifications/{{id}})"
                        ),
                    ));
                }
                let n = ConnectionNotification::new(
                    id.clone(),
                    me.id.clone(),
                    &scope,
                    events.clone(),
                    url.clone(),
                    &region,
                    now,
                );
                tx.insert_obj(&n)?;
                tx.insert_obj(&ConnectionNotificationSecret {
                    id: id.clone(),
                    account_id: me.id.clone(),
                    secret: secret.clone(),
                })?;
                Ok(n)
            })
        })
        .await?;
    Ok(created(outcome))
}

/// A referenced object of the caller's; another account's or an unknown one
/// is a 404 that names the field.
fn owned_or_404<O: Object>(
    tx: &mut dyn trellis_store::Tx,
    me: &trellis_model::AccountId,
    id: &str,
    field: &str,
    what: &str,
) -> Result<(), ApiError> {
    match tx.get_obj::<O>(id)? {
        Some(o) if o.account_id() == me.as_str() => Ok(()),
        _ => Err(ApiError::not_found_msg(format!("{field}: {what} {id} was not found in this account"))),
    }
}

async fn update(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
    Json(body): Json<UpdateConnectionNotification>,
) -> Result<Json<ConnectionNotification>, ApiError> {
    let id: ConnectionNotificationId = path_id(&raw)?;
    let url = body.url.as_deref().map(|u| checked_url(&st, u)).transpose()?;
    let events = body.connection_events.as_deref().map(parse_events).transpose()?;
    if let Some(secret) = &body.secret {
        checked_secret(secret)?;
    }
    let secret = body.secret.clone();
    st.write(move |tx| {
        let mut n = get_owned::<ConnectionNotification>(tx, &me.id, id.as_str(), "connection notification")?;
        if let Some(events) = &events {
            n.scope().check_events(events).map_err(validation)?;
            n.connection_events = events.clone();
        }
        if let Some(url) = &url {
            n.url = url.clone();
        }
        tx.update_obj(&n)?;
        if let Some(secret) = &secret {
            tx.update_obj(&ConnectionNotificationSecret {
                id: n.id.clone(),
                account_id: me.id.clone(),
                secret: secret.clone(),
            })?;
        }
        Ok(Json(n))
    })
    .await
}

async fn delete(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<StatusCode, ApiError> {
    let id: ConnectionNotificationId = path_id(&raw)?;
    st.write(move |tx| {
        let n = get_owned::<ConnectionNotification>(tx, &me.id, id.as_str(), "connection notification")?;
        crate::notify::delete_notification(tx, &n)?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// Newest first. A notification's deliveries are the sequence numbers
/// `last - kept + 1 ..= last`, so a page is one range read of the store;
/// `nextToken` is the oldest sequence number of the page.
async fn deliveries(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
    Query(q): Query<ListQuery>,
) -> Result<Json<Page<NotificationDelivery>>, ApiError> {
    let id: ConnectionNotificationId = path_id(&raw)?;
    let max = page_size(&q)? as u64;
    let before = match &q.next_token {
        None => None,
        Some(t) => Some(t.parse::<u64>().ok().filter(|s| *s > 0).ok_or_else(|| {
            ApiError::bad_request("nextToken is not one this list answered; pass the nextToken of the previous page")
        })?),
    };
    st.read(move |tx| {
        let n = get_owned::<ConnectionNotification>(tx, &me.id, id.as_str(), "connection notification")?;
        let hi = before.map_or(n.last_sequence, |b| b.saturating_sub(1).min(n.last_sequence));
        let lo = hi.saturating_sub(max);
        let oldest_kept = n.last_sequence.saturating_sub(MAX_DELIVERIES_KEPT) + 1;
        let after = (lo > 0).then(|| delivery_id(&n.id, lo));
        let mut items = if hi == 0 {
            Vec::new()
        } else {
            tx.list_obj::<NotificationDelivery>(&Filter {
                reference: Some(n.id.as_str()),
                after: after.as_deref(),
                limit: Some(max as usize),
                ..Filter::default()
            })?
        };
        items.retain(|d| d.sequence <= hi);
        items.reverse();
        let next_token = (lo >= oldest_kept).then(|| (lo + 1).to_string());
        Ok(Json(Page { items, next_token }))
    })
    .await
}

impl super::Owned for ConnectionNotification {
    type Id = ConnectionNotificationId;
    const WHAT: &'static str = "connection notification";
}
