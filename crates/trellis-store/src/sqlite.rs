//! The SQLite store: one file, zero set-up, the control plane's default.
//!
//! Writes go through one connection behind a mutex and run as `BEGIN
//! IMMEDIATE` transactions, so they are serializable by construction (SQLite
//! has a single writer anyway, and the busy timeout makes a second process on
//! the same file wait its turn instead of failing). A file database runs in
//! WAL mode and serves reads from a small pool of read-only connections, so a
//! read never waits for a write in progress and sees the snapshot of the last
//! commit before it started. An in-memory database has only the one
//! connection, so there reads take turns with writes.
//!
//! The schema is versioned with `PRAGMA user_version` and migrated at open from
//! [`MIGRATIONS`]; a file written by a newer Trellis is refused, never
//! downgraded or guessed at. The file is marked with its own
//! `PRAGMA application_id` so another program's database is refused too.
//!
//! This module must never hold a lock or a transaction across a return to the
//! caller: every transaction ends (commit or rollback) before `write` or
//! `read` returns, including when the caller's closure panics.

use std::cell::RefCell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use crate::{Filter, Record, Store, StoreError, Tx};

/// How long a statement waits for a lock held by another connection or process.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle read-only connections kept open for the next reads.
const MAX_IDLE_READERS: usize = 4;

/// `PRAGMA application_id` of a Trellis store ("TRLS").
const APPLICATION_ID: i32 = 0x5452_4c53;

/// The schema, one step per version: applying `MIGRATIONS[i]` takes a database
/// from version `i` to version `i + 1`. Append only: a released step is never
/// edited, because databases in the field already ran it.
pub const MIGRATIONS: &[&str] = &[
    // Version 1: records, their reference index, and the global revision.
    "CREATE TABLE records (
        kind       TEXT NOT NULL,
        id         TEXT NOT NULL,
        account_id TEXT NOT NULL,
        refs       TEXT NOT NULL, -- JSON array of ids, in the caller's order
        body       TEXT NOT NULL, -- JSON
        PRIMARY KEY (kind, id)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX records_by_account ON records (kind, account_id);
    CREATE TABLE refs (
        kind TEXT NOT NULL,
        id   TEXT NOT NULL,
        ref  TEXT NOT NULL,
        PRIMARY KEY (kind, id, ref),
        FOREIGN KEY (kind, id) REFERENCES records (kind, id) ON DELETE CASCADE
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX refs_by_ref ON refs (kind, ref);
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY NOT NULL,
        value INTEGER NOT NULL
    ) STRICT;
    INSERT INTO meta (key, value) VALUES ('revision', 0);",
];

/// The schema version this binary creates and understands.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

const GET: &str = "SELECT account_id, refs, body FROM records WHERE kind = ?1 AND id = ?2";
/// Lists take `kind`, an optional account, an optional reference, a cursor
/// (`''` for none: every id sorts after it) and a limit (-1 for none). The
/// partial conditions let SQLite pick the index of whichever filter is set.
const LIST: &str = "SELECT id, account_id, refs, body FROM records \
     WHERE kind = ?1 AND id > ?4 ORDER BY id LIMIT ?5";
/// `INDEXED BY`: without statistics SQLite walks the primary key instead, in
/// the id order the `ORDER BY` asks for, and reads every record of the kind to
/// find one account's few. The account index is in id order too (an index of
/// a `WITHOUT ROWID` table ends with the primary key).
const LIST_BY_ACCOUNT: &str = "SELECT id, account_id, refs, body FROM records INDEXED BY records_by_account \
     WHERE kind = ?1 AND account_id = ?2 AND id > ?4 ORDER BY id LIMIT ?5";
const LIST_BY_REF: &str = "SELECT r.id, r.account_id, r.refs, r.body FROM refs x \
     JOIN records r ON r.kind = x.kind AND r.id = x.id \
     WHERE x.kind = ?1 AND x.ref = ?3 AND x.id > ?4 ORDER BY x.id LIMIT ?5";
/// A list by account and reference starts from the smaller side (see
/// [`SqliteTx::account_and_ref_list`]): from the records that reference the id
/// (a consumer's invitations to one share), or from the account's records (one
/// consumer's endpoints of a configuration that thousands of endpoints use).
const LIST_BY_ACCOUNT_AND_REF: &str = "SELECT r.id, r.account_id, r.refs, r.body FROM refs x \
     JOIN records r ON r.kind = x.kind AND r.id = x.id \
     WHERE x.kind = ?1 AND x.ref = ?3 AND r.account_id = ?2 AND x.id > ?4 ORDER BY x.id LIMIT ?5";
const LIST_BY_ACCOUNT_AND_REF_FROM_ACCOUNT: &str = "SELECT r.id, r.account_id, r.refs, r.body \
     FROM records r INDEXED BY records_by_account \
     WHERE r.kind = ?1 AND r.account_id = ?2 AND r.id > ?4 \
     AND EXISTS (SELECT 1 FROM refs x WHERE x.kind = r.kind AND x.id = r.id AND x.ref = ?3) \
     ORDER BY r.id LIMIT ?5";
/// Index entries on either side of an account-and-reference list, counted up
/// to [`PROBE`] without reading a record: `kind`, the id, the cursor, the cap.
const COUNT_BY_REF: &str =
    "SELECT count(*) FROM (SELECT 1 FROM refs WHERE kind = ?1 AND ref = ?2 AND id > ?3 LIMIT ?4)";
const COUNT_BY_ACCOUNT: &str = "SELECT count(*) FROM (SELECT 1 FROM records INDEXED BY records_by_account \
     WHERE kind = ?1 AND account_id = ?2 AND id > ?3 LIMIT ?4)";
/// Below this many records referencing the id, a list by account and
/// reference starts from them without looking at the account's side.
const PROBE: i64 = 256;
const INSERT: &str = "INSERT INTO records (kind, id, account_id, refs, body) VALUES (?1, ?2, ?3, ?4, ?5) \
     ON CONFLICT (kind, id) DO NOTHING";
const UPDATE: &str = "UPDATE records SET account_id = ?3, refs = ?4, body = ?5 WHERE kind = ?1 AND id = ?2";
const DELETE: &str = "DELETE FROM records WHERE kind = ?1 AND id = ?2";
const INSERT_REF: &str = "INSERT INTO refs (kind, id, ref) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING";
const DELETE_REFS: &str = "DELETE FROM refs WHERE kind = ?1 AND id = ?2";
const REVISION: &str = "SELECT value FROM meta WHERE key = 'revision'";
/// The write-ahead log is truncated back to this size after a checkpoint.
const WAL_SIZE_LIMIT: i64 = 16 << 20;
const BUMP_REVISION: &str = "UPDATE meta SET value = value + 1 WHERE key = 'revision'";

/// A [`Store`] in one SQLite database file (or in memory, for tests and `trellis dev`).
pub struct SqliteStore {
    /// The file path, or `:memory:`; for messages.
    location: String,
    writer: Mutex<Connection>,
    /// Read-only connections of a file database; `None` in memory, where reads use the writer.
    readers: Option<ReaderPool>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore").field("location", &self.location).finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens the database at `path`, creating the file when it does not exist,
    /// and migrates it to [`SCHEMA_VERSION`].
    ///
    /// Fails with [`StoreError::Open`] when the file cannot be opened, is not a
    /// Trellis database, was written by a newer Trellis, or cannot use WAL mode.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let fail = |reason: String| StoreError::Open { path: path.display().to_string(), reason };
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(path, flags).map_err(|e| fail(explain_open_error(path, &e)))?;
        configure(&conn).map_err(|e| fail(e.to_string()))?;
        // Refuse a foreign or newer file before changing anything in it (the
        // journal mode is persistent); `migrate` checks again under the lock.
        let (app_id, version) = read_marks(&conn).map_err(|e| fail(explain_open_error(path, &e)))?;
        check_compatible(&conn, app_id, version, MIGRATIONS.len()).map_err(fail)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(|e| fail(format!("cannot switch to WAL journal mode: {e}")))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(fail(format!(
                "the file system refused WAL journal mode (journal mode is {mode:?}); \
                 keep the database on a local file system"
            )));
        }
        migrate(&mut conn, MIGRATIONS).map_err(fail)?;
        // After a checkpoint has copied the log into the database, the log file
        // is cut back to this size instead of keeping its high-water mark.
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)
            .map_err(|e| fail(format!("cannot bound the write-ahead log: {e}")))?;
        Ok(SqliteStore {
            location: path.display().to_string(),
            writer: Mutex::new(conn),
            readers: Some(ReaderPool { path: path.to_path_buf(), idle: Mutex::new(Vec::new()) }),
        })
    }

    /// Opens a new, empty database that lives in memory and dies with the store.
    pub fn open_in_memory() -> Result<SqliteStore, StoreError> {
        let fail = |reason: String| StoreError::Open { path: ":memory:".into(), reason };
        let mut conn = Connection::open_in_memory().map_err(|e| fail(e.to_string()))?;
        configure(&conn).map_err(|e| fail(e.to_string()))?;
        migrate(&mut conn, MIGRATIONS).map_err(fail)?;
        Ok(SqliteStore { location: ":memory:".into(), writer: Mutex::new(conn), readers: None })
    }

    /// The write connection, with any transaction a panicking caller left behind rolled back.
    fn writer(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        // A poisoned lock only means a closure panicked while it held the
        // connection; the transaction guard rolled back during the unwind, and
        // the check below makes sure of it.
        let conn = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if !conn.is_autocommit() {
            conn.execute_batch("ROLLBACK").map_err(backend("roll back an abandoned transaction"))?;
        }
        Ok(conn)
    }

    /// Runs `f` on a connection for reading: a pooled read-only one for a file, the writer in memory.
    fn with_reader<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match &self.readers {
            Some(pool) => {
                let mut conn = pool.take()?;
                let result = f(&mut conn);
                pool.put(conn);
                result
            }
            None => f(&mut *self.writer()?),
        }
    }
}

impl Store for SqliteStore {
    fn write(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let _outermost = NestingGuard::enter(self)?;
        let mut conn = self.writer()?;
        // Rolls back when dropped, so a panic in `f` leaves nothing behind.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend("begin a write transaction"))?;
        let mut stx = SqliteTx { conn: &tx, writable: true, wrote: false };
        let result = f(&mut stx);
        let wrote = stx.wrote;
        match result {
            Ok(()) => {
                if wrote {
                    tx.execute(BUMP_REVISION, []).map_err(backend("bump the revision"))?;
                }
                tx.commit().map_err(backend("commit"))
            }
            Err(e) => {
                // Should the rollback fail, the connection is checked and
                // rolled back again before its next use (see `writer`); the
                // caller's error is the one worth reporting.
                let _ = tx.rollback();
                Err(e)
            }
        }
    }

    fn read(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let _outermost = NestingGuard::enter(self)?;
        self.with_reader(|conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Deferred)
                .map_err(backend("begin a read transaction"))?;
            let result = f(&mut SqliteTx { conn: &tx, writable: false, wrote: false });
            let end = tx.rollback().map_err(backend("end a read transaction"));
            result.and(end)
        })
    }

    /// Copies what it can of the write-ahead log into the database without
    /// waiting for readers (SQLite also does this every 1,000 pages); the
    /// log then restarts and is cut to [`WAL_SIZE_LIMIT`].
    fn maintain(&self) -> Result<(), StoreError> {
        if self.readers.is_none() {
            return Ok(());
        }
        let _outermost = NestingGuard::enter(self)?;
        let conn = self.writer()?;
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())).map_err(backend("checkpoint the log"))
    }

    fn revision(&self) -> Result<u64, StoreError> {
        // In memory the revision is read on the writer connection, which a
        // transaction of this thread may hold.
        let _outermost = if self.readers.is_none() { Some(NestingGuard::enter(self)?) } else { None };
        let value: i64 = self
            .with_reader(|conn| conn.query_row(REVISION, [], |row| row.get(0)).map_err(backend("read the revision")))?;
        u64::try_from(value).map_err(|_| StoreError::Backend(format!("the stored revision {value} is negative")))
    }
}

thread_local! {
    /// The stores this thread is inside a transaction of.
    static OPEN_TRANSACTIONS: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// Turns a transaction started from inside another one on the same store into
/// an error. Left alone, it would deadlock on the writer's lock, or, for a read
/// inside a write, silently miss the outer transaction's changes.
struct NestingGuard {
    store: usize,
}

impl NestingGuard {
    fn enter(store: &SqliteStore) -> Result<NestingGuard, StoreError> {
        let store = std::ptr::from_ref(store) as usize;
        OPEN_TRANSACTIONS.with_borrow_mut(|open| {
            if open.contains(&store) {
                return Err(StoreError::Backend(
                    "a transaction was started inside another transaction of the same store; \
                     use the Tx the closure was given instead of calling the store again"
                        .into(),
                ));
            }
            open.push(store);
            Ok(NestingGuard { store })
        })
    }
}

impl Drop for NestingGuard {
    fn drop(&mut self) {
        OPEN_TRANSACTIONS.with_borrow_mut(|open| open.retain(|s| *s != self.store));
    }
}

/// Read-only connections to a file database, opened on demand.
struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReaderPool {
    fn take(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop() {
            return Ok(conn);
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&self.path, flags).map_err(backend("open a read connection"))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(backend("set the busy timeout"))?;
        Ok(conn)
    }

    fn put(&self, conn: Connection) {
        // A connection left inside a transaction (after an I/O error) is not
        // worth repairing: dropping it closes it.
        if conn.is_autocommit() {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < MAX_IDLE_READERS {
                idle.push(conn);
            }
        }
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    Ok(())
}

fn read_marks(conn: &Connection) -> rusqlite::Result<(i32, i64)> {
    let app_id: i32 = conn.pragma_query_value(None, "application_id", |row| row.get(0))?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    Ok((app_id, version))
}

/// Refuses databases this binary must not touch: another program's, or a newer Trellis's.
fn check_compatible(conn: &Connection, app_id: i32, version: i64, known: usize) -> Result<(), String> {
    if app_id != 0 && app_id != APPLICATION_ID {
        return Err(format!(
            "the file is another program's SQLite database (application_id {app_id:#x}); \
             give trellis a path of its own"
        ));
    }
    if version < 0 || (app_id == 0 && version != 0) {
        return Err(format!(
            "the file is a SQLite database with schema version {version} but not a Trellis store; \
             give trellis a path of its own"
        ));
    }
    if version == 0 {
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))
            .map_err(|e| format!("cannot read the schema: {e}"))?;
        if tables > 0 {
            return Err("the file is a SQLite database that already holds tables but is not a Trellis store; \
                 give trellis a path of its own"
                .into());
        }
    }
    let known = i64::try_from(known).unwrap_or(i64::MAX);
    if version > known {
        return Err(format!(
            "the database has schema version {version}, newer than the versions this trellis binary knows \
             (up to {known}); run the trellis release that wrote it or a newer one (downgrading is not supported)"
        ));
    }
    Ok(())
}

/// Brings the database to `migrations.len()`, all pending steps in one
/// transaction: either the database reaches the new version or it stays as it was.
fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<(), String> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| format!("cannot lock the database to migrate it: {e}"))?;
    let (app_id, version) = read_marks(&tx).map_err(|e| format!("cannot read the schema version: {e}"))?;
    check_compatible(&tx, app_id, version, migrations.len())?;
    let from = usize::try_from(version).map_err(|_| format!("invalid schema version {version}"))?;
    if from == migrations.len() {
        return Ok(());
    }
    for (step, sql) in migrations.iter().enumerate().skip(from) {
        tx.execute_batch(sql).map_err(|e| format!("migration to schema version {} failed: {e}", step + 1))?;
    }
    tx.pragma_update(None, "user_version", migrations.len() as i64)
        .and_then(|()| tx.pragma_update(None, "application_id", APPLICATION_ID))
        .map_err(|e| format!("cannot record the schema version: {e}"))?;
    tx.commit().map_err(|e| format!("cannot commit the migration: {e}"))
}

fn explain_open_error(path: &Path, e: &rusqlite::Error) -> String {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        return format!("directory {} does not exist; create it first ({e})", parent.display());
    }
    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase) {
        return format!("the file is not a SQLite database ({e}); give trellis a path of its own");
    }
    e.to_string()
}

fn backend(what: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| StoreError::Backend(format!("cannot {what}: {e}"))
}

/// One transaction on one connection.
struct SqliteTx<'c> {
    conn: &'c Connection,
    writable: bool,
    /// Whether anything changed, which decides whether the revision moves.
    wrote: bool,
}

impl SqliteTx<'_> {
    fn check_writable(&self, op: &str, kind: &str, id: &str) -> Result<(), StoreError> {
        if self.writable {
            Ok(())
        } else {
            Err(StoreError::Backend(format!("cannot {op} {kind} {id} in a read transaction; use Store::write")))
        }
    }

    /// Runs a list query. Every list statement numbers its parameters ?1..?5
    /// (some unused), so all five are always bound.
    fn query(&self, sql: &str, params: &[&dyn rusqlite::ToSql; 5], kind: &str) -> Result<Vec<Record>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(backend("prepare a list query"))?;
        let rows = stmt
            .query_map(&params[..], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))
            .map_err(backend("list records"))?;
        let mut records = Vec::new();
        for row in rows {
            let (id, account_id, refs, body): (String, String, String, String) =
                row.map_err(backend("list records"))?;
            records.push(decode(kind, id, account_id, &refs, body)?);
        }
        Ok(records)
    }

    /// Index entries of `sql` (a `COUNT_BY_*`) for `key` after the cursor, up to [`PROBE`].
    fn probe(&self, sql: &str, kind: &str, key: &str, after: &str) -> Result<i64, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(backend("prepare a count"))?;
        stmt.query_row(params![kind, key, after, PROBE], |row| row.get(0)).map_err(backend("count records"))
    }

    /// The statement of a list by `account` and `reference`: from the records
    /// referencing the id unless the account has fewer of the kind. Counting
    /// both sides costs at most two short index scans.
    fn account_and_ref_list(
        &self,
        kind: &str,
        account: &str,
        reference: &str,
        after: &str,
    ) -> Result<&'static str, StoreError> {
        let by_ref = self.probe(COUNT_BY_REF, kind, reference, after)?;
        if by_ref < PROBE {
            return Ok(LIST_BY_ACCOUNT_AND_REF);
        }
        let by_account = self.probe(COUNT_BY_ACCOUNT, kind, account, after)?;
        Ok(if by_account < by_ref { LIST_BY_ACCOUNT_AND_REF_FROM_ACCOUNT } else { LIST_BY_ACCOUNT_AND_REF })
    }

    fn write_refs(&self, record: &Record) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare_cached(INSERT_REF).map_err(backend("prepare a reference insert"))?;
        for reference in &record.refs {
            stmt.execute(params![record.kind, record.id, reference]).map_err(backend("index a reference"))?;
        }
        Ok(())
    }
}

fn encode(record: &Record) -> Result<String, StoreError> {
    serde_json::to_string(&record.refs).map_err(|source| StoreError::Corrupt {
        kind: record.kind.clone(),
        id: record.id.clone(),
        source,
    })
}

fn decode(kind: &str, id: String, account_id: String, refs: &str, body: String) -> Result<Record, StoreError> {
    match serde_json::from_str(refs) {
        Ok(refs) => Ok(Record { kind: kind.to_string(), id, account_id, refs, body }),
        Err(source) => Err(StoreError::Corrupt { kind: kind.to_string(), id, source }),
    }
}

impl Tx for SqliteTx<'_> {
    fn get(&mut self, kind: &str, id: &str) -> Result<Option<Record>, StoreError> {
        let mut stmt = self.conn.prepare_cached(GET).map_err(backend("prepare a get"))?;
        let row: Option<(String, String, String)> = stmt
            .query_row(params![kind, id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .optional()
            .map_err(backend("get a record"))?;
        row.map(|(account_id, refs, body)| decode(kind, id.to_string(), account_id, &refs, body)).transpose()
    }

    fn revision(&mut self) -> Result<u64, StoreError> {
        let value: i64 = self.conn.query_row(REVISION, [], |row| row.get(0)).map_err(backend("read the revision"))?;
        u64::try_from(value).map_err(|_| StoreError::Backend(format!("the stored revision {value} is negative")))
    }

    fn list(&mut self, kind: &str, filter: &Filter<'_>) -> Result<Vec<Record>, StoreError> {
        let sql = match (filter.account_id, filter.reference) {
            (None, None) => LIST,
            (Some(_), None) => LIST_BY_ACCOUNT,
            (None, Some(_)) => LIST_BY_REF,
            (Some(account), Some(reference)) => {
                self.account_and_ref_list(kind, account, reference, filter.after.unwrap_or(""))?
            }
        };
        let limit = filter.limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let params: [&dyn rusqlite::ToSql; 5] = [
            &kind,
            &filter.account_id.unwrap_or(""),
            &filter.reference.unwrap_or(""),
            &filter.after.unwrap_or(""),
            &limit,
        ];
        self.query(sql, &params, kind)
    }

    fn insert(&mut self, record: &Record) -> Result<(), StoreError> {
        self.check_writable("insert", &record.kind, &record.id)?;
        let refs = encode(record)?;
        let mut stmt = self.conn.prepare_cached(INSERT).map_err(backend("prepare an insert"))?;
        let inserted = stmt
            .execute(params![record.kind, record.id, record.account_id, refs, record.body])
            .map_err(backend("insert a record"))?;
        if inserted == 0 {
            return Err(StoreError::Conflict { kind: record.kind.clone(), id: record.id.clone() });
        }
        self.wrote = true;
        self.write_refs(record)
    }

    fn update(&mut self, record: &Record) -> Result<(), StoreError> {
        self.check_writable("update", &record.kind, &record.id)?;
        let refs = encode(record)?;
        let mut stmt = self.conn.prepare_cached(UPDATE).map_err(backend("prepare an update"))?;
        let updated = stmt
            .execute(params![record.kind, record.id, record.account_id, refs, record.body])
            .map_err(backend("update a record"))?;
        if updated == 0 {
            return Err(StoreError::NotFound { kind: record.kind.clone(), id: record.id.clone() });
        }
        self.wrote = true;
        let mut stmt = self.conn.prepare_cached(DELETE_REFS).map_err(backend("prepare a reference delete"))?;
        stmt.execute(params![record.kind, record.id]).map_err(backend("drop old references"))?;
        self.write_refs(record)
    }

    fn delete(&mut self, kind: &str, id: &str) -> Result<bool, StoreError> {
        self.check_writable("delete", kind, id)?;
        let mut stmt = self.conn.prepare_cached(DELETE).map_err(backend("prepare a delete"))?;
        // The references go with the record (ON DELETE CASCADE).
        let deleted = stmt.execute(params![kind, id]).map_err(backend("delete a record"))? > 0;
        self.wrote |= deleted;
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    use serde_json::json;

    use super::*;
    use crate::{conformance, read_with, write_with};

    fn record(kind: &str, id: &str) -> Record {
        Record {
            kind: kind.into(),
            id: id.into(),
            account_id: "acct-1".into(),
            refs: vec![],
            body: json!({"id": id}).to_string(),
        }
    }

    fn open_reason(result: Result<SqliteStore, StoreError>) -> String {
        match result {
            Err(StoreError::Open { reason, .. }) => reason,
            Err(other) => panic!("expected an Open error, got {other}"),
            Ok(store) => panic!("expected an Open error, got {store:?}"),
        }
    }

    fn marks(path: &Path) -> (i32, i64) {
        read_marks(&Connection::open(path).expect("raw connection")).expect("marks")
    }

    /// Runs one list statement (parameters ?1..?5) on `conn`: the ids it returns and the VM steps it took.
    fn steps_of(
        conn: &Connection,
        sql: &str,
        kind: &str,
        account: &str,
        reference: &str,
        after: &str,
    ) -> (Vec<String>, i32) {
        let mut stmt = conn.prepare(sql).expect("prepare");
        let ids = stmt
            .query_map(params![kind, account, reference, after, -1], |row| row.get::<_, String>(0))
            .expect("query")
            .collect::<Result<Vec<_>, _>>()
            .expect("rows");
        (ids, stmt.get_status(rusqlite::StatementStatus::VmStep))
    }

    /// 1,000 `vpc-endpoint`s of `acct-big` referencing `rcfg-popular`; `acct-a` has two of
    /// those and one referencing `rcfg-other`; `acct-big` has one `resource-share` referencing
    /// `rcfg-rare` among 1,000 referencing others.
    fn skewed_store() -> SqliteStore {
        let store = SqliteStore::open_in_memory().expect("open");
        let rec = |kind: &str, id: String, account: &str, reference: String| Record {
            kind: kind.into(),
            account_id: account.into(),
            refs: vec![reference],
            body: json!({"id": id}).to_string(),
            id,
        };
        write_with(&store, |tx| {
            for i in 0..1000 {
                tx.insert(&rec("vpc-endpoint", format!("vpce-b{i:04}"), "acct-big", "rcfg-popular".into()))?;
                tx.insert(&rec("resource-share", format!("rs-b{i:04}"), "acct-big", format!("rcfg-{i}")))?;
            }
            tx.insert(&rec("vpc-endpoint", "vpce-a1".into(), "acct-a", "rcfg-popular".into()))?;
            tx.insert(&rec("vpc-endpoint", "vpce-a2".into(), "acct-a", "rcfg-popular".into()))?;
            tx.insert(&rec("vpc-endpoint", "vpce-a3".into(), "acct-a", "rcfg-other".into()))?;
            tx.insert(&rec("resource-share", "rs-rare".into(), "acct-big", "rcfg-rare".into()))
        })
        .expect("fill");
        store
    }

    #[test]
    fn a_list_by_account_reads_only_that_accounts_records() {
        let store = skewed_store();
        let conn = store.writer().expect("writer");
        let (ids, steps) = steps_of(&conn, LIST_BY_ACCOUNT, "vpc-endpoint", "acct-a", "", "");
        assert_eq!(ids, ["vpce-a1", "vpce-a2", "vpce-a3"]);
        assert!(steps < 200, "listing 3 of 1,003 records took {steps} VM steps");
        let (ids, _) = steps_of(&conn, LIST_BY_ACCOUNT, "vpc-endpoint", "acct-a", "", "vpce-a1");
        assert_eq!(ids, ["vpce-a2", "vpce-a3"], "in id order after the cursor");
    }

    #[test]
    fn a_list_by_account_and_reference_starts_from_the_smaller_side() {
        let store = skewed_store();
        let conn = store.writer().expect("writer");
        let tx = SqliteTx { conn: &conn, writable: false, wrote: false };
        let plan = |kind: &str, account: &str, reference: &str| {
            tx.account_and_ref_list(kind, account, reference, "").expect("choose")
        };
        // One consumer's endpoints of a configuration a thousand endpoints use: from the account.
        assert_eq!(plan("vpc-endpoint", "acct-a", "rcfg-popular"), LIST_BY_ACCOUNT_AND_REF_FROM_ACCOUNT);
        // One of a thousand shares of an account that references a rare id: from the reference.
        assert_eq!(plan("resource-share", "acct-big", "rcfg-rare"), LIST_BY_ACCOUNT_AND_REF);
        // Both sides large: from the reference, as before.
        assert_eq!(plan("vpc-endpoint", "acct-big", "rcfg-popular"), LIST_BY_ACCOUNT_AND_REF);

        let (from_account, account_steps) =
            steps_of(&conn, LIST_BY_ACCOUNT_AND_REF_FROM_ACCOUNT, "vpc-endpoint", "acct-a", "rcfg-popular", "");
        let (from_ref, ref_steps) =
            steps_of(&conn, LIST_BY_ACCOUNT_AND_REF, "vpc-endpoint", "acct-a", "rcfg-popular", "");
        assert_eq!(from_account, ["vpce-a1", "vpce-a2"]);
        assert_eq!(from_account, from_ref, "both statements list the same records");
        assert!(
            account_steps * 10 < ref_steps,
            "from the account {account_steps} steps, from the reference {ref_steps}"
        );

        // Both statements agree on every cursor, and the store answers with them.
        for after in ["", "vpce-a1", "vpce-a2", "vpce-b0500"] {
            let a =
                steps_of(&conn, LIST_BY_ACCOUNT_AND_REF_FROM_ACCOUNT, "vpc-endpoint", "acct-a", "rcfg-popular", after)
                    .0;
            let r = steps_of(&conn, LIST_BY_ACCOUNT_AND_REF, "vpc-endpoint", "acct-a", "rcfg-popular", after).0;
            assert_eq!(a, r, "after {after:?}");
        }
        drop(conn);
        let ids = |filter: &Filter<'_>| -> Vec<String> {
            read_with(&store, |tx| tx.list("vpc-endpoint", filter)).expect("list").into_iter().map(|r| r.id).collect()
        };
        assert_eq!(ids(&Filter::account_and_reference("acct-a", "rcfg-popular")), ["vpce-a1", "vpce-a2"]);
        assert_eq!(ids(&Filter::account_and_reference("acct-a", "rcfg-popular").page(Some("vpce-a1"), 5)), ["vpce-a2"]);
        assert_eq!(ids(&Filter::account_and_reference("acct-a", "rcfg-popular").page(None, 1)), ["vpce-a1"]);
        assert_eq!(ids(&Filter::account_and_reference("acct-big", "rcfg-popular")).len(), 1000);
    }

    #[test]
    fn in_memory_store_passes_the_conformance_suite() {
        conformance::run_all(&|| Box::new(SqliteStore::open_in_memory().expect("open in memory")) as Box<dyn Store>);
    }

    #[test]
    fn file_store_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let next = AtomicUsize::new(0);
        conformance::run_all(&|| {
            let path = dir.path().join(format!("store-{}.db", next.fetch_add(1, Ordering::Relaxed)));
            Box::new(SqliteStore::open(&path).expect("open file store")) as Box<dyn Store>
        });
    }

    #[test]
    fn data_and_revision_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("trellis.db");
        {
            let store = SqliteStore::open(&path).expect("create");
            write_with(&store, |tx| tx.insert(&record("vpc", "vpc-1"))).expect("insert");
            write_with(&store, |tx| tx.insert(&record("vpc", "vpc-2"))).expect("insert");
            assert_eq!(store.revision().expect("revision"), 2);
        }
        let store = SqliteStore::open(&path).expect("reopen");
        assert_eq!(store.revision().expect("revision"), 2, "the revision is persisted");
        let ids: Vec<String> = read_with(&store, |tx| tx.list("vpc", &Filter::default()))
            .expect("list")
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["vpc-1", "vpc-2"]);
        write_with(&store, |tx| tx.delete("vpc", "vpc-1")).expect("delete");
        assert_eq!(store.revision().expect("revision"), 3, "the revision goes on from where it was");
    }

    #[test]
    fn fresh_database_is_migrated_to_the_latest_schema_in_wal_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fresh.db");
        let store = SqliteStore::open(&path).expect("create");
        assert!(path.is_file(), "open creates the file");
        assert_eq!(marks(&path), (APPLICATION_ID, i64::from(SCHEMA_VERSION)));
        let conn = store.writer().expect("writer");
        let mode: String = conn.pragma_query_value(None, "journal_mode", |row| row.get(0)).expect("journal mode");
        assert_eq!(mode, "wal");
        let foreign_keys: bool = conn.pragma_query_value(None, "foreign_keys", |row| row.get(0)).expect("fk");
        assert!(foreign_keys, "foreign keys are enforced");
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_schema WHERE type IN ('table', 'index') ORDER BY name")
            .and_then(|mut stmt| stmt.query_map([], |row| row.get(0))?.collect())
            .expect("schema");
        for name in ["meta", "records", "records_by_account", "refs", "refs_by_ref"] {
            assert!(tables.iter().any(|t| t == name), "{name} missing from {tables:?}");
        }
    }

    #[test]
    fn reopening_a_current_database_runs_no_migration() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("again.db");
        drop(SqliteStore::open(&path).expect("create"));
        // Migration 1 creates tables, so running it twice would fail.
        drop(SqliteStore::open(&path).expect("reopen"));
        let store = SqliteStore::open(&path).expect("reopen again");
        assert_eq!(store.revision().expect("revision"), 0);
        assert_eq!(marks(&path), (APPLICATION_ID, i64::from(SCHEMA_VERSION)));
    }

    #[test]
    fn database_from_a_newer_trellis_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("newer.db");
        drop(SqliteStore::open(&path).expect("create"));
        let newer = i64::from(SCHEMA_VERSION) + 1;
        Connection::open(&path).and_then(|c| c.pragma_update(None, "user_version", newer)).expect("bump version");

        let reason = open_reason(SqliteStore::open(&path));
        assert!(reason.contains(&format!("schema version {newer}")), "{reason}");
        assert!(reason.contains(&format!("up to {SCHEMA_VERSION}")), "{reason}");
        assert!(reason.contains("downgrading is not supported"), "{reason}");
        assert_eq!(marks(&path), (APPLICATION_ID, newer), "a refused database is not modified");
    }

    #[test]
    fn only_pending_migrations_run() {
        let mut conn = Connection::open_in_memory().expect("memory");
        let steps = ["CREATE TABLE one (x INTEGER)", "CREATE TABLE two (x INTEGER)"];
        migrate(&mut conn, &steps[..1]).expect("to version 1");
        assert_eq!(read_marks(&conn).expect("marks"), (APPLICATION_ID, 1));
        conn.execute("INSERT INTO one VALUES (7)", []).expect("use version 1");
        migrate(&mut conn, &steps).expect("to version 2");
        assert_eq!(read_marks(&conn).expect("marks"), (APPLICATION_ID, 2));
        let kept: i64 = conn.query_row("SELECT x FROM one", [], |row| row.get(0)).expect("data of version 1");
        assert_eq!(kept, 7, "step 1 did not run again");
        migrate(&mut conn, &steps).expect("already current");
    }

    #[test]
    fn failed_migration_leaves_the_previous_version() {
        let mut conn = Connection::open_in_memory().expect("memory");
        migrate(&mut conn, &["CREATE TABLE one (x INTEGER)"]).expect("to version 1");
        let steps = ["CREATE TABLE one (x INTEGER)", "CREATE TABLE two (x INTEGER)", "NOT SQL AT ALL"];
        let reason = migrate(&mut conn, &steps).expect_err("step 3 fails");
        assert!(reason.contains("migration to schema version 3 failed"), "{reason}");
        assert_eq!(read_marks(&conn).expect("marks"), (APPLICATION_ID, 1));
        let two: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_schema WHERE name = 'two'", [], |row| row.get(0))
            .expect("schema");
        assert_eq!(two, 0, "step 2 was rolled back with step 3");
    }

    #[test]
    fn another_programs_database_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tagged = dir.path().join("tagged.db");
        Connection::open(&tagged).and_then(|c| c.pragma_update(None, "application_id", 42)).expect("tag");
        assert!(open_reason(SqliteStore::open(&tagged)).contains("another program's"));

        let untagged = dir.path().join("untagged.db");
        Connection::open(&untagged).and_then(|c| c.execute_batch("CREATE TABLE mine (x)")).expect("table");
        assert!(open_reason(SqliteStore::open(&untagged)).contains("not a Trellis store"));

        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![b'x'; 4096]).expect("write garbage");
        let reason = open_reason(SqliteStore::open(&garbage));
        assert!(reason.contains("not a SQLite database"), "{reason}");
    }

    #[test]
    fn missing_directory_is_named_in_the_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("no-such-dir").join("trellis.db");
        let reason = open_reason(SqliteStore::open(&path));
        assert!(reason.contains("no-such-dir") && reason.contains("does not exist"), "{reason}");
    }

    #[test]
    fn reads_of_a_file_store_do_not_wait_for_an_open_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("busy.db")).expect("open");
        write_with(&store, |tx| tx.insert(&record("vpc", "vpc-1"))).expect("insert");
        let store = &store;
        std::thread::scope(|scope| {
            write_with(store, |tx| {
                tx.insert(&record("vpc", "vpc-2"))?;
                let (done, read) = mpsc::channel();
                scope.spawn(move || {
                    let ids = read_with(store, |tx| tx.list("vpc", &Filter::default()))
                        .map(|records| records.into_iter().map(|r| r.id).collect::<Vec<_>>());
                    let _ = done.send(ids);
                });
                let ids = read
                    .recv_timeout(Duration::from_secs(30))
                    .expect("a read finishes while a write is open")
                    .expect("read");
                assert_eq!(ids, ["vpc-1"], "the read sees the last commit, not the open write");
                Ok::<_, StoreError>(())
            })
            .expect("write");
        });
    }

    #[test]
    fn a_transaction_inside_a_transaction_of_the_same_store_is_an_error_not_a_deadlock() {
        let store = SqliteStore::open_in_memory().expect("open");
        let nested = write_with(&store, |_| Ok::<_, StoreError>(store.read(&mut |_| Ok(()))));
        let inner = nested.expect("the outer write commits");
        assert!(matches!(&inner, Err(StoreError::Backend(m)) if m.contains("inside another transaction")), "{inner:?}");
        let revision = read_with(&store, |_| Ok::<_, StoreError>(store.revision()));
        assert!(revision.expect("outer read").is_err(), "revision inside a read of an in-memory store");
        // The guard is per store and released afterwards.
        let other = SqliteStore::open_in_memory().expect("open");
        write_with(&store, |_| other.write(&mut |tx| tx.insert(&record("vpc", "x")))).expect("two stores");
        write_with(&store, |tx| tx.insert(&record("vpc", "y"))).expect("the guard was released");
    }

    #[test]
    fn write_transactions_of_two_stores_on_one_file_serialize() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shared.db");
        let first = SqliteStore::open(&path).expect("open first");
        let second = SqliteStore::open(&path).expect("open second");
        write_with(&first, |tx| tx.insert(&Record { body: json!({"n": 0}).to_string(), ..record("counter", "c") }))
            .expect("create counter");
        std::thread::scope(|scope| {
            for store in [&first, &second] {
                scope.spawn(move || {
                    for _ in 0..25 {
                        write_with(store, |tx| {
                            let current = tx.get("counter", "c")?.expect("counter");
                            let n = current.json()["n"].as_u64().expect("n");
                            tx.update(&Record { body: json!({"n": n + 1}).to_string(), ..current })
                        })
                        .expect("increment");
                    }
                });
            }
        });
        let c = read_with(&second, |tx| tx.get("counter", "c")).expect("read").expect("counter");
        assert_eq!(c.json()["n"], 50);
        assert_eq!(first.revision().expect("revision"), 51);
    }
}
