//! The Trellis object model: typed ids, validated values, the stored objects
//! as the API shows them, their state machines, and the sharing rule.
//!
//! Pure: no clock, no randomness, no I/O. Callers pass `now` and random
//! [`ids::Seed`] bytes. With the `store` feature the stored objects implement
//! `trellis_store::Object`; with the `schema` feature the API objects
//! implement `schemars::JsonSchema` (for the OpenAPI document).
#![forbid(unsafe_code)]

pub mod access;
pub mod arn;
pub mod dns;
pub mod domain;
pub mod endpoint;
pub mod ids;
pub mod notification;
pub mod objects;
pub mod pool;
pub mod ports;
pub mod service;
pub mod status;
pub mod time;
pub mod validate;

#[cfg(feature = "schema")]
pub mod schema;
#[cfg(feature = "store")]
mod store_impl;

pub use access::{Access, Principal, configuration_access, same_organization};
pub use arn::{Arn, ArnError, kinds, parse_identifier};
pub use dns::{RESERVED_ZONE, is_reserved_dns_name, name_is_under};
pub use domain::{
    CheckOutcome, DomainNameError, DomainVerification, DomainVerificationStatus, covers, validate_custom_domain_name,
    validate_verification_domain,
};
pub use endpoint::{
    PlacementError, Pools, check_zone_overlap, endpoint_dns_name, interface_regional_name, interface_zonal_name,
    plan_dns_entries, plan_interface_entries,
};
pub use ids::*;
pub use notification::*;
pub use objects::*;
pub use pool::{AddressPool, PoolError};
pub use ports::{PortRange, PortRangeError, PortRangesError, parse_port_ranges, ranges_cover};
pub use service::*;
pub use status::*;
pub use time::Timestamp;
pub use validate::*;
