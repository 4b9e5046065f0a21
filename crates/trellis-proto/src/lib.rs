//! The contracts between the control plane and the agents: the agent config
//! schema, the agent-facing API bodies, the join token format, and the sans-IO
//! stream protocol spoken between endpoint and gateway agents, and the relay
//! protocol spoken with `trellis relay`.
//!
//! Pure: no sockets, no clock, no randomness. Everything here is shared by
//! `trellis-control` (which produces configs) and `trellis-agent` (which
//! consumes them), so a change here is a change of the wire contract.
#![forbid(unsafe_code)]

pub mod agent_api;
pub mod config;
mod frame;
pub mod join_token;
pub mod limits;
pub mod mux;
pub mod ports;
pub mod proxy_v2;
pub mod relay;
pub mod stream;

pub use config::*;
pub use limits::*;
pub use ports::{PortRange, PortRangeError};
