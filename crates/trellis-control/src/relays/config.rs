//! `GET /v1/relays/self/config?after=V&waitSeconds=S&have=H`: the relay's
//! config long-poll, served by the agents' machinery
//! ([`crate::agents::config::long_poll`]) from the relay config cache.

use axum::Extension;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use trellis_api::agents::ConfigQuery;
use trellis_proto::RelayConfig;

use super::RelayAuth;
use crate::agents::config::long_poll;
use crate::api::Query;
use crate::error::ApiError;
use crate::state::AppState;
use crate::tls::ShutdownSignal;

pub(super) async fn config(
    State(state): State<AppState>,
    RelayAuth(relay): RelayAuth,
    shutdown: Option<Extension<ShutdownSignal>>,
    headers: HeaderMap,
    Query(query): Query<ConfigQuery>,
) -> Result<Response, ApiError> {
    long_poll::<RelayConfig>(&state, &relay.id, shutdown, &headers, &query).await
}
