//! Validation of user-supplied names and addresses. Each error message says
//! what to write instead, and repeats the offending input cut to
//! [`MAX_ECHO_CHARS`] (see [`clip_echo`]) so a 5,000-character name does not come
//! back whole.

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

/// Longest piece of user input an error message repeats, in characters.
pub const MAX_ECHO_CHARS: usize = 64;

/// `input` as an error message may repeat it: unchanged up to
/// [`MAX_ECHO_CHARS`] characters, else its first [`MAX_ECHO_CHARS`]
/// characters and an ellipsis.
pub fn clip_echo(input: &str) -> String {
    match input.char_indices().nth(MAX_ECHO_CHARS) {
        None => input.to_string(),
        Some((cut, _)) => format!("{}…", &input[..cut]),
    }
}

/// Cuts every quoted span (`"…"` as `{:?}` writes it, or `` `…` `` as serde
/// writes it) of an error `message` longer than [`MAX_ECHO_CHARS`] characters
/// down to that length with an ellipsis. For messages built from text that
/// repeats input without [`clip_echo`] (serde's, clap's, a library's).
pub fn clip_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(1024));
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c != '"' && c != '`' {
            continue;
        }
        // Inside a span: copy up to MAX_ECHO_CHARS characters, skip the rest, keep the closing quote.
        let (mut kept, mut clipped, mut escaped, mut closed) = (0usize, false, false, false);
        for inner in chars.by_ref() {
            if inner == c && !(c == '"' && escaped) {
                closed = true;
                break;
            }
            escaped = c == '"' && inner == '\\' && !escaped;
            if kept < MAX_ECHO_CHARS {
                out.push(inner);
                kept += 1;
            } else {
                clipped = true;
            }
        }
        if clipped {
            out.push('…');
        }
        if closed {
            out.push(c);
        }
    }
    out
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
        return Err(ValidationError::Name(clip_echo(name)));
    }
    if let Some(prefix) = RESERVED_NAME_PREFIXES.iter().find(|p| name.starts_with(**p)) {
        return Err(ValidationError::ReservedPrefix { name: clip_echo(name), prefix });
    }
    Ok(())
}

/// Zone names: 1–64 chars of `[a-z0-9-]`, starting with a letter or digit.
pub fn validate_zone(zone: &str) -> Result<(), ValidationError> {
    let ok =
        (1..=64).contains(&zone.len()) && zone.bytes().all(is_label_char) && zone.as_bytes()[0].is_ascii_alphanumeric();
    if ok { Ok(()) } else { Err(ValidationError::Zone(clip_echo(zone))) }
}

/// Region labels (used in ARNs and DNS names): 1–32 chars of `[a-z0-9-]`, starting with a letter.
pub fn validate_region(region: &str) -> Result<(), ValidationError> {
    let ok = (1..=32).contains(&region.len())
        && region.bytes().all(is_label_char)
        && region.as_bytes()[0].is_ascii_lowercase()
        && !region.ends_with('-');
    if ok { Ok(()) } else { Err(ValidationError::Region(clip_echo(region))) }
}

/// An RFC 1123 host name; returns it lower-cased without a trailing dot.
pub fn validate_domain_name(name: &str) -> Result<String, ValidationError> {
    let err = || ValidationError::DomainName(clip_echo(name));
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
    let ip: IpAddr = text.parse().map_err(|_| ValidationError::IpSyntax(clip_echo(text)))?;
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
    fn errors_repeat_at_most_64_characters_of_the_input() {
        let long = "a".repeat(5000);
        for err in [
            validate_name(&long).unwrap_err(),
            validate_zone(&long).unwrap_err(),
            validate_region(&long).unwrap_err(),
            validate_domain_name(&long).unwrap_err(),
            validate_resource_ip(&long).unwrap_err(),
        ] {
            let text = err.to_string();
            assert!(text.contains(&format!("\"{}…\"", "a".repeat(MAX_ECHO_CHARS))), "{text}");
            assert!(text.len() < 400, "{} characters: {text}", text.len());
        }
        let short = validate_name("Bad").unwrap_err().to_string();
        assert!(short.starts_with("name \"Bad\" is invalid"), "{short}");
        // Multi-byte characters are cut on a character boundary.
        assert_eq!(clip_echo(&"é".repeat(100)), format!("{}…", "é".repeat(64)));
    }

    #[test]
    fn quoted_spans_of_messages_are_clipped() {
        let long = "x".repeat(300);
        let msg = format!("port range {long:?} is bad; unknown variant `{long}`, expected one of `SINGLE`");
        let clipped = clip_quoted(&msg);
        let x64 = "x".repeat(64);
        assert_eq!(
            clipped,
            format!("port range \"{x64}…\" is bad; unknown variant `{x64}…`, expected one of `SINGLE`")
        );
        // Escaped quotes stay inside their span; short messages are unchanged.
        let tricky = format!("name {:?} is invalid", format!("{}\"{}", "q".repeat(70), "r".repeat(5)));
        assert_eq!(clip_quoted(&tricky), format!("name \"{}…\" is invalid", "q".repeat(64)));
        let plain = "cidrBlock \"10.0.0.0/8\" has prefix length /8; use a block from /16 to /28";
        assert_eq!(clip_quoted(plain), plain);
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
