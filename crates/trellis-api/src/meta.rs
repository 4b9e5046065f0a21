//! Routes about the API itself: its OpenAPI document, the CA certificate,
//! liveness; and the error body every route answers on failure.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::route::Caller::Anyone;
use crate::route::{Route, RouteInfo, get};

const TAG: &str = "meta";

pub const OPENAPI: Route<(), (), OpenApiDocument> = get(TAG, "/v1/openapi.json", Anyone, "This document").json();
pub const CA_PEM: Route = get(TAG, "/v1/ca.pem", Anyone, "The CA certificate (PEM)").text("application/x-pem-file");
pub const HEALTHZ: Route = get(TAG, "/healthz", Anyone, "Liveness: answers ok").text("text/plain; charset=utf-8");

pub const ROUTES: &[RouteInfo] = &[OPENAPI.info, CA_PEM.info, HEALTHZ.info];

/// Every failure: `{"code": "...", "message": "..."}`; the message says what to change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "Error")]
pub struct ErrorBody {
    /// Machine-readable, e.g. `ValidationError`, `NotFound`, `ResourceInUse`.
    pub code: String,
    pub message: String,
}

/// An OpenAPI 3.1 document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OpenApiDocument {
    /// `3.1.0`.
    pub openapi: String,
    pub info: Map<String, Value>,
    pub paths: Map<String, Value>,
    pub components: Map<String, Value>,
}
