//! Single-flow throughput through one multiplexed tunnel connection (TLS
//! 1.3 over loopback, as between two agents) with an in-process delay line
//! that holds every chunk for a one-way delay in each direction:
//!
//! ```text
//! cargo run --release -p trellis-agent --example muxbench -- <one-way delay µs> <MiB>
//! ```
//!
//! The endpoint side writes `<MiB>` on one flow; the gateway side reads it to
//! the end and the rate is timed from its first byte. The delay line adds no
//! bandwidth limit, so the figure is what the flow's window (one window per
//! round trip) and the CPU allow. See docs/performance.md, "Many flows per
//! tunnel connection".

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use trellis_agent::mux::{MuxConnection, Side, run};
use trellis_proto::stream::{OpenRequest, OpenResponse, OpenStatus};

async fn delay_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    while let Some((at, bytes)) = rx.recv().await {
        tokio::time::sleep_until(at).await;
        if to.write_all(&bytes).await.is_err() {
            return;
        }
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let delay = Duration::from_micros(args[0]);
    let total = args[1] as usize * 1024 * 1024;

    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();

    let gw_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw_addr = gw_listener.local_addr().unwrap();
    let line = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let line_addr = line.local_addr().unwrap();
    tokio::spawn(async move {
        let (a, _) = line.accept().await.unwrap();
        let b = TcpStream::connect(gw_addr).await.unwrap();
        let (ar, aw) = a.into_split();
        let (br, bw) = b.into_split();
        tokio::spawn(delay_copy(ar, bw, delay));
        tokio::spawn(delay_copy(br, aw, delay));
    });
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    tokio::spawn(async move {
        let (tcp, _) = gw_listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let gw = MuxConnection::new(Side::Gateway);
        tokio::spawn(run(gw.clone(), tls));
        let (mut s, _) = gw.accept().await.unwrap();
        s.respond(&OpenResponse::new(OpenStatus::Ok, ""));
        let mut buf = vec![0u8; 64 * 1024];
        let mut n = 0;
        let mut start = None;
        loop {
            match s.read(&mut buf).await.unwrap() {
                0 => break,
                k => {
                    start.get_or_insert_with(Instant::now);
                    n += k;
                }
            }
        }
        let _ = done_tx.send((n, start.unwrap().elapsed()));
        let _ = s.shutdown().await;
        std::mem::forget(s);
    });

    let tcp = TcpStream::connect(line_addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let ep = MuxConnection::new(Side::Endpoint);
    tokio::spawn(run(ep.clone(), tls));
    let mut s = ep
        .open(&OpenRequest {
            vpc_endpoint_id: "vpce-1".into(),
            resource_configuration_id: "rcfg-1".into(),
            port: 80,
            client_addr: "127.0.0.1:9".parse().unwrap(),
        })
        .unwrap_or_else(|_| panic!("open"));
    s.response().await.unwrap();
    let chunk = vec![1u8; 64 * 1024];
    for _ in 0..total / chunk.len() {
        s.write_all(&chunk).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let (n, took) = done_rx.await.unwrap();
    println!(
        "one-way delay {:?}: {} MiB in {:.2?}: {:.0} MiB/s",
        delay,
        n >> 20,
        took,
        n as f64 / 1048576.0 / took.as_secs_f64()
    );
}
