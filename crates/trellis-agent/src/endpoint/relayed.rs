//! An endpoint agent reaching a gateway agent through its relays: for an
//! outbound-only gateway agent (no address), or one whose direct address
//! does not answer.
//!
//! Relays are tried in the config's order (the endpoint agent's zone first),
//! relays the health memory knows are down last (`health::RelayHealth`). Per
//! relay: TCP, outer TLS verifying the relay's certificate
//! (`relay_server_name`), `Connect {gateway agent}`, the relay's answer. On
//! `ok` the outer TLS is left and the raw stream is returned, for the caller
//! to run the end-to-end TLS with the gateway agent over it (verifying the
//! gateway agent's server name, as on a direct connection). A relay whose
//! certificate the config revokes (a deleted relay) is refused right after
//! the TLS handshake, before it learns which gateway agent is wanted.

use std::io;
use std::time::{Duration, Instant};

use trellis_proto::relay::{Hello, RelayStatus};

use super::pool::{GatewayKey, GatewayPools};
use crate::read_ahead::ReadAhead;
use crate::relay_wire::{DialRelayError, dial_relay_unless_revoked};

/// A raw stream paired with `key`'s gateway agent by one of its relays, and that relay's id.
pub(super) async fn connect(
    pools: &GatewayPools,
    key: &GatewayKey,
    timeout: Duration,
) -> io::Result<(ReadAhead, String)> {
    let order: Vec<_> = { health(pools).order(&key.relays, Instant::now()).into_iter().cloned().collect() };
    let hello = Hello::Connect { gateway_agent_id: key.agent_id.clone() };
    let mut notes = Vec::new();
    for relay in &order {
        let revoked = |cert: &str| health(pools).is_revoked(cert);
        let (note, reason) = match dial_relay_unless_revoked(&pools.relay_connector, relay, &hello, timeout, revoked)
            .await
        {
            Ok(session) => {
                relay_up(pools, &relay.relay_id);
                match session.leave() {
                    Ok(raw) => return Ok((raw, relay.relay_id.clone())),
                    Err(e) => (format!("relay {}: {e}", relay.relay_id), "protocol"),
                }
            }
            Err(e @ DialRelayError::Unreachable { .. }) => {
                let reason = e.to_string();
                let marked = health(pools).mark_down(&relay.relay_id, &reason, Instant::now());
                if marked {
                    tracing::warn!(relay = %relay.relay_id, address = %relay.address, %reason, "relay marked down: connections try it last while it is probed");
                }
                (reason, "unreachable")
            }
            Err(DialRelayError::Refused { relay: id, answer }) => {
                relay_up(pools, &relay.relay_id);
                let reason = match answer.status {
                    RelayStatus::NotServed => "not_served",
                    RelayStatus::Unavailable => "unavailable",
                    RelayStatus::Busy => "busy",
                    RelayStatus::BadRequest | RelayStatus::Ok => "bad_request",
                };
                (DialRelayError::Refused { relay: id, answer }.to_string(), reason)
            }
            // Not down (it answered), not usable: left to the next config, which no longer lists it.
            Err(e @ DialRelayError::Revoked { .. }) => (e.to_string(), "revoked_certificate"),
        };
        health(pools).count_failure(&relay.relay_id, reason);
        tracing::debug!(gateway = %key.agent_id, note, "relay attempt failed");
        notes.push(note);
    }
    Err(io::Error::new(
        io::ErrorKind::ConnectionRefused,
        format!("no relay connected this agent to gateway agent {}: {}", key.agent_id, notes.join("; ")),
    ))
}

fn health(pools: &GatewayPools) -> std::sync::MutexGuard<'_, super::health::RelayHealth> {
    pools.relay_health.lock().unwrap_or_else(|e| e.into_inner())
}

fn relay_up(pools: &GatewayPools, relay_id: &str) {
    if health(pools).mark_up(relay_id) {
        tracing::info!(relay = %relay_id, "relay answers again");
    }
}
