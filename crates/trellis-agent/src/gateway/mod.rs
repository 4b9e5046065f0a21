//! Gateway role: accept tunnels from endpoint agents, decide whether each
//! stream may reach its resource, dial the resource in the owner's network and
//! splice bytes. The gateway never opens a stream toward an endpoint.

pub mod authorize;
pub mod dial;
pub mod listener;

pub use listener::{GatewayContext, GatewayTimeouts};
