//! A route as data: method, path, who may call it, what it takes and what it
//! answers. Each route is one constant in the module of its noun; the control
//! plane registers its handler on that constant, the CLI builds its request
//! from it, and the OpenAPI document is generated from all of them.
//!
//! The type parameters name the route's body, query and answer types
//! (`()` for none), so code that sends a request can only send the route's
//! own body type.

use std::marker::PhantomData;
use std::ops::Deref;

use schemars::{JsonSchema, Schema, SchemaGenerator};

/// Makes the JSON Schema (usually a `$ref`) of one type.
pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

fn schema_of<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}

/// HTTP method of a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    Get,
    Post,
    Patch,
    Delete,
}

impl Method {
    /// Lowercase, as OpenAPI writes it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Method::Get => "get",
            Method::Post => "post",
            Method::Patch => "patch",
            Method::Delete => "delete",
        }
    }
}

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// No credentials.
    Anyone,
    /// The admin API key.
    Admin,
    /// An account's API key.
    Account,
    /// The join token inside the body.
    JoinToken,
    /// An enrolled agent's TLS client certificate.
    AgentCert,
    /// An enrolled relay's TLS client certificate.
    RelayCert,
}

/// What a route answers on success.
#[derive(Clone, Copy, Debug)]
pub enum Answer {
    /// No body (204).
    Empty,
    /// A JSON body of this schema.
    Json(SchemaFn),
    /// A text body of this content type.
    Text(&'static str),
}

/// A route without its types: what the OpenAPI document and the router see.
#[derive(Clone, Copy, Debug)]
pub struct RouteInfo {
    pub method: Method,
    /// With `{id}` for the path parameter.
    pub path: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub caller: Caller,
    /// The success status.
    pub status: u16,
    /// Schema of the JSON body, when the route takes one.
    pub body: Option<SchemaFn>,
    /// Schema of the query string (an object of optional fields), when the route takes one.
    pub query: Option<SchemaFn>,
    pub answer: Answer,
    /// More documented outcomes (status, description), e.g. the long-poll's 304.
    pub also: &'static [(u16, &'static str)],
}

impl RouteInfo {
    /// `path` with `{id}` replaced by `id` (already encoded as a path segment).
    pub fn path_with(&self, id: &str) -> String {
        self.path.replace("{id}", id)
    }

    /// Whether the path has an `{id}` parameter.
    pub fn has_id(&self) -> bool {
        self.path.contains("{id}")
    }
}

/// A route with its body (`B`), query (`Q`) and answer (`R`) types.
///
/// Built with [`get`], [`post`], [`patch`] or [`delete`] and the methods
/// below; the type parameters are usually inferred from the constant's type:
///
/// ```
/// # use trellis_api::route::{Caller::Account, Route, post};
/// # use trellis_api::vpcs::CreateVpc;
/// # use trellis_model::Vpc;
/// pub const CREATE: Route<CreateVpc, (), Vpc> =
///     post("vpcs", "/v1/vpcs", Account, "Create a VPC").body().created();
/// ```
pub struct Route<B = (), Q = (), R = ()> {
    pub info: RouteInfo,
    types: PhantomData<fn(B, Q) -> R>,
}

impl<B, Q, R> Clone for Route<B, Q, R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B, Q, R> Copy for Route<B, Q, R> {}

impl<B, Q, R> Deref for Route<B, Q, R> {
    type Target = RouteInfo;

    fn deref(&self) -> &RouteInfo {
        &self.info
    }
}

impl<B, Q, R> std::fmt::Debug for Route<B, Q, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.info.fmt(f)
    }
}

const fn route(method: Method, tag: &'static str, path: &'static str, caller: Caller, summary: &'static str) -> Route {
    let status = if matches!(method, Method::Delete) { 204 } else { 200 };
    Route {
        info: RouteInfo {
            method,
            path,
            tag,
            summary,
            caller,
            status,
            body: None,
            query: None,
            answer: Answer::Empty,
            also: &[],
        },
        types: PhantomData,
    }
}

/// A `GET` route (200).
pub const fn get(tag: &'static str, path: &'static str, caller: Caller, summary: &'static str) -> Route {
    route(Method::Get, tag, path, caller, summary)
}

/// A `POST` route (200; [`Route::created`] makes it 201).
pub const fn post(tag: &'static str, path: &'static str, caller: Caller, summary: &'static str) -> Route {
    route(Method::Post, tag, path, caller, summary)
}

/// A `PATCH` route (200).
pub const fn patch(tag: &'static str, path: &'static str, caller: Caller, summary: &'static str) -> Route {
    route(Method::Patch, tag, path, caller, summary)
}

/// A `DELETE` route (204, no body).
pub const fn delete(tag: &'static str, path: &'static str, caller: Caller, summary: &'static str) -> Route {
    route(Method::Delete, tag, path, caller, summary)
}

impl<B, Q, R> Route<B, Q, R> {
    const fn with<B2, Q2, R2>(info: RouteInfo) -> Route<B2, Q2, R2> {
        Route { info, types: PhantomData }
    }

    /// The route takes a JSON body of type `T`.
    pub const fn body<T: JsonSchema>(self) -> Route<T, Q, R> {
        let mut info = self.info;
        info.body = Some(schema_of::<T>);
        Self::with(info)
    }

    /// The route takes a query string of type `T`.
    pub const fn query<T: JsonSchema>(self) -> Route<B, T, R> {
        let mut info = self.info;
        info.query = Some(schema_of::<T>);
        Self::with(info)
    }

    /// The route answers a JSON body of type `T` (with 200).
    pub const fn json<T: JsonSchema>(self) -> Route<B, Q, T> {
        let mut info = self.info;
        info.answer = Answer::Json(schema_of::<T>);
        Self::with(info)
    }

    /// The route creates: 201 with a JSON body of type `T` (and 200 with the
    /// same body when a `clientToken` replays an earlier create).
    pub const fn created<T: JsonSchema>(self) -> Route<B, Q, T> {
        let mut info = self.info;
        info.answer = Answer::Json(schema_of::<T>);
        info.status = 201;
        Self::with(info)
    }

    /// The route answers 204 without a body.
    pub const fn no_content(self) -> Self {
        let mut info = self.info;
        info.answer = Answer::Empty;
        info.status = 204;
        Self::with(info)
    }

    /// The route answers text of this content type (with 200).
    pub const fn text(self, content_type: &'static str) -> Self {
        let mut info = self.info;
        info.answer = Answer::Text(content_type);
        Self::with(info)
    }

    /// More documented outcomes besides the success and the errors every route may answer.
    pub const fn or(self, outcomes: &'static [(u16, &'static str)]) -> Self {
        let mut info = self.info;
        info.also = outcomes;
        Self::with(info)
    }
}
