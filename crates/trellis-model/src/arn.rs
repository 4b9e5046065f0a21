//! ARNs: `arn:trellis:<service>:<region>:<accountId>:<type>/<id>`, and
//! "identifiers" that accept either an id or an ARN.

use std::fmt;
use std::str::FromStr;

use crate::ids::{Id, IdError};

/// A parsed ARN.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Arn {
    pub service: String,
    pub region: String,
    /// Empty for objects owned by no account (organizations).
    pub account_id: String,
    pub resource_type: String,
    pub resource_id: String,
}

/// Why an ARN or identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArnError {
    /// Not `arn:trellis:<service>:<region>:<account>:<type>/<id>`.
    #[error("{0:?} is not an ARN of the form arn:trellis:<service>:<region>:<accountId>:<type>/<id>")]
    Malformed(String),
    /// A well-formed ARN of another resource type.
    #[error("{arn:?} names a {found}, expected a {expected}")]
    WrongType { arn: String, found: String, expected: &'static str },
    /// The id inside the ARN (or the bare identifier) is invalid.
    #[error(transparent)]
    Id(#[from] IdError),
}

/// The ARN service and resource type of each kind of object.
pub mod kinds {
    pub const ACCOUNT: (&str, &str) = ("iam", "account");
    pub const ORGANIZATION: (&str, &str) = ("organizations", "organization");
    pub const VPC: (&str, &str) = ("ec2", "vpc");
    pub const SUBNET: (&str, &str) = ("ec2", "subnet");
    pub const VPC_ENDPOINT: (&str, &str) = ("ec2", "vpc-endpoint");
    pub const AGENT: (&str, &str) = ("trellis", "agent");
    pub const RESOURCE_GATEWAY: (&str, &str) = ("vpc-lattice", "resourcegateway");
    pub const RESOURCE_CONFIGURATION: (&str, &str) = ("vpc-lattice", "resourceconfiguration");
    pub const RESOURCE_SHARE: (&str, &str) = ("ram", "resource-share");
    pub const RESOURCE_SHARE_INVITATION: (&str, &str) = ("ram", "resource-share-invitation");
    pub const DOMAIN_VERIFICATION: (&str, &str) = ("vpc-lattice", "domainverification");
    pub const VPC_ENDPOINT_SERVICE: (&str, &str) = ("ec2", "vpc-endpoint-service");
    pub const CONNECTION_NOTIFICATION: (&str, &str) = ("ec2", "vpc-endpoint-connection-notification");
}

impl Arn {
    /// Builds the ARN of an object of `kind` (one of [`kinds`]).
    pub fn new(kind: (&str, &str), region: &str, account_id: &str, resource_id: &str) -> Self {
        Self {
            service: kind.0.to_string(),
            region: region.to_string(),
            account_id: account_id.to_string(),
            resource_type: kind.1.to_string(),
            resource_id: resource_id.to_string(),
        }
    }

    /// The typed id inside an ARN of `kind`.
    pub fn id_of<T: Id>(&self, kind: (&str, &str)) -> Result<T, ArnError> {
        if self.service != kind.0 || self.resource_type != kind.1 {
            return Err(ArnError::WrongType {
                arn: self.to_string(),
                found: format!("{}:{}", self.service, self.resource_type),
                expected: T::KIND,
            });
        }
        Ok(T::parse(&self.resource_id)?)
    }
}

impl fmt::Display for Arn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "arn:trellis:{}:{}:{}:{}/{}",
            self.service, self.region, self.account_id, self.resource_type, self.resource_id
        )
    }
}

impl FromStr for Arn {
    type Err = ArnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || ArnError::Malformed(s.to_string());
        let mut parts = s.splitn(6, ':');
        let (Some("arn"), Some("trellis"), Some(service), Some(region), Some(account), Some(resource)) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let (resource_type, resource_id) = resource.split_once('/').ok_or_else(malformed)?;
        if service.is_empty() || resource_type.is_empty() || resource_id.is_empty() || resource_id.contains('/') {
            return Err(malformed());
        }
        Ok(Self {
            service: service.to_string(),
            region: region.to_string(),
            account_id: account.to_string(),
            resource_type: resource_type.to_string(),
            resource_id: resource_id.to_string(),
        })
    }
}

/// Parses an "identifier" field: the bare id, or the ARN of an object of `kind`.
pub fn parse_identifier<T: Id>(value: &str, kind: (&str, &str)) -> Result<T, ArnError> {
    if value.starts_with("arn:") { value.parse::<Arn>()?.id_of(kind) } else { Ok(T::parse(value)?) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ResourceConfigurationId, VpcId};

    #[test]
    fn arn_round_trips() {
        let arn = Arn::new(kinds::RESOURCE_CONFIGURATION, "local", "acct-123456789012", "rcfg-0123456789abcdef0");
        let text = arn.to_string();
        assert_eq!(
            text,
            "arn:trellis:vpc-lattice:local:acct-123456789012:resourceconfiguration/rcfg-0123456789abcdef0"
        );
        assert_eq!(text.parse::<Arn>().unwrap(), arn);
    }

    #[test]
    fn identifiers_accept_an_id_or_an_arn_of_the_right_type() {
        let id = "rcfg-0123456789abcdef0";
        let arn = format!("arn:trellis:vpc-lattice:local:acct-123456789012:resourceconfiguration/{id}");
        let a: ResourceConfigurationId = parse_identifier(id, kinds::RESOURCE_CONFIGURATION).unwrap();
        let b: ResourceConfigurationId = parse_identifier(&arn, kinds::RESOURCE_CONFIGURATION).unwrap();
        assert_eq!(a, b);
        let wrong = "arn:trellis:ec2:local:acct-123456789012:vpc/vpc-0123456789abcdef0";
        assert!(matches!(
            parse_identifier::<ResourceConfigurationId>(wrong, kinds::RESOURCE_CONFIGURATION),
            Err(ArnError::WrongType { .. })
        ));
        assert!(parse_identifier::<VpcId>(wrong, kinds::VPC).is_ok());
    }

    #[test]
    fn malformed_arns_are_rejected() {
        for bad in ["arn:aws:ec2:r:a:vpc/x", "arn:trellis:ec2:r:a:vpc", "arn:trellis:ec2", "arn:trellis::r:a:vpc/x"] {
            assert!(bad.parse::<Arn>().is_err(), "{bad}");
        }
    }
}
