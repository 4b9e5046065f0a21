//! `trellis server`: wires the store, the CA, the admin key and the API into
//! one HTTPS listener.
//!
//! Options are validated first, then the port is bound, and only then is
//! anything created: a bad option or a port in use fails with one clear error
//! and leaves no data directory behind. The data directory (0700, see
//! [`crate::data_dir`]) holds `trellis.db` (0600, with its `-wal`/`-shm`),
//! `ca.pem`, `ca.key` (0600) and `admin.key` (0600), which is written before
//! the admin key's hash is stored. [`reset_admin_key`] replaces a lost admin key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trellis_model::{Agent, AgentStatus, Timestamp};
use trellis_store::sqlite::SqliteStore;
use trellis_store::{Filter, StoreError, TxExt};

use crate::agents::records::{AgentRuntime, RevokedCert};
use crate::auth::AdminKeyError;
use crate::conn_limits::{ConnLimits, ListenerLimits, ListenerStats};
use crate::data_dir::DataDirError;
use crate::domain_verification::VerificationSettings;
use crate::notify::WebhookSettings;
use crate::pki::{Ca, PkiError};
use crate::relays::records::RevokedRelayCert;
use crate::state::{AppState, Settings, now};
use crate::tls::TlsError;

/// File name of the SQLite database in the data directory.
pub const DB_FILE: &str = "trellis.db";
/// File name of the admin key written when the server creates it.
pub const ADMIN_KEY_FILE: &str = "admin.key";
/// An agent not heard from for this long is OFFLINE.
pub const DEFAULT_OFFLINE_AFTER: Duration = Duration::from_secs(60);

/// How to run the control plane.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Address of the HTTPS listener (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Directory of the database, the CA and the admin key; created if missing.
    pub data_dir: PathBuf,
    /// Region label of ARNs and endpoint DNS names.
    pub region: String,
    /// Extra DNS names or IPs agents and clients use to reach this server;
    /// `localhost`, `127.0.0.1`, `::1` and the listen IP are always included.
    pub tls_names: Vec<String>,
    /// Agents silent for this long become OFFLINE.
    pub offline_after: Duration,
    /// Shares one account may create per minute (after a burst of twice as many).
    pub shares_per_minute: u32,
    /// Time, size and connection limits of the HTTPS listener.
    pub limits: ListenerLimits,
    /// The DNS resolver, retry intervals and deadline of domain verification.
    pub domain_verification: VerificationSettings,
    /// Where connection-notification webhooks may go, their retries and deadline.
    pub webhooks: WebhookSettings,
}

impl ServerOptions {
    /// Options with the defaults for everything but where to listen and store.
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen,
            data_dir: data_dir.into(),
            region: Settings::default().region,
            tls_names: Vec::new(),
            offline_after: DEFAULT_OFFLINE_AFTER,
            shares_per_minute: Settings::default().shares_per_minute,
            limits: ListenerLimits::default(),
            domain_verification: VerificationSettings::default(),
            webhooks: WebhookSettings::default(),
        }
    }

    /// Every name of the server certificate, without duplicates.
    fn certificate_names(&self) -> Vec<String> {
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"].iter().map(|s| s.to_string()).collect();
        if !self.listen.ip().is_unspecified() {
            names.push(self.listen.ip().to_string());
        }
        names.extend(self.tls_names.iter().map(|n| n.trim().to_string()));
        let mut seen = std::collections::HashSet::new();
        names.retain(|n| seen.insert(n.to_ascii_lowercase()));
        names
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// An option is invalid; the message says which and what to write.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The data directory or a file in it cannot be created or secured.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The data directory holds no store (for [`reset_admin_key`]).
    #[error(
        "{} holds no Trellis store ({DB_FILE}); give the --data-dir of an existing control plane",
        path.display()
    )]
    NoStore { path: PathBuf },
    /// The database cannot be opened or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The CA cannot be loaded or created, or a certificate cannot be issued.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The TLS configuration is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The admin key could not be created or replaced.
    #[error("cannot create the admin key {}: {source}", path.display())]
    AdminKey { path: PathBuf, source: AdminKeyError },
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source} (is another process using it? use another --listen address)")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// A started control plane.
pub struct RunningServer {
    local_addr: SocketAddr,
    data_dir: PathBuf,
    ca_pem: String,
    ca_sha256: String,
    /// The admin key, when this start created it (also written to `DIR/admin.key`).
    pub admin_key_created: Option<String>,
    state: AppState,
    conns: Arc<ConnLimits>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("local_addr", &self.local_addr)
            .field("ca_sha256", &self.ca_sha256)
            .field("admin_key_created", &self.admin_key_created.as_ref().map(|_| "***"))
            .finish()
    }
}

impl RunningServer {
    /// The bound address (with the real port when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `https://<local addr>`, with `127.0.0.1` / `[::1]` for an unspecified listen address.
    pub fn url(&self) -> String {
        let mut addr = self.local_addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
        }
        format!("https://{addr}")
    }

    /// The data directory, as an absolute path.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The admin key's file, `DATA_DIR/admin.key` (absolute).
    pub fn admin_key_file(&self) -> PathBuf {
        self.data_dir.join(ADMIN_KEY_FILE)
    }

    /// The CA certificate's file, `DATA_DIR/ca.pem` (absolute).
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join(crate::pki::CA_CERT_FILE)
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Lower-case hex SHA-256 of the CA certificate DER.
    pub fn ca_sha256(&self) -> &str {
        &self.ca_sha256
    }

    /// The handlers' shared state (for embedding, e.g. `trellis dev`).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// What the listener holds now and what it refused or cut off so far.
    pub fn listener_stats(&self) -> ListenerStats {
        self.conns.stats()
    }

    /// Stops accepting connections and starts draining; see [`RunningServer::wait`].
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the server stopped (after [`RunningServer::shutdown`] or a fatal error).
    pub async fn wait(self) {
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "a server task failed");
            }
        }
    }
}

/// Starts the control plane: validates `opts`, binds the listener, then
/// creates or opens the data directory, the store and the CA, creates the
/// admin key on first start, and serves the API over TLS.
pub async fn start(opts: ServerOptions) -> Result<RunningServer, ServerError> {
    trellis_model::validate_region(&opts.region).map_err(|e| ServerError::InvalidOption(format!("--region: {e}")))?;
    if opts.offline_after < Duration::from_secs(5) {
        return Err(ServerError::InvalidOption("the offline timeout must be at least 5 seconds".into()));
    }
    if opts.shares_per_minute == 0 {
        return Err(ServerError::InvalidOption("--shares-per-minute must be at least 1".into()));
    }
    opts.limits.validate().map_err(ServerError::InvalidOption)?;
    opts.domain_verification.validate().map_err(ServerError::InvalidOption)?;
    opts.webhooks.validate().map_err(ServerError::InvalidOption)?;
    let names = opts.certificate_names();
    for name in &names {
        crate::pki::check_server_name(name)
            .map_err(|_| ServerError::InvalidOption(format!("--tls-name {name:?} is not a DNS name or IP address")))?;
    }
    let dir = crate::data_dir::absolute(&opts.data_dir)?;

    // Bind before creating anything: a port in use must not leave a data
    // directory whose admin key nobody was shown.
    let listener =
        TcpListener::bind(opts.listen).await.map_err(|source| ServerError::Bind { addr: opts.listen, source })?;
    let local_addr = listener.local_addr().map_err(|source| ServerError::Bind { addr: opts.listen, source })?;

    // Opening SQLite and generating keys block; keep them off the async workers.
    let data_dir = dir.clone();
    let loaded = tokio::task::spawn_blocking(move || -> Result<_, ServerError> {
        crate::data_dir::prepare(&dir)?;
        let store = open_store(&dir)?;
        let ca = Ca::load_or_create(&dir)?;
        let (cert_pem, key_pem) = ca.issue_server_cert(&names)?;
        let tls = crate::tls::server_config(ca.cert_der(), &cert_pem, &key_pem)?;
        let key_file = dir.join(ADMIN_KEY_FILE);
        let admin_key = crate::auth::bootstrap_admin_file(&store, &key_file)
            .map_err(|source| ServerError::AdminKey { path: key_file, source })?;
        Ok((store, ca, tls, admin_key))
    })
    .await
    .map_err(|e| ServerError::InvalidOption(format!("start-up task failed: {e}")))?;
    let (store, ca, tls, admin_key_created) = loaded?;

    let ca_pem = ca.cert_pem().to_string();
    let ca_sha256 = ca.cert_sha256_hex().to_string();
    let state = AppState::new(
        Arc::new(store),
        Settings {
            region: opts.region.clone(),
            offline_after: opts.offline_after,
            allow_private_webhooks: opts.webhooks.allow_private,
            shares_per_minute: opts.shares_per_minute,
        },
        Arc::new(ca),
    );
    let shutdown = CancellationToken::new();
    let app = crate::api_router(state.clone());
    let conns = Arc::new(ConnLimits::new(opts.limits.clone()));
    let serve = tokio::spawn(crate::tls::serve(listener, app, tls, conns.clone(), shutdown.clone()));
    let offline = tokio::spawn(mark_offline_agents(state.clone(), opts.offline_after, shutdown.clone()));
    let verifier = tokio::spawn(crate::domain_verification::run(
        state.clone(),
        opts.domain_verification.clone(),
        shutdown.clone(),
    ));
    let webhooks = tokio::spawn(crate::notify::run(state.clone(), opts.webhooks.clone(), shutdown.clone()));
    tracing::info!(%local_addr, region = %opts.region, ca_sha256 = %ca_sha256, "control plane listening");
    let tasks = vec![serve, offline, verifier, webhooks];
    Ok(RunningServer { local_addr, data_dir, ca_pem, ca_sha256, admin_key_created, state, conns, shutdown, tasks })
}

/// Opens (or creates) `DIR/trellis.db` with owner-only files.
fn open_store(dir: &Path) -> Result<SqliteStore, ServerError> {
    let db = dir.join(DB_FILE);
    crate::data_dir::secure_database(&db)?;
    Ok(SqliteStore::open(&db)?)
}

/// Replaces the admin key of the control plane in `data_dir` with a new one,
/// written to `DATA_DIR/admin.key` (0600); returns that file's absolute path.
/// Works with the server stopped (and also while it runs: the old admin key
/// stops working at once).
pub fn reset_admin_key(data_dir: &Path) -> Result<PathBuf, ServerError> {
    let dir = crate::data_dir::absolute(data_dir)?;
    if !dir.join(DB_FILE).is_file() {
        return Err(ServerError::NoStore { path: dir });
    }
    crate::data_dir::prepare(&dir)?;
    let store = open_store(&dir)?;
    let key_file = dir.join(ADMIN_KEY_FILE);
    crate::auth::reset_admin_key(&store, &key_file)
        .map_err(|source| ServerError::AdminKey { path: key_file.clone(), source })?;
    Ok(key_file)
}

/// Marks ONLINE agents and relays not seen for `offline_after` OFFLINE, drops revoked
/// certificates that expired, and trims the store's log, until `shutdown`.
async fn mark_offline_agents(state: AppState, offline_after: Duration, shutdown: CancellationToken) {
    let period = (offline_after / 4).max(Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = now();
        if let Err(e) = state.write(move |tx| Ok(mark_offline(tx, now, offline_after)?)).await {
            tracing::warn!(error = %e, "marking silent agents offline failed");
        }
        if let Err(e) = state.write(move |tx| Ok(crate::relays::mark_offline(tx, now, offline_after)?)).await {
            tracing::warn!(error = %e, "marking silent relays offline failed");
        }
        if let Err(e) = state.write(move |tx| Ok(drop_expired_revocations(tx, now)?)).await {
            tracing::warn!(error = %e, "dropping expired certificate revocations failed");
        }
        let store = state.store.clone();
        match tokio::task::spawn_blocking(move || store.maintain()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "store maintenance failed"),
            Err(e) => tracing::warn!(error = %e, "store maintenance task failed"),
        }
    }
}

/// One sweep of [`mark_offline_agents`]; returns how many agents went OFFLINE.
/// Liveness lives in each agent's runtime record; only the status flip
/// touches the agent (which configs are compiled from).
pub fn mark_offline(
    tx: &mut dyn trellis_store::Tx,
    now: Timestamp,
    offline_after: Duration,
) -> Result<usize, StoreError> {
    let mut changed = 0;
    for mut agent in tx.list_obj::<Agent>(&Filter::default())? {
        if agent.status != AgentStatus::Online {
            continue;
        }
        let runtime = tx.get_obj::<AgentRuntime>(agent.id.as_str())?;
        let seen = runtime.and_then(|r| r.last_seen_at).or(agent.last_seen_at);
        if seen.is_none_or(|seen| seen.plus(offline_after) < now) {
            agent.status = AgentStatus::Offline;
            tx.update_obj(&agent)?;
            changed += 1;
        }
    }
    Ok(changed)
}

/// Forgets revocations of certificates that expired (the CA's signature no
/// longer passes anyway): deleted agents' and deleted relays'.
pub fn drop_expired_revocations(tx: &mut dyn trellis_store::Tx, now: Timestamp) -> Result<usize, StoreError> {
    let mut dropped = 0;
    for cert in tx.list_obj::<RevokedCert>(&Filter::default())? {
        if cert.not_after <= now {
            tx.delete_obj::<RevokedCert>(&cert.id)?;
            dropped += 1;
        }
    }
    for cert in tx.list_obj::<RevokedRelayCert>(&Filter::default())? {
        if cert.not_after <= now {
            tx.delete_obj::<RevokedRelayCert>(&cert.id)?;
            dropped += 1;
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_region_is_one_clear_error_before_anything_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut opts = ServerOptions::new("127.0.0.1:0".parse().unwrap(), &data);
        opts.region = "Not A Region".into();
        let err = start(opts).await.unwrap_err();
        assert!(matches!(err, ServerError::InvalidOption(_)), "{err}");
        assert!(err.to_string().contains("--region"), "{err}");
        assert!(!data.exists());
    }

    #[tokio::test]
    async fn a_share_rate_of_zero_is_rejected_before_anything_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut opts = ServerOptions::new("127.0.0.1:0".parse().unwrap(), &data);
        opts.shares_per_minute = 0;
        let err = start(opts).await.unwrap_err();
        assert!(err.to_string().contains("--shares-per-minute"), "{err}");
        assert!(!data.exists());
    }

    #[tokio::test]
    async fn bad_tls_name_is_rejected_before_anything_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut opts = ServerOptions::new("127.0.0.1:0".parse().unwrap(), &data);
        opts.tls_names = vec!["not a name".into()];
        let err = start(opts).await.unwrap_err();
        assert!(err.to_string().contains("--tls-name"), "{err}");
        assert!(!data.exists());
    }

    fn mode(path: &Path) -> u32 {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions()) & 0o777
    }

    /// The hash of the admin key in `dir`'s store matches `key`.
    fn stored_admin_is(dir: &Path, key: &str) -> bool {
        let store = SqliteStore::open(&dir.join(DB_FILE)).unwrap();
        let stored: Option<trellis_model::ApiKey> =
            trellis_store::read_with(&store, |tx| tx.get_obj(&crate::auth::hash_key(key))).unwrap();
        stored.is_some_and(|k| k.account_id.is_none())
    }

    #[tokio::test]
    async fn a_port_in_use_creates_nothing_and_the_next_start_creates_the_admin_key() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = start(ServerOptions::new(taken.local_addr().unwrap(), &data)).await.unwrap_err();
        assert!(matches!(err, ServerError::Bind { .. }), "{err}");
        assert!(!data.exists(), "nothing is created before the port is bound");

        let server = start(ServerOptions::new("127.0.0.1:0".parse().unwrap(), &data)).await.unwrap();
        let key = server.admin_key_created.clone().expect("the first successful start creates the admin key");
        assert_eq!(std::fs::read_to_string(server.admin_key_file()).unwrap().trim(), key);
        server.shutdown();
        server.wait().await;
    }

    #[tokio::test]
    async fn a_failed_admin_key_write_stores_no_key_and_the_next_start_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // Something in admin.key's place that cannot be replaced by a file.
        std::fs::create_dir_all(data.join(ADMIN_KEY_FILE)).unwrap();
        let err = start(ServerOptions::new("127.0.0.1:0".parse().unwrap(), &data)).await.unwrap_err();
        assert!(matches!(err, ServerError::AdminKey { .. }), "{err}");
        assert!(err.to_string().contains("admin.key"), "{err}");
        let store = SqliteStore::open(&data.join(DB_FILE)).unwrap();
        let keys: Vec<trellis_model::ApiKey> =
            trellis_store::read_with(&store, |tx| tx.list_obj(&Filter::default())).unwrap();
        assert!(keys.is_empty(), "no stored admin key that nobody knows");
        drop(store);

        std::fs::remove_dir(data.join(ADMIN_KEY_FILE)).unwrap();
        let server = start(ServerOptions::new("127.0.0.1:0".parse().unwrap(), &data)).await.unwrap();
        let key = server.admin_key_created.clone().expect("created on the next start");
        assert!(stored_admin_is(&data, &key));
        server.shutdown();
        server.wait().await;
    }

    #[tokio::test]
    async fn the_data_directory_and_the_database_are_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // An existing directory left open to everyone is tightened.
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let server = start(ServerOptions::new("127.0.0.1:0".parse().unwrap(), &data)).await.unwrap();
        assert_eq!(server.data_dir(), data, "absolute already");
        assert_eq!(mode(&data), 0o700);
        for file in [DB_FILE, "trellis.db-wal", "trellis.db-shm", "ca.key", ADMIN_KEY_FILE] {
            assert_eq!(mode(&data.join(file)), 0o600, "{file}");
        }
        server.shutdown();
        server.wait().await;
    }

    #[tokio::test]
    async fn reset_admin_key_replaces_a_lost_key() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let err = reset_admin_key(&data).unwrap_err();
        assert!(matches!(err, ServerError::NoStore { .. }), "{err}");
        assert!(!data.exists(), "a reset of nothing creates nothing");

        let server = start(ServerOptions::new("127.0.0.1:0".parse().unwrap(), &data)).await.unwrap();
        let old = server.admin_key_created.clone().unwrap();
        server.shutdown();
        server.wait().await;
        std::fs::remove_file(data.join(ADMIN_KEY_FILE)).unwrap();

        let file = reset_admin_key(&data).unwrap();
        assert_eq!(file, data.join(ADMIN_KEY_FILE));
        assert_eq!(mode(&file), 0o600);
        let new = std::fs::read_to_string(&file).unwrap().trim().to_string();
        assert!(stored_admin_is(&data, &new), "the new key is the admin's");
        assert!(!stored_admin_is(&data, &old), "the old one is not");
        let again = start(ServerOptions::new("127.0.0.1:0".parse().unwrap(), &data)).await.unwrap();
        assert_eq!(again.admin_key_created, None, "a reset key is not replaced at start");
        again.shutdown();
        again.wait().await;
    }

    #[tokio::test]
    async fn starts_serves_health_and_keeps_its_identity_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let server = start(ServerOptions::new("127.0.0.1:0".parse().unwrap(), dir.path())).await.unwrap();
        let key = server.admin_key_created.clone().expect("first start creates the admin key");
        let on_disk = std::fs::read_to_string(dir.path().join(ADMIN_KEY_FILE)).unwrap();
        assert_eq!(on_disk.trim(), key);
        let mode = std::fs::metadata(dir.path().join(ADMIN_KEY_FILE)).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(), server.ca_pem());

        // A client that trusts only this CA reaches /healthz by the loopback IP.
        let mut roots = rustls::RootCertStore::empty();
        let der = {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::from_pem_slice(server.ca_pem().as_bytes()).unwrap()
        };
        roots.add(der).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(server.local_addr()).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        tls.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"), "{answer}");

        let ca = server.ca_sha256().to_string();
        server.shutdown();
        tokio::time::timeout(Duration::from_secs(10), server.wait()).await.expect("the server stops");

        let again = start(ServerOptions::new("127.0.0.1:0".parse().unwrap(), dir.path())).await.unwrap();
        assert_eq!(again.admin_key_created, None, "the admin key is created once");
        assert_eq!(again.ca_sha256(), ca, "the CA survives a restart");
        again.shutdown();
        again.wait().await;
    }

    /// A minimal HTTPS client: one request per connection, trusting only `ca_pem`.
    async fn https(
        addr: SocketAddr,
        ca_pem: &str,
        identity: Option<(&str, &str)>,
        request: (&str, &str, Option<&str>, Option<serde_json::Value>),
    ) -> (u16, String) {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (method, path, key, body) = request;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        );
        if let Some(key) = key {
            head.push_str(&format!("authorization: Bearer {key}\r\n"));
        }
        tls.write_all(format!("{head}\r\n{body}").as_bytes()).await.unwrap();
        let mut answer = String::new();
        tls.read_to_string(&mut answer).await.unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, body.to_string())
    }

    fn json(body: &str) -> serde_json::Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    #[tokio::test]
    async fn an_agent_enrolls_and_long_polls_over_mutual_tls() {
        use serde_json::json;
        let dir = tempfile::tempdir().unwrap();
        let server = start(ServerOptions::new("127.0.0.1:0".parse().unwrap(), dir.path())).await.unwrap();
        let (addr, ca) = (server.local_addr(), server.ca_pem().to_string());
        let admin = server.admin_key_created.clone().unwrap();
        let call = |key: Option<String>, method: &'static str, path: String, body: Option<serde_json::Value>| {
            let ca = ca.clone();
            async move { https(addr, &ca, None, (method, &path, key.as_deref(), body)).await }
        };

        let (status, acct) = call(Some(admin), "POST", "/v1/accounts".into(), Some(json!({"name": "acme"}))).await;
        assert_eq!(status, 201, "{acct}");
        let key = json(&acct)["apiKey"].as_str().unwrap().to_string();
        let (_, vpc) = call(Some(key.clone()), "POST", "/v1/vpcs".into(), Some(json!({"name": "prod"}))).await;
        let vpc_id = json(&vpc)["id"].as_str().unwrap().to_string();
        let subnet_body = json!({"vpcId": vpc_id, "zone": "z1", "cidrBlock": "10.0.9.0/24"});
        let (status, subnet) = call(Some(key.clone()), "POST", "/v1/subnets".into(), Some(subnet_body)).await;
        assert_eq!(status, 201, "{subnet}");
        let subnet_id = json(&subnet)["id"].as_str().unwrap().to_string();
        let (status, token) =
            call(Some(key.clone()), "POST", "/v1/agent-tokens".into(), Some(json!({"subnetId": subnet_id}))).await;
        assert_eq!(status, 201, "{token}");
        let token = json(&token)["token"].as_str().unwrap().to_string();
        assert!(token.ends_with(server.ca_sha256()), "the token pins this server's CA");

        let agent_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::default().serialize_request(&agent_key).unwrap().pem().unwrap();
        let enroll = json!({"joinToken": token, "csrPem": csr, "advertise": "127.0.0.1:7443", "hostname": "node"});
        let (status, enrolled) = call(None, "POST", "/v1/agents/enroll".into(), Some(enroll)).await;
        assert_eq!(status, 200, "{enrolled}");
        let enrolled: trellis_proto::agent_api::EnrollResponse = serde_json::from_str(&enrolled).unwrap();
        let key_pem = agent_key.serialize_pem();
        let identity = Some((enrolled.certificate_pem.as_str(), key_pem.as_str()));

        let path = "/v1/agents/self/config?after=0&waitSeconds=0";
        let (status, config) = https(addr, &ca, identity, ("GET", path, None, None)).await;
        assert_eq!(status, 200, "{config}");
        let config: trellis_proto::AgentConfig = serde_json::from_str(&config).unwrap();
        assert_eq!(config.agent_id, enrolled.agent_id);
        assert_eq!(config.subnet_id, subnet_id);
        let (status, _) = https(addr, &ca, None, ("GET", path, None, None)).await;
        assert_eq!(status, 401, "no certificate, no config");

        // A poll waiting for a newer config is answered (304) when the server shuts down.
        let agent_id = trellis_model::AgentId::parse(&enrolled.agent_id).unwrap();
        let waiting = server.state().configs.waiters(&agent_id);
        let poll = {
            let (ca, cert, key_pem) = (ca.clone(), enrolled.certificate_pem.clone(), key_pem.clone());
            let path = format!("/v1/agents/self/config?after={}&waitSeconds=60", config.version);
            tokio::spawn(async move { https(addr, &ca, Some((&cert, &key_pem)), ("GET", &path, None, None)).await })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while server.state().configs.waiters(&agent_id) == waiting {
            assert!(tokio::time::Instant::now() < deadline, "the poll never started waiting");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server.shutdown();
        let (status, _) =
            tokio::time::timeout(Duration::from_secs(3), poll).await.expect("answered at shutdown").unwrap();
        assert_eq!(status, 304);
        tokio::time::timeout(Duration::from_secs(3), server.wait()).await.expect("no drain wait for long-polls");
    }

    #[test]
    fn silent_agents_go_offline() {
        let store = SqliteStore::open_in_memory().unwrap();
        let t0 = Timestamp::from_unix_seconds(1_700_000_000);
        let fresh = crate::agents::tests::agent_fixture(1, t0);
        let fresh_runtime = AgentRuntime {
            id: fresh.id.clone(),
            account_id: fresh.account_id.clone(),
            boot_id: None,
            last_seen_at: Some(t0.plus(Duration::from_secs(50))),
            config_version: 0,
        };
        let stale = crate::agents::tests::agent_fixture(2, t0);
        trellis_store::write_with(&store, |tx| {
            tx.insert_obj(&fresh)?;
            tx.insert_obj(&fresh_runtime)?;
            tx.insert_obj(&stale)
        })
        .unwrap();
        let now = t0.plus(Duration::from_secs(61));
        let changed = trellis_store::write_with(&store, |tx| mark_offline(tx, now, DEFAULT_OFFLINE_AFTER)).unwrap();
        assert_eq!(changed, 1);
        let agents: Vec<Agent> = trellis_store::read_with(&store, |tx| tx.list_obj(&Filter::default())).unwrap();
        let status: Vec<_> = agents.iter().map(|a| (a.id.clone(), a.status)).collect();
        assert!(status.contains(&(stale.id.clone(), AgentStatus::Offline)));
        assert!(status.contains(&(fresh.id.clone(), AgentStatus::Online)));
        let again = trellis_store::write_with(&store, |tx| mark_offline(tx, now, DEFAULT_OFFLINE_AFTER)).unwrap();
        assert_eq!(again, 0, "a sweep with nothing to do writes nothing");
    }
}
