//! Compiled agent configs, kept until a write could change them.
//!
//! Each agent's config is compiled once and kept with its *read set*: the
//! store keys ([`Key`]) the compilation read. Every committed write reports
//! its *write set* ([`ConfigCache::invalidate`]); only the agents whose read
//! set shares a key with it are marked stale and woken. So a write costs work
//! in proportion to the agents it affects, an idle control plane compiles
//! nothing, and a long-poll that wakes without a change sends nothing.
//!
//! Compilation is lazy (when the agent asks) and single-flight per agent: a
//! long-poll that gives up does not abandon or repeat the work, the next one
//! picks up its result.
//!
//! Versions: a config's version is the store revision it was first compiled
//! at with this content; recompiling to equal content keeps the version. The
//! long-poll sends a config whenever its version differs from the agent's
//! (`after`), so versions need only differ, never grow, and nothing an agent
//! sends is ever used to compute one. An agent that still holds this content
//! from before a control-plane restart proves it with the content's hash and
//! keeps its version ([`ConfigCache::adopt`]), so a restart resends nothing.
//!
//! The same cache serves relays' configs ([`trellis_proto::RelayConfig`]):
//! [`ConfigKind`] says how to compile one kind and where its cache lives.
//!
//! This module must never write to the store.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::Serialize;
use tokio::sync::watch;
use trellis_model::{Agent, AgentId};
use trellis_proto::AgentConfig;
use trellis_store::track::{Key, Mode, Tracked, Work};
use trellis_store::{Filter, Object, StoreError, Tx, TxExt};

use crate::compile::{KeptLists, compile_with};
use crate::error::ApiError;
use crate::lists::{Lists, Plan};
use crate::pki::sha256_hex;
use crate::state::AppState;

/// How many recent write sets are kept to check compilations that raced a write.
const LOG_LEN: usize = 4096;

/// A kind of config the cache serves: what it is compiled from and for whom.
pub trait ConfigKind: Clone + Serialize + Send + Sync + 'static {
    /// Who fetches it (an agent, a relay).
    type Id: AsRef<str> + Clone + Send + Sync + 'static;
    /// The 401 message for a fetcher that was deleted.
    const DELETED: &'static str;
    fn version(&self) -> u64;
    fn set_version(&mut self, version: u64);
    /// Compiles the config of `id` through a read-recording transaction, with
    /// its read set (taking long lists from `lists` where it has any).
    fn compile_tracked(
        tx: &mut dyn Tx,
        id: &Self::Id,
        region: &str,
        lists: Option<KeptLists<'_>>,
    ) -> Result<(Self, HashSet<Key>, Work), ApiError>;
    /// The cache of this kind in the shared state.
    fn cache(state: &AppState) -> &ConfigCache<Self>;
}

const AGENT_DELETED: &str = "this agent was deleted; enroll again with a new join token";

impl ConfigKind for AgentConfig {
    type Id = AgentId;
    const DELETED: &'static str = AGENT_DELETED;
    fn version(&self) -> u64 {
        self.version
    }
    fn set_version(&mut self, version: u64) {
        self.version = version;
    }
    fn compile_tracked(
        tx: &mut dyn Tx,
        id: &AgentId,
        region: &str,
        lists: Option<KeptLists<'_>>,
    ) -> Result<(Self, HashSet<Key>, Work), ApiError> {
        compile_tracked(tx, id, region, lists)
    }
    fn cache(state: &AppState) -> &ConfigCache<Self> {
        &state.configs
    }
}

/// One agent's (or relay's) compiled config.
#[derive(Debug)]
pub struct Compiled<C = AgentConfig> {
    /// The config with its version set.
    pub config: Arc<C>,
    /// The config as sent: JSON of `config`.
    pub json: Arc<[u8]>,
    /// `json` compressed with gzip, for agents that accept it (large configs
    /// shrink to about a third: most of them is ids).
    pub gzip: Arc<[u8]>,
    /// Lower-case hex SHA-256 of the JSON of the config with version 0 (its content).
    pub content_sha256: String,
    /// The store revision the compilation read.
    pub revision: u64,
    /// Store operations and records the compilation cost.
    pub work: Work,
}

impl<C: ConfigKind> Compiled<C> {
    pub fn version(&self) -> u64 {
        self.config.version()
    }

    fn with_version(&self, version: u64) -> Result<Compiled<C>, ApiError> {
        let mut config = (*self.config).clone();
        config.set_version(version);
        let json = encode(&config)?;
        Ok(Compiled {
            config: Arc::new(config),
            gzip: gzip(&json)?,
            json,
            content_sha256: self.content_sha256.clone(),
            revision: self.revision,
            work: self.work,
        })
    }
}

fn encode<C: Serialize>(config: &C) -> Result<Arc<[u8]>, ApiError> {
    serde_json::to_vec(config).map(Arc::from).map_err(|e| ApiError::internal(format!("encoding a config: {e}")))
}

fn gzip(json: &[u8]) -> Result<Arc<[u8]>, ApiError> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::with_capacity(json.len() / 3), flate2::Compression::fast());
    encoder
        .write_all(json)
        .and_then(|()| encoder.finish())
        .map(Arc::from)
        .map_err(|e| ApiError::internal(format!("compressing a config: {e}")))
}

/// The JSON of `config` from the JSON of the same config with version 0:
/// `version` is its first field, so only the number differs (encoded again
/// if the prefix is not the expected one).
fn versioned_json<C: ConfigKind>(unversioned: &[u8], config: &C) -> Result<Arc<[u8]>, ApiError> {
    const PREFIX: &[u8] = br#"{"version":0,"#;
    match unversioned.strip_prefix(PREFIX) {
        Some(rest) => {
            let head = format!(r#"{{"version":{},"#, config.version());
            let mut json = Vec::with_capacity(head.len() + rest.len());
            json.extend_from_slice(head.as_bytes());
            json.extend_from_slice(rest);
            Ok(Arc::from(json))
        }
        None => encode(config),
    }
}

/// The hash of a config's content: its JSON with version 0.
pub fn content_sha256<C: ConfigKind>(config: &C) -> Result<String, ApiError> {
    let mut unversioned = config.clone();
    unversioned.set_version(0);
    Ok(sha256_hex(&encode(&unversioned)?))
}

struct Entry<C> {
    compiled: Option<Arc<Compiled<C>>>,
    /// The keys `compiled` was registered under in the index.
    deps: Vec<Key>,
    /// A write may have changed the config since it was compiled.
    stale: bool,
    /// A compilation task is running.
    compiling: bool,
    /// The last compilation's failure, for the waiters of that attempt.
    failure: Option<ApiError>,
    /// Bumped whenever the entry changes (stale, compiled, failed): long-polls wait on it.
    changed: watch::Sender<u64>,
    /// Compilations installed so far (a caller waits for one that started after it asked).
    installs: u64,
    /// [`Inner::reported`] when the running compilation started: write sets
    /// reported after it may be missing from what it read (see [`ConfigCache::install`]).
    compile_from: u64,
}

impl<C> Entry<C> {
    fn new() -> Self {
        Self {
            compiled: None,
            deps: Vec::new(),
            stale: true,
            compiling: false,
            failure: None,
            changed: watch::channel(0).0,
            installs: 0,
            compile_from: 0,
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }
}

struct Inner<C> {
    entries: HashMap<String, Entry<C>>,
    /// Which agents' configs read each key.
    index: HashMap<Key, HashSet<String>>,
    /// Write sets of recent commits, oldest first, by revision.
    log: VecDeque<(u64, Arc<HashSet<Key>>)>,
    /// Every commit up to this revision has left the log.
    log_floor: u64,
    /// Write sets reported so far; the last one in `log` is the `reported`-th.
    reported: u64,
    /// Long lists of gateway compilations, kept decoded and patched by writes.
    lists: Lists,
}

impl<C> Default for Inner<C> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            index: HashMap::new(),
            log: VecDeque::new(),
            log_floor: 0,
            reported: 0,
            lists: Lists::default(),
        }
    }
}

impl<C> Inner<C> {
    fn unregister(&mut self, agent: &str, deps: &[Key]) {
        for key in deps {
            if let Some(agents) = self.index.get_mut(key) {
                agents.remove(agent);
                if agents.is_empty() {
                    self.index.remove(key);
                }
            }
        }
    }

    /// Whether a write after `revision` could have changed what `deps` read.
    fn changed_since(&self, revision: u64, deps: &HashSet<Key>) -> bool {
        if revision < self.log_floor {
            return true;
        }
        self.log.iter().rev().take_while(|(r, _)| *r > revision).any(|(_, keys)| keys.iter().any(|k| deps.contains(k)))
    }

    /// Whether a write set reported after the `from`-th touched `deps`.
    fn reported_since(&self, from: u64, deps: &HashSet<Key>) -> bool {
        let newer = self.reported.saturating_sub(from);
        if newer > self.log.len() as u64 {
            return true;
        }
        self.log.iter().rev().take(newer as usize).any(|(_, keys)| keys.iter().any(|k| deps.contains(k)))
    }
}

/// Compiled configs of every agent (or relay) that asked for one, and what they depend on.
pub struct ConfigCache<C = AgentConfig> {
    inner: Mutex<Inner<C>>,
}

impl<C> Default for ConfigCache<C> {
    fn default() -> Self {
        Self { inner: Mutex::new(Inner::default()) }
    }
}

impl<C> std::fmt::Debug for ConfigCache<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigCache").finish_non_exhaustive()
    }
}

impl<C: ConfigKind> ConfigCache<C> {
    /// A cache whose log starts at `revision` (the store's, at start-up).
    pub fn new(revision: u64) -> Self {
        Self { inner: Mutex::new(Inner { log_floor: revision, ..Inner::default() }) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<C>> {
        // The lock guards plain maps that every method leaves consistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks stale (and wakes) the agents whose configs read any of `keys`,
    /// written by the commit that produced `revision`.
    pub fn invalidate(&self, revision: u64, keys: HashSet<Key>) {
        if keys.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let mut affected: HashSet<String> = HashSet::new();
        for key in &keys {
            if let Some(agents) = inner.index.get(key) {
                affected.extend(agents.iter().cloned());
            }
        }
        for agent in affected {
            if let Some(entry) = inner.entries.get_mut(&agent)
                && !entry.stale
            {
                entry.stale = true;
                entry.bump();
            }
        }
        inner.lists.mark(revision, &keys);
        inner.log.push_back((revision, Arc::new(keys)));
        inner.reported += 1;
        while inner.log.len() > LOG_LEN {
            if let Some((r, _)) = inner.log.pop_front() {
                inner.log_floor = inner.log_floor.max(r);
            }
        }
    }

    /// The records of `T` that reference `reference` as of a snapshot at
    /// `revision` read through `tx`: from the kept list, re-reading only the
    /// records written since (see [`crate::lists`]), or from the store (and
    /// then kept). The read goes into `tx`'s read set either way.
    pub fn by_reference<T>(&self, tx: &mut dyn Tx, revision: u64, reference: &str) -> Result<Vec<Arc<T>>, StoreError>
    where
        T: Object + Send + Sync + 'static,
    {
        // Declares the dependency on the list without reading a record.
        tx.list(T::KIND, &Filter { reference: Some(reference), limit: Some(0), ..Filter::default() })?;
        let plan = self.lock().lists.plan(T::KIND, reference, revision);
        if let Plan::Refresh(ids) = plan {
            let mut reread = Vec::with_capacity(ids.len());
            for id in ids {
                let value = tx.get_obj::<T>(&id)?.filter(|o| o.refs().iter().any(|r| r == reference));
                reread.push((id, value.map(|o| Arc::new(o) as Arc<dyn std::any::Any + Send + Sync>)));
            }
            if let Some(list) = self.lock().lists.finish(T::KIND, reference, revision, reread) {
                return Ok(list.into_iter().filter_map(|d| d.downcast::<T>().ok()).collect());
            }
        }
        let records: Vec<Arc<T>> = tx.list_obj::<T>(&Filter::reference(reference))?.into_iter().map(Arc::new).collect();
        let mut inner = self.lock();
        let later = (revision >= inner.log_floor)
            .then(|| inner.log.iter().filter(|(r, _)| *r > revision).cloned().collect::<Vec<_>>());
        let decoded = records.iter().map(|o| (o.id().to_string(), o.clone() as Arc<dyn std::any::Any + Send + Sync>));
        inner.lists.keep(T::KIND, reference, revision, decoded, later);
        Ok(records)
    }

    /// Subscribes to changes of `agent`'s entry (stale, recompiled).
    pub fn subscribe(&self, agent: &C::Id) -> watch::Receiver<u64> {
        let mut inner = self.lock();
        inner.entries.entry(agent.as_ref().to_string()).or_insert_with(Entry::new).changed.subscribe()
    }

    /// The latest compiled config of `agent`, fresh or stale, without compiling.
    pub fn peek(&self, agent: &C::Id) -> Option<Arc<Compiled<C>>> {
        self.lock().entries.get(agent.as_ref()).and_then(|e| e.compiled.clone())
    }

    /// Forgets `agent` (deleted).
    pub fn remove(&self, agent: &C::Id) {
        let mut inner = self.lock();
        if let Some(entry) = inner.entries.remove(agent.as_ref()) {
            inner.unregister(agent.as_ref(), &entry.deps);
            entry.bump();
        }
    }

    /// When the agent proves (by `content_sha256`) that it holds the current
    /// content under version `version`, numbers the current config `version`
    /// so it is not sent again. `version` is only ever compared, never computed with.
    pub fn adopt(&self, agent: &C::Id, version: u64, content_sha256: &str) -> Result<(), ApiError> {
        if version == 0 {
            return Ok(());
        }
        let mut inner = self.lock();
        let Some(entry) = inner.entries.get_mut(agent.as_ref()) else { return Ok(()) };
        let Some(current) = &entry.compiled else { return Ok(()) };
        if entry.stale || current.version() == version || current.content_sha256 != content_sha256 {
            return Ok(());
        }
        entry.compiled = Some(Arc::new(current.with_version(version)?));
        Ok(())
    }

    /// The agent's current config, compiling it first when it is missing or
    /// stale. Concurrent callers share one compilation.
    ///
    /// Under a steady stream of writes to what the config reads, every
    /// compilation ends stale; waiting for a fresh one would starve the agent.
    /// So a caller takes the first compilation that *started* after it asked,
    /// stale or not: it holds every write committed before the call, and the
    /// next call compiles again.
    pub async fn current(&self, state: &AppState, agent: &C::Id) -> Result<Arc<Compiled<C>>, ApiError> {
        let mut enough: Option<u64> = None;
        loop {
            let mut changed = {
                let mut inner = self.lock();
                let reported = inner.reported;
                let entry = inner.entries.entry(agent.as_ref().to_string()).or_insert_with(Entry::new);
                // One running now started before this call: the one after it is ours.
                let enough = *enough.get_or_insert(entry.installs + if entry.compiling { 2 } else { 1 });
                if let Some(compiled) = &entry.compiled
                    && (!entry.stale || entry.installs >= enough)
                {
                    return Ok(compiled.clone());
                }
                if let Some(failure) = entry.failure.take() {
                    return Err(failure);
                }
                let changed = entry.changed.subscribe();
                if !entry.compiling {
                    entry.compiling = true;
                    entry.compile_from = reported;
                    let (state, agent) = (state.clone(), agent.clone());
                    tokio::spawn(async move {
                        let result = compile_now::<C>(&state, &agent).await;
                        C::cache(&state).install(&agent, result);
                    });
                }
                changed
            };
            if changed.changed().await.is_err() {
                // `remove` dropped the entry: the agent was deleted.
                return Err(ApiError::unauthorized(C::DELETED));
            }
        }
    }

    fn install(&self, agent: &C::Id, result: Result<(C, HashSet<Key>, Work, u64), ApiError>) {
        let mut inner = self.lock();
        let (config, deps, work, revision) = match result {
            Ok(x) => x,
            Err(e) => {
                let deleted = e.status == axum::http::StatusCode::UNAUTHORIZED;
                if let Some(entry) = inner.entries.get_mut(agent.as_ref()) {
                    entry.compiling = false;
                    entry.failure = Some(e);
                    entry.bump();
                }
                if deleted && let Some(entry) = inner.entries.remove(agent.as_ref()) {
                    inner.unregister(agent.as_ref(), &entry.deps);
                }
                return;
            }
        };
        // Stale if a write after the snapshot touched what it read — or a write
        // reported while it compiled: its commit may be in the snapshot while
        // the kept lists the compilation read had not been patched with it yet.
        let from = inner.entries.get(agent.as_ref()).map_or(0, |e| e.compile_from);
        let stale = inner.changed_since(revision, &deps) || inner.reported_since(from, &deps);
        let previous = inner.entries.get(agent.as_ref()).and_then(|e| e.compiled.clone());
        let outcome = (|| -> Result<Compiled<C>, ApiError> {
            // The content to hash: the JSON with version 0 (compiled configs have it already).
            let mut config = config;
            config.set_version(0);
            let unversioned = encode(&config)?;
            let content_sha256 = sha256_hex(&unversioned);
            let version = match &previous {
                Some(p) if p.content_sha256 == content_sha256 => p.version(),
                Some(p) => next_version(revision, Some(p.version())),
                None => next_version(revision, None),
            };
            config.set_version(version);
            let json = versioned_json(&unversioned, &config)?;
            Ok(Compiled { config: Arc::new(config), gzip: gzip(&json)?, json, content_sha256, revision, work })
        })();
        // The agent was deleted while it compiled: nothing to keep.
        let Some(entry) = inner.entries.get_mut(agent.as_ref()) else { return };
        entry.compiling = false;
        let old_deps = std::mem::take(&mut entry.deps);
        match outcome {
            Ok(compiled) => {
                entry.compiled = Some(Arc::new(compiled));
                entry.installs += 1;
                entry.stale = stale;
                entry.failure = None;
                entry.deps = deps.into_iter().collect();
            }
            Err(e) => entry.failure = Some(e),
        }
        entry.bump();
        let new_deps = entry.deps.clone();
        inner.unregister(agent.as_ref(), &old_deps);
        for key in new_deps {
            inner.index.entry(key).or_default().insert(agent.as_ref().to_string());
        }
    }

    /// How many long-polls (and other subscribers) wait on `agent`'s entry.
    pub fn waiters(&self, agent: &C::Id) -> usize {
        self.lock().entries.get(agent.as_ref()).map_or(0, |e| e.changed.receiver_count())
    }

    /// How many agents depend on `key` (for tests and metrics).
    pub fn dependents(&self, key: &Key) -> usize {
        self.lock().index.get(key).map_or(0, HashSet::len)
    }
}

/// A version for content first compiled at `revision`: never 0 (an agent's
/// "none"), never the previous version.
fn next_version(revision: u64, previous: Option<u64>) -> u64 {
    let v = revision.max(1);
    if Some(v) == previous { v.checked_add(1).unwrap_or(1) } else { v }
}

/// Compiles `agent`'s config from one snapshot, with its read set, its cost and the snapshot's revision.
async fn compile_now<C: ConfigKind>(state: &AppState, agent: &C::Id) -> Result<(C, HashSet<Key>, Work, u64), ApiError> {
    let region = state.region().to_string();
    let agent = agent.clone();
    let configs = state.configs.clone();
    state
        .read(move |tx| {
            let revision = tx.revision()?;
            let kept = KeptLists { cache: &configs, revision };
            let (config, keys, work) = C::compile_tracked(tx, &agent, &region, Some(kept))?;
            Ok((config, keys, work, revision))
        })
        .await
}

/// Compiles through a read-recording transaction; a deleted agent is a 401.
pub fn compile_tracked(
    tx: &mut dyn Tx,
    agent_id: &AgentId,
    region: &str,
    lists: Option<KeptLists<'_>>,
) -> Result<(AgentConfig, HashSet<Key>, Work), ApiError> {
    let mut tracked = Tracked::new(tx, Mode::Reads);
    let agent: Agent = tracked.get_obj(agent_id.as_str())?.ok_or_else(|| ApiError::unauthorized(AGENT_DELETED))?;
    let config = compile_with(&mut tracked, &agent, region, lists).map_err(|e: StoreError| ApiError::from(e))?;
    let (keys, work) = tracked.finish();
    Ok((config, keys, work))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_versioned_config_is_encoded_as_a_whole_encode_would() {
        let config = AgentConfig { agent_id: "agent-1".into(), zone: "z1".into(), ..AgentConfig::default() };
        let unversioned = encode(&config).unwrap();
        for version in [1, 42, u64::MAX] {
            let versioned = AgentConfig { version, ..config.clone() };
            assert_eq!(versioned_json(&unversioned, &versioned).unwrap(), encode(&versioned).unwrap());
        }
    }

    #[test]
    fn versions_are_never_zero_and_never_repeat_the_previous_one() {
        assert_eq!(next_version(0, None), 1);
        assert_eq!(next_version(7, None), 7);
        assert_eq!(next_version(7, Some(3)), 7);
        assert_eq!(next_version(7, Some(7)), 8);
        assert_eq!(next_version(u64::MAX, Some(u64::MAX)), 1);
    }

    /// Starts a compilation of `agent` as [`ConfigCache::current`] does.
    fn start_compiling(cache: &ConfigCache, agent: &AgentId) {
        let mut inner = cache.lock();
        let reported = inner.reported;
        let entry = inner.entries.entry(agent.to_string()).or_insert_with(Entry::new);
        entry.compiling = true;
        entry.compile_from = reported;
    }

    /// A write commits at 11 while a compilation runs; the compilation's
    /// snapshot (11) holds the commit, but the kept list it read had not been
    /// patched with it yet (the write is reported after its commit). Only
    /// the report arriving during the compilation can tell.
    #[test]
    fn a_write_reported_while_a_compilation_ran_makes_it_stale_though_its_snapshot_holds_the_commit() {
        let cache: ConfigCache = ConfigCache::new(10);
        let agent = AgentId::generate(&[7; 16]);
        let list = Key::Ref("vpc-endpoint".into(), "rcfg-1".into());
        let written = HashSet::from([list.clone(), Key::Object("vpc-endpoint".into(), "vpce-1".into())]);
        let compiled = || Ok((AgentConfig::default(), HashSet::from([list.clone()]), Work::default(), 11));

        start_compiling(&cache, &agent);
        cache.invalidate(11, written.clone());
        cache.install(&agent, compiled());
        assert!(cache.lock().entries[agent.as_str()].stale, "the write arrived during the compilation");

        // Reported before the next compilation started: its snapshot and its lists hold it.
        start_compiling(&cache, &agent);
        cache.install(&agent, compiled());
        assert!(!cache.lock().entries[agent.as_str()].stale, "nothing arrived during this one");
    }

    #[test]
    fn a_compilation_that_raced_a_write_to_its_keys_is_stale() {
        let cache: ConfigCache = ConfigCache::new(10);
        let key = Key::Object("vpc".into(), "vpc-1".into());
        cache.invalidate(12, HashSet::from([key.clone()]));
        let inner = cache.lock();
        assert!(inner.changed_since(11, &HashSet::from([key.clone()])), "a write after the snapshot");
        assert!(!inner.changed_since(12, &HashSet::from([key.clone()])), "the snapshot includes the write");
        assert!(!inner.changed_since(11, &HashSet::from([Key::Kind("vpc".into())])), "other keys");
        assert!(inner.changed_since(9, &HashSet::new()), "older than the log: assume changed");
    }
}
