//! The API's one error type: an HTTP status, a stable `code` and a message
//! that tells the caller what to change, answered as `{"code", "message"}`.

use std::borrow::Cow;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use trellis_model::{ArnError, IdError, PlacementError, PoolError, PortRangesError, TransitionError, ValidationError};
use trellis_store::StoreError;

/// An API failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: Cow<'static, str>,
    pub message: String,
}

/// The JSON body of an error answer.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub code: &'a str,
    pub message: &'a str,
}

impl ApiError {
    /// An error whose `message` repeats user input only in short quoted spans
    /// (see [`trellis_model::clip_quoted`]).
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code: Cow::Borrowed(code), message: trellis_model::clip_quoted(&message.into()) }
    }

    /// 400: malformed JSON, a bad query string.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    /// 401: no API key, or one the server does not know.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", message)
    }

    /// 403: a valid key that may not call this route.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "Forbidden", message)
    }

    /// 404: unknown, or another account's object (the two are never told apart).
    pub fn not_found(kind: &str, id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NotFound", format!("{kind} {} was not found", trellis_model::clip_echo(id)))
    }

    /// 404 with a custom message.
    pub fn not_found_msg(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NotFound", message)
    }

    /// 409: in use, already exists, wrong state.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 429: the caller did this too often; `retry_after` says when to try again.
    pub fn too_many_requests(message: impl Into<String>, retry_after: std::time::Duration) -> Self {
        let secs = retry_after.as_secs_f64().ceil().max(1.0);
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            format!("{} (try again in {secs} s)", message.into()),
        )
    }

    /// 422: well-formed but invalid.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// 413: the request body is larger than the listener accepts (`max_bytes` when known).
    pub fn body_too_large(max_bytes: Option<usize>) -> Self {
        let message = match max_bytes {
            Some(max) => {
                format!("the request body is larger than {max} bytes, the most this server accepts; send less")
            }
            None => "the request body is larger than this server accepts; send less".to_string(),
        };
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge", message)
    }

    /// 500: a fault of the server; details go to the log, not to the caller.
    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        tracing::error!(%message, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "internal error; see the control plane's log")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { code: &self.code, message: &self.message })).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { kind, id } => {
                ApiError::conflict("AlreadyExists", format!("{kind} {id} already exists; retry the request"))
            }
            other => ApiError::internal(format!("store: {other}")),
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::invalid("ValidationError", e.to_string())
    }
}

impl From<PortRangesError> for ApiError {
    fn from(e: PortRangesError) -> Self {
        ApiError::invalid("InvalidPortRange", e.to_string())
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        ApiError::invalid("InvalidCidrBlock", e.to_string())
    }
}

impl From<TransitionError> for ApiError {
    fn from(e: TransitionError) -> Self {
        ApiError::conflict("InvalidState", e.to_string())
    }
}

impl From<PlacementError> for ApiError {
    fn from(e: PlacementError) -> Self {
        match e {
            PlacementError::NoCommonZone { .. } => ApiError::invalid("ZoneMismatch", e.to_string()),
            PlacementError::PoolExhausted { .. } => ApiError::conflict("AddressPoolExhausted", e.to_string()),
        }
    }
}

/// An id or ARN in a request body that does not parse: 422 naming the field.
pub fn invalid_reference(field: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::invalid("ValidationError", format!("{field}: {e}"))
}

impl From<IdError> for ApiError {
    fn from(e: IdError) -> Self {
        ApiError::invalid("ValidationError", e.to_string())
    }
}

impl From<ArnError> for ApiError {
    fn from(e: ArnError) -> Self {
        ApiError::invalid("ValidationError", e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn errors_answer_with_status_code_and_message() {
        let resp = ApiError::invalid("InvalidPortRange", "port range \"0\" is bad").into_response();
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], "InvalidPortRange");
        assert_eq!(v["message"], "port range \"0\" is bad");
    }

    #[test]
    fn messages_repeat_at_most_64_characters_of_quoted_input() {
        let long = "n".repeat(5000);
        let e = ApiError::bad_request(format!("unknown variant `{long}`, expected `SINGLE`; name {long:?}"));
        let cut = format!("{}…", "n".repeat(64));
        assert_eq!(e.message, format!("unknown variant `{cut}`, expected `SINGLE`; name \"{cut}\""));
    }

    #[test]
    fn store_faults_do_not_leak_details() {
        let e = ApiError::from(StoreError::Backend("disk /var/lib/x full".into()));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.message.contains("/var/lib"));
    }
}
