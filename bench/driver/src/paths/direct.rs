//! `direct`: the client talks to the servers themselves.

use std::net::SocketAddr;

use super::{Backends, Path};
use crate::Res;

pub struct Direct {
    backends: Backends,
}

impl Direct {
    pub fn new(backends: Backends) -> Direct {
        Direct { backends }
    }
}

impl Path for Direct {
    fn name(&self) -> &'static str {
        "direct"
    }

    fn echo_addr(&self) -> SocketAddr {
        self.backends.echo
    }

    fn iperf_addr(&self) -> SocketAddr {
        self.backends.iperf
    }

    fn pg_addr(&self) -> Option<SocketAddr> {
        self.backends.postgres
    }

    fn tunnel_pids(&self) -> Vec<u32> {
        Vec::new()
    }

    fn restart(&mut self) -> Res<()> {
        Ok(())
    }

    fn check(&mut self) -> Res<()> {
        Ok(())
    }
}
