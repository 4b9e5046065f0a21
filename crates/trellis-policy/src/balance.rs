//! Load-balancer choice among a service's targets.
//!
//! Only healthy targets are candidates. Least connections (the default)
//! takes the target with the fewest open connections, breaking ties in
//! turn so equal targets share new connections; round robin takes them in
//! turn; source hash sends a client address to the same target as long as
//! that target is healthy, and moves only the clients of a target that
//! leaves (rendezvous hashing over stable target keys).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// How a service spreads new connections over its healthy targets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Policy {
    #[default]
    LeastConnections,
    RoundRobin,
    SourceHash,
}

/// A target as the balancer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// A stable identity of the target (source hash keeps clients on it).
    pub key: u64,
    pub healthy: bool,
    /// Connections open to it now.
    pub active: u32,
}

/// The balancer of one service: the policy and its turn.
#[derive(Clone, Debug, Default)]
pub struct Balancer {
    policy: Policy,
    turn: usize,
}

impl Balancer {
    pub fn new(policy: Policy) -> Self {
        Self { policy, turn: 0 }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The index in `candidates` of the target for a new connection from
    /// `client`, or `None` when no target is healthy.
    pub fn pick(&mut self, candidates: &[Candidate], client: IpAddr) -> Option<usize> {
        let healthy: Vec<usize> = (0..candidates.len()).filter(|&i| candidates[i].healthy).collect();
        if healthy.is_empty() {
            return None;
        }
        let start = self.turn % healthy.len();
        self.turn = self.turn.wrapping_add(1);
        let in_turn = (0..healthy.len()).map(|i| healthy[(start + i) % healthy.len()]);
        match self.policy {
            Policy::RoundRobin => Some(healthy[start]),
            // `min_by_key` keeps the first of equals: the one whose turn it is.
            Policy::LeastConnections => in_turn.min_by_key(|&i| candidates[i].active),
            Policy::SourceHash => healthy.into_iter().max_by_key(|&i| rendezvous(client, candidates[i].key)),
        }
    }
}

/// FNV-1a: stable across builds and platforms, unlike the standard hasher.
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// A stable key for a target, from its address text and port.
pub fn target_key(address: &str, port: u16) -> u64 {
    fnv1a(address.bytes().chain(port.to_be_bytes()))
}

fn rendezvous(client: IpAddr, key: u64) -> u64 {
    let ip: Vec<u8> = match client {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    // Finalize with a multiply-xorshift so nearby keys spread.
    let mut h = fnv1a(ip.into_iter().chain(key.to_be_bytes()));
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn targets(active: &[u32]) -> Vec<Candidate> {
        active
            .iter()
            .enumerate()
            .map(|(i, &a)| Candidate { key: target_key(&format!("10.0.1.{i}"), 80), healthy: true, active: a })
            .collect()
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn no_healthy_target_means_no_pick() {
        for policy in [Policy::LeastConnections, Policy::RoundRobin, Policy::SourceHash] {
            let mut b = Balancer::new(policy);
            assert_eq!(b.pick(&[], ip(1)), None);
            let mut t = targets(&[0, 0]);
            t.iter_mut().for_each(|c| c.healthy = false);
            assert_eq!(b.pick(&t, ip(1)), None, "{policy:?}");
        }
    }

    #[test]
    fn least_connections_takes_the_least_busy_and_shares_ties() {
        let mut b = Balancer::new(Policy::LeastConnections);
        assert_eq!(b.pick(&targets(&[3, 1, 2]), ip(1)), Some(1));
        let mut seen = [0; 3];
        for _ in 0..30 {
            seen[b.pick(&targets(&[0, 0, 0]), ip(1)).unwrap()] += 1;
        }
        assert_eq!(seen, [10, 10, 10], "equal targets take turns");
    }

    #[test]
    fn round_robin_skips_unhealthy_targets() {
        let mut b = Balancer::new(Policy::RoundRobin);
        let mut t = targets(&[0, 0, 0]);
        t[1].healthy = false;
        let picks: Vec<_> = (0..6).map(|_| b.pick(&t, ip(1)).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 3, "{picks:?}");
        assert_eq!(picks.iter().filter(|&&p| p == 2).count(), 3, "{picks:?}");
    }

    #[test]
    fn source_hash_keeps_a_client_on_its_target_and_moves_only_a_lost_targets_clients() {
        let mut b = Balancer::new(Policy::SourceHash);
        let all = targets(&[0, 0, 0, 0]);
        let before: Vec<usize> = (0..1000).map(|c| b.pick(&all, ip(c)).unwrap()).collect();
        let again: Vec<usize> = (0..1000).map(|c| b.pick(&all, ip(c)).unwrap()).collect();
        assert_eq!(before, again, "stable");
        let spread = (0..4).map(|t| before.iter().filter(|&&p| p == t).count()).collect::<Vec<_>>();
        assert!(spread.iter().all(|&n| n > 150), "clients spread over targets: {spread:?}");
        let mut lost = all.clone();
        lost[2].healthy = false;
        for (c, &was) in before.iter().enumerate() {
            let now = b.pick(&lost, ip(c as u32)).unwrap();
            if was != 2 {
                assert_eq!(now, was, "client {c} moved although its target stayed");
            } else {
                assert_ne!(now, 2);
            }
        }
    }

    proptest! {
        #[test]
        fn a_pick_is_always_a_healthy_target(
            policy in prop_oneof![Just(Policy::LeastConnections), Just(Policy::RoundRobin), Just(Policy::SourceHash)],
            states in proptest::collection::vec((any::<bool>(), 0u32..100), 0..12),
            clients in proptest::collection::vec(any::<u32>(), 1..20),
        ) {
            let candidates: Vec<Candidate> = states
                .iter()
                .enumerate()
                .map(|(i, &(healthy, active))| Candidate { key: i as u64, healthy, active })
                .collect();
            let mut b = Balancer::new(policy);
            for c in clients {
                match b.pick(&candidates, ip(c)) {
                    Some(i) => prop_assert!(candidates[i].healthy),
                    None => prop_assert!(candidates.iter().all(|c| !c.healthy)),
                }
            }
        }
    }
}
