//! The relay fixture: a real `trellis relay` process enrolled with a relay
//! join token, inside a site namespace (or on the host), plus a raw relay
//! client that speaks the hello of `trellis_proto::relay` for tests of what a
//! relay refuses.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use tempfile::TempDir;
use trellis_proto::relay::{Answer, Hello, decode_answer, encode_hello};

use crate::agent::http_get_plain;
use crate::bins;
use crate::control::ControlPlane;
use crate::netns::Netns;
use crate::process::Proc;
use crate::wait::wait_until;

/// How long a relay may take to enroll and bind its listener.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The ALPN of a relay connection's outer TLS (`trellis_agent::relay_wire::RELAY_ALPN`).
pub const RELAY_ALPN: &[u8] = b"trellis-relay/1";

/// Creates a relay join token (admin API) for `zone` and returns the token.
pub fn relay_token(cp: &ControlPlane, zone: &str) -> String {
    let body = cp.admin().post("/v1/relay-tokens", &json!({ "zone": zone })).ok("create a relay join token");
    body["token"].as_str().expect("token in the relay-token answer").to_string()
}

/// How to start a relay.
pub struct RelayOptions<'a> {
    /// Label for logs (`relay-a`, …).
    pub name: &'a str,
    pub control_plane_url: &'a str,
    pub join_token: &'a str,
    /// The address the relay listens on and advertises (with [`RelayOptions::port`]),
    /// and binds its metrics listener on.
    pub bind_ip: IpAddr,
    /// The listening port: inside a namespace of its own the relay may use a
    /// fixed one (nothing else binds there); on the host, use a free port.
    pub port: u16,
    /// Namespace to run in; `None` runs on the host.
    pub netns: Option<&'a Netns>,
}

/// A running, enrolled relay.
pub struct Relay {
    pub proc: Proc,
    pub relay_id: String,
    /// Where agents reach the relay (its `--listen` and `--advertise`).
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub state_dir: PathBuf,
    netns: Option<String>,
    name: String,
    starts: u32,
    control_plane_url: String,
    dir: TempDir,
}

impl Relay {
    /// Spawns `trellis relay` and waits until it logs `relay running` with its id.
    pub fn start(opts: RelayOptions<'_>) -> Relay {
        let dir = tempfile::Builder::new().prefix("trellis-e2e-relay-").tempdir().expect("temp dir for a relay");
        let state_dir = dir.path().join("state");
        let addr = SocketAddr::new(opts.bind_ip, opts.port);
        // the metrics port: next to the relay's (the namespace is the relay's own, or the caller chose a free port)
        let metrics_addr = SocketAddr::new(opts.bind_ip, opts.port.wrapping_add(1));
        let mut relay = Relay {
            proc: spawn_relay(
                opts.name,
                opts.control_plane_url,
                opts.netns.map(Netns::name),
                Some(opts.join_token),
                &state_dir,
                addr,
                metrics_addr,
                dir.path(),
            ),
            relay_id: String::new(),
            addr,
            metrics_addr,
            state_dir,
            netns: opts.netns.map(|n| n.name().to_string()),
            name: opts.name.to_string(),
            starts: 1,
            control_plane_url: opts.control_plane_url.to_string(),
            dir,
        };
        relay.wait_started();
        relay
    }

    fn wait_started(&mut self) {
        self.relay_id = self.proc.wait_for_line("the relay to log `relay running`", START_TIMEOUT, |l| {
            if !l.contains("relay running") {
                return None;
            }
            let rest = &l[l.find("relay_id=")? + "relay_id=".len()..];
            let id = rest.split_whitespace().next()?.trim_matches('"');
            Some(id.to_string())
        });
    }

    /// Kills the relay with SIGKILL (by PID), as a crash would.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts the relay again from its state directory (no join token), on
    /// the same addresses, and waits until it runs.
    pub fn restart(&mut self) {
        self.proc.stop();
        self.starts += 1;
        self.proc = spawn_relay(
            &format!("{}-run{}", self.name, self.starts),
            &self.control_plane_url,
            self.netns.as_deref(),
            None,
            &self.state_dir,
            self.addr,
            self.metrics_addr,
            self.dir.path(),
        );
        let id = self.relay_id.clone();
        self.wait_started();
        assert_eq!(self.relay_id, id, "a restarted relay keeps its identity");
    }

    /// The relay's Prometheus metrics text.
    pub fn metrics(&self) -> Result<String, String> {
        http_get_plain(self.metrics_addr, "/metrics")
    }

    /// The access-log records (JSON lines on stdout) of the current process.
    pub fn access_log(&self) -> Vec<Value> {
        self.proc
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .filter(Value::is_object)
            .collect()
    }

    /// The TLS server name of the relay's certificate.
    pub fn server_name(&self) -> String {
        trellis_proto::relay_server_name(&self.relay_id)
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_relay(
    name: &str,
    control_plane_url: &str,
    netns: Option<&str>,
    join_token: Option<&str>,
    state_dir: &Path,
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    work_dir: &Path,
) -> Proc {
    let bin = bins::trellis();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    cmd.arg("relay").args(["--control-plane", control_plane_url]).arg("--state-dir").arg(state_dir);
    cmd.args(["--listen", &addr.to_string(), "--advertise", &addr.to_string()])
        .args(["--metrics-listen", &metrics_addr.to_string()])
        .args(["--report-interval", "1s"]);
    cmd.env_remove("TRELLIS_JOIN_TOKEN");
    if let Some(token) = join_token {
        cmd.env("TRELLIS_JOIN_TOKEN", token);
    }
    cmd.env("RUST_LOG", std::env::var("TRELLIS_E2E_LOG").unwrap_or_else(|_| "info".into()));
    Proc::spawn(name, cmd, &work_dir.join("logs"))
}

/// The relay's entry in `GET /v1/relays` (admin), if listed.
pub fn relay_entry(cp: &ControlPlane, relay_id: &str) -> Option<Value> {
    let list = cp.admin().get("/v1/relays").ok("list relays");
    let items = list["items"].as_array().or(list["relays"].as_array()).or(list.as_array()).cloned().unwrap_or_default();
    let summary = items.into_iter().find(|r| r["relayId"] == relay_id || r["id"] == relay_id)?;
    let id = summary["id"].as_str().unwrap_or(relay_id).to_string();
    Some(cp.admin().get(&format!("/v1/relays/{id}")).ok("read a relay"))
}

/// Waits until `/v1/relays/{id}` shows the relay healthy with at least
/// `attached` attached gateways; returns the relay object.
pub fn wait_relay_healthy(cp: &ControlPlane, relay_id: &str, attached: u64, timeout: Duration) -> Value {
    wait_until(&format!("relay {relay_id} healthy with {attached} attached gateway(s)"), timeout, || {
        let r = relay_entry(cp, relay_id)?;
        (r["status"] == "ONLINE" && r["healthy"] == true && r["attachedGateways"].as_u64().unwrap_or(0) >= attached)
            .then_some(r)
    })
}

/// Who the raw client says it is at the relay's TLS handshake.
pub enum ClientIdentity<'a> {
    /// An enrolled agent: its state directory's `agent.crt` and `agent.key`.
    Agent(&'a Path),
    /// A certificate signed by nobody the relay trusts.
    SelfSigned,
    /// No client certificate at all.
    None,
}

/// Opens a TLS connection to the relay at `addr` (trusting `ca_pem`, ALPN
/// `trellis-relay/1`) as `identity`, sends `hello` and returns the relay's
/// answer, or the error that ended the exchange (a refused handshake, a
/// closed connection).
pub fn relay_hello(
    addr: SocketAddr,
    server_name: &str,
    ca_pem: &Path,
    identity: ClientIdentity<'_>,
    hello: &Hello,
) -> Result<Answer, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).map_err(|e| format!("read {}: {e}", ca_pem.display()))? {
        roots.add(cert.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs supports TLS 1.3")
        .with_root_certificates(roots);
    let mut config = match identity {
        ClientIdentity::Agent(state_dir) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(state_dir.join("agent.crt"))
                .and_then(|i| i.collect::<Result<_, _>>())
                .map_err(|e| format!("read agent.crt: {e}"))?;
            let key = PrivateKeyDer::from_pem_file(state_dir.join("agent.key"))
                .map_err(|e| format!("read agent.key: {e}"))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())?
        }
        ClientIdentity::SelfSigned => {
            let ck = rcgen::generate_simple_self_signed(vec!["agent-selfsigned.agents.trellis.internal".into()])
                .expect("generate a self-signed certificate");
            let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
            builder.with_client_auth_cert(vec![ck.cert.der().clone()], key).map_err(|e| e.to_string())?
        }
        ClientIdentity::None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![RELAY_ALPN.to_vec()];
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect {addr}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut buf = Vec::new();
    encode_hello(hello, &mut buf).map_err(|e| e.to_string())?;
    tls.write_all(&buf).map_err(|e| format!("send the hello: {e}"))?;
    tls.flush().map_err(|e| format!("send the hello: {e}"))?;
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some((answer, _)) = decode_answer(&got).map_err(|e| format!("bad answer: {e}"))? {
            return Ok(answer);
        }
        let n = tls.read(&mut chunk).map_err(|e| format!("read the answer: {e}"))?;
        if n == 0 {
            return Err("the relay closed the connection without an answer".into());
        }
        got.extend_from_slice(&chunk[..n]);
    }
}
