//! The one server behind every path: on accept it sends one greeting byte (so a
//! client can time connect-plus-first-byte without sending anything), then
//! echoes every byte back until the client closes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::Res;
use crate::proc::Daemon;

/// The byte the server sends first on every connection.
pub const GREETING: u8 = b'*';

/// An echo server process of a run (`trellis-bench echo-server`), at a known address.
pub struct Server {
    name: String,
    logs: PathBuf,
    daemon: Daemon,
    pub addr: SocketAddr,
    starts: u32,
}

impl Server {
    /// Starts an echo server on `listen` (port 0: any free port) and waits until it listens.
    pub fn start(name: &str, listen: SocketAddr, logs: &Path) -> Res<Server> {
        let (daemon, addr) = spawn(name, listen, logs)?;
        Ok(Server { name: name.to_string(), logs: logs.to_path_buf(), daemon, addr, starts: 1 })
    }

    /// Stops the process (by its PID).
    pub fn stop(&mut self) {
        self.daemon.stop();
    }

    /// Starts a new process at the same address (after [`Server::stop`]).
    pub fn start_again(&mut self) -> Res<()> {
        self.daemon.stop();
        self.starts += 1;
        let (daemon, _) = spawn(&format!("{}-start{}", self.name, self.starts), self.addr, &self.logs)?;
        self.daemon = daemon;
        Ok(())
    }

    pub fn check_running(&mut self) -> Res<()> {
        self.daemon.check_running()
    }
}

fn spawn(name: &str, listen: SocketAddr, logs: &Path) -> Res<(Daemon, SocketAddr)> {
    let mut cmd = Command::new(crate::self_exe()?);
    cmd.args(["echo-server", "--listen", &listen.to_string()]);
    let mut daemon = Daemon::spawn(name, cmd, logs, "TERM")?;
    let addr = daemon.wait_for_log(&format!("{name} to listen on {listen}"), Duration::from_secs(10), |l| {
        l.strip_prefix("listening ")?.trim().parse().ok()
    })?;
    Ok((daemon, addr))
}

/// Serves until the process is killed. Prints `listening ADDR` on stdout once bound.
pub fn serve(listen: SocketAddr) -> Res<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async move {
        let socket = if listen.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
            .map_err(|e| format!("socket: {e}"))?;
        socket.set_reuseaddr(true).map_err(|e| format!("SO_REUSEADDR: {e}"))?;
        socket.bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
        let listener = socket.listen(4096).map_err(|e| format!("listen on {listen}: {e}"))?;
        let bound = listener.local_addr().map_err(|e| format!("local address: {e}"))?;
        println!("listening {bound}");
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(echo(stream));
                }
                Err(e) => {
                    // Out of descriptors or a reset before accept: keep serving the others.
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
}

async fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    if stream.write_all(&[GREETING]).await.is_err() {
        return;
    }
    // Small on purpose: ten thousand idle connections hold one each. Throughput goes through iperf3, not here.
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = stream.shutdown().await;
}
