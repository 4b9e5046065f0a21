//! The control plane's store: one trait, [`Store`], with SQLite as its first
//! implementation ([`sqlite::SqliteStore`]) and one conformance suite
//! ([`conformance`]) that every implementation must pass.
//!
//! The store is a transactional document store: records of a `kind` with an
//! `id`, the owning `account_id`, a JSON `body` and a list of indexed `refs`
//! (ids of related objects, to find for example every endpoint of a
//! configuration). It knows nothing of the object model; rules live in
//! `trellis-model` and `trellis-control`. Every write transaction is
//! serializable and bumps a global revision, which the control plane uses to
//! wake config long-polls.
#![forbid(unsafe_code)]

pub mod conformance;
pub mod sqlite;
pub mod track;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// One stored object.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub kind: String,
    pub id: String,
    /// The account that owns the record; empty for global records.
    pub account_id: String,
    /// Ids of related objects, indexed for [`Filter::reference`].
    pub refs: Vec<String>,
    /// The object as JSON text (typed access decodes it straight into its type).
    pub body: String,
}

impl Record {
    /// The body parsed as a JSON value (for tests and tools; typed access uses [`TxExt`]).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Which records of a kind [`Tx::list`] returns. Results are ordered by id.
#[derive(Clone, Debug, Default)]
pub struct Filter<'a> {
    /// Only records owned by this account.
    pub account_id: Option<&'a str>,
    /// Only records whose `refs` contain this id.
    pub reference: Option<&'a str>,
    /// Only records whose id sorts after this one (the cursor of a page).
    pub after: Option<&'a str>,
    /// At most this many records (the first ones by id).
    pub limit: Option<usize>,
}

impl<'a> Filter<'a> {
    /// Records of one account.
    pub fn account(account_id: &'a str) -> Self {
        Self { account_id: Some(account_id), ..Self::default() }
    }

    /// Records whose refs contain `reference`.
    pub fn reference(reference: &'a str) -> Self {
        Self { reference: Some(reference), ..Self::default() }
    }

    /// Records of one account whose refs contain `reference`.
    pub fn account_and_reference(account_id: &'a str, reference: &'a str) -> Self {
        Self { account_id: Some(account_id), reference: Some(reference), ..Self::default() }
    }

    /// This filter, one page: ids after `after`, at most `limit` records.
    pub fn page(self, after: Option<&'a str>, limit: usize) -> Self {
        Self { after, limit: Some(limit), ..self }
    }
}

/// Errors of the store. Conflict and NotFound are the caller's to map; the rest are faults.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An insert met an existing (kind, id).
    #[error("{kind} {id} already exists")]
    Conflict { kind: String, id: String },
    /// An update met no (kind, id).
    #[error("{kind} {id} does not exist")]
    NotFound { kind: String, id: String },
    /// A stored body does not decode as the requested type (a bug or a schema drift).
    #[error("stored {kind} {id} is corrupt: {source}")]
    Corrupt { kind: String, id: String, source: serde_json::Error },
    /// The database failed (I/O, locked, …).
    #[error("database error: {0}")]
    Backend(String),
    /// The caller's closure failed; the transaction was rolled back.
    #[error("transaction aborted by the caller")]
    Aborted,
    /// Opening or migrating the database failed.
    #[error("cannot open the store at {path}: {reason}")]
    Open { path: String, reason: String },
}

/// A transactional store of records.
pub trait Store: Send + Sync + 'static {
    /// Runs `f` in one serializable read-write transaction: commits when `f`
    /// returns `Ok`, rolls everything back when it returns `Err` (so a failed
    /// API call leaves nothing half-created), and bumps the revision when the
    /// transaction wrote anything.
    fn write(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), StoreError>) -> Result<(), StoreError>;

    /// Runs `f` in a read-only transaction with a consistent snapshot.
    fn read(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), StoreError>) -> Result<(), StoreError>;

    /// The revision of the last committed write (0 for an empty store).
    fn revision(&self) -> Result<u64, StoreError>;

    /// Housekeeping a server runs now and then (SQLite: checkpoint and trim
    /// the write-ahead log so it stays bounded). Does nothing by default.
    fn maintain(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Operations inside one transaction.
pub trait Tx {
    /// The revision this transaction started from: the last commit it sees.
    fn revision(&mut self) -> Result<u64, StoreError>;
    fn get(&mut self, kind: &str, id: &str) -> Result<Option<Record>, StoreError>;
    fn list(&mut self, kind: &str, filter: &Filter<'_>) -> Result<Vec<Record>, StoreError>;
    /// Fails with [`StoreError::Conflict`] when (kind, id) exists.
    fn insert(&mut self, record: &Record) -> Result<(), StoreError>;
    /// Replaces body, account and refs; fails with [`StoreError::NotFound`] when absent.
    fn update(&mut self, record: &Record) -> Result<(), StoreError>;
    /// Returns whether a record was deleted.
    fn delete(&mut self, kind: &str, id: &str) -> Result<bool, StoreError>;
}

/// A type stored as records of one kind.
pub trait Object: Serialize + DeserializeOwned {
    const KIND: &'static str;
    fn id(&self) -> &str;
    fn account_id(&self) -> &str;
    /// Related ids to index; empty by default.
    fn refs(&self) -> Vec<String> {
        Vec::new()
    }
}

fn to_record<T: Object>(value: &T) -> Result<Record, StoreError> {
    let body = serde_json::to_string(value).map_err(|e| StoreError::Corrupt {
        kind: T::KIND.to_string(),
        id: value.id().to_string(),
        source: e,
    })?;
    Ok(Record {
        kind: T::KIND.to_string(),
        id: value.id().to_string(),
        account_id: value.account_id().to_string(),
        refs: value.refs(),
        body,
    })
}

fn from_record<T: Object>(record: Record) -> Result<T, StoreError> {
    serde_json::from_str(&record.body).map_err(|e| StoreError::Corrupt { kind: record.kind, id: record.id, source: e })
}

/// Typed access on top of [`Tx`].
pub trait TxExt: Tx {
    fn get_obj<T: Object>(&mut self, id: &str) -> Result<Option<T>, StoreError> {
        self.get(T::KIND, id)?.map(from_record).transpose()
    }
    fn list_obj<T: Object>(&mut self, filter: &Filter<'_>) -> Result<Vec<T>, StoreError> {
        self.list(T::KIND, filter)?.into_iter().map(from_record).collect()
    }
    fn insert_obj<T: Object>(&mut self, value: &T) -> Result<(), StoreError> {
        self.insert(&to_record(value)?)
    }
    fn update_obj<T: Object>(&mut self, value: &T) -> Result<(), StoreError> {
        self.update(&to_record(value)?)
    }
    fn delete_obj<T: Object>(&mut self, id: &str) -> Result<bool, StoreError> {
        self.delete(T::KIND, id)
    }
}

impl<X: Tx + ?Sized> TxExt for X {}

/// Runs a write transaction that returns a value or the caller's own error.
///
/// When `f` fails, the transaction rolls back and its error comes back as is;
/// `f` may run more than once if an implementation retries on serialization
/// conflicts, so it must not have effects outside the transaction.
pub fn write_with<T, E: From<StoreError>>(
    store: &dyn Store,
    mut f: impl FnMut(&mut dyn Tx) -> Result<T, E>,
) -> Result<T, E> {
    let mut out: Option<Result<T, E>> = None;
    let result = store.write(&mut |tx| match f(tx) {
        Ok(v) => {
            out = Some(Ok(v));
            Ok(())
        }
        Err(e) => {
            out = Some(Err(e));
            Err(StoreError::Aborted)
        }
    });
    finish(result, out)
}

/// Runs a read transaction that returns a value or the caller's own error.
pub fn read_with<T, E: From<StoreError>>(
    store: &dyn Store,
    mut f: impl FnMut(&mut dyn Tx) -> Result<T, E>,
) -> Result<T, E> {
    let mut out: Option<Result<T, E>> = None;
    let result = store.read(&mut |tx| match f(tx) {
        Ok(v) => {
            out = Some(Ok(v));
            Ok(())
        }
        Err(e) => {
            out = Some(Err(e));
            Err(StoreError::Aborted)
        }
    });
    finish(result, out)
}

fn finish<T, E: From<StoreError>>(result: Result<(), StoreError>, out: Option<Result<T, E>>) -> Result<T, E> {
    match (result, out) {
        (Ok(()), Some(Ok(v))) => Ok(v),
        (Err(StoreError::Aborted), Some(Err(e))) => Err(e),
        (Err(e), _) => Err(e.into()),
        // The store returned Ok without running the closure, or the closure's
        // error was swallowed: both break the `Store` contract.
        (Ok(()), _) => Err(StoreError::Backend("the store did not run the transaction".into()).into()),
    }
}
