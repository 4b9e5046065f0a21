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
use crate::compile::KeptLists;
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
    // Bounded by certificate lifetime: expired revocations are dropped from the store
    // (`server::drop_expired_revocations`), and so from here.
    let revoked_certs: BTreeSet<String> =
        tx.list_obj::<RevokedCert>(&Filter::default())?.into_iter().map(|c| c.id).collect();
    Ok(RelayConfig { version: 0, relay_id: relay.id.to_string(), zone: relay.zone.clone(), gateways, revoked_certs })
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
    fn compile_tracked(
        tx: &mut dyn Tx,
        id: &RelayId,
        _region: &str,
        _lists: Option<KeptLists<'_>>,
    ) -> Result<(Self, HashSet<Key>, Work), ApiError> {
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

#[cfg(test)]
mod compile_tests {
    use super::tests::relay;
    use super::*;
    use crate::agents::records::{AgentRuntime, RevokedCert};
    use crate::agents::tests::{REGION, World, agent, t0};
    use trellis_model::AgentId;
    use trellis_proto::AgentConfig;
    use trellis_store::sqlite::SqliteStore;
    use trellis_store::{read_with, write_with};

    fn agent_config(store: &SqliteStore, id: &AgentId) -> (AgentConfig, HashSet<Key>) {
        read_with(store, |tx| {
            let (config, keys, _) = <AgentConfig as ConfigKind>::compile_tracked(tx, id, REGION, None)?;
            Ok::<_, ApiError>((config, keys))
        })
        .unwrap()
    }

    fn relay_config(store: &SqliteStore, id: &RelayId) -> (RelayConfig, HashSet<Key>) {
        read_with(store, |tx| {
            let (config, keys, _) = <RelayConfig as ConfigKind>::compile_tracked(tx, id, REGION, None)?;
            Ok::<_, ApiError>((config, keys))
        })
        .unwrap()
    }

    /// The keys a write touches (what it would invalidate).
    fn writes(store: &SqliteStore, mut f: impl FnMut(&mut dyn Tx) -> Result<(), StoreError>) -> HashSet<Key> {
        write_with(store, |tx| {
            let mut t = Tracked::new(tx, Mode::Writes);
            f(&mut t)?;
            Ok::<_, StoreError>(t.finish().0)
        })
        .unwrap()
    }

    fn wakes(write: &HashSet<Key>, read: &HashSet<Key>) -> bool {
        write.iter().any(|k| read.contains(k))
    }

    /// The world with its z2 gateway agent outbound-only and relays in z1, z2 and (offline) z3.
    fn world_with_relays() -> (World, SqliteStore, [Relay; 3]) {
        let mut w = World::new();
        w.gw_agents[1].advertise = None;
        w.gw_agents[1].outbound_only = true;
        let store = w.store();
        let relays = [
            relay(1, "z1", AgentStatus::Online),
            relay(2, "z2", AgentStatus::Online),
            relay(3, "z3", AgentStatus::Offline),
        ];
        write_with(&store, |tx| relays.iter().try_for_each(|r| tx.insert_obj(r))).unwrap();
        (w, store, relays)
    }

    fn ids(targets: &[RelayTarget]) -> Vec<&str> {
        targets.iter().map(|t| t.relay_id.as_str()).collect()
    }

    #[test]
    fn an_outbound_only_gateway_agent_gets_relays_and_endpoints_reach_it_through_them() {
        let (w, store, [r1, r2, _offline]) = world_with_relays();
        let (gw, _) = agent_config(&store, &w.gw_agents[1].id);
        assert_eq!(ids(&gw.relays), [r2.id.as_str(), r1.id.as_str()], "own zone (z2) first, no offline relay");
        assert!(
            agent_config(&store, &w.gw_agents[0].id).0.relays.is_empty(),
            "an agent with a listener attaches nowhere"
        );

        // The consumer's endpoint agent (z1): the direct agent as before, the
        // outbound-only one through the same relays, its own zone (z1) first.
        let (consumer, _) = agent_config(&store, &w.consumer_agents[0].id);
        let targets = &consumer.endpoints[0].resources[0].gateways;
        assert_eq!(targets.len(), 2, "{targets:?}");
        let direct = targets.iter().find(|t| t.agent_id == w.gw_agents[0].id.as_str()).unwrap();
        assert_eq!((direct.address.as_str(), direct.relays.len()), ("192.0.2.1:7443", 0));
        let relayed = targets.iter().find(|t| t.agent_id == w.gw_agents[1].id.as_str()).unwrap();
        assert_eq!(relayed.address, "", "no direct path");
        assert_eq!(ids(&relayed.relays), [r1.id.as_str(), r2.id.as_str()]);

        // Without any online relay, the outbound-only agent is no target at all.
        write_with(&store, |tx| {
            tx.delete_obj::<Relay>(r1.id.as_str())?;
            tx.delete_obj::<Relay>(r2.id.as_str()).map(drop)
        })
        .unwrap();
        let (consumer, _) = agent_config(&store, &w.consumer_agents[0].id);
        let targets = &consumer.endpoints[0].resources[0].gateways;
        assert_eq!(targets.iter().map(|t| t.agent_id.as_str()).collect::<Vec<_>>(), [w.gw_agents[0].id.as_str()]);
    }

    #[test]
    fn a_relays_config_lists_exactly_the_outbound_only_agents_attached_to_it() {
        let (w, store, [r1, r2, offline]) = world_with_relays();
        let gateway = RelayGateway {
            agent_id: w.gw_agents[1].id.to_string(),
            account_id: w.owner.id.to_string(),
            vpc_id: w.owner_vpc.id.to_string(),
        };
        for r in [&r1, &r2] {
            let (config, _) = relay_config(&store, &r.id);
            assert_eq!(config.gateways, vec![gateway.clone()], "relay of {}", r.zone);
            assert_eq!((config.relay_id.as_str(), config.zone.as_str()), (r.id.as_str(), r.zone.as_str()));
        }
        assert!(relay_config(&store, &offline.id).0.gateways.is_empty(), "an offline relay serves nobody");

        // Five online relays: the agent attaches to four, the fifth serves nobody.
        let more = [
            relay(4, "z4", AgentStatus::Online),
            relay(5, "z5", AgentStatus::Online),
            relay(6, "z6", AgentStatus::Online),
        ];
        write_with(&store, |tx| more.iter().try_for_each(|r| tx.insert_obj(r))).unwrap();
        let serving: Vec<_> = [&r1, &r2, &more[0], &more[1], &more[2]]
            .into_iter()
            .filter(|r| !relay_config(&store, &r.id).0.gateways.is_empty())
            .map(|r| r.zone.clone())
            .collect();
        assert_eq!(serving, ["z1", "z2", "z4", "z5"]);

        // Revoked certificates travel to every relay.
        let revoked = RevokedCert {
            id: "ab".repeat(32),
            account_id: w.consumer.id.clone(),
            vpc_id: w.consumer_vpc.id.clone(),
            agent_id: w.consumer_agents[1].id.clone(),
            not_after: t0(),
        };
        write_with(&store, |tx| tx.insert_obj(&revoked)).unwrap();
        assert_eq!(relay_config(&store, &r1.id).0.revoked_certs, BTreeSet::from([revoked.id.clone()]));
    }

    #[test]
    fn a_deleted_relays_certificate_reaches_the_agents_that_use_relays_and_no_other() {
        let (w, store, [r1, ..]) = world_with_relays();
        let (_, consumer_reads) = agent_config(&store, &w.consumer_agents[0].id);
        let revoked =
            crate::relays::records::RevokedRelayCert { id: "cd".repeat(32), relay_id: r1.id.clone(), not_after: t0() };
        let keys = writes(&store, |tx| tx.insert_obj(&revoked));
        assert!(wakes(&keys, &consumer_reads), "the endpoint agent reaching relays recompiles");
        let reaching = agent_config(&store, &w.consumer_agents[0].id).0;
        assert_eq!(reaching.revoked_relay_certs, vec![revoked.id.clone()], "endpoint agent reaching relays");
        assert!(reaching.is_relay_revoked(&revoked.id));
        assert_eq!(agent_config(&store, &w.gw_agents[1].id).0.revoked_relay_certs, vec![revoked.id.clone()]);
        assert!(agent_config(&store, &w.gw_agents[0].id).0.revoked_relay_certs.is_empty(), "a direct gateway agent");
        assert!(agent_config(&store, &w.consumer_agents[1].id).0.revoked_relay_certs.is_empty(), "no relayed target");
    }

    #[test]
    fn unrelated_writes_wake_no_relay_and_relay_writes_wake_only_who_uses_relays() {
        let (w, store, [r1, ..]) = world_with_relays();
        let (_, relay_reads) = relay_config(&store, &r1.id);
        let (_, direct_gw_reads) = agent_config(&store, &w.gw_agents[0].id);
        let (_, outbound_reads) = agent_config(&store, &w.gw_agents[1].id);
        let (_, consumer_reads) = agent_config(&store, &w.consumer_agents[0].id);
        let (_, idle_consumer_reads) = agent_config(&store, &w.consumer_agents[1].id);

        // Writes that have nothing to do with relays.
        let mut direct = w.gw_agents[0].clone();
        direct.status = AgentStatus::Offline;
        let unrelated = [
            writes(&store, |tx| tx.update_obj(&direct)),
            writes(&store, |tx| tx.insert_obj(&agent(&w.owner_subnets[0], 40, Some("192.0.2.40:7443")))),
            writes(&store, |tx| {
                tx.insert_obj(&AgentRuntime {
                    id: w.gw_agents[1].id.clone(),
                    account_id: w.owner.id.clone(),
                    boot_id: Some("b".into()),
                    last_seen_at: Some(t0()),
                    config_version: 1,
                })
            }),
            writes(&store, |tx| {
                let mut ep = w.endpoint.clone();
                ep.state = trellis_model::EndpointState::Available;
                tx.update_obj(&ep)
            }),
        ];
        for (i, keys) in unrelated.iter().enumerate() {
            assert!(!wakes(keys, &relay_reads), "write {i} wakes a relay: {keys:?}");
        }

        // A new relay wakes the relays, the outbound-only agent and the endpoint agent reaching it; not the others.
        let new_relay = writes(&store, |tx| tx.insert_obj(&relay(7, "z1", AgentStatus::Online)));
        assert!(wakes(&new_relay, &relay_reads));
        assert!(wakes(&new_relay, &outbound_reads));
        assert!(wakes(&new_relay, &consumer_reads));
        assert!(!wakes(&new_relay, &direct_gw_reads), "an agent with a listener does not read relays");
        assert!(!wakes(&new_relay, &idle_consumer_reads), "an agent with no outbound-only target does not either");

        // An agent turning outbound-only wakes the relays.
        let mut turning = w.gw_agents[0].clone();
        turning.advertise = None;
        turning.outbound_only = true;
        assert!(wakes(&writes(&store, |tx| tx.update_obj(&turning)), &relay_reads));
    }
}
