//! `trellis-service`: client → endpoint agent → provider agent → one of two
//! targets, through an Interface endpoint to an endpoint service. It runs
//! through the control plane, accounts and agents of the `trellis` path (the
//! gateway agent is the service's provider agent), so the two paths differ only
//! in what the agents do per connection: a resource endpoint dials its one
//! address, a service endpoint picks a healthy target (least connections).
//!
//! The service's targets are 127.0.0.1 and 127.0.0.2. Its echo port leads to the
//! run's echo server and a second one on 127.0.0.2 at the same port. Its iperf3
//! port (the same number as the iperf3 server's, so the entry is at the server's
//! own port as on every path) maps to a second iperf3 server that listens on
//! every loopback address: an iperf3 test is several connections that must all
//! reach the same process, and least connections spreads them over both
//! targets; the run's own iperf3 server cannot listen there, since a wildcard
//! listener takes its port on every loopback address, entries included. Health
//! is checked on the echo port only, so iperf3 never sees a check, and a stopped
//! echo server takes its target out for both ports.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::trellis::{STATE_TIMEOUT, Trellis, endpoint_ip, field};
use super::{Backends, Path, wait_ready};
use crate::client::{Attempt, ShortConnections};
use crate::{Res, echo};

/// The service's second target: where the second echo server listens.
pub const SECOND_TARGET: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// The health check of the service: every 5 s, unhealthy after 2 failures, healthy after 2 passes.
const CHECK_INTERVAL_S: u64 = 5;
const CHECK_TIMEOUT_S: u64 = 2;
const UNHEALTHY_THRESHOLD: u32 = 2;
const HEALTHY_THRESHOLD: u32 = 2;

/// The failover measurement's stream of short connections, and how long it runs around the stop.
const FAILOVER_RATE: f64 = 300.0;
const FAILOVER_WORKERS: usize = 4;
const LEAD_IN: Duration = Duration::from_secs(2);
const TAIL: Duration = Duration::from_secs(5);

/// How long a stopped target may still be picked: check interval × unhealthy threshold.
pub fn detection_window() -> Duration {
    Duration::from_secs(CHECK_INTERVAL_S * u64::from(UNHEALTHY_THRESHOLD))
}

pub struct TrellisService {
    setup: Rc<RefCell<Trellis>>,
    backends: Backends,
    service_id: String,
    entry: IpAddr,
}

impl TrellisService {
    /// Publishes the service (the owner's), allows the consumer, creates the consumer's
    /// Interface endpoint (no acceptance needed) and waits until traffic goes through it.
    /// `iperf_target_port`: where the targets' iperf3 server listens (on every loopback address).
    pub fn start(setup: Rc<RefCell<Trellis>>, backends: Backends, iperf_target_port: u16) -> Res<Self> {
        let (service_id, entry) = {
            let t = setup.borrow();
            let echo_port = backends.echo.port().to_string();
            let iperf_port = format!("{}:{iperf_target_port}", backends.iperf.port());
            let (first, second) = (backends.echo.ip().to_string(), SECOND_TARGET.to_string());
            let (interval, timeout) = (CHECK_INTERVAL_S.to_string(), CHECK_TIMEOUT_S.to_string());
            let (healthy, unhealthy) = (HEALTHY_THRESHOLD.to_string(), UNHEALTHY_THRESHOLD.to_string());
            // PostgreSQL listens on both targets at the same port (see `postgres::Postgres::start`).
            let pg_port = backends.postgres.map(|pg| pg.port().to_string());
            let pg_ports: Vec<&str> = pg_port.iter().flat_map(|p| ["--port", p.as_str()]).collect();
            let mut args: Vec<&str> = vec![
                "endpoint-service",
                "create",
                "--name",
                "bench-svc",
                "--vpc",
                &t.owner_vpc,
                "--subnet",
                &t.owner_subnet,
                "--target",
                &first,
                "--target",
                &second,
                "--port",
                &echo_port,
                "--port",
                &iperf_port,
                "--acceptance-required",
                "false",
                "--health-check-port",
                &echo_port,
                "--health-check-interval",
                &interval,
                "--health-check-timeout",
                &timeout,
                "--healthy-threshold",
                &healthy,
                "--unhealthy-threshold",
                &unhealthy,
            ];
            args.extend(pg_ports);
            let service = t.owner.json(&args)?;
            let service_id = field(&service, &["serviceId", "id"])?;
            let service_name = field(&service, &["serviceName"])?;
            t.owner.json(&[
                "endpoint-service",
                "modify-permissions",
                &service_id,
                "--add-principal",
                &t.consumer_account,
            ])?;
            let endpoint = t.consumer.json(&[
                "vpc-endpoint",
                "create",
                "--vpc",
                &t.consumer_vpc,
                "--subnet",
                &t.consumer_subnet,
                "--service-name",
                &service_name,
            ])?;
            let endpoint = field(&endpoint, &["vpcEndpointId", "id"])?;
            let endpoint = t.consumer.wait_state("vpc-endpoint", &endpoint, "state", "Available")?;
            let entry = endpoint_ip(&endpoint)
                .ok_or_else(|| format!("the Available Interface endpoint has no address: {endpoint}"))?;
            (service_id, entry)
        };
        let path = TrellisService { setup, backends, service_id, entry };
        wait_ready(path.echo_addr(), STATE_TIMEOUT)?;
        Ok(path)
    }

    /// Polls the owner's view of the service until `target` on the echo port shows `state`;
    /// returns how long after `since` it did.
    fn wait_health(&self, target: IpAddr, state: &str, since: Instant) -> Res<Duration> {
        let (target, port) = (target.to_string(), self.backends.echo.port());
        let setup = self.setup.borrow();
        setup.owner.wait(
            &["endpoint-service", "get", &self.service_id],
            &format!("the service's view to show {target}:{port} {state}"),
            |v| target_state(v, &target, port).is_some_and(|s| s == state).then(|| since.elapsed()),
        )
    }

    /// Stops the second target's echo server under a stream of short connections; see [`Failover`].
    fn run_failover(&mut self, second: &mut echo::Server) -> Res<Failover> {
        let window = detection_window();
        eprintln!("failover on {} (about 30 s) …", self.name());
        let stream = ShortConnections::start(self.echo_addr(), FAILOVER_RATE, FAILOVER_WORKERS);
        thread::sleep(LEAD_IN);
        second.stop();
        let stopped = Instant::now();
        let stop_at = stopped - stream.started();
        let unhealthy = self.wait_health(second.addr.ip(), "UNHEALTHY", stopped);
        // Keep the stream going past the window (and past the view's change) to count what follows it.
        let until = stopped + window.max(*unhealthy.as_ref().unwrap_or(&window)) + TAIL;
        if let Some(left) = until.checked_duration_since(Instant::now()) {
            thread::sleep(left);
        }
        let attempts = stream.finish()?;
        second.start_again()?;
        let restarted = Instant::now();
        let healthy = self.wait_health(second.addr.ip(), "HEALTHY", restarted);
        Ok(Failover {
            window,
            rate_per_second: FAILOVER_RATE,
            stopped_after: stop_at,
            tally: tally(&attempts, stop_at, window),
            stop_to_unhealthy: unhealthy,
            restart_to_healthy: healthy,
        })
    }
}

/// The state the service's view gives `target` on `port` (`targetHealth[]`).
fn target_state<'a>(service: &'a Value, target: &str, port: u16) -> Option<&'a str> {
    service["targetHealth"]
        .as_array()?
        .iter()
        .find(|t| t["target"] == target && t["targetPort"].as_u64() == Some(u64::from(port)))?["state"]
        .as_str()
}

/// Connections of a failover stream, split at the stop and at the end of the detection window.
#[derive(Debug, Default, PartialEq)]
pub struct Tally {
    pub before_stop: usize,
    pub in_window: usize,
    pub after_window: usize,
    pub failed_before_stop: usize,
    pub failed_in_window: usize,
    pub failed_after_window: usize,
    /// The first failure's error, and when (since the stop; negative: before it).
    pub first_failure: Option<(f64, String)>,
}

/// Splits `attempts` by when they started: before `stop_at`, in `[stop_at, stop_at + window)`, after.
pub fn tally(attempts: &[Attempt], stop_at: Duration, window: Duration) -> Tally {
    let mut t = Tally::default();
    for a in attempts {
        let (count, fails) = if a.at < stop_at {
            (&mut t.before_stop, &mut t.failed_before_stop)
        } else if a.at < stop_at + window {
            (&mut t.in_window, &mut t.failed_in_window)
        } else {
            (&mut t.after_window, &mut t.failed_after_window)
        };
        *count += 1;
        if let Some(e) = &a.error {
            *fails += 1;
            if t.first_failure.is_none() {
                t.first_failure = Some((a.at.as_secs_f64() - stop_at.as_secs_f64(), e.clone()));
            }
        }
    }
    t
}

/// Health-check failover on the service path, once per run.
pub struct Failover {
    /// Check interval × unhealthy threshold.
    pub window: Duration,
    pub rate_per_second: f64,
    /// When the second target's echo server was stopped, since the stream began.
    pub stopped_after: Duration,
    pub tally: Tally,
    /// Stop → the owner's `endpoint-service get` shows the target UNHEALTHY.
    pub stop_to_unhealthy: Res<Duration>,
    /// Restart of the echo server → shown HEALTHY again.
    pub restart_to_healthy: Res<Duration>,
}

fn ms(d: &Res<Duration>) -> Value {
    match d {
        Ok(d) => json!(d.as_secs_f64() * 1e3),
        Err(e) => json!({"error": e}),
    }
}

impl Failover {
    /// The lines printed after the table.
    pub fn lines(&self) -> Vec<String> {
        let t = &self.tally;
        let secs = |d: &Res<Duration>| match d {
            Ok(d) => format!("{:.1} s", d.as_secs_f64()),
            Err(e) => format!("not seen ({e})"),
        };
        let mut lines = vec![
            format!(
                "failover (trellis-service): {} short connections/s, target {SECOND_TARGET}'s echo server stopped; health check every {CHECK_INTERVAL_S} s, unhealthy after {UNHEALTHY_THRESHOLD} (window {} s)",
                self.rate_per_second,
                self.window.as_secs()
            ),
            format!(
                "  failed connections: {} of {} before the stop, {} of {} in the window, {} of {} after the window",
                t.failed_before_stop,
                t.before_stop,
                t.failed_in_window,
                t.in_window,
                t.failed_after_window,
                t.after_window
            ),
            format!(
                "  shown UNHEALTHY {} after the stop; HEALTHY again {} after its restart",
                secs(&self.stop_to_unhealthy),
                secs(&self.restart_to_healthy)
            ),
        ];
        if let Some((at, e)) = &t.first_failure {
            lines.push(format!("  first failure {at:+.2} s from the stop: {e}"));
        }
        lines
    }

    pub fn json(&self) -> Value {
        let t = &self.tally;
        json!({
            "path": "trellis-service",
            "stoppedTarget": SECOND_TARGET.to_string(),
            "healthCheck": {"intervalSeconds": CHECK_INTERVAL_S, "timeoutSeconds": CHECK_TIMEOUT_S,
                            "unhealthyThresholdCount": UNHEALTHY_THRESHOLD, "healthyThresholdCount": HEALTHY_THRESHOLD},
            "windowSeconds": self.window.as_secs_f64(),
            "connectionsPerSecond": self.rate_per_second,
            "stoppedAfterSeconds": self.stopped_after.as_secs_f64(),
            "connections": {"beforeStop": t.before_stop, "inWindow": t.in_window, "afterWindow": t.after_window},
            "failed": {"beforeStop": t.failed_before_stop, "inWindow": t.failed_in_window, "afterWindow": t.failed_after_window},
            "firstFailure": t.first_failure.as_ref().map(|(at, e)| json!({"secondsFromStop": at, "error": e})),
            "stopToUnhealthyMs": ms(&self.stop_to_unhealthy),
            "restartToHealthyMs": ms(&self.restart_to_healthy),
        })
    }
}

impl Path for TrellisService {
    fn name(&self) -> &'static str {
        "trellis-service"
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
        self.setup.borrow().tunnel_pids()
    }

    fn restart(&mut self) -> Res<()> {
        let probe = self.echo_addr();
        self.setup.borrow_mut().restart(probe)
    }

    fn failover(&mut self, second: &mut echo::Server) -> Option<Res<Failover>> {
        Some(self.run_failover(second))
    }

    fn version(&self) -> Option<String> {
        Some(self.setup.borrow().version())
    }

    fn check(&mut self) -> Res<()> {
        self.setup.borrow_mut().check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64, error: Option<&str>) -> Attempt {
        Attempt { at: Duration::from_millis(ms), error: error.map(str::to_string) }
    }

    #[test]
    fn tally_splits_failures_at_the_stop_and_at_the_end_of_the_window() {
        let attempts = [
            at(500, None),
            at(1_900, Some("refused early")),
            at(2_000, Some("reset")),
            at(11_999, None),
            at(12_000, Some("late")),
            at(13_000, None),
        ];
        let t = tally(&attempts, Duration::from_secs(2), Duration::from_secs(10));
        assert_eq!((t.before_stop, t.in_window, t.after_window), (2, 2, 2));
        assert_eq!((t.failed_before_stop, t.failed_in_window, t.failed_after_window), (1, 1, 1));
        let (when, error) = t.first_failure.expect("a first failure");
        assert!((when + 0.1).abs() < 1e-9, "{when}");
        assert_eq!(error, "refused early");
    }

    #[test]
    fn tally_of_a_clean_stream_has_no_failure() {
        let attempts: Vec<Attempt> = (0..100).map(|i| at(i * 200, None)).collect();
        let t = tally(&attempts, Duration::from_secs(2), detection_window());
        assert_eq!((t.before_stop, t.in_window, t.after_window), (10, 50, 40));
        assert_eq!(t.failed_before_stop + t.failed_in_window + t.failed_after_window, 0);
        assert_eq!(t.first_failure, None);
    }

    #[test]
    fn target_state_reads_the_views_target_and_port() {
        let view = json!({"targetHealth": [
            {"target": "127.0.0.1", "targetPort": 7, "state": "HEALTHY", "agents": 1},
            {"target": "127.0.0.2", "targetPort": 9, "state": "HEALTHY", "agents": 1},
            {"target": "127.0.0.2", "targetPort": 7, "state": "UNHEALTHY", "agents": 1, "reason": "refused"},
        ]});
        assert_eq!(target_state(&view, "127.0.0.2", 7), Some("UNHEALTHY"));
        assert_eq!(target_state(&view, "127.0.0.2", 9), Some("HEALTHY"));
        assert_eq!(target_state(&view, "127.0.0.3", 7), None);
        assert_eq!(target_state(&json!({}), "127.0.0.2", 7), None);
    }
}
