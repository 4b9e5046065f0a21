//! The paths under test. Each one leads the same client to the same echo and
//! iperf3 servers; each entry listens on its own loopback address at the
//! server's own port, as a Trellis endpoint does.

pub mod direct;
pub mod haproxy;
pub mod rathole;
pub mod trellis;
pub mod trellis_relay;
pub mod trellis_service;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use crate::Res;
use crate::client;

/// What every path offers to the measurements.
pub trait Path {
    /// The name in the report: `direct`, `haproxy-2hop`, `rathole-tls`, `trellis`, `trellis-service`,
    /// `trellis-relay`.
    fn name(&self) -> &'static str;
    /// Where the client connects for the echo server.
    fn echo_addr(&self) -> SocketAddr;
    /// Where the client connects for the iperf3 server.
    fn iperf_addr(&self) -> SocketAddr;
    /// Where pgbench connects for the PostgreSQL server, when the run has one.
    fn pg_addr(&self) -> Option<SocketAddr>;
    /// PIDs of the tunnel processes whose memory is weighed (none for `direct`).
    fn tunnel_pids(&self) -> Vec<u32>;
    /// Restarts the tunnel processes, so memory is weighed from a fresh start; returns when the path carries traffic.
    fn restart(&mut self) -> Res<()>;
    /// Err with the logs of a tunnel process that has died.
    fn check(&mut self) -> Res<()>;
    /// The endpoint lifecycle figures, for paths that have endpoints (Trellis).
    fn lifecycle(&mut self, _rep: usize) -> Option<Res<trellis::Lifecycle>> {
        None
    }
    /// Health-check failover, for paths that balance over targets (a Trellis endpoint service):
    /// `second` is the echo server of the target to stop, restarted afterwards.
    fn failover(&mut self, _second: &mut crate::echo::Server) -> Option<Res<trellis_service::Failover>> {
        None
    }
    /// A check of the whole run, after the repetitions: Ok with a line for the report, Err when
    /// the path did not carry the traffic the way it claims to (the relay path: through its relay).
    fn verify(&mut self) -> Option<Res<String>> {
        None
    }
    /// The version of the tunnel software, for the report.
    fn version(&self) -> Option<String> {
        None
    }
}

/// The ports of the servers every path leads to.
#[derive(Clone, Copy, Debug)]
pub struct Backends {
    pub echo: SocketAddr,
    pub iperf: SocketAddr,
    /// PostgreSQL for pgbench (127.0.0.1, and 127.0.0.2 at the same port for `trellis-service`).
    pub postgres: Option<SocketAddr>,
}

/// Loopback addresses for one run: `127.248.<run>.<host>` for the entries,
/// `127.249-251.<run>.0/24` for Trellis pools, `127.247.<run>.x` for clients;
/// apart from the 127.16–239.x pools the end-to-end tests draw from.
#[derive(Clone, Copy, Debug)]
pub struct Loopback {
    pub run: u8,
}

impl Loopback {
    pub fn host(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 248, self.run, host))
    }

    /// Source addresses of the connection-rate client: `127.247.<run>.1-64`.
    pub fn client_sources(&self) -> Vec<IpAddr> {
        (1..=64).map(|h| IpAddr::V4(Ipv4Addr::new(127, 247, self.run, h))).collect()
    }

    /// A /24 pool for Trellis subnets; `which` tells them apart.
    pub fn pool(&self, which: u8) -> String {
        format!("127.{}.{}.0/24", 249 + which, self.run)
    }
}

/// Waits until a connection through `addr` gets the echo server's greeting.
pub fn wait_ready(addr: SocketAddr, timeout: Duration) -> Res<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let err = match client::first_byte(addr, Duration::from_secs(2)) {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!("no greeting through {addr} within {timeout:?}: {err}"));
        }
        thread::sleep(Duration::from_millis(50));
    }
}
