//! `clientToken` idempotency: the same scope (account, or the admin), route
//! and token return the object the first call created; a different body
//! with the same token is a 409.
//!
//! Each token is a `client-token` record written in the same transaction as
//! the object it created, so a failed create remembers nothing.

use serde::{Deserialize, Serialize};
use trellis_model::Timestamp;
use trellis_store::{Object, Tx, TxExt};

use crate::error::ApiError;

/// The scope of the admin's tokens.
pub const ADMIN_SCOPE: &str = "admin";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientTokenRecord {
    /// SHA-256 hex of scope, route and token.
    pub id: String,
    /// The account (empty for the admin scope).
    pub account_id: String,
    pub route: String,
    /// SHA-256 hex of the request body.
    pub request_sha256: String,
    /// The id of the object the first call created.
    pub object_id: String,
    pub created_at: Timestamp,
}

impl Object for ClientTokenRecord {
    const KIND: &'static str = "client-token";
    fn id(&self) -> &str {
        &self.id
    }
    fn account_id(&self) -> &str {
        &self.account_id
    }
    fn refs(&self) -> Vec<String> {
        vec![self.object_id.clone()]
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data))
}

/// A create call's token, checked and ready to be looked up or remembered.
#[derive(Clone, Debug)]
pub struct ClientToken {
    record_id: String,
    scope: String,
    route: &'static str,
    request_sha256: String,
}

impl ClientToken {
    /// `None` when the request carries no token. `body` is the whole parsed
    /// request, token included (it is the same on every retry).
    pub fn new<B: Serialize>(
        scope: &str,
        route: &'static str,
        token: Option<&str>,
        body: &B,
    ) -> Result<Option<Self>, ApiError> {
        let Some(token) = token else { return Ok(None) };
        if token.is_empty() || token.len() > 64 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ApiError::invalid(
                "ValidationError",
                "clientToken must be 1-64 printable ASCII characters without spaces",
            ));
        }
        let body = serde_json::to_vec(body).map_err(|e| ApiError::internal(format!("encode request: {e}")))?;
        Ok(Some(Self {
            record_id: sha256_hex(format!("{scope}\0{route}\0{token}").as_bytes()),
            scope: scope.to_string(),
            route,
            request_sha256: sha256_hex(&body),
        }))
    }

    /// The object an earlier call with this token created, if it still exists;
    /// 409 when that call had another body.
    pub fn replay<O: Object>(&self, tx: &mut dyn Tx) -> Result<Option<O>, ApiError> {
        let Some(record) = tx.get_obj::<ClientTokenRecord>(&self.record_id)? else { return Ok(None) };
        if record.request_sha256 != self.request_sha256 {
            return Err(ApiError::conflict(
                "IdempotencyConflict",
                "this clientToken was already used with a different request body; use a new clientToken",
            ));
        }
        Ok(tx.get_obj::<O>(&record.object_id)?)
    }

    /// Remembers that this token created `object_id`.
    pub fn remember(&self, tx: &mut dyn Tx, object_id: &str, now: Timestamp) -> Result<(), ApiError> {
        let record = ClientTokenRecord {
            id: self.record_id.clone(),
            account_id: if self.scope == ADMIN_SCOPE { String::new() } else { self.scope.clone() },
            route: self.route.to_string(),
            request_sha256: self.request_sha256.clone(),
            object_id: object_id.to_string(),
            created_at: now,
        };
        // The token may name an object deleted since: point it at the new one.
        if tx.get_obj::<ClientTokenRecord>(&record.id)?.is_some() {
            tx.update_obj(&record)?;
        } else {
            tx.insert_obj(&record)?;
        }
        Ok(())
    }
}

/// Runs the token check and the create inside one transaction.
pub fn create_once<O: Object>(
    tx: &mut dyn Tx,
    token: Option<&ClientToken>,
    now: Timestamp,
    create: impl FnOnce(&mut dyn Tx) -> Result<O, ApiError>,
) -> Result<Created<O>, ApiError> {
    if let Some(existing) = token.map(|t| t.replay::<O>(tx)).transpose()?.flatten() {
        return Ok(Created::Replayed(existing));
    }
    let object = create(tx)?;
    if let Some(token) = token {
        token.remember(tx, object.id(), now)?;
    }
    Ok(Created::New(object))
}

/// The outcome of a create: a new object (201) or a replay (200).
#[derive(Debug)]
pub enum Created<O> {
    New(O),
    Replayed(O),
}

impl<O> Created<O> {
    pub fn into_inner(self) -> O {
        match self {
            Created::New(o) | Created::Replayed(o) => o,
        }
    }

    pub fn is_new(&self) -> bool {
        matches!(self, Created::New(_))
    }

    pub fn map<P>(self, f: impl FnOnce(O) -> P) -> Created<P> {
        match self {
            Created::New(o) => Created::New(f(o)),
            Created::Replayed(o) => Created::Replayed(f(o)),
        }
    }
}
