//! The relay's table of idle attachments: per gateway agent, the connections
//! it opened and keeps waiting for a flow, at most `per_gateway` of them.
//!
//! An entry is a handle to the task that holds the connection: a `Connect`
//! takes the freshest entry and sends it a [`Claim`]; the holding task tells
//! its gateway agent a flow arrives, waits for its `Accept`, and hands the
//! raw stream back. A holding task whose connection dies removes its own
//! entry. A connect that finds no entry waits (bounded) for the next one
//! only while others of the gateway are being paired (busy); a gateway with
//! no attachment at all is not waited for.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot};

use super::metrics::RelayMetrics;

/// The stream of a paired attachment, after the relay left its outer TLS.
pub type RawStream = crate::read_ahead::ReadAhead;

/// A flow taking an attachment.
pub struct Claim {
    /// The endpoint agent the flow comes from (for the gateway's log).
    pub from_agent_id: String,
    /// The raw stream to the gateway agent once it accepted, or why not.
    pub reply: oneshot::Sender<Result<RawStream, String>>,
}

struct Idle {
    id: u64,
    claim: oneshot::Sender<Claim>,
}

#[derive(Default)]
struct Gateway {
    idle: VecDeque<Idle>,
    arrived: Arc<Notify>,
    /// Attachments taken by a connect and not yet paired (or failed).
    pairing: usize,
}

/// Why [`Attachments::take`] gave no attachment.
pub enum NoAttachment {
    /// Every attachment is being paired: the gateway agent attaches more soon; wait on this.
    Busy(Arc<Notify>),
    /// The gateway agent has no attachment here at all (not connected to this relay).
    None(Arc<Notify>),
}

/// An attachment taken for a connect; counted as pairing until dropped.
pub struct Taken<'a> {
    claim: Option<oneshot::Sender<Claim>>,
    table: &'a Attachments,
    gateway: String,
}

impl Taken<'_> {
    /// Hands `claim` to the task holding the attachment; false when it is gone.
    pub fn send(&mut self, claim: Claim) -> bool {
        self.claim.take().is_some_and(|c| c.send(claim).is_ok())
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some(entry) = self.table.lock().get_mut(&self.gateway) {
            entry.pairing = entry.pairing.saturating_sub(1);
        }
    }
}

/// Idle attachments of every gateway agent.
pub struct Attachments {
    per_gateway: usize,
    gateways: Mutex<HashMap<String, Gateway>>,
    next_id: std::sync::atomic::AtomicU64,
    metrics: Arc<RelayMetrics>,
}

/// Why an attachment was not added.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "gateway agent {gateway} already keeps {limit} idle attachments here, the most this relay holds for one gateway"
)]
pub struct TooMany {
    pub gateway: String,
    pub limit: usize,
}

impl Attachments {
    pub fn new(per_gateway: usize, metrics: Arc<RelayMetrics>) -> Self {
        Self { per_gateway: per_gateway.max(1), gateways: Mutex::default(), next_id: 1.into(), metrics }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Gateway>> {
        self.gateways.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an idle attachment of `gateway`; returns its id and where its claim arrives.
    pub fn add(&self, gateway: &str) -> Result<(u64, oneshot::Receiver<Claim>), TooMany> {
        let mut gateways = self.lock();
        let entry = gateways.entry(gateway.to_string()).or_default();
        if entry.idle.len() >= self.per_gateway {
            return Err(TooMany { gateway: gateway.to_string(), limit: self.per_gateway });
        }
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (claim, rx) = oneshot::channel();
        entry.idle.push_back(Idle { id, claim });
        self.metrics.set_attachments(gateway, entry.idle.len());
        entry.arrived.notify_waiters();
        Ok((id, rx))
    }

    /// Removes attachment `id` of `gateway` (its connection died or is closed); false when a claim took it.
    pub fn remove(&self, gateway: &str, id: u64) -> bool {
        let mut gateways = self.lock();
        let Some(entry) = gateways.get_mut(gateway) else { return false };
        let before = entry.idle.len();
        entry.idle.retain(|i| i.id != id);
        let removed = entry.idle.len() != before;
        self.metrics.set_attachments(gateway, entry.idle.len());
        removed
    }

    /// Takes the freshest idle attachment of `gateway` (pairing until the
    /// [`Taken`] drops), or says whether any is being paired and what to wait on.
    pub fn take(&self, gateway: &str) -> Result<Taken<'_>, NoAttachment> {
        let mut gateways = self.lock();
        let entry = gateways.entry(gateway.to_string()).or_default();
        let taken = entry.idle.pop_back();
        self.metrics.set_attachments(gateway, entry.idle.len());
        match taken {
            Some(idle) => {
                entry.pairing += 1;
                Ok(Taken { claim: Some(idle.claim), table: self, gateway: gateway.to_string() })
            }
            None if entry.pairing > 0 => Err(NoAttachment::Busy(entry.arrived.clone())),
            None => Err(NoAttachment::None(entry.arrived.clone())),
        }
    }

    /// Idle attachments of `gateway` now.
    pub fn idle(&self, gateway: &str) -> usize {
        self.lock().get(gateway).map_or(0, |g| g.idle.len())
    }

    /// Gateway agents with at least one idle attachment, sorted.
    pub fn attached(&self) -> Vec<String> {
        let mut ids: Vec<String> =
            self.lock().iter().filter(|(_, g)| !g.idle.is_empty()).map(|(id, _)| id.clone()).collect();
        ids.sort();
        ids
    }

    /// Forgets gateways no longer served with no attachment left (their metric series too).
    pub fn prune(&self, served: impl Fn(&str) -> bool) {
        self.lock().retain(|id, g| {
            let keep = served(id) || !g.idle.is_empty() || g.pairing > 0;
            if !keep {
                self.metrics.forget_gateway(id);
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachments_are_bounded_per_gateway_taken_freshest_first_and_removed_by_id() {
        let table = Attachments::new(2, Arc::default());
        let (a, _ra) = table.add("gw-1").unwrap();
        let (b, mut rb) = table.add("gw-1").unwrap();
        assert_eq!(table.add("gw-1").err(), Some(TooMany { gateway: "gw-1".into(), limit: 2 }));
        assert!(table.add("gw-2").is_ok(), "the bound is per gateway");
        assert_eq!(table.attached(), ["gw-1", "gw-2"]);
        let mut taken = table.take("gw-1").ok().unwrap();
        let (reply, _) = oneshot::channel();
        assert!(taken.send(Claim { from_agent_id: "ep".into(), reply }));
        assert!(rb.try_recv().is_ok(), "the freshest attachment was taken");
        drop(taken);
        assert!(!table.remove("gw-1", b), "a taken attachment is no longer in the table");
        assert!(table.remove("gw-1", a));
        assert_eq!(table.idle("gw-1"), 0);
        assert!(matches!(table.take("gw-1"), Err(NoAttachment::None(_))), "none left at all: nothing to wait for");
    }

    #[test]
    fn a_connect_waits_only_while_attachments_are_being_paired() {
        let table = Attachments::new(2, Arc::default());
        assert!(matches!(table.take("gw-1"), Err(NoAttachment::None(_))), "never attached");
        let _a = table.add("gw-1").unwrap();
        let taken = table.take("gw-1").ok().unwrap();
        assert!(matches!(table.take("gw-1"), Err(NoAttachment::Busy(_))), "the only attachment is being paired");
        drop(taken);
        assert!(matches!(table.take("gw-1"), Err(NoAttachment::None(_))), "paired (or failed): none left");
    }
}
