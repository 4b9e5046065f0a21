//! Rules about DNS names that cross tenants: which names are Trellis's own,
//! and whether a name sits under a domain.

/// The zone of every name Trellis generates (`<vpce>.<rcfg>.<region>.trellis.internal`).
pub const RESERVED_ZONE: &str = "trellis.internal";

fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Whether `name` equals `domain` or is a name under it (case-insensitive,
/// a trailing dot ignored). `api.example.com` is under `example.com`;
/// `badexample.com` is not.
pub fn name_is_under(name: &str, domain: &str) -> bool {
    let (name, domain) = (normalize(name), normalize(domain));
    !domain.is_empty()
        && (name == domain
            || (name.len() > domain.len() && name.ends_with(&domain) && {
                let cut = name.len() - domain.len();
                name.as_bytes()[cut - 1] == b'.'
            }))
}

/// Whether `name` is in the zone Trellis generates names in: never a custom name.
pub fn is_reserved_dns_name(name: &str) -> bool {
    name_is_under(name, RESERVED_ZONE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_under_their_domains_only_at_a_label_boundary() {
        assert!(name_is_under("api.example.com", "example.com"));
        assert!(name_is_under("API.Example.com.", "example.COM"));
        assert!(name_is_under("example.com", "example.com"));
        assert!(!name_is_under("badexample.com", "example.com"));
        assert!(!name_is_under("example.com", "api.example.com"));
        assert!(!name_is_under("example.com", ""));
    }

    #[test]
    fn generated_names_are_reserved() {
        assert!(is_reserved_dns_name("vpce-1.rcfg-2.local.trellis.internal"));
        assert!(is_reserved_dns_name("TRELLIS.INTERNAL."));
        assert!(!is_reserved_dns_name("trellis.internal.example.com"));
        assert!(!is_reserved_dns_name("db.example.com"));
    }
}
