//! Tunnel connections to gateway agents, each carrying many flows (stream
//! protocol version 2, see [`crate::mux`]), so a client's connect pays no TCP
//! or TLS handshake toward the gateway: a new flow is one OPEN frame on a
//! connection that is already up.
//!
//! One pool per gateway agent referenced by the config. A background task per
//! pool keeps a few connections up (`PoolSettings::warm`, two by default, so
//! that flows spread over more than one TLS connection and both cores can
//! encrypt), replaces the ones that close, and backs off while the gateway is
//! unreachable. A new flow goes to the open connection that carries the
//! fewest flows; when every one is full (`MAX_FLOWS_PER_CONNECTION`), a new
//! connection is made (concurrent opens share one connect), and one made
//! beyond the warm ones closes once its last flow ends. A data-plane thread
//! that opened a flow on another thread's connection is given one of its own
//! (see `Pool::shard_to_fill`), closed again after `PoolSettings::idle_close`
//! without a new flow. The number of connections kept up across all pools is
//! capped (from the open-files limit); with many gateways each pool keeps
//! fewer. Pools of gateways that leave the config are drained: their
//! connections close when their last flow ends. A pool never opens a flow by
//! itself: every OPEN on a tunnel connection is for a real client.
//!
//! The pools also keep the health memory of `health.rs`: a gateway that fails
//! to connect is marked down, its connections are drained and its pool stops
//! refilling; one probe task per down gateway reconnects with backoff and
//! marks it up (handing the probe's connection to the pool) once it answers.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_proto::stream::OpenRequest;
use trellis_proto::{GatewayTarget, RelayTarget};

use super::health::{FlowCount, HealthTable, Plan, RelayHealth};
use crate::gateway::listener::set_keepalive;
use crate::metrics::Metrics;
use crate::mux::{MuxConnection, MuxStream, OpenFlowError, Side};
use crate::read_ahead::ReadAhead;
use crate::shards::Shards;

/// The byte stream of a tunnel connection to a gateway agent.
pub type Tunnel = TlsStream<ReadAhead>;

/// A new tunnel connection and the path it took.
pub struct Connected {
    pub tunnel: Tunnel,
    /// The path in the relay health memory (`RelayHealth`): the relay id it
    /// went through, or `direct:<agent id>` for the direct address of a
    /// gateway agent that also has relays; `None` for a gateway agent that
    /// has no relays (its own health covers its only path).
    pub path: Option<String>,
}

/// A tunnel connection a pool drives: its flows, the path it took, and a
/// way to end it at once.
#[derive(Clone)]
pub struct Pooled {
    pub conn: MuxConnection,
    path: Option<String>,
    kill: CancellationToken,
    /// The data-plane thread that drives it (see [`Shards`]).
    shard: usize,
}

/// A flow opened by [`GatewayPools::open`].
pub struct Opened {
    pub stream: MuxStream,
    /// It went onto a connection that was already up.
    pub reused: bool,
    /// The connection it went onto.
    pub via: Pooled,
}

/// Sizes and deadlines of the pools.
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    /// Tunnel connections kept up per gateway agent (fewer when `max_warm_total` is short).
    pub warm: usize,
    /// Tunnel connections kept up across all gateway agents (more are made on demand).
    pub max_warm_total: usize,
    /// TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// First probe of a gateway marked down, after this; later ones wait twice as long…
    pub probe_first: Duration,
    /// … up to this.
    pub probe_max: Duration,
    /// A connection kept for a data-plane thread (beyond the warm ones) that
    /// carried no new flow for this long is closed; the thread gets one again
    /// once it opens a flow on another thread's.
    pub idle_close: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            warm: 2,
            max_warm_total: 256,
            connect_timeout: Duration::from_secs(5),
            probe_first: Duration::from_secs(1),
            probe_max: Duration::from_secs(30),
            idle_close: Duration::from_secs(300),
        }
    }
}

impl PoolSettings {
    /// Connections kept up per pool when there are `pools` of them (a
    /// pool adds one for each data-plane thread that carries flows, see
    /// [`Pool::shard_to_fill`]).
    fn warm_per_pool(&self, pools: usize) -> usize {
        self.warm.min(self.max_warm_total / pools.max(1))
    }

    /// Connections a pool keeps at most, those of its threads included
    /// (within its share of `max_warm_total`).
    fn most_per_pool(&self, pools: usize) -> usize {
        (self.max_warm_total / pools.max(1)).min(MAX_WARM_FOR_THREADS).max(self.warm_per_pool(pools))
    }
}

/// Connections per gateway that data-plane threads are given at most: one
/// for each thread that opened a flow on another thread's connection, so a
/// thread's flows stay on it. Only threads that carry flows get one (every
/// gateway holds them for every endpoint agent, and admits at least 8 per
/// peer that carry no flow yet, `Limits::pending_tunnels_per_peer`); more
/// threads than this open their flows on other threads' connections.
const MAX_WARM_FOR_THREADS: usize = 8;

/// Identifies a gateway agent to connect to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GatewayKey {
    pub agent_id: String,
    /// `host:port` the gateway advertised.
    pub address: String,
    /// DNS SAN its certificate must carry.
    pub server_name: String,
    /// Relays that reach it (an outbound-only gateway agent has no `address`).
    pub relays: Vec<RelayTarget>,
}

impl From<&GatewayTarget> for GatewayKey {
    fn from(g: &GatewayTarget) -> Self {
        Self {
            agent_id: g.agent_id.clone(),
            address: g.address.clone(),
            server_name: g.server_name.clone(),
            relays: g.relays.clone(),
        }
    }
}

struct Pool {
    key: GatewayKey,
    /// How many connections to keep up (changes with the number of pools).
    warm: AtomicUsize,
    /// How many to keep at most, with those of the threads that asked.
    most: AtomicUsize,
    /// Data-plane threads (a bit each, the first 64) that opened a flow on
    /// another thread's connection: the pool keeps one up for each of them too.
    wanted: AtomicU64,
    conns: Mutex<Vec<Pooled>>,
    /// Wakes the refill task when a connection closed or the target changed.
    changed: Notify,
    /// Wakes the refill task when the gateway answers again after being down.
    recovered: Notify,
    cancel: CancellationToken,
    /// The connect of `open_fresh` in flight per data-plane thread, which
    /// concurrent opens on that thread share.
    connecting: Mutex<Vec<Option<Connecting>>>,
    /// How often the refill task checked for idle connections.
    #[cfg(test)]
    idle_checks: AtomicUsize,
}

/// A shared connect: the new connection, or why it failed.
type Connecting = Shared<BoxFuture<'static, Result<Pooled, Arc<io::Error>>>>;

impl Pool {
    fn conns(&self) -> std::sync::MutexGuard<'_, Vec<Pooled>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Open connections that take new flows; closed ones are forgotten.
    fn live(&self) -> usize {
        let mut conns = self.conns();
        conns.retain(|c| c.conn.closed().is_none());
        conns.iter().filter(|c| c.conn.can_open()).count()
    }

    fn drain_all(&self) {
        for pooled in self.conns().drain(..) {
            pooled.conn.drain();
        }
    }

    /// The open connection with room and the fewest flows, preferring those
    /// of data-plane thread `shard`.
    fn least_loaded(&self, shard: usize) -> Option<Pooled> {
        let mut conns = self.conns();
        conns.retain(|c| c.conn.closed().is_none());
        conns.iter().filter(|c| c.conn.can_open()).min_by_key(|c| (c.shard != shard, c.conn.flows())).cloned()
    }

    /// The data-plane thread with the fewest connections that take flows.
    fn emptiest_shard(&self, threads: usize) -> usize {
        let mut count = vec![0usize; threads];
        for c in self.conns().iter().filter(|c| c.conn.closed().is_none() && c.conn.can_open()) {
            count[c.shard.min(threads - 1)] += 1;
        }
        (0..threads).min_by_key(|&i| count[i]).unwrap_or(0)
    }

    /// Records that data-plane thread `shard` opened a flow on another
    /// thread's connection; true the first time.
    fn want(&self, shard: usize) -> bool {
        let bit = 1u64.checked_shl(u32::try_from(shard).unwrap_or(u32::MAX)).unwrap_or(0);
        // A load first: every flow of a thread without a connection of its own comes here.
        bit != 0
            && self.wanted.load(Ordering::Relaxed) & bit == 0
            && self.wanted.fetch_or(bit, Ordering::Relaxed) & bit == 0
    }

    /// Closes the connections beyond the `warm` ones that carried no new
    /// flow for `idle` (each since `seen` first saw it idle), and forgets
    /// that their threads asked for one. `seen` is the caller's memory of
    /// each connection: flows opened so far, and since when that count holds.
    fn close_idle(&self, warm: usize, idle: Duration, seen: &mut Vec<(MuxConnection, u32, Instant)>, now: Instant) {
        let mut conns = self.conns();
        conns.retain(|c| c.conn.closed().is_none());
        seen.retain(|(conn, _, _)| conns.iter().any(|c| c.conn.same(conn)));
        let mut kept = conns.iter().filter(|c| c.conn.can_open() && c.conn.is_kept()).count();
        for c in conns.iter().filter(|c| c.conn.can_open() && c.conn.is_kept()) {
            let (opened, busy) = (c.conn.opened(), c.conn.flows() > 0);
            let Some(entry) = seen.iter_mut().find(|(conn, _, _)| conn.same(&c.conn)) else {
                seen.push((c.conn.clone(), opened, now));
                continue;
            };
            if busy || entry.1 != opened {
                (entry.1, entry.2) = (opened, now);
                continue;
            }
            if kept > warm && now.duration_since(entry.2) >= idle {
                c.conn.drain();
                kept -= 1;
                if let Some(bit) = 1u64.checked_shl(u32::try_from(c.shard).unwrap_or(u32::MAX)) {
                    self.wanted.fetch_and(!bit, Ordering::Relaxed);
                }
                tracing::debug!(gateway = %self.key.agent_id, thread = c.shard, "closing a tunnel connection idle for {idle:?}");
            }
        }
    }

    /// The thread a new kept connection should be driven on, if the pool
    /// needs one: while fewer than `warm` take flows, the thread with the
    /// fewest; then a thread that asked for its own ([`Pool::want`]) and has
    /// none, up to `most` connections in all.
    fn shard_to_fill(&self, warm: usize, most: usize, threads: usize) -> Option<usize> {
        let mut open = vec![0usize; threads];
        let mut live = 0;
        for c in self.conns().iter().filter(|c| c.conn.closed().is_none()) {
            open[c.shard.min(threads - 1)] += 1;
            live += usize::from(c.conn.can_open());
        }
        if live < warm {
            return Some(self.emptiest_shard(threads));
        }
        if live >= most {
            return None;
        }
        let wanted = self.wanted.load(Ordering::Relaxed);
        (0..threads.min(64)).find(|&i| wanted & (1 << i) != 0 && open[i] == 0)
    }
}

/// All pools of this agent.
pub struct GatewayPools {
    connector: TlsConnector,
    /// Outer TLS to relays (see `relayed.rs`).
    pub(super) relay_connector: TlsConnector,
    pub(super) relay_health: Mutex<RelayHealth>,
    settings: PoolSettings,
    pools: Mutex<HashMap<GatewayKey, Arc<Pool>>>,
    health: Mutex<HealthTable>,
    metrics: Arc<Metrics>,
    shards: Shards,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

/// Whether a failed connect says the gateway agent is not answering (as
/// opposed to a mistake on this side, like a malformed server name).
pub(super) fn is_unreachable(e: &io::Error) -> bool {
    e.kind() != io::ErrorKind::InvalidInput
}

impl GatewayPools {
    pub fn new(
        tls: Arc<rustls::ClientConfig>,
        settings: PoolSettings,
        metrics: Arc<Metrics>,
        shards: Shards,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            relay_connector: TlsConnector::from(crate::tls::relay_client_config(&tls)),
            relay_health: Mutex::new(
                RelayHealth::new(settings.probe_first, settings.probe_max).with_metrics(metrics.clone()),
            ),
            connector: TlsConnector::from(tls),
            settings,
            pools: Mutex::default(),
            health: Mutex::new(HealthTable::new(settings.probe_first, settings.probe_max)),
            metrics,
            shards,
            tracker,
            shutdown,
        }
    }

    /// The data-plane threads the connections are driven on.
    pub fn shards(&self) -> &Shards {
        &self.shards
    }

    fn relay_health(&self) -> std::sync::MutexGuard<'_, RelayHealth> {
        self.relay_health.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn health(&self) -> std::sync::MutexGuard<'_, HealthTable> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pool(&self, key: &GatewayKey) -> Option<Arc<Pool>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }

    /// Keeps pools and health for exactly the gateways in `wanted`: starts missing ones, drains the rest.
    pub fn retain(self: &Arc<Self>, wanted: &HashSet<GatewayKey>) {
        {
            let mut health = self.health();
            for gone in health.retain(wanted) {
                self.metrics.forget_gateway(&gone.agent_id, &gone.address);
            }
            for key in wanted {
                self.metrics.set_gateway_up(&key.agent_id, &key.address, !health.is_down(key));
            }
        }
        {
            let direct: Vec<String> = wanted.iter().map(|k| format!("direct:{}", k.agent_id)).collect();
            let mut paths: HashSet<&str> =
                wanted.iter().flat_map(|k| k.relays.iter().map(|r| r.relay_id.as_str())).collect();
            paths.extend(direct.iter().map(String::as_str));
            self.relay_health().retain(&paths);
        }
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|key, pool| {
            let keep = wanted.contains(key);
            if !keep {
                pool.cancel.cancel();
                pool.drain_all();
            }
            keep
        });
        let warm = self.settings.warm_per_pool(wanted.len());
        let most = self.settings.most_per_pool(wanted.len());
        for pool in pools.values() {
            pool.most.store(most, Ordering::Relaxed);
            if pool.warm.swap(warm, Ordering::Relaxed) != warm {
                pool.changed.notify_one();
            }
        }
        for key in wanted {
            if pools.contains_key(key) {
                continue;
            }
            let pool = Arc::new(Pool {
                key: key.clone(),
                warm: AtomicUsize::new(warm),
                most: AtomicUsize::new(most),
                wanted: AtomicU64::new(0),
                conns: Mutex::default(),
                changed: Notify::new(),
                recovered: Notify::new(),
                cancel: self.shutdown.child_token(),
                connecting: Mutex::new(vec![None; self.shards.len()]),
                #[cfg(test)]
                idle_checks: AtomicUsize::new(0),
            });
            pools.insert(key.clone(), pool.clone());
            let this = self.clone();
            self.tracker.spawn(async move { this.refill(pool).await });
        }
    }

    /// Opens a flow to `key` with `req` (the OPEN frame is queued): on a
    /// connection that is already up when one has room (`true`), else on a
    /// new one (`false`).
    ///
    /// A connection driven by the calling data-plane thread is taken first,
    /// so the flow's bytes stay on this thread; another thread's when this
    /// one has none with room.
    pub async fn open(self: &Arc<Self>, key: &GatewayKey, req: &OpenRequest) -> io::Result<Opened> {
        let here = self.shards.current();
        if let Some(pool) = self.pool(key)
            && let Some(via) = pool.least_loaded(here)
        {
            if via.shard != here && pool.want(here) {
                // This thread gets a connection of its own for its next flows.
                pool.changed.notify_one();
            }
            match via.conn.open(req) {
                Ok(stream) => return Ok(Opened { stream, reused: true, via }),
                Err(OpenFlowError::Closed(_) | OpenFlowError::Full) => {}
            }
        }
        self.open_fresh(key, req).await
    }

    /// Opens a flow on a new connection to `key`, which then serves later
    /// flows too. Concurrent calls share one connect. The new connection is
    /// kept up only while the pool keeps fewer than `warm` others up; else it
    /// closes once its last flow is gone, so bursts and gateways that reset
    /// flows leave no extra connections behind.
    pub async fn open_fresh(self: &Arc<Self>, key: &GatewayKey, req: &OpenRequest) -> io::Result<Opened> {
        let Some(pool) = self.pool(key) else {
            // A gateway outside the config: a connection of its own, for one use (see `adopt`).
            let via = self.connect_mux(key).await?;
            return match via.conn.open(req) {
                Ok(stream) => Ok(Opened { stream, reused: false, via }),
                Err(OpenFlowError::Closed(e)) => Err(io::Error::new(e.kind(), e.to_string())),
                Err(OpenFlowError::Full) => Err(io::Error::other("a new tunnel connection refused its first flow")),
            };
        };
        // Other callers may fill a shared connection first: then the next connect is shared.
        let here = self.shards.current();
        for _ in 0..8 {
            let connecting = {
                let mut slots = pool.connecting.lock().unwrap_or_else(|e| e.into_inner());
                let slot = &mut slots[here];
                match &*slot {
                    Some(c) => c.clone(),
                    None => {
                        let (this, pool) = (self.clone(), pool.clone());
                        let c = async move {
                            let connected = this.connect(&pool.key).await.map_err(Arc::new)?;
                            let kept = pool.conns().iter().filter(|c| c.conn.is_kept()).count();
                            let via = this.adopt(&pool.key, connected, here);
                            if kept >= pool.warm.load(Ordering::Relaxed) {
                                via.conn.close_when_idle();
                            }
                            Ok(via)
                        }
                        .boxed()
                        .shared();
                        *slot = Some(c.clone());
                        c
                    }
                }
            };
            let result = connecting.clone().await;
            {
                let mut slots = pool.connecting.lock().unwrap_or_else(|e| e.into_inner());
                if slots[here].as_ref().is_some_and(|c| c.ptr_eq(&connecting)) {
                    slots[here] = None;
                }
            }
            let via = result.map_err(|e| io::Error::new(e.kind(), e.to_string()))?;
            match via.conn.open(req) {
                Ok(stream) => return Ok(Opened { stream, reused: false, via }),
                Err(OpenFlowError::Closed(e)) => return Err(io::Error::new(e.kind(), e.to_string())),
                Err(OpenFlowError::Full) => {}
            }
            // Filled by the callers that shared it: any other connection with room will do.
            if let Some(via) = pool.least_loaded(here)
                && let Ok(stream) = via.conn.open(req)
            {
                return Ok(Opened { stream, reused: true, via });
            }
        }
        Err(io::Error::other("every new tunnel connection was filled by other flows; try again"))
    }

    /// A new multiplexed connection to `key`, driven by its own task and kept in `key`'s pool.
    pub async fn connect_mux(self: &Arc<Self>, key: &GatewayKey) -> io::Result<Pooled> {
        let connected = self.connect(key).await?;
        Ok(self.adopt(key, connected, self.shards.current()))
    }

    /// [`GatewayPools::connect`] run on data-plane thread `shard`, so that
    /// the connection's socket is registered there.
    async fn connect_on(self: &Arc<Self>, shard: usize, key: &GatewayKey) -> io::Result<Connected> {
        if self.shards.len() == 1 {
            return self.connect(key).await;
        }
        let (this, key, shutdown) = (self.clone(), key.clone(), self.shutdown.clone());
        let connect = async move {
            tokio::select! {
                r = this.connect(&key) => r,
                () = shutdown.cancelled() => Err(io::Error::other("the agent is shutting down")),
            }
        };
        match self.shards.spawn(shard, &self.tracker, connect).await {
            Ok(connected) => connected,
            Err(e) => Err(io::Error::other(format!("the data-plane thread stopped: {e}"))),
        }
    }

    /// Starts driving a new tunnel connection as a multiplexed one, on
    /// data-plane thread `shard` (where it was connected), and keeps it in
    /// `key`'s pool.
    pub(crate) fn adopt(self: &Arc<Self>, key: &GatewayKey, connected: Connected, shard: usize) -> Pooled {
        let Connected { tunnel, path } = connected;
        let pooled =
            Pooled { conn: MuxConnection::new(Side::Endpoint), path, kill: self.shutdown.child_token(), shard };
        let pool = self.pool(key);
        if let Some(pool) = &pool {
            pool.conns().push(pooled.clone());
        } else {
            // A gateway outside the config (tried while the config changes): one use only.
            pooled.conn.drain();
        }
        let (driven, kill) = (pooled.conn.clone(), pooled.kill.clone());
        self.shards.spawn(shard, &self.tracker, async move {
            tokio::select! {
                () = crate::mux::run(driven.clone(), Box::new(tunnel)) => {}
                () = kill.cancelled() => driven.abort("the tunnel connection stopped answering and was closed, or the agent is shutting down"),
            }
            if let Some(pool) = pool {
                pool.changed.notify_one();
            }
        });
        pooled
    }

    /// A flow on `via` got no answer to its open request: the connection is
    /// presumed dead (its path went silent: a relay or a gateway host lost
    /// without a reset). Closes it now, failing its other flows, and marks its
    /// path down so that new connections take another relay (or the relays
    /// instead of the direct address) without waiting for a timeout there too.
    pub fn connection_silent(&self, key: &GatewayKey, via: &Pooled, reason: &str) {
        via.kill.cancel();
        if let Some(path) = &via.path
            && self.relay_health().mark_down(path, reason, std::time::Instant::now())
        {
            tracing::warn!(gateway = %key.agent_id, path, reason, "a tunnel connection through this path stopped answering: path marked down, new connections try it last while it is probed");
        }
    }

    /// A fresh connection to `key`, bypassing the pool: direct when the
    /// gateway agent has an address, else (or when the direct path fails)
    /// through its relays (`relayed.rs`). Either way the TLS inside is the
    /// same end-to-end session with the gateway agent.
    pub async fn connect(&self, key: &GatewayKey) -> io::Result<Connected> {
        let name = ServerName::try_from(key.server_name.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("bad gateway server name: {e}")))?;
        let mut direct_failed = None;
        let direct_path = format!("direct:{}", key.agent_id);
        let skip_direct = !key.relays.is_empty() && self.relay_health().skip(&direct_path, std::time::Instant::now());
        if !key.address.is_empty() && !skip_direct {
            let attempt = async {
                let tcp = TcpStream::connect(key.address.as_str()).await?;
                let _ = tcp.set_nodelay(true);
                set_keepalive(&tcp);
                self.connector.connect(name.clone(), ReadAhead::new(tcp)).await
            };
            let result = tokio::time::timeout(self.settings.connect_timeout, attempt).await.map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to gateway agent {} timed out", key.address),
                )
            });
            match result {
                Ok(Ok(tunnel)) => {
                    self.metrics.count_tunnel_connect(None);
                    if key.relays.is_empty() {
                        return Ok(Connected { tunnel, path: None });
                    }
                    self.relay_health().mark_up(&direct_path);
                    return Ok(Connected { tunnel, path: Some(direct_path) });
                }
                Ok(Err(e)) | Err(e) if key.relays.is_empty() => return Err(e),
                Ok(Err(e)) | Err(e) => {
                    // Later connections go straight to the relays until the direct path is due for a probe.
                    self.relay_health().mark_down(&direct_path, &e.to_string(), std::time::Instant::now());
                    direct_failed = Some(e);
                }
            }
        }
        if key.relays.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("gateway agent {} has neither an address nor a relay", key.agent_id),
            ));
        }
        let attempt = async {
            let (raw, relay_id) = super::relayed::connect(self, key, self.settings.connect_timeout).await?;
            let tunnel = tokio::time::timeout(self.settings.connect_timeout, self.connector.connect(name, raw))
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("TLS with gateway agent {} through a relay timed out", key.agent_id),
                    )
                })??;
            self.metrics.count_tunnel_connect(Some(&relay_id));
            Ok(Connected { tunnel, path: Some(relay_id) })
        };
        attempt.await.map_err(|e: io::Error| match direct_failed {
            Some(direct) => io::Error::new(e.kind(), format!("direct: {direct}; through relays: {e}")),
            None => e,
        })
    }

    /// The order in which a new flow tries `candidates` (see `health.rs`).
    pub fn plan<'a>(&self, candidates: &'a [GatewayTarget], zone: &str) -> Plan<'a> {
        self.health().plan(candidates, zone)
    }

    pub fn is_down(&self, key: &GatewayKey) -> bool {
        self.health().is_down(key)
    }

    /// Counts a flow through `key` until the count drops.
    pub fn open_flow(&self, key: &GatewayKey) -> FlowCount {
        self.health().flow_opened(key)
    }

    /// Counts a flow that skipped `key` because it is down.
    pub fn count_skipped(&self, key: &GatewayKey) {
        self.metrics.count_gateway_skipped(&key.agent_id, &key.address);
    }

    /// Records that `key` did not answer: new flows skip it, its connections
    /// take no new flows, and a probe brings it back once it answers.
    pub fn mark_down(self: &Arc<Self>, key: &GatewayKey, reason: &str) {
        if !self.health().mark_down(key, reason, std::time::Instant::now()) {
            return;
        }
        tracing::warn!(gateway = %key.agent_id, address = %key.address, reason, "gateway agent marked down: new flows skip it while it is probed in the background");
        self.metrics.set_gateway_up(&key.agent_id, &key.address, false);
        if let Some(pool) = self.pool(key) {
            pool.drain_all();
        }
        let this = self.clone();
        let key = key.clone();
        self.tracker.spawn(async move { this.probe(key).await });
    }

    /// Records that `key` answered.
    pub fn mark_up(&self, key: &GatewayKey) {
        if !self.health().mark_up(key) {
            return;
        }
        tracing::info!(gateway = %key.agent_id, address = %key.address, "gateway agent answers again");
        self.metrics.set_gateway_up(&key.agent_id, &key.address, true);
        if let Some(pool) = self.pool(key) {
            pool.recovered.notify_one();
        }
    }

    /// Reconnects to a down gateway with backoff until it answers, it leaves
    /// the config, or something else marked it up.
    async fn probe(self: Arc<Self>, key: GatewayKey) {
        loop {
            let Some(wait) = self.health().probe_in(&key, std::time::Instant::now()) else { return };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.shutdown.cancelled() => return,
            }
            if !self.is_down(&key) {
                return;
            }
            let shard = self.pool(&key).map_or(0, |p| p.emptiest_shard(self.shards.len()));
            let attempt = tokio::select! {
                r = self.connect_on(shard, &key) => r,
                () = self.shutdown.cancelled() => return,
            };
            match attempt {
                Ok(connected) => {
                    // The probe's connection serves the next flows.
                    self.adopt(&key, connected, shard);
                    self.mark_up(&key);
                    return;
                }
                Err(e) => {
                    tracing::debug!(gateway = %key.agent_id, address = %key.address, error = %e, "gateway agent still down");
                    self.health().probe_failed(&key, &e.to_string(), std::time::Instant::now());
                }
            }
        }
    }

    async fn refill(self: &Arc<Self>, pool: Arc<Pool>) {
        let mut backoff = Duration::from_millis(200);
        let mut seen = Vec::new();
        let idle = self.settings.idle_close;
        // A zero idle time (library callers) must not make this a busy loop.
        let every = (idle / 4).max(Duration::from_millis(10));
        let mut next_check = Instant::now() + every;
        loop {
            if Instant::now() >= next_check {
                pool.close_idle(pool.warm.load(Ordering::Relaxed), idle, &mut seen, Instant::now());
                #[cfg(test)]
                pool.idle_checks.fetch_add(1, Ordering::Relaxed);
                next_check = Instant::now() + every;
            }
            if self.is_down(&pool.key) {
                // The probe task reconnects; the pool waits for its verdict.
                tokio::select! {
                    () = pool.recovered.notified() => {}
                    () = pool.cancel.cancelled() => return,
                }
                continue;
            }
            let warm = pool.warm.load(Ordering::Relaxed);
            let most = pool.most.load(Ordering::Relaxed);
            if let Some(shard) = pool.shard_to_fill(warm, most, self.shards.len()) {
                let attempt = tokio::select! {
                    r = self.connect_on(shard, &pool.key) => r,
                    () = pool.cancel.cancelled() => return,
                };
                match attempt {
                    Ok(connected) => {
                        backoff = Duration::from_millis(200);
                        self.adopt(&pool.key, connected, shard);
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(gateway = %pool.key.address, error = %e, "could not pre-connect to gateway agent");
                        if is_unreachable(&e) {
                            self.mark_down(&pool.key, &e.to_string());
                            continue;
                        }
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = pool.cancel.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                }
            }
            tokio::select! {
                () = pool.changed.notified() => {}
                () = tokio::time::sleep_until(next_check) => {}
                () = pool.cancel.cancelled() => return,
            }
        }
    }

    /// Open tunnel connections to `key` that take new flows (for tests and diagnostics).
    pub fn connection_count(&self, key: &GatewayKey) -> usize {
        self.pool(key).map_or(0, |p| p.live())
    }
}

impl Drop for GatewayPools {
    fn drop(&mut self) {
        for pool in self.pools.lock().unwrap_or_else(|e| e.into_inner()).values() {
            pool.cancel.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestCa;
    use crate::tls;
    use tokio::net::TcpListener;
    use tokio::time::Instant;

    fn request() -> OpenRequest {
        OpenRequest {
            vpc_endpoint_id: "vpce-1".into(),
            resource_configuration_id: "rcfg-1".into(),
            port: 80,
            client_addr: "127.0.0.1:9".parse().unwrap(),
        }
    }

    /// A gateway stand-in that completes TLS handshakes and holds the
    /// connections until `drop_all` is notified; counts them.
    fn holding_gateway(
        ca: &TestCa,
        listener: TcpListener,
    ) -> (GatewayKey, Arc<AtomicUsize>, Arc<Notify>, tokio::task::JoinHandle<()>) {
        let gateway = ca.issue("agent-0000000000000000a", "acct-1", "vpc-1");
        let acceptor =
            tokio_rustls::TlsAcceptor::from(tls::tunnel_server_config(&gateway, Arc::new(tls::AnyAgent)).unwrap());
        let key = GatewayKey {
            agent_id: gateway.agent_id.clone(),
            address: listener.local_addr().unwrap().to_string(),
            server_name: trellis_proto::agent_server_name(&gateway.agent_id),
            relays: vec![],
        };
        let accepted = Arc::new(AtomicUsize::new(0));
        let drop_all = Arc::new(Notify::new());
        let (counter, dropper) = (accepted.clone(), drop_all.clone());
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    r = listener.accept() => {
                        let Ok((tcp, _)) = r else { return };
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            counter.fetch_add(1, Ordering::SeqCst);
                            held.push(tls);
                        }
                    }
                    () = dropper.notified() => held.clear(),
                }
            }
        });
        (key, accepted, drop_all, server)
    }

    /// A pool of `warm` connections up to a [`holding_gateway`], both sides
    /// seeing all of them; and a deadline for the test's waits.
    struct Warm {
        pools: Arc<GatewayPools>,
        key: GatewayKey,
        accepted: Arc<AtomicUsize>,
        drop_all: Arc<Notify>,
        server: tokio::task::JoinHandle<()>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        deadline: Instant,
    }

    async fn warm_pool(warm: usize) -> Warm {
        warm_pool_on(warm, Shards::inline()).await
    }

    /// [`warm_pool`] driven on `shards`.
    async fn warm_pool_on(warm: usize, shards: Shards) -> Warm {
        warm_pool_with(PoolSettings { warm, ..PoolSettings::default() }, shards).await
    }

    /// [`warm_pool_on`] with `settings`.
    async fn warm_pool_with(settings: PoolSettings, shards: Shards) -> Warm {
        let warm = settings.warm;
        let ca = TestCa::new();
        let client = ca.issue("agent-0000000000000000b", "acct-2", "vpc-2");
        let (key, accepted, drop_all, server) = holding_gateway(&ca, TcpListener::bind("127.0.0.1:0").await.unwrap());
        let (shutdown, tracker) = (CancellationToken::new(), TaskTracker::new());
        let pools = Arc::new(GatewayPools::new(
            tls::tunnel_client_config(&client).unwrap(),
            settings,
            Arc::default(),
            shards,
            tracker.clone(),
            shutdown.clone(),
        ));
        pools.retain(&HashSet::from([key.clone()]));
        let deadline = Instant::now() + Duration::from_secs(10);
        // (The server side of a TLS 1.3 handshake may finish after the client's.)
        while pools.connection_count(&key) < warm || accepted.load(Ordering::SeqCst) < warm {
            assert!(Instant::now() < deadline, "pool never connected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Warm { pools, key, accepted, drop_all, server, shutdown, tracker, deadline }
    }

    impl Warm {
        async fn stop(self) {
            self.shutdown.cancel();
            self.tracker.close();
            self.tracker.wait().await;
            self.server.abort();
        }
    }

    #[tokio::test]
    async fn each_data_plane_thread_opens_flows_on_a_connection_it_drives() {
        let shards = Shards::start(2).unwrap();
        let w = warm_pool_on(2, shards.clone()).await;
        let pool = w.pools.pool(&w.key).unwrap();
        let mut driven_on: Vec<usize> = pool.conns().iter().map(|c| c.shard).collect();
        driven_on.sort();
        assert_eq!(driven_on, [0, 1], "one warm connection per thread");
        for shard in 0..2 {
            let (pools, key) = (w.pools.clone(), w.key.clone());
            let opened = shards
                .spawn(shard, &w.tracker, async move {
                    let mut opened = Vec::new();
                    for _ in 0..5 {
                        let o = pools.open(&key, &request()).await.unwrap();
                        opened.push((o.via.shard, o.stream));
                    }
                    opened
                })
                .await
                .unwrap();
            assert!(opened.iter().all(|(on, _)| *on == shard), "thread {shard} used another thread's connection");
        }
        assert_eq!(w.accepted.load(Ordering::SeqCst), 2, "no flow made a connection of its own");
        w.stop().await;
        shards.stop().await;
    }

    #[tokio::test]
    async fn a_thread_without_a_connection_borrows_one_then_gets_its_own() {
        let shards = Shards::start(3).unwrap();
        let w = warm_pool_on(2, shards.clone()).await;
        let pool = w.pools.pool(&w.key).unwrap();
        let driven_on = || {
            let mut on: Vec<usize> = pool.conns().iter().map(|c| c.shard).collect();
            on.sort();
            on
        };
        assert_eq!(driven_on(), [0, 1], "two warm connections, on the first two threads");
        let open_on_third = || {
            let (pools, key) = (w.pools.clone(), w.key.clone());
            shards.spawn(2, &w.tracker, async move {
                let o = pools.open(&key, &request()).await.unwrap();
                (o.via.shard, o.stream)
            })
        };
        let (first, _flow) = open_on_third().await.unwrap();
        assert_ne!(first, 2, "no connection of its own yet: another thread's");
        while driven_on() != [0, 1, 2] {
            assert!(Instant::now() < w.deadline, "the third thread never got a connection: {:?}", driven_on());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (next, _flow2) = open_on_third().await.unwrap();
        assert_eq!(next, 2, "its next flow goes onto its own connection");
        // Threads that never open a flow get none: an idle agent holds `warm` connections.
        assert_eq!(pool.conns().len(), 3);
        w.stop().await;
        shards.stop().await;
    }

    #[tokio::test]
    async fn a_thread_s_own_connection_idle_for_long_is_closed_and_given_again_when_it_opens_flows() {
        let shards = Shards::start(3).unwrap();
        let idle_close = Duration::from_millis(400);
        let w = warm_pool_with(PoolSettings { warm: 2, idle_close, ..PoolSettings::default() }, shards.clone()).await;
        let pool = w.pools.pool(&w.key).unwrap();
        let open_on = |shard: usize| {
            let (pools, key) = (w.pools.clone(), w.key.clone());
            shards.spawn(shard, &w.tracker, async move { pools.open(&key, &request()).await.unwrap().via.shard })
        };
        let kept_on = || {
            let mut on: Vec<usize> =
                pool.conns().iter().filter(|c| c.conn.is_kept() && c.conn.can_open()).map(|c| c.shard).collect();
            on.sort();
            on
        };
        for round in 0..2 {
            // Every thread opens a flow: each gets a connection of its own.
            while kept_on() != [0, 1, 2] {
                for shard in 0..3 {
                    let _ = open_on(shard).await.unwrap();
                }
                assert!(Instant::now() < w.deadline, "round {round}: a thread never got a connection");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // No flow for longer than idle_close: one connection goes, the warm two stay.
            let quiet = Instant::now();
            while kept_on().len() != 2 {
                assert!(quiet.elapsed() < Duration::from_secs(5), "round {round}: the idle connection was kept");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(quiet.elapsed() >= idle_close / 2, "closed before it was idle for long");
            let wanted = pool.wanted.load(Ordering::Relaxed);
            let on = kept_on();
            assert!((0..3).all(|i| wanted & (1 << i) == 0 || on.contains(&i)), "a closed thread's request stayed");
        }
        // Connections that keep carrying flows are never closed for idleness.
        while kept_on() != [0, 1, 2] {
            for shard in 0..3 {
                let _ = open_on(shard).await.unwrap();
            }
            assert!(Instant::now() < w.deadline, "the threads never got their connections back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let busy_until = Instant::now() + 3 * idle_close;
        while Instant::now() < busy_until {
            for shard in 0..3 {
                assert_eq!(open_on(shard).await.unwrap(), shard);
            }
            assert_eq!(kept_on(), [0, 1, 2], "a connection in use was closed");
            tokio::time::sleep(idle_close / 8).await;
        }
        w.stop().await;
        shards.stop().await;
    }

    #[tokio::test]
    async fn a_zero_idle_close_checks_every_10_ms_instead_of_spinning_and_keeps_the_warm_connections() {
        let shards = Shards::start(2).unwrap();
        let settings = PoolSettings { warm: 2, idle_close: Duration::ZERO, ..PoolSettings::default() };
        let w = warm_pool_with(settings, shards.clone()).await;
        let pool = w.pools.pool(&w.key).unwrap();
        let (before, started) = (pool.idle_checks.load(Ordering::Relaxed), Instant::now());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let checks = pool.idle_checks.load(Ordering::Relaxed) - before;
        let most = started.elapsed().as_millis() as usize / 10 + 2;
        assert!(checks <= most, "{checks} idle checks in {:?}: the refill task spins", started.elapsed());
        assert_eq!(w.pools.connection_count(&w.key), 2, "the warm connections are never closed for idleness");
        w.stop().await;
        shards.stop().await;
    }

    #[tokio::test]
    async fn pool_keeps_connections_up_and_opens_flows_on_them() {
        let w = warm_pool(2).await;
        let (pools, key, accepted, deadline) = (&w.pools, w.key.clone(), &w.accepted, w.deadline);
        // Flows go onto the connections that are up, spread over them; no new connection.
        let mut flows = Vec::new();
        for _ in 0..10 {
            let opened = pools.open(&key, &request()).await.unwrap();
            assert!(opened.reused, "a connection that was up was not used");
            flows.push(opened.stream);
        }
        // (The server side of a TLS 1.3 handshake may finish after the client's.)
        while accepted.load(Ordering::SeqCst) < 2 {
            assert!(Instant::now() < deadline, "the gateway never saw both connections");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "a flow made a connection of its own");
        assert_eq!(pools.connection_count(&key), 2);
        // A gateway that leaves the config loses its pool.
        pools.retain(&HashSet::new());
        assert_eq!(pools.connection_count(&key), 0);
        w.stop().await;
    }

    #[tokio::test]
    async fn a_connection_at_its_flow_cap_makes_the_pool_open_another() {
        let w = warm_pool(1).await;
        let (pools, key, accepted, deadline) = (&w.pools, w.key.clone(), &w.accepted, w.deadline);
        let mut flows = Vec::new();
        for _ in 0..trellis_proto::mux::MAX_FLOWS_PER_CONNECTION {
            let opened = pools.open(&key, &request()).await.unwrap();
            assert!(opened.reused, "a flow within the cap went to a new connection");
            flows.push(opened.stream);
        }
        let opened = pools.open(&key, &request()).await.unwrap();
        assert!(!opened.reused, "the flow beyond the cap was put on the full connection");
        flows.push(opened.stream);
        assert_eq!(pools.pool(&key).unwrap().conns().len(), 2);
        while accepted.load(Ordering::SeqCst) < 2 {
            assert!(Instant::now() < deadline, "the second connection never reached the gateway");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        w.stop().await;
    }

    #[tokio::test]
    async fn concurrent_opens_share_one_new_connection_which_closes_after_its_flows() {
        let w = warm_pool(1).await;
        let (pools, key, deadline) = (&w.pools, w.key.clone(), w.deadline);
        // The warm connection is full.
        let mut flows = Vec::new();
        for _ in 0..trellis_proto::mux::MAX_FLOWS_PER_CONNECTION {
            let opened = pools.open(&key, &request()).await.unwrap();
            assert!(opened.reused);
            flows.push(opened.stream);
        }
        // Twenty clients at once: one new connection carries them all.
        let opens: Vec<_> = (0..20)
            .map(|_| {
                let (pools, key) = (pools.clone(), key.clone());
                tokio::spawn(async move { pools.open(&key, &request()).await.unwrap().stream })
            })
            .collect();
        let mut burst = Vec::new();
        for open in opens {
            burst.push(open.await.unwrap());
        }
        let pool = pools.pool(&key).unwrap();
        let made = pool.conns().len();
        assert_eq!(made, 2, "concurrent opens made {} connections of their own", made - 1);
        // Beyond the warm one, the new connection is not kept once its flows are gone.
        drop(burst);
        drop(flows);
        while pool.conns().iter().filter(|c| c.conn.closed().is_none()).count() > 1 {
            assert!(Instant::now() < deadline, "the extra connection was kept after its flows ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pools.connection_count(&key), 1);
        w.stop().await;
    }

    #[tokio::test]
    async fn closed_connections_are_replaced() {
        let w = warm_pool(2).await;
        let (pools, key, accepted, drop_all, deadline) =
            (&w.pools, w.key.clone(), &w.accepted, &w.drop_all, w.deadline);
        drop_all.notify_one();
        while accepted.load(Ordering::SeqCst) < 4 || pools.connection_count(&key) < 2 {
            assert!(Instant::now() < deadline, "closed connections were not replaced");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(pools.open(&key, &request()).await.unwrap().reused);
        w.stop().await;
    }

    #[tokio::test]
    async fn a_failing_gateway_is_probed_with_backoff_not_hammered_and_comes_back() {
        let ca = TestCa::new();
        let gateway = ca.issue("agent-0000000000000000a", "acct-1", "vpc-1");
        let client = ca.issue("agent-0000000000000000b", "acct-2", "vpc-2");
        let acceptor =
            tokio_rustls::TlsAcceptor::from(tls::tunnel_server_config(&gateway, Arc::new(tls::AnyAgent)).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let key = GatewayKey {
            agent_id: gateway.agent_id.clone(),
            address: listener.local_addr().unwrap().to_string(),
            server_name: trellis_proto::agent_server_name(&gateway.agent_id),
            relays: vec![],
        };
        // Until `answer` is set, the "gateway" accepts TCP and closes at once: every handshake fails.
        let answer = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (answer2, counter) = (answer.clone(), accepted.clone());
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                if !answer2.load(Ordering::SeqCst) {
                    drop(tcp);
                } else if let Ok(tls) = acceptor.accept(tcp).await {
                    held.push(tls);
                }
            }
        });
        let (shutdown, tracker) = (CancellationToken::new(), TaskTracker::new());
        let metrics = Arc::new(Metrics::new());
        let probe_first = Duration::from_millis(400);
        let pools = Arc::new(GatewayPools::new(
            tls::tunnel_client_config(&client).unwrap(),
            PoolSettings { warm: 2, probe_first, probe_max: Duration::from_secs(30), ..PoolSettings::default() },
            metrics.clone(),
            Shards::inline(),
            tracker.clone(),
            shutdown.clone(),
        ));
        pools.retain(&HashSet::from([key.clone()]));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pools.is_down(&key) {
            assert!(Instant::now() < deadline, "a gateway whose handshakes fail was never marked down");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(metrics.encode().contains("trellis_gateway_up{gateway=\"agent-0000000000000000a\""));
        assert!(metrics.encode().lines().any(|l| l.starts_with("trellis_gateway_up{") && l.ends_with(" 0")));
        // Probes at 0.4 s, then 0.8 s later (1.2 s), then 1.6 s later (2.8 s): in 2 s
        // the pool and the probe together connect at most three times, where a pool
        // retrying on its own (every 0.2 s, doubling) would have tried five or more.
        let marked = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let during = accepted.load(Ordering::SeqCst);
        assert!(during <= 3, "{during} connects in the first 2 s of an outage");
        assert_eq!(pools.connection_count(&key), 0);

        answer.store(true, Ordering::SeqCst);
        while pools.is_down(&key) || pools.connection_count(&key) < 2 {
            assert!(Instant::now() < deadline, "the gateway was not probed back, or its pool did not refill");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(marked.elapsed() < Duration::from_secs(6), "back within the next probe (at 2.8 s or 6 s)");
        assert!(metrics.encode().lines().any(|l| l.starts_with("trellis_gateway_up{") && l.ends_with(" 1")));
        pools.retain(&HashSet::new());
        assert!(!metrics.encode().contains("trellis_gateway_up{"), "a gateway that left the config has no series");
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        server.abort();
    }

    #[test]
    fn many_gateways_share_the_warm_budget() {
        let s = PoolSettings { warm: 2, max_warm_total: 10, ..PoolSettings::default() };
        assert_eq!(s.warm_per_pool(1), 2);
        assert_eq!(s.warm_per_pool(5), 2);
        assert_eq!(s.warm_per_pool(6), 1);
        assert_eq!(s.warm_per_pool(11), 0, "beyond the budget a gateway gets no warm connection");
        // Threads that carry flows add theirs within the same share.
        assert_eq!(s.most_per_pool(1), MAX_WARM_FOR_THREADS);
        assert_eq!(s.most_per_pool(3), 3);
        assert_eq!(s.most_per_pool(6), 1);
        assert_eq!(s.most_per_pool(11), 0);
    }

    #[tokio::test]
    async fn a_second_connection_resumes_the_tls_session() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ca = TestCa::new();
        let gateway = ca.issue("agent-0000000000000000a", "acct-1", "vpc-1");
        let client = ca.issue("agent-0000000000000000b", "acct-2", "vpc-2");
        let acceptor =
            tokio_rustls::TlsAcceptor::from(tls::tunnel_server_config(&gateway, Arc::new(tls::AnyAgent)).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let key = GatewayKey {
            agent_id: gateway.agent_id.clone(),
            address: listener.local_addr().unwrap().to_string(),
            server_name: trellis_proto::agent_server_name(&gateway.agent_id),
            relays: vec![],
        };
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                if let Ok(mut tls) = acceptor.accept(ReadAhead::new(tcp)).await {
                    // Session tickets go out right after the handshake; this byte follows them.
                    tls.write_all(b"x").await.unwrap();
                    held.push(tls);
                }
            }
        });
        let pools = GatewayPools::new(
            tls::tunnel_client_config(&client).unwrap(),
            PoolSettings::default(),
            Arc::default(),
            Shards::inline(),
            TaskTracker::new(),
            CancellationToken::new(),
        );
        let mut first = pools.connect(&key).await.unwrap().tunnel;
        first.read_exact(&mut [0u8; 1]).await.unwrap();
        assert_eq!(first.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Full));
        let second = pools.connect(&key).await.unwrap().tunnel;
        assert_eq!(
            second.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "refills must resume the session (no certificate signing or verification)"
        );
        assert_eq!(
            second.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        server.abort();
    }
}
