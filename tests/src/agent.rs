//! The agent fixture: a real `trellis agent` process enrolled with a join
//! token, on loopback or inside a site namespace.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::bins;
use crate::netns::Netns;
use crate::process::Proc;

/// How long an agent may take to enroll and open its tunnel listener.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How to start an agent.
pub struct AgentOptions<'a> {
    /// Label for logs (`owner-agent`, `consumer-agent`, …).
    pub name: &'a str,
    pub control_plane_url: &'a str,
    pub join_token: &'a str,
    /// Address the agent binds its tunnel, DNS and metrics listeners on and
    /// advertises to endpoint agents.
    pub bind_ip: IpAddr,
    /// Namespace to run in; `None` runs on the host (loopback).
    pub netns: Option<&'a Netns>,
    /// Extra command-line arguments (the harness already sets the listeners
    /// and `--report-interval 1s`; a `--tunnel-listen`, `--dns-listen` or
    /// `--metrics-listen` given here replaces the harness's port-0 choice).
    pub extra_args: Vec<String>,
}

/// A running, enrolled agent with the addresses it reported.
pub struct Agent {
    pub proc: Proc,
    pub state_dir: PathBuf,
    /// Where other agents reach this agent's tunnel listener (it advertises
    /// this); `0.0.0.0:0` for an agent started with [`Agent::start_endpoint_only`].
    pub tunnel_addr: SocketAddr,
    pub dns_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    netns: Option<String>,
    launch: Launch,
    dir: TempDir,
}

/// An agent process that was started but not waited for.
pub struct SpawnedAgent {
    pub proc: Proc,
    pub state_dir: PathBuf,
    netns: Option<String>,
    launch: Launch,
    dir: TempDir,
}

/// What is needed to start the same agent again from its state directory.
#[derive(Clone, Debug)]
struct Launch {
    name: String,
    control_plane_url: String,
    extra_args: Vec<String>,
    starts: u32,
}

/// The addresses an agent process binds.
struct Listen {
    /// `None`: no tunnel listener (an endpoint-only agent).
    tunnel: Option<SocketAddr>,
    dns: SocketAddr,
    metrics: SocketAddr,
}

/// The address that follows `marker` on `line`, up to a comma, space or `/`.
fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let end = rest.find([',', ' ', '/']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

impl Agent {
    /// Spawns the agent and waits until it has enrolled, bound its listeners
    /// and logged them (`…, tunnel ADDR, dns ADDR, metrics http://ADDR/metrics`).
    pub fn start(opts: AgentOptions<'_>) -> Agent {
        Agent::start_with_tunnel(opts, true)
    }

    /// [`Agent::start`] without `--tunnel-listen` and `--advertise`: the agent
    /// binds no tunnel listener and serves endpoints only, as on a host that
    /// runs several agents.
    pub fn start_endpoint_only(opts: AgentOptions<'_>) -> Agent {
        Agent::start_with_tunnel(opts, false)
    }

    fn start_with_tunnel(opts: AgentOptions<'_>, tunnel: bool) -> Agent {
        let SpawnedAgent { proc, state_dir, netns, launch, dir } = Agent::spawn_with_tunnel(opts, tunnel);
        let mut agent = Agent {
            proc,
            state_dir,
            tunnel_addr: SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0),
            dns_addr: None,
            metrics_addr: None,
            netns,
            launch,
            dir,
        };
        agent.wait_started();
        agent
    }

    /// Waits for the summary line of the current process and records the
    /// addresses it names.
    fn wait_started(&mut self) {
        let line = self.proc.wait_for_line("the agent to log its bound addresses", START_TIMEOUT, |l| {
            l.contains("agent running: ").then(|| l.to_string())
        });
        self.tunnel_addr =
            addr_after(&line, "tunnel ").unwrap_or(SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0));
        self.dns_addr = addr_after(&line, "dns ");
        self.metrics_addr = addr_after(&line, "metrics http://");
    }

    /// Spawns the agent without waiting for anything (for tests of failures).
    /// Its listeners bind port 0 on `bind_ip`; with no `--advertise` the agent
    /// advertises the tunnel address it actually bound.
    pub fn spawn(opts: AgentOptions<'_>) -> SpawnedAgent {
        Agent::spawn_with_tunnel(opts, true)
    }

    fn spawn_with_tunnel(opts: AgentOptions<'_>, tunnel: bool) -> SpawnedAgent {
        let dir = tempfile::Builder::new().prefix("trellis-e2e-agent-").tempdir().expect("temp dir for an agent");
        let state_dir = dir.path().join("state");
        let any_port = SocketAddr::new(opts.bind_ip, 0);
        let netns = opts.netns.map(|n| n.name().to_string());
        let launch = Launch {
            name: opts.name.to_string(),
            control_plane_url: opts.control_plane_url.to_string(),
            extra_args: opts.extra_args.clone(),
            starts: 1,
        };
        let listen = Listen { tunnel: tunnel.then_some(any_port), dns: any_port, metrics: any_port };
        let proc = spawn_process(&launch, netns.as_deref(), Some(opts.join_token), &state_dir, &listen, dir.path());
        SpawnedAgent { proc, state_dir, netns, launch, dir }
    }

    /// Stops the agent process (SIGTERM, then SIGKILL); its state directory
    /// (identity and cached config) stays for [`Agent::restart`].
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Stops the agent if it runs and starts it again from its state
    /// directory, without a join token, binding the same tunnel, DNS and
    /// metrics addresses (peers keep the tunnel address from their config).
    /// Waits until the new process has logged its bound addresses; it does not
    /// need the control plane for that.
    pub fn restart(&mut self) {
        self.proc.stop();
        self.launch.starts += 1;
        let listen = Listen {
            tunnel: (self.tunnel_addr.port() != 0).then_some(self.tunnel_addr),
            dns: self.dns_addr.unwrap_or(SocketAddr::new(self.tunnel_addr.ip(), 0)),
            metrics: self.metrics_addr.unwrap_or(SocketAddr::new(self.tunnel_addr.ip(), 0)),
        };
        let launch = Launch { name: format!("{}-run{}", self.launch.name, self.launch.starts), ..self.launch.clone() };
        // the old Proc is dropped here; it has already exited
        self.proc = spawn_process(&launch, self.netns.as_deref(), None, &self.state_dir, &listen, self.dir.path());
        self.wait_started();
    }

    /// TCP addresses the agent process listens on (from its sockets in
    /// `/proc/PID/fd` and the listening sockets of its network namespace).
    pub fn listening_tcp(&self) -> Vec<SocketAddr> {
        listening_tcp(self.proc.pid())
    }

    /// The access-log records the current process wrote to stdout so far
    /// (one JSON object per line; other lines are skipped).
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.proc
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
            .filter(serde_json::Value::is_object)
            .collect()
    }

    /// The agent's Prometheus metrics text (`GET /metrics`), fetched from the
    /// host; only for agents whose metrics address the host can reach.
    pub fn metrics(&self) -> Result<String, String> {
        let addr = self.metrics_addr.ok_or("the agent reported no metrics address")?;
        http_get_plain(addr, "/metrics")
    }

    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    pub fn work_dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Starts `trellis agent` with `state_dir` and the given listeners; the join
/// token is only needed (and only passed) on the first start.
fn spawn_process(
    launch: &Launch,
    netns: Option<&str>,
    join_token: Option<&str>,
    state_dir: &Path,
    listen: &Listen,
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
    cmd.arg("agent").args(["--control-plane", &launch.control_plane_url]);
    if let Some(token) = join_token {
        cmd.args(["--join-token", token]);
    }
    cmd.arg("--state-dir").arg(state_dir);
    // a listener named in the extra arguments replaces the harness's choice
    for (flag, addr) in [
        ("--tunnel-listen", listen.tunnel),
        ("--dns-listen", Some(listen.dns)),
        ("--metrics-listen", Some(listen.metrics)),
    ] {
        if let Some(addr) = addr
            && !launch.extra_args.iter().any(|a| a == flag)
        {
            cmd.args([flag, &addr.to_string()]);
        }
    }
    // usage reaches the control plane quickly enough for a test to wait on it
    cmd.args(["--report-interval", "1s"])
        .args(&launch.extra_args)
        .env("RUST_LOG", std::env::var("TRELLIS_E2E_LOG").unwrap_or_else(|_| "info".into()));
    Proc::spawn(&launch.name, cmd, &work_dir.join("logs"))
}

/// TCP addresses process `pid` listens on (Linux): the inodes of its sockets
/// matched against the LISTEN entries of `/proc/PID/net/tcp{,6}`.
pub fn listening_tcp(pid: u32) -> Vec<SocketAddr> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|t| t.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "0A" || !inodes.contains(f[9]) {
                continue;
            }
            if let Some(addr) = parse_proc_addr(f[1], v6) {
                out.push(addr);
            }
        }
    }
    out
}

/// `0100007F:1F90` (or the 32-hex-digit IPv6 form) as in `/proc/net/tcp`.
fn parse_proc_addr(field: &str, v6: bool) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip: IpAddr = if v6 {
        let mut bytes = [0u8; 16];
        for (i, word) in (0..4).map(|i| &ip[i * 8..i * 8 + 8]).enumerate() {
            let w = u32::from_str_radix(word, 16).ok()?;
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        std::net::Ipv6Addr::from(bytes).into()
    } else {
        std::net::Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes()).into()
    };
    Some(SocketAddr::new(ip, port))
}

/// A minimal plain-HTTP GET (HTTP/1.0, connection closed by the server).
pub fn http_get_plain(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).map_err(|e| format!("read from {addr}: {e}"))?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(|| format!("no HTTP header from {addr}"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("GET {path} on {addr}: status {status}"));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::addr_after;

    #[test]
    fn bound_addresses_are_read_from_the_agent_summary_line() {
        let line = "INFO trellis::run_agent: gateway agent-0123, tunnel 127.0.0.1:41000, dns 127.0.0.1:53000, \
                    metrics http://127.0.0.1:9100/metrics";
        assert_eq!(addr_after(line, "tunnel "), Some("127.0.0.1:41000".parse().unwrap()));
        assert_eq!(addr_after(line, "dns "), Some("127.0.0.1:53000".parse().unwrap()));
        assert_eq!(addr_after(line, "metrics http://"), Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(addr_after("tunnel TLS handshake failed", "tunnel "), None);
        let endpoint_only = "INFO agent running: agent-0123, no tunnel listener (endpoints only), dns 127.0.0.1:53000";
        assert_eq!(addr_after(endpoint_only, "tunnel "), None);
    }

    #[test]
    fn proc_net_tcp_addresses_parse() {
        assert_eq!(super::parse_proc_addr("0100007F:1F90", false), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(
            super::parse_proc_addr("00000000000000000000000001000000:0035", true),
            Some("[::1]:53".parse().unwrap())
        );
    }
}
