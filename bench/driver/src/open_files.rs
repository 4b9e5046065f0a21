//! How many idle connections each path of a run can hold within the
//! open-files limit, and what limit a number of them needs. The driver and
//! every process it starts share one limit: `bench/run` raises the soft limit
//! to the hard one before it starts the driver, and the driver does the same
//! for itself (the Trellis agents and relay also raise their own at start).
//!
//! Descriptors per idle proxied connection, in each process that holds them:
//! - the driver holds one client socket, the echo server one accepted socket
//!   (every path);
//! - haproxy: each of the two holds the client side and the server side (2);
//! - rathole: the server holds the client's connection and its data channel,
//!   the client the data channel and its connection to the server (2);
//! - Trellis (multiplexed tunnel, stream protocol version 2): the endpoint
//!   agent holds the client's connection (1), its flows share a few tunnel
//!   connections (one per [`MAX_FLOWS_PER_CONNECTION`] flows); the gateway
//!   agent holds one socket to the target per flow (1) and the same tunnel
//!   connections; a relay holds two per relayed tunnel connection, not per
//!   flow. The gateway also caps what one peer agent holds, flows and tunnel
//!   connections together (`Limits::tunnel_connections_per_peer`, from its
//!   own open-files limit; docs/security.md, Budgets): every flow of the run
//!   comes from one endpoint agent, so that cap bounds them too.
//!
//! Each path holds what it carries, so a tight limit lowers the two-descriptor
//! proxies without lowering the Trellis paths (the figure compared is per
//! 1,000 connections).

use trellis_agent::Limits;
use trellis_proto::mux::MAX_FLOWS_PER_CONNECTION;

/// Descriptors of a process kept for everything but the proxied connections:
/// listeners, the runtime, logs, control-plane connections, the agents' own
/// reserve (`trellis_agent::limits::RESERVED_FILES`, 256) included.
const RESERVE: u64 = 300;

/// Of a gateway's per-peer cap, kept for the endpoint agent's warm tunnel
/// connections and the one-connection probes between measurements.
const PEER_MARGIN: u64 = 16;

/// The most idle connections `path` carries when each process may open `open_files` descriptors.
pub fn capacity(path: &str, open_files: u64) -> u64 {
    let usable = open_files.saturating_sub(RESERVE);
    match path {
        "haproxy-2hop" | "rathole-tls" => usable / 2,
        "trellis" | "trellis-service" | "trellis-relay" => {
            let per_peer = Limits::from_open_files(open_files).tunnel_connections_per_peer as u64;
            // n flows ride on ceil(n / MAX_FLOWS_PER_CONNECTION) tunnel connections, counted against the same cap.
            let per_connection = MAX_FLOWS_PER_CONNECTION as u64;
            let by_cap = per_peer.saturating_sub(PEER_MARGIN) * per_connection / (per_connection + 1);
            usable.min(by_cap)
        }
        // direct (and anything else): one descriptor per connection in the driver and the echo server.
        _ => usable,
    }
}

/// The idle connections `path` holds in a run that wants `wanted`: all of them, or the most it
/// carries within `open_files` (in hundreds).
pub fn idle_for(wanted: usize, path: &str, open_files: u64) -> usize {
    wanted.min((capacity(path, open_files) / 100 * 100) as usize)
}

/// The smallest open-files limit with which every one of `paths` carries `n` idle connections.
pub fn needed_for(n: usize, paths: &[&str]) -> u64 {
    let n = n as u64;
    let (mut low, mut high) = (0u64, (n + RESERVE) * 4);
    // capacity() grows with the limit: the first limit that carries n, by bisection.
    while low < high {
        let mid = (low + high) / 2;
        if paths.iter().all(|p| capacity(p, mid) >= n) { high = mid } else { low = mid + 1 }
    }
    low
}

/// Raises this process's soft open-files limit to its hard limit (inherited by the processes it
/// starts); returns the soft limit in force afterwards, None when it cannot be read.
pub fn raise_to_hard() -> Option<u64> {
    // increase_nofile_limit stops at the kernel's own bound when the hard limit is "unlimited".
    rlimit::increase_nofile_limit(u64::MAX)
        .ok()
        .or_else(|| rlimit::getrlimit(rlimit::Resource::NOFILE).ok().map(|l| l.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[&str] = &["direct", "haproxy-2hop", "rathole-tls", "trellis", "trellis-service", "trellis-relay"];

    #[test]
    fn two_descriptor_proxies_hold_half_the_limit() {
        assert_eq!(capacity("haproxy-2hop", 20_000), 9_850);
        assert_eq!(capacity("rathole-tls", 20_000), 9_850);
        assert_eq!(capacity("direct", 20_000), 19_700);
    }

    #[test]
    fn trellis_is_bounded_by_the_gateways_per_peer_cap_not_by_two_descriptors_each() {
        // L = 20,000: the gateway gives one peer 13,883 flows and connections (docs/security.md).
        assert_eq!(Limits::from_open_files(20_000).tunnel_connections_per_peer, 13_883);
        let cap = capacity("trellis-relay", 20_000);
        // n flows and their tunnel connections (64 flows each) fit the cap with the margin.
        assert_eq!(MAX_FLOWS_PER_CONNECTION, 64);
        assert!(cap + cap.div_ceil(64) + PEER_MARGIN <= 13_883, "{cap}");
        assert!(cap + 1 + (cap + 1).div_ceil(64) + PEER_MARGIN > 13_883, "{cap}");
        // At any limit the cap (about 23/32 of it), not the agents' one descriptor per connection, binds.
        for limit in [1_024, 20_000, 1_000_000] {
            assert!(capacity("trellis", limit) < capacity("direct", limit), "{limit}");
        }
        assert_eq!(needed_for(10_000, &["trellis"]), needed_for(10_000, &["trellis-relay"]));
    }

    #[test]
    fn each_path_holds_what_it_carries_in_hundreds() {
        assert_eq!(idle_for(10_000, "trellis", 20_000), 10_000);
        assert_eq!(idle_for(10_000, "trellis-relay", 20_000), 10_000);
        assert_eq!(idle_for(10_000, "haproxy-2hop", 20_000), 9_800);
        assert_eq!(idle_for(2_000, "haproxy-2hop", 20_000), 2_000);
        assert_eq!(idle_for(10_000, "direct", 1_024), 700);
    }

    #[test]
    fn the_limit_needed_for_ten_thousand_carries_them_and_one_less_does_not() {
        let needed = needed_for(10_000, ALL);
        assert!(ALL.iter().all(|p| capacity(p, needed) >= 10_000));
        assert!(ALL.iter().any(|p| capacity(p, needed - 1) < 10_000));
        assert!(ALL.iter().all(|p| idle_for(10_000, p, needed) == 10_000));
        // haproxy's and rathole's two descriptors per connection need more than the Trellis paths.
        assert_eq!(needed, needed_for(10_000, &["haproxy-2hop", "rathole-tls"]));
        assert!(needed > needed_for(10_000, &["trellis", "trellis-service", "trellis-relay"]), "{needed}");
        assert_eq!(needed, 20_300, "docs/performance.md says so");
    }
}
