//! Paths that fail fast and spread load, with real agents: the owner runs two
//! gateway agents in one subnet (one zone). New connections through the
//! consumer's endpoint are spread over both; when one of them goes silent
//! (SIGSTOP: the kernel still completes TCP handshakes in its backlog, but
//! nothing answers TLS, as with a network that drops packets), the endpoint
//! agent pays one timeout, then skips it at once until its background probe
//! finds it back after SIGCONT.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_e2e::flow::{STATE_TIMEOUT, endpoint_address};
use trellis_e2e::prometheus;
use trellis_e2e::tcp_service::echo_roundtrip;
use trellis_e2e::{Agent, AgentOptions, LoopbackPair, TcpService, wait_until};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The endpoint agent's defaults: TCP+TLS connect 5 s, open request 15 s (a
/// warm connection to a silent gateway waits for the latter).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);
/// Probes back off to 30 s; one more probe round and the config's slack.
const RECOVERY: Duration = Duration::from_secs(60);

/// Sends SIGCONT to a stopped process when dropped, also when the test fails.
struct Stopped(u32);

impl Stopped {
    /// Stops every thread of `pid`. `kill` returns once the signal is queued;
    /// the thread that takes it then stops the others, so on a busy machine
    /// another thread may still answer an open request for a few
    /// milliseconds: wait until all of them are stopped.
    fn stop(pid: u32) -> Stopped {
        signal("-STOP", pid);
        let stopped = Stopped(pid);
        wait_until(&format!("every thread of process {pid} to stop"), STATE_TIMEOUT, || {
            all_threads_stopped(pid).then_some(())
        });
        stopped
    }
}

/// Whether every thread of `pid` is in the stopped state (`T` in `/proc/<pid>/task/*/stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which may hold spaces and parentheses.
            stat.rfind(')').is_some_and(|end| matches!(stat[end + 1..].split_whitespace().next(), Some("T" | "t")))
        })
    })
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal("-CONT", self.0);
    }
}

fn signal(sig: &str, pid: u32) {
    let status = Command::new("kill").args([sig, &pid.to_string()]).status().expect("run kill");
    assert!(status.success(), "kill {sig} {pid} failed");
}

/// The consumer agent's endpoint-side access-log lines.
fn endpoint_lines(consumer: &Agent) -> Vec<Value> {
    consumer.access_log().into_iter().filter(|l| l["role"] == "endpoint").collect()
}

/// The endpoint-side lines after the first `skip`, once there are `n` of them
/// (a line is written just after its connection closes).
fn lines_after(consumer: &Agent, skip: usize, n: usize) -> Vec<Value> {
    wait_until(&format!("{n} access-log lines of the consumer agent"), STATE_TIMEOUT, || {
        let lines = endpoint_lines(consumer);
        (lines.len() >= skip + n).then(|| lines[skip..].to_vec())
    })
}

/// How many endpoint-side flows went through each gateway address.
fn per_gateway(lines: &[Value]) -> HashMap<String, usize> {
    let mut count = HashMap::new();
    for l in lines.iter().filter(|l| l["outcome"] == "closed") {
        *count.entry(l["target"].as_str().unwrap_or_default().to_string()).or_insert(0) += 1;
    }
    count
}

fn gateway_metric(consumer: &Agent, name: &str, address: SocketAddr) -> Option<f64> {
    let text = consumer.metrics().unwrap_or_else(|e| panic!("GET /metrics of the consumer agent: {e}"));
    prometheus::value(&prometheus::parse(&text), name, &[("address", &address.to_string())])
}

#[test]
fn flows_spread_over_two_gateways_and_a_silent_one_costs_one_timeout() {
    let echo = TcpService::echo("echo-service", SocketAddr::new(LOCALHOST, 0), None);
    let env = LoopbackPair::start();
    // A second gateway agent of the owner in the same subnet (same zone).
    let second = Agent::start(AgentOptions {
        name: "owner-agent-2",
        control_plane_url: &env.cp.url,
        join_token: &env.owner.join_token(&env.owner_subnet),
        bind_ip: LOCALHOST,
        netns: None,
        extra_args: Vec::new(),
    });
    wait_until("two ONLINE agents in the owner's subnet", STATE_TIMEOUT, || {
        let list = env.owner.api.get("/v1/agents").ok("list agents");
        let online = list["items"]
            .as_array()?
            .iter()
            .filter(|a| a["subnetId"] == env.owner_subnet.as_str() && a["status"] == "ONLINE")
            .count();
        (online == 2).then_some(())
    });
    let config = env.owner.create_ip_config("echo", &env.gateway_id, "127.0.0.1", &[&echo.addr.port().to_string()]);
    let config_arn = config["arn"].as_str().expect("config arn");
    env.share("echo-share", config_arn);
    let at = endpoint_address(&env.create_endpoint(config_arn));
    let to = SocketAddr::new(at.ip.parse().expect("endpoint IPv4"), echo.addr.port());
    let (first, silent) = (env.owner_agent.tunnel_addr, second.tunnel_addr);
    let flow = |label: &str| {
        let payload = label.as_bytes();
        let back = echo_roundtrip(to, payload, IO_TIMEOUT).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(back, payload, "{label}: the echo came back wrong");
    };

    // Until the consumer's config names both gateway agents, flows can only
    // go to one; after that they alternate.
    let mut made = 0;
    wait_until("the endpoint to reach both gateway agents", STATE_TIMEOUT, || {
        flow("warm-up");
        made += 1;
        let seen = per_gateway(&endpoint_lines(&env.consumer_agent));
        (seen.contains_key(&first.to_string()) && seen.contains_key(&silent.to_string())).then_some(())
    });
    let before = lines_after(&env.consumer_agent, 0, made).len();
    for i in 0..10 {
        flow(&format!("spread {i}"));
    }
    let spread = per_gateway(&lines_after(&env.consumer_agent, before, 10));
    let (on_first, on_second) = (spread.get(&first.to_string()), spread.get(&silent.to_string()));
    assert!(
        on_first >= Some(&3) && on_second >= Some(&3),
        "10 flows were not spread over both gateway agents of the zone: {spread:?}"
    );

    // One gateway agent goes silent. Every new connection still succeeds,
    // and all of them together pay one timeout at most (the endpoint agent
    // keeps warm connections, so that one may be the open-request timeout).
    let stopped = Stopped::stop(second.proc.pid());
    let before = endpoint_lines(&env.consumer_agent).len();
    let started = Instant::now();
    const FLOWS: usize = 8;
    for i in 0..FLOWS {
        flow(&format!("while silent {i}"));
    }
    let took = started.elapsed();
    // Without the memory, every other flow would try the silent agent first
    // and wait at least the connect timeout: 4 × 5 s.
    assert!(
        took < OPEN_TIMEOUT + CONNECT_TIMEOUT,
        "{FLOWS} connections took {took:?} with one gateway agent silent: more than one timeout was paid"
    );
    let silent_lines = &lines_after(&env.consumer_agent, before, FLOWS);
    assert_eq!(per_gateway(silent_lines).get(&first.to_string()), Some(&FLOWS), "{silent_lines:?}");
    let failed_over: Vec<&Value> = silent_lines.iter().filter(|l| l.get("tried").is_some()).collect();
    assert!(failed_over.len() <= 1, "more than one flow waited for the silent agent: {failed_over:?}");
    for line in failed_over {
        let tried = line["tried"].to_string();
        assert!(tried.contains(&silent.to_string()), "the access log names the agent that was tried: {line}");
    }
    // The endpoint agent's metrics say which gateway is down and how often it was skipped.
    assert_eq!(gateway_metric(&env.consumer_agent, "trellis_gateway_up", silent), Some(0.0));
    let skipped = gateway_metric(&env.consumer_agent, "trellis_gateway_skipped_total", silent).unwrap_or(0.0);
    // Before it is marked down, one flow may go to the other agent (its turn) and one pays the timeout.
    assert!(skipped >= (FLOWS - 2) as f64, "only {skipped} of {FLOWS} flows skipped the silent agent at once");
    assert_eq!(gateway_metric(&env.consumer_agent, "trellis_gateway_up", first), Some(1.0));

    // It answers again: the background probe finds it, and new flows reach it.
    drop(stopped);
    wait_until("the probe to find the agent back", RECOVERY, || {
        (gateway_metric(&env.consumer_agent, "trellis_gateway_up", silent)? == 1.0).then_some(())
    });
    let before = endpoint_lines(&env.consumer_agent).len();
    for i in 0..6 {
        flow(&format!("after recovery {i}"));
    }
    let after = per_gateway(&lines_after(&env.consumer_agent, before, 6));
    assert!(after.get(&silent.to_string()) >= Some(&2), "the recovered agent takes flows again: {after:?}");
}
