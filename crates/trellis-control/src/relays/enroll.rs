//! `POST /v1/relays/enroll`: a relay join token and a CSR in, a signed relay
//! certificate out. The same checks as an agent's enrollment
//! ([`crate::agents::enroll`]): every way a token can be wrong is a 401 that
//! says what to do, and the token is marked used in the transaction that
//! creates the relay, so it enrolls at most one.

use axum::extract::State;
use trellis_model::{AgentStatus, Relay, RelayId, Timestamp};
use trellis_proto::agent_api::{RelayEnrollRequest, RelayEnrollResponse};
use trellis_store::TxExt;

use super::records::{RelayCert, RelayRuntime, RelayToken};
use crate::agents::enroll::{
    StoredSecret, check_secret, parse_token, secret_matches, validate_advertise, validate_hostname,
};
use crate::agents::records::AgentToken;
use crate::api::Json;
use crate::error::ApiError;
use crate::pki::PkiError;
use crate::state::{AppState, now, seed};

const INVALID_TOKEN: &str = "the relay join token is not valid; create a new one with `trellis relay-token create`";

fn check_token(token: &RelayToken, secret: &str, now: Timestamp) -> Result<(), ApiError> {
    let stored =
        StoredSecret { secret_sha256: &token.secret_sha256, used_at: token.used_at, expires_at: token.expires_at };
    check_secret(stored, secret, now, INVALID_TOKEN, "relay")
}

/// The stored token `id`, or why there is none to use. Only the holder of
/// `secret` learns that the id names an agent's token.
fn find(tx: &mut dyn trellis_store::Tx, id: &str, secret: &str) -> Result<RelayToken, ApiError> {
    if let Some(token) = tx.get_obj::<RelayToken>(id)? {
        return Ok(token);
    }
    if tx.get_obj::<AgentToken>(id)?.is_some_and(|t| secret_matches(&t.secret_sha256, secret)) {
        return Err(ApiError::unauthorized(
            "this is an agent's join token: give it to `trellis agent`; a relay needs a token from \
             `trellis relay-token create` (admin)",
        ));
    }
    Err(ApiError::unauthorized(INVALID_TOKEN))
}

pub(super) async fn enroll(
    State(state): State<AppState>,
    Json(req): Json<RelayEnrollRequest>,
) -> Result<Json<RelayEnrollResponse>, ApiError> {
    let (token, token_id) = parse_token(&state, &req.join_token, INVALID_TOKEN)?;
    let advertise = validate_advertise(&req.advertise)?;
    let hostname = validate_hostname(&req.hostname)?;
    let now = now();
    let relay_id = RelayId::generate(&seed()?);

    // First pass: check the token, so the CSR is signed outside the write transaction.
    let (secret, id) = (token.secret.clone(), token_id.clone());
    let stored = state
        .read(move |tx| {
            let stored = find(tx, id.as_str(), &secret)?;
            check_token(&stored, &secret, now)?;
            Ok(stored)
        })
        .await?;
    let issued = state.ca.sign_relay_csr(&req.csr_pem, relay_id.as_str()).map_err(|e| match e {
        PkiError::MalformedCsr(_) | PkiError::BadCsrSignature => ApiError::invalid("InvalidCsr", e.to_string()),
        other => ApiError::internal(format!("signing a relay certificate: {other}")),
    })?;
    let relay = Relay {
        id: relay_id.clone(),
        relay_id: relay_id.clone(),
        zone: stored.zone.clone(),
        hostname,
        advertise,
        cert_sha256: issued.sha256_hex.clone(),
        status: AgentStatus::Online,
        created_at: now,
    };
    let cert = RelayCert {
        id: issued.sha256_hex.clone(),
        relay_id: relay_id.clone(),
        not_after: Timestamp::new(issued.not_after),
    };
    let record = relay.clone();
    let secret = token.secret.clone();
    state
        .write(move |tx| {
            // Checked again: another enrollment may have used the token since the first pass.
            let mut token = find(tx, token_id.as_str(), &secret)?;
            check_token(&token, &secret, now)?;
            token.used_at = Some(now);
            token.relay_id = Some(record.id.clone());
            tx.update_obj(&token)?;
            tx.insert_obj(&record)?;
            tx.insert_obj(&cert)?;
            tx.insert_obj(&RelayRuntime {
                id: record.id.to_string(),
                last_seen_at: Some(now),
                ..RelayRuntime::default()
            })?;
            Ok(())
        })
        .await?;
    tracing::info!(relay = %relay.id, zone = %relay.zone, advertise = %relay.advertise, "relay enrolled");
    Ok(Json(RelayEnrollResponse {
        relay_id: relay.id.to_string(),
        zone: relay.zone,
        certificate_pem: issued.pem,
        ca_pem: state.ca.cert_pem().to_string(),
    }))
}
