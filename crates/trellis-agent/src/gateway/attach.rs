//! Outbound-only gateway agents (`trellis agent --outbound-only`): no tunnel
//! listener; instead a few idle connections *attached* to each relay of the
//! config (`AgentConfig::relays`), on which endpoint agents' flows arrive.
//!
//! Per relay, workers each keep one attachment (spread over the data-plane
//! threads, where the flows they take are then served): connect (outer TLS verifying
//! the relay's server name), `Attach`, then wait. When the relay says a flow
//! arrives, the worker accepts, leaves the outer TLS and hands the raw stream
//! to the same code that serves a direct tunnel connection
//! (`listener::serve_stream`: this agent is the TLS server, authorizes the
//! open request from its own config, dials, splices), then attaches again at
//! once. A relay that dies or restarts costs a reconnect with a short
//! backoff, never a manual step. Under load (a flow took the last idle
//! attachment) a worker is added, up to `max_per_relay`; an added worker that
//! stays idle for `shrink_after` leaves again.
//!
//! This agent never sends an open request and never opens anything toward a
//! consumer: it only answers flows the consumer side opened.
//!
//! A relay whose certificate the config revokes (`revoked_relay_certs`: the
//! relay was deleted) is refused right after the TLS handshake, and once a
//! config revokes the certificate a relay showed, its attachments and the
//! tunnel connections served through it are dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_proto::relay::{Hello, RelayStatus, decode_flow, encode_accept};
use trellis_proto::{AgentConfig, RelayTarget};

use super::GatewayContext;
use crate::relay_wire::{DialRelayError, RelaySession, WireError, dial_relay_unless_revoked};

/// How many attachments a gateway keeps and how it reconnects.
#[derive(Clone, Copy, Debug)]
pub struct AttachSettings {
    /// Idle attachments kept per relay.
    pub idle_per_relay: usize,
    /// Attachments per relay under load, at most.
    pub max_per_relay: usize,
    /// An added worker whose attachment stays idle this long leaves.
    pub shrink_after: Duration,
    /// First wait after a failed attach; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// TCP connect, TLS handshake and the relay's answer.
    pub dial_timeout: Duration,
}

impl Default for AttachSettings {
    fn default() -> Self {
        Self {
            idle_per_relay: 4,
            max_per_relay: 64,
            shrink_after: Duration::from_secs(60),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            dial_timeout: Duration::from_secs(5),
        }
    }
}

/// What every worker of every relay shares.
struct Shared {
    connector: TlsConnector,
    acceptor: TlsAcceptor,
    ctx: Arc<GatewayContext>,
    settings: AttachSettings,
    tracker: TaskTracker,
    /// Workers started so far: the next goes to data-plane thread `next % threads`.
    next: AtomicUsize,
}

/// One relay's workers.
struct Relay {
    target: RelayTarget,
    idle: AtomicUsize,
    workers: AtomicUsize,
    /// Cancels its workers, attachments and the flows served through it.
    cancel: CancellationToken,
    /// SHA-256 of the certificate the relay showed, once one attachment succeeded.
    cert_sha256: Mutex<Option<String>>,
}

/// Keeps attachments to exactly the relays of the current config until `shutdown`.
pub async fn run(
    mut config: watch::Receiver<Arc<AgentConfig>>,
    connector: TlsConnector,
    acceptor: TlsAcceptor,
    ctx: Arc<GatewayContext>,
    settings: AttachSettings,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let shared = Arc::new(Shared { connector, acceptor, ctx, settings, tracker, next: AtomicUsize::new(0) });
    let mut relays: HashMap<RelayTarget, Arc<Relay>> = HashMap::new();
    let mut warned_empty = false;
    loop {
        let wanted = config.borrow_and_update().relays.clone();
        if wanted.is_empty() && !warned_empty {
            tracing::warn!(
                "this agent is outbound-only but its config names no relay yet, so no endpoint agent can reach it; the control plane lists relays once one is enrolled"
            );
        }
        warned_empty = wanted.is_empty();
        let current = config.borrow().clone();
        relays.retain(|target, relay| {
            let revoked = relay.cert_sha256.lock().unwrap_or_else(|e| e.into_inner()).as_deref().is_some_and(|c| current.is_relay_revoked(c));
            if revoked {
                tracing::warn!(relay = %target.relay_id, "the control plane revoked this relay's certificate (the relay was deleted); dropping its attachments and the flows through it");
                relay.cancel.cancel();
            } else if !wanted.contains(target) {
                tracing::info!(relay = %target.relay_id, "relay left the config; detaching");
                relay.cancel.cancel();
            }
            !revoked && wanted.contains(target)
        });
        for target in wanted {
            if relays.contains_key(&target) {
                continue;
            }
            tracing::info!(relay = %target.relay_id, address = %target.address, "attaching to relay");
            let relay = Arc::new(Relay {
                target: target.clone(),
                idle: AtomicUsize::new(0),
                workers: AtomicUsize::new(0),
                cancel: shutdown.child_token(),
                cert_sha256: Mutex::new(None),
            });
            for _ in 0..settings.idle_per_relay.max(1) {
                spawn_worker(&shared, &relay, false);
            }
            relays.insert(target, relay);
        }
        tokio::select! {
            r = config.changed() => if r.is_err() { return },
            () = shutdown.cancelled() => return,
        }
    }
}

fn spawn_worker(shared: &Arc<Shared>, relay: &Arc<Relay>, extra: bool) {
    relay.workers.fetch_add(1, Ordering::Relaxed);
    let (shared2, relay2) = (shared.clone(), relay.clone());
    let thread = shared.next.fetch_add(1, Ordering::Relaxed);
    shared.ctx.shards.spawn(thread, &shared.tracker, async move {
        worker(&shared2, &relay2, extra).await;
        relay2.workers.fetch_sub(1, Ordering::Relaxed);
    });
}

/// Keeps one attachment to `relay`, serving each flow that takes it, until cancelled
/// (or, for an `extra` worker, until its attachment idles for `shrink_after`).
async fn worker(shared: &Arc<Shared>, relay: &Arc<Relay>, extra: bool) {
    let settings = shared.settings;
    let mut backoff = settings.backoff_min;
    let mut logged_refusal = false;
    loop {
        let revoked = |cert: &str| shared.ctx.config.borrow().is_relay_revoked(cert);
        let dialed = tokio::select! {
            r = dial_relay_unless_revoked(&shared.connector, &relay.target, &Hello::Attach, settings.dial_timeout, revoked) => r,
            () = relay.cancel.cancelled() => return,
        };
        let mut session = match dialed {
            Ok(session) => {
                backoff = settings.backoff_min;
                logged_refusal = false;
                let cert = session.relay_cert_sha256();
                *relay.cert_sha256.lock().unwrap_or_else(|e| e.into_inner()) = cert.clone();
                // Stored before this check: a config revoking it later finds it in `run`.
                if cert.as_deref().is_some_and(revoked) {
                    drop(session);
                    tokio::select! {
                        () = tokio::time::sleep(settings.backoff_max) => {}
                        () = relay.cancel.cancelled() => return,
                    }
                    continue;
                }
                session
            }
            Err(e) => {
                match &e {
                    DialRelayError::Refused { answer, .. } if answer.status == RelayStatus::NotServed => {
                        if !logged_refusal {
                            tracing::warn!(error = %e, "the relay does not (yet) serve this gateway agent; retrying");
                            logged_refusal = true;
                        }
                    }
                    DialRelayError::Revoked { .. } => {
                        if !logged_refusal {
                            tracing::warn!(error = %e, "not attaching; retrying while the config lists the relay");
                            logged_refusal = true;
                        }
                    }
                    _ => tracing::debug!(error = %e, "could not attach to relay; retrying"),
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = relay.cancel.cancelled() => return,
                }
                backoff = (backoff * 2).min(settings.backoff_max);
                continue;
            }
        };
        relay.idle.fetch_add(1, Ordering::Relaxed);
        let shrink = async {
            if extra {
                tokio::time::sleep(settings.shrink_after).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let flow = tokio::select! {
            r = session.receive(decode_flow) => Some(r),
            () = shrink => None,
            () = relay.cancel.cancelled() => {
                relay.idle.fetch_sub(1, Ordering::Relaxed);
                return;
            }
        };
        let idle_left = relay.idle.fetch_sub(1, Ordering::Relaxed) - 1;
        let from = match flow {
            None => return,
            Some(Ok(from)) => from,
            Some(Err(WireError::Closed | WireError::Io(_))) => {
                // The relay went away (stopped, restarted, or the path broke): reattach soon.
                tracing::debug!(relay = %relay.target.relay_id, "relay closed an attachment; reattaching");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = relay.cancel.cancelled() => return,
                }
                backoff = (backoff * 2).min(settings.backoff_max);
                continue;
            }
            Some(Err(e)) => {
                // Backed off as a closed attachment is: a relay that keeps breaking the
                // protocol must not turn this worker into a tight reconnect loop.
                tracing::warn!(relay = %relay.target.relay_id, error = %e, "the relay broke the relay protocol; reattaching");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = relay.cancel.cancelled() => return,
                }
                backoff = (backoff * 2).min(settings.backoff_max);
                continue;
            }
        };
        if idle_left == 0 && relay.workers.load(Ordering::Relaxed) < settings.max_per_relay {
            // Every attachment is busy: add one so the next flow finds one waiting.
            spawn_worker(shared, relay, true);
        }
        accept_flow(shared, relay, session, from).await;
    }
}

/// Accepts a flow that arrived on an attachment and serves it as a tunnel connection.
async fn accept_flow(shared: &Shared, relay: &Relay, mut session: RelaySession, from: String) {
    let ctx = &shared.ctx;
    let (Ok(connection), Ok(handshake)) =
        (ctx.connections.clone().try_acquire_owned(), ctx.handshakes.clone().try_acquire_owned())
    else {
        ctx.metrics.count_tunnel_refused("connection_budget");
        return;
    };
    let mut accept = Vec::new();
    encode_accept(&mut accept);
    if let Err(e) = session.send(&accept).await {
        tracing::debug!(relay = %relay.target.relay_id, error = %e, "relay closed before the flow was accepted");
        return;
    }
    let stream = match session.leave() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(relay = %relay.target.relay_id, error = %e, "cannot start a relayed flow");
            return;
        }
    };
    tracing::debug!(relay = %relay.target.relay_id, from = %from, "relayed flow arrived");
    let peer: SocketAddr = stream.get_ref().peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let (acceptor, ctx, cancel) = (shared.acceptor.clone(), ctx.clone(), relay.cancel.child_token());
    shared.tracker.spawn(async move {
        super::listener::serve_stream(stream, peer, acceptor, handshake, ctx, cancel).await;
        drop(connection);
    });
}
