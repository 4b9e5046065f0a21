//! Test support: a throw-away CA that issues agent identities shaped like the
//! control plane's (DNS SAN `agent_server_name(agent_id)`, URI SAN naming agent, account and VPC), so the data plane
//! can be exercised without a control plane. Used by this crate's tests and by
//! end-to-end harnesses; never by the agent itself.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use trellis_proto::stream::OpenRequest;

use crate::identity::AgentIdentity;

/// A CA key and certificate held in memory.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    /// A fresh CA named "Trellis test CA".
    pub fn new() -> Self {
        // Key generation and self-signing only fail on a broken crypto provider.
        let key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Trellis test CA");
        params.distinguished_name = dn;
        let cert = params.self_signed(&key).expect("self-sign CA");
        Self { cert: cert.der().clone(), issuer: Issuer::new(params, key) }
    }

    /// The CA certificate (DER).
    pub fn cert(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    /// Issues an identity for an agent, as the control plane's enrollment does.
    pub fn issue(&self, agent_id: &str, account_id: &str, vpc_id: &str) -> AgentIdentity {
        let key = KeyPair::generate().expect("generate agent key");
        let uri = trellis_proto::AgentIdentityUri {
            agent_id: agent_id.to_string(),
            account_id: account_id.to_string(),
            vpc_id: vpc_id.to_string(),
        }
        .to_uri();
        let cert = self.sign_with_uri(&key, &[trellis_proto::agent_server_name(agent_id)], Some(&uri));
        AgentIdentity {
            agent_id: agent_id.to_string(),
            account_id: account_id.to_string(),
            vpc_id: vpc_id.to_string(),
            subnet_id: "subnet-00000000000000001".to_string(),
            cert,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            ca: self.cert(),
        }
    }

    /// Issues a relay identity, as the control plane's relay enrollment does
    /// (DNS SAN `relay_server_name`, URI SAN `relay_identity_uri`).
    pub fn issue_relay(&self, relay_id: &str, zone: &str) -> crate::relay::RelayIdentity {
        let key = KeyPair::generate().expect("generate relay key");
        let uri = trellis_proto::relay_identity_uri(relay_id);
        let cert = self.sign_with_uri(&key, &[trellis_proto::relay_server_name(relay_id)], Some(&uri));
        crate::relay::RelayIdentity {
            relay_id: relay_id.to_string(),
            zone: zone.to_string(),
            cert,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            ca: self.cert(),
        }
    }

    /// A server certificate and key for `names` (DNS names or IP addresses), for test HTTPS servers.
    pub fn server_cert(&self, names: &[&str]) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().expect("generate server key");
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = self.sign(&key, &names);
        (cert, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
    }

    fn sign(&self, key: &KeyPair, names: &[String]) -> CertificateDer<'static> {
        self.sign_with_uri(key, names, None)
    }

    fn sign_with_uri(&self, key: &KeyPair, names: &[String], uri: Option<&str>) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(names.to_vec()).expect("leaf params");
        if let Some(uri) = uri {
            params.subject_alt_names.push(rcgen::SanType::URI(uri.try_into().expect("an ASCII URI")));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.signed_by(key, &self.issuer).expect("sign leaf").der().clone()
    }
}

/// The agents' copy loop between two streams (both directions, half-close
/// preserved), as a proxied connection runs it once the open exchange is done:
/// the one entry point the instruction-count harness (`bench/instructions`)
/// measures it through. Returns how many bytes went `a` → `b` and `b` → `a`.
pub async fn copy_both_ways(a: tokio::io::DuplexStream, b: tokio::io::DuplexStream) -> std::io::Result<(u64, u64)> {
    let (up, down) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0u64));
    let end = crate::splice::splice(
        a,
        b,
        |n| up.set(up.get() + n),
        |n| down.set(down.get() + n),
        std::future::pending::<()>(),
    )
    .await;
    match end {
        crate::splice::SpliceEnd::Closed => Ok((up.get(), down.get())),
        crate::splice::SpliceEnd::Error(e) => Err(e),
        // The stop future above never completes.
        crate::splice::SpliceEnd::Stopped => Err(std::io::Error::other("the copy loop was stopped")),
    }
}

/// A loopback address no other test process uses at the same time:
/// `127.<net>.x.y`, with `x.y` random per process and then counted, so tests
/// that run side by side (nextest runs each in its own process) never share
/// an endpoint address. `net` keeps each test file in its own block.
pub fn unique_loopback(net: u8) -> std::net::IpAddr {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: std::sync::OnceLock<AtomicU16> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let mut seed = [0u8; 2];
        // The system RNG only fails on a broken machine; the process id is the fallback.
        if aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut seed).is_err() {
            seed = (std::process::id() as u16).to_be_bytes();
        }
        AtomicU16::new(u16::from_be_bytes(seed))
    });
    let [x, y] = next.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    // Neither .0 nor .255 as the last byte: some stacks treat them specially.
    std::net::IpAddr::from([127, net, x, y.clamp(1, 254)])
}

/// Waits until `done` holds, checking every 10 ms; panics naming `what` after `within`.
pub async fn eventually<F: Fn() -> bool>(what: &str, within: std::time::Duration, done: F) {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// An echo server on 127.0.0.1 (port 0): echoes every connection, and
/// half-closes after the client does.
pub async fn echo_server() -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the echo server");
    let addr = listener.local_addr().expect("the echo server's address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// An access log kept in memory (`AccessLog::to_writer(Box::new(buf.clone()))`), read back as JSON lines.
#[derive(Clone, Default)]
pub struct LogBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuf {
    /// Every line written so far, parsed.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        String::from_utf8_lossy(&bytes).lines().map(|l| serde_json::from_str(l).expect("a JSON log line")).collect()
    }
}

/// An open request for `vpc_endpoint_id`'s `resource_configuration_id` at
/// `port`, from a documentation address (what a hand-made tunnel peer sends).
pub fn open_request(vpc_endpoint_id: &str, resource_configuration_id: &str, port: u16) -> OpenRequest {
    OpenRequest {
        vpc_endpoint_id: vpc_endpoint_id.into(),
        resource_configuration_id: resource_configuration_id.into(),
        port,
        client_addr: SocketAddr::from(([192, 0, 2, 7], 5555)),
    }
}

/// The OPEN frame of flow `flow` carrying `request` (stream protocol version 2).
pub fn open_frame(flow: u32, request: &OpenRequest) -> Vec<u8> {
    let mut out = Vec::new();
    trellis_proto::mux::encode_open(flow, request, &mut out).expect("a test open request fits a frame");
    out
}

/// A DATA frame of flow `flow` carrying `payload` (stream protocol version 2).
pub fn data_frame(flow: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    trellis_proto::mux::encode_header(trellis_proto::mux::DATA, flow, payload.len(), &mut out);
    out.extend_from_slice(payload);
    out
}
