//! The data plane does not depend on the control plane being up.
//!
//! With the control plane killed, an established endpoint keeps taking new
//! connections; agents restarted during the outage serve the config cached in
//! their state directory; when the control plane comes back (same data
//! directory, same address) the agents reconnect by themselves and a
//! revocation made then takes effect within seconds. Nor on its access
//! log's reader: a log pipe nobody reads stalls the log, not the flows.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use trellis_e2e::flow::endpoint_address;
use trellis_e2e::net::free_port;
use trellis_e2e::postgres::{FRUITS, FRUITS_QUERY, PgSession, psql};
use trellis_e2e::{Agent, LoopbackPair, Postgres, wait_until};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// DESIGN §2: revoking stops new connections "within seconds"; the suites hold it to 5.
const REVOKE_DEADLINE: Duration = Duration::from_secs(5);
/// How long agents may take to notice the control plane is gone or back.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(60);
/// Eight failed long-polls take 31-62 s of backoff; generous for a loaded machine.
const LONG_OUTAGE: Duration = Duration::from_secs(120);

/// Waits until the agent's current process has logged a line containing `needle`.
fn wait_logged(agent: &mut Agent, what: &str, needle: &str) {
    agent.proc.wait_for_line(what, NOTICE_TIMEOUT, |l| l.contains(needle).then_some(()));
}

#[test]
fn endpoints_keep_working_without_the_control_plane_and_revocation_works_once_it_is_back() {
    let pg = Postgres::start(LOCALHOST, free_port(LOCALHOST), None);
    let mut env = LoopbackPair::start();
    let config = env.owner.create_ip_config("orders-db", &env.gateway_id, "127.0.0.1", &[&pg.port.to_string()]);
    let config_arn = config["arn"].as_str().expect("config arn").to_string();
    let share = env.share("orders-share", &config_arn);
    let share_id = share["id"].as_str().expect("share id").to_string();
    let at = endpoint_address(&env.create_endpoint(&config_arn));
    let endpoint = SocketAddr::new(at.ip.parse().expect("endpoint IPv4"), pg.port);
    assert_eq!(psql(None, &at.ip, pg.port, FRUITS_QUERY).expect("psql before the outage"), FRUITS);

    // (a) The control plane dies. Both agents notice (their long-polls break)
    // and the endpoint still takes new connections.
    env.cp.kill();
    wait_logged(&mut env.consumer_agent, "the consumer agent to notice the outage", "config long-poll failed");
    wait_logged(&mut env.owner_agent, "the owner agent to notice the outage", "config long-poll failed");
    for i in 0..3 {
        let answer = psql(None, &at.ip, pg.port, FRUITS_QUERY)
            .unwrap_or_else(|e| panic!("psql #{i} with the control plane down: {e}"));
        assert_eq!(answer, FRUITS);
    }

    // (b) Both agents restart while the control plane is still down: each
    // serves the config cached in its state directory.
    env.owner_agent.restart();
    env.consumer_agent.restart();
    for agent in [&mut env.owner_agent, &mut env.consumer_agent] {
        agent.proc.wait_for_line("the restarted agent to serve its cached config", NOTICE_TIMEOUT, |l| {
            l.contains("serving the cached config").then_some(())
        });
    }
    let answer = wait_until("psql through the restarted agents, control plane down", NOTICE_TIMEOUT, || {
        psql(None, &at.ip, pg.port, FRUITS_QUERY).ok()
    });
    assert_eq!(answer, FRUITS);
    assert_eq!(psql(None, &at.ip, pg.port, "select name from whoami").expect("psql"), pg.instance);
    env.consumer_agent.proc.assert_running();
    env.owner_agent.proc.assert_running();

    // The outage lasts until the agents' config long-polls have backed off to
    // their longest retry interval (eight failed polls, 30-60 s), as in a
    // real outage; a session opened now stays open across what follows.
    for agent in [&mut env.owner_agent, &mut env.consumer_agent] {
        agent.proc.wait_for_line("the agent's long-poll to back off fully", LONG_OUTAGE, |l| {
            (l.contains("config long-poll failed") && l.contains("failures=8")).then_some(())
        });
    }
    let mut session = PgSession::open(endpoint, Duration::from_secs(10)).expect("open a session during the outage");
    assert_eq!(session.query("select count(*) from fruits").expect("query"), ["3"]);

    // (c) The control plane comes back on its address with its data, and the
    // owner revokes at once: the agents must not sit out their backoff.
    env.cp.restart();
    env.owner.api.delete(&format!("/v1/resourceshares/{share_id}")).ok("delete the share after the restart");
    let revoked_at = Instant::now();
    let refused_after = wait_until("new connections to be refused after the revocation", LONG_OUTAGE, || {
        PgSession::open(endpoint, Duration::from_secs(1)).is_err().then(|| revoked_at.elapsed())
    });
    assert!(
        refused_after <= REVOKE_DEADLINE,
        "after the control plane came back, new connections were still accepted {refused_after:?} after the share \
         was deleted (limit {REVOKE_DEADLINE:?})"
    );
    assert!(
        session.wait_closed(REVOKE_DEADLINE.saturating_sub(revoked_at.elapsed()) + Duration::from_secs(1)),
        "the session opened during the outage is still open {:?} after the revocation",
        revoked_at.elapsed()
    );
    for agent in [&mut env.owner_agent, &mut env.consumer_agent] {
        wait_logged(agent, "the agent to report to the control plane again", "reach the control plane again");
    }
    // The control plane kept its state across the restart: the owner's key
    // works and the usage recorded before the outage is still there.
    let config_id = config["id"].as_str().expect("config id");
    wait_until("usage from the restarted agents", NOTICE_TIMEOUT, || {
        env.owner.usage(config_id).iter().find(|r| r["consumerAccountId"] == env.consumer.id()).cloned()
    });
    assert_eq!(pg.psql(FRUITS_QUERY).expect("direct psql"), FRUITS, "the database itself is untouched");
}

/// An agent's access log written to a pipe nobody reads (a log collector that
/// hung): once the pipe is full the log's writer waits, and the flows do not.
#[test]
fn a_log_pipe_nobody_reads_never_stalls_flows() {
    use trellis_e2e::PairOptions;
    use trellis_e2e::tcp_service::{TcpService, echo_roundtrip};

    let dir = tempfile::tempdir().expect("temp dir");
    let pipes: Vec<std::path::PathBuf> =
        ["owner", "consumer"].iter().map(|n| dir.path().join(format!("{n}.log"))).collect();
    let mut held = Vec::new();
    for pipe in &pipes {
        let made = std::process::Command::new("mkfifo").arg(pipe).status().expect("run mkfifo");
        assert!(made.success(), "mkfifo {}", pipe.display());
        // Opened for reading and writing, so neither this open nor the agent's blocks; never read.
        held.push(std::fs::OpenOptions::new().read(true).write(true).open(pipe).expect("open the pipe"));
    }
    let log_args = |pipe: &std::path::Path| vec!["--access-log".to_string(), pipe.display().to_string()];
    let env = LoopbackPair::start_with(PairOptions {
        owner_agent_args: log_args(&pipes[0]),
        consumer_agent_args: log_args(&pipes[1]),
        ..PairOptions::default()
    });
    let echo_addr = SocketAddr::new(LOCALHOST, free_port(LOCALHOST));
    let _echo = TcpService::echo("echo", echo_addr, None);
    let config = env.owner.create_ip_config("echo", &env.gateway_id, "127.0.0.1", &[&echo_addr.port().to_string()]);
    let config_arn = config["arn"].as_str().expect("config arn").to_string();
    env.share("echo-share", &config_arn);
    let at = endpoint_address(&env.create_endpoint(&config_arn));
    let endpoint = SocketAddr::new(at.ip.parse().expect("endpoint IPv4"), echo_addr.port());
    wait_until("the endpoint to answer", Duration::from_secs(30), || {
        echo_roundtrip(endpoint, b"ping", Duration::from_secs(2)).ok()
    });
    // Each flow logs a line on each agent: 600 of them fill a 64 KiB pipe several times over.
    let started = Instant::now();
    for i in 0..600 {
        let message = format!("flow {i}");
        let back = echo_roundtrip(endpoint, message.as_bytes(), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("flow {i} with the access-log pipe full: {e}"));
        assert_eq!(back, message.as_bytes());
    }
    assert!(started.elapsed() < Duration::from_secs(60), "600 flows took {:?}", started.elapsed());
    // The pipes are full and the agents' log writers wait with the rest: what is
    // read now is followed by more, and in the end every flow's line arrives.
    for (pipe, file) in pipes.iter().zip(held) {
        use std::os::unix::fs::OpenOptionsExt;
        let mut reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(0o4000) // O_NONBLOCK
            .open(pipe)
            .expect("open the pipe to look");
        let mut buf = vec![0u8; 1 << 20];
        let mut read = |buf: &mut [u8]| match std::io::Read::read(&mut reader, buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("read {}: {e}", pipe.display()),
        };
        let first = read(&mut buf);
        let mut lines = buf[..first].iter().filter(|&&b| b == b'\n').count();
        let mut total = first;
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_secs(2) {
            let n = read(&mut buf);
            if n == 0 {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
            total += n;
            quiet_since = Instant::now();
        }
        assert!(first < total, "{}: all {total} bytes fit the pipe; the log never waited", pipe.display());
        assert!(lines >= 600, "{}: {lines} access-log lines for 600 flows", pipe.display());
        drop(file);
    }
}
