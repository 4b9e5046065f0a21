//! `trellis`: client → endpoint agent → gateway agent → server, set up as a
//! user would: a real control plane, two accounts, the owner's VPC and gateway
//! agent, the consumer's VPC and endpoint agent, a share, an accepted
//! invitation and a resource endpoint, all through the `trellis` CLI.
//!
//! [`Trellis`] is that set-up; [`ResourcePath`] is the `trellis` path through
//! it. The `trellis-service` path ([`super::trellis_service`]) runs through the
//! same control plane and agents, so the two differ only in what the agents do.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path as FsPath, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Backends, Loopback, Path, wait_ready};
use crate::proc::{self, Daemon};
use crate::{Res, client};

pub(super) const STATE_TIMEOUT: Duration = Duration::from_secs(60);
const TUNNEL_PORT: u16 = 7443;

/// One API call through the CLI, as one account.
#[derive(Clone)]
pub(super) struct Cli {
    bin: PathBuf,
    url: String,
    ca: PathBuf,
    key: String,
}

impl Cli {
    fn with_key(&self, key: &str) -> Cli {
        Cli { key: key.to_string(), ..self.clone() }
    }

    /// `trellis ARGS --output json`, parsed; Err with the CLI's message on failure.
    pub(super) fn json(&self, args: &[&str]) -> Res<Value> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .args(["--output", "json"])
            .env("TRELLIS_URL", &self.url)
            .env("TRELLIS_CA_CERT", &self.ca)
            .env("TRELLIS_API_KEY", &self.key)
            .env("NO_COLOR", "1");
        let out = proc::run(cmd, Duration::from_secs(60))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "`trellis {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        if stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&stdout)
            .map_err(|e| format!("`trellis {}` printed no JSON ({e}): {stdout}", args.join(" ")))
    }

    /// Repeats `args` until `accept` returns Some, for at most `timeout`.
    pub(super) fn wait<T>(&self, args: &[&str], what: &str, accept: impl Fn(&Value) -> Option<T>) -> Res<T> {
        let deadline = Instant::now() + STATE_TIMEOUT;
        loop {
            let v = self.json(args)?;
            if let Some(found) = accept(&v) {
                return Ok(found);
            }
            if Instant::now() >= deadline {
                return Err(format!("timed out after {STATE_TIMEOUT:?} waiting for {what}; last answer: {v}"));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the object's `field` is `want`, failing at once on a FAILED state.
    pub(super) fn wait_state(&self, noun: &str, id: &str, field: &str, want: &str) -> Res<Value> {
        self.wait(&[noun, "get", id], &format!("{noun} {id} to be {want}"), |v| {
            let state = v[field].as_str().unwrap_or_default();
            (state == want || state.to_ascii_uppercase().contains("FAILED")).then(|| v.clone())
        })
        .and_then(|v| if v[field] == want { Ok(v) } else { Err(format!("{noun} {id} failed: {v}")) })
    }
}

pub(super) fn field(v: &Value, names: &[&str]) -> Res<String> {
    names.iter().find_map(|n| v[*n].as_str()).map(str::to_string).ok_or_else(|| format!("none of {names:?} in {v}"))
}

/// The endpoint's first address, from `dnsEntries[].ipAddresses[]`.
pub(super) fn endpoint_ip(v: &Value) -> Option<IpAddr> {
    v["dnsEntries"].as_array()?.iter().find_map(|e| e["ipAddresses"].as_array()?.first()?.as_str()?.parse().ok())
}

/// How long the endpoint lifecycle took, for one repetition.
pub struct Lifecycle {
    pub create_to_first_byte: Duration,
    pub revoke_to_refused: Duration,
}

/// The control plane, both accounts, their VPCs and agents, and the resource endpoint.
pub struct Trellis {
    bin: PathBuf,
    dir: PathBuf,
    backends: Backends,
    ips: Loopback,
    url: String,
    pub(super) admin: Cli,
    pub(super) owner: Cli,
    pub(super) consumer: Cli,
    pub(super) consumer_account: String,
    pub(super) owner_vpc: String,
    pub(super) owner_subnet: String,
    pub(super) consumer_vpc: String,
    pub(super) consumer_subnet: String,
    probe_arn: String,
    gateway_token: String,
    endpoint_token: String,
    gateway_agent: Option<Daemon>,
    endpoint_agent: Option<Daemon>,
    entry: IpAddr,
    // Last, so that it is dropped (stopped) after the agents.
    _control_plane: Daemon,
}

impl Trellis {
    pub fn start(bin: &FsPath, dir: &FsPath, ips: Loopback, backends: Backends) -> Res<Self> {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let data = dir.join("control-plane");
        let mut cmd = Command::new(bin);
        cmd.arg("server").args(["--listen", "127.0.0.1:0"]).arg("--data-dir").arg(&data);
        let mut cp = Daemon::spawn("trellis-server", cmd, &dir.join("logs"), "TERM")?;
        let url = cp.wait_for_log("the control plane's URL", STATE_TIMEOUT, |l| {
            let rest = &l[l.find("listening on https://")? + "listening on ".len()..];
            Some(rest.split_whitespace().next()?.trim_end_matches('/').to_string())
        })?;
        let key_file = data.join("admin.key");
        let ca = data.join("ca.pem");
        let admin_key = cp.wait_for_log("admin.key", STATE_TIMEOUT, |_| {
            let key = std::fs::read_to_string(&key_file).ok()?;
            (ca.is_file() && !key.trim().is_empty()).then(|| key.trim().to_string())
        })?;
        let admin = Cli { bin: bin.to_path_buf(), url: url.clone(), ca, key: admin_key };

        let owner_account = admin.json(&["account", "create", "--name", "bench-owner"])?;
        let consumer_account = admin.json(&["account", "create", "--name", "bench-consumer"])?;
        let owner = admin.with_key(&field(&owner_account, &["apiKey"])?);
        let consumer = admin.with_key(&field(&consumer_account, &["apiKey"])?);
        let consumer_account = field(&consumer_account, &["accountId", "id"])?;

        // Owner: a VPC, a subnet, a join token for the gateway agent.
        let owner_vpc = field(&owner.json(&["vpc", "create", "--name", "bench-owner"])?, &["vpcId", "id"])?;
        let owner_subnet =
            owner.json(&["subnet", "create", "--vpc", &owner_vpc, "--zone", "z1", "--cidr-block", &ips.pool(1)])?;
        let owner_subnet = field(&owner_subnet, &["subnetId", "id"])?;
        let gateway_token = field(&owner.json(&["agent-token", "create", "--subnet", &owner_subnet])?, &["token"])?;

        // Consumer: the same, for the endpoint agent.
        let consumer_vpc = field(&consumer.json(&["vpc", "create", "--name", "bench-consumer"])?, &["vpcId", "id"])?;
        let consumer_subnet = consumer.json(&[
            "subnet",
            "create",
            "--vpc",
            &consumer_vpc,
            "--zone",
            "z1",
            "--cidr-block",
            &ips.pool(0),
        ])?;
        let consumer_subnet = field(&consumer_subnet, &["subnetId", "id"])?;
        let endpoint_token =
            field(&consumer.json(&["agent-token", "create", "--subnet", &consumer_subnet])?, &["token"])?;

        let mut path = Trellis {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            backends,
            ips,
            _control_plane: cp,
            url,
            admin,
            owner,
            consumer,
            consumer_account,
            owner_vpc: owner_vpc.clone(),
            owner_subnet: owner_subnet.clone(),
            consumer_vpc,
            consumer_subnet: consumer_subnet.clone(),
            probe_arn: String::new(),
            gateway_token,
            endpoint_token,
            gateway_agent: None,
            endpoint_agent: None,
            entry: ips.host(0),
        };
        path.start_agents()?;
        wait_online(&path.owner, &owner_subnet)?;
        wait_online(&path.consumer, &consumer_subnet)?;

        // Owner: a gateway, the main configuration (echo, iperf3 and PostgreSQL ports) and a probe
        // configuration that each repetition shares and revokes.
        let gateway = path.owner.json(&[
            "resource-gateway",
            "create",
            "--name",
            "bench-gw",
            "--vpc",
            &owner_vpc,
            "--subnet",
            &owner_subnet,
        ])?;
        let gateway = field(&gateway, &["id"])?;
        path.owner.wait_state("resource-gateway", &gateway, "status", "ACTIVE")?;
        let (echo_port, iperf_port) = (backends.echo.port().to_string(), backends.iperf.port().to_string());
        let target = backends.echo.ip().to_string();
        let create_config = |name: &str, ports: &[&str]| -> Res<String> {
            let mut args = vec!["resource-configuration", "create", "--name", name, "--type", "SINGLE"];
            args.extend(["--gateway", &gateway, "--ip", &target]);
            for p in ports {
                args.extend(["--port-range", p]);
            }
            let config = path.owner.json(&args)?;
            let id = field(&config, &["id"])?;
            path.owner.wait_state("resource-configuration", &id, "status", "ACTIVE")?;
            field(&config, &["arn"])
        };
        let pg_port = backends.postgres.map(|pg| pg.port().to_string());
        let mut main_ports = vec![echo_port.as_str(), iperf_port.as_str()];
        main_ports.extend(pg_port.as_deref());
        let main_arn = create_config("bench-main", &main_ports)?;
        path.probe_arn = create_config("bench-probe", &[&echo_port])?;

        path.share(&main_arn, "bench-main")?;
        let endpoint = path.consumer.json(&[
            "vpc-endpoint",
            "create",
            "--vpc",
            &path.consumer_vpc,
            "--subnet",
            &path.consumer_subnet,
            "--resource-configuration",
            &main_arn,
        ])?;
        let endpoint = field(&endpoint, &["vpcEndpointId", "id"])?;
        let endpoint = path.consumer.wait_state("vpc-endpoint", &endpoint, "state", "Available")?;
        path.entry =
            endpoint_ip(&endpoint).ok_or_else(|| format!("the Available endpoint has no address: {endpoint}"))?;
        wait_ready(SocketAddr::new(path.entry, backends.echo.port()), STATE_TIMEOUT)?;
        Ok(path)
    }

    /// Shares the set-up between the paths that run through it.
    pub fn shared(self) -> Rc<RefCell<Trellis>> {
        Rc::new(RefCell::new(self))
    }

    fn agent_command(&self, name: &str, token: &str, host: u8) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("agent")
            .args(["--control-plane", &self.url])
            .args(["--join-token", token])
            .arg("--state-dir")
            .arg(self.dir.join(name))
            .args(["--tunnel-listen", &SocketAddr::new(self.ips.host(host), TUNNEL_PORT).to_string()]);
        cmd
    }

    fn start_agent(&self, name: &str, token: &str, host: u8) -> Res<Daemon> {
        let mut agent = Daemon::spawn(name, self.agent_command(name, token, host), &self.dir.join("logs"), "TERM")?;
        agent.wait_for_log(&format!("{name} to run"), STATE_TIMEOUT, |l| l.contains("agent running").then_some(()))?;
        Ok(agent)
    }

    fn start_agents(&mut self) -> Res<()> {
        self.endpoint_agent = None;
        self.gateway_agent = None;
        self.gateway_agent = Some(self.start_agent("gateway-agent", &self.gateway_token, 5)?);
        self.endpoint_agent = Some(self.start_agent("endpoint-agent", &self.endpoint_token, 6)?);
        Ok(())
    }

    /// `trellis ARGS` as a daemon of this set-up (state and logs under its directory), with
    /// `env` added; returns once a line of its log contains `running`.
    pub(super) fn spawn(&self, name: &str, args: &[&str], env: &[(&str, &str)], running: &str) -> Res<Daemon> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).args(["--control-plane", &self.url]).arg("--state-dir").arg(self.dir.join(name));
        cmd.env_remove("TRELLIS_JOIN_TOKEN").envs(env.iter().copied());
        let mut daemon = Daemon::spawn(name, cmd, &self.dir.join("logs"), "TERM")?;
        daemon.wait_for_log(&format!("{name} to log `{running}`"), STATE_TIMEOUT, |l| {
            l.contains(running).then_some(())
        })?;
        Ok(daemon)
    }

    /// Owner shares `arn` with the consumer, who accepts the invitation. Returns the share's id.
    pub(super) fn share(&self, arn: &str, name: &str) -> Res<String> {
        let share = self.owner.json(&[
            "resource-share",
            "create",
            "--name",
            name,
            "--resource-arn",
            arn,
            "--principal",
            &self.consumer_account,
        ])?;
        let share_id = field(&share, &["id"])?;
        let share_arn = field(&share, &["resourceShareArn", "arn"])?;
        let invitation = self.consumer.wait(&["invitation", "list"], "the consumer's invitation", |list| {
            list["items"].as_array()?.iter().find(|i| i["resourceShareArn"] == share_arn.as_str()).cloned()
        })?;
        if invitation["status"] == "PENDING" {
            self.consumer.json(&["invitation", "accept", &field(&invitation, &["id"])?])?;
        }
        Ok(share_id)
    }

    /// One repetition of: share the probe configuration, create an endpoint for it and time the
    /// first byte through it; delete the share and time until new connections are refused.
    fn run_lifecycle(&mut self, rep: usize) -> Res<Lifecycle> {
        let share = self.share(&self.probe_arn.clone(), &format!("bench-probe-{rep}"))?;
        let started = Instant::now();
        let endpoint = self.consumer.json(&[
            "vpc-endpoint",
            "create",
            "--vpc",
            &self.consumer_vpc,
            "--subnet",
            &self.consumer_subnet,
            "--resource-configuration",
            &self.probe_arn,
        ])?;
        let endpoint_id = field(&endpoint, &["vpcEndpointId", "id"])?;
        let ip = match endpoint_ip(&endpoint) {
            Some(ip) => ip,
            None => {
                self.consumer.wait(&["vpc-endpoint", "get", &endpoint_id], "the endpoint's address", endpoint_ip)?
            }
        };
        let addr = SocketAddr::new(ip, self.backends.echo.port());
        let deadline = started + STATE_TIMEOUT;
        let create_to_first_byte = loop {
            if client::first_byte(addr, Duration::from_secs(2)).is_ok() {
                break started.elapsed();
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no first byte through the new endpoint {endpoint_id} at {addr} within {STATE_TIMEOUT:?}"
                ));
            }
            thread::sleep(Duration::from_millis(5));
        };

        let revoked = Instant::now();
        self.owner.json(&["resource-share", "delete", &share])?;
        let deadline = revoked + STATE_TIMEOUT;
        let revoke_to_refused = loop {
            if client::first_byte(addr, Duration::from_secs(2)).is_err() {
                break revoked.elapsed();
            }
            if Instant::now() >= deadline {
                return Err(format!("{addr} still answers {STATE_TIMEOUT:?} after the share was deleted"));
            }
            thread::sleep(Duration::from_millis(5));
        };
        self.consumer.json(&["vpc-endpoint", "delete", &endpoint_id])?;
        Ok(Lifecycle { create_to_first_byte, revoke_to_refused })
    }
}

pub(super) fn wait_online(cli: &Cli, subnet: &str) -> Res<()> {
    cli.wait(&["agent", "list"], &format!("an ONLINE agent in {subnet}"), |list| {
        list["items"].as_array()?.iter().any(|a| a["subnetId"] == subnet && a["status"] == "ONLINE").then_some(())
    })
}

impl Trellis {
    pub(super) fn endpoint_agent_pid(&self) -> Option<u32> {
        self.endpoint_agent.as_ref().map(Daemon::pid)
    }

    pub(super) fn tunnel_pids(&self) -> Vec<u32> {
        self.gateway_agent.iter().chain(self.endpoint_agent.iter()).map(Daemon::pid).collect()
    }

    /// Restarts both agents, then waits until `probe` answers through them.
    pub(super) fn restart(&mut self, probe: SocketAddr) -> Res<()> {
        self.start_agents()?;
        wait_ready(probe, STATE_TIMEOUT).map_err(|e| {
            let logs: Vec<String> =
                self.gateway_agent.iter().chain(self.endpoint_agent.iter()).map(Daemon::log_tail).collect();
            format!("{e}; {}", logs.join("; "))
        })
    }

    pub(super) fn version(&self) -> String {
        crate::first_line_of(&self.bin, &["version"])
    }

    pub(super) fn check(&mut self) -> Res<()> {
        for d in self.gateway_agent.iter_mut().chain(self.endpoint_agent.iter_mut()) {
            d.check_running()?;
        }
        Ok(())
    }
}

/// The `trellis` path: through the resource endpoint of the shared set-up.
pub struct ResourcePath(pub Rc<RefCell<Trellis>>);

impl Path for ResourcePath {
    fn name(&self) -> &'static str {
        "trellis"
    }

    fn echo_addr(&self) -> SocketAddr {
        let t = self.0.borrow();
        SocketAddr::new(t.entry, t.backends.echo.port())
    }

    fn iperf_addr(&self) -> SocketAddr {
        let t = self.0.borrow();
        SocketAddr::new(t.entry, t.backends.iperf.port())
    }

    fn pg_addr(&self) -> Option<SocketAddr> {
        let t = self.0.borrow();
        t.backends.postgres.map(|pg| SocketAddr::new(t.entry, pg.port()))
    }

    fn tunnel_pids(&self) -> Vec<u32> {
        self.0.borrow().tunnel_pids()
    }

    fn restart(&mut self) -> Res<()> {
        let probe = self.echo_addr();
        self.0.borrow_mut().restart(probe)
    }

    fn lifecycle(&mut self, rep: usize) -> Option<Res<Lifecycle>> {
        Some(self.0.borrow_mut().run_lifecycle(rep))
    }

    fn version(&self) -> Option<String> {
        Some(self.0.borrow().version())
    }

    fn check(&mut self) -> Res<()> {
        self.0.borrow_mut().check()
    }
}
