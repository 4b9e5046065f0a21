//! The conformance suite: the behaviour every [`Store`] implementation must
//! have, as one set of cases run against each of them. The control plane
//! relies on exactly these properties, so an implementation that passes them
//! can replace another without the control plane noticing.
//!
//! Run it from a test with a factory that returns a store on an *empty*
//! database on every call (cases do not clean up after themselves):
//!
//! ```no_run
//! # use trellis_store::{Store, sqlite::SqliteStore, conformance};
//! conformance::run_all(&|| Box::new(SqliteStore::open_in_memory().unwrap()) as Box<dyn Store>);
//! ```
//!
//! The suite panics on the first failed assertion of each case, runs every
//! case, and then panics naming all the cases that failed.
//!
//! # What a PostgreSQL implementation must do to pass
//!
//! - **Writes**: run each `write` as a `SERIALIZABLE` read-write transaction
//!   and, when it fails with SQLSTATE `40001` (serialization failure) or
//!   `40P01` (deadlock detected), roll back and run the closure again from the
//!   start, a bounded number of times with a jittered back-off. This is why the
//!   closure of [`Store::write`] and [`crate::write_with`] is `FnMut` and must
//!   have no effect outside the transaction. Concurrent read-modify-write
//!   transactions must then lose no update (see
//!   [`concurrent_writers_lose_no_update`]).
//! - **Reads**: run each `read` as one `REPEATABLE READ READ ONLY` (or
//!   `SERIALIZABLE READ ONLY DEFERRABLE`) transaction, so every statement of the
//!   closure sees the same snapshot, and a write attempted in it fails.
//! - **Conflicts**: insert with `INSERT … ON CONFLICT DO NOTHING` and report
//!   [`StoreError::Conflict`] when no row was inserted. A unique violation would
//!   abort the whole transaction, and callers handle a conflict and go on in
//!   the same transaction (idempotent creates with a client token do).
//!   Likewise `update` reports [`StoreError::NotFound`] from a zero row count.
//! - **Order**: `list` orders by `id COLLATE "C"` (byte order, which is SQLite's
//!   `BINARY`, and Rust's `str` order), never by a locale.
//! - **Revision**: keep it in a row updated in the same transaction, only when
//!   the transaction inserted, updated or deleted a record; a transaction that
//!   rolls back (closure error, panic, failed commit) leaves it unchanged.
//! - **References**: `refs` come back exactly as written, in order (a `text[]`
//!   column), and are indexed for [`Filter::reference`] (a side table with an
//!   index on `(kind, ref)`, or a GIN index on the array); a record whose
//!   `refs` name an id twice is listed once.
//! - **Factory**: give each call of the factory its own empty schema or
//!   database, so cases can run side by side.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{Filter, Object, Record, Store, StoreError, TxExt, read_with, write_with};

/// Makes a store on an empty database.
pub type MakeStore<'a> = &'a dyn Fn() -> Box<dyn Store>;

/// One case of the suite: panics when the store does not behave.
pub type Case = fn(MakeStore<'_>);

/// Every case of the suite, by name.
pub const CASES: &[(&str, Case)] = &[
    ("records_round_trip_through_insert_get_update_delete", records_round_trip_through_insert_get_update_delete),
    ("bodies_and_ids_round_trip_exactly", bodies_and_ids_round_trip_exactly),
    ("a_write_sees_its_own_changes", a_write_sees_its_own_changes),
    (
        "insert_of_an_existing_record_conflicts_and_the_write_goes_on",
        insert_of_an_existing_record_conflicts_and_the_write_goes_on,
    ),
    (
        "update_of_a_missing_record_is_not_found_and_creates_nothing",
        update_of_a_missing_record_is_not_found_and_creates_nothing,
    ),
    ("kinds_are_separate_namespaces", kinds_are_separate_namespaces),
    ("list_filters_by_account_by_reference_and_by_both", list_filters_by_account_by_reference_and_by_both),
    ("list_is_ordered_by_id", list_is_ordered_by_id),
    ("lists_page_by_cursor_and_limit_under_every_filter", lists_page_by_cursor_and_limit_under_every_filter),
    ("a_transaction_sees_the_revision_it_started_from", a_transaction_sees_the_revision_it_started_from),
    ("update_replaces_account_and_references", update_replaces_account_and_references),
    ("deleted_records_leave_no_references_behind", deleted_records_leave_no_references_behind),
    (
        "failed_write_rolls_back_everything_and_returns_the_callers_error",
        failed_write_rolls_back_everything_and_returns_the_callers_error,
    ),
    ("panicking_write_rolls_back_and_the_store_stays_usable", panicking_write_rolls_back_and_the_store_stays_usable),
    (
        "revision_moves_once_per_committed_write_that_changed_something",
        revision_moves_once_per_committed_write_that_changed_something,
    ),
    ("writes_inside_a_read_are_refused", writes_inside_a_read_are_refused),
    ("a_read_sees_one_snapshot_while_a_write_commits", a_read_sees_one_snapshot_while_a_write_commits),
    ("reads_never_see_half_of_a_write", reads_never_see_half_of_a_write),
    ("typed_objects_round_trip", typed_objects_round_trip),
    ("concurrent_writers_lose_no_update", concurrent_writers_lose_no_update),
];

/// Runs every case of [`CASES`] against stores made by `make`, and panics
/// naming the cases that failed.
pub fn run_all(make: MakeStore<'_>) {
    let failed: Vec<&str> = CASES
        .iter()
        .filter(|(_, case)| catch_unwind(AssertUnwindSafe(|| case(make))).is_err())
        .map(|(name, _)| *name)
        .collect();
    assert!(failed.is_empty(), "store conformance failed in {} case(s): {}", failed.len(), failed.join(", "));
}

/// How long a read waits for a concurrent write to commit. A store whose
/// writes wait for reads to finish (SQLite in memory) costs this once; one
/// whose writes go on beside reads commits well within it.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(2);

fn record(kind: &str, id: &str, account_id: &str, refs: &[&str], body: Value) -> Record {
    Record {
        kind: kind.into(),
        id: id.into(),
        account_id: account_id.into(),
        refs: refs.iter().map(|r| r.to_string()).collect(),
        body: body.to_string(),
    }
}

fn insert_all(store: &dyn Store, records: &[Record]) {
    write_with(store, |tx| records.iter().try_for_each(|r| tx.insert(r)))
        .unwrap_or_else(|e: StoreError| panic!("inserting {} records failed: {e}", records.len()));
}

fn get(store: &dyn Store, kind: &str, id: &str) -> Option<Record> {
    read_with(store, |tx| tx.get(kind, id)).unwrap_or_else(|e: StoreError| panic!("get {kind} {id} failed: {e}"))
}

fn list(store: &dyn Store, kind: &str, filter: &Filter<'_>) -> Vec<Record> {
    read_with(store, |tx| tx.list(kind, filter))
        .unwrap_or_else(|e: StoreError| panic!("list {kind} {filter:?} failed: {e}"))
}

fn list_ids(store: &dyn Store, kind: &str, filter: &Filter<'_>) -> Vec<String> {
    list(store, kind, filter).into_iter().map(|r| r.id).collect()
}

fn revision(store: &dyn Store) -> u64 {
    store.revision().unwrap_or_else(|e| panic!("revision failed: {e}"))
}

fn counter(r: &Record) -> u64 {
    r.json()["n"].as_u64().unwrap_or_else(|| panic!("{} {} has no counter: {}", r.kind, r.id, r.body))
}

fn all() -> Filter<'static> {
    Filter::default()
}

fn by_account(account_id: &str) -> Filter<'_> {
    Filter::account(account_id)
}

fn by_ref(reference: &str) -> Filter<'_> {
    Filter::reference(reference)
}

pub fn records_round_trip_through_insert_get_update_delete(make: MakeStore<'_>) {
    let store = make();
    let store = &*store;
    assert_eq!(get(store, "vpc", "vpc-1"), None, "a fresh store holds nothing");

    let first = record("vpc", "vpc-1", "acct-1", &["x", "y"], json!({"name": "prod", "tags": {"env": "prod"}}));
    insert_all(store, std::slice::from_ref(&first));
    assert_eq!(get(store, "vpc", "vpc-1"), Some(first));

    let second = record("vpc", "vpc-1", "acct-2", &["z"], json!({"name": "renamed", "ports": [1, 2]}));
    write_with(store, |tx| tx.update(&second)).expect("update of an existing record");
    assert_eq!(get(store, "vpc", "vpc-1"), Some(second), "update replaces body, account and refs");

    let deleted = write_with(store, |tx| tx.delete("vpc", "vpc-1")).expect("delete");
    assert!(deleted, "delete of an existing record reports true");
    assert_eq!(get(store, "vpc", "vpc-1"), None);
    let deleted = write_with(store, |tx| tx.delete("vpc", "vpc-1")).expect("delete of a missing record");
    assert!(!deleted, "delete of a missing record reports false");
}

pub fn bodies_and_ids_round_trip_exactly(make: MakeStore<'_>) {
    let store = make();
    let store = &*store;
    let body = json!({
        "text": "h\u{e9}llo \u{1f310} \"quoted\" \\ back\nslash",
        "big": u64::MAX,
        "negative": i64::MIN,
        "float": 1.5,
        "null": null,
        "empty": {},
        "list": [[], [1, "two", {"three": 3}]],
    });
    let records = [
        record("weird", "a'b\"c%_;--", "", &[], body.clone()),
        record("weird", "\u{e9}t\u{e9}", "acct-\u{1f310}", &["r'1", "r%2"], Value::Null),
        record("weird", "plain", "acct-1", &["z", "a", "m"], json!("just a string")),
    ];
    insert_all(store, &records);
    for r in &records {
        assert_eq!(get(store, &r.kind, &r.id).as_ref(), Some(r), "{} must round-trip exactly", r.id);
    }
    assert_eq!(list_ids(store, "weird", &by_ref("r%2")), ["\u{e9}t\u{e9}"], "references match literally");
    assert_eq!(list_ids(store, "weird", &by_ref("r_2")), Vec::<String>::new(), "no pattern matching");
    assert_eq!(list_ids(store, "weird", &by_account("")), ["a'b\"c%_;--"], "an empty account is a value");
}

pub fn a_write_sees_its_own_changes(make: MakeStore<'_>) {
    let store = make();
    let store = &*store;
    let r = record("subnet", "subnet-1", "acct-1", &["vpc-1"], json!({"v": 1}));
    write_with(store, |tx| {
        tx.insert(&r)?;
        assert_eq!(tx.get("subnet", "subnet-1")?.as_ref(), Some(&r), "get sees the insert");
        assert_eq!(tx.list("subnet", &by_ref("vpc-1"))?.len(), 1, "list sees the insert's references");
        let changed = Record { body: json!({"v": 2}).to_string(), refs: vec![], ..r.clone() };
        tx.update(&changed)?;
        assert_eq!(tx.get("subnet", "subnet-1")?, Some(changed), "get sees the update");
        assert!(tx.list("subnet", &by_ref("vpc-1"))?.is_empty(), "list sees the update's references");
        assert!(tx.delete("subnet", "subnet-1")?);
        assert_eq!(tx.get("subnet", "subnet-1")?, None, "get sees the delete");
        tx.insert(&r)
    })
    .unwrap_or_else(|e: StoreError| panic!("write failed: {e}"));
    assert_eq!(get(store, "subnet", "subnet-1"), Some(r));
}

pub fn insert_of_an_existing_record_conflicts_and_the_write_goes_on(make: MakeStore<'_>) {
    let store = make();
    let store = &*store;
    let original = record("vpc", "vpc-1", "acct-1", &[], json!({"v": "original"}));
    insert_all(store, std::slice::from_ref(&original));

    let duplicate = record("vpc", "vpc-1", "acct-2", &["r"], json!({"v": "duplicate"}));
    let other = record("vpc", "vpc-2", "acct-1", &[], json!({}));
    write_with(store, |tx| {
        match tx.insert(&duplicate) {
            Err(StoreError::Conflict { kind, id }) => assert_eq!((kind.as_str(), id.as_str()), ("vpc", "vpc-1")),
            other => panic!("insert of an existing record must be Conflict, got {other:?}"),
        }
        tx.insert(&other)
    })
    .unwrap_or_else(|e: StoreError| panic!("a write that handled a Conflict must commit: {e}"));

    assert_eq!(get(store, "vpc", "vpc-1"), Some(original), "a conflicting insert changes nothing");
    assert_eq!(get(store, "vpc", "vpc-2"), Some(other));
    assert!(list(store, "vpc", &by_ref("r")).is_empty(), "a conflicting insert indexes nothing");
}

pub fn update_of_a_missing_record_is_not_found_and_creates_nothing(make: MakeStore<'_>) {
    let store = make();
    let store = &*store;
    let missing = record("vpc", "vpc-404", "acct-1", &["r"], json!({}));
    let other = record("vpc", "vpc-2", "acct-1", &[], json!({}));
    write_with(store, |tx| {
        match tx.update(&missing) {
            Err(StoreError::NotFound { kind, id }) => assert_eq!((kind.as_str(), id.as_str()), ("vpc", "vpc-404")),
            other => panic!("update of a missing record must be NotFound, got {other:?}"),
        }
        tx.insert(&other)
    })
    .unwrap_or_else(|e: StoreError| panic!("a write that handled a NotFound must commit: {e}"));

    assert_eq!(get(store, "vpc", "vpc-404"), None, "update never creates");
    assert_eq!(list_ids(store, "vpc", &all()), ["vpc-2"]);
    assert!(list(store, "vpc", &by_ref("r")).is_empty());
}

pub fn kinds_are_separate_namespaces(make: MakeStore<'_>) {
    let store = make();
    let store = &*store;
    let vpc = record("vpc", "same", "acct-1", &["r"], json!({"kind": "vpc"}));
    let subnet = record("subnet", "same", "acct-1", &[], json!({"kind": "subnet"}));
    insert_all(store, &[vpc.clone(), subnet.clone()]);
    assert_eq!(get(store, "vpc", "same"), Some(vpc.clone()));
    assert_eq!(get(store, "subnet", "same"), Some(subnet.clone()));
    assert_eq!(list(store, "vpc", &all()), std::slice::from_ref(&vpc));
    assert!(list(store, "subnet", &by_ref("r")).is_empty(), "references are per kind");

    write_with(store, |tx| tx.delete("subnet", "same")).expect("delete");
    assert_eq!(get(store, "vpc", "same"), Some(vpc), "deleting one kind leaves the other");
    assert_eq!(list_ids(store, "vpc", &by_ref("r")), ["same"]);
}

pub fn list_filters_by_account_by_reference_and_by_both(make: MakeStore<'_>) {
    let store = make();
    let store = &*store;
    let records = [
        record("rcfg", "a1", "acct-1", &["g1"], json!({"n": 1})),
        record("rcfg", "a2", "acct-1", &["g2"], json!({"n": 2})),
        record("rcfg", "a3", "acct-2", &["g1", "g2"], json!({"n": 3})),
        record("rcfg", "a4", "acct-2", &[], json!({"n": 4})),
        record("rcfg", "a5", "", &["g1", "g1"], json!({"n": 5})),
        record("other", "b1", "acct-1", &["g1"], json!({})),
    ];
    insert_all(store, &records);

    assert_eq!(list(store, "rcfg", &all()), &records[..5], "no filter lists the whole kind, complete records");
    assert_eq!(list_ids(store, "rcfg", &by_account("acct-1")), ["a1", "a2"]);
    assert_eq!(list_ids(store, "rcfg", &by_account("acct-2")), ["a3", "a4"]);
    assert_eq!(list_ids(store, "rcfg", &by_account("")), ["a5"], "global records have the empty account");
    assert_eq!(list_ids(store, "rcfg", &by_account("acct-3")), Vec::<String>::new());
    assert_eq!(list_ids(store, "rcfg", &by_ref("g1")), ["a1", "a3", "a5"], "a reference named twice lists once");
    assert_eq!(list_ids(store, "rcfg", &by_ref("g2")), ["a2", "a3"]);
    assert_eq!(list_ids(store, "rcfg", &by_ref("g3")), Vec::<String>::new());
    let both = |account_id, reference| Filter::account_and_reference(account_id, reference);
    assert_eq!(list_ids(store, "rcfg", &both("acct-1", "g1")), ["a1"]);
    assert_eq!(list_ids(store, "rcfg", &both("acct-2", "g2")), ["a3"]);
    assert_eq!(list_ids(store, "rcfg", &both("acct-2", "g3")), Vec::<String>::new());
    assert_eq!(
        list(store, "rcfg", &both("acct-2", "g1")),
        [records[2].clone()],
        "filtered lists return complete records"
    );
    assert_eq!(list_ids(store, "missing-kind", &all()), Vec::<String>::new());
}

pub fn list_is_ordered_by_id(make: MakeStore<'_>) {
    let store = make();
    let store = &*store;
    let ids = ["b", "a10", "B", "a", "a9", "_", "\u{e9}", "a-1", "Z", "0"];
    let records: Vec<Record> = ids.iter().map(|id| record("rgw", id, "acct-1", &["gw"], json!({}))).collect();
    insert_all(store, &records);
    let mut expected: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    expected.sort(); // byte order, not a locale's
    assert_eq!(list_ids(store, "rgw", &all()), expected);
    assert_eq!(list_ids(store, "rgw", &by_account("acct-1")), expected);
    assert_eq!(list_ids(store, "rgw", &by_ref("gw")), expected);
}

pub fn lists_page_by_cursor_and_limit_under_every_filter(make: MakeStore<'_>) {
    let store = make();
    let store = &*store;
    let records: Vec<Record> = (0..10)
        .map(|i| {
            let account = if i % 2 == 0 { "acct-even" } else { "acct-odd" };
            let refs: &[&str] = if i < 7 { &["g", "h"] } else { &["h"] };
            record("ep", &format!("e{i}"), account, refs, json!({"n": i}))
        })
        .collect();
    insert_all(store, &records);
    insert_all(store, &[record("other", "e5", "acct-odd", &["g"], json!({}))]);
    let filters = [all(), by_account("acct-odd"), by_ref("g"), Filter::account_and_reference("acct-even", "g")];
    for filter in filters {
        let whole = list_ids(store, "ep", &filter);
        for limit in 1..=4 {
            let mut pages = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let page = list_ids(store, "ep", &filter.clone().page(cursor.as_deref(), limit));
                assert!(page.len() <= limit, "a page holds at most the limit: {page:?}");
                if page.is_empty() {
                    break;
                }
                cursor = page.last().cloned();
                pages.extend(page);
            }
            assert_eq!(pages, whole, "paging by {limit} under {filter:?} walks the list once, in order");
        }
    }
    assert_eq!(list_ids(store, "ep", &all().page(Some("e8"), 100)), ["e9"], "the cursor itself is excluded");
    assert_eq!(list_ids(store, "ep", &all().page(None, 0)), Vec::<String>::new(), "a zero limit lists nothing");
}

pub fn a_transaction_sees_the_revision_it_started_from(make: MakeStore<'_>) {
    let store = make();
    let store = &*store;
    assert_eq!(read_with(store, |tx| tx.revision()).expect("read"), 0);
    insert_all(store, &[record("vpc", "v1", "a", &[], json!({}))]);
    let before = revision(store);
    let inside = write_with(store, |tx| {
        let start = tx.revision()?;
        tx.insert(&record("vpc", "v2", "a", &[], json!({})))?;
        Ok::<_, StoreError>(start)
    })
    .expect("write");
    assert_eq!(inside, before, "a write sees the revision it started from");
    assert_eq!(read_with(store, |tx| tx.revision()).expect("read"), before + 1);
}

pub fn update_replaces_account_and_references(make: MakeStore<'_>) {
    let store = make();
    let store = &*store;
    insert_all(store, &[record("vpce", "e1", "acct-1", &["old", "shared"], json!({}))]);
    let updated = record("vpce", "e1", "acct-2", &["shared", "new"], json!({"v": 2}));
    write_with(store, |tx| tx.update(&updated)).expect("update");

    assert_eq!(get(store, "vpce", "e1"), Some(updated), "refs come back in the new order");
    assert_eq!(list_ids(store, "vpce", &by_ref("old")), Vec::<String>::new(), "a dropped reference no longer matches");
    assert_eq!(list_ids(store, "vpce", &by_ref("new")), ["e1"]);
    assert_eq!(list_ids(store, "vpce", &by_ref("shared")), ["e1"]);
    assert_eq!(list_ids(store, "vpce", &by_account("acct-1")), Vec::<String>::new());
    assert_eq!(list_ids(store, "vpce", &by_account("acct-2")), ["e1"]);
}

pub fn deleted_records_leave_no_references_behind(make: MakeStore<'_>) {
    let store = make();
    let store = &*store;
    insert_all(store, &[record("snra", "s1", "acct-1", &["sn-1"], json!({}))]);
    write_with(store, |tx| tx.delete("snra", "s1")).expect("delete");
    assert_eq!(list_ids(store, "snra", &by_ref("sn-1")), Vec::<String>::new());
    insert_all(store, &[record("snra", "s1", "acct-1", &[], json!({}))]);
    assert_eq!(list_ids(store, "snra", &by_ref("sn-1")), Vec::<String>::new(), "a recreated record starts clean");
}

#[derive(Debug, PartialEq)]
enum CallerError {
    Refused(&'static str),
    Store(String),
}

impl From<StoreError> for CallerError {
    fn from(e: StoreError) -> Self {
        CallerError::Store(e.to_string())
    }
}

pub fn failed_write_rolls_back_everything_and_returns_the_callers_error(make: MakeStore<'_>) {
    let store = make();
    let store = &*store;
    let kept = record("rs", "kept", "acct-1", &["p"], json!({"v": "kept"}));
    let doomed = record("rs", "doomed", "acct-1", &[], json!({}));
    insert_all(store, &[kept.clone(), doomed.clone()]);
    let before = revision(store);

    let result: Result<(), CallerError> = write_with(store, |tx| {
        tx.insert(&record("rs", "new", "acct-1", &["p"], json!({})))?;
        tx.update(&record("rs", "kept", "acct-2", &[], json!({"v": "changed"})))?;
        assert!(tx.delete("rs", "doomed")?);
        Err(CallerError::Refused("the caller said no"))
    });
    assert_eq!(result, Err(CallerError::Refused("the caller said no")), "the caller's error comes back as is");
    assert_eq!(list(store, "rs", &all()), [doomed.clone(), kept.clone()], "nothing of the failed write remains");
    assert_eq!(list_ids(store, "rs", &by_ref("p")), ["kept"], "nor of its references");
    assert_eq!(revision(store), before, "a rolled-back write does not move the revision");

    // A store error the closure passes on rolls back just the same.
    let result = store.write(&mut |tx| {
        tx.insert(&record("rs", "new", "acct-1", &[], json!({})))?;
        tx.insert(&kept)
    });
    assert!(matches!(result, Err(StoreError::Conflict { .. })), "the closure's error comes back, got {result:?}");
    assert_eq!(get(store, "rs", "new"), None, "the insert before the failure was rolled back");
    assert_eq!(revision(store), before);
}

pub fn panicking_write_rolls_back_and_the_store_stays_usable(make: MakeStore<'_>) {
    let store = make();
    let store = &*store;
    let before = revision(store);
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        store.write(&mut |tx| {
            tx.insert(&record("agent", "half", "acct-1", &[], json!({})))?;
            panic!("store conformance: a deliberate panic inside a write transaction");
        })
    }));
    assert!(panicked.is_err(), "the panic propagates to the caller");
    assert_eq!(get(store, "agent", "half"), None, "the panicking write left nothing");
    assert_eq!(revision(store), before);

    insert_all(store, &[record("agent", "whole", "acct-1", &[], json!({}))]);
    assert_eq!(list_ids(store, "agent", &all()), ["whole"], "the store takes writes after a panic");
    assert_eq!(revision(store), before + 1);
}

pub fn revision_moves_once_per_committed_write_that_changed_something(make: MakeStore<'_>) {
    let store = make();
    let store = &*store;
    assert_eq!(revision(store), 0, "an empty store is at revision 0");

    let records: Vec<Record> =
        (1..=3).map(|i| record("sn", &format!("sn-{i}"), "acct-1", &[], json!({"i": i}))).collect();
    insert_all(store, &records);
    assert_eq!(revision(store), 1, "one transaction is one revision, however many records it writes");

    write_with(store, |tx| tx.get("sn", "sn-1").map(drop)).expect("write that only reads");
    assert_eq!(revision(store), 1, "a write that only read does not move the revision");

    write_with(store, |tx| {
        assert!(matches!(tx.insert(&records[0]), Err(StoreError::Conflict { .. })));
        assert!(matches!(tx.update(&record("sn", "sn-9", "", &[], json!({}))), Err(StoreError::NotFound { .. })));
        assert!(!tx.delete("sn", "sn-9")?);
        Ok::<_, StoreError>(())
    })
    .expect("write whose every change failed");
    assert_eq!(revision(store), 1, "a write that changed nothing does not move the revision");

    write_with(store, |tx| tx.delete("sn", "sn-3")).expect("delete");
    assert_eq!(revision(store), 2, "a delete moves the revision");
    write_with(store, |tx| tx.update(&record("sn", "sn-2", "acct-1", &[], json!({"i": 20})))).expect("update");
    assert_eq!(revision(store), 3, "an update moves the revision");

    let failed: Result<(), CallerError> = write_with(store, |tx| {
        tx.insert(&record("sn", "sn-4", "acct-1", &[], json!({})))?;
        Err(CallerError::Refused("roll back"))
    });
    assert!(failed.is_err());
    assert_eq!(revision(store), 3, "a rolled-back write does not move the revision");

    read_with(store, |tx| tx.list("sn", &all())).expect("read");
    assert_eq!(revision(store), 3, "a read does not move the revision");
}

pub fn writes_inside_a_read_are_refused(make: MakeStore<'_>) {
    let store = make();
    let store = &*store;
    let existing = record("org", "o-1", "", &[], json!({"v": 1}));
    insert_all(store, std::slice::from_ref(&existing));
    let before = revision(store);

    let insert = read_with(store, |tx| tx.insert(&record("org", "o-2", "", &[], json!({}))));
    assert!(insert.is_err(), "insert inside a read must fail");
    let update = read_with(store, |tx| tx.update(&record("org", "o-1", "", &[], json!({"v": 2}))));
    assert!(update.is_err(), "update inside a read must fail");
    let delete = read_with(store, |tx| tx.delete("org", "o-1"));
    assert!(delete.is_err(), "delete inside a read must fail, got {delete:?}");

    assert_eq!(list(store, "org", &all()), [existing], "a read changes nothing");
    assert_eq!(revision(store), before);
}

pub fn a_read_sees_one_snapshot_while_a_write_commits(make: MakeStore<'_>) {
    let store = make();
    let store = &*store;
    let pair = |n: u64| [record("pair", "a", "", &[], json!({"n": n})), record("pair", "b", "", &[], json!({"n": n}))];
    insert_all(store, &pair(0));

    std::thread::scope(|scope| {
        let mut writer = None;
        let (committed_tx, committed_rx) = mpsc::channel();
        read_with(store, |tx| {
            let a = tx.get("pair", "a")?.expect("pair a exists");
            assert_eq!(counter(&a), 0);
            // Commit a write that changes both records while this read is open.
            if writer.is_none() {
                let committed_tx = committed_tx.clone();
                writer = Some(scope.spawn(move || {
                    let result = write_with(store, |tx| pair(1).iter().try_for_each(|r| tx.update(r)));
                    let _ = committed_tx.send(());
                    result
                }));
            }
            // Either the write commits beside this read, or the store makes it
            // wait for the read; both are consistent, and the read must not
            // see the write in either case.
            let _ = committed_rx.recv_timeout(SNAPSHOT_WAIT);
            let b = tx.get("pair", "b")?.expect("pair b exists");
            assert_eq!(counter(&b), 0, "a read must not see a write that committed after it started");
            let listed: Vec<u64> = tx.list("pair", &all())?.iter().map(counter).collect();
            assert_eq!(listed, [0, 0], "every statement of a read sees the same snapshot");
            let a = tx.get("pair", "a")?.expect("pair a exists");
            assert_eq!(counter(&a), 0, "a repeated get sees the same snapshot");
            Ok::<_, StoreError>(())
        })
        .expect("read");
        let writer = writer.expect("the read ran");
        writer.join().expect("writer thread").expect("the concurrent write commits");
    });
    assert_eq!(list(store, "pair", &all()), pair(1), "the next read sees the write");
}

pub fn reads_never_see_half_of_a_write(make: MakeStore<'_>) {
    const WRITES: u64 = 100;
    let store = make();
    let store = &*store;
    let pair = |n: u64| [record("pair", "a", "", &[], json!({"n": n})), record("pair", "b", "", &[], json!({"n": n}))];
    insert_all(store, &pair(0));
    let writing = AtomicBool::new(true);

    std::thread::scope(|scope| {
        scope.spawn(|| {
            // Ends the reads below even when a write fails and panics.
            let _stop = StopOnDrop(&writing);
            for n in 1..=WRITES {
                write_with(store, |tx| pair(n).iter().try_for_each(|r| tx.update(r)))
                    .unwrap_or_else(|e: StoreError| panic!("write {n} failed: {e}"));
            }
        });
        let mut last = 0;
        let mut check = || {
            let (a, b) = read_with(store, |tx| {
                let a = tx.get("pair", "a")?.expect("pair a exists");
                let b = tx.get("pair", "b")?.expect("pair b exists");
                Ok::<_, StoreError>((counter(&a), counter(&b)))
            })
            .expect("read");
            assert_eq!(a, b, "a read saw half of a write");
            assert!(a >= last, "reads went back in time: {a} after {last}");
            last = a;
        };
        while writing.load(Ordering::Acquire) {
            check();
        }
        check();
        assert_eq!(last, WRITES, "the last read sees the last write");
    });
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A typed object for the [`TxExt`] cases.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Widget {
    id: String,
    account_id: String,
    gateway_id: Option<String>,
    ports: Vec<u16>,
}

impl Object for Widget {
    const KIND: &'static str = "conformance-widget";
    fn id(&self) -> &str {
        &self.id
    }
    fn account_id(&self) -> &str {
        &self.account_id
    }
    fn refs(&self) -> Vec<String> {
        self.gateway_id.iter().cloned().collect()
    }
}

pub fn typed_objects_round_trip(make: MakeStore<'_>) {
    let store = make();
    let store = &*store;
    let widget = |id: &str, gateway: Option<&str>| Widget {
        id: id.into(),
        account_id: "acct-1".into(),
        gateway_id: gateway.map(Into::into),
        ports: vec![443, 5432],
    };
    let w1 = widget("w1", Some("rgw-1"));
    let w2 = widget("w2", None);

    let created: String = write_with(store, |tx| {
        tx.insert_obj(&w1)?;
        tx.insert_obj(&w2)?;
        Ok::<_, StoreError>(w1.id.clone())
    })
    .expect("insert objects");
    assert_eq!(created, "w1", "write_with returns the closure's value");

    let stored = get(store, Widget::KIND, "w1").expect("stored as a record of the object's kind");
    assert_eq!((stored.account_id.as_str(), stored.refs.as_slice()), ("acct-1", &["rgw-1".to_string()][..]));
    assert_eq!(stored.json()["gatewayId"], "rgw-1", "the body is the object's serde form");

    let (one, listed, by_gateway) = read_with(store, |tx| {
        Ok::<_, StoreError>((
            tx.get_obj::<Widget>("w1")?,
            tx.list_obj::<Widget>(&by_account("acct-1"))?,
            tx.list_obj::<Widget>(&by_ref("rgw-1"))?,
        ))
    })
    .expect("read objects");
    assert_eq!(one, Some(w1.clone()));
    assert_eq!(listed, [w1.clone(), w2.clone()]);
    assert_eq!(by_gateway, std::slice::from_ref(&w1), "refs() is indexed");

    let moved = widget("w1", Some("rgw-2"));
    write_with(store, |tx| tx.update_obj(&moved)).expect("update object");
    let by_gateway = read_with(store, |tx| tx.list_obj::<Widget>(&by_ref("rgw-2"))).expect("list");
    assert_eq!(by_gateway, std::slice::from_ref(&moved));

    let again = write_with(store, |tx| tx.insert_obj(&w2));
    assert!(matches!(again, Err(StoreError::Conflict { .. })), "insert_obj of an existing id, got {again:?}");
    let missing = write_with(store, |tx| tx.update_obj(&widget("w9", None)));
    assert!(matches!(missing, Err(StoreError::NotFound { .. })), "update_obj of a missing id, got {missing:?}");

    assert!(write_with(store, |tx| tx.delete_obj::<Widget>("w2")).expect("delete object"));
    assert_eq!(read_with(store, |tx| tx.get_obj::<Widget>("w2")).expect("get"), None);

    insert_all(store, &[record(Widget::KIND, "w3", "acct-1", &[], json!({"unexpected": true}))]);
    match read_with(store, |tx| tx.get_obj::<Widget>("w3")) {
        Err(StoreError::Corrupt { kind, id, .. }) => assert_eq!((kind.as_str(), id.as_str()), (Widget::KIND, "w3")),
        other => panic!("a body that does not decode must be Corrupt, got {other:?}"),
    }
    let listed = read_with(store, |tx| tx.list_obj::<Widget>(&all()));
    assert!(matches!(listed, Err(StoreError::Corrupt { .. })), "list_obj over a corrupt body, got {listed:?}");
}

pub fn concurrent_writers_lose_no_update(make: MakeStore<'_>) {
    const THREADS: u64 = 4;
    const INCREMENTS: u64 = 50;
    let store = make();
    let store = &*store;
    insert_all(store, &[record("counter", "c", "", &[], json!({"n": 0}))]);
    let before = revision(store);

    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            scope.spawn(move || {
                for i in 0..INCREMENTS {
                    write_with(store, |tx| {
                        let current = tx.get("counter", "c")?.expect("the counter exists");
                        let next = Record { body: json!({"n": counter(&current) + 1}).to_string(), ..current };
                        tx.update(&next)
                    })
                    .unwrap_or_else(|e: StoreError| panic!("thread {thread}, increment {i}: {e}"));
                }
            });
        }
    });

    let total = counter(&get(store, "counter", "c").expect("the counter exists"));
    assert_eq!(total, THREADS * INCREMENTS, "concurrent read-modify-write transactions lost updates");
    assert_eq!(revision(store), before + THREADS * INCREMENTS, "every committed write moved the revision once");
}
