//! The relay and the control plane: enrollment with a relay join token
//! (once; the state directory keeps the key and certificate), the
//! `RelayConfig` long-poll (cached on disk, so a restarted relay serves its
//! last config while the control plane is down), and a report every few
//! seconds. Same security order as an agent's enrollment (`crate::enroll`):
//! the CA is pinned by the token's hash before the secret is sent, and only
//! a CSR leaves the host.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use trellis_proto::RelayConfig;
use trellis_proto::agent_api::{RelayEnrollRequest, RelayEnrollResponse, RelayReport};
use trellis_proto::join_token::JoinToken;

use super::identity::{RelayEnrollment, RelayIdentity};
use super::{RelayError, RelayServerOptions, RelaySettings, RunningRelay, start_relay_server};
use crate::control_client::{ControlClient, fetch_pinned_ca, normalize_url};
use crate::enroll::{EnrollError, hostname, key_and_csr};
use crate::identity::write_atomic;
use crate::{AccessLog, DEFAULT_REPORT_INTERVAL};

/// The relay's routes on the control plane (DESIGN §11), in one place.
pub mod routes {
    pub const ENROLL: &str = "/v1/relays/enroll";
    pub const CONFIG: &str = "/v1/relays/self/config";
    pub const REPORT: &str = "/v1/relays/self/report";
}

const CONFIG_FILE: &str = "relay-config.json";
const LONG_POLL_WAIT: Duration = Duration::from_secs(25);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Everything `trellis relay` is configured with.
#[derive(Clone)]
pub struct RelayOptions {
    /// `https://` URL of the control plane.
    pub control_plane: String,
    /// Used on first start only; later starts load the identity from `state_dir`.
    pub join_token: Option<String>,
    pub state_dir: PathBuf,
    pub listen: std::net::SocketAddr,
    /// `host:port` agents dial; told to the control plane at enrollment and in every report.
    pub advertise: String,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub access_log: AccessLog,
    pub report_interval: Duration,
}

impl std::fmt::Debug for RelayOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayOptions")
            .field("control_plane", &self.control_plane)
            .field("join_token", &self.join_token.as_ref().map(|_| "***"))
            .field("state_dir", &self.state_dir)
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("metrics_listen", &self.metrics_listen)
            .field("report_interval", &self.report_interval)
            .finish()
    }
}

impl RelayOptions {
    pub fn new(
        control_plane: impl Into<String>,
        state_dir: impl Into<PathBuf>,
        listen: std::net::SocketAddr,
        advertise: impl Into<String>,
    ) -> Self {
        Self {
            control_plane: control_plane.into(),
            join_token: None,
            state_dir: state_dir.into(),
            listen,
            advertise: advertise.into(),
            metrics_listen: None,
            access_log: AccessLog::stdout(),
            report_interval: DEFAULT_REPORT_INTERVAL,
        }
    }
}

/// Loads the relay identity from `state_dir`, or enrolls with `join_token` when there is none.
pub async fn load_or_enroll(
    control_plane: &str,
    join_token: Option<&str>,
    state_dir: &Path,
    advertise: &str,
) -> Result<RelayIdentity, EnrollError> {
    if RelayIdentity::exists(state_dir) {
        let (identity, enrollment) = RelayIdentity::load(state_dir)?;
        if let Some(token) = join_token {
            let token: JoinToken = token.parse()?;
            if enrollment.join_token_id.as_deref().is_some_and(|id| id != token.token_id) {
                return Err(EnrollError::StateHoldsAnotherAgent(format!(
                    "{} already holds relay {}, enrolled with join token {}; the join token {} given now is a different enrollment. Give each relay its own --state-dir, or restart {} without --join-token",
                    state_dir.display(),
                    identity.relay_id,
                    enrollment.join_token_id.as_deref().unwrap_or("?"),
                    token.token_id,
                    identity.relay_id
                )));
            }
        }
        return Ok(identity);
    }
    let token = join_token.ok_or_else(|| EnrollError::NoRelayIdentity(state_dir.display().to_string()))?;
    let parsed: JoinToken = token.parse()?;
    let ca = fetch_pinned_ca(control_plane, &parsed.ca_sha256).await?;
    let host = hostname();
    let (key, csr_pem) = key_and_csr(&host)?;
    let client = ControlClient::new(control_plane, &ca, None)?;
    let resp: RelayEnrollResponse = client
        .post_json(
            routes::ENROLL,
            "the relay enrollment",
            &RelayEnrollRequest {
                join_token: parsed.to_string(),
                csr_pem,
                advertise: advertise.to_string(),
                hostname: host,
            },
            Duration::from_secs(30),
        )
        .await?;
    let cert = CertificateDer::from_pem_slice(resp.certificate_pem.as_bytes())
        .map_err(|e| EnrollError::BadAnswer(format!("certificatePem: {e}")))?;
    let identity = RelayIdentity { relay_id: resp.relay_id, zone: resp.zone, cert, key, ca };
    // Building the server config checks that the certificate matches the key.
    crate::tls::relay_server_config(&identity.ca, &identity.cert, &identity.key, Arc::new(crate::tls::AnyAgent))
        .map_err(|e| EnrollError::BadAnswer(e.to_string()))?;
    identity.store(
        state_dir,
        &RelayEnrollment { control_plane: normalize_url(control_plane)?, join_token_id: Some(parsed.token_id) },
    )?;
    tracing::info!(relay_id = %identity.relay_id, zone = %identity.zone, "relay enrolled");
    Ok(identity)
}

fn load_cached(state_dir: &Path, relay_id: &str) -> Option<RelayConfig> {
    let bytes = std::fs::read(state_dir.join(CONFIG_FILE)).ok()?;
    serde_json::from_slice::<RelayConfig>(&bytes).ok().filter(|c| c.relay_id == relay_id)
}

/// Long-polls the relay's config until `shutdown`, publishing each new one on `tx`.
async fn run_poller(
    client: ControlClient,
    state_dir: PathBuf,
    relay_id: String,
    tx: watch::Sender<Arc<RelayConfig>>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let after = tx.borrow().version;
        let result = tokio::select! {
            r = client.poll_json::<RelayConfig>(routes::CONFIG, after, None, LONG_POLL_WAIT) => r,
            () = shutdown.cancelled() => return,
        };
        let wait = match result {
            Ok(None) => {
                backoff = BACKOFF_MIN;
                continue;
            }
            Ok(Some(config)) if config.relay_id != relay_id => {
                tracing::error!(got = %config.relay_id, "the control plane sent a config for another relay; ignoring it");
                BACKOFF_MAX
            }
            Ok(Some(config)) if config.version == after => backoff,
            Ok(Some(config)) => {
                backoff = BACKOFF_MIN;
                // A config of plain data always serializes.
                let json = serde_json::to_vec(&config).expect("relay config serializes");
                if let Err(e) = write_atomic(&state_dir.join(CONFIG_FILE), &json, false) {
                    tracing::warn!(error = %e, "could not cache the relay config on disk; serving it anyway");
                }
                tracing::info!(version = config.version, gateways = config.gateways.len(), "applying relay config");
                tx.send_replace(Arc::new(config));
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "relay config long-poll failed; serving the last config and retrying");
                if e.is_permanent() { BACKOFF_MAX } else { backoff }
            }
        };
        backoff = (backoff * 2).min(BACKOFF_MAX);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_reporter(
    client: ControlClient,
    interval: Duration,
    boot_id: String,
    advertise: String,
    config: watch::Receiver<Arc<RelayConfig>>,
    relay: Arc<RunningRelayView>,
    shutdown: CancellationToken,
) {
    loop {
        let report = RelayReport {
            config_version: config.borrow().version,
            boot_id: boot_id.clone(),
            advertise: Some(advertise.clone()),
            attached: relay.attachments.attached(),
            active_flows: u64::try_from(relay.metrics.active_flows.get()).unwrap_or(0),
        };
        let sent = tokio::select! {
            r = client.post(routes::REPORT, "the relay report", &report) => r,
            () = shutdown.cancelled() => return,
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "relay report failed; retrying at the next interval");
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// What the reporter reads of a running relay.
struct RunningRelayView {
    attachments: Arc<super::attachments::Attachments>,
    metrics: Arc<super::metrics::RelayMetrics>,
}

/// Starts the whole relay: enroll (or load the identity), serve the cached
/// config at once, follow the control plane, serve the listener, report.
pub async fn start(opts: RelayOptions) -> Result<RunningRelay, RelayError> {
    let control_url = normalize_url(&opts.control_plane)?;
    if opts.advertise.trim().is_empty() || !opts.advertise.contains(':') {
        return Err(RelayError::InvalidOptions(format!(
            "--advertise {:?} must be HOST:PORT, the address agents dial to reach this relay",
            opts.advertise
        )));
    }
    if opts.report_interval.is_zero() {
        return Err(RelayError::InvalidOptions("the report interval must be greater than zero".into()));
    }
    let open_files = crate::limits::raise_open_files_limit();
    let identity = load_or_enroll(&control_url, opts.join_token.as_deref(), &opts.state_dir, &opts.advertise).await?;
    let client = ControlClient::with_client_cert(&control_url, &identity.ca, Some((&identity.cert, &identity.key)))?;
    let cached = load_cached(&opts.state_dir, &identity.relay_id);
    if let Some(c) = &cached {
        tracing::info!(version = c.version, "serving the cached relay config until the control plane answers");
    }
    let initial = cached.unwrap_or_else(|| RelayConfig {
        relay_id: identity.relay_id.clone(),
        zone: identity.zone.clone(),
        ..RelayConfig::default()
    });
    let (config_tx, config_rx) = watch::channel(Arc::new(initial));
    let server_opts = RelayServerOptions {
        listen: opts.listen,
        metrics_listen: opts.metrics_listen,
        access_log: opts.access_log.clone(),
        settings: RelaySettings::from_open_files(open_files),
    };
    let relay = start_relay_server(server_opts, &identity, config_rx.clone()).await?;
    let shutdown = relay.shutdown.clone();
    relay.tracker.spawn(run_poller(
        client.clone(),
        opts.state_dir.clone(),
        identity.relay_id.clone(),
        config_tx,
        shutdown.clone(),
    ));
    let view = Arc::new(RunningRelayView { attachments: relay.attachments.clone(), metrics: relay.metrics.clone() });
    relay.tracker.spawn(run_reporter(
        client,
        opts.report_interval,
        crate::random_hex(16),
        opts.advertise.clone(),
        config_rx,
        view,
        shutdown,
    ));
    Ok(relay)
}

/// Runs the relay until `shutdown` is cancelled (or its listener fails), then stops it.
pub async fn run(opts: RelayOptions, shutdown: CancellationToken) -> Result<(), RelayError> {
    let relay = start(opts).await?;
    let result = tokio::select! {
        () = shutdown.cancelled() => Ok(()),
        () = relay.stopped() => Err(RelayError::Stopped("the relay listener stopped".into())),
    };
    tracing::info!("stopping the relay");
    relay.shutdown().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stored_relay_identity_is_reused_and_another_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::testing::TestCa::new();
        let id = ca.issue_relay("relay-0000000000000001", "z1");
        id.store(
            dir.path(),
            &RelayEnrollment { control_plane: "https://cp".into(), join_token_id: Some("jt-0000000000000001".into()) },
        )
        .unwrap();
        let loaded = load_or_enroll("https://cp", None, dir.path(), "relay:7444").await.unwrap();
        assert_eq!(loaded.relay_id, id.relay_id);
        let other = JoinToken {
            token_id: "jt-0000000000000002".into(),
            secret: "5".repeat(64),
            ca_sha256: crate::tls::cert_sha256(&ca.cert()),
        }
        .to_string();
        let err = load_or_enroll("https://cp", Some(&other), dir.path(), "relay:7444").await.unwrap_err();
        assert!(err.to_string().contains("jt-0000000000000002"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let err = load_or_enroll("https://cp", None, empty.path(), "relay:7444").await.unwrap_err();
        assert!(err.to_string().contains("relay-token create"), "{err}");
    }
}
