//! Domain verification (DESIGN §8, as VPC Lattice's 2025 domain verification):
//! an account proves it controls a domain by publishing a TXT record, and only
//! then may its custom names under that domain be answered in a consumer's DNS.
//!
//! Pure: the TXT record's name and value, the rule "verified domain D covers
//! name N", the rules for domain names, and the status transitions of a
//! [`DomainVerification`]. The control plane does the DNS lookups and passes
//! their outcome and `now` in; nothing here reads a clock or a socket.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::arn::{Arn, kinds};
use crate::ids::{AccountId, DomainVerificationId, Seed};
use crate::time::Timestamp;
use crate::validate::{ValidationError, validate_domain_name};

/// First label of the TXT record name: `_trellis-verification.<domain>`.
pub const TXT_RECORD_LABEL: &str = "_trellis-verification";
/// Start of the TXT record value: `trellis-verification=<random>`.
pub const TXT_VALUE_PREFIX: &str = "trellis-verification=";
/// The zone of the names Trellis generates for endpoints; no custom name may lie in it.
pub const RESERVED_ZONE: &str = "trellis.internal";
/// The last label of an endpoint service name (`trellis.vpce.<region>.vpce-svc-…`) starts so.
const SERVICE_ID_PREFIX: &str = "vpce-svc-";
/// RFC 1035: a name of at most 253 characters (without the trailing dot).
const MAX_NAME_LEN: usize = 253;
/// Longest domain whose TXT record name (`_trellis-verification.` + domain) is still a DNS name.
pub const MAX_VERIFIABLE_DOMAIN_LEN: usize = MAX_NAME_LEN - TXT_RECORD_LABEL.len() - 1;

/// Where a domain verification is (AWS spelling).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DomainVerificationStatus {
    /// The TXT record has not been seen yet; the control plane keeps looking.
    Pending,
    /// The TXT record was seen: the account's custom names under the domain count as verified.
    Verified,
    /// The record was not seen before the deadline; create a new verification to try again.
    VerificationTimedOut,
}

impl fmt::Display for DomainVerificationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pending => "PENDING",
            Self::Verified => "VERIFIED",
            Self::VerificationTimedOut => "VERIFICATION_TIMED_OUT",
        })
    }
}

/// An account's claim on a domain, proven by a TXT record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct DomainVerification {
    pub id: DomainVerificationId,
    pub arn: String,
    pub account_id: AccountId,
    /// Lowercase, without a trailing dot.
    pub domain_name: String,
    pub status: DomainVerificationStatus,
    /// Where to publish the TXT record: `_trellis-verification.<domainName>`.
    pub txt_record_name: String,
    /// What the TXT record must hold: `trellis-verification=<random>`.
    pub txt_record_value: String,
    pub created_at: Timestamp,
    /// When the control plane last looked the record up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checked_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<Timestamp>,
    /// What the last check found, when the domain is not verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
}

/// What one lookup of the TXT record found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckOutcome {
    /// A TXT record at the name holds exactly the expected value.
    Found,
    /// The name has this many TXT records, none with the expected value.
    Mismatch { records: usize },
    /// The name has no TXT record (NXDOMAIN, or an answer without TXT records).
    Missing,
    /// The lookup itself failed (timeout, SERVFAIL, no resolver, …); the text says how.
    Failed(String),
}

impl DomainVerification {
    /// A new PENDING verification of `domain_name` (already validated with
    /// [`validate_verification_domain`]); `value_seed` makes the TXT value.
    pub fn new(
        id: DomainVerificationId,
        account_id: AccountId,
        domain_name: String,
        value_seed: &Seed,
        region: &str,
        now: Timestamp,
    ) -> Self {
        Self {
            arn: Arn::new(kinds::DOMAIN_VERIFICATION, region, account_id.as_str(), id.as_str()).to_string(),
            id,
            account_id,
            txt_record_name: txt_record_name(&domain_name),
            txt_record_value: txt_record_value(value_seed),
            domain_name,
            status: DomainVerificationStatus::Pending,
            created_at: now,
            last_checked_at: None,
            verified_at: None,
            status_reason: None,
        }
    }

    /// When a PENDING verification times out.
    pub fn deadline(&self, timeout: Duration) -> Timestamp {
        self.created_at.plus(timeout)
    }

    /// Records one lookup's outcome; only a PENDING verification changes.
    /// Returns whether the status changed (to VERIFIED).
    pub fn apply_check(&mut self, outcome: &CheckOutcome, now: Timestamp) -> bool {
        if self.status != DomainVerificationStatus::Pending {
            return false;
        }
        self.last_checked_at = Some(now);
        let name = &self.txt_record_name;
        let value = &self.txt_record_value;
        self.status_reason = Some(match outcome {
            CheckOutcome::Found => {
                self.status = DomainVerificationStatus::Verified;
                self.verified_at = Some(now);
                self.status_reason = None;
                return true;
            }
            CheckOutcome::Mismatch { records } => format!(
                "found {records} TXT record(s) at {name}, none with the value {value:?}; publish a TXT record with exactly that value"
            ),
            CheckOutcome::Missing => {
                format!("no TXT record at {name} yet; publish a TXT record there with the value {value:?}")
            }
            CheckOutcome::Failed(why) => format!("looking up the TXT record at {name} failed: {why}; will retry"),
        });
        false
    }

    /// Moves a PENDING verification past its deadline to VERIFICATION_TIMED_OUT.
    /// Returns whether it did.
    pub fn time_out_if_due(&mut self, timeout: Duration, now: Timestamp) -> bool {
        if self.status != DomainVerificationStatus::Pending || now < self.deadline(timeout) {
            return false;
        }
        let last = self.status_reason.as_deref().map(|r| format!(" (last check: {r})")).unwrap_or_default();
        self.status = DomainVerificationStatus::VerificationTimedOut;
        self.status_reason = Some(format!(
            "the TXT record {:?} at {} was not found within {}{last}; delete this verification and create a new one once the record is published",
            self.txt_record_value,
            self.txt_record_name,
            humantime::format_duration(timeout),
        ));
        true
    }
}

/// The name of the TXT record that verifies `domain`.
pub fn txt_record_name(domain: &str) -> String {
    format!("{TXT_RECORD_LABEL}.{}", normalize(domain))
}

/// A TXT record value from 16 random bytes: the prefix and 26 lowercase base32 characters.
pub fn txt_record_value(seed: &Seed) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let bits = u128::from_be_bytes(*seed);
    // 26 characters of 5 bits hold all 128 bits (the first character holds 3).
    let body: String = (0..26).rev().map(|i| ALPHABET[((bits >> (5 * i)) & 0x1f) as usize] as char).collect();
    format!("{TXT_VALUE_PREFIX}{body}")
}

fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Whether the verified domain `domain` covers `name`: `name` is `domain` or
/// lies under it. Case-insensitive; a trailing dot on either is ignored.
pub fn covers(domain: &str, name: &str) -> bool {
    let (domain, name) = (normalize(domain), normalize(name));
    if domain.is_empty() {
        return false;
    }
    name == domain || name.strip_suffix(&domain).is_some_and(|head| head.ends_with('.') && head.len() > 1)
}

/// Whether `name` (normalized) is one Trellis generates: under [`RESERVED_ZONE`],
/// or an endpoint service name (`trellis.vpce.<region>.vpce-svc-…`).
fn is_generated_name(name: &str) -> bool {
    covers(RESERVED_ZONE, name) || name.rsplit('.').next().is_some_and(|last| last.starts_with(SERVICE_ID_PREFIX))
}

/// A domain name that cannot be verified or used as a custom name. Each message says what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainNameError {
    /// Not an RFC 1123 name.
    #[error(transparent)]
    Syntax(ValidationError),
    /// `*.example.com` or another name with `*`.
    #[error(
        "domain name {0:?} is a wildcard: write the domain without \"*\" (a verified domain covers every name under it)"
    )]
    Wildcard(String),
    /// A top-level name such as `com`.
    #[error("domain name {0:?} has a single label: write a domain of at least two labels, such as example.com")]
    SingleLabel(String),
    /// Under `trellis.internal`, or shaped like an endpoint service name.
    #[error(
        "domain name {0:?} is reserved: Trellis generates the names under {RESERVED_ZONE} and the endpoint service \
         names; use a domain of your own"
    )]
    Reserved(String),
    /// The TXT record name would be longer than a DNS name may be.
    #[error(
        "domain name {0:?} is too long to verify: its TXT record name would exceed 253 characters; use a domain of \
         at most {MAX_VERIFIABLE_DOMAIN_LEN} characters"
    )]
    TooLong(String),
}

fn validate_common(name: &str) -> Result<String, DomainNameError> {
    if name.contains('*') {
        return Err(DomainNameError::Wildcard(name.to_string()));
    }
    let normalized = validate_domain_name(name).map_err(DomainNameError::Syntax)?;
    if is_generated_name(&normalized) {
        return Err(DomainNameError::Reserved(name.to_string()));
    }
    Ok(normalized)
}

/// The domain of a verification: an RFC 1123 name of at least two labels, no
/// wildcard, not a name Trellis generates, short enough for its TXT record
/// name. Returns it lowercase without a trailing dot.
pub fn validate_verification_domain(name: &str) -> Result<String, DomainNameError> {
    let normalized = validate_common(name)?;
    if !normalized.contains('.') {
        return Err(DomainNameError::SingleLabel(name.to_string()));
    }
    if normalized.len() > MAX_VERIFIABLE_DOMAIN_LEN {
        return Err(DomainNameError::TooLong(name.to_string()));
    }
    Ok(normalized)
}

/// A custom name a provider asks consumers' DNS to answer (a resource
/// configuration's `customDomainName`, an endpoint service's `privateDnsName`):
/// an RFC 1123 name, no wildcard, not a name Trellis generates. Returns it
/// lowercase without a trailing dot.
pub fn validate_custom_domain_name(name: &str) -> Result<String, DomainNameError> {
    validate_common(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> Timestamp {
        Timestamp::from_unix_seconds(1_700_000_000 + secs)
    }

    fn pending() -> DomainVerification {
        DomainVerification::new(
            DomainVerificationId::generate(&[1; 16]),
            AccountId::parse("acct-123456789012").unwrap(),
            "example.com".into(),
            &[2; 16],
            "local",
            t(0),
        )
    }

    #[test]
    fn a_verified_domain_covers_itself_and_names_under_it_only() {
        assert!(covers("example.com", "example.com"));
        assert!(covers("example.com", "db.example.com"));
        assert!(covers("example.com", "a.b.example.com"));
        assert!(covers("Example.COM.", "DB.example.com."));
        assert!(covers("example.com", "db.EXAMPLE.com."));
        assert!(!covers("example.com", "badexample.com"), "a suffix of the text is not a subdomain");
        assert!(!covers("example.com", "example.com.evil.net"));
        assert!(!covers("example.com", "com"));
        assert!(!covers("db.example.com", "example.com"), "a child does not cover its parent");
        assert!(!covers("example.com", ".example.com"));
        assert!(!covers("", "example.com"));
        assert!(!covers(".", "example.com"));
    }

    #[test]
    fn txt_record_name_and_value() {
        assert_eq!(txt_record_name("Example.com."), "_trellis-verification.example.com");
        let a = txt_record_value(&[0; 16]);
        assert_eq!(a, format!("trellis-verification={}", "a".repeat(26)));
        let b = txt_record_value(&[0xff; 16]);
        assert_eq!(b, format!("trellis-verification=h{}", "7".repeat(25)));
        let c = txt_record_value(&[7; 16]);
        assert_ne!(c, txt_record_value(&[8; 16]), "different seeds give different values");
        assert!(c.len() <= 48, "short enough for one table cell: {c}");
        assert!(c.bytes().all(|b| b.is_ascii_graphic()), "pastes into any DNS console: {c}");
        let v = pending();
        assert_eq!(v.txt_record_name, "_trellis-verification.example.com");
        assert!(v.txt_record_value.starts_with(TXT_VALUE_PREFIX));
        assert!(v.arn.starts_with("arn:trellis:vpc-lattice:local:acct-123456789012:domainverification/dv-"));
    }

    #[test]
    fn verification_domains_are_real_domains_of_the_owner() {
        assert_eq!(validate_verification_domain("Example.COM.").unwrap(), "example.com");
        assert_eq!(validate_verification_domain("db.corp.example.co.uk").unwrap(), "db.corp.example.co.uk");
        for (bad, what) in [
            ("com", "single label"),
            ("localhost", "single label"),
            ("*.example.com", "wildcard"),
            ("*", "wildcard"),
            ("ex*ample.com", "wildcard"),
            ("trellis.internal", "reserved"),
            ("x.local.trellis.internal", "reserved"),
            ("TRELLIS.internal.", "reserved"),
            ("trellis.vpce.local.vpce-svc-0123456789abcdef0", "reserved"),
            ("a_b.example.com", "invalid"),
            ("", "invalid"),
            ("example..com", "invalid"),
            ("10.0.0.1", "invalid"),
        ] {
            let err = validate_verification_domain(bad).expect_err(bad).to_string();
            let expected = match what {
                "single label" => "at least two labels",
                "wildcard" => "without \"*\"",
                "reserved" => "reserved",
                _ => "use a DNS name",
            };
            assert!(err.contains(expected), "{bad}: {err}");
        }
        assert!(validate_verification_domain("internal.example.com").is_ok());
        assert!(validate_verification_domain("trellis.internal.example.com").is_ok(), "not under the zone");
    }

    #[test]
    fn verification_domains_leave_room_for_the_txt_label() {
        let label = "a".repeat(63);
        let longest = format!("{label}.{label}.{label}.{}.com", "b".repeat(MAX_VERIFIABLE_DOMAIN_LEN - 3 * 64 - 4));
        assert_eq!(longest.len(), MAX_VERIFIABLE_DOMAIN_LEN);
        assert!(validate_verification_domain(&longest).is_ok());
        assert_eq!(txt_record_name(&longest).len(), 253);
        let too_long = format!("c.{longest}");
        assert!(matches!(validate_verification_domain(&too_long), Err(DomainNameError::TooLong(_))));
        assert!(validate_custom_domain_name(&too_long).is_ok(), "a custom name needs no TXT record");
    }

    #[test]
    fn custom_names_may_not_be_generated_names() {
        assert_eq!(validate_custom_domain_name("DB.Example.com").unwrap(), "db.example.com");
        assert_eq!(validate_custom_domain_name("db").unwrap(), "db");
        for bad in [
            "vpce-0123456789abcdef0.rcfg-0123456789abcdef0.local.trellis.internal",
            "trellis.internal",
            "anything.trellis.internal.",
            "trellis.vpce.local.vpce-svc-0123456789abcdef0",
        ] {
            assert!(matches!(validate_custom_domain_name(bad), Err(DomainNameError::Reserved(_))), "{bad}");
        }
        assert!(matches!(validate_custom_domain_name("*.example.com"), Err(DomainNameError::Wildcard(_))));
        assert!(matches!(validate_custom_domain_name("a b"), Err(DomainNameError::Syntax(_))));
    }

    #[test]
    fn a_found_record_verifies_and_other_outcomes_say_what_to_do() {
        let mut v = pending();
        assert!(!v.apply_check(&CheckOutcome::Missing, t(1)));
        assert_eq!(v.status, DomainVerificationStatus::Pending);
        assert_eq!(v.last_checked_at, Some(t(1)));
        let reason = v.status_reason.clone().unwrap();
        assert!(reason.contains("_trellis-verification.example.com") && reason.contains(&v.txt_record_value));

        assert!(!v.apply_check(&CheckOutcome::Mismatch { records: 2 }, t(2)));
        assert!(v.status_reason.as_deref().unwrap().contains("found 2 TXT record(s)"));
        assert!(!v.apply_check(&CheckOutcome::Failed("timed out after 3s".into()), t(3)));
        assert!(v.status_reason.as_deref().unwrap().contains("timed out after 3s; will retry"));

        assert!(v.apply_check(&CheckOutcome::Found, t(4)));
        assert_eq!(v.status, DomainVerificationStatus::Verified);
        assert_eq!((v.verified_at, v.last_checked_at, v.status_reason.as_deref()), (Some(t(4)), Some(t(4)), None));

        // A verified domain stays verified: later outcomes change nothing.
        let before = v.clone();
        assert!(!v.apply_check(&CheckOutcome::Missing, t(5)));
        assert!(!v.time_out_if_due(Duration::from_secs(1), t(100)));
        assert_eq!(v, before);
    }

    #[test]
    fn a_pending_verification_times_out_at_its_deadline_only() {
        let timeout = Duration::from_secs(72 * 3600);
        let mut v = pending();
        v.apply_check(&CheckOutcome::Missing, t(10));
        assert!(!v.time_out_if_due(timeout, t(72 * 3600 - 1)));
        assert_eq!(v.status, DomainVerificationStatus::Pending);
        assert!(v.time_out_if_due(timeout, t(72 * 3600)));
        assert_eq!(v.status, DomainVerificationStatus::VerificationTimedOut);
        let reason = v.status_reason.clone().unwrap();
        assert!(reason.contains("within 3days") && reason.contains("create a new one"), "{reason}");
        assert!(reason.contains("last check: no TXT record"), "{reason}");
        assert!(!v.apply_check(&CheckOutcome::Found, t(72 * 3600 + 1)), "too late: stays timed out");
        assert_eq!(v.status, DomainVerificationStatus::VerificationTimedOut);
    }

    #[test]
    fn statuses_use_the_aws_spelling() {
        let v = serde_json::to_value(DomainVerificationStatus::VerificationTimedOut).unwrap();
        assert_eq!(v, "VERIFICATION_TIMED_OUT");
        assert_eq!(DomainVerificationStatus::Pending.to_string(), "PENDING");
        let json = serde_json::to_value(pending()).unwrap();
        assert_eq!(json["status"], "PENDING");
        assert_eq!(json["domainName"], "example.com");
        assert_eq!(json["txtRecordName"], "_trellis-verification.example.com");
        assert!(json.get("verifiedAt").is_none() && json.get("lastCheckedAt").is_none());
        let back: DomainVerification = serde_json::from_value(json).unwrap();
        assert_eq!(back, pending());
    }
}
