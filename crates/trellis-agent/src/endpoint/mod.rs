//! Endpoint role: listen on endpoint addresses in the consumer's network and
//! tunnel each client connection to a gateway agent. The endpoint side is the
//! only side that opens streams.

pub mod health;
pub mod listeners;
pub mod pool;
pub mod proxy;
mod relayed;
pub mod routes;

pub use listeners::ServedState;
pub use pool::{GatewayKey, GatewayPools, PoolSettings};
pub use proxy::EndpointContext;
