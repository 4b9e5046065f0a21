//! Making endpoint addresses local to this host.
//!
//! An endpoint address comes from the subnet's pool (`AgentConfig::address_pool`,
//! e.g. `10.0.9.0/24`). To listen on it, the kernel must treat it as local.
//! With `--manage-routes` the agent runs `ip route replace local <pool> dev lo`
//! (Linux, needs CAP_NET_ADMIN) when an address of the pool is not already
//! local, and removes that route when the pool changes or the agent stops.
//! A loopback pool such as `127.77.0.0/24` is always local and needs nothing.
//!
//! Without `--manage-routes` the operator does it once per host:
//!
//! ```text
//! ip route replace local 10.0.9.0/24 dev lo      # make the pool local on the agent host
//! ```
//!
//! and, so clients elsewhere in the network reach those addresses, routes the
//! pool to the agent host (a static route on the LAN router, or a VPC route
//! table entry targeting the agent's interface, with source/destination checks
//! disabled on cloud instances).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use ipnet::IpNet;

/// Adds and removes the local route of the address pool.
#[derive(Debug)]
pub struct RouteManager {
    enabled: bool,
    /// The pool whose route this agent added (and so removes).
    installed: Option<IpNet>,
}

impl RouteManager {
    pub fn new(enabled: bool) -> Self {
        Self { enabled, installed: None }
    }

    /// Whether it manages routes at all (`--manage-routes`).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Makes `pool` local if some of `addresses` (in it) cannot be bound yet.
    pub fn apply(&mut self, pool: &str, addresses: impl Iterator<Item = IpAddr>) {
        if !self.enabled || pool.is_empty() {
            return;
        }
        let pool: IpNet = match pool.parse() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(pool, error = %e, "the config's address pool is not a CIDR; not adding a route");
                return;
            }
        };
        if self.installed == Some(pool) {
            return;
        }
        let addresses: Vec<IpAddr> = addresses.filter(|a| pool.contains(a)).collect();
        if addresses.iter().all(|a| is_local(*a)) {
            return;
        }
        self.remove_all();
        match ip_route("replace", pool) {
            Ok(()) => {
                tracing::info!(%pool, "added local route for the endpoint address pool");
                self.installed = Some(pool);
            }
            Err(e) => tracing::error!(
                %pool,
                error = %e,
                "could not add the local route for the endpoint address pool; run `ip route replace local {pool} dev lo` as root"
            ),
        }
    }

    /// Removes the route this agent added, if any.
    pub fn remove_all(&mut self) {
        if let Some(pool) = self.installed.take()
            && let Err(e) = ip_route("del", pool)
        {
            tracing::warn!(%pool, error = %e, "could not remove the local route of the address pool");
        }
    }
}

/// Whether `addr` can be bound on this host right now.
fn is_local(addr: IpAddr) -> bool {
    match std::net::TcpListener::bind(SocketAddr::new(addr, 0)) {
        Ok(_) => true,
        Err(e) => e.kind() != io::ErrorKind::AddrNotAvailable,
    }
}

fn ip_route(verb: &str, pool: IpNet) -> io::Result<()> {
    let out = Command::new("ip").args(["route", verb, "local", &pool.to_string(), "dev", "lo"]).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_pool_needs_no_route() {
        let mut routes = RouteManager::new(true);
        routes.apply("127.77.0.0/24", ["127.77.0.5".parse().unwrap()].into_iter());
        assert_eq!(routes.installed, None);
    }

    #[test]
    fn disabled_manager_never_touches_routes() {
        let mut routes = RouteManager::new(false);
        routes.apply("198.51.100.0/24", ["198.51.100.5".parse().unwrap()].into_iter());
        assert_eq!(routes.installed, None);
    }
}
