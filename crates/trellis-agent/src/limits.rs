//! How many sockets each part of the agent may hold, derived from the
//! process's open-files limit, so that no role (or peer) can make the agent
//! run out of descriptors and refuse everyone else.
//!
//! [`raise_open_files_limit`] lifts the soft `RLIMIT_NOFILE` to the hard limit
//! at start; [`Limits::from_open_files`] (pure) turns the result into budgets.
//! A descriptor reserve is kept for the runtime, the control-plane client, the
//! DNS and metrics listeners and files.

/// Descriptors never handed to a budget: runtime, control-plane connections,
/// DNS, metrics, state files, logs.
pub const RESERVED_FILES: u64 = 256;

/// Budgets stop growing here (an "unlimited" hard limit would otherwise
/// overflow the semaphores that enforce them).
const MAX_COUNTED_FILES: u64 = 1 << 22;

/// Budgets of the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The open-files limit these budgets were derived from.
    pub open_files: u64,
    /// Tunnel connections the gateway role holds at once (idle, in handshake
    /// or proxying); each proxied one also holds a connection to the resource.
    pub tunnel_connections: usize,
    /// Of those, at most this many from one peer agent (by certificate): the
    /// rest is kept for the other peers.
    pub tunnel_connections_per_peer: usize,
    /// Of those, at most this many still in the TLS handshake (unauthenticated).
    pub tunnel_handshakes: usize,
    /// Of one peer's connections, at most this many authenticated but still
    /// waiting for their open request (a peer's warm pool needs two or so).
    pub pending_tunnels_per_peer: usize,
    /// Listening sockets of the endpoint role, across all endpoints.
    pub endpoint_listeners: usize,
    /// Warm (idle, pre-connected) tunnel connections kept toward gateway
    /// agents, across all gateways.
    pub warm_tunnels: usize,
}

impl Limits {
    /// Budgets for an agent allowed `open_files` descriptors.
    ///
    /// Of the descriptors above [`RESERVED_FILES`], three quarters may go to
    /// the gateway role's tunnel connections and flows (one descriptor each:
    /// a tunnel connection its socket, a flow its socket to the resource; the
    /// flows share their tunnel connections), the last quarter staying for
    /// the endpoint role's clients; a quarter may go to endpoint listeners; a
    /// thirty-second to warm connections. One peer may take all but a
    /// sixteenth of the gateway's share.
    pub fn from_open_files(open_files: u64) -> Self {
        let usable = usable_files(open_files);
        let tunnel_connections = usable / 4 * 3;
        Self {
            open_files,
            tunnel_connections,
            tunnel_connections_per_peer: (tunnel_connections - tunnel_connections / 16).max(1),
            tunnel_handshakes: (tunnel_connections / 4).max(8),
            pending_tunnels_per_peer: (tunnel_connections / 16).clamp(8, 256),
            endpoint_listeners: (usable / 4).max(16),
            warm_tunnels: (usable / 32).max(2),
        }
    }
}

/// The descriptors above [`RESERVED_FILES`] of a process allowed
/// `open_files` (at least 64, at most [`MAX_COUNTED_FILES`]).
pub fn usable_files(open_files: u64) -> usize {
    let counted = open_files.min(MAX_COUNTED_FILES).saturating_sub(RESERVED_FILES);
    // At most MAX_COUNTED_FILES, which fits any usize of 32 bits or more.
    usize::try_from(counted).unwrap_or(usize::MAX).max(64)
}

impl std::fmt::Display for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "open-files limit {}: up to {} tunnel connections ({} per peer agent, {} in handshake, {} waiting for an open request per peer), {} endpoint listeners, {} warm tunnels",
            self.open_files,
            self.tunnel_connections,
            self.tunnel_connections_per_peer,
            self.tunnel_handshakes,
            self.pending_tunnels_per_peer,
            self.endpoint_listeners,
            self.warm_tunnels
        )
    }
}

/// Raises the soft open-files limit to the hard one and returns the soft
/// limit in force afterwards (the old one, with a warning, if raising failed).
pub fn raise_open_files_limit() -> u64 {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(1024);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(now) => {
            if now > before {
                tracing::info!(
                    from = before,
                    to = now,
                    "raised the open-files limit (soft RLIMIT_NOFILE) to the hard limit"
                );
            }
            now
        }
        Err(e) => {
            tracing::warn!(limit = before, error = %e, "could not raise the open-files limit; budgets follow the current one");
            before
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_usual_1024_leaves_headroom_and_caps_every_budget() {
        let l = Limits::from_open_files(1024);
        // 768 usable: the gateway's connections and flows (a descriptor each) and a quarter for
        // the endpoint role's clients fit, with the reserve left over.
        assert_eq!(l.tunnel_connections, 576);
        assert!(l.tunnel_connections as u64 + 768 / 4 + RESERVED_FILES <= 1024);
        assert!(l.tunnel_connections_per_peer < l.tunnel_connections);
        assert!(l.tunnel_handshakes < l.tunnel_connections);
        assert_eq!(l.endpoint_listeners, 192);
        assert_eq!(l.warm_tunnels, 24);
        assert_eq!(l.pending_tunnels_per_peer, 36);
    }

    #[test]
    fn one_peer_never_gets_every_tunnel_connection() {
        for files in [0, 100, 1024, 20_000, 1 << 20, u64::MAX] {
            let l = Limits::from_open_files(files);
            assert!(l.tunnel_connections_per_peer < l.tunnel_connections, "{l}");
            assert!(l.pending_tunnels_per_peer <= l.tunnel_connections_per_peer, "{l}");
            assert!(l.tunnel_handshakes >= 8 && l.endpoint_listeners >= 16 && l.warm_tunnels >= 2, "{l}");
            // Each becomes a semaphore.
            assert!(l.tunnel_connections <= tokio::sync::Semaphore::MAX_PERMITS, "{l}");
        }
    }

    #[test]
    fn raising_the_limit_never_lowers_it() {
        let before = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap().0;
        assert!(raise_open_files_limit() >= before);
    }
}
