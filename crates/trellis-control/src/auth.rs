//! API keys and the extractors that authenticate a request.
//!
//! Keys are random (`trellis_` + 64 hex), shown once, and stored only as the
//! SHA-256 (hex) of the whole key, as `api-key` records whose id is the hash.
//! The admin key has no account; it manages accounts and organizations only.
//!
//! The admin key's file is written before its hash is committed (both inside
//! one write transaction), so a failed start never leaves a stored admin key
//! that nobody knows; [`reset_admin_key`] replaces a lost one.

use std::path::Path;

use aws_lc_rs::rand::SecureRandom;
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use trellis_model::{Account, AccountId, ApiKey, Timestamp};
use trellis_store::{Filter, Store, StoreError, Tx, TxExt, write_with};

use crate::error::ApiError;
use crate::state::{AppState, now};

const KEY_PREFIX: &str = "trellis_";

/// Lowercase hex SHA-256 of an API key: its id in the store.
pub fn hash_key(key: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.as_bytes()))
}

/// A new random API key.
pub fn generate_key() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ApiError::internal("the system random number generator failed"))?;
    Ok(format!("{KEY_PREFIX}{}", hex::encode(bytes)))
}

/// Stores a new key for `account` (or the admin key for `None`) inside `tx`.
pub fn insert_key(tx: &mut dyn Tx, key: &str, account: Option<&AccountId>, now: Timestamp) -> Result<(), StoreError> {
    tx.insert_obj(&ApiKey { id: hash_key(key), account_id: account.cloned(), created_at: now })
}

/// The stored admin keys (those without an account).
fn admin_keys(tx: &mut dyn Tx) -> Result<Vec<ApiKey>, StoreError> {
    let keys = tx.list_obj::<ApiKey>(&Filter::account(""))?;
    Ok(keys.into_iter().filter(|k| k.account_id.is_none()).collect())
}

/// Creates the admin key when the store has none; returns the key when it was created now.
///
/// For stores without a data directory (tests, embedding); `trellis server`
/// uses [`bootstrap_admin_file`].
pub fn bootstrap_admin(store: &dyn Store) -> Result<Option<String>, ApiError> {
    let key = generate_key()?;
    let created_at = now();
    write_with(store, |tx| {
        if !admin_keys(tx)?.is_empty() {
            return Ok(None);
        }
        insert_key(tx, &key, None, created_at)?;
        Ok(Some(key.clone()))
    })
}

/// Why the admin key could not be created or replaced.
#[derive(Debug, thiserror::Error)]
pub enum AdminKeyError {
    /// The key file could not be written; nothing was stored.
    #[error("cannot write the admin key file: {0}")]
    Write(#[from] crate::pki::PkiError),
    /// The store failed; the key file may hold a key that is not valid.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No random key could be drawn.
    #[error("{0}")]
    Random(ApiError),
}

/// Creates the admin key when the store has none, writing it to `key_file`
/// (mode 0600) before its hash is committed; returns the key when it was
/// created now. Under the store's write lock, so two starts cannot both create one.
pub fn bootstrap_admin_file(store: &dyn Store, key_file: &Path) -> Result<Option<String>, AdminKeyError> {
    let key = generate_key().map_err(AdminKeyError::Random)?;
    let created_at = now();
    write_with(store, |tx| {
        if !admin_keys(tx)?.is_empty() {
            return Ok(None);
        }
        crate::pki::write_secret_file(key_file, format!("{key}\n").as_bytes())?;
        insert_key(tx, &key, None, created_at)?;
        Ok(Some(key.clone()))
    })
}

/// Replaces every admin key with a new one written to `key_file` (mode 0600)
/// before the change is committed; the old admin keys stop working.
pub fn reset_admin_key(store: &dyn Store, key_file: &Path) -> Result<(), AdminKeyError> {
    let key = generate_key().map_err(AdminKeyError::Random)?;
    let created_at = now();
    write_with(store, |tx| {
        for old in admin_keys(tx)? {
            tx.delete_obj::<ApiKey>(&old.id)?;
        }
        crate::pki::write_secret_file(key_file, format!("{key}\n").as_bytes())?;
        insert_key(tx, &key, None, created_at)?;
        Ok(())
    })
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let missing = || ApiError::unauthorized("send the API key as `Authorization: Bearer <key>`");
    let value = parts.headers.get(AUTHORIZATION).ok_or_else(missing)?;
    let text = value.to_str().map_err(|_| missing())?;
    let (scheme, key) = text.split_once(' ').ok_or_else(missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || key.trim().is_empty() {
        return Err(missing());
    }
    Ok(key.trim())
}

/// Resolves the request's key: `None` for the admin key, the account otherwise.
async fn authenticate(parts: &Parts, state: &AppState) -> Result<Option<Account>, ApiError> {
    let hash = hash_key(bearer(parts)?);
    state
        .read(move |tx| {
            let key = tx
                .get_obj::<ApiKey>(&hash)?
                .ok_or_else(|| ApiError::unauthorized("the API key is not valid; ask an administrator for a key"))?;
            match key.account_id {
                None => Ok(None),
                Some(account_id) => match tx.get_obj::<Account>(account_id.as_str())? {
                    Some(account) => Ok(Some(account)),
                    None => Err(ApiError::unauthorized("the API key belongs to an account that no longer exists")),
                },
            }
        })
        .await
}

/// A request made with the admin key.
#[derive(Clone, Copy, Debug)]
pub struct AdminAuth;

impl FromRequestParts<AppState> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        match authenticate(parts, state).await? {
            None => Ok(AdminAuth),
            Some(_) => Err(ApiError::forbidden("this route needs the admin API key")),
        }
    }
}

/// A request made with an account's key.
#[derive(Clone, Debug)]
pub struct AccountAuth(pub Account);

impl FromRequestParts<AppState> for AccountAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        match authenticate(parts, state).await? {
            Some(account) => Ok(AccountAuth(account)),
            None => Err(ApiError::forbidden(
                "this route needs an account's API key; the admin key only manages accounts and organizations",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_store::sqlite::SqliteStore;

    #[test]
    fn bootstrap_creates_the_admin_key_once() {
        let store = SqliteStore::open_in_memory().unwrap();
        let key = bootstrap_admin(&store).unwrap().expect("a key on first start");
        assert!(key.starts_with(KEY_PREFIX) && key.len() == KEY_PREFIX.len() + 64);
        assert_eq!(bootstrap_admin(&store).unwrap(), None);
        let stored: Option<ApiKey> =
            trellis_store::read_with(&store, |tx| tx.get_obj::<ApiKey>(&hash_key(&key))).unwrap();
        assert_eq!(stored.unwrap().account_id, None, "only the hash is stored, as an account-less key");
    }

    fn is_admin(store: &SqliteStore, key: &str) -> bool {
        let stored: Option<ApiKey> =
            trellis_store::read_with(store, |tx| tx.get_obj::<ApiKey>(&hash_key(key))).unwrap();
        stored.is_some_and(|k| k.account_id.is_none())
    }

    #[test]
    fn the_admin_key_file_is_written_before_the_key_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in_memory().unwrap();
        // A key file that cannot be written (a directory stands in its place): nothing is stored.
        let blocked = dir.path().join("admin.key");
        std::fs::create_dir(&blocked).unwrap();
        let err = bootstrap_admin_file(&store, &blocked).unwrap_err();
        assert!(matches!(err, AdminKeyError::Write(_)), "{err}");
        let none = trellis_store::read_with(&store, |tx| admin_keys(tx)).unwrap();
        assert!(none.is_empty(), "no admin key nobody knows");

        // Once the file can be written, the key is created and is the file's.
        std::fs::remove_dir(&blocked).unwrap();
        let key = bootstrap_admin_file(&store, &blocked).unwrap().expect("created now");
        assert_eq!(std::fs::read_to_string(&blocked).unwrap(), format!("{key}\n"));
        assert!(is_admin(&store, &key));
        assert_eq!(bootstrap_admin_file(&store, &blocked).unwrap(), None, "created once");
    }

    #[test]
    fn reset_replaces_the_admin_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin.key");
        let store = SqliteStore::open_in_memory().unwrap();
        let old = bootstrap_admin_file(&store, &file).unwrap().unwrap();
        reset_admin_key(&store, &file).unwrap();
        let new = std::fs::read_to_string(&file).unwrap().trim().to_string();
        assert_ne!(new, old);
        assert!(is_admin(&store, &new), "the new key works");
        assert!(!is_admin(&store, &old), "the old key no longer does");
        let mode = std::fs::metadata(&file).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    }

    #[test]
    fn keys_are_random_and_hashed_as_sha256_hex() {
        assert_ne!(generate_key().unwrap(), generate_key().unwrap());
        assert_eq!(hash_key("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
