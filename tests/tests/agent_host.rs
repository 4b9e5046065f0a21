//! Running agents the way the first hour does: two agents on one host (one
//! serves endpoints only and binds no tunnel listener), a second agent
//! pointed at an enrolled state directory with another join token (a hard
//! error naming both), and the access log in a file of its own that is
//! reopened on SIGHUP after log rotation.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use trellis_e2e::flow::endpoint_address;
use trellis_e2e::tcp_service::echo_roundtrip;
use trellis_e2e::{LoopbackPair, PairOptions, Proc, TcpService, bins, wait_until};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// An echo service shared by the owner with the consumer, with the consumer's
/// endpoint `Available`; returns where clients connect.
fn shared_echo(env: &LoopbackPair, echo: &TcpService) -> SocketAddr {
    let config = env.owner.create_ip_config("echo", &env.gateway_id, "127.0.0.1", &[&echo.addr.port().to_string()]);
    let arn = config["arn"].as_str().expect("config arn");
    env.share("echo-share", arn);
    let endpoint = env.create_endpoint(arn);
    SocketAddr::new(endpoint_address(&endpoint).ip.parse().expect("IPv4"), echo.addr.port())
}

#[test]
fn an_endpoint_only_agent_binds_no_tunnel_listener_and_serves_next_to_a_gateway_agent() {
    let echo = TcpService::echo("echo-service", SocketAddr::new(LOCALHOST, 0), None);
    let env = LoopbackPair::start_with(PairOptions { consumer_endpoint_only: true, ..PairOptions::default() });
    let to = shared_echo(&env, &echo);
    assert_eq!(
        echo_roundtrip(to, b"two agents, one host", IO_TIMEOUT).expect("echo").as_slice(),
        b"two agents, one host"
    );

    // The consumer agent listens on its DNS and metrics addresses and its endpoint, nothing else.
    let consumer = &env.consumer_agent;
    let mut expected: Vec<SocketAddr> = [consumer.dns_addr, consumer.metrics_addr].into_iter().flatten().collect();
    expected.push(to);
    // (An endpoint address is a socket per data-plane thread, all on one port.)
    let mut listening = consumer.listening_tcp();
    listening.sort();
    listening.dedup();
    expected.sort();
    assert_eq!(listening, expected, "the endpoint-only agent listens where it should not");
    assert!(consumer.proc.output().contains("no tunnel listener (endpoints only)"), "the summary says so");
    // Its data plane runs on a thread per CPU (at most 8), each listening on the endpoint address.
    let cpus = std::thread::available_parallelism().map_or(1, usize::from).min(8);
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", consumer.proc.pid()))
        .expect("the agent's threads")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("trellis-dp-"))
        .collect();
    assert_eq!(threads.len(), if cpus > 1 { cpus } else { 0 }, "data-plane threads: {threads:?}");
    // The gateway agent does have its tunnel listener.
    assert!(env.owner_agent.listening_tcp().contains(&env.owner_agent.tunnel_addr));
}

fn agent_command(cp_url: &str, token: Option<&str>, state_dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bins::trellis());
    cmd.arg("agent").args(["--control-plane", cp_url]).arg("--state-dir").arg(state_dir);
    if let Some(token) = token {
        cmd.args(["--join-token", token]);
    }
    cmd.args(["--metrics-listen", "127.0.0.1:0"]).args(extra);
    cmd
}

#[test]
fn a_join_token_for_a_state_dir_enrolled_with_another_is_refused_and_the_same_one_restarts() {
    let env = LoopbackPair::start_with(PairOptions { consumer_endpoint_only: true, ..PairOptions::default() });
    let consumer_dir = env.consumer_agent.state_dir.clone();
    let identity: Value =
        serde_json::from_str(&std::fs::read_to_string(consumer_dir.join("identity.json")).expect("identity.json"))
            .expect("identity json");
    let agent_id = identity["agentId"].as_str().expect("agentId").to_string();
    let stored_token = identity["joinTokenId"].as_str().expect("the enrolling token is recorded").to_string();

    // A second agent, meant for the owner's subnet, pointed at the consumer's state directory.
    let other_token = env.owner.join_token(&env.owner_subnet);
    let logs = tempfile::tempdir().expect("log dir");
    let mut second =
        Proc::spawn("second-agent", agent_command(&env.cp.url, Some(&other_token), &consumer_dir, &[]), logs.path());
    let status = second.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "the second agent ran as the first one");
    let out = second.output();
    let other_id = other_token.split('.').nth(1).expect("token id");
    for part in [agent_id.as_str(), env.consumer.id(), stored_token.as_str(), other_id, "--state-dir"] {
        assert!(out.contains(part), "the error does not name {part}:\n{out}");
    }
    // The first agent is untouched and keeps running.
    let mut first = env.consumer_agent;
    first.proc.assert_running();

    // The same command line again (same token) is a restart, not an error.
    let token = env.consumer.join_token(&env.consumer_subnet);
    let dir = tempfile::tempdir().expect("state dir");
    let state = dir.path().join("state");
    let run = |name: &str| {
        let mut p = Proc::spawn(name, agent_command(&env.cp.url, Some(&token), &state, &[]), logs.path());
        p.wait_for_line("the agent to run", Duration::from_secs(30), |l| l.contains("agent running: ").then_some(()));
        p
    };
    let mut enrolled = run("third-agent");
    enrolled.stop();
    let mut restarted = run("third-agent-again");
    restarted.assert_running();
}

#[test]
fn the_access_log_goes_to_its_file_and_is_reopened_on_sighup() {
    let logs = tempfile::tempdir().expect("log dir");
    let path = logs.path().join("access.log");
    let echo = TcpService::echo("echo-service", SocketAddr::new(LOCALHOST, 0), None);
    let env = LoopbackPair::start_with(PairOptions {
        consumer_agent_args: vec!["--access-log".into(), path.display().to_string()],
        consumer_endpoint_only: true,
        ..PairOptions::default()
    });
    let to = shared_echo(&env, &echo);
    let lines = |p: &Path| -> Vec<Value> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
            .collect()
    };
    echo_roundtrip(to, b"first", IO_TIMEOUT).expect("echo");
    wait_until("the first access-log line in the file", IO_TIMEOUT, || (lines(&path).len() == 1).then_some(()));
    assert_eq!(lines(&path)[0]["role"], "endpoint");
    assert!(env.consumer_agent.access_log().is_empty(), "access-log lines on stdout too");

    let rotated = logs.path().join("access.log.1");
    std::fs::rename(&path, &rotated).expect("rotate");
    let hup = Command::new("kill").args(["-HUP", &env.consumer_agent.proc.pid().to_string()]).status().expect("kill");
    assert!(hup.success());
    wait_until("the agent to reopen its access log", IO_TIMEOUT, || path.exists().then_some(()));
    echo_roundtrip(to, b"second", IO_TIMEOUT).expect("echo after SIGHUP");
    wait_until("the second access-log line in the new file", IO_TIMEOUT, || (lines(&path).len() == 1).then_some(()));
    assert_eq!(lines(&rotated).len(), 1, "the rotated file got nothing more");
    let mut agent = env.consumer_agent;
    agent.proc.assert_running();
}
