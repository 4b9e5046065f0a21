//! `trellis server`: starts the control plane, prints how to reach it, and
//! stops gracefully on Ctrl-C or SIGTERM. Also starts the control plane for
//! `trellis dev`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use trellis_control::server::{RunningServer, ServerOptions};

use crate::cli::ServerArgs;
use crate::secret::ApiKey;

/// File names inside the data directory (written by the control plane).
const CA_FILE: &str = trellis_control::pki::CA_CERT_FILE;
const ADMIN_KEY_FILE: &str = trellis_control::server::ADMIN_KEY_FILE;

/// Runs `trellis server` until a signal.
pub async fn run(args: ServerArgs) -> Result<()> {
    let server = start(args.listen, args.data_dir.clone(), &args.region, args.tls_names.clone(), args.dns_resolver)
        .await
        .with_context(|| format!("starting the control plane on {}", args.listen))?;
    print!("{}", banner(&server, &args.tls_names));
    crate::shutdown::signal().await;
    tracing::info!("shutting down (Ctrl-C again to exit at once)");
    crate::shutdown::gracefully("control plane", server.shutdown()).await;
    Ok(())
}

/// Starts the control plane for `trellis dev`: loopback, no extra TLS names.
pub async fn start_for_dev(listen: SocketAddr, data_dir: PathBuf, region: &str) -> Result<ServerHandle> {
    start(listen, data_dir, region, Vec::new(), None).await
}

async fn start(
    listen: SocketAddr,
    data_dir: PathBuf,
    region: &str,
    tls_names: Vec<String>,
    dns_resolver: Option<SocketAddr>,
) -> Result<ServerHandle> {
    let mut options = ServerOptions::new(listen, &data_dir);
    options.region = region.to_string();
    options.tls_names = tls_names;
    options.domain_verification.resolver = dns_resolver;
    let inner = trellis_control::server::start(options).await?;
    Ok(ServerHandle { inner, data_dir })
}

/// A running control plane and where its files are.
pub struct ServerHandle {
    inner: RunningServer,
    data_dir: PathBuf,
}

impl ServerHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr()
    }

    pub fn ca_pem(&self) -> &str {
        self.inner.ca_pem()
    }

    pub fn ca_sha256(&self) -> &str {
        self.inner.ca_sha256()
    }

    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join(CA_FILE)
    }

    pub fn admin_key_file(&self) -> PathBuf {
        self.data_dir.join(ADMIN_KEY_FILE)
    }

    /// The admin API key: the one just created, or the one kept in the data directory.
    pub fn admin_key(&self) -> Result<ApiKey> {
        let text = match &self.inner.admin_key_created {
            Some(key) => key.clone(),
            None => read_key(&self.admin_key_file())?,
        };
        text.parse().map_err(|e: String| anyhow!("admin key in {}: {e}", self.admin_key_file().display()))
    }

    /// Stops accepting, drains open requests and waits for the server to end.
    pub async fn shutdown(self) {
        self.inner.shutdown();
        self.inner.wait().await;
    }
}

fn read_key(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading the admin key {}", path.display()))
}

/// The URL clients should use: the listen address, or for a wildcard listen
/// the first `--tls-name` (else loopback).
fn client_url(addr: SocketAddr, tls_names: &[String]) -> String {
    if !addr.ip().is_unspecified() {
        return format!("https://{addr}");
    }
    match tls_names.first() {
        Some(name) if name.parse::<std::net::Ipv6Addr>().is_ok() => format!("https://[{name}]:{}", addr.port()),
        Some(name) => format!("https://{name}:{}", addr.port()),
        None => {
            let loopback: IpAddr = if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            format!("https://{}", SocketAddr::new(loopback, addr.port()))
        }
    }
}

fn banner(server: &ServerHandle, tls_names: &[String]) -> String {
    let url = client_url(server.local_addr(), tls_names);
    let ca_file = server.ca_file();
    let key_file = server.admin_key_file();
    let mut out = format!(
        "Trellis control plane listening on {url}\n\
         CA certificate {} (sha256 {})\n",
        ca_file.display(),
        server.ca_sha256()
    );
    if let Some(key) = &server.inner.admin_key_created {
        out.push_str(&format!("\nAdmin API key (shown once; kept in {}):\n  {key}\n", key_file.display()));
    }
    out.push_str(&format!(
        "\nUse the CLI as admin:\n  export TRELLIS_URL={url} TRELLIS_CA_CERT={} TRELLIS_API_KEY=$(cat {})\n",
        ca_file.display(),
        key_file.display()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_url_uses_a_reachable_host() {
        assert_eq!(client_url("127.0.0.1:8443".parse().unwrap(), &[]), "https://127.0.0.1:8443");
        assert_eq!(client_url("0.0.0.0:8443".parse().unwrap(), &[]), "https://127.0.0.1:8443");
        assert_eq!(client_url("0.0.0.0:8443".parse().unwrap(), &["cp.example".into()]), "https://cp.example:8443");
        assert_eq!(client_url("[::]:8443".parse().unwrap(), &[]), "https://[::1]:8443");
        assert_eq!(client_url("[::]:8443".parse().unwrap(), &["fd00::1".into()]), "https://[fd00::1]:8443");
    }
}
