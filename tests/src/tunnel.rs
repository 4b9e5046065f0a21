//! Talking to an agent's tunnel listener directly, as another agent would:
//! TLS 1.3 with an agent's own certificate, then raw stream-protocol bytes
//! (version 2: a preface, then frames; one flow, id 1, is enough here).
//! Used to check what a gateway accepts and that a consumer accepts nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use trellis_proto::mux;
use trellis_proto::stream::{OpenRequest, OpenResponse, decode_open_response};

/// An agent's identity as stored in its state directory (`agent.crt`,
/// `agent.key`, `ca.crt`, `identity.json`; see `trellis-agent`'s identity module).
#[derive(Debug, Clone)]
pub struct AgentCredentials {
    pub agent_id: String,
    pub account_id: String,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    pub ca_pem: PathBuf,
}

impl AgentCredentials {
    /// Reads the identity of an enrolled agent from `state_dir`.
    pub fn load(state_dir: &Path) -> AgentCredentials {
        let identity = state_dir.join("identity.json");
        let text = std::fs::read_to_string(&identity)
            .unwrap_or_else(|e| panic!("read {} (has the agent enrolled?): {e}", identity.display()));
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", identity.display()));
        let field =
            |name: &str| v[name].as_str().unwrap_or_else(|| panic!("no {name} in {}", identity.display())).to_string();
        AgentCredentials {
            agent_id: field("agentId"),
            account_id: field("accountId"),
            cert_pem: state_dir.join("agent.crt"),
            key_pem: state_dir.join("agent.key"),
            ca_pem: state_dir.join("ca.crt"),
        }
    }

    /// The DNS name the agent's certificate carries (what a peer verifies).
    pub fn server_name(&self) -> String {
        trellis_proto::agent_server_name(&self.agent_id)
    }
}

/// The first bytes an endpoint agent sends to open flow 1 on a new tunnel
/// connection: the preface, then an OPEN frame. Byte 4 is the version; bytes
/// 10..14 the OPEN frame's body length.
pub fn open_request(vpc_endpoint_id: &str, resource_configuration_id: &str, port: u16) -> Vec<u8> {
    let req = OpenRequest {
        vpc_endpoint_id: vpc_endpoint_id.to_string(),
        resource_configuration_id: resource_configuration_id.to_string(),
        port,
        client_addr: SocketAddr::from(([127, 0, 0, 1], 40000)),
    };
    let mut out = mux::PREFACE.to_vec();
    mux::encode_open(1, &req, &mut out).expect("test ids are valid");
    out
}

/// What came back after an open request.
#[derive(Debug)]
pub enum OpenOutcome {
    /// The gateway answered; `rest` is payload of the flow that followed the answer.
    Answered { response: OpenResponse, rest: Vec<u8>, closed: bool },
    /// No answer arrived: the flow was reset or the connection closed (or
    /// failed), or the read timed out with both still open (`closed == false`).
    ClosedWithoutAnswer { bytes: Vec<u8>, closed: bool },
}

/// Sends `request` (and `payload` as flow 1's data) and reads flow 1's
/// answer, if any: until `limit` payload bytes came back, the flow or the
/// connection ended, or the stream's read timeout passed. `closed` says that
/// the flow was reset or finished, or the connection closed.
pub fn exchange_open(stream: &mut TunnelStream, request: &[u8], payload: &[u8], limit: usize) -> OpenOutcome {
    let mut first = request.to_vec();
    if !payload.is_empty() {
        mux::encode_header(mux::DATA, 1, payload.len(), &mut first);
        first.extend_from_slice(payload);
    }
    if stream.write_all(&first).and_then(|_| stream.flush()).is_err() {
        return OpenOutcome::ClosedWithoutAnswer { bytes: Vec::new(), closed: true };
    }
    let mut raw = Vec::new();
    let mut response = None;
    let mut data = Vec::new();
    let mut preface_seen = false;
    let mut buf = [0u8; 4096];
    let closed = loop {
        if !preface_seen && raw.len() >= mux::PREFACE.len() {
            if raw[..mux::PREFACE.len()] != mux::PREFACE {
                // Not version 2: perhaps a version-1 answer.
                if let Ok(Some((response, used))) = decode_open_response(&raw) {
                    return OpenOutcome::Answered { response, rest: raw[used..].to_vec(), closed: true };
                }
                return OpenOutcome::ClosedWithoutAnswer { bytes: raw, closed: true };
            }
            raw.drain(..mux::PREFACE.len());
            preface_seen = true;
        }
        let mut ended = false;
        while preface_seen
            && let Some(h) = mux::decode_header(&raw)
            && raw.len() >= mux::FRAME_HEADER_LEN + h.len as usize
        {
            let body: Vec<u8> =
                raw.drain(..mux::FRAME_HEADER_LEN + h.len as usize).skip(mux::FRAME_HEADER_LEN).collect();
            if h.flow != 1 {
                continue;
            }
            match mux::parse_control(h.kind, &body) {
                _ if h.kind == mux::DATA => data.extend_from_slice(&body),
                Ok(mux::Control::OpenResponse(r)) => response = Some(r),
                Ok(mux::Control::Fin | mux::Control::Reset) => ended = true,
                _ => {}
            }
        }
        if ended {
            break true;
        }
        if response.is_some() && data.len() >= limit {
            break false;
        }
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                break false;
            }
            Err(_) => break true,
        }
    };
    match response {
        Some(response) => OpenOutcome::Answered { response, rest: data, closed },
        None => OpenOutcome::ClosedWithoutAnswer { bytes: data, closed },
    }
}

/// A TLS client stream to an agent's tunnel listener.
pub type TunnelStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects to `addr` presenting `creds` and expecting a server certificate
/// for `server_name` from the same CA; completes the handshake.
pub fn connect(addr: SocketAddr, server_name: &str, creds: &AgentCredentials) -> std::io::Result<TunnelStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&creds.ca_pem).map_err(std::io::Error::other)? {
        roots.add(cert.map_err(std::io::Error::other)?).map_err(std::io::Error::other)?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&creds.cert_pem)
        .map_err(std::io::Error::other)?
        .collect::<Result<_, _>>()
        .map_err(std::io::Error::other)?;
    let key = PrivateKeyDer::from_pem_file(&creds.key_pem).map_err(std::io::Error::other)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(std::io::Error::other)?;
    let name = ServerName::try_from(server_name.to_string()).map_err(std::io::Error::other)?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// Writes `bytes`, then reads until the peer closes, errors or `limit` bytes
/// arrived; returns what was read and whether the peer closed the stream.
pub fn send_and_read(stream: &mut TunnelStream, bytes: &[u8], limit: usize) -> (Vec<u8>, bool) {
    if stream.write_all(bytes).and_then(|_| stream.flush()).is_err() {
        return (Vec::new(), true);
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() >= limit {
                    return (out, false);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return (out, false);
            }
            Err(_) => return (out, true),
        }
    }
}
