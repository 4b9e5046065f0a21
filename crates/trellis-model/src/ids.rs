//! Object ids: typed newtypes over validated strings.
//!
//! `acct-` + 12 digits, `o-` + 10 lowercase alphanumerics, `jt-` + 16 lowercase
//! hex, every other kind `<prefix>` + 17 lowercase hex. New ids are derived from
//! random bytes the caller passes in ([`Seed`]): the model never draws
//! randomness itself.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Random bytes a caller draws (from a CSPRNG) to generate one id.
pub type Seed = [u8; 16];

/// Why a string is not an id of the expected kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a valid {kind} id: expected {expected}")]
pub struct IdError {
    /// Human name of the kind ("VPC", "subnet", …).
    pub kind: &'static str,
    pub value: String,
    /// What a valid id looks like.
    pub expected: &'static str,
}

/// The alphabet and length of an id's random part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    Digits(usize),
    LowerHex(usize),
    LowerAlnum(usize),
}

impl Body {
    fn accepts(self, s: &str) -> bool {
        let (len, ok): (usize, fn(u8) -> bool) = match self {
            Body::Digits(n) => (n, |b| b.is_ascii_digit()),
            Body::LowerHex(n) => (n, |b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            Body::LowerAlnum(n) => (n, |b| b.is_ascii_digit() || b.is_ascii_lowercase()),
        };
        s.len() == len && s.bytes().all(ok)
    }

    /// The regular expression of this body, for the ids' JSON Schema.
    #[cfg(feature = "schema")]
    fn pattern(self) -> String {
        match self {
            Body::Digits(n) => format!("[0-9]{{{n}}}"),
            Body::LowerHex(n) => format!("[0-9a-f]{{{n}}}"),
            Body::LowerAlnum(n) => format!("[0-9a-z]{{{n}}}"),
        }
    }

    fn generate(self, seed: &Seed) -> String {
        match self {
            Body::Digits(n) => {
                // 12 digits from 64 random bits: the modulo bias is below 1e-7.
                let mut v = u128::from_be_bytes(*seed);
                let mut out = Vec::with_capacity(n);
                for _ in 0..n {
                    out.push(b'0' + (v % 10) as u8);
                    v /= 10;
                }
                String::from_utf8(out).expect("ascii digits")
            }
            Body::LowerHex(n) => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                (0..n).map(|i| HEX[usize::from((seed[i / 2] >> (4 * (1 - i % 2))) & 0xf)] as char).collect()
            }
            Body::LowerAlnum(n) => {
                const ALNUM: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
                let mut v = u128::from_be_bytes(*seed);
                (0..n)
                    .map(|_| {
                        let c = ALNUM[(v % 36) as usize] as char;
                        v /= 36;
                        c
                    })
                    .collect()
            }
        }
    }
}

/// Common behaviour of every typed id.
pub trait Id: Sized + Clone + fmt::Display {
    /// `vpc-`, `rcfg-`, …
    const PREFIX: &'static str;
    /// Human name used in error messages.
    const KIND: &'static str;
    /// Parses and validates an id string.
    fn parse(s: &str) -> Result<Self, IdError>;
    /// A new id from random bytes.
    fn generate(seed: &Seed) -> Self;
    fn as_str(&self) -> &str;
}

macro_rules! define_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal, $body:expr, $expected:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl Id for $name {
            const PREFIX: &'static str = $prefix;
            const KIND: &'static str = $kind;

            fn parse(s: &str) -> Result<Self, IdError> {
                match s.strip_prefix($prefix) {
                    Some(rest) if $body.accepts(rest) => Ok(Self(s.to_string())),
                    _ => Err(IdError { kind: $kind, value: s.to_string(), expected: $expected }),
                }
            }

            fn generate(seed: &Seed) -> Self {
                Self(format!("{}{}", $prefix, $body.generate(seed)))
            }

            fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl $name {
            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Parses and validates an id (also available through [`Id`]).
            pub fn parse(s: &str) -> Result<Self, IdError> {
                <Self as Id>::parse(s)
            }

            /// A new id from random bytes (also available through [`Id`]).
            pub fn generate(seed: &Seed) -> Self {
                <Self as Id>::generate(seed)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                <Self as Id>::parse(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                <Self as Id>::parse(&s).map_err(serde::de::Error::custom)
            }
        }

        #[cfg(feature = "schema")]
        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                crate::schema::string(&format!("^{}{}$", $prefix, $body.pattern()), None, $expected)
            }
        }
    };
}

define_id!(
    /// `acct-` + 12 digits.
    AccountId, "acct-", "account", Body::Digits(12), "acct- followed by 12 digits"
);
define_id!(
    /// `o-` + 10 lowercase letters or digits.
    OrganizationId, "o-", "organization", Body::LowerAlnum(10), "o- followed by 10 lowercase letters or digits"
);
define_id!(
    /// `vpc-` + 17 lowercase hex.
    VpcId, "vpc-", "VPC", Body::LowerHex(17), "vpc- followed by 17 lowercase hex digits"
);
define_id!(
    /// `subnet-` + 17 lowercase hex.
    SubnetId, "subnet-", "subnet", Body::LowerHex(17), "subnet- followed by 17 lowercase hex digits"
);
define_id!(
    /// `agent-` + 17 lowercase hex.
    AgentId, "agent-", "agent", Body::LowerHex(17), "agent- followed by 17 lowercase hex digits"
);
define_id!(
    /// `relay-` + 17 lowercase hex.
    RelayId, "relay-", "relay", Body::LowerHex(17), "relay- followed by 17 lowercase hex digits"
);
define_id!(
    /// `jt-` + 16 lowercase hex.
    JoinTokenId, "jt-", "join token", Body::LowerHex(16), "jt- followed by 16 lowercase hex digits"
);
define_id!(
    /// `rgw-` + 17 lowercase hex.
    ResourceGatewayId, "rgw-", "resource gateway", Body::LowerHex(17), "rgw- followed by 17 lowercase hex digits"
);
define_id!(
    /// `rcfg-` + 17 lowercase hex.
    ResourceConfigurationId, "rcfg-", "resource configuration", Body::LowerHex(17),
    "rcfg- followed by 17 lowercase hex digits"
);
define_id!(
    /// `rs-` + 17 lowercase hex.
    ResourceShareId, "rs-", "resource share", Body::LowerHex(17), "rs- followed by 17 lowercase hex digits"
);
define_id!(
    /// `rsi-` + 17 lowercase hex.
    ResourceShareInvitationId, "rsi-", "resource share invitation", Body::LowerHex(17),
    "rsi- followed by 17 lowercase hex digits"
);
define_id!(
    /// `vpce-` + 17 lowercase hex.
    VpcEndpointId, "vpce-", "VPC endpoint", Body::LowerHex(17), "vpce- followed by 17 lowercase hex digits"
);
define_id!(
    /// `vpce-svc-` + 17 lowercase hex.
    VpcEndpointServiceId, "vpce-svc-", "VPC endpoint service", Body::LowerHex(17),
    "vpce-svc- followed by 17 lowercase hex digits"
);
define_id!(
    /// `vpce-nfn-` + 17 lowercase hex.
    ConnectionNotificationId, "vpce-nfn-", "connection notification", Body::LowerHex(17),
    "vpce-nfn- followed by 17 lowercase hex digits"
);
define_id!(
    /// `dv-` + 17 lowercase hex.
    DomainVerificationId, "dv-", "domain verification", Body::LowerHex(17),
    "dv- followed by 17 lowercase hex digits"
);

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds() -> impl Iterator<Item = Seed> {
        [[0u8; 16], [0xff; 16], *b"0123456789abcdef", [7; 16]].into_iter()
    }

    #[test]
    fn generated_ids_parse_back_for_every_kind() {
        for seed in seeds() {
            let a = AccountId::generate(&seed);
            assert_eq!(AccountId::parse(a.as_str()).unwrap(), a);
            assert_eq!(a.as_str().len(), "acct-".len() + 12);
            let o = OrganizationId::generate(&seed);
            assert_eq!(OrganizationId::parse(o.as_str()).unwrap(), o);
            let v = VpcId::generate(&seed);
            assert_eq!(VpcId::parse(v.as_str()).unwrap(), v);
            assert_eq!(v.as_str().len(), "vpc-".len() + 17);
            let j = JoinTokenId::generate(&seed);
            assert_eq!(JoinTokenId::parse(j.as_str()).unwrap(), j);
            for s in [
                SubnetId::generate(&seed).to_string(),
                AgentId::generate(&seed).to_string(),
                RelayId::generate(&seed).to_string(),
                ResourceGatewayId::generate(&seed).to_string(),
                ResourceConfigurationId::generate(&seed).to_string(),
                ResourceShareId::generate(&seed).to_string(),
                ResourceShareInvitationId::generate(&seed).to_string(),
                VpcEndpointId::generate(&seed).to_string(),
                DomainVerificationId::generate(&seed).to_string(),
            ] {
                assert!(s.rsplit('-').next().unwrap().len() == 17, "{s}");
            }
        }
    }

    #[test]
    fn different_seeds_give_different_ids() {
        assert_ne!(VpcId::generate(&[1; 16]), VpcId::generate(&[2; 16]));
        assert_ne!(AccountId::generate(&[1; 16]), AccountId::generate(&[2; 16]));
    }

    #[test]
    fn ids_of_the_wrong_kind_or_shape_are_rejected() {
        assert!(VpcId::parse("subnet-0123456789abcdef0").is_err());
        assert!(VpcId::parse("vpc-0123456789ABCDEF0").is_err());
        assert!(VpcId::parse("vpc-0123456789abcdef").is_err());
        assert!(VpcId::parse("vpc-0123456789abcdef01").is_err());
        assert!(AccountId::parse("acct-12345678901").is_err());
        assert!(AccountId::parse("acct-12345678901a").is_err());
        assert!(ResourceShareId::parse("rsi-0123456789abcdef0").is_err());
        let err = VpcId::parse("vpc-x").unwrap_err();
        assert!(err.to_string().contains("17 lowercase hex"), "{err}");
    }

    #[test]
    fn ids_serialize_as_strings_and_validate_on_deserialize() {
        let v = VpcId::parse("vpc-0123456789abcdef0").unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), "\"vpc-0123456789abcdef0\"");
        assert_eq!(serde_json::from_str::<VpcId>("\"vpc-0123456789abcdef0\"").unwrap(), v);
        assert!(serde_json::from_str::<VpcId>("\"vpc-nope\"").is_err());
    }
}
