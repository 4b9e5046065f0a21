//! Keeps the agent's config current and durable.
//!
//! On start the last config saved in `state_dir/config.json` is served at once,
//! so an agent keeps working while the control plane is down. Then a long-poll
//! (`GET /v1/agents/self/config?after=V&waitSeconds=25&have=H`) fetches each
//! config whose version differs from the one served, saves it atomically, and
//! publishes it on a watch channel that every part of the data plane follows.
//! `have` (the hash of the served content) lets a restarted control plane see
//! that the agent is current. Failures retry with capped exponential backoff.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use trellis_proto::AgentConfig;

use crate::control_client::ControlClient;
use crate::identity::{IdentityError, write_atomic};

const CONFIG_FILE: &str = "config.json";
/// How long the control plane may hold a long-poll open.
pub const LONG_POLL_WAIT: Duration = Duration::from_secs(25);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(CONFIG_FILE)
}

/// The config saved by a previous run, if there is a readable one for `agent_id`.
pub fn load_cached(state_dir: &Path, agent_id: &str) -> Option<AgentConfig> {
    let path = path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not read the cached config; waiting for the control plane");
            return None;
        }
    };
    match serde_json::from_slice::<AgentConfig>(&bytes) {
        Ok(c) if c.agent_id == agent_id => Some(c),
        Ok(c) => {
            tracing::warn!(path = %path.display(), cached_for = %c.agent_id, "the cached config belongs to another agent; ignoring it");
            None
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the cached config is damaged; waiting for the control plane");
            None
        }
    }
}

/// Saves `config` to `state_dir/config.json` atomically.
pub fn save(state_dir: &Path, config: &AgentConfig) -> Result<(), IdentityError> {
    // A config of plain data always serializes.
    let json = serde_json::to_vec(config).expect("config serializes");
    write_atomic(&path(state_dir), &json, false)
}

/// SHA-256 (lower-case hex) of a config's content: its JSON with version 0,
/// the same hash the control plane keeps of each config it compiled.
pub fn content_sha256(config: &AgentConfig) -> String {
    let unversioned = AgentConfig { version: 0, ..config.clone() };
    // A config of plain data always serializes.
    let json = serde_json::to_vec(&unversioned).expect("config serializes");
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &json))
}

/// Deterministic jitter in [0.5, 1.0) of `d`, varied by `seed`, to spread retries of many agents.
fn jittered(d: Duration, seed: u64) -> Duration {
    let frac = 0.5 + ((seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11) as f64 / (1u64 << 53) as f64) / 2.0;
    d.mul_f64(frac)
}

/// Long-polls the control plane until `shutdown`, publishing each newer config on `tx`.
/// A backoff sleep ends early when `control_plane_back` is signalled (the
/// reporter got through again), so a recovered control plane is polled at once.
pub async fn run_poller(
    client: ControlClient,
    state_dir: PathBuf,
    agent_id: String,
    tx: watch::Sender<Arc<AgentConfig>>,
    seed: u64,
    control_plane_back: crate::report::ControlPlaneBack,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut failures: u64 = 0;
    // The served config's hash, computed once per config (a large config takes milliseconds to hash).
    let mut hashed: Option<(u64, String)> = None;
    loop {
        let (after, have) = {
            let current = tx.borrow();
            if current.version != 0 && hashed.as_ref().is_none_or(|(v, _)| *v != current.version) {
                hashed = Some((current.version, content_sha256(&current)));
            }
            (current.version, hashed.as_ref().filter(|(v, _)| *v == current.version).map(|(_, h)| h.clone()))
        };
        let result = tokio::select! {
            r = client.poll_config(after, have.as_deref(), LONG_POLL_WAIT) => r,
            () = shutdown.cancelled() => return,
        };
        let wait = match result {
            Ok(None) => {
                backoff = BACKOFF_MIN;
                failures = 0;
                continue;
            }
            Ok(Some(config)) if config.agent_id != agent_id => {
                tracing::error!(got = %config.agent_id, "the control plane sent a config for another agent; ignoring it");
                BACKOFF_MAX
            }
            Ok(Some(config)) if config.version == after => {
                tracing::warn!(
                    version = config.version,
                    "the control plane sent the version it was told the agent has"
                );
                backoff
            }
            Ok(Some(config)) => {
                backoff = BACKOFF_MIN;
                failures = 0;
                // Serializing and syncing a large config takes milliseconds: off the runtime, whose one
                // worker answers DNS and reports (the config is applied once it is on disk).
                let config = Arc::new(config);
                let saving = {
                    let (dir, config) = (state_dir.clone(), config.clone());
                    tokio::task::spawn_blocking(move || save(&dir, &config))
                };
                match saving.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "could not cache the config on disk; serving it anyway"),
                    Err(e) => tracing::warn!(error = %e, "caching the config on disk failed; serving it anyway"),
                }
                tracing::info!(version = config.version, "applying config");
                tx.send_replace(config);
                continue;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures, "config long-poll failed; serving the last config and retrying");
                }
                if e.is_permanent() { BACKOFF_MAX } else { backoff }
            }
        };
        backoff = (backoff * 2).min(BACKOFF_MAX);
        let sleep = jittered(wait, seed.wrapping_add(failures));
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = control_plane_back.notified() => tracing::debug!("the control plane answers again; polling now"),
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_config_is_served_on_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let config = AgentConfig { version: 7, agent_id: "agent-1".into(), ..Default::default() };
        assert_eq!(load_cached(dir.path(), "agent-1"), None);
        save(dir.path(), &config).unwrap();
        assert_eq!(load_cached(dir.path(), "agent-1"), Some(config));
        assert_eq!(load_cached(dir.path(), "agent-2"), None);
    }

    #[test]
    fn damaged_cache_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), b"{not json").unwrap();
        assert_eq!(load_cached(dir.path(), "agent-1"), None);
    }

    #[test]
    fn jitter_stays_within_half_and_whole() {
        for seed in 0..1000 {
            let d = jittered(Duration::from_secs(10), seed);
            assert!(d >= Duration::from_secs(5) && d < Duration::from_secs(10), "{d:?}");
        }
    }
}
