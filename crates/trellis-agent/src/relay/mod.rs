//! `trellis relay`: where agents meet when a gateway agent accepts no inbound
//! connection (DESIGN §11).
//!
//! A relay enrolls once with a relay join token ([`control`]), follows its
//! `RelayConfig` (which gateway agents it serves, which certificates are
//! revoked) with a long-poll, reports every few seconds, and serves its
//! listener ([`server`]): outbound-only gateway agents attach to it, endpoint
//! agents connect through it, and it copies their end-to-end TLS without
//! seeing plaintext. [`start_relay_server`] runs only the listener, with an
//! identity and a config channel supplied by the caller (tests, embedding).

pub mod attachments;
pub mod control;
pub mod identity;
pub mod metrics;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_proto::RelayConfig;

pub use control::{RelayOptions, run, start};
pub use identity::RelayIdentity;
pub use server::RelaySettings;

use crate::AccessLog;

/// Options of the relay's listener alone.
#[derive(Clone, Debug)]
pub struct RelayServerOptions {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub access_log: AccessLog,
    pub settings: RelaySettings,
}

impl RelayServerOptions {
    /// Loopback on port 0, no metrics listener, no access log: for tests.
    pub fn loopback() -> Self {
        Self {
            // A literal socket address.
            listen: "127.0.0.1:0".parse().expect("loopback address"),
            metrics_listen: None,
            access_log: AccessLog::disabled(),
            settings: RelaySettings::default(),
        }
    }
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("invalid relay option: {0}")]
    InvalidOptions(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Control(#[from] crate::ControlError),
    #[error(transparent)]
    Enroll(#[from] crate::EnrollError),
    #[error("could not listen for {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the relay stopped: {0}")]
    Stopped(String),
}

/// A running relay listener. Call [`RunningRelay::shutdown`] to stop it.
pub struct RunningRelay {
    relay_id: String,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<metrics::RelayMetrics>,
    attachments: Arc<attachments::Attachments>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl RunningRelay {
    pub fn relay_id(&self) -> &str {
        &self.relay_id
    }

    /// Where the relay listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The Prometheus text of the relay's metrics.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    /// Idle attachments of `gateway` now.
    pub fn attachments(&self, gateway: &str) -> usize {
        self.attachments.idle(gateway)
    }

    /// Gateway agents with an idle attachment now, sorted.
    pub fn attached(&self) -> Vec<String> {
        self.attachments.attached()
    }

    /// Relayed tunnel connections open now (each carries any number of client flows).
    pub fn active_flows(&self) -> u64 {
        u64::try_from(self.metrics.active_flows.get()).unwrap_or(0)
    }

    /// Resolves when the relay stops (its listener failed, or it was shut down).
    pub async fn stopped(&self) {
        self.shutdown.cancelled().await;
    }

    /// Closes the listener and every connection (attached or relaying) and waits (at most 10 s).
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tracker.wait()).await.is_err() {
            tracing::warn!("some relay tasks did not stop within 10 s");
        }
    }
}

/// Starts the relay's listener with a caller-supplied identity and config
/// channel. Binds before returning, so the address accepts at once.
pub async fn start_relay_server(
    opts: RelayServerOptions,
    identity: &RelayIdentity,
    config: watch::Receiver<Arc<RelayConfig>>,
) -> Result<RunningRelay, RelayError> {
    let bind = |what: &'static str, addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr).await.map_err(|source| RelayError::Bind { what, addr, source })
    };
    let listener = bind("relayed connections", opts.listen).await?;
    let addr = listener.local_addr().map_err(|source| RelayError::Bind {
        what: "relayed connections",
        addr: opts.listen,
        source,
    })?;
    let metrics_listener = match opts.metrics_listen {
        Some(a) => Some(bind("metrics", a).await?),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    let admission = Arc::new(server::RelayAdmission { config: config.clone() });
    let tls = crate::tls::relay_server_config(&identity.ca, &identity.cert, &identity.key, admission)?;
    let metrics = Arc::new(metrics::RelayMetrics::new());
    opts.access_log.count_drops_in(metrics.access_log_dropped.clone());
    let attachments = Arc::new(attachments::Attachments::new(opts.settings.attachments_per_gateway, metrics.clone()));
    let settings = opts.settings;
    let ctx = Arc::new(server::RelayContext {
        relay_id: identity.relay_id.clone(),
        config: config.clone(),
        metrics: metrics.clone(),
        attachments: attachments.clone(),
        access_log: opts.access_log,
        settings,
        connections: Arc::new(Semaphore::new(settings.connections.max(2))),
        handshakes: Arc::new(Semaphore::new(settings.handshakes.max(1))),
        waiting: Arc::new(Semaphore::new(settings.waiting_connects.max(1))),
        peers: Arc::new(crate::gateway::admission::PeerTable::new(
            settings.flows_per_peer.max(1),
            settings.connects_per_peer.max(1),
        )),
    });
    let tracker = TaskTracker::new();
    let shutdown = CancellationToken::new();
    {
        let (tracker2, shutdown2) = (tracker.clone(), shutdown.clone());
        tracker.spawn(async move {
            server::serve(listener, tls, ctx, tracker2, shutdown2.clone()).await;
            shutdown2.cancel();
        });
    }
    {
        let (mut config, attachments, shutdown) = (config, attachments.clone(), shutdown.clone());
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    r = config.changed() => if r.is_err() { return },
                    () = shutdown.cancelled() => return,
                }
                let current = config.borrow_and_update().clone();
                attachments.prune(|g| current.gateway(g).is_some());
            }
        });
    }
    if let Some(listener) = metrics_listener {
        tracker.spawn(crate::metrics::serve(listener, metrics.clone(), tracker.clone(), shutdown.clone()));
    }
    tracing::info!(%addr, ?metrics_addr, relay_id = %identity.relay_id, "relay started");
    Ok(RunningRelay {
        relay_id: identity.relay_id.clone(),
        addr,
        metrics_addr,
        metrics,
        attachments,
        tracker,
        shutdown,
    })
}
