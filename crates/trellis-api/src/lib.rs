//! The control plane's API as types: for every noun, its request bodies,
//! list query, answers and routes, in one module per noun. The control
//! plane's handlers deserialize exactly these types and register on these
//! routes, the CLI builds and sends exactly these types to these routes, and
//! the OpenAPI document (`GET /v1/openapi.json`, [`openapi::document`]) is
//! generated from the routes and the types' JSON Schemas, so none of the
//! three can drift from the others.
//!
//! Types only: no I/O, no handler logic, no validation beyond what serde
//! does (the handlers check values and word the errors).
//!
//! # Adding a noun
//!
//! The order that keeps everything compiling (see `docs/contributing-api.md`):
//!
//! 1. **Model object** in `trellis-model` with
//!    `#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]` next
//!    to its serde derive (hand-written serde needs a hand-written
//!    `JsonSchema`, as in `trellis_model::schema`).
//! 2. **Module here**, `src/<noun>.rs`: the request types (`Create…`,
//!    `Update…`: `deny_unknown_fields`, options
//!    `#[serde(default, skip_serializing_if = "Option::is_none")]`, ids the
//!    handler parses itself as `String` with `#[schemars(with = "TheId")]`),
//!    any view type the answers need, then one constant per route
//!    (`pub const CREATE: Route<CreateX, (), X> = post(TAG, "/v1/xs", Account, "Create an x").body().created();`)
//!    and `ROUTES` listing them; add the module to [`routes`].
//! 3. **Handlers** in `trellis-control`'s `api/<noun>.rs`, registered with
//!    `Routes::new().at(&x::CREATE, create)`; they take `Json<x::CreateX>`.
//! 4. **CLI verbs** in `trellis`'s `nouns.rs`: clap flags, and a `request()`
//!    that builds the request type and sends it with `ApiRequest::send(&x::CREATE, &body)`.
//! 5. Tests fail until the four agree: every route served and documented,
//!    every schema a real object schema, every CLI body valid for its route.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod agents;
pub mod check;
pub mod configurations;
pub mod domains;
pub mod endpoints;
pub mod gateways;
pub mod invitations;
pub mod list;
pub mod meta;
pub mod notifications;
pub mod openapi;
pub mod organizations;
pub mod relays;
pub mod route;
pub mod services;
pub mod shares;
pub mod subnets;
pub mod vpcs;

pub use list::{AgentListQuery, ListQuery, Page, Paged, VpcListQuery};
pub use route::{Caller, Method, Route, RouteInfo};

/// Every route of the API, noun by noun, in the order the document lists them.
pub fn routes() -> impl Iterator<Item = &'static RouteInfo> {
    [
        accounts::ROUTES,
        organizations::ROUTES,
        vpcs::ROUTES,
        subnets::ROUTES,
        agents::ROUTES,
        relays::ROUTES,
        gateways::ROUTES,
        configurations::ROUTES,
        shares::ROUTES,
        invitations::ROUTES,
        services::ROUTES,
        endpoints::ROUTES,
        domains::ROUTES,
        notifications::ROUTES,
        meta::ROUTES,
    ]
    .into_iter()
    .flatten()
}
