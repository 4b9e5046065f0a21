//! JSON Schemas of the values whose serde is written by hand: each is a
//! string, described by the pattern (or format) its parser accepts, so the
//! OpenAPI document says what the API takes. Ids get theirs from
//! `define_id!` in [`crate::ids`].
//!
//! [`Name`], [`Zone`], [`DomainName`], [`VerifiableDomain`], [`ClientToken`]
//! and [`IdOrArn`] are schemas only, for request fields that stay `String`
//! so the handlers' validators word the errors
//! (`#[schemars(with = "trellis_model::schema::Name")]`).

use std::borrow::Cow;
use std::marker::PhantomData;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

use crate::arn::kinds;
use crate::domain::MAX_VERIFIABLE_DOMAIN_LEN;
use crate::ids::{ResourceConfigurationId, ResourceGatewayId, VpcId};
use crate::pool::{AddressPool, MAX_PREFIX, MIN_PREFIX};
use crate::ports::PortRange;
use crate::time::Timestamp;

/// A string schema with a pattern (or a format) and a description.
pub(crate) fn string(pattern: &str, format: Option<&str>, description: &str) -> Schema {
    let mut schema = json_schema!({"type": "string", "description": description});
    if !pattern.is_empty() {
        schema.insert("pattern".into(), pattern.into());
    }
    if let Some(format) = format {
        schema.insert("format".into(), format.into());
    }
    schema
}

/// A name as [`crate::validate_name`] accepts it.
pub struct Name;

impl JsonSchema for Name {
    fn schema_name() -> Cow<'static, str> {
        "Name".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let mut schema = string(
            "^[a-z0-9]+(-[a-z0-9]+)*$",
            None,
            "1-40 characters of a-z, 0-9 and single inner hyphens, not starting with an id prefix such as vpc-",
        );
        schema.insert("maxLength".into(), 40.into());
        schema
    }
}

/// A zone name as [`crate::validate_zone`] accepts it.
pub struct Zone;

impl JsonSchema for Zone {
    fn schema_name() -> Cow<'static, str> {
        "Zone".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        string("^[a-z0-9][a-z0-9-]{0,63}$", None, "zone name: 1-64 characters of a-z, 0-9 and hyphens, e.g. z1")
    }
}

/// One DNS label: 1-63 letters, digits and inner hyphens.
const LABEL: &str = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?";
/// The last label, which is not all digits (the name would look like an IPv4 address).
const LAST_LABEL: &str = r"(?![0-9]+\.?$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?";

/// A DNS name as [`crate::validate_domain_name`] accepts it.
pub struct DomainName;

impl JsonSchema for DomainName {
    fn schema_name() -> Cow<'static, str> {
        "DomainName".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let mut schema = string(
            &format!(r"^({LABEL}\.)*{LAST_LABEL}\.?$"),
            None,
            "DNS name of at most 253 characters, e.g. db.example.com",
        );
        schema.insert("maxLength".into(), 254.into());
        schema
    }
}

/// A domain as [`crate::validate_verification_domain`] accepts it.
pub struct VerifiableDomain;

impl JsonSchema for VerifiableDomain {
    fn schema_name() -> Cow<'static, str> {
        "VerifiableDomain".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let mut schema = string(
            &format!(r"^({LABEL}\.)+{LAST_LABEL}\.?$"),
            None,
            &format!(
                "a domain of two labels or more, at most {MAX_VERIFIABLE_DOMAIN_LEN} characters, e.g. example.com"
            ),
        );
        schema.insert("maxLength".into(), (MAX_VERIFIABLE_DOMAIN_LEN + 1).into());
        schema
    }
}

/// A `clientToken`: 1-64 printable ASCII characters without spaces.
pub struct ClientToken;

impl JsonSchema for ClientToken {
    fn schema_name() -> Cow<'static, str> {
        "ClientToken".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        string(
            "^[!-~]{1,64}$",
            None,
            "idempotency token: a create repeated with the same token and body answers the first one's object",
        )
    }
}

/// An id type whose objects have ARNs, with the ARN's service and resource type.
pub trait ArnKind {
    const KIND: (&'static str, &'static str);
}

impl ArnKind for VpcId {
    const KIND: (&'static str, &'static str) = kinds::VPC;
}

impl ArnKind for ResourceGatewayId {
    const KIND: (&'static str, &'static str) = kinds::RESOURCE_GATEWAY;
}

impl ArnKind for ResourceConfigurationId {
    const KIND: (&'static str, &'static str) = kinds::RESOURCE_CONFIGURATION;
}

/// An object named by its id (of type `T`) or by its ARN, as identifier
/// fields take it ([`crate::parse_identifier`]).
pub struct IdOrArn<T>(PhantomData<T>);

impl<T: JsonSchema + ArnKind> JsonSchema for IdOrArn<T> {
    fn schema_name() -> Cow<'static, str> {
        format!("{}OrArn", T::schema_name()).into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let id_pattern = T::json_schema(generator).get("pattern").and_then(|p| p.as_str()).map(str::to_string);
        let id_pattern = id_pattern.as_deref().map_or("[^/]+$", |p| p.trim_start_matches('^'));
        let (service, resource_type) = T::KIND;
        let arn = format!("^arn:trellis:{service}:[^:]*:[^:]*:{resource_type}/{id_pattern}");
        let id = generator.subschema_for::<T>();
        json_schema!({"anyOf": [id, {"type": "string", "pattern": arn, "description": "the object's ARN"}]})
    }
}

impl JsonSchema for Timestamp {
    fn schema_name() -> Cow<'static, str> {
        "Timestamp".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        string("", Some("date-time"), "RFC 3339, UTC, whole seconds, e.g. 2025-01-31T12:00:00Z")
    }
}

impl JsonSchema for AddressPool {
    fn schema_name() -> Cow<'static, str> {
        "AddressPool".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        string(
            r"^[0-9]{1,3}(\.[0-9]{1,3}){3}/(1[6-9]|2[0-8])$",
            None,
            &format!("IPv4 CIDR block from /{MIN_PREFIX} to /{MAX_PREFIX} without host bits, e.g. 10.0.9.0/24"),
        )
    }
}

impl JsonSchema for PortRange {
    fn schema_name() -> Cow<'static, str> {
        "PortRange".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let port = "0*(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})";
        string(&format!("^{port}(-{port})?$"), None, "TCP port \"N\" or range \"N-M\", ports 1-65535, N <= M")
    }
}

#[cfg(test)]
mod tests {
    use schemars::schema_for;

    use crate::ids::VpcId;
    use crate::objects::Subnet;

    #[test]
    fn hand_written_schemas_carry_the_parsers_rules() {
        let vpc = schema_for!(VpcId);
        assert_eq!(vpc.get("pattern").unwrap(), "^vpc-[0-9a-f]{17}$");
        let subnet = serde_json::to_value(schema_for!(Subnet)).unwrap();
        assert_eq!(subnet["properties"]["cidrBlock"]["$ref"], "#/$defs/AddressPool");
        assert_eq!(subnet["$defs"]["Timestamp"]["format"], "date-time");
        assert_eq!(subnet["$defs"]["AccountId"]["pattern"], "^acct-[0-9]{12}$");
    }
}
