//! Small TCP services for a test, run as the `trellis-e2e-tcp` helper
//! process: one that greets every connection with a fixed line, and one that
//! echoes what it receives. Each binds the address it is given (port 0 picks a
//! free port; the bound address is read back from the helper's first line),
//! on the host or inside a namespace, and is stopped by PID on drop.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::bins;
use crate::netns::Netns;
use crate::process::Proc;

/// How long the helper may take to bind and print its address.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running helper service.
pub struct TcpService {
    pub proc: Proc,
    /// Where it listens (as seen inside its namespace).
    pub addr: SocketAddr,
    _logs: TempDir,
}

impl TcpService {
    /// A service on `addr` that answers every connection with `reply` and a
    /// newline, then closes it.
    pub fn greeter(name: &str, addr: SocketAddr, reply: &str, netns: Option<&Netns>) -> TcpService {
        TcpService::start(name, &["serve", &addr.to_string(), reply], netns)
    }

    /// A service on `addr` that echoes each connection's bytes until the
    /// client half-closes, then closes its side.
    pub fn echo(name: &str, addr: SocketAddr, netns: Option<&Netns>) -> TcpService {
        TcpService::start(name, &["echo", &addr.to_string()], netns)
    }

    fn start(name: &str, args: &[&str], netns: Option<&Netns>) -> TcpService {
        let helper = bins::tcp_helper();
        let mut cmd = match netns {
            Some(ns) => ns.command(&helper),
            None => Command::new(&helper),
        };
        cmd.args(args);
        let logs = tempfile::Builder::new().prefix("trellis-e2e-tcp-").tempdir().expect("temp dir for helper logs");
        let mut proc = Proc::spawn(name, cmd, logs.path());
        let addr = proc.wait_for_line(&format!("{name} to listen"), START_TIMEOUT, |l| {
            l.strip_prefix("listening on ")?.trim().parse::<SocketAddr>().ok()
        });
        TcpService { proc, addr, _logs: logs }
    }
}

/// Connects to `addr`, sends `data`, half-closes and reads until the peer
/// closes: what an echo service sends back.
pub fn echo_roundtrip(addr: SocketAddr, data: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(data)?;
    stream.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out)?;
    Ok(out)
}
