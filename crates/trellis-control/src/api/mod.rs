//! The user-facing HTTP API: one module per resource, the router that joins
//! them with the agent and usage routes, and helpers they share.
//!
//! What each route takes and answers is declared in `trellis_api` (one
//! constant per route, with its body, query and answer types); each module
//! here registers its handlers on those constants with [`Routes::at`], so the
//! router serves exactly the routes the OpenAPI document lists.
//!
//! Every handler runs its whole effect in one store transaction, so a failed
//! call leaves nothing behind; ids and `now` are drawn before the transaction.

pub mod accounts;
pub mod configurations;
pub mod domains;
pub mod endpoints;
pub mod extract;
pub mod gateways;
pub mod idempotency;
pub mod invitations;
pub mod notifications;
pub mod openapi;
pub mod organizations;
pub mod services;
pub mod shares;
pub mod subnets;
pub mod vpcs;

use axum::Router;
use axum::handler::Handler;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use trellis_api::{Method, Route, RouteInfo};
use trellis_model::{AccountId, Id};
use trellis_store::{Object, Tx, TxExt};

use crate::error::ApiError;
use crate::state::AppState;
pub use extract::{Json, PathId, Query};
pub use idempotency::{ClientToken, Created};
pub use trellis_api::list::{DEFAULT_MAX_RESULTS, MAX_MAX_RESULTS};
pub use trellis_api::{ListQuery, Page, Paged};

/// Routes with their handlers, each registered on its `trellis_api` constant,
/// and the list of what was registered (which a test holds to the document).
#[derive(Default)]
pub struct Routes {
    router: Router<AppState>,
    served: Vec<RouteInfo>,
}

impl Routes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `route` (its method and path) with `handler`.
    pub fn at<B, Q, R, H, T>(mut self, route: &Route<B, Q, R>, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let method_router = match route.method {
            Method::Get => axum::routing::get(handler),
            Method::Post => axum::routing::post(handler),
            Method::Patch => axum::routing::patch(handler),
            Method::Delete => axum::routing::delete(handler),
        };
        self.router = self.router.route(route.path, method_router);
        self.served.push(route.info);
        self
    }

    /// These routes and `other`'s.
    pub fn merge(mut self, other: Routes) -> Self {
        self.router = self.router.merge(other.router);
        self.served.extend(other.served);
        self
    }

    /// Every route registered so far.
    pub fn served(&self) -> &[RouteInfo] {
        &self.served
    }
}

/// Every route of the API with its handler.
pub fn routes() -> Routes {
    Routes::new()
        .merge(accounts::routes())
        .merge(organizations::routes())
        .merge(vpcs::routes())
        .merge(subnets::routes())
        .merge(gateways::routes())
        .merge(configurations::routes())
        .merge(shares::routes())
        .merge(invitations::routes())
        .merge(services::routes())
        .merge(endpoints::routes())
        .merge(domains::routes())
        .merge(notifications::routes())
        .merge(crate::agents::routes())
        .merge(crate::relays::routes())
        .merge(crate::usage::routes())
        .at(&trellis_api::meta::OPENAPI, openapi::serve)
        .at(&trellis_api::meta::CA_PEM, ca_pem)
        .at(&trellis_api::meta::HEALTHZ, || async { "ok" })
}

/// The whole API: user routes, agent routes, usage, OpenAPI, health and the CA certificate.
pub fn api_router(state: AppState) -> Router {
    routes().router.fallback(not_found).method_not_allowed_fallback(method_not_allowed).with_state(state)
}

async fn ca_pem(axum::extract::State(state): axum::extract::State<AppState>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/x-pem-file")], state.ca.cert_pem().to_string()).into_response()
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found_msg(format!(
        "no route {}; see /v1/openapi.json for the API",
        trellis_model::clip_echo(uri.path())
    ))
}

async fn method_not_allowed(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        format!("{} does not take this method; see /v1/openapi.json", uri.path()),
    )
}

/// The answer to a create: 201 with a new object, 200 with a replayed one.
pub fn created<T: Serialize>(outcome: Created<T>) -> Response {
    let status = if outcome.is_new() { StatusCode::CREATED } else { StatusCode::OK };
    (status, Json(outcome.into_inner())).into_response()
}

/// The page size a list query asks for, checked.
pub fn page_size(query: &ListQuery) -> Result<usize, ApiError> {
    let max = query.max_results.unwrap_or(DEFAULT_MAX_RESULTS);
    if !(1..=MAX_MAX_RESULTS).contains(&max) {
        return Err(ApiError::bad_request(format!("maxResults must be from 1 to {MAX_MAX_RESULTS}")));
    }
    Ok(max)
}

/// A page from items already sorted by `key` and after the cursor, of which
/// at most `max + 1` were loaded: one more than `max` means there is a next page.
pub fn page_of<T>(mut items: Vec<T>, key: impl Fn(&T) -> String, max: usize) -> Page<T> {
    let next_token = if items.len() > max {
        items.truncate(max);
        items.last().map(&key)
    } else {
        None
    };
    Page { items, next_token }
}

/// One page of objects of a kind through the store's own paging: loads at
/// most one page (plus one record), never the whole list.
pub fn list_page<O: Object>(
    tx: &mut dyn Tx,
    filter: trellis_store::Filter<'_>,
    query: &ListQuery,
) -> Result<Page<O>, ApiError> {
    let max = page_size(query)?;
    let items = tx.list_obj::<O>(&filter.page(query.next_token.as_deref(), max + 1))?;
    Ok(page_of(items, |o| o.id().to_string(), max))
}

/// One page of `items` ordered by `key`; `nextToken` is the last key returned.
/// For lists computed in memory; store-backed lists use [`list_page`].
pub fn paginate<T>(mut items: Vec<T>, key: impl Fn(&T) -> String, query: &ListQuery) -> Result<Page<T>, ApiError> {
    let max = page_size(query)?;
    items.sort_by_key(&key);
    if let Some(after) = &query.next_token {
        items.retain(|item| key(item).as_str() > after.as_str());
    }
    let next_token = if items.len() > max {
        items.truncate(max);
        items.last().map(&key)
    } else {
        None
    };
    Ok(Page { items, next_token })
}

/// Parses a path id; a malformed one names nothing, so it is a 404 like an unknown one.
pub fn path_id<T: Id>(raw: &str) -> Result<T, ApiError> {
    T::parse(raw).map_err(|_| ApiError::not_found(T::KIND, raw))
}

/// An object only its account may read, with the id type of its routes and
/// the words errors use for it.
pub trait Owned: Object + Serialize + Send + 'static {
    type Id: Id + Send + 'static;
    const WHAT: &'static str;
}

/// `GET …/{id}` of an [`Owned`] object: another account's object is a 404.
pub async fn read_owned<O: Owned>(
    axum::extract::State(st): axum::extract::State<AppState>,
    crate::auth::AccountAuth(me): crate::auth::AccountAuth,
    PathId(raw): PathId,
) -> Result<Json<O>, ApiError> {
    let id: O::Id = path_id(&raw)?;
    st.read(move |tx| get_owned::<O>(tx, &me.id, id.as_str(), O::WHAT)).await.map(Json)
}

/// `GET` of a collection of [`Owned`] objects: the caller's own, paginated by id.
pub async fn list_owned<O: Owned>(
    axum::extract::State(st): axum::extract::State<AppState>,
    crate::auth::AccountAuth(me): crate::auth::AccountAuth,
    Query(q): Query<ListQuery>,
) -> Result<Json<Page<O>>, ApiError> {
    let page = st.read(move |tx| list_page::<O>(tx, trellis_store::Filter::account(me.id.as_str()), &q)).await?;
    Ok(Json(page))
}

/// Loads an object of `account`; another account's object is a 404, as is an unknown one.
pub fn get_owned<O: Object>(tx: &mut dyn Tx, account: &AccountId, id: &str, kind: &str) -> Result<O, ApiError> {
    match tx.get_obj::<O>(id)? {
        Some(o) if o.account_id() == account.as_str() => Ok(o),
        _ => Err(ApiError::not_found(kind, id)),
    }
}

/// Rejects a list with the same element twice.
pub fn no_duplicates<T: PartialEq + std::fmt::Display>(field: &str, items: &[T]) -> Result<(), ApiError> {
    for (i, item) in items.iter().enumerate() {
        if items[..i].contains(item) {
            return Err(ApiError::invalid("ValidationError", format!("{field} lists {item} twice")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagination_walks_every_item_once() {
        let items: Vec<u32> = (0..25).collect();
        let key = |i: &u32| format!("{i:03}");
        let mut query = ListQuery { max_results: Some(10), ..Default::default() };
        let mut seen = Vec::new();
        loop {
            let page = paginate(items.clone(), key, &query).unwrap();
            seen.extend(page.items);
            match page.next_token {
                Some(t) => query.next_token = Some(t),
                None => break,
            }
        }
        assert_eq!(seen, items);
        assert!(paginate(items, key, &ListQuery { max_results: Some(0), ..Default::default() }).is_err());
    }
}
