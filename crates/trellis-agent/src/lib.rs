//! The Trellis agent (`trellis agent`) as a library: the data plane.
//!
//! An agent enrolls once with a join token ([`enroll`]), then follows its
//! config from the control plane ([`config_cache`]) and serves every role the
//! config gives it: gateway ([`gateway`]: accept tunnels, authorize, dial
//! resources), endpoint ([`endpoint`]: listen on endpoint addresses, tunnel to
//! gateways), DNS for endpoint names ([`dns`]), Prometheus metrics
//! ([`metrics`]), a JSON access log ([`access_log`]) and usage reports
//! ([`report`]). An agent started outbound-only has no tunnel listener: its
//! gateway role is reached through relays ([`gateway::attach`]), and
//! [`relay`] is `trellis relay` itself, the place where such agents and
//! endpoint agents meet ([`relay_wire`]: the relay protocol on a connection).
//!
//! [`start`] runs the whole agent; [`start_data_plane`] runs only the data
//! plane with an identity and a config channel supplied by the caller (tests,
//! embedding).
#![forbid(unsafe_code)]

pub mod access_log;
pub mod config_cache;
pub mod control_client;
pub mod dns;
pub mod endpoint;
pub mod enroll;
mod flow;
pub mod gateway;
pub mod identity;
pub mod limits;
pub mod metrics;
pub mod mux;
pub mod read_ahead;
pub mod relay;
pub mod relay_wire;
pub mod report;
pub mod shards;
mod splice;
#[doc(hidden)]
pub mod testing;
pub mod tls;
pub mod usage;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_proto::AgentConfig;

pub use access_log::AccessLog;
pub use control_client::{ControlClient, ControlError};
pub use endpoint::{PoolSettings, ServedState};
pub use enroll::EnrollError;
pub use gateway::GatewayTimeouts;
pub use identity::AgentIdentity;
pub use limits::Limits;

/// Where the tunnel listener binds at the CLI when `--advertise` is given without `--tunnel-listen`.
pub const DEFAULT_TUNNEL_LISTEN: &str = "0.0.0.0:7443";
/// Data-plane threads when not told: one per CPU the process may use, at
/// most this many (each moves several Gbit/s of encrypted traffic).
pub const MAX_DEFAULT_DATA_PLANE_THREADS: usize = 8;

/// The data-plane threads of an agent not told how many: one per CPU the
/// process may use, at most [`MAX_DEFAULT_DATA_PLANE_THREADS`].
pub fn default_data_plane_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from).min(MAX_DEFAULT_DATA_PLANE_THREADS)
}

/// Default interval between usage reports.
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// Everything `trellis agent` is configured with.
#[derive(Clone)]
pub struct AgentOptions {
    /// `https://` URL of the control plane.
    pub control_plane: String,
    /// Used on first start only. Once `state_dir` holds an identity, the same
    /// token is accepted (a restart with the same command line) and another one
    /// is an error.
    pub join_token: Option<String>,
    /// Where the key, certificates, identity and cached config live.
    pub state_dir: PathBuf,
    /// Tunnel listener (gateway role); none for an agent that only serves endpoints.
    pub tunnel_listen: Option<SocketAddr>,
    /// `host:port` endpoint agents dial; defaults to the bound tunnel address when it is specific.
    pub advertise: Option<String>,
    /// DNS listener (UDP and TCP) for endpoint names; none when unset.
    pub dns_listen: Option<SocketAddr>,
    /// Resolver for other names; defaults to the first nameserver of /etc/resolv.conf.
    pub dns_upstream: Option<SocketAddr>,
    /// Sources the DNS listener answers; `None` = [`dns::default_allowed_sources`] and the address pool.
    pub dns_allow: Option<Vec<ipnet::IpNet>>,
    /// Prometheus `/metrics` listener; none when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// Add a local route for the address pool when its addresses are not local (Linux, root).
    pub manage_routes: bool,
    /// How often usage is reported (also right after every config change).
    pub report_interval: Duration,
    /// No tunnel listener: the gateway role is reached through relays
    /// (`AgentConfig::relays`), to which the agent keeps outbound connections.
    pub outbound_only: bool,
    /// Threads of the data plane, each with a runtime and listeners of its
    /// own (see [`shards`]); 1 runs it on the caller's runtime.
    pub data_plane_threads: usize,
}

/// Knobs of the data plane that rarely need changing; [`start`] uses the defaults.
#[derive(Clone, Debug)]
pub struct AgentTuning {
    /// Where access-log lines go (stdout by default).
    pub access_log: AccessLog,
    /// Budgets of sockets; `None` raises the open-files limit and derives them from it.
    pub limits: Option<Limits>,
    pub gateway_timeouts: GatewayTimeouts,
    pub pool: PoolSettings,
    /// Endpoint side: from sending an open request to its answer.
    pub open_timeout: Duration,
}

impl Default for AgentTuning {
    fn default() -> Self {
        Self {
            access_log: AccessLog::stdout(),
            limits: None,
            gateway_timeouts: GatewayTimeouts::default(),
            pool: PoolSettings::default(),
            open_timeout: Duration::from_secs(15),
        }
    }
}

impl AgentOptions {
    /// Options with the CLI's defaults.
    pub fn new(control_plane: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            control_plane: control_plane.into(),
            join_token: None,
            state_dir: state_dir.into(),
            tunnel_listen: None,
            advertise: None,
            dns_listen: None,
            dns_upstream: None,
            dns_allow: None,
            metrics_listen: None,
            manage_routes: false,
            report_interval: DEFAULT_REPORT_INTERVAL,
            outbound_only: false,
            data_plane_threads: 1,
        }
    }
}

impl std::fmt::Debug for AgentOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentOptions")
            .field("control_plane", &self.control_plane)
            .field("join_token", &self.join_token.as_ref().map(|_| "***"))
            .field("state_dir", &self.state_dir)
            .field("tunnel_listen", &self.tunnel_listen)
            .field("advertise", &self.advertise)
            .field("dns_listen", &self.dns_listen)
            .field("dns_upstream", &self.dns_upstream)
            .field("dns_allow", &self.dns_allow)
            .field("metrics_listen", &self.metrics_listen)
            .field("manage_routes", &self.manage_routes)
            .field("report_interval", &self.report_interval)
            .field("outbound_only", &self.outbound_only)
            .field("data_plane_threads", &self.data_plane_threads)
            .finish()
    }
}

/// Options of the data plane alone (no control plane involved).
#[derive(Clone, Debug)]
pub struct DataPlaneOptions {
    /// Tunnel listener (gateway role); none for an endpoint-only agent.
    pub tunnel_listen: Option<SocketAddr>,
    pub dns_listen: Option<SocketAddr>,
    pub dns_upstream: Option<SocketAddr>,
    /// Sources the DNS listener answers; `None` = [`dns::default_allowed_sources`] and the address pool.
    pub dns_allow: Option<Vec<ipnet::IpNet>>,
    pub metrics_listen: Option<SocketAddr>,
    pub manage_routes: bool,
    pub access_log: AccessLog,
    pub limits: Limits,
    pub gateway_timeouts: GatewayTimeouts,
    pub pool: PoolSettings,
    /// Endpoint side: from sending an open request to its answer.
    pub open_timeout: Duration,
    /// Gateway role without a tunnel listener: reached through the relays of
    /// the config, to which it keeps attached connections.
    pub outbound_only: bool,
    pub attach: gateway::attach::AttachSettings,
    /// Threads of the data plane (see [`shards`]); 1 runs it on the caller's runtime.
    pub data_plane_threads: usize,
}

impl DataPlaneOptions {
    /// Loopback listeners on port 0, no DNS or metrics, no access log, the
    /// budgets of a 1,024 open-files limit: for tests.
    pub fn loopback() -> Self {
        Self {
            // A literal socket address.
            tunnel_listen: Some("127.0.0.1:0".parse().expect("loopback address")),
            dns_listen: None,
            dns_upstream: None,
            dns_allow: None,
            metrics_listen: None,
            manage_routes: false,
            access_log: AccessLog::disabled(),
            limits: Limits::from_open_files(1024),
            gateway_timeouts: GatewayTimeouts::default(),
            pool: PoolSettings::default(),
            open_timeout: Duration::from_secs(15),
            outbound_only: false,
            attach: gateway::attach::AttachSettings::default(),
            data_plane_threads: 1,
        }
    }

    /// [`DataPlaneOptions::loopback`] for an outbound-only gateway agent: no tunnel listener.
    pub fn outbound_only() -> Self {
        Self { tunnel_listen: None, outbound_only: true, ..Self::loopback() }
    }
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// An option is invalid; the message says which and how to fix it.
    #[error("invalid agent option: {0}")]
    InvalidOptions(String),
    /// Enrollment or loading the stored identity failed.
    #[error(transparent)]
    Enroll(#[from] EnrollError),
    /// The identity cannot be turned into a TLS configuration.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The control plane client could not be built.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A core part of the agent stopped unexpectedly.
    #[error("the agent stopped: {0}")]
    Stopped(String),
    /// A listener could not be bound.
    #[error("could not listen for {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running agent (or data plane). Dropping it does not stop it; call [`RunningAgent::shutdown`].
pub struct RunningAgent {
    agent_id: String,
    tunnel_addr: Option<SocketAddr>,
    dns_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    boot_id: String,
    config: watch::Receiver<Arc<AgentConfig>>,
    served: watch::Receiver<ServedState>,
    metrics: Arc<metrics::Metrics>,
    usage: Arc<usage::UsageTable>,
    services: Arc<gateway::services::ServiceRuntime>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    fatal: Arc<std::sync::Mutex<Option<String>>>,
    shards: shards::Shards,
}

impl RunningAgent {
    /// The agent's id.
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// Where the tunnel listener (gateway role) is bound; `None` for an endpoint-only agent.
    pub fn tunnel_addr(&self) -> Option<SocketAddr> {
        self.tunnel_addr
    }

    /// Where the DNS listener is bound (UDP and TCP), if any.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns_addr
    }

    /// Where `/metrics` is served, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// This run's boot id (usage counters are cumulative per boot).
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// The config being served (follows updates).
    pub fn config(&self) -> watch::Receiver<Arc<AgentConfig>> {
        self.config.clone()
    }

    /// What the endpoint role serves: applied config version and listener readiness.
    pub fn served(&self) -> watch::Receiver<ServedState> {
        self.served.clone()
    }

    /// The Prometheus text of this agent's metrics.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    /// The gateway usage counters as they would be reported now.
    pub fn usage(&self) -> Vec<trellis_proto::agent_api::UsageCounters> {
        self.usage.snapshot()
    }

    /// Resolves only if the agent stops on its own, with the reason. The agent
    /// keeps serving through control-plane outages, so in practice this waits
    /// until a core listener fails.
    pub async fn wait(&self) -> Result<(), AgentError> {
        self.shutdown.cancelled().await;
        match self.fatal.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(reason) => Err(AgentError::Stopped(reason)),
            None => Ok(()),
        }
    }

    /// Stops every listener and connection and waits (at most 10 s) for tasks to end.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tracker.wait()).await.is_err() {
            tracing::warn!("some agent tasks did not stop within 10 s");
        }
        self.shards.stop().await;
    }
}

fn random_hex(bytes: usize) -> String {
    use aws_lc_rs::rand::SecureRandom;
    let mut buf = vec![0u8; bytes];
    // The system RNG only fails on platforms without one, where nothing else would work either.
    aws_lc_rs::rand::SystemRandom::new().fill(&mut buf).expect("system random number generator");
    hex::encode(buf)
}

async fn bind_tcp(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr).await.map_err(|source| AgentError::Bind { what, addr, source })
}

/// The tunnel listener: one socket per data-plane thread.
fn bind_tunnels(addr: SocketAddr, threads: usize) -> Result<Vec<std::net::TcpListener>, AgentError> {
    shards::bind_listeners(addr, threads, false).map_err(|source| AgentError::Bind { what: "tunnels", addr, source })
}

/// Starts the data plane with a caller-supplied identity and config channel.
/// Binds every listener before returning, so the returned addresses accept at once.
pub async fn start_data_plane(
    opts: DataPlaneOptions,
    identity: &AgentIdentity,
    config: watch::Receiver<Arc<AgentConfig>>,
) -> Result<RunningAgent, AgentError> {
    let tunnel = match opts.tunnel_listen {
        Some(addr) => bind_tunnels(addr, opts.data_plane_threads)?,
        None => Vec::new(),
    };
    start_with_listener(opts, identity, config, tunnel, TaskTracker::new(), CancellationToken::new()).await
}

async fn start_with_listener(
    opts: DataPlaneOptions,
    identity: &AgentIdentity,
    config: watch::Receiver<Arc<AgentConfig>>,
    tunnel: Vec<std::net::TcpListener>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) -> Result<RunningAgent, AgentError> {
    let shards = shards::Shards::start(opts.data_plane_threads).map_err(|e| {
        AgentError::Stopped(format!("cannot start {} data-plane threads: {e}", opts.data_plane_threads))
    })?;
    let metrics = Arc::new(metrics::Metrics::new());
    opts.access_log.count_drops_in(metrics.access_log_dropped.clone());
    let admission = Arc::new(gateway::admission::ConfigAdmission { config: config.clone(), metrics: metrics.clone() });
    let server_tls = tls::tunnel_server_config(identity, admission)?;
    let client_tls = tls::tunnel_client_config(identity)?;
    let tunnel_addr = match (tunnel.first(), opts.tunnel_listen) {
        (Some(listener), Some(addr)) => {
            Some(listener.local_addr().map_err(|source| AgentError::Bind { what: "tunnels", addr, source })?)
        }
        _ => None,
    };
    let dns = match opts.dns_listen {
        Some(addr) => Some(dns::bind(addr).await.map_err(|source| AgentError::Bind { what: "DNS", addr, source })?),
        None => None,
    };
    let metrics_listener = match opts.metrics_listen {
        Some(addr) => Some(bind_tcp("metrics", addr).await?),
        None => None,
    };
    let dns_addr = dns.as_ref().and_then(|(udp, _)| udp.local_addr().ok());
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());

    let usage = Arc::new(usage::UsageTable::default());
    let limits = opts.limits;
    let fatal = Arc::new(std::sync::Mutex::new(None));
    let services = Arc::new(gateway::services::ServiceRuntime::default());
    if !tunnel.is_empty() || opts.outbound_only {
        tracker.spawn(gateway::services::run_health_checks(
            config.clone(),
            services.clone(),
            metrics.clone(),
            opts.access_log.clone(),
            tracker.clone(),
            shutdown.clone(),
        ));
        let gateway_ctx = Arc::new(gateway::GatewayContext {
            config: config.clone(),
            metrics: metrics.clone(),
            usage: usage.clone(),
            access_log: opts.access_log.clone(),
            timeouts: opts.gateway_timeouts,
            connections: Arc::new(Semaphore::new(limits.tunnel_connections.max(1))),
            handshakes: Arc::new(Semaphore::new(limits.tunnel_handshakes.max(1))),
            peers: Arc::new(gateway::admission::PeerTable::new(
                limits.tunnel_connections_per_peer,
                limits.pending_tunnels_per_peer,
            )),
            services: services.clone(),
            consumers: Arc::new(gateway::consumers::ConsumerLimiter::default()),
            flows: tracker.clone(),
            shards: shards.clone(),
        });
        if opts.outbound_only {
            tracker.spawn(gateway::attach::run(
                config.clone(),
                tokio_rustls::TlsConnector::from(tls::relay_client_config(&client_tls)),
                tokio_rustls::TlsAcceptor::from(server_tls.clone()),
                gateway_ctx.clone(),
                opts.attach,
                tracker.clone(),
                shutdown.clone(),
            ));
        }
        // Each data-plane thread accepts on a socket of its own and serves what it accepts.
        for (index, listener) in tunnel.into_iter().enumerate() {
            let (fatal, shutdown, tracker2) = (fatal.clone(), shutdown.clone(), tracker.clone());
            let (server_tls, gateway_ctx) = (server_tls.clone(), gateway_ctx.clone());
            shards.spawn(index, &tracker, async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => {
                        gateway::listener::serve(listener, server_tls, gateway_ctx, tracker2, shutdown.clone()).await
                    }
                    Err(e) => tracing::error!(error = %e, "cannot register the tunnel listener"),
                }
                if !shutdown.is_cancelled() {
                    *fatal.lock().unwrap_or_else(|e| e.into_inner()) = Some("the tunnel listener stopped".to_string());
                    shutdown.cancel();
                }
            });
        }
    } else {
        tracker.spawn(gateway::warn_without_listener(config.clone(), shutdown.clone()));
    }

    let pool_settings = PoolSettings { max_warm_total: limits.warm_tunnels, ..opts.pool };
    let pools = Arc::new(endpoint::GatewayPools::new(
        client_tls,
        pool_settings,
        metrics.clone(),
        shards.clone(),
        tracker.clone(),
        shutdown.clone(),
    ));
    let endpoint_ctx = Arc::new(endpoint::EndpointContext {
        config: config.clone(),
        pools,
        metrics: metrics.clone(),
        access_log: opts.access_log.clone(),
        open_timeout: opts.open_timeout,
    });
    let (served_tx, served_rx) = watch::channel(ServedState::default());
    // Every listener is a socket per data-plane thread.
    let listener_budget = (limits.endpoint_listeners / shards.len()).max(16);
    tracker.spawn(endpoint::listeners::run(
        endpoint_ctx,
        listener_budget,
        endpoint::routes::RouteManager::new(opts.manage_routes),
        served_tx,
        tracker.clone(),
        shutdown.clone(),
    ));

    if let Some((udp, tcp)) = dns {
        let upstream = opts.dns_upstream.or_else(dns::system_upstream);
        if upstream.is_none() {
            tracing::warn!("no DNS upstream (none given, none in /etc/resolv.conf): only endpoint names will resolve");
        }
        let ctx = Arc::new(dns::DnsContext::new(config.clone(), upstream, opts.dns_allow.clone(), metrics.clone()));
        tracker.spawn(dns::serve(udp, tcp, ctx, tracker.clone(), shutdown.clone()));
    }
    if let Some(listener) = metrics_listener {
        tracker.spawn(metrics::serve(listener, metrics.clone(), tracker.clone(), shutdown.clone()));
    }
    tracing::info!(?tunnel_addr, ?dns_addr, ?metrics_addr, agent_id = %identity.agent_id, data_plane_threads = shards.len(), endpoint_listeners = listener_budget, "data plane started");
    Ok(RunningAgent {
        agent_id: identity.agent_id.clone(),
        tunnel_addr,
        dns_addr,
        metrics_addr,
        boot_id: random_hex(16),
        config,
        served: served_rx,
        metrics,
        usage,
        services,
        tracker,
        shutdown,
        fatal,
        shards,
    })
}

/// Starts the whole agent: enroll (or load the identity), serve the cached
/// config at once, follow the control plane, serve the data plane, report.
/// Returns once every listener is bound.
pub async fn start(opts: AgentOptions) -> Result<RunningAgent, AgentError> {
    start_tuned(opts, AgentTuning::default()).await
}

/// [`start`] with non-default tuning.
pub async fn start_tuned(opts: AgentOptions, tuning: AgentTuning) -> Result<RunningAgent, AgentError> {
    let control_url = control_client::normalize_url(&opts.control_plane)?;
    if opts.report_interval.is_zero() {
        return Err(AgentError::InvalidOptions("the report interval must be greater than zero".into()));
    }
    if opts.state_dir.as_os_str().is_empty() {
        return Err(AgentError::InvalidOptions("--state-dir must name a directory".into()));
    }
    let limits = tuning.limits.unwrap_or_else(|| Limits::from_open_files(limits::raise_open_files_limit()));
    tracing::info!("{limits}");
    let (tunnel, advertise) = match opts.tunnel_listen {
        Some(_) if opts.outbound_only => {
            return Err(AgentError::InvalidOptions(
                "--outbound-only starts no tunnel listener; drop --tunnel-listen (or --outbound-only)".into(),
            ));
        }
        Some(addr) => {
            let tunnel = bind_tunnels(addr, opts.data_plane_threads)?;
            let bound = tunnel[0].local_addr().map_err(|source| AgentError::Bind { what: "tunnels", addr, source })?;
            let advertise =
                opts.advertise.clone().or_else(|| (!bound.ip().is_unspecified()).then(|| bound.to_string()));
            if advertise.is_none() {
                tracing::warn!(%bound, "the tunnel listener is not advertised, so no endpoint agent will use it; give --advertise HOST:PORT");
            }
            (tunnel, advertise)
        }
        None if opts.outbound_only => {
            if opts.advertise.is_some() {
                return Err(AgentError::InvalidOptions(
                    "--outbound-only starts no tunnel listener, so there is no address to advertise; drop --advertise (or --outbound-only)".into(),
                ));
            }
            (Vec::new(), None)
        }
        None => {
            if opts.advertise.is_some() {
                return Err(AgentError::InvalidOptions(
                    "an advertised tunnel address needs a tunnel listener; give --tunnel-listen ADDR".into(),
                ));
            }
            (Vec::new(), None)
        }
    };
    let identity = enroll::load_or_enroll(
        &control_url,
        opts.join_token.as_deref(),
        &opts.state_dir,
        advertise.as_deref(),
        opts.outbound_only,
    )
    .await?;
    let client = ControlClient::new(&control_url, &identity.ca, Some(&identity))?;

    let cached = config_cache::load_cached(&opts.state_dir, &identity.agent_id);
    if let Some(c) = &cached {
        tracing::info!(version = c.version, "serving the cached config until the control plane answers");
    }
    let (config_tx, config_rx) = watch::channel(Arc::new(cached.unwrap_or_default()));

    let dp_opts = DataPlaneOptions {
        tunnel_listen: opts.tunnel_listen,
        dns_listen: opts.dns_listen,
        dns_upstream: opts.dns_upstream,
        dns_allow: opts.dns_allow.clone(),
        metrics_listen: opts.metrics_listen,
        manage_routes: opts.manage_routes,
        access_log: tuning.access_log,
        limits,
        gateway_timeouts: tuning.gateway_timeouts,
        pool: tuning.pool,
        open_timeout: tuning.open_timeout,
        outbound_only: opts.outbound_only,
        attach: gateway::attach::AttachSettings::default(),
        data_plane_threads: opts.data_plane_threads,
    };
    let tracker = TaskTracker::new();
    let shutdown = CancellationToken::new();
    let agent = start_with_listener(dp_opts, &identity, config_rx, tunnel, tracker.clone(), shutdown.clone()).await?;

    let seed = u64::from_str_radix(&agent.boot_id[..16], 16).unwrap_or_default();
    let control_plane_back = report::ControlPlaneBack::default();
    tracker.spawn(config_cache::run_poller(
        client.clone(),
        opts.state_dir.clone(),
        identity.agent_id.clone(),
        config_tx,
        seed,
        control_plane_back.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(report::run_reporter(
        client,
        opts.report_interval,
        agent.boot_id.clone(),
        advertise,
        opts.outbound_only,
        agent.served(),
        agent.usage.clone(),
        agent.services.clone(),
        control_plane_back,
        shutdown.clone(),
    ));
    Ok(agent)
}

/// Runs the agent until `shutdown` is cancelled (or the agent fails), then stops it.
pub async fn run(opts: AgentOptions, shutdown: CancellationToken) -> Result<(), AgentError> {
    let agent = start(opts).await?;
    let result = tokio::select! {
        () = shutdown.cancelled() => Ok(()),
        r = agent.wait() => r,
    };
    tracing::info!("stopping the agent");
    agent.shutdown().await;
    result
}
