//! Read and write sets of transactions, so a cache of anything computed from
//! the store (the control plane's compiled agent configs) is invalidated by
//! exactly the writes that could change it, and nothing else.
//!
//! A [`Tracked`] transaction wraps another and records a [`Key`] for every
//! read (what the reader depends on) and every write (what the writer
//! changed). A computation whose read set shares no key with a write's write
//! set cannot see a different result after that write:
//!
//! - `get(kind, id)` depends on [`Key::Object`];
//! - `list` by reference depends on [`Key::Ref`], by account only on
//!   [`Key::Account`], unfiltered on [`Key::Kind`] (paging narrows nothing);
//! - a write of a record touches its `Object` and `Kind` keys, and the
//!   `Account` and `Ref` keys of both its old and its new version, so a
//!   record that moves out of a list invalidates that list too.
//!
//! It also counts store operations and the records they returned: a measure
//! of work that does not depend on the machine (the scale guard in CI).

use std::collections::HashSet;

use crate::{Filter, Record, StoreError, Tx};

/// One thing a read depended on or a write changed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// One record, by kind and id.
    Object(String, String),
    /// Records of a kind that reference an id.
    Ref(String, String),
    /// Records of a kind owned by an account.
    Account(String, String),
    /// Every record of a kind.
    Kind(String),
}

/// Which keys a [`Tracked`] transaction records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Record what is read (a computation's dependencies).
    Reads,
    /// Record what is written (a write's effects); reads are not recorded.
    Writes,
}

/// Work done through a [`Tracked`] transaction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Work {
    /// Calls of get, list, insert, update and delete.
    pub operations: u64,
    /// Records returned by gets and lists.
    pub records_read: u64,
}

impl std::ops::AddAssign for Work {
    fn add_assign(&mut self, other: Self) {
        self.operations += other.operations;
        self.records_read += other.records_read;
    }
}

/// A transaction that records the keys of what passes through it.
pub struct Tracked<'a> {
    inner: &'a mut dyn Tx,
    mode: Mode,
    keys: HashSet<Key>,
    work: Work,
}

impl<'a> Tracked<'a> {
    pub fn new(inner: &'a mut dyn Tx, mode: Mode) -> Self {
        Self { inner, mode, keys: HashSet::new(), work: Work::default() }
    }

    /// The keys recorded so far.
    pub fn keys(&self) -> &HashSet<Key> {
        &self.keys
    }

    /// The recorded keys and the work done, consuming the tracker.
    pub fn finish(self) -> (HashSet<Key>, Work) {
        (self.keys, self.work)
    }

    fn read_key(&mut self, key: impl FnOnce() -> Key) {
        if self.mode == Mode::Reads {
            self.keys.insert(key());
        }
    }

    fn wrote(&mut self, record: &Record) {
        self.keys.insert(Key::Object(record.kind.clone(), record.id.clone()));
        self.keys.insert(Key::Kind(record.kind.clone()));
        self.keys.insert(Key::Account(record.kind.clone(), record.account_id.clone()));
        for r in &record.refs {
            self.keys.insert(Key::Ref(record.kind.clone(), r.clone()));
        }
    }

    /// Records the keys of the version of (kind, id) about to be replaced or deleted.
    fn wrote_old(&mut self, kind: &str, id: &str) -> Result<(), StoreError> {
        if let Some(old) = self.inner.get(kind, id)? {
            self.wrote(&old);
        }
        Ok(())
    }
}

/// The keys a list with `filter` depends on.
pub fn list_key(kind: &str, filter: &Filter<'_>) -> Key {
    match (filter.reference, filter.account_id) {
        (Some(r), _) => Key::Ref(kind.to_string(), r.to_string()),
        (None, Some(a)) => Key::Account(kind.to_string(), a.to_string()),
        (None, None) => Key::Kind(kind.to_string()),
    }
}

impl Tx for Tracked<'_> {
    fn revision(&mut self) -> Result<u64, StoreError> {
        self.inner.revision()
    }

    fn get(&mut self, kind: &str, id: &str) -> Result<Option<Record>, StoreError> {
        self.work.operations += 1;
        self.read_key(|| Key::Object(kind.to_string(), id.to_string()));
        let record = self.inner.get(kind, id)?;
        self.work.records_read += u64::from(record.is_some());
        Ok(record)
    }

    fn list(&mut self, kind: &str, filter: &Filter<'_>) -> Result<Vec<Record>, StoreError> {
        self.work.operations += 1;
        self.read_key(|| list_key(kind, filter));
        let records = self.inner.list(kind, filter)?;
        self.work.records_read += records.len() as u64;
        Ok(records)
    }

    fn insert(&mut self, record: &Record) -> Result<(), StoreError> {
        self.work.operations += 1;
        self.inner.insert(record)?;
        if self.mode == Mode::Writes {
            self.wrote(record);
        }
        Ok(())
    }

    fn update(&mut self, record: &Record) -> Result<(), StoreError> {
        self.work.operations += 1;
        if self.mode == Mode::Writes {
            self.wrote_old(&record.kind, &record.id)?;
        }
        self.inner.update(record)?;
        if self.mode == Mode::Writes {
            self.wrote(record);
        }
        Ok(())
    }

    fn delete(&mut self, kind: &str, id: &str) -> Result<bool, StoreError> {
        self.work.operations += 1;
        if self.mode == Mode::Writes {
            self.wrote_old(kind, id)?;
        }
        self.inner.delete(kind, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::SqliteStore;
    use crate::{Store, read_with, write_with};

    fn record(kind: &str, id: &str, account: &str, refs: &[&str]) -> Record {
        Record {
            kind: kind.into(),
            id: id.into(),
            account_id: account.into(),
            refs: refs.iter().map(|r| r.to_string()).collect(),
            body: "{}".into(),
        }
    }

    fn reads(store: &dyn Store, f: impl Fn(&mut dyn Tx) -> Result<(), StoreError>) -> HashSet<Key> {
        read_with(store, |tx| {
            let mut t = Tracked::new(tx, Mode::Reads);
            f(&mut t)?;
            Ok::<_, StoreError>(t.finish().0)
        })
        .unwrap()
    }

    fn writes(store: &dyn Store, f: impl Fn(&mut dyn Tx) -> Result<(), StoreError>) -> HashSet<Key> {
        write_with(store, |tx| {
            let mut t = Tracked::new(tx, Mode::Writes);
            f(&mut t)?;
            Ok::<_, StoreError>(t.finish().0)
        })
        .unwrap()
    }

    fn overlaps(a: &HashSet<Key>, b: &HashSet<Key>) -> bool {
        a.iter().any(|k| b.contains(k))
    }

    #[test]
    fn a_write_invalidates_exactly_the_reads_it_could_change() {
        let store = SqliteStore::open_in_memory().unwrap();
        writes(&store, |tx| {
            tx.insert(&record("endpoint", "e1", "a1", &["cfg-1", "subnet-1"]))?;
            tx.insert(&record("endpoint", "e2", "a2", &["cfg-2", "subnet-2"]))
        });
        let by_cfg1 = reads(&store, |tx| tx.list("endpoint", &Filter::reference("cfg-1")).map(drop));
        let by_a2 = reads(&store, |tx| tx.list("endpoint", &Filter::account("a2")).map(drop));
        let get_e1 = reads(&store, |tx| tx.get("endpoint", "e1").map(drop));
        let other_kind = reads(&store, |tx| tx.list("share", &Filter::reference("cfg-1")).map(drop));

        // e2 moves from cfg-2 to cfg-1: the list by cfg-1 changes, e1 does not.
        let moved = writes(&store, |tx| tx.update(&record("endpoint", "e2", "a2", &["cfg-1", "subnet-2"])));
        assert!(overlaps(&moved, &by_cfg1));
        assert!(overlaps(&moved, &by_a2));
        assert!(!overlaps(&moved, &get_e1));
        assert!(!overlaps(&moved, &other_kind));

        // Moving it back out of cfg-1 invalidates the cfg-1 list again (old refs count).
        let back = writes(&store, |tx| tx.update(&record("endpoint", "e2", "a2", &["cfg-2"])));
        assert!(overlaps(&back, &by_cfg1));

        // Deleting e1 reaches everything that saw it, through its stored refs.
        let deleted = writes(&store, |tx| tx.delete("endpoint", "e1").map(drop));
        assert!(overlaps(&deleted, &by_cfg1) && overlaps(&deleted, &get_e1));
        assert!(!overlaps(&deleted, &by_a2));
    }

    #[test]
    fn work_counts_operations_and_records() {
        let store = SqliteStore::open_in_memory().unwrap();
        write_with(&store, |tx| {
            for i in 0..5 {
                tx.insert(&record("vpc", &format!("vpc-{i}"), "a", &[]))?;
            }
            Ok::<_, StoreError>(())
        })
        .unwrap();
        let work = read_with(&store, |tx| {
            let mut t = Tracked::new(tx, Mode::Reads);
            t.list("vpc", &Filter::default())?;
            t.get("vpc", "vpc-1")?;
            t.get("vpc", "nope")?;
            Ok::<_, StoreError>(t.finish().1)
        })
        .unwrap();
        assert_eq!(work, Work { operations: 3, records_read: 6 });
    }
}
