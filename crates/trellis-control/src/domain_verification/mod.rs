//! Domain verification in the control plane (DESIGN §8): the background
//! verifier that looks up the TXT record of every PENDING verification, and
//! [`verified_domain_covering`], the question the config compiler asks before
//! a custom name goes into a consumer's DNS.
//!
//! The verifier never holds a store transaction across a DNS query, bounds
//! how many lookups run at once (in all and per account, so one tenant's
//! names that never resolve cannot starve the others), and gives every query
//! a deadline. The API routes are in `api::domains`.

pub mod lookup;
mod verifier;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use trellis_model::{AccountId, DomainVerification, DomainVerificationStatus, covers};
use trellis_store::{Filter, StoreError, Tx, TxExt};

pub use verifier::run;

/// How the verifier looks records up and how long it keeps trying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerificationSettings {
    /// The recursive resolver to ask (`trellis server --dns-resolver`); `None`:
    /// the first nameserver of /etc/resolv.conf.
    pub resolver: Option<SocketAddr>,
    /// Wait after the first unsuccessful check; each later wait doubles.
    pub first_retry: Duration,
    /// Longest wait between two checks.
    pub max_retry: Duration,
    /// A verification still PENDING this long after its creation times out.
    pub timeout: Duration,
    /// Deadline of one lookup (UDP and, when truncated, TCP).
    pub query_timeout: Duration,
    /// Lookups in flight at once, over all accounts.
    pub max_lookups: usize,
    /// Lookups in flight at once for one account.
    pub max_lookups_per_account: usize,
}

impl Default for VerificationSettings {
    fn default() -> Self {
        Self {
            resolver: None,
            first_retry: Duration::from_secs(30),
            max_retry: Duration::from_secs(30 * 60),
            // As VPC Lattice: 72 hours to publish the record.
            timeout: Duration::from_secs(72 * 3600),
            query_timeout: Duration::from_secs(5),
            max_lookups: 16,
            max_lookups_per_account: 2,
        }
    }
}

impl VerificationSettings {
    /// Checks the settings; the error names the setting and what to change.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("first retry", self.first_retry),
            ("max retry", self.max_retry),
            ("verification timeout", self.timeout),
            ("DNS query timeout", self.query_timeout),
        ];
        if let Some((what, _)) = positive.iter().find(|(_, d)| d.is_zero()) {
            return Err(format!("the domain verification {what} must be greater than zero"));
        }
        if self.max_retry < self.first_retry {
            return Err("the domain verification max retry must not be shorter than the first retry".into());
        }
        if self.max_lookups == 0 || self.max_lookups_per_account == 0 {
            return Err("domain verification needs at least one DNS lookup at a time (in all and per account)".into());
        }
        if let Some(resolver) = self.resolver
            && (resolver.port() == 0 || resolver.ip().is_unspecified())
        {
            return Err(format!(
                "--dns-resolver {resolver} is not a resolver address; write IP:PORT, e.g. 10.0.0.2:53"
            ));
        }
        Ok(())
    }
}

/// The most specific VERIFIED domain of `account` that covers `name`, if any.
///
/// The config compiler asks this before it puts a custom name (a resource
/// configuration's `customDomainName`, an endpoint service's `privateDnsName`)
/// into a consumer's DNS. Reads only `account`'s verifications.
/// Every domain `account` verified (lower case), for callers that check many names.
pub fn verified_domains(tx: &mut dyn Tx, account: &AccountId) -> Result<Vec<String>, StoreError> {
    Ok(tx
        .list_obj::<DomainVerification>(&Filter::account(account.as_str()))?
        .into_iter()
        .filter(|v| v.status == DomainVerificationStatus::Verified)
        .map(|v| v.domain_name.to_ascii_lowercase())
        .collect())
}

pub fn verified_domain_covering(
    tx: &mut dyn Tx,
    account: &AccountId,
    name: &str,
) -> Result<Option<String>, StoreError> {
    let mine =
        tx.list_obj::<DomainVerification>(&Filter { account_id: Some(account.as_str()), ..Filter::default() })?;
    Ok(mine
        .into_iter()
        .filter(|v| v.status == DomainVerificationStatus::Verified && covers(&v.domain_name, name))
        .map(|v| v.domain_name)
        .max_by_key(String::len))
}

/// The first usable `nameserver` of /etc/resolv.conf, port 53.
pub fn system_resolver() -> Option<SocketAddr> {
    parse_resolv_conf(&std::fs::read_to_string("/etc/resolv.conf").ok()?)
}

fn parse_resolv_conf(text: &str) -> Option<SocketAddr> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next()? != "nameserver" {
            return None;
        }
        // A scoped IPv6 address (`fe80::1%eth0`) does not parse and is skipped.
        let ip: IpAddr = words.next()?.parse().ok()?;
        Some(SocketAddr::new(ip, 53))
    })
}

#[cfg(test)]
mod tests {
    use trellis_model::{DomainVerificationId, Timestamp};
    use trellis_store::sqlite::SqliteStore;
    use trellis_store::{read_with, write_with};

    use super::*;

    fn verification(n: u8, account: &AccountId, domain: &str, status: DomainVerificationStatus) -> DomainVerification {
        let mut v = DomainVerification::new(
            DomainVerificationId::generate(&[n; 16]),
            account.clone(),
            domain.into(),
            &[n; 16],
            "local",
            Timestamp::from_unix_seconds(1_700_000_000),
        );
        v.status = status;
        v
    }

    #[test]
    fn only_the_accounts_own_verified_domains_cover_a_name() {
        use DomainVerificationStatus::*;
        let store = SqliteStore::open_in_memory().unwrap();
        let me = AccountId::parse("acct-000000000001").unwrap();
        let other = AccountId::parse("acct-000000000002").unwrap();
        write_with(&store, |tx| {
            tx.insert_obj(&verification(1, &me, "example.com", Verified))?;
            tx.insert_obj(&verification(2, &me, "corp.example.com", Verified))?;
            tx.insert_obj(&verification(3, &me, "pending.net", Pending))?;
            tx.insert_obj(&verification(4, &me, "late.net", VerificationTimedOut))?;
            tx.insert_obj(&verification(5, &other, "other.org", Verified))
        })
        .unwrap();
        let ask = |account: &AccountId, name: &str| {
            read_with(&store, |tx| verified_domain_covering(tx, account, name)).unwrap()
        };
        assert_eq!(ask(&me, "db.example.com").as_deref(), Some("example.com"));
        assert_eq!(ask(&me, "DB.Corp.Example.com.").as_deref(), Some("corp.example.com"), "the most specific");
        assert_eq!(ask(&me, "example.com").as_deref(), Some("example.com"));
        assert_eq!(ask(&me, "db.pending.net"), None, "PENDING does not count");
        assert_eq!(ask(&me, "db.late.net"), None, "VERIFICATION_TIMED_OUT does not count");
        assert_eq!(ask(&me, "db.other.org"), None, "another account's domain does not count");
        assert_eq!(ask(&other, "db.other.org").as_deref(), Some("other.org"));
        assert_eq!(ask(&other, "db.example.com"), None);
    }

    #[test]
    fn settings_are_checked() {
        assert_eq!(VerificationSettings::default().validate(), Ok(()));
        let zero = VerificationSettings { query_timeout: Duration::ZERO, ..Default::default() };
        assert!(zero.validate().unwrap_err().contains("DNS query timeout"));
        let inverted = VerificationSettings { max_retry: Duration::from_secs(1), ..Default::default() };
        assert!(inverted.validate().is_err());
        let none = VerificationSettings { max_lookups_per_account: 0, ..Default::default() };
        assert!(none.validate().is_err());
        let port0 = VerificationSettings { resolver: Some("10.0.0.2:0".parse().unwrap()), ..Default::default() };
        assert!(port0.validate().unwrap_err().contains("--dns-resolver"));
    }

    #[test]
    fn resolv_conf_first_usable_nameserver_wins() {
        let text = "# c\nsearch x\nnameserver fe80::1%eth0\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n";
        assert_eq!(parse_resolv_conf(text), Some("10.0.0.2:53".parse().unwrap()));
        assert_eq!(parse_resolv_conf("nameserver ::1\n"), Some("[::1]:53".parse().unwrap()));
        assert_eq!(parse_resolv_conf("search x\n"), None);
    }
}
