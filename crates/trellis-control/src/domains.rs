//! Domains an account proved it owns (domain verification, DESIGN §8), as the
//! config compiler needs them: a custom DNS name is answered in a consumer's
//! VPC only under one of its owner's verified domains (unless the consumer
//! chose otherwise).

use trellis_model::AccountId;
use trellis_store::{Filter, StoreError, Tx};

/// Record kind of domain verifications.
pub const KIND: &str = "domain-verification";

/// The domains `account` verified, lower case.
pub fn verified_domains(tx: &mut dyn Tx, account: &AccountId) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for record in tx.list(KIND, &Filter::account(account.as_str()))? {
        let body = record.json();
        if body["status"] == "VERIFIED"
            && let Some(domain) = body["domainName"].as_str()
        {
            out.push(domain.to_ascii_lowercase());
        }
    }
    Ok(out)
}
