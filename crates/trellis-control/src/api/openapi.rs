//! `GET /v1/openapi.json`: the OpenAPI 3.1 document of every route, generated
//! by `trellis_api` from the route table and the request and answer types
//! (built once, on the first request).

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};

pub async fn serve() -> Response {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let body = DOCUMENT.get_or_init(|| trellis_api::openapi::document().to_string());
    ([(header::CONTENT_TYPE, "application/json")], body.as_str()).into_response()
}
