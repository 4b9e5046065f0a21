//! Which relays serve which outbound-only agents, for agent configs and
//! relay configs alike, so both sides always agree.
//!
//! An outbound-only agent attaches to the ONLINE relays, those of its own
//! zone first, then the others by zone and id, at most
//! [`MAX_RELAYS_PER_AGENT`]. An endpoint agent reaches it through those same
//! relays, its own zone's first. A relay serves exactly the outbound-only
//! agents whose set holds it.
//!
//! Pure over a store snapshot, like [`crate::compile`]: it reads all relays
//! (a handful; any relay change can change every set) and the outbound-only
//! agents by their own reference ([`OUTBOUND_ONLY_REF`]), so no other
//! agent's write wakes a relay.

use std::collections::{BTreeSet, HashSet};

use trellis_model::{Agent, AgentStatus, OUTBOUND_ONLY_REF, Relay, RelayId};
use trellis_proto::{RelayConfig, RelayGateway, RelayTarget, relay_server_name};
use trellis_store::track::{Key, Mode, Tracked, Work};
use trellis_store::{Filter, StoreError, Tx, TxExt};

use crate::agents::records::RevokedCert;
use crate::configs::{ConfigCache, ConfigKind};
use crate::error::ApiError;
use crate::state::AppState;

/// Most relays one outbound-only agent attaches to.
pub const MAX_RELAYS_PER_AGENT: usize = 4;

/// The relays an outbound-only agent of `zone` attaches to, in order.
pub fn attach_to<'a>(relays: &'a [Relay], zone: &str) -> Vec<&'a Relay> {
    let mut online: Vec<&Relay> = relays.iter().filter(|r| r.status == AgentStatus::Online).collect();
    online.sort_by(|a, b| (a.zone != zone, &a.zone, &a.id).cmp(&(b.zone != zone, &b.zone, &b.id)));
    online.truncate(MAX_RELAYS_PER_AGENT);
    online
}

/// The relays an endpoint agent of `endpoint_zone` reaches an outbound-only
/// agent of `gateway_zone` through: the agent's set, `endpoint_zone`'s first.
pub fn reach_through(relays: &[Relay], gateway_zone: &str, endpoint_zone: &str) -> Vec<RelayTarget> {
    let mut set = attach_to(relays, gateway_zone);
    // Stable: within each half, the gateway's order stays.
    set.sort_by_key(|r| r.zone != endpoint_zone);
    set.into_iter().map(target).collect()
}

/// A relay as agents' configs name it.
pub fn target(relay: &Relay) -> RelayTarget {
    RelayTarget {
        relay_id: relay.id.to_string(),
        address: relay.advertise.clone(),
        zone: relay.zone.clone(),
        server_name: relay_server_name(relay.id.as_str()),
    }
}

/// Every relay, by id.
pub fn all_relays(tx: &mut dyn Tx) -> Result<Vec<Relay>, StoreError> {
    tx.list_obj::<Relay>(&Filter::default())
}

/// Compiles `relay`'s config from the snapshot `tx` (version left at 0).
pub fn compile_relay(tx: &mut dyn Tx, relay: &Relay) -> Result<RelayConfig, StoreError> {
    let relays = all_relays(tx)?;
    let agents: Vec<Agent> = tx.list_obj(&Filter::reference(OUTBOUND_ONLY_REF))?;
    let mut gateways: Vec<RelayGateway> = agents
        .iter()
        .filter(|a| a.outbound_only && attach_to(&relays, &a.zone).iter().any(|r| r.id == relay.id))
        .map(|a| RelayGateway {
            agent_id: a.id.to_string(),
            account_id: a.account_id.to_string(),
            vpc_id: a.vpc_id.to_string(),
        })
        .collect();
    gateways.sort();
    // A relay forwards from any enrolled endpoint agent: every revocation counts.
    let revoked_certs: BTreeSet<String> =
        tx.list_obj::<RevokedCert>(&Filter::default())?.into_iter().map(|c| c.id).collect();
    Ok(RelayConfig {
        version: 0,
        relay_id: relay.id.to_string(),
        zone: relay.zone.clone(),
        gateways,
        revoked_certs: revoked_certs.into_iter().collect(),
    })
}

pub(crate) const RELAY_DELETED: &str = "this relay was deleted; enroll it again with a new relay join token";

impl ConfigKind for RelayConfig {
    type Id = RelayId;
    const DELETED: &'static str = RELAY_DELETED;
    fn version(&self) -> u64 {
        self.version
    }
    fn set_version(&mut self, version: u64) {
        self.version = version;
    }
    fn compile_tracked(tx: &mut dyn Tx, id: &RelayId, _region: &str) -> Result<(Self, HashSet<Key>, Work), ApiError> {
        let mut tracked = Tracked::new(tx, Mode::Reads);
        let relay: Relay = tracked.get_obj(id.as_str())?.ok_or_else(|| ApiError::unauthorized(RELAY_DELETED))?;
        let config = compile_relay(&mut tracked, &relay)?;
        let (keys, work) = tracked.finish();
        Ok((config, keys, work))
    }
    fn cache(state: &AppState) -> &ConfigCache<Self> {
        &state.relay_configs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_model::Timestamp;

    pub(crate) fn relay(n: u8, zone: &str, status: AgentStatus) -> Relay {
        let id = RelayId::generate(&[9, n, n, n, n, n, n, n, n, n, n, n, n, n, n, n]);
        Relay {
            relay_id: id.clone(),
            id,
            zone: zone.into(),
            hostname: format!("relay{n}"),
            advertise: format!("192.0.2.{n}:7000"),
            cert_sha256: format!("{n:064x}"),
            status,
            created_at: Timestamp::from_unix_seconds(1_700_000_000),
        }
    }

    #[test]
    fn agents_attach_to_online_relays_own_zone_first_at_most_four() {
        let relays: Vec<Relay> = [("z2", 1), ("z1", 2), ("z3", 3), ("z1", 4), ("z2", 5), ("z4", 6)]
            .iter()
            .map(|(z, n)| relay(*n, z, AgentStatus::Online))
            .chain([relay(7, "z1", AgentStatus::Offline)])
            .collect();
        let zones = |set: Vec<&Relay>| set.iter().map(|r| r.zone.clone()).collect::<Vec<_>>();
        assert_eq!(zones(attach_to(&relays, "z1")), ["z1", "z1", "z2", "z2"]);
        assert_eq!(zones(attach_to(&relays, "z3")), ["z3", "z1", "z1", "z2"]);
        assert!(attach_to(&relays, "z1").iter().all(|r| r.status == AgentStatus::Online));
        assert!(attach_to(&[relay(1, "z1", AgentStatus::Offline)], "z1").is_empty());
    }

    #[test]
    fn endpoints_reach_through_the_gateways_relays_their_own_zone_first() {
        let relays = vec![relay(1, "z1", AgentStatus::Online), relay(2, "z2", AgentStatus::Online)];
        let via: Vec<String> = reach_through(&relays, "z1", "z2").into_iter().map(|t| t.zone).collect();
        assert_eq!(via, ["z2", "z1"]);
        let t = &reach_through(&relays, "z1", "z1")[0];
        assert_eq!(t.address, "192.0.2.1:7000");
        assert_eq!(t.server_name, relay_server_name(relays[0].id.as_str()));
    }
}
