//! The one server behind every path: on accept it sends one greeting byte (so a
//! client can time connect-plus-first-byte without sending anything), then
//! echoes every byte back until the client closes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::Res;

/// The byte the server sends first on every connection.
pub const GREETING: u8 = b'*';

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
