//! The Trellis control plane: the HTTP API (accounts, VPCs, subnets,
//! resource gateways and configurations, shares, invitations, endpoints),
//! API-key authentication, the agent-facing routes (enrollment, config
//! long-poll, reports), the certificate authority, the config compiler and
//! usage aggregation.
//!
//! [`api_router`] is the whole API as an axum router; `server` serves it over TLS.
#![forbid(unsafe_code)]

pub mod access;
pub mod agents;
pub mod api;
pub mod auth;
pub mod compile;
pub mod configs;
pub mod conn_deadline;
pub mod conn_limits;
pub mod data_dir;
pub mod domain_verification;
pub mod error;
mod lists;
pub mod notify;
pub mod pki;
pub mod rate;
pub mod relays;
pub mod server;
pub mod state;
pub mod tls;
pub mod usage;

#[cfg(test)]
mod scale_tests;

pub use api::api_router;
pub use auth::bootstrap_admin;
pub use error::ApiError;
pub use state::{AppState, Settings};
