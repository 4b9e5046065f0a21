//! The control plane fixture: a real `trellis server` process with its own
//! data directory, reachable over HTTPS with its own CA.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tempfile::TempDir;

use crate::api::Api;
use crate::bins;
use crate::cli::Cli;
use crate::process::Proc;
use crate::wait::wait_until;

/// How long a fresh control plane may take to write its CA and answer /healthz.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `trellis server`.
pub struct ControlPlane {
    pub proc: Proc,
    pub url: String,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub ca_pem: PathBuf,
    pub admin_key: String,
    starts: u32,
    /// Flags given to every start after `--listen` and `--data-dir`.
    extra_args: Vec<String>,
    _dir: TempDir,
}

/// An account made by the admin, with its first API key.
#[derive(Clone, Debug)]
pub struct Account {
    pub id: String,
    pub api_key: String,
}

impl ControlPlane {
    /// Starts `trellis server --listen <ip>:<port> --data-dir <tmp>` and waits
    /// until it has written `ca.pem` and `admin.key` and `/healthz` says ok.
    pub fn start(listen_ip: IpAddr) -> ControlPlane {
        Self::start_with_args(listen_ip, &[])
    }

    /// [`ControlPlane::start`] with more `trellis server` flags (kept for restarts).
    pub fn start_with_args(listen_ip: IpAddr, args: &[&str]) -> ControlPlane {
        let extra_args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let dir = tempfile::Builder::new().prefix("trellis-e2e-cp-").tempdir().expect("temp dir for the control plane");
        let data_dir = dir.path().join("data");
        let (mut proc, addr) =
            spawn_server("control-plane", SocketAddr::new(listen_ip, 0), &data_dir, dir.path(), &extra_args);
        let ca_pem = data_dir.join("ca.pem");
        let key_path = data_dir.join("admin.key");
        let admin_key = wait_until("the control plane to write ca.pem and admin.key", START_TIMEOUT, || {
            proc.assert_running();
            if !ca_pem.is_file() {
                return None;
            }
            let key = std::fs::read_to_string(&key_path).ok()?;
            let key = key.trim();
            (!key.is_empty()).then(|| key.to_string())
        });
        let url = format!("https://{}", url_host_port(addr));
        let anon = Api::new(&url, &ca_pem, None);
        wait_until("the control plane to answer /healthz", START_TIMEOUT, || {
            proc.assert_running();
            let resp = anon.try_get("/healthz").ok()?;
            (resp.status == 200).then_some(())
        });
        ControlPlane { proc, url, addr, data_dir, ca_pem, admin_key, starts: 1, extra_args, _dir: dir }
    }

    /// Kills the server with SIGKILL, as a crash would: no graceful shutdown,
    /// open long-polls and reports just break.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts the server again (after [`ControlPlane::kill`]) with the same
    /// data directory on the same address and port, and waits until it
    /// answers `/healthz`. Agents find it where they left it.
    pub fn restart(&mut self) {
        self.proc.stop();
        self.starts += 1;
        let name = format!("control-plane-run{}", self.starts);
        let (proc, addr) = spawn_server(&name, self.addr, &self.data_dir, self._dir.path(), &self.extra_args);
        self.proc = proc;
        assert_eq!(addr, self.addr, "the restarted control plane listens where it did before");
        let anon = self.anonymous();
        wait_until("the restarted control plane to answer /healthz", START_TIMEOUT, || {
            self.proc.assert_running();
            let resp = anon.try_get("/healthz").ok()?;
            (resp.status == 200).then_some(())
        });
    }

    /// The API with no key.
    pub fn anonymous(&self) -> Api {
        Api::new(&self.url, &self.ca_pem, None)
    }

    /// The API with the admin key.
    pub fn admin(&self) -> Api {
        Api::new(&self.url, &self.ca_pem, Some(&self.admin_key))
    }

    /// The API with `key`.
    pub fn api(&self, key: &str) -> Api {
        Api::new(&self.url, &self.ca_pem, Some(key))
    }

    /// The CLI with `key` (or none).
    pub fn cli(&self, key: Option<&str>) -> Cli {
        Cli::new(&bins::trellis(), &self.url, key, &self.ca_pem)
    }

    /// Creates an account through the admin API.
    pub fn create_account(&self, name: &str) -> Account {
        let body = self.admin().post("/v1/accounts", &json!({ "name": name })).ok("create account");
        let id = body["accountId"].as_str().or(body["id"].as_str()).expect("accountId in the answer").to_string();
        let api_key = body["apiKey"].as_str().expect("apiKey in the answer").to_string();
        Account { id, api_key }
    }

    pub fn log_dir(&self) -> &Path {
        self._dir.path()
    }
}

/// Starts `trellis server --listen <listen> --data-dir <data_dir>` and waits
/// for the line naming the address it bound.
fn spawn_server(
    name: &str,
    listen: SocketAddr,
    data_dir: &Path,
    work_dir: &Path,
    extra_args: &[String],
) -> (Proc, SocketAddr) {
    let mut cmd = Command::new(bins::trellis());
    cmd.arg("server").arg("--listen").arg(listen.to_string()).arg("--data-dir").arg(data_dir).args(extra_args);
    cmd.env("RUST_LOG", std::env::var("TRELLIS_E2E_LOG").unwrap_or_else(|_| "info".into()));
    let mut proc = Proc::spawn(name, cmd, &work_dir.join("logs"));
    let addr = proc.wait_for_line("the control plane to report its address", START_TIMEOUT, |l| {
        let rest = &l[l.find("listening on https://")? + "listening on https://".len()..];
        rest.split_whitespace().next()?.trim_end_matches('/').parse::<SocketAddr>().ok()
    });
    (proc, addr)
}

/// `host:port` with IPv6 hosts in brackets.
pub fn url_host_port(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) => format!("{ip}:{}", addr.port()),
        IpAddr::V6(ip) => format!("[{ip}]:{}", addr.port()),
    }
}
