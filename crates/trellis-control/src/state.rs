//! Shared state of the API handlers: the store, settings, the change
//! notifier that wakes agent config long-polls, and the CA.

use std::sync::Arc;
use std::time::SystemTime;

use ring::rand::SecureRandom;
use tokio::sync::watch;
use trellis_model::{Seed, Timestamp};
use trellis_store::{Store, Tx, read_with, write_with};

use crate::error::ApiError;
use crate::pki::Ca;

/// Control-plane settings the handlers need.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Region label used in ARNs and endpoint DNS names (`local` by default).
    pub region: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self { region: "local".to_string() }
    }
}

/// State shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub settings: Arc<Settings>,
    /// Holds the store revision of the last successful write through the API;
    /// bumped after every write so agent config long-polls wake up.
    pub changes: Arc<watch::Sender<u64>>,
    pub ca: Arc<Ca>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl AppState {
    pub fn new(store: Arc<dyn Store>, settings: Settings, ca: Arc<Ca>) -> Self {
        let revision = store.revision().unwrap_or(0);
        let (tx, _rx) = watch::channel(revision);
        Self { store, settings: Arc::new(settings), changes: Arc::new(tx), ca }
    }

    pub fn region(&self) -> &str {
        &self.settings.region
    }

    /// Runs `f` in one write transaction on a blocking thread; on success,
    /// publishes the new store revision on [`AppState::changes`].
    ///
    /// `f` may run more than once (see [`write_with`]): draw ids and read the
    /// clock before calling this, never inside `f`.
    pub async fn write<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnMut(&mut dyn Tx) -> Result<T, ApiError> + Send + 'static,
    {
        let store = self.store.clone();
        let out = tokio::task::spawn_blocking(move || {
            let value = write_with(&*store, f)?;
            let revision = store.revision().map_err(ApiError::from)?;
            Ok::<_, ApiError>((value, revision))
        })
        .await
        .map_err(|e| ApiError::internal(format!("write task failed: {e}")))?;
        let (value, revision) = out?;
        self.notify(revision);
        Ok(value)
    }

    /// Like [`AppState::write`], but wakes config long-polls only when `f`
    /// returns `(_, true)`: for writes that usually change nothing an agent's
    /// config depends on (agent reports, liveness sweeps), so that N agents
    /// reporting do not make N long-polls recompile N times.
    pub async fn write_then_notify_if<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnMut(&mut dyn Tx) -> Result<(T, bool), ApiError> + Send + 'static,
    {
        let store = self.store.clone();
        let out = tokio::task::spawn_blocking(move || {
            let (value, relevant) = write_with(&*store, f)?;
            let revision = if relevant { Some(store.revision().map_err(ApiError::from)?) } else { None };
            Ok::<_, ApiError>((value, revision))
        })
        .await
        .map_err(|e| ApiError::internal(format!("write task failed: {e}")))?;
        let (value, revision) = out?;
        if let Some(revision) = revision {
            self.notify(revision);
        }
        Ok(value)
    }

    /// Runs `f` in one read transaction on a blocking thread.
    pub async fn read<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnMut(&mut dyn Tx) -> Result<T, ApiError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || read_with(&*store, f))
            .await
            .map_err(|e| ApiError::internal(format!("read task failed: {e}")))?
    }

    /// Wakes every waiter on [`AppState::changes`] with `revision` (never moves backwards).
    pub fn notify(&self, revision: u64) {
        self.changes.send_if_modified(|current| {
            let newer = revision > *current;
            if newer {
                *current = revision;
            }
            newer
        });
    }
}

/// The current time as the model takes it.
pub fn now() -> Timestamp {
    Timestamp::new(SystemTime::now())
}

/// Random bytes for one new id, from the system CSPRNG.
pub fn seed() -> Result<Seed, ApiError> {
    let mut seed = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| ApiError::internal("the system random number generator failed"))?;
    Ok(seed)
}
