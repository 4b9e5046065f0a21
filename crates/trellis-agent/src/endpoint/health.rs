//! What the endpoint agent remembers about each gateway agent it tunnels to,
//! and the order in which a new flow tries them.
//!
//! A gateway whose connect, TLS handshake or open request timed out or was
//! refused is *down*: new flows skip it without waiting, and a background
//! probe (1 s, doubling to 30 s) brings it back as soon as it answers. Among
//! the gateways that are up, a flow prefers those of the agent's own zone and,
//! within a zone group, the one with the fewest open flows (ties rotate, so
//! short flows spread evenly too); other zones follow in the same order.
//!
//! Pure: time is passed in, nothing here connects or sleeps. The I/O (connects,
//! probes, metrics) lives in `pool.rs` and `proxy.rs`. The memory must never
//! turn a recovered network into an outage: when every gateway is down the
//! plan still names them all, for the caller to try at once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use trellis_proto::{GatewayTarget, RelayTarget};

use super::pool::GatewayKey;
use crate::metrics::Metrics;

/// Why and since when a gateway is skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Down {
    pub since: Instant,
    /// What the last attempt saw (`connecting … timed out`, `connection refused`).
    pub reason: String,
    /// Wait before the next probe; doubles after each failed one.
    backoff: Duration,
    next_probe: Instant,
}

#[derive(Debug, Default)]
struct Entry {
    /// Shared with each open flow's [`FlowCount`], which takes itself off when the flow ends.
    open_flows: Arc<AtomicUsize>,
    down: Option<Down>,
}

/// One open flow through a gateway agent, counted (for balancing) until dropped.
/// Holds only the gateway's counter: an open flow keeps no copy of its key.
#[derive(Debug)]
pub struct FlowCount(Arc<AtomicUsize>);

impl Drop for FlowCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The order a flow tries gateways in.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan<'a> {
    /// Gateways believed up: own zone first, each zone group least-loaded first.
    pub tries: Vec<&'a GatewayTarget>,
    /// Gateways believed down, skipped unless every other one fails.
    pub down: Vec<&'a GatewayTarget>,
}

/// Health and load of every gateway agent in the config.
#[derive(Debug)]
pub struct HealthTable {
    entries: HashMap<GatewayKey, Entry>,
    rotation: usize,
    first_probe: Duration,
    max_probe: Duration,
}

impl HealthTable {
    /// A table whose probes start `first_probe` after a failure and back off to `max_probe`.
    pub fn new(first_probe: Duration, max_probe: Duration) -> Self {
        Self { entries: HashMap::new(), rotation: 0, first_probe, max_probe: max_probe.max(first_probe) }
    }

    /// Forgets gateways not in `wanted` (they left the config); returns them.
    pub fn retain(&mut self, wanted: &HashSet<GatewayKey>) -> Vec<GatewayKey> {
        let gone: Vec<GatewayKey> = self.entries.keys().filter(|k| !wanted.contains(*k)).cloned().collect();
        for key in &gone {
            self.entries.remove(key);
        }
        for key in wanted {
            self.entries.entry(key.clone()).or_default();
        }
        gone
    }

    pub fn down(&self, key: &GatewayKey) -> Option<&Down> {
        self.entries.get(key).and_then(|e| e.down.as_ref())
    }

    pub fn is_down(&self, key: &GatewayKey) -> bool {
        self.down(key).is_some()
    }

    /// Records a failed attempt. Returns `true` when the gateway was up until
    /// now (the caller starts a probe); a gateway already down keeps its probe schedule.
    pub fn mark_down(&mut self, key: &GatewayKey, reason: &str, now: Instant) -> bool {
        let entry = self.entries.entry(key.clone()).or_default();
        if entry.down.is_some() {
            return false;
        }
        entry.down = Some(Down {
            since: now,
            reason: reason.to_string(),
            backoff: self.first_probe,
            next_probe: now + self.first_probe,
        });
        true
    }

    /// Records an answer. Returns `true` when the gateway was down until now.
    pub fn mark_up(&mut self, key: &GatewayKey) -> bool {
        self.entries.get_mut(key).is_some_and(|e| e.down.take().is_some())
    }

    /// How long until the next probe of a down gateway; `None` when it is up or unknown.
    pub fn probe_in(&self, key: &GatewayKey, now: Instant) -> Option<Duration> {
        self.down(key).map(|d| d.next_probe.saturating_duration_since(now))
    }

    /// Records a failed probe: the next one waits twice as long (up to the maximum).
    pub fn probe_failed(&mut self, key: &GatewayKey, reason: &str, now: Instant) {
        let max = self.max_probe;
        if let Some(down) = self.entries.get_mut(key).and_then(|e| e.down.as_mut()) {
            down.backoff = (down.backoff * 2).min(max);
            down.next_probe = now + down.backoff;
            down.reason = reason.to_string();
        }
    }

    /// Counts a flow opened through `key` until the returned count is dropped.
    pub fn flow_opened(&mut self, key: &GatewayKey) -> FlowCount {
        let counter = match self.entries.get(key) {
            Some(e) => e.open_flows.clone(),
            None => self.entries.entry(key.clone()).or_default().open_flows.clone(),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        FlowCount(counter)
    }

    pub fn open_flows(&self, key: &GatewayKey) -> usize {
        self.entries.get(key).map_or(0, |e| e.open_flows.load(Ordering::Relaxed))
    }

    /// The order in which a new flow tries `candidates`, for an agent in `zone`.
    pub fn plan<'a>(&mut self, candidates: &'a [GatewayTarget], zone: &str) -> Plan<'a> {
        let rotation = self.rotation;
        self.rotation = self.rotation.wrapping_add(1);
        let (down, up): (Vec<&GatewayTarget>, Vec<&GatewayTarget>) =
            candidates.iter().partition(|g| self.is_down(&GatewayKey::from(*g)));
        let (mut tries, others): (Vec<&GatewayTarget>, Vec<&GatewayTarget>) = up.iter().partition(|g| g.zone == zone);
        self.balance(&mut tries, rotation);
        let mut others = others;
        self.balance(&mut others, rotation);
        tries.extend(others);
        let (mut down_own, down_other): (Vec<&GatewayTarget>, Vec<&GatewayTarget>) =
            down.into_iter().partition(|g| g.zone == zone);
        down_own.extend(down_other);
        Plan { tries, down: down_own }
    }

    /// Sorts `group` by open flows; equals rotate with `rotation` so that
    /// consecutive flows start at different gateways.
    fn balance(&self, group: &mut [&GatewayTarget], rotation: usize) {
        let n = group.len();
        if n < 2 {
            return;
        }
        let start = rotation % n;
        let mut keyed: Vec<(usize, usize, &GatewayTarget)> = group
            .iter()
            .enumerate()
            .map(|(i, g)| (self.open_flows(&GatewayKey::from(*g)), (i + n - start) % n, *g))
            .collect();
        keyed.sort_by_key(|(flows, turn, _)| (*flows, *turn));
        for (slot, (_, _, g)) in group.iter_mut().zip(keyed) {
            *slot = g;
        }
    }
}

/// What the endpoint agent remembers about the relays it reaches
/// outbound-only gateway agents through, by relay id.
///
/// A relay that could not be reached (connect, TLS handshake or hello timed
/// out or failed) is *down*: flows try it only after every relay that is up.
/// Once its probe time comes (1 s, doubling to 30 s) it takes its place in the
/// order again for one attempt, which marks it up or down again: the flows
/// that need a relay probe it, and a silent relay costs one timeout per
/// probe interval, not one per flow. Handing a due path out moves its next
/// probe one interval on, so that of the connections made at once only the
/// first probes it; the others skip it as before. A relay that answers (even with a
/// refusal: the gateway is not attached there) is up.
///
/// The same memory keeps, under `direct:<agent id>`, the direct path of a
/// gateway agent that has both an address and relays: a direct address that
/// does not answer is skipped (straight to the relays) until its probe is due.
///
/// It also holds the config's revoked relay certificates (deleted relays):
/// a relay presenting one is not used. With [`RelayHealth::with_metrics`] it
/// publishes each relay's state (`trellis_endpoint_relay_up`) and failures;
/// series exist only for relays of the config (see [`RelayHealth::retain`]).
pub struct RelayHealth {
    down: HashMap<String, Down>,
    first_probe: Duration,
    max_probe: Duration,
    /// The config's `revoked_relay_certs`.
    revoked: Vec<String>,
    metrics: Option<Arc<Metrics>>,
    /// The config's relays (as of the last [`RelayHealth::retain`]): the only ones with metric series.
    configured: HashSet<String>,
}

impl std::fmt::Debug for RelayHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHealth").field("down", &self.down).field("revoked", &self.revoked).finish_non_exhaustive()
    }
}

/// Direct paths share the memory under this prefix; they are no relay (no relay metrics).
const DIRECT_PREFIX: &str = "direct:";

impl RelayHealth {
    pub fn new(first_probe: Duration, max_probe: Duration) -> Self {
        Self {
            down: HashMap::new(),
            first_probe,
            max_probe: max_probe.max(first_probe),
            revoked: Vec::new(),
            metrics: None,
            configured: HashSet::new(),
        }
    }

    /// Publishes relay states and failures to `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn publish(&self, id: &str, up: bool) {
        if let Some(m) = &self.metrics
            && self.configured.contains(id)
        {
            m.set_relay_up(id, up);
        }
    }

    /// Counts a failed attempt through relay `relay_id`; `reason` is one of
    /// [`crate::metrics::RELAY_FAILURE_REASONS`]. Relays no longer in the
    /// config are not counted (their attempts started before it changed).
    pub fn count_failure(&self, relay_id: &str, reason: &'static str) {
        if let Some(m) = &self.metrics
            && self.configured.contains(relay_id)
        {
            m.count_relay_failure(relay_id, reason);
        }
    }

    /// Takes the config's revoked relay certificates (hex SHA-256).
    pub fn set_revoked(&mut self, revoked: &[String]) {
        if self.revoked != revoked {
            self.revoked = revoked.to_vec();
        }
    }

    /// Whether a relay certificate (hex SHA-256) was revoked (a scan: deleted relays are few).
    pub fn is_revoked(&self, cert_sha256: &str) -> bool {
        self.revoked.iter().any(|c| c.eq_ignore_ascii_case(cert_sha256))
    }

    pub fn is_down(&self, relay_id: &str) -> bool {
        self.down.contains_key(relay_id)
    }

    /// The order in which a connection tries `relays` (given own zone first):
    /// relays that are up or due for a probe, in the given order, then the
    /// other down ones, longest down last. A due relay is handed out to this
    /// caller only: its next probe moves one interval on.
    pub fn order<'a>(&mut self, relays: &'a [RelayTarget], now: Instant) -> Vec<&'a RelayTarget> {
        let (mut tries, mut skipped): (Vec<&RelayTarget>, Vec<&RelayTarget>) =
            relays.iter().partition(|r| !self.skip(&r.relay_id, now));
        skipped.sort_by_key(|r| self.down.get(&r.relay_id).map(|d| std::cmp::Reverse(d.since)));
        tries.append(&mut skipped);
        tries
    }

    /// Whether a path marked down is still waiting for its next probe (skip
    /// it now). `false` for a due path hands its probe to this caller: the
    /// next caller skips it until one more interval has passed (or this
    /// attempt marks it up or down).
    pub fn skip(&mut self, id: &str, now: Instant) -> bool {
        match self.down.get_mut(id) {
            None => false,
            Some(d) if d.next_probe > now => true,
            Some(d) => {
                d.next_probe = now + d.backoff;
                false
            }
        }
    }

    /// Records a failed attempt; true when the relay was up until now. A
    /// relay already down waits twice as long for its next probe.
    pub fn mark_down(&mut self, relay_id: &str, reason: &str, now: Instant) -> bool {
        match self.down.get_mut(relay_id) {
            Some(d) => {
                d.backoff = (d.backoff * 2).min(self.max_probe);
                d.next_probe = now + d.backoff;
                d.reason = reason.to_string();
                false
            }
            None => {
                let d = Down {
                    since: now,
                    reason: reason.to_string(),
                    backoff: self.first_probe,
                    next_probe: now + self.first_probe,
                };
                self.down.insert(relay_id.to_string(), d);
                self.publish(relay_id, false);
                true
            }
        }
    }

    /// Records an answer; true when the relay was down until now.
    pub fn mark_up(&mut self, relay_id: &str) -> bool {
        let was_down = self.down.remove(relay_id).is_some();
        if was_down {
            self.publish(relay_id, true);
        }
        was_down
    }

    /// Forgets paths not in `wanted` (relay ids and `direct:` paths of the
    /// config), and their metric series; every wanted relay has a state series.
    pub fn retain(&mut self, wanted: &HashSet<&str>) {
        self.down.retain(|id, _| wanted.contains(id.as_str()));
        let Some(metrics) = self.metrics.clone() else { return };
        self.configured.retain(|id| {
            let keep = wanted.contains(id.as_str());
            if !keep {
                metrics.forget_relay(id);
            }
            keep
        });
        for id in wanted.iter().filter(|id| !id.starts_with(DIRECT_PREFIX)) {
            self.configured.insert(id.to_string());
            self.publish(id, !self.down.contains_key(*id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(id: &str) -> RelayTarget {
        RelayTarget { relay_id: id.into(), address: format!("{id}:7444"), zone: "z1".into(), server_name: id.into() }
    }

    #[test]
    fn a_down_relay_is_tried_last_until_its_probe_is_due_then_in_its_place_again() {
        let relays = [relay("r1"), relay("r2"), relay("r3")];
        let mut h = RelayHealth::new(Duration::from_secs(1), Duration::from_secs(30));
        let t0 = Instant::now();
        let order = |h: &mut RelayHealth, t| h.order(&relays, t).iter().map(|r| r.relay_id.clone()).collect::<Vec<_>>();
        assert_eq!(order(&mut h, t0), ["r1", "r2", "r3"], "the given order (own zone first) when all are up");
        assert!(h.mark_down("r1", "refused", t0));
        assert!(h.mark_down("r2", "refused", t0 + Duration::from_millis(1)));
        assert_eq!(order(&mut h, t0), ["r3", "r2", "r1"], "down relays last, the most recently failed first");
        assert_eq!(order(&mut h, t0 + Duration::from_secs(2)), ["r1", "r2", "r3"], "due for a probe: back in place");
        assert!(!h.mark_down("r1", "refused again", t0 + Duration::from_secs(2)), "already down");
        assert_eq!(
            order(&mut h, t0 + Duration::from_millis(2500))[0],
            "r3",
            "r1 waits 2 s now; r2's probe was handed out at 2 s"
        );
        assert_eq!(order(&mut h, t0 + Duration::from_secs(3))[0], "r2", "r2's probe has no answer: due again");
        assert_eq!(order(&mut h, t0 + Duration::from_secs(4))[0], "r1");
        assert!(h.skip("r2", t0 + Duration::from_millis(500)) && !h.skip("r2", t0 + Duration::from_secs(5)));
        assert!(h.mark_up("r1"));
        assert!(!h.is_down("r1"));
        h.retain(&HashSet::from(["r1"]));
        assert!(!h.is_down("r2"), "relays that left the config are forgotten");
    }

    #[test]
    fn relay_states_and_failures_are_published_for_the_configs_relays_only() {
        let metrics = Arc::new(Metrics::new());
        let mut h = RelayHealth::new(Duration::from_secs(1), Duration::from_secs(30)).with_metrics(metrics.clone());
        h.retain(&HashSet::from(["r1", "r2", "direct:agent-1"]));
        let text = metrics.encode();
        assert!(text.contains("trellis_endpoint_relay_up{relay=\"r1\"} 1"), "{text}");
        assert!(text.contains("trellis_endpoint_relay_up{relay=\"r2\"} 1"), "{text}");
        assert!(!text.contains("direct:"), "a direct path is no relay: {text}");

        h.mark_down("r1", "refused", Instant::now());
        h.count_failure("r1", "unreachable");
        h.count_failure("r9", "unreachable");
        let text = metrics.encode();
        assert!(text.contains("trellis_endpoint_relay_up{relay=\"r1\"} 0"), "{text}");
        assert!(
            text.contains("trellis_endpoint_relay_failures_total{relay=\"r1\",reason=\"unreachable\"} 1"),
            "{text}"
        );
        assert!(!text.contains("r9"), "a relay not in the config gets no series: {text}");
        h.mark_up("r1");
        assert!(metrics.encode().contains("trellis_endpoint_relay_up{relay=\"r1\"} 1"));

        // r1 leaves the config: every series of it goes.
        h.count_failure("r1", "busy");
        h.retain(&HashSet::from(["r2"]));
        let text = metrics.encode();
        assert!(!text.contains("relay=\"r1\""), "{text}");
        assert!(text.contains("trellis_endpoint_relay_up{relay=\"r2\"} 1"), "{text}");
    }

    #[test]
    fn a_due_path_is_handed_to_one_caller_and_skipped_by_the_others_meanwhile() {
        let relays = [relay("r1"), relay("r2")];
        let mut h = RelayHealth::new(Duration::from_secs(1), Duration::from_secs(30));
        let t0 = Instant::now();
        h.mark_down("r1", "no answer within 5s", t0);
        let due = t0 + Duration::from_secs(1);
        let first: Vec<_> =
            (0..3).map(|i| h.order(&relays, due + Duration::from_millis(i))[0].relay_id.clone()).collect();
        assert_eq!(first, ["r1", "r2", "r2"], "only the first connection once the probe is due tries the silent relay");
        assert_eq!(h.order(&relays, due + Duration::from_secs(1))[0].relay_id, "r1", "one interval later: due again");
        h.mark_down("direct:gw", "timed out", t0);
        assert!(!h.skip("direct:gw", due), "the first caller once due probes the direct path");
        assert!(h.skip("direct:gw", due), "the others go straight to the relays meanwhile");
        assert!(h.skip("direct:gw", due + Duration::from_millis(900)));
        assert!(!h.skip("direct:gw", due + Duration::from_secs(1)));
        assert!(!h.skip("r3", due), "a path never marked down is never skipped");
    }

    fn gw(id: &str, zone: &str) -> GatewayTarget {
        GatewayTarget {
            agent_id: id.into(),
            address: format!("{id}:7443"),
            zone: zone.into(),
            server_name: id.into(),
            relays: vec![],
        }
    }

    fn key(g: &GatewayTarget) -> GatewayKey {
        GatewayKey::from(g)
    }

    fn ids(list: &[&GatewayTarget]) -> Vec<String> {
        list.iter().map(|g| g.agent_id.clone()).collect()
    }

    fn table() -> HealthTable {
        HealthTable::new(Duration::from_secs(1), Duration::from_secs(30))
    }

    #[test]
    fn short_flows_alternate_over_the_gateways_of_the_own_zone() {
        let gws = [gw("a", "z1"), gw("b", "z1"), gw("c", "z2")];
        let mut t = table();
        let firsts: Vec<String> = (0..6).map(|_| t.plan(&gws, "z1").tries[0].agent_id.clone()).collect();
        assert_eq!(firsts, ["a", "b", "a", "b", "a", "b"]);
        for _ in 0..4 {
            let plan = t.plan(&gws, "z1");
            assert_eq!(plan.tries.len(), 3);
            assert_eq!(plan.tries[2].agent_id, "c", "another zone only after every gateway of the own zone");
            assert!(plan.down.is_empty());
        }
    }

    #[test]
    fn a_new_flow_goes_to_the_gateway_with_the_fewest_open_flows() {
        let gws = [gw("a", "z1"), gw("b", "z1"), gw("c", "z1")];
        let mut t = table();
        let a = [t.flow_opened(&key(&gws[0])), t.flow_opened(&key(&gws[0]))];
        let _b = t.flow_opened(&key(&gws[1]));
        for _ in 0..3 {
            assert_eq!(ids(&t.plan(&gws, "z1").tries), ["c", "b", "a"]);
        }
        drop(a);
        assert_eq!(t.open_flows(&key(&gws[0])), 0);
        assert_eq!(t.plan(&gws, "z1").tries[0].agent_id, "a");
        // A gateway that left the config while a flow was open: its count goes with it.
        let c = t.flow_opened(&key(&gws[2]));
        t.retain(&[key(&gws[0])].into_iter().collect());
        drop(c);
        assert_eq!(t.open_flows(&key(&gws[2])), 0);
    }

    #[test]
    fn a_down_gateway_is_skipped_until_it_answers_again() {
        let gws = [gw("a", "z1"), gw("b", "z1"), gw("c", "z2")];
        let mut t = table();
        let now = Instant::now();
        assert!(t.mark_down(&key(&gws[0]), "timed out", now));
        assert!(!t.mark_down(&key(&gws[0]), "timed out again", now), "already down");
        for _ in 0..4 {
            let plan = t.plan(&gws, "z1");
            assert_eq!(ids(&plan.tries), ["b", "c"]);
            assert_eq!(ids(&plan.down), ["a"]);
        }
        assert_eq!(t.down(&key(&gws[0])).map(|d| d.reason.as_str()), Some("timed out"));
        assert!(t.mark_up(&key(&gws[0])));
        assert!(!t.mark_up(&key(&gws[0])), "already up");
        assert_eq!(t.plan(&gws, "z1").tries.len(), 3);
    }

    #[test]
    fn when_the_own_zone_is_down_other_zones_take_the_flows_and_all_down_still_names_every_gateway() {
        let gws = [gw("a", "z1"), gw("b", "z2"), gw("c", "z2"), gw("d", "z1")];
        let mut t = table();
        let now = Instant::now();
        t.mark_down(&key(&gws[0]), "refused", now);
        t.mark_down(&key(&gws[3]), "refused", now);
        let firsts: Vec<String> = (0..4).map(|_| t.plan(&gws, "z1").tries[0].agent_id.clone()).collect();
        assert_eq!(firsts, ["b", "c", "b", "c"]);
        t.mark_down(&key(&gws[1]), "refused", now);
        t.mark_down(&key(&gws[2]), "refused", now);
        let plan = t.plan(&gws, "z1");
        assert!(plan.tries.is_empty());
        assert_eq!(ids(&plan.down), ["a", "d", "b", "c"], "own zone first, for the caller to try them all");
    }

    #[test]
    fn probes_back_off_from_one_to_thirty_seconds_and_restart_after_recovery() {
        let g = gw("a", "z1");
        let mut t = table();
        let t0 = Instant::now();
        assert_eq!(t.probe_in(&key(&g), t0), None, "an unknown gateway is up");
        t.mark_down(&key(&g), "refused", t0);
        assert_eq!(t.probe_in(&key(&g), t0), Some(Duration::from_secs(1)));
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..7 {
            now += t.probe_in(&key(&g), now).unwrap();
            t.probe_failed(&key(&g), "still refused", now);
            waits.push(t.probe_in(&key(&g), now).unwrap().as_secs());
        }
        assert_eq!(waits, [2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(t.probe_in(&key(&g), now + Duration::from_secs(60)), Some(Duration::ZERO), "overdue: probe now");
        assert_eq!(t.down(&key(&g)).unwrap().since, t0, "down since the first failure");
        t.mark_up(&key(&g));
        assert_eq!(t.probe_in(&key(&g), now), None);
        t.mark_down(&key(&g), "refused", now);
        assert_eq!(t.probe_in(&key(&g), now), Some(Duration::from_secs(1)), "a new outage starts at 1 s again");
    }

    #[test]
    fn gateways_that_leave_the_config_are_forgotten() {
        let gws = [gw("a", "z1"), gw("b", "z1")];
        let mut t = table();
        t.retain(&gws.iter().map(key).collect());
        t.mark_down(&key(&gws[0]), "refused", Instant::now());
        let gone = t.retain(&HashSet::from([key(&gws[1])]));
        assert_eq!(gone, [key(&gws[0])]);
        assert!(!t.is_down(&key(&gws[0])), "forgotten, so up if it comes back");
    }
}
