//! `GET /v1/agents/self/config?after=V&waitSeconds=S&have=H`: the config long-poll.
//!
//! Answers from the config cache ([`crate::configs`]): the agent's config as
//! soon as its version differs from `after` (200), else waits until the
//! cache marks it stale and a recompilation changes it, or `waitSeconds`
//! pass (304). It never writes to the store, and it returns by its deadline
//! whatever it is given: `after` and `have` are only ever compared.
//!
//! Relays long-poll their configs with the same machinery ([`long_poll`]).

use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

pub use trellis_api::agents::ConfigQuery;

use super::AgentAuth;
use crate::api::Query;
use crate::configs::{Compiled, ConfigKind};
use crate::error::ApiError;
use crate::state::AppState;
use crate::tls::ShutdownSignal;

pub const DEFAULT_WAIT_SECONDS: u64 = 25;
pub const MAX_WAIT_SECONDS: u64 = 60;

/// The agent's config when its version differs from `after` (after letting
/// an agent that proves it holds the current content keep its version).
async fn differing<C: ConfigKind>(
    state: &AppState,
    agent: &C::Id,
    after: u64,
    have: Option<&str>,
) -> Result<Option<Arc<Compiled<C>>>, ApiError> {
    let cache = C::cache(state);
    let mut compiled = cache.current(state, agent).await?;
    if compiled.version() != after
        && let Some(have) = have
    {
        cache.adopt(agent, after, have)?;
        compiled = cache.current(state, agent).await?;
    }
    Ok((compiled.version() != after).then_some(compiled))
}

/// Whether the request's `Accept-Encoding` takes gzip.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(
        |coding| {
            let mut parts = coding.split(';').map(str::trim);
            parts.next().is_some_and(|c| c.eq_ignore_ascii_case("gzip")) && !parts.any(|p| p.replace(' ', "") == "q=0")
        },
    )
}

pub(super) async fn config(
    State(state): State<AppState>,
    AgentAuth(agent): AgentAuth,
    shutdown: Option<Extension<ShutdownSignal>>,
    headers: HeaderMap,
    Query(query): Query<ConfigQuery>,
) -> Result<Response, ApiError> {
    long_poll::<trellis_proto::AgentConfig>(&state, &agent.id, shutdown, &headers, &query).await
}

/// The long-poll of `id`'s config of kind `C` (an agent's, a relay's).
pub(crate) async fn long_poll<C: ConfigKind>(
    state: &AppState,
    agent_id: &C::Id,
    shutdown: Option<Extension<ShutdownSignal>>,
    headers: &HeaderMap,
    query: &ConfigQuery,
) -> Result<Response, ApiError> {
    let shutdown = shutdown.map(|Extension(ShutdownSignal(token))| token).unwrap_or_default();
    let after = query.after.unwrap_or(0);
    let wait = Duration::from_secs(query.wait_seconds.unwrap_or(DEFAULT_WAIT_SECONDS).min(MAX_WAIT_SECONDS));
    let deadline = tokio::time::Instant::now() + wait;
    let mut changed = C::cache(state).subscribe(agent_id);
    // Mark the entry's state seen before reading it, so a change that lands
    // meanwhile wakes the wait below. The first answer does not wait for the
    // deadline (an agent that is behind gets its config at once, even with
    // waitSeconds=0); only the waiting for a change does.
    changed.borrow_and_update();
    let first = differing::<C>(state, agent_id, after, query.have.as_deref()).await?;
    let waited = async {
        loop {
            if changed.changed().await.is_err() {
                return Ok(None);
            }
            changed.borrow_and_update();
            if let Some(compiled) = differing::<C>(state, agent_id, after, query.have.as_deref()).await? {
                return Ok::<_, ApiError>(Some(compiled));
            }
        }
    };
    let outcome = match first {
        Some(compiled) => Ok(Some(compiled)),
        None => tokio::select! {
            r = tokio::time::timeout_at(deadline, waited) => r.unwrap_or(Ok(None)),
            () = shutdown.cancelled() => Ok(None),
        },
    };
    match outcome? {
        Some(compiled) if accepts_gzip(headers) => Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json"), (header::CONTENT_ENCODING, "gzip")],
            axum::body::Bytes::from_owner(compiled.gzip.clone()),
        )
            .into_response()),
        Some(compiled) => Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            axum::body::Bytes::from_owner(compiled.json.clone()),
        )
            .into_response()),
        None => Ok(StatusCode::NOT_MODIFIED.into_response()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_is_used_only_when_accepted() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, v.parse().unwrap());
            accepts_gzip(&h)
        };
        assert!(with("gzip"));
        assert!(with("br, GZIP;q=0.8"));
        assert!(!with("identity"));
        assert!(!with("gzip;q=0"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}
