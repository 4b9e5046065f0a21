//! Secrets taken from flags or the environment, kept out of logs and `Debug` output.

use std::fmt;
use std::str::FromStr;

/// An API key (`Authorization: Bearer …`). `Debug` prints `***`; the value is
/// only read by [`ApiKey::expose`] where the header is built.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// The key itself, for the `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for ApiKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let key = s.trim();
        if key.is_empty() {
            return Err(
                "the API key is empty; pass a key from `trellis account create`, or the admin key in DATA_DIR/admin.key"
                    .into()
            );
        }
        if key.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err("the API key contains whitespace or control characters; pass the key exactly as printed".into());
        }
        Ok(Self(key.to_string()))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_key() {
        let key: ApiKey = "tk_supersecret".parse().unwrap();
        assert_eq!(format!("{key:?}"), "***");
        assert_eq!(key.expose(), "tk_supersecret");
    }

    #[test]
    fn surrounding_whitespace_is_trimmed_but_inner_whitespace_is_rejected() {
        assert_eq!("  abc\n".parse::<ApiKey>().unwrap().expose(), "abc");
        assert!("a b".parse::<ApiKey>().is_err());
        assert!("   ".parse::<ApiKey>().is_err());
    }
}
