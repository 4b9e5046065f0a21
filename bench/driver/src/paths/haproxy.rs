//! `haproxy-2hop`: client → haproxy → haproxy → server, plain TCP: the
//! unencrypted two-hop baseline (a tunnel has two hops too, endpoint and gateway).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path as FsPath, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{Backends, Loopback, Path, wait_ready};
use crate::Res;
use crate::proc::Daemon;

pub struct Haproxy2Hop {
    bin: PathBuf,
    dir: PathBuf,
    entry: IpAddr,
    backends: Backends,
    first: Option<Daemon>,
    second: Option<Daemon>,
}

impl Haproxy2Hop {
    /// Writes both configurations and starts both processes. `max_connections` sizes `maxconn`.
    pub fn start(bin: &FsPath, dir: &FsPath, ips: Loopback, backends: Backends, max_connections: usize) -> Res<Self> {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let (entry, middle) = (ips.host(1), ips.host(2));
        let hop = |listen: IpAddr, to: IpAddr| -> String {
            let proxy = |name: &str, port: u16| {
                format!(
                    "frontend {name}\n    bind {}\n    default_backend {name}\n\nbackend {name}\n    server s1 {}\n\n",
                    SocketAddr::new(listen, port),
                    SocketAddr::new(to, port)
                )
            };
            format!(
                "global\n    maxconn {max}\n\ndefaults\n    mode tcp\n    maxconn {max}\n    timeout connect 5s\n    \
                 timeout client 1h\n    timeout server 1h\n\n{}{}{}",
                proxy("echo", backends.echo.port()),
                proxy("iperf", backends.iperf.port()),
                backends.postgres.map(|pg| proxy("postgres", pg.port())).unwrap_or_default(),
                max = max_connections + 100,
            )
        };
        let first_cfg = dir.join("haproxy-1.cfg");
        let second_cfg = dir.join("haproxy-2.cfg");
        write(&first_cfg, &hop(entry, middle))?;
        write(&second_cfg, &hop(middle, backends.echo.ip()))?;
        let mut path =
            Haproxy2Hop { bin: bin.to_path_buf(), dir: dir.to_path_buf(), entry, backends, first: None, second: None };
        path.restart()?;
        Ok(path)
    }

    fn spawn(&self, name: &str) -> Res<Daemon> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-db").arg("-f").arg(self.dir.join(format!("{name}.cfg")));
        Daemon::spawn(name, cmd, &self.dir.join("logs"), "TERM")
    }
}

fn write(path: &FsPath, text: &str) -> Res<()> {
    std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}

impl Path for Haproxy2Hop {
    fn name(&self) -> &'static str {
        "haproxy-2hop"
    }

    fn echo_addr(&self) -> SocketAddr {
        SocketAddr::new(self.entry, self.backends.echo.port())
    }

    fn iperf_addr(&self) -> SocketAddr {
        SocketAddr::new(self.entry, self.backends.iperf.port())
    }

    fn pg_addr(&self) -> Option<SocketAddr> {
        self.backends.postgres.map(|pg| SocketAddr::new(self.entry, pg.port()))
    }

    fn tunnel_pids(&self) -> Vec<u32> {
        self.first.iter().chain(self.second.iter()).map(Daemon::pid).collect()
    }

    fn restart(&mut self) -> Res<()> {
        // Stop before start: the new processes bind the same addresses.
        self.first = None;
        self.second = None;
        self.second = Some(self.spawn("haproxy-2")?);
        self.first = Some(self.spawn("haproxy-1")?);
        wait_ready(self.echo_addr(), Duration::from_secs(20)).map_err(|e| {
            let logs: Vec<String> = self.first.iter().chain(self.second.iter()).map(Daemon::log_tail).collect();
            format!("{e}; {}", logs.join("; "))
        })
    }

    fn version(&self) -> Option<String> {
        Some(crate::first_line_of(&self.bin, &["-v"]))
    }

    fn check(&mut self) -> Res<()> {
        for d in self.first.iter_mut().chain(self.second.iter_mut()) {
            d.check_running()?;
        }
        Ok(())
    }
}
