//! Domain verifications (`/v1/domainverifications`): an account asks to
//! verify a domain and gets the TXT record to publish; the verifier
//! (`crate::domain_verification`) moves it to VERIFIED or
//! VERIFICATION_TIMED_OUT. Private to the account; one verification per
//! domain and account; at most [`MAX_PER_ACCOUNT`] per account.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use trellis_api::domains::{self, CreateDomainVerification};
use trellis_model::{DomainVerification, DomainVerificationId, validate_verification_domain};
use trellis_store::{Filter, TxExt};

use super::idempotency::create_once;
use super::{ClientToken, Json, PathId, Routes, created, get_owned, path_id};
use crate::auth::AccountAuth;
use crate::error::ApiError;
use crate::state::{AppState, now, seed};

/// Verifications one account may hold (each costs periodic DNS lookups).
pub const MAX_PER_ACCOUNT: usize = 100;

pub fn routes() -> Routes {
    Routes::new()
        .at(&domains::CREATE, create)
        .at(&domains::LIST, super::list_owned::<DomainVerification>)
        .at(&domains::GET, super::read_owned::<DomainVerification>)
        .at(&domains::DELETE, delete)
}

async fn create(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    Json(body): Json<CreateDomainVerification>,
) -> Result<Response, ApiError> {
    let domain = validate_verification_domain(&body.domain_name)
        .map_err(|e| ApiError::invalid("ValidationError", format!("domainName: {e}")))?;
    let token = ClientToken::new(me.id.as_str(), "domainverifications", body.client_token.as_deref(), &body)?;
    let (id, value_seed, now, region) =
        (DomainVerificationId::generate(&seed()?), seed()?, now(), st.region().to_string());
    let outcome = st
        .write(move |tx| {
            create_once(tx, token.as_ref(), now, |tx| {
                let mine = Filter { account_id: Some(me.id.as_str()), ..Filter::default() };
                let existing =
                    tx.list_obj::<DomainVerification>(&Filter { reference: Some(&domain), ..mine.clone() })?;
                if let Some(v) = existing.iter().find(|v| v.domain_name == domain) {
                    return Err(ApiError::conflict(
                        "AlreadyExists",
                        format!(
                            "this account already verifies {domain} ({}, {}); use it, or delete it first to start over",
                            v.id, v.status
                        ),
                    ));
                }
                let count = tx.list(<DomainVerification as trellis_store::Object>::KIND, &mine)?.len();
                if count >= MAX_PER_ACCOUNT {
                    return Err(ApiError::conflict(
                        "LimitExceeded",
                        format!(
                            "this account has {count} domain verifications, the most it may have; delete ones it no \
                             longer needs (DELETE /v1/domainverifications/{{id}})"
                        ),
                    ));
                }
                let v = DomainVerification::new(id.clone(), me.id.clone(), domain.clone(), &value_seed, &region, now);
                tx.insert_obj(&v)?;
                Ok(v)
            })
        })
        .await?;
    // The verifier checks a new verification at once.
    st.domain_checks.notify_one();
    Ok(created(outcome))
}

async fn delete(
    State(st): State<AppState>,
    AccountAuth(me): AccountAuth,
    PathId(raw): PathId,
) -> Result<StatusCode, ApiError> {
    let id: DomainVerificationId = path_id(&raw)?;
    st.write(move |tx| {
        let v = get_owned::<DomainVerification>(tx, &me.id, id.as_str(), "domain verification")?;
        tx.delete_obj::<DomainVerification>(v.id.as_str())?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

impl super::Owned for DomainVerification {
    type Id = DomainVerificationId;
    const WHAT: &'static str = "domain verification";
}
