//! Lists by reference kept decoded between compilations and patched by the
//! writes that touch them, so recompiling a gateway's config after one
//! change reads the changed records, not all of its thousands of endpoints,
//! shares and invitations again.
//!
//! An entry holds the records of one kind that reference one id, decoded,
//! each with the store revision it was read at. Every committed write reports
//! its keys to the config cache ([`crate::configs::ConfigCache::invalidate`]),
//! which marks the records it wrote *dirty* in the entries whose list it
//! touched (a write's keys carry the references of the old and the new
//! version of each record, so a record moving out of a list marks it too).
//! A compilation reading at revision `S` re-reads only the dirty records
//! written at or before `S`, through its own transaction (so the read set of
//! the compilation still records the list), and takes the rest from memory.
//!
//! Why this is exact:
//! - a write's marks arrive after its commit; a compilation whose snapshot
//!   holds a write whose marks have not arrived yet reads the entry without
//!   it, but the config cache installs any compilation during which a write
//!   to its read set was reported as stale (`ConfigCache::install`), so the
//!   next one re-reads the record;
//! - a record is only ever replaced by a read at a newer revision (a slow
//!   compilation on an old snapshot never puts back an older version), and a
//!   removal leaves a tombstone with its revision for the same reason;
//! - an entry is built from a full list at revision `S` and immediately
//!   marked with every logged write after `S` that touched its list; if the
//!   log no longer reaches back to `S`, the list is not kept.
//!
//! Entries are capped in number; the least recently used goes first.

use std::any::Any;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use trellis_store::track::Key;

/// Lists kept at most; each holds one gateway's endpoints, shares or invitations.
const MAX_ENTRIES: usize = 1024;

type Decoded = Arc<dyn Any + Send + Sync>;

struct Item {
    /// Revision of the snapshot this version was read at.
    read_at: u64,
    /// `None`: the record is gone from the list (a tombstone).
    value: Option<Decoded>,
}

struct Entry {
    items: BTreeMap<String, Item>,
    /// Records written since they were read: id → revision of the latest such write.
    dirty: HashMap<String, u64>,
    tombstones: usize,
    last_used: u64,
}

/// Every kept list, by (kind, referenced id).
#[derive(Default)]
pub(crate) struct Lists {
    entries: HashMap<(String, String), Entry>,
    tick: u64,
}

/// What a compilation must re-read before it can use a kept list.
pub(crate) enum Plan {
    /// Nothing kept: list from the store.
    Load,
    /// Re-read these records, then [`Lists::finish`].
    Refresh(Vec<String>),
}

impl Lists {
    /// Marks the records `keys` wrote (at `revision`) dirty in the lists the write touched.
    pub(crate) fn mark(&mut self, revision: u64, keys: &HashSet<Key>) {
        if self.entries.is_empty() {
            return;
        }
        let mut written: HashMap<&str, Vec<&str>> = HashMap::new();
        for key in keys {
            if let Key::Object(kind, id) = key {
                written.entry(kind.as_str()).or_default().push(id.as_str());
            }
        }
        for key in keys {
            let Key::Ref(kind, reference) = key else { continue };
            let Some(ids) = written.get(kind.as_str()) else { continue };
            let Some(entry) = self.entries.get_mut(&(kind.clone(), reference.clone())) else { continue };
            for id in ids {
                let mark = entry.dirty.entry((*id).to_string()).or_insert(revision);
                *mark = (*mark).max(revision);
            }
        }
    }

    /// What a compilation reading at `revision` must re-read of list (`kind`, `reference`).
    pub(crate) fn plan(&mut self, kind: &str, reference: &str, revision: u64) -> Plan {
        self.tick += 1;
        let tick = self.tick;
        match self.entries.get_mut(&(kind.to_string(), reference.to_string())) {
            None => Plan::Load,
            Some(entry) => {
                entry.last_used = tick;
                Plan::Refresh(entry.dirty.iter().filter(|(_, w)| **w <= revision).map(|(id, _)| id.clone()).collect())
            }
        }
    }

    /// Keeps a list read in full at `revision`, marked with the logged writes
    /// after it (`later`: revision and keys of each, oldest first). `None`
    /// from `later` means the log no longer reaches back to `revision`.
    pub(crate) fn keep(
        &mut self,
        kind: &str,
        reference: &str,
        revision: u64,
        records: impl IntoIterator<Item = (String, Decoded)>,
        later: Option<Vec<(u64, Arc<HashSet<Key>>)>>,
    ) {
        let Some(later) = later else { return };
        let key = (kind.to_string(), reference.to_string());
        if self.entries.contains_key(&key) {
            return;
        }
        if self.entries.len() >= MAX_ENTRIES
            && let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| e.last_used).map(|(k, _)| k.clone())
        {
            self.entries.remove(&oldest);
        }
        self.tick += 1;
        let items =
            records.into_iter().map(|(id, value)| (id, Item { read_at: revision, value: Some(value) })).collect();
        self.entries.insert(key, Entry { items, dirty: HashMap::new(), tombstones: 0, last_used: self.tick });
        for (r, keys) in later {
            self.mark(r, &keys);
        }
    }

    /// Applies the records re-read at `revision` (`None`: gone from the list)
    /// and returns the list as of the entry, in id order.
    pub(crate) fn finish(
        &mut self,
        kind: &str,
        reference: &str,
        revision: u64,
        reread: Vec<(String, Option<Decoded>)>,
    ) -> Option<Vec<Decoded>> {
        let entry = self.entries.get_mut(&(kind.to_string(), reference.to_string()))?;
        for (id, value) in reread {
            if entry.dirty.get(&id).is_some_and(|w| *w <= revision) {
                entry.dirty.remove(&id);
            }
            let known = entry.items.contains_key(&id);
            let item = entry.items.entry(id).or_insert(Item { read_at: 0, value: None });
            if item.read_at > revision {
                continue;
            }
            let was_tombstone = known && item.value.is_none();
            entry.tombstones = entry.tombstones + usize::from(value.is_none()) - usize::from(was_tombstone);
            *item = Item { read_at: revision, value };
        }
        let list: Vec<Decoded> = entry.items.values().filter_map(|i| i.value.clone()).collect();
        // A list that mostly lost its records is rebuilt rather than carried.
        if entry.tombstones > 64 && entry.tombstones > list.len() {
            self.entries.remove(&(kind.to_string(), reference.to_string()));
        }
        Some(list)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde::{Deserialize, Serialize};
    use trellis_store::sqlite::SqliteStore;
    use trellis_store::track::{Mode, Tracked};
    use trellis_store::{Filter, Object, Store, StoreError, Tx, TxExt, read_with, write_with};

    use super::*;
    use crate::configs::ConfigCache;

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct Thing {
        id: String,
        refs: Vec<String>,
        n: u32,
    }

    impl Object for Thing {
        const KIND: &'static str = "thing";
        fn id(&self) -> &str {
            &self.id
        }
        fn account_id(&self) -> &str {
            "acct"
        }
        fn refs(&self) -> Vec<String> {
            self.refs.clone()
        }
    }

    /// A write as `AppState::write` does it: tracked, then reported to the cache.
    fn write(store: &SqliteStore, cache: &ConfigCache, f: impl Fn(&mut dyn Tx) -> Result<(), StoreError>) {
        let (revision, keys) = write_with(store, |tx| {
            let start = tx.revision()?;
            let mut tracked = Tracked::new(tx, Mode::Writes);
            f(&mut tracked)?;
            Ok::<_, StoreError>((start + 1, tracked.finish().0))
        })
        .unwrap();
        cache.invalidate(revision, keys);
    }

    fn kept(store: &SqliteStore, cache: &ConfigCache, reference: &str) -> Vec<Thing> {
        read_with(store, |tx| {
            let revision = tx.revision()?;
            cache.by_reference::<Thing>(tx, revision, reference).map(|l| l.iter().map(|t| (**t).clone()).collect())
        })
        .unwrap()
    }

    fn fresh(store: &SqliteStore, reference: &str) -> Vec<Thing> {
        read_with(store, |tx| tx.list_obj::<Thing>(&Filter::reference(reference))).unwrap()
    }

    #[test]
    fn a_kept_list_always_equals_a_fresh_one_through_inserts_moves_updates_and_deletes() {
        let store = SqliteStore::open_in_memory().unwrap();
        let cache = ConfigCache::new(store.revision().unwrap());
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let refs = ["cfg-a", "cfg-b"];
        for step in 0..400u32 {
            let ops = 1 + next(3);
            let picks: Vec<(u64, u64, u64)> = (0..ops).map(|_| (next(4), next(30), next(3))).collect();
            write(&store, &cache, |tx| {
                for (op, id, r) in &picks {
                    let id = format!("thing-{id:02}");
                    let refs = match r {
                        0 => vec!["cfg-a".to_string()],
                        1 => vec!["cfg-b".to_string()],
                        _ => vec!["cfg-a".to_string(), "cfg-b".to_string()],
                    };
                    let thing = Thing { id: id.clone(), refs, n: step };
                    match (op, tx.get_obj::<Thing>(&id)?) {
                        (3, Some(_)) => {
                            tx.delete_obj::<Thing>(&id)?;
                        }
                        (_, Some(_)) => tx.update_obj(&thing)?,
                        (_, None) => tx.insert_obj(&thing)?,
                    }
                }
                Ok(())
            });
            // Read only some of the time, so several writes pile up between reads.
            if next(3) == 0 {
                for r in refs {
                    assert_eq!(kept(&store, &cache, r), fresh(&store, r), "list {r} after step {step}");
                }
            }
        }
        for r in refs {
            assert_eq!(kept(&store, &cache, r), fresh(&store, r));
        }
    }

    #[test]
    fn a_recompile_rereads_only_what_was_written() {
        let store = SqliteStore::open_in_memory().unwrap();
        let cache = ConfigCache::new(store.revision().unwrap());
        write(&store, &cache, |tx| {
            for i in 0..100 {
                tx.insert_obj(&Thing { id: format!("thing-{i:03}"), refs: vec!["cfg".into()], n: 0 })?;
            }
            Ok(())
        });
        let count = |store: &SqliteStore| {
            read_with(store, |tx| {
                let revision = tx.revision()?;
                let mut tracked = Tracked::new(tx, Mode::Reads);
                let list = cache.by_reference::<Thing>(&mut tracked, revision, "cfg")?;
                let (keys, work) = tracked.finish();
                assert!(keys.contains(&Key::Ref("thing".into(), "cfg".into())), "the list is a dependency: {keys:?}");
                Ok::<_, StoreError>((list.len(), work.records_read))
            })
            .unwrap()
        };
        assert_eq!(count(&store), (100, 100), "the first read lists everything");
        assert_eq!(count(&store), (100, 0), "nothing written: nothing read");
        write(&store, &cache, |tx| tx.update_obj(&Thing { id: "thing-007".into(), refs: vec!["cfg".into()], n: 1 }));
        write(&store, &cache, |tx| tx.delete_obj::<Thing>("thing-008").map(|_| ()));
        assert_eq!(count(&store), (99, 1), "one record re-read, the deleted one found gone");
    }

    fn thing(n: u32) -> Decoded {
        Arc::new(Thing { id: "t".into(), refs: vec!["r".into()], n })
    }

    fn values(list: Option<Vec<Decoded>>) -> Vec<u32> {
        list.unwrap().into_iter().map(|d| d.downcast::<Thing>().unwrap().n).collect()
    }

    fn written(id: &str) -> HashSet<Key> {
        HashSet::from([Key::Object("thing".into(), id.into()), Key::Ref("thing".into(), "r".into())])
    }

    #[test]
    fn an_old_snapshot_never_puts_back_an_older_version_or_a_removed_record() {
        let mut lists = Lists::default();
        lists.keep("thing", "r", 10, [("t".to_string(), thing(1))], Some(vec![]));
        lists.mark(11, &written("t"));
        // A compilation at 12 re-reads t (version 2); a slow one at 10 then re-reads version 1.
        assert!(matches!(lists.plan("thing", "r", 12), Plan::Refresh(ids) if ids == ["t"]));
        assert_eq!(values(lists.finish("thing", "r", 12, vec![("t".into(), Some(thing(2)))])), [2]);
        assert_eq!(values(lists.finish("thing", "r", 10, vec![("t".into(), Some(thing(1)))])), [2]);
        // Removed at 14; an old snapshot that still sees it does not bring it back.
        lists.mark(14, &written("t"));
        assert_eq!(values(lists.finish("thing", "r", 14, vec![("t".into(), None)])), Vec::<u32>::new());
        assert_eq!(values(lists.finish("thing", "r", 13, vec![("t".into(), Some(thing(2)))])), Vec::<u32>::new());
    }

    #[test]
    fn a_mark_that_arrives_late_is_picked_up_by_the_next_compilation() {
        let mut lists = Lists::default();
        lists.keep("thing", "r", 10, [("t".to_string(), thing(1))], Some(vec![]));
        // The write at 11 committed, its keys not reported yet: a compilation at 11 sees nothing to re-read.
        assert!(matches!(lists.plan("thing", "r", 11), Plan::Refresh(ids) if ids.is_empty()));
        lists.mark(11, &written("t"));
        assert!(matches!(lists.plan("thing", "r", 11), Plan::Refresh(ids) if ids == ["t"]));
        // A mark newer than the snapshot waits for a compilation that can see it.
        lists.mark(15, &written("t"));
        assert_eq!(values(lists.finish("thing", "r", 11, vec![("t".into(), Some(thing(2)))])), [2]);
        assert!(matches!(lists.plan("thing", "r", 11), Plan::Refresh(ids) if ids.is_empty()));
        assert!(matches!(lists.plan("thing", "r", 15), Plan::Refresh(ids) if ids == ["t"]));
    }

    #[test]
    fn a_list_is_kept_with_the_writes_logged_after_its_snapshot_or_not_at_all() {
        let mut lists = Lists::default();
        lists.keep("thing", "r", 10, [("t".to_string(), thing(1))], Some(vec![(12, Arc::new(written("t")))]));
        assert!(matches!(lists.plan("thing", "r", 12), Plan::Refresh(ids) if ids == ["t"]));
        lists.keep("thing", "q", 10, [("t".to_string(), thing(1))], None);
        assert!(matches!(lists.plan("thing", "q", 12), Plan::Load), "the log no longer reaches back: not kept");
    }
}
