//! Gateway role: accept tunnels from endpoint agents, decide whether each
//! stream may reach its resource, dial the resource in the owner's network and
//! splice bytes. The gateway never opens a stream toward an endpoint.

pub mod admission;
pub mod attach;
pub mod authorize;
pub mod consumers;
pub mod dial;
pub mod listener;
pub mod services;

pub use listener::{GatewayContext, GatewayTimeouts};

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use trellis_proto::AgentConfig;

/// For an agent started without a tunnel listener: says so, once per change,
/// when its config gives it resources to serve as a gateway.
pub async fn warn_without_listener(mut config: watch::Receiver<Arc<AgentConfig>>, shutdown: CancellationToken) {
    let mut warned = false;
    loop {
        let resources = config.borrow_and_update().gateway.resources.len();
        if resources > 0 && !warned {
            tracing::warn!(
                resources,
                "this agent's subnet serves a resource gateway, but the agent has no tunnel listener, so no endpoint agent can reach it through this agent; restart it with --advertise HOST:PORT"
            );
        }
        warned = resources > 0;
        tokio::select! {
            r = config.changed() => if r.is_err() { return },
            () = shutdown.cancelled() => return,
        }
    }
}
