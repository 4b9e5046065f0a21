//! `trellis-relay`: client → endpoint agent → `trellis relay` → outbound-only
//! gateway agent → server, three hops, set up as an operator and a user would:
//! a relay enrolled with `trellis relay-token create`, an owner VPC of its own
//! whose only agent runs `--outbound-only` (no tunnel listener, no advertised
//! address), a resource gateway and configuration there, shared with the
//! consumer, and a resource endpoint in the consumer's VPC. It runs through the
//! control plane, accounts and endpoint agent of the `trellis` path, so the two
//! differ only in the gateway side: `trellis` dials its gateway agent directly,
//! this path can only reach its gateway agent through the relay.
//!
//! The relay is weighed with the agents: its PID is among the tunnel processes
//! whose RSS and CPU time are summed (endpoint agent, relay, gateway agent).
//! That every flow went through the relay is checked after each measurement
//! from both processes' metrics ([`RelayedBytes`]).

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::rc::Rc;
use std::time::Duration;

use super::trellis::{STATE_TIMEOUT, Trellis, endpoint_ip, field, wait_online};
use super::{Backends, Loopback, Path, wait_ready};
use crate::Res;
use crate::proc::Daemon;

/// The relay's listener (and its advertised address) and metrics, on the run's loopback host 7.
const RELAY_HOST: u8 = 7;
const RELAY_PORT: u16 = 7444;
const RELAY_METRICS_PORT: u16 = 7445;
/// The outbound-only gateway agent's metrics, on the run's loopback host 8.
const GATEWAY_HOST: u8 = 8;
const GATEWAY_METRICS_PORT: u16 = 9100;

const RELAY: &str = "relay";
const GATEWAY_AGENT: &str = "relay-gateway-agent";

/// Bytes the relay carried and the gateway agent moved, and connects the relay refused, summed
/// over the processes' restarts.
///
/// Everything the gateway agent moves between a client and the target crosses the relay as
/// ciphertext (TLS adds to it), so the relay's bytes can never be fewer than the gateway
/// agent's, unless flows reached the gateway agent some other way.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RelayedBytes {
    pub relay: u64,
    pub gateway: u64,
    /// Connects refused by the relay (`unavailable`, `busy`, `not_served`): client connections
    /// the endpoint agent could not carry through it.
    pub refused: u64,
    relay_last: u64,
    gateway_last: u64,
    refused_last: u64,
}

/// Bytes the gateway agent may be ahead of the relay at a reading: the two are read one after
/// the other, and a reading may land between the gateway's count and the relay's copy.
const READING_SLACK: u64 = 1 << 20;

impl RelayedBytes {
    /// Adds what the counters (since each process started) gained since the last reading; a
    /// counter below its last reading belongs to a restarted process and counts from zero.
    pub fn observe(&mut self, relay_now: u64, gateway_now: u64, refused_now: u64) {
        let gained = |now: u64, last: u64| if now >= last { now - last } else { now };
        self.relay += gained(relay_now, self.relay_last);
        self.gateway += gained(gateway_now, self.gateway_last);
        self.refused += gained(refused_now, self.refused_last);
        (self.relay_last, self.gateway_last, self.refused_last) = (relay_now, gateway_now, refused_now);
    }

    /// The processes are about to restart: their counters start again from zero.
    pub fn restarted(&mut self) {
        (self.relay_last, self.gateway_last, self.refused_last) = (0, 0, 0);
    }

    /// Err when the gateway agent moved bytes the relay did not carry.
    pub fn check(&self) -> Res<()> {
        if self.gateway > self.relay + READING_SLACK {
            return Err(format!(
                "flows went around the relay: the gateway agent moved {} bytes, the relay carried only {}",
                self.gateway, self.relay
            ));
        }
        Ok(())
    }

    /// The line after the table; Err when nothing went through the gateway agent at all.
    pub fn summary(&self) -> Res<String> {
        self.check()?;
        if self.gateway == 0 {
            return Err("the relay path's gateway agent moved no byte: the flows went elsewhere".into());
        }
        let refused = match self.refused {
            0 => String::new(),
            n => format!(
                "; it refused {n} connects (no free attachment of the gateway agent, or a cap: see its access log), \
                 each a client connection refused"
            ),
        };
        Ok(format!(
            "trellis-relay: every flow went through the relay: it carried {:.2} GB (ciphertext) for the {:.2} GB the \
             gateway agent moved{refused}",
            self.relay as f64 / 1e9,
            self.gateway as f64 / 1e9
        ))
    }
}

pub struct TrellisRelay {
    // The relay's processes first: they stop before the shared set-up (the control plane) does.
    gateway_agent: Option<Daemon>,
    relay: Option<Daemon>,
    gateway_token: String,
    relay_addr: SocketAddr,
    relay_metrics: SocketAddr,
    gateway_metrics: SocketAddr,
    bytes: RelayedBytes,
    backends: Backends,
    entry: IpAddr,
    setup: Rc<RefCell<Trellis>>,
}

impl TrellisRelay {
    /// Enrolls and starts the relay, then the owner's relayed VPC, its outbound-only agent, a
    /// resource there shared with the consumer, and the consumer's endpoint; returns when a
    /// connection through the endpoint is answered.
    pub fn start(setup: Rc<RefCell<Trellis>>, ips: Loopback, backends: Backends) -> Res<Self> {
        let relay_addr = SocketAddr::new(ips.host(RELAY_HOST), RELAY_PORT);
        let mut path = TrellisRelay {
            gateway_agent: None,
            relay: None,
            gateway_token: String::new(),
            relay_addr,
            relay_metrics: SocketAddr::new(relay_addr.ip(), RELAY_METRICS_PORT),
            gateway_metrics: SocketAddr::new(ips.host(GATEWAY_HOST), GATEWAY_METRICS_PORT),
            bytes: RelayedBytes::default(),
            backends,
            entry: ips.host(0),
            setup,
        };
        let relay_token = {
            let t = path.setup.borrow();
            field(&t.admin.json(&["relay-token", "create", "--zone", "z1"])?, &["token"])?
        };
        path.start_relay(Some(&relay_token))?;
        let relay_id = path.relay_id()?;
        path.wait_relay(&relay_id, 0)?;

        let t = path.setup.borrow();
        let owner_vpc = field(&t.owner.json(&["vpc", "create", "--name", "bench-owner-relayed"])?, &["vpcId", "id"])?;
        let subnet =
            t.owner.json(&["subnet", "create", "--vpc", &owner_vpc, "--zone", "z1", "--cidr-block", &ips.pool(2)])?;
        let subnet = field(&subnet, &["subnetId", "id"])?;
        let gateway_token = field(&t.owner.json(&["agent-token", "create", "--subnet", &subnet])?, &["token"])?;
        drop(t);
        path.gateway_token = gateway_token;
        path.start_gateway_agent()?;
        let t = path.setup.borrow();
        wait_online(&t.owner, &subnet)?;
        drop(t);
        // The gateway agent learns the relay from its config and attaches to it.
        path.wait_relay(&relay_id, 1)?;

        let t = path.setup.borrow();
        let gateway = t.owner.json(&[
            "resource-gateway",
            "create",
            "--name",
            "bench-relayed-gw",
            "--vpc",
            &owner_vpc,
            "--subnet",
            &subnet,
        ])?;
        let gateway = field(&gateway, &["id"])?;
        t.owner.wait_state("resource-gateway", &gateway, "status", "ACTIVE")?;
        let target = backends.echo.ip().to_string();
        let ports: Vec<String> = [Some(backends.echo), Some(backends.iperf), backends.postgres]
            .iter()
            .flatten()
            .map(|a| a.port().to_string())
            .collect();
        let mut args = vec!["resource-configuration", "create", "--name", "bench-relayed", "--type", "SINGLE"];
        args.extend(["--gateway", &gateway, "--ip", &target]);
        for p in &ports {
            args.extend(["--port-range", p.as_str()]);
        }
        let config = t.owner.json(&args)?;
        t.owner.wait_state("resource-configuration", &field(&config, &["id"])?, "status", "ACTIVE")?;
        t.share(&field(&config, &["arn"])?, "bench-relayed")?;
        let endpoint = t.consumer.json(&[
            "vpc-endpoint",
            "create",
            "--vpc",
            &t.consumer_vpc,
            "--subnet",
            &t.consumer_subnet,
            "--resource-configuration",
            &field(&config, &["arn"])?,
        ])?;
        let endpoint = field(&endpoint, &["vpcEndpointId", "id"])?;
        let endpoint = t.consumer.wait_state("vpc-endpoint", &endpoint, "state", "Available")?;
        drop(t);
        path.entry = endpoint_ip(&endpoint)
            .ok_or_else(|| format!("the Available endpoint through the relay has no address: {endpoint}"))?;
        wait_ready(path.echo_addr(), STATE_TIMEOUT)?;
        path.observe()?;
        path.bytes.check()?;
        Ok(path)
    }

    /// Starts the relay from its state directory; `token` on the first start only.
    fn start_relay(&mut self, token: Option<&str>) -> Res<()> {
        self.relay = None;
        let (addr, metrics) = (self.relay_addr.to_string(), self.relay_metrics.to_string());
        let args = ["relay", "--listen", &addr, "--advertise", &addr, "--metrics-listen", &metrics];
        let env: Vec<(&str, &str)> = token.map(|t| ("TRELLIS_JOIN_TOKEN", t)).into_iter().collect();
        self.relay = Some(self.setup.borrow().spawn(RELAY, &args, &env, "relay running")?);
        Ok(())
    }

    fn start_gateway_agent(&mut self) -> Res<()> {
        self.gateway_agent = None;
        let metrics = self.gateway_metrics.to_string();
        let args = ["agent", "--outbound-only", "--metrics-listen", &metrics];
        let env = [("TRELLIS_JOIN_TOKEN", self.gateway_token.as_str())];
        self.gateway_agent = Some(self.setup.borrow().spawn(GATEWAY_AGENT, &args, &env, "agent running")?);
        Ok(())
    }

    /// The relay's id, from its `relay running` log line.
    fn relay_id(&mut self) -> Res<String> {
        let relay = self.relay.as_mut().ok_or("the relay is not running")?;
        relay.wait_for_log("the relay's id", STATE_TIMEOUT, |l| {
            let rest = &l[l.find("relay running")?..];
            let rest = &rest[rest.find("relay_id=")? + "relay_id=".len()..];
            Some(rest.split_whitespace().next()?.trim_matches('"').to_string())
        })
    }

    /// Waits until the control plane shows the relay healthy with at least `attached` gateways.
    fn wait_relay(&self, relay_id: &str, attached: u64) -> Res<()> {
        let t = self.setup.borrow();
        t.admin.wait(
            &["relays", "get", relay_id],
            &format!("relay {relay_id} healthy with {attached} attached gateway agent(s)"),
            |v| {
                (v["status"] == "ONLINE"
                    && v["healthy"] == true
                    && v["attachedGateways"].as_u64().unwrap_or(0) >= attached)
                    .then_some(())
            },
        )
    }

    /// Reads both processes' byte counters into [`RelayedBytes`].
    fn observe(&mut self) -> Res<()> {
        // The gateway first: whatever it has counted, the relay has carried by the time it is read.
        let gateway = metrics(self.gateway_metrics)?;
        let relay = metrics(self.relay_metrics)?;
        let gateway = sum(&gateway, "trellis_bytes_in_total", &[]) + sum(&gateway, "trellis_bytes_out_total", &[]);
        let refused = sum(
            &relay,
            "trellis_relay_flows_total",
            &[r#"outcome="unavailable""#, r#"outcome="busy""#, r#"outcome="not_served""#],
        );
        self.bytes.observe(sum(&relay, "trellis_relay_bytes_total", &[]), gateway, refused);
        Ok(())
    }
}

/// `GET /metrics` over plain HTTP/1.0.
fn metrics(addr: SocketAddr) -> Res<String> {
    let fail = |e: std::io::Error| format!("GET http://{addr}/metrics: {e}");
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(fail)?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(fail)?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(fail)?;
    let mut text = String::new();
    stream.read_to_string(&mut text).map_err(fail)?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.split_whitespace().nth(1) == Some("200") => {
            Ok(body.to_string())
        }
        _ => Err(format!("GET http://{addr}/metrics: not a 200 answer: {}", text.lines().next().unwrap_or(""))),
    }
}

/// The sum of the series of `name` in a Prometheus text: every one, or those with one of `labels`.
fn sum(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter(|l| labels.is_empty() || labels.iter().any(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

impl Path for TrellisRelay {
    fn name(&self) -> &'static str {
        "trellis-relay"
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

    /// The endpoint agent, the relay and the gateway agent.
    fn tunnel_pids(&self) -> Vec<u32> {
        let t = self.setup.borrow();
        t.endpoint_agent_pid()
            .into_iter()
            .chain(self.relay.iter().chain(self.gateway_agent.iter()).map(Daemon::pid))
            .collect()
    }

    /// Restarts the relay, then its gateway agent (which attaches again), then the shared agents.
    fn restart(&mut self) -> Res<()> {
        self.observe()?;
        self.bytes.check()?;
        self.bytes.restarted();
        self.gateway_agent = None;
        self.start_relay(None)?;
        self.start_gateway_agent()?;
        let probe = self.echo_addr();
        self.setup.borrow_mut().restart(probe)
    }

    fn check(&mut self) -> Res<()> {
        for d in self.relay.iter_mut().chain(self.gateway_agent.iter_mut()) {
            d.check_running()?;
        }
        self.setup.borrow_mut().check()?;
        self.observe()?;
        self.bytes.check()
    }

    fn verify(&mut self) -> Option<Res<String>> {
        Some(self.observe().and_then(|()| self.bytes.summary()))
    }

    fn version(&self) -> Option<String> {
        Some(self.setup.borrow().version())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_bytes_add_up_over_restarts() {
        let mut b = RelayedBytes::default();
        b.observe(1_000, 900, 0);
        b.observe(5_000, 4_500, 0);
        b.restarted();
        b.observe(700, 600, 0);
        assert_eq!((b.relay, b.gateway), (5_700, 5_100));
        // A counter that went down without a restart announced belongs to a restarted process.
        b.observe(100, 50, 0);
        assert_eq!((b.relay, b.gateway), (5_800, 5_150));
        assert!(b.check().is_ok());
        let summary = b.summary().unwrap();
        assert!(summary.contains("every flow went through the relay") && !summary.contains("refused"), "{summary}");
    }

    #[test]
    fn refused_connects_are_counted_over_restarts_and_reported() {
        let mut b = RelayedBytes::default();
        b.observe(9_000, 8_000, 3);
        b.restarted();
        b.observe(9_000, 8_000, 24);
        assert_eq!(b.refused, 27);
        let summary = b.summary().unwrap();
        assert!(summary.contains("refused 27 connects"), "{summary}");
    }

    #[test]
    fn gateway_bytes_the_relay_did_not_carry_mean_flows_went_around_it() {
        let mut b = RelayedBytes::default();
        b.observe(10_000, 10_000 + READING_SLACK, 0);
        assert!(b.check().is_ok(), "within the slack of two readings");
        b.observe(10_000, 5_000_000, 0);
        let e = b.check().unwrap_err();
        assert!(e.contains("went around the relay"), "{e}");
        assert!(b.summary().is_err());
    }

    #[test]
    fn a_gateway_that_moved_nothing_fails_the_summary() {
        let mut b = RelayedBytes::default();
        b.observe(4_000, 0, 0);
        assert!(b.check().is_ok());
        assert!(b.summary().unwrap_err().contains("moved no byte"));
    }

    #[test]
    fn sum_adds_every_series_of_one_metric_only() {
        let text = "# HELP trellis_bytes_in_total x\n\
                    trellis_bytes_in_total{role=\"gateway\",resource=\"a\"} 10\n\
                    trellis_bytes_in_total{role=\"gateway\",resource=\"b\"} 5\n\
                    trellis_bytes_in_total_other 99\n\
                    trellis_bytes_out_total 7\n";
        assert_eq!(sum(text, "trellis_bytes_in_total", &[]), 15);
        assert_eq!(sum(text, "trellis_bytes_in_total", &["resource=\"b\"", "resource=\"c\""]), 5);
        assert_eq!(sum(text, "trellis_bytes_out_total", &[]), 7);
        assert_eq!(sum(text, "trellis_relay_bytes_total", &[]), 0);
    }
}
