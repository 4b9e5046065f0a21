//! Shared state of the API handlers: the store, settings, the cache of
//! compiled agent configs (which every write invalidates precisely), and the CA.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::SecureRandom;
use tokio::sync::{Notify, Semaphore};
use trellis_model::{NotificationDelivery, Seed, Timestamp};
use trellis_store::track::{Key, Mode, Tracked, Work};
use trellis_store::{Object, Store, Tx, read_with, write_with};

use crate::agents::report::ReportMemo;
use crate::configs::ConfigCache;
use crate::error::ApiError;
use crate::pki::Ca;
use crate::rate::RateLimit;
use crate::relays::report::RelayMemo;

/// Control-plane settings the handlers need.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Region label used in ARNs and endpoint DNS names (`local` by default).
    pub region: String,
    /// Agents silent for this long become OFFLINE.
    pub offline_after: Duration,
    /// Webhook URLs may name loopback, link-local and private addresses
    /// (`trellis server --allow-private-webhooks`).
    pub allow_private_webhooks: bool,
    /// Shares one account may create per minute, after a burst of twice as many.
    pub shares_per_minute: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            region: "local".to_string(),
            offline_after: Duration::from_secs(60),
            allow_private_webhooks: false,
            shares_per_minute: SHARES_PER_MINUTE,
        }
    }
}

/// State shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub settings: Arc<Settings>,
    /// Compiled agent configs; every write through [`AppState::write`] tells it what changed.
    pub configs: Arc<ConfigCache>,
    /// Compiled relay configs, invalidated by the same writes.
    pub relay_configs: Arc<ConfigCache<trellis_proto::RelayConfig>>,
    /// What each relay's last report said (reports that change nothing write nothing).
    pub relay_reports: Arc<RelayMemo>,
    pub ca: Arc<Ca>,
    /// What each agent's last report changed (reports that change nothing write nothing).
    pub reports: Arc<ReportMemo>,
    /// Wakes the domain verifier when a verification is created.
    pub domain_checks: Arc<Notify>,
    /// Wakes the webhook worker after a write that recorded or changed deliveries.
    pub webhooks: Arc<Notify>,
    /// Shares (and so invitations to other accounts) an account may create.
    pub share_rate: Arc<RateLimit>,
    /// Bounds the store work in flight, so requests wait their turn as tasks
    /// instead of filling the blocking thread pool (SQLite has one writer).
    io: Arc<IoLimits>,
}

struct IoLimits {
    reads: Semaphore,
    writes: Semaphore,
}

/// Shares one account may create per minute by default ([`Settings::shares_per_minute`]),
/// after a burst of twice as many.
pub const SHARES_PER_MINUTE: u32 = 30;

/// Concurrent read transactions (each on a blocking thread).
const MAX_CONCURRENT_READS: usize = 16;

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl AppState {
    pub fn new(store: Arc<dyn Store>, settings: Settings, ca: Arc<Ca>) -> Self {
        let revision = store.revision().unwrap_or(0);
        let shares = settings.shares_per_minute.max(1);
        Self {
            store,
            settings: Arc::new(settings),
            configs: Arc::new(ConfigCache::new(revision)),
            relay_configs: Arc::new(ConfigCache::new(revision)),
            relay_reports: Arc::new(RelayMemo::default()),
            ca,
            reports: Arc::new(ReportMemo::default()),
            domain_checks: Arc::new(Notify::new()),
            webhooks: Arc::new(Notify::new()),
            share_rate: Arc::new(RateLimit::new(shares, shares.saturating_mul(2))),
            io: Arc::new(IoLimits { reads: Semaphore::new(MAX_CONCURRENT_READS), writes: Semaphore::new(1) }),
        }
    }

    pub fn region(&self) -> &str {
        &self.settings.region
    }

    /// Runs `f` in one write transaction on a blocking thread, then tells the
    /// config cache what it changed, so the affected agents' long-polls wake.
    ///
    /// `f` may run more than once (see [`write_with`]): draw ids and read the
    /// clock before calling this, never inside `f`.
    pub async fn write<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnMut(&mut dyn Tx) -> Result<T, ApiError> + Send + 'static,
    {
        let (value, _) = self.write_counted(f).await?;
        Ok(value)
    }

    /// [`AppState::write`], also returning the store work the transaction did.
    pub async fn write_counted<T, F>(&self, mut f: F) -> Result<(T, Work), ApiError>
    where
        T: Send + 'static,
        F: FnMut(&mut dyn Tx) -> Result<T, ApiError> + Send + 'static,
    {
        // The semaphore is never closed.
        let _turn = self.io.writes.acquire().await.map_err(|_| ApiError::internal("store writes closed"))?;
        let store = self.store.clone();
        let (value, revision, keys, work) = tokio::task::spawn_blocking(move || {
            write_with(&*store, |tx| {
                let start = tx.revision()?;
                let mut tracked = Tracked::new(tx, Mode::Writes);
                let value = f(&mut tracked)?;
                let (keys, work) = tracked.finish();
                Ok::<_, ApiError>((value, start.saturating_add(1), keys, work))
            })
        })
        .await
        .map_err(|e| ApiError::internal(format!("write task failed: {e}")))??;
        // `notify::record` writes deliveries inside handlers' transactions: wake the worker.
        if keys.contains(&Key::Kind(<NotificationDelivery as Object>::KIND.to_string())) {
            self.webhooks.notify_one();
        }
        self.relay_configs.invalidate(revision, keys.clone());
        self.configs.invalidate(revision, keys);
        Ok((value, work))
    }

    /// Runs `f` in one read transaction on a blocking thread.
    pub async fn read<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnMut(&mut dyn Tx) -> Result<T, ApiError> + Send + 'static,
    {
        let _turn = self.io.reads.acquire().await.map_err(|_| ApiError::internal("store reads closed"))?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || read_with(&*store, f))
            .await
            .map_err(|e| ApiError::internal(format!("read task failed: {e}")))?
    }
}

/// The current time as the model takes it.
pub fn now() -> Timestamp {
    Timestamp::new(SystemTime::now())
}

/// Random bytes for one new id, from the system CSPRNG.
pub fn seed() -> Result<Seed, ApiError> {
    let mut seed = [0u8; 16];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| ApiError::internal("the system random number generator failed"))?;
    Ok(seed)
}
