//! `rathole-tls`: rathole's server (where the client connects) and client
//! (next to the servers), with rathole's TLS transport and a self-signed
//! certificate made for the run with openssl.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path as FsPath, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{Backends, Loopback, Path, wait_ready};
use crate::Res;
use crate::proc::{self, Daemon};

const TLS_NAME: &str = "localhost";
const PKCS12_PASSWORD: &str = "trellis-bench";
const CONTROL_PORT: u16 = 2333;

pub struct RatholeTls {
    bin: PathBuf,
    dir: PathBuf,
    entry: IpAddr,
    backends: Backends,
    server: Option<Daemon>,
    client: Option<Daemon>,
}

impl RatholeTls {
    pub fn start(bin: &FsPath, openssl: &FsPath, dir: &FsPath, ips: Loopback, backends: Backends) -> Res<Self> {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let (control, entry) = (SocketAddr::new(ips.host(3), CONTROL_PORT), ips.host(4));
        make_identity(openssl, dir)?;
        let token = format!("bench-{}", std::process::id());
        let service = |side: &str, name: &str, key: &str, addr: SocketAddr| {
            format!("[{side}.services.{name}]\n{key} = \"{addr}\"\n\n")
        };
        let server = format!(
            "[server]\nbind_addr = \"{control}\"\ndefault_token = \"{token}\"\n\n\
             [server.transport]\ntype = \"tls\"\n\n\
             [server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"{PKCS12_PASSWORD}\"\n\n{}{}{}",
            dir.join("identity.p12").display(),
            service("server", "echo", "bind_addr", SocketAddr::new(entry, backends.echo.port())),
            service("server", "iperf", "bind_addr", SocketAddr::new(entry, backends.iperf.port())),
            backends
                .postgres
                .map(|pg| service("server", "postgres", "bind_addr", SocketAddr::new(entry, pg.port())))
                .unwrap_or_default(),
        );
        let client = format!(
            "[client]\nremote_addr = \"{control}\"\ndefault_token = \"{token}\"\n\n\
             [client.transport]\ntype = \"tls\"\n\n\
             [client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"{TLS_NAME}\"\n\n{}{}{}",
            dir.join("cert.pem").display(),
            service("client", "echo", "local_addr", backends.echo),
            service("client", "iperf", "local_addr", backends.iperf),
            backends.postgres.map(|pg| service("client", "postgres", "local_addr", pg)).unwrap_or_default(),
        );
        write(&dir.join("server.toml"), &server)?;
        write(&dir.join("client.toml"), &client)?;
        let mut path =
            RatholeTls { bin: bin.to_path_buf(), dir: dir.to_path_buf(), entry, backends, server: None, client: None };
        path.restart()?;
        Ok(path)
    }

    fn spawn(&self, side: &str) -> Res<Daemon> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg(format!("--{side}")).arg(self.dir.join(format!("{side}.toml")));
        // rathole logs every data channel at info; warnings and errors are what matter here.
        cmd.env("RUST_LOG", "warn");
        Daemon::spawn(&format!("rathole-{side}"), cmd, &self.dir.join("logs"), "INT")
    }
}

/// A self-signed P-256 certificate for `localhost` and its PKCS#12 bundle (rathole's server wants PKCS#12).
fn make_identity(openssl: &FsPath, dir: &FsPath) -> Res<()> {
    let (key, cert, p12) = (dir.join("key.pem"), dir.join("cert.pem"), dir.join("identity.p12"));
    let mut req = Command::new(openssl);
    req.args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", &format!("/CN={TLS_NAME}"), "-addext", &format!("subjectAltName=DNS:{TLS_NAME}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert);
    check(proc::run(req, Duration::from_secs(30))?, "openssl req")?;
    let mut export = Command::new(openssl);
    export
        .args(["pkcs12", "-export", "-passout", &format!("pass:{PKCS12_PASSWORD}")])
        .arg("-inkey")
        .arg(&key)
        .arg("-in")
        .arg(&cert)
        .arg("-out")
        .arg(&p12);
    check(proc::run(export, Duration::from_secs(30))?, "openssl pkcs12")
}

fn check(out: std::process::Output, what: &str) -> Res<()> {
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn write(path: &FsPath, text: &str) -> Res<()> {
    std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}

impl Path for RatholeTls {
    fn name(&self) -> &'static str {
        "rathole-tls"
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
        self.server.iter().chain(self.client.iter()).map(Daemon::pid).collect()
    }

    fn restart(&mut self) -> Res<()> {
        self.client = None;
        self.server = None;
        self.server = Some(self.spawn("server")?);
        self.client = Some(self.spawn("client")?);
        wait_ready(self.echo_addr(), Duration::from_secs(30)).map_err(|e| {
            let logs: Vec<String> = self.server.iter().chain(self.client.iter()).map(Daemon::log_tail).collect();
            format!("{e}; {}", logs.join("; "))
        })
    }

    fn version(&self) -> Option<String> {
        Some(crate::first_line_of(&self.bin, &["--version"]))
    }

    fn check(&mut self) -> Res<()> {
        for d in self.server.iter_mut().chain(self.client.iter_mut()) {
            d.check_running()?;
        }
        Ok(())
    }
}
