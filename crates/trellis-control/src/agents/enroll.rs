//! `POST /v1/agents/enroll`: a join token and a CSR in, a signed agent
//! certificate out.
//!
//! Every way a token can be wrong (malformed, unknown, wrong secret, made by
//! another control plane, expired, already used) is a 401 that says what to
//! do, never a 500. The token is marked used in the same transaction that
//! creates the agent, so a token enrolls at most one agent even when two
//! agents race with it.

use std::net::{IpAddr, SocketAddr};

use axum::extract::State;
use trellis_model::{Agent, AgentId, AgentStatus, JoinTokenId, Subnet, Timestamp, validate_domain_name};
use trellis_proto::agent_api::{EnrollRequest, EnrollResponse};
use trellis_proto::join_token::JoinToken;
use trellis_store::TxExt;

use super::records::{AgentCert, AgentToken};
use crate::api::Json;
use crate::error::ApiError;
use crate::pki::{PkiError, sha256_hex};
use crate::state::{AppState, now, seed};

const INVALID_TOKEN: &str =
    "the join token is not valid; create a new one with `trellis agent-token create --subnet-id <subnet>`";

/// A stored join token as enrollment checks it (agent and relay tokens alike).
pub(crate) struct StoredSecret<'a> {
    pub secret_sha256: &'a str,
    pub used_at: Option<Timestamp>,
    pub expires_at: Timestamp,
}

/// Whether `secret` is the one whose SHA-256 (lower-case hex) is `secret_sha256`.
pub(crate) fn secret_matches(secret_sha256: &str, secret: &str) -> bool {
    let presented = sha256_hex(secret.as_bytes());
    aws_lc_rs::constant_time::verify_slices_are_equal(presented.as_bytes(), secret_sha256.as_bytes()).is_ok()
}

/// Why a stored token cannot enroll now, checked in this order so that only
/// the holder of the secret learns whether it expired or was used.
/// `invalid` is the message for a wrong secret, `what` names what a token enrolls.
pub(crate) fn check_secret(
    stored: StoredSecret<'_>,
    secret: &str,
    now: Timestamp,
    invalid: &str,
    what: &str,
) -> Result<(), ApiError> {
    if !secret_matches(stored.secret_sha256, secret) {
        return Err(ApiError::unauthorized(invalid));
    }
    if stored.used_at.is_some() {
        return Err(ApiError::unauthorized(format!(
            "the join token was already used; a join token enrolls one {what}, create a new one"
        )));
    }
    if stored.expires_at <= now {
        return Err(ApiError::unauthorized(format!(
            "the join token expired at {}; create a new one",
            stored.expires_at
        )));
    }
    Ok(())
}

fn check_token(token: &AgentToken, secret: &str, now: Timestamp) -> Result<(), ApiError> {
    let stored =
        StoredSecret { secret_sha256: &token.secret_sha256, used_at: token.used_at, expires_at: token.expires_at };
    check_secret(stored, secret, now, INVALID_TOKEN, "agent")
}

/// Parses a join token and checks that this control plane made it; `invalid`
/// is the message for a token whose id is malformed.
pub(crate) fn parse_token(state: &AppState, raw: &str, invalid: &str) -> Result<(JoinToken, JoinTokenId), ApiError> {
    let token: JoinToken = raw.parse().map_err(|e| ApiError::unauthorized(format!("{e}")))?;
    if token.ca_sha256 != state.ca.cert_sha256_hex() {
        return Err(ApiError::unauthorized(
            "the join token was made by another control plane (its CA hash does not match this server's CA); \
             create a token on this control plane",
        ));
    }
    let token_id = JoinTokenId::parse(&token.token_id).map_err(|_| ApiError::unauthorized(invalid.to_string()))?;
    Ok((token, token_id))
}

/// Validates an advertise address: `host:port` or `[v6]:port`, a name or a
/// specific IP (not 0.0.0.0), port 1–65535.
pub fn validate_advertise(advertise: &str) -> Result<String, ApiError> {
    let bad = |why: &str| {
        ApiError::invalid(
            "ValidationError",
            format!("advertise {advertise:?} {why}; give host:port that other agents can reach, e.g. 10.0.0.5:7443"),
        )
    };
    if let Ok(addr) = advertise.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(bad("has port 0"));
        }
        if addr.ip().is_unspecified() || addr.ip().is_multicast() {
            return Err(bad("is not a unicast address"));
        }
        return Ok(addr.to_string());
    }
    let (host, port) = advertise.rsplit_once(':').ok_or_else(|| bad("has no port"))?;
    let port: u16 = port.parse().map_err(|_| bad("has no valid port"))?;
    if port == 0 {
        return Err(bad("has port 0"));
    }
    if host.parse::<IpAddr>().is_ok() || host.contains(['[', ']']) {
        return Err(bad("is not host:port (write IPv6 addresses as [addr]:port)"));
    }
    let host = validate_domain_name(host).map_err(|_| bad("has an invalid host name"))?;
    Ok(format!("{host}:{port}"))
}

pub(crate) fn validate_hostname(hostname: &str) -> Result<String, ApiError> {
    let hostname = hostname.trim();
    let ok = (1..=253).contains(&hostname.len())
        && hostname.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if !ok {
        return Err(ApiError::invalid(
            "ValidationError",
            "hostname must be 1-253 letters, digits, dots, hyphens or underscores",
        ));
    }
    Ok(hostname.to_string())
}

pub(super) async fn enroll(
    State(state): State<AppState>,
    Json(req): Json<EnrollRequest>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let (token, token_id) = parse_token(&state, &req.join_token, INVALID_TOKEN)?;
    let advertise = req.advertise.as_deref().map(validate_advertise).transpose()?;
    if req.outbound_only && advertise.is_some() {
        return Err(ApiError::invalid(
            "ValidationError",
            "an outbound-only agent has no tunnel listener: give either advertise or outboundOnly, not both",
        ));
    }
    let hostname = validate_hostname(&req.hostname)?;
    let now = now();
    let agent_id = AgentId::generate(&seed()?);

    // First pass: check the token and learn where the agent goes, so the CSR
    // is signed outside the write transaction.
    let secret = token.secret.clone();
    let id = token_id.clone();
    let (stored, subnet) = state
        .read(move |tx| {
            let Some(stored) = tx.get_obj::<AgentToken>(id.as_str())? else {
                // Only the holder of the secret learns that the id names a relay's token.
                let relay_token = tx.get_obj::<crate::relays::records::RelayToken>(id.as_str())?;
                if relay_token.is_some_and(|t| secret_matches(&t.secret_sha256, &secret)) {
                    return Err(ApiError::unauthorized(
                        "this is a relay's join token: give it to `trellis relay`; an agent needs a token from \
                         `trellis agent-token create --subnet-id <subnet>`",
                    ));
                }
                return Err(ApiError::unauthorized(INVALID_TOKEN));
            };
            check_token(&stored, &secret, now)?;
            let subnet = tx.get_obj::<Subnet>(stored.subnet_id.as_str())?.ok_or_else(|| {
                ApiError::conflict(
                    "SubnetDeleted",
                    format!(
                        "subnet {} of this join token was deleted; create a token for an existing subnet",
                        stored.subnet_id
                    ),
                )
            })?;
            Ok((stored, subnet))
        })
        .await?;
    let issued = state
        .ca
        .sign_agent_csr(&req.csr_pem, agent_id.as_str(), stored.account_id.as_str(), stored.vpc_id.as_str())
        .map_err(|e| match e {
            PkiError::MalformedCsr(_) | PkiError::BadCsrSignature => ApiError::invalid("InvalidCsr", e.to_string()),
            other => ApiError::internal(format!("signing an agent certificate: {other}")),
        })?;

    let agent = Agent {
        id: agent_id.clone(),
        agent_id: agent_id.clone(),
        arn: Agent::arn_for(state.region(), &stored.account_id, &agent_id),
        account_id: stored.account_id.clone(),
        vpc_id: subnet.vpc_id.clone(),
        subnet_id: subnet.id.clone(),
        zone: subnet.zone.clone(),
        hostname,
        advertise,
        outbound_only: req.outbound_only,
        cert_sha256: issued.sha256_hex.clone(),
        status: AgentStatus::Online,
        last_seen_at: Some(now),
        config_version: 0,
        created_at: now,
    };
    let cert = AgentCert {
        id: issued.sha256_hex.clone(),
        agent_id: agent_id.clone(),
        account_id: stored.account_id.clone(),
        not_after: Timestamp::new(issued.not_after),
    };
    let secret = token.secret.clone();
    let record = agent.clone();
    state
        .write(move |tx| {
            // Checked again: another enrollment may have used the token since the first pass.
            let mut token =
                tx.get_obj::<AgentToken>(token_id.as_str())?.ok_or_else(|| ApiError::unauthorized(INVALID_TOKEN))?;
            check_token(&token, &secret, now)?;
            if tx.get_obj::<Subnet>(token.subnet_id.as_str())?.is_none() {
                return Err(ApiError::conflict("SubnetDeleted", "the subnet of this join token was deleted"));
            }
            token.used_at = Some(now);
            token.agent_id = Some(record.id.clone());
            tx.update_obj(&token)?;
            tx.insert_obj(&record)?;
            tx.insert_obj(&cert)?;
            tx.insert_obj(&super::records::AgentRuntime {
                id: record.id.clone(),
                account_id: record.account_id.clone(),
                boot_id: None,
                last_seen_at: Some(now),
                config_version: 0,
            })?;
            Ok(())
        })
        .await?;
    tracing::info!(agent = %agent.id, subnet = %agent.subnet_id, "agent enrolled");
    Ok(Json(EnrollResponse {
        agent_id: agent.id.to_string(),
        account_id: agent.account_id.to_string(),
        vpc_id: agent.vpc_id.to_string(),
        subnet_id: agent.subnet_id.to_string(),
        certificate_pem: issued.pem,
        ca_pem: state.ca.cert_pem().to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertise_addresses_must_be_reachable_host_port() {
        assert_eq!(validate_advertise("10.0.0.5:7443").unwrap(), "10.0.0.5:7443");
        assert_eq!(validate_advertise("[::1]:7443").unwrap(), "[::1]:7443");
        assert_eq!(validate_advertise("gw.example.com:7443").unwrap(), "gw.example.com:7443");
        for bad in ["10.0.0.5", "0.0.0.0:7443", "10.0.0.5:0", "host:", ":7443", "::1:7443", "a b:1", "host:70000"] {
            assert!(validate_advertise(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn hostnames_are_plain_names() {
        assert_eq!(validate_hostname(" node-1.lan ").unwrap(), "node-1.lan");
        assert!(validate_hostname("").is_err());
        assert!(validate_hostname("a;rm -rf").is_err());
    }
}
