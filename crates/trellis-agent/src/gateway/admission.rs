//! Who may hold tunnel connections to this gateway, and how many.
//!
//! [`ConfigAdmission`] is asked by the TLS verifier during the handshake (and
//! by the listener right after it, since resumed sessions skip the verifier):
//! a peer must name a consumer VPC of the current config and must not be
//! revoked. [`PeerTable`] caps the connections one peer agent (by certificate)
//! holds, in total and still waiting for their open request, so that one peer
//! can never take every connection of the gateway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use trellis_proto::AgentConfig;

use super::authorize::{Denial, admit_peer};
use crate::metrics::Metrics;
use crate::tls::{PeerAdmission, PeerIdentity, Refusal};

/// Admits tunnel peers by the gateway role of the current config.
pub struct ConfigAdmission {
    pub config: watch::Receiver<Arc<AgentConfig>>,
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for ConfigAdmission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigAdmission").finish_non_exhaustive()
    }
}

impl PeerAdmission for ConfigAdmission {
    fn admit(&self, peer: &PeerIdentity) -> Result<(), Refusal> {
        // A read lock held for one lookup; the config publisher only ever swaps an Arc.
        let verdict = admit_peer(&self.config.borrow().gateway, peer);
        verdict.map_err(|denial| {
            tracing::debug!(agent = %peer.agent_id, account = %peer.account_id, vpc = %peer.vpc_id, reason = %denial, "refusing a tunnel handshake");
            let refusal = match denial {
                Denial::RevokedPeer(_) => Refusal::Revoked,
                _ => Refusal::NotAConsumer,
            };
            self.metrics.count_tunnel_refused(match refusal {
                Refusal::Revoked => "revoked_certificate",
                Refusal::NotAConsumer => "not_a_consumer",
            });
            refusal
        })
    }
}

/// A peer over one of its caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerLimit {
    #[error("the peer agent already holds {0} tunnel connections, its most")]
    Connections(usize),
    #[error("the peer agent already holds {0} tunnel connections and flows, its most")]
    Flows(usize),
    #[error("the peer agent already holds {0} connections without an open request, its most")]
    Pending(usize),
}

#[derive(Debug, Default, Clone, Copy)]
struct Held {
    total: usize,
    pending: usize,
}

/// Connections held per peer certificate, with caps.
#[derive(Debug)]
pub struct PeerTable {
    max_per_peer: usize,
    max_pending_per_peer: usize,
    /// By certificate hash; slots share the key (no allocation per flow).
    held: Mutex<HashMap<Arc<str>, Held>>,
}

impl PeerTable {
    pub fn new(max_per_peer: usize, max_pending_per_peer: usize) -> Self {
        Self { max_per_peer, max_pending_per_peer, held: Mutex::default() }
    }

    /// Counts a new connection of `peer` (still waiting for its open request),
    /// unless the peer is at one of its caps.
    pub fn enter(self: &Arc<Self>, peer: &str) -> Result<PeerSlot, PeerLimit> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let (key, entry) = Self::entry(&mut held, peer);
        if entry.total >= self.max_per_peer {
            return Err(PeerLimit::Connections(entry.total));
        }
        if entry.pending >= self.max_pending_per_peer {
            return Err(PeerLimit::Pending(entry.pending));
        }
        entry.total += 1;
        entry.pending += 1;
        Ok(PeerSlot { table: self.clone(), peer: key, pending: true })
    }

    /// Counts a flow of `peer` (it holds a socket to the resource), unless
    /// the peer is at its cap of connections and flows.
    pub fn enter_flow(self: &Arc<Self>, peer: &str) -> Result<PeerSlot, PeerLimit> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let (key, entry) = Self::entry(&mut held, peer);
        if entry.total >= self.max_per_peer {
            return Err(PeerLimit::Flows(entry.total));
        }
        entry.total += 1;
        Ok(PeerSlot { table: self.clone(), peer: key, pending: false })
    }

    /// `peer`'s entry and a shared key for its slot: allocated only for a peer holding nothing yet.
    fn entry<'a>(held: &'a mut HashMap<Arc<str>, Held>, peer: &str) -> (Arc<str>, &'a mut Held) {
        let key = match held.get_key_value(peer) {
            Some((key, _)) => key.clone(),
            None => Arc::from(peer),
        };
        (key.clone(), held.entry(key).or_default())
    }

    /// Connections `peer` holds now (total, waiting for an open request).
    pub fn held(&self, peer: &str) -> (usize, usize) {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(peer).map_or((0, 0), |h| (h.total, h.pending))
    }
}

/// One counted connection; uncounted when dropped.
#[derive(Debug)]
pub struct PeerSlot {
    table: Arc<PeerTable>,
    peer: Arc<str>,
    pending: bool,
}

impl PeerSlot {
    /// The connection got its open request: it no longer counts as pending.
    pub fn opened(&mut self) {
        if std::mem::take(&mut self.pending) {
            let mut held = self.table.held.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(h) = held.get_mut(&self.peer) {
                h.pending -= 1;
            }
        }
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut held = self.table.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.get_mut(&self.peer) {
            h.total -= 1;
            if self.pending {
                h.pending -= 1;
            }
            if h.total == 0 {
                held.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_peer_is_capped_and_others_are_not_affected() {
        let table = Arc::new(PeerTable::new(3, 2));
        let mut a1 = table.enter("a").unwrap();
        let _a2 = table.enter("a").unwrap();
        assert_eq!(table.enter("a").unwrap_err(), PeerLimit::Pending(2));
        a1.opened();
        let a3 = table.enter("a").unwrap();
        assert_eq!(table.enter("a").unwrap_err(), PeerLimit::Connections(3));
        let _b = table.enter("b").unwrap();
        assert_eq!(table.held("a"), (3, 2));
        drop(a3);
        drop(a1);
        assert_eq!(table.held("a"), (1, 1));
        table.enter("a").unwrap();
        assert_eq!(table.held("a"), (1, 1), "the slot was dropped right away");
    }

    #[test]
    fn a_peer_that_closed_everything_leaves_no_entry() {
        let table = Arc::new(PeerTable::new(3, 3));
        let mut slot = table.enter("a").unwrap();
        let flow = table.enter_flow("a").unwrap();
        assert!(Arc::ptr_eq(&slot.peer, &flow.peer), "a flow's slot shares its peer's key");
        let _third = table.enter_flow("a").unwrap();
        assert_eq!(
            table.enter_flow("a").unwrap_err().to_string(),
            "the peer agent already holds 3 tunnel connections and flows, its most"
        );
        drop((flow, _third));
        slot.opened();
        slot.opened();
        drop(slot);
        assert!(table.held.lock().unwrap().is_empty());
    }
}
