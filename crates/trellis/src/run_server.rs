//! `trellis server`: starts the control plane, prints how to reach it, and
//! stops gracefully on Ctrl-C or SIGTERM. Also starts the control plane for
//! `trellis dev`, and runs `trellis server reset-admin-key`.
//!
//! The admin key is never printed: the banner says which file holds it
//! (stdout of a service ends up in journald and similar logs).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use trellis_control::server::{RunningServer, ServerOptions};

use crate::cli::{ServerArgs, ServerVerb};
use crate::program::shell_quote;
use crate::secret::ApiKey;

/// Runs `trellis server` until a signal.
pub async fn run(args: ServerArgs) -> Result<()> {
    let data_dir = args.data_dir.clone().ok_or_else(|| anyhow!("`trellis server` needs --data-dir DIR"))?;
    let mut options = ServerOptions::new(args.listen, &data_dir);
    options.shares_per_minute = args.shares_per_minute;
    let server = start(options, &args.region, args.tls_names.clone(), args.dns_resolver, args.allow_private_webhooks)
        .await
        .with_context(|| format!("starting the control plane on {}", args.listen))?;
    print!("{}", banner(&server, &args.tls_names, &crate::program::command_name()));
    crate::shutdown::signal().await;
    tracing::info!("shutting down (Ctrl-C again to exit at once)");
    crate::shutdown::gracefully("control plane", server.shutdown()).await;
    Ok(())
}

/// Runs a maintenance verb of `trellis server` (the server may be stopped).
pub fn maintain(verb: ServerVerb) -> Result<()> {
    match verb {
        ServerVerb::ResetAdminKey { data_dir } => {
            let file = trellis_control::server::reset_admin_key(&data_dir)
                .with_context(|| format!("resetting the admin key of {}", data_dir.display()))?;
            println!(
                "New admin API key written to {} (mode 0600); the old admin key no longer works.\n\
                 Use it with: export TRELLIS_API_KEY=$(cat {})",
                file.display(),
                shell_quote(&file)
            );
            Ok(())
        }
    }
}

/// Starts the control plane for `trellis dev`: loopback, no extra TLS names,
/// webhooks allowed to loopback and private addresses (receivers on the laptop).
pub async fn start_for_dev(listen: SocketAddr, data_dir: PathBuf, region: &str) -> Result<ServerHandle> {
    start(ServerOptions::new(listen, data_dir), region, Vec::new(), None, true).await
}

async fn start(
    mut options: ServerOptions,
    region: &str,
    tls_names: Vec<String>,
    dns_resolver: Option<SocketAddr>,
    allow_private_webhooks: bool,
) -> Result<ServerHandle> {
    options.region = region.to_string();
    options.tls_names = tls_names;
    options.domain_verification.resolver = dns_resolver;
    options.webhooks.allow_private = allow_private_webhooks;
    let inner = trellis_control::server::start(options).await?;
    Ok(ServerHandle { inner })
}

/// A running control plane and where its files are.
pub struct ServerHandle {
    inner: RunningServer,
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

    /// `DATA_DIR/ca.pem`, absolute.
    pub fn ca_file(&self) -> PathBuf {
        self.inner.ca_file()
    }

    /// `DATA_DIR/admin.key`, absolute.
    pub fn admin_key_file(&self) -> PathBuf {
        self.inner.admin_key_file()
    }

    pub fn data_dir(&self) -> &Path {
        self.inner.data_dir()
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

/// What `trellis server` prints once it listens: the URL, the CA, where the
/// admin key is (never the key itself) and the line that sets up the CLI.
/// `program` is how to name this binary in commands.
fn banner(server: &ServerHandle, tls_names: &[String], program: &str) -> String {
    let url = client_url(server.local_addr(), tls_names);
    let ca_file = server.ca_file();
    let key_file = server.admin_key_file();
    let mut out = format!(
        "Trellis control plane listening on {url}\n\
         CA certificate  {} (sha256 {})\n",
        ca_file.display(),
        server.ca_sha256()
    );
    let key_state = if server.inner.admin_key_created.is_some() {
        " (created now, mode 0600; the key is not printed)"
    } else if key_file.is_file() {
        ""
    } else {
        " is missing"
    };
    out.push_str(&format!("Admin API key   {}{key_state}\n", key_file.display()));
    if !key_state.is_empty() && server.inner.admin_key_created.is_none() {
        out.push_str(&format!(
            "  make a new one (the old one stops working) with:\n  {program} server reset-admin-key --data-dir {}\n",
            shell_quote(server.data_dir())
        ));
    }
    out.push_str(&format!(
        "\nUse the CLI as admin (in another shell):\n  export TRELLIS_URL={url} TRELLIS_CA_CERT={} TRELLIS_API_KEY=$(cat {})\n  {program} account create --name NAME\n",
        shell_quote(&ca_file),
        shell_quote(&key_file)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_banner_says_where_the_admin_key_is_and_never_prints_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("cp data");
        let first = start(ServerOptions::new("127.0.0.1:0".parse().unwrap(), &data), "local", vec![], None, false)
            .await
            .unwrap();
        let key = first.admin_key().unwrap();
        let text = banner(&first, &[], "trellis");
        assert!(!text.contains(key.expose()), "the admin key is not printed:\n{text}");
        let key_file = data.join("admin.key");
        assert!(text.contains(&format!("Admin API key   {} (created now", key_file.display())), "{text}");
        assert!(text.contains(&format!("TRELLIS_CA_CERT='{}'", data.join("ca.pem").display())), "{text}");
        assert!(text.contains(&format!("TRELLIS_API_KEY=$(cat '{}')", key_file.display())), "{text}");
        first.shutdown().await;

        let again = start(ServerOptions::new("127.0.0.1:0".parse().unwrap(), &data), "local", vec![], None, false)
            .await
            .unwrap();
        let text = banner(&again, &[], "/opt/trellis/bin/trellis");
        assert!(text.contains(&format!("Admin API key   {}\n", key_file.display())), "{text}");
        std::fs::remove_file(&key_file).unwrap();
        let text = banner(&again, &[], "/opt/trellis/bin/trellis");
        assert!(text.contains("is missing"), "{text}");
        assert!(
            text.contains(&format!("/opt/trellis/bin/trellis server reset-admin-key --data-dir '{}'", data.display())),
            "{text}"
        );
        again.shutdown().await;
    }

    #[test]
    fn client_url_uses_a_reachable_host() {
        assert_eq!(client_url("127.0.0.1:8443".parse().unwrap(), &[]), "https://127.0.0.1:8443");
        assert_eq!(client_url("0.0.0.0:8443".parse().unwrap(), &[]), "https://127.0.0.1:8443");
        assert_eq!(client_url("0.0.0.0:8443".parse().unwrap(), &["cp.example".into()]), "https://cp.example:8443");
        assert_eq!(client_url("[::]:8443".parse().unwrap(), &[]), "https://[::1]:8443");
        assert_eq!(client_url("[::]:8443".parse().unwrap(), &["fd00::1".into()]), "https://[fd00::1]:8443");
    }
}
