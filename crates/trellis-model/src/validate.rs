//! Validation of user-supplied names and addresses. Each error message says
//! what to write instead.

use std::net::IpAddr;

/// A value that breaks a naming or addressing rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error(
        "name {0:?} is invalid: use 1-40 characters of lowercase letters, digits and hyphens, \
         without a leading or trailing hyphen or two hyphens in a row"
    )]
    Name(String),
    #[error("name {name:?} is invalid: names may not start with the id prefix {prefix:?}")]
    ReservedPrefix { name: String, prefix: &'static str },
    #[error(
        "zone {0:?} is invalid: use 1-64 characters of lowercase letters, digits and hyphens, \
         starting with a letter or digit (for example \"z1\" or \"eu-west-1a\")"
    )]
    Zone(String),
    #[error(
        "region {0:?} is invalid: use 1-32 characters of lowercase letters, digits and hyphens, \
         starting with a letter"
    )]
    Region(String),
    #[error(
        "domain name {0:?} is invalid: use a DNS name (RFC 1123) of at most 253 characters, \
         labels of 1-63 letters, digits and hyphens, not starting or ending with a hyphen"
    )]
    DomainName(String),
    #[error("IP address {0:?} is invalid: write an IPv4 or IPv6 address such as 10.0.0.10")]
    IpSyntax(String),
    #[error("IP address {0} cannot be a resource: it is unspecified, multicast or broadcast")]
    IpUnusable(IpAddr),
}

/// Id prefixes a name may not start with (AWS VPC Lattice rule, extended to every Trellis kind).
pub const RESERVED_NAME_PREFIXES: &[&str] = &[
    "acct-", "o-", "vpc-", "subnet-", "agent-", "jt-", "rgw-", "rcfg-", "rs-", "rsi-", "vpce-", "sn-", "snra-", "snva-",
];

fn is_label_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'
}

/// Names of VPCs, gateways, configurations, shares, accounts, organizations:
/// 1–40 chars of `[a-z0-9-]`, no leading/trailing hyphen, no `--`, no id prefix.
///
/// AWS VPC Lattice asks for at least 3 characters; Trellis accepts shorter
/// names because its own documented flow uses `gw` and `db`.
pub fn validate_name(name: &str) -> Result<(), ValidationError> {
    let ok = (1..=40).contains(&name.len())
        && name.bytes().all(is_label_char)
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if !ok {
        return Err(ValidationError::Name(name.to_string()));
    }
    if let Some(prefix) = RESERVED_NAME_PREFIXES.iter().find(|p| name.starts_with(**p)) {
        return Err(ValidationError::ReservedPrefix { name: name.to_string(), prefix });
    }
    Ok(())
}

/// Zone names: 1–64 chars of `[a-z0-9-]`, starting with a letter or digit.
pub fn validate_zone(zone: &str) -> Result<(), ValidationError> {
    let ok =
        (1..=64).contains(&zone.len()) && zone.bytes().all(is_label_char) && zone.as_bytes()[0].is_ascii_alphanumeric();
    if ok { Ok(()) } else { Err(ValidationError::Zone(zone.to_string())) }
}

/// Region labels (used in ARNs and DNS names): 1–32 chars of `[a-z0-9-]`, starting with a letter.
pub fn validate_region(region: &str) -> Result<(), ValidationError> {
    let ok = (1..=32).contains(&region.len())
        && region.bytes().all(is_label_char)
        && region.as_bytes()[0].is_ascii_lowercase()
        && !region.ends_with('-');
    if ok { Ok(()) } else { Err(ValidationError::Region(region.to_string())) }
}

/// An RFC 1123 host name; returns it lower-cased without a trailing dot.
pub fn validate_domain_name(name: &str) -> Result<String, ValidationError> {
    let err = || ValidationError::DomainName(name.to_string());
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() || trimmed.len() > 253 {
        return Err(err());
    }
    for label in trimmed.split('.') {
        let ok = (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(err());
        }
    }
    // An all-numeric last label would make the name look like an IPv4 address.
    if trimmed.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit())) {
        return Err(err());
    }
    Ok(trimmed.to_ascii_lowercase())
}

/// A resource's IP address: any address a gateway can dial (not unspecified, multicast or broadcast).
pub fn validate_resource_ip(text: &str) -> Result<IpAddr, ValidationError> {
    let ip: IpAddr = text.parse().map_err(|_| ValidationError::IpSyntax(text.to_string()))?;
    let unusable = ip.is_unspecified() || ip.is_multicast() || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if unusable { Err(ValidationError::IpUnusable(ip)) } else { Ok(ip) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_vpc_lattice_rule() {
        for good in ["s", "db", "abc", "prod-db-1", "a1b", &"a".repeat(40)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [&"a".repeat(41), "Prod", "-db", "db-", "d--b", "d_b", "d b", "db.x", ""] {
            assert!(matches!(validate_name(bad), Err(ValidationError::Name(_))), "{bad}");
        }
        assert!(matches!(validate_name("rgw-main"), Err(ValidationError::ReservedPrefix { .. })));
        assert!(matches!(validate_name("vpc-one"), Err(ValidationError::ReservedPrefix { .. })));
        assert!(validate_name("vpcs-one").is_ok());
    }

    #[test]
    fn zones_are_short_dns_labels() {
        assert!(validate_zone("z1").is_ok());
        assert!(validate_zone("eu-west-1a").is_ok());
        for bad in ["", "-z", "Z1", "z_1", &"z".repeat(65)] {
            assert!(validate_zone(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn regions_start_with_a_letter() {
        assert!(validate_region("local").is_ok());
        assert!(validate_region("eu-west-1").is_ok());
        for bad in ["", "1eu", "EU", "eu-", "eu.west"] {
            assert!(validate_region(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn domain_names_follow_rfc_1123() {
        assert_eq!(validate_domain_name("DB.Example.com.").unwrap(), "db.example.com");
        assert_eq!(validate_domain_name("1password.com").unwrap(), "1password.com");
        assert!(validate_domain_name("localhost").is_ok());
        for bad in ["", ".", "a..b", "-a.com", "a-.com", "a_b.com", "10.0.0.1", &format!("{}.com", "a".repeat(64))] {
            assert!(validate_domain_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resource_ips_must_be_dialable() {
        assert!(validate_resource_ip("10.0.0.10").is_ok());
        assert!(validate_resource_ip("127.0.0.1").is_ok());
        assert!(validate_resource_ip("fd00::1").is_ok());
        assert!(matches!(validate_resource_ip("10.0.0"), Err(ValidationError::IpSyntax(_))));
        for bad in ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255"] {
            assert!(matches!(validate_resource_ip(bad), Err(ValidationError::IpUnusable(_))), "{bad}");
        }
    }
}
