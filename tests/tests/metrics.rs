//! What the owner's operators see of the traffic: the gateway agent's
//! Prometheus `/metrics` (new and active connections, bytes each way,
//! labelled by resource, endpoint and consumer account) and its access log
//! (one JSON line per connection on stdout). An echo service behind the
//! endpoint makes every byte count exact.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;
use trellis_e2e::flow::{STATE_TIMEOUT, endpoint_address};
use trellis_e2e::prometheus::{self, Sample};
use trellis_e2e::{Agent, LoopbackPair, TcpService, wait_until};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Payload sizes of the connections that open and close.
const SIZES: [usize; 3] = [1_000, 20_000, 300_000];
/// Payload of the connection held open.
const HELD: usize = 10;

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Connects to `to`, sends `data`, half-closes, reads the echo to the end;
/// returns the client's own address (what the access log must name).
fn echo_through(to: SocketAddr, data: &[u8]) -> SocketAddr {
    let mut stream = TcpStream::connect_timeout(&to, IO_TIMEOUT).unwrap_or_else(|e| panic!("connect {to}: {e}"));
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    let local = stream.local_addr().expect("local address");
    stream.write_all(data).expect("send through the endpoint");
    stream.shutdown(Shutdown::Write).expect("half-close");
    let mut back = Vec::new();
    stream.read_to_end(&mut back).expect("read the echo");
    assert!(back == data, "the echo of {} bytes came back as {} bytes", data.len(), back.len());
    local
}

fn metrics(agent: &Agent) -> Vec<Sample> {
    prometheus::parse(&agent.metrics().unwrap_or_else(|e| panic!("GET /metrics of {}: {e}", agent.proc.name())))
}

#[test]
fn the_gateway_counts_connections_and_bytes_per_consumer_and_logs_each_connection() {
    let echo = TcpService::echo("echo-service", SocketAddr::new(LOCALHOST, 0), None);
    let env = LoopbackPair::start();
    let config = env.owner.create_ip_config("echo", &env.gateway_id, "127.0.0.1", &[&echo.addr.port().to_string()]);
    let config_id = config["id"].as_str().expect("config id").to_string();
    env.share("echo-share", config["arn"].as_str().expect("config arn"));
    let endpoint = env.create_endpoint(config["arn"].as_str().expect("config arn"));
    let endpoint_id = endpoint["vpcEndpointId"].as_str().or(endpoint["id"].as_str()).expect("endpoint id").to_string();
    let to = SocketAddr::new(endpoint_address(&endpoint).ip.parse().expect("IPv4"), echo.addr.port());
    let consumer_id = env.consumer.id().to_string();
    let labels = |role: &'static str| {
        [
            ("role", role),
            ("resource", config_id.as_str()),
            ("endpoint", endpoint_id.as_str()),
            ("consumer_account", consumer_id.as_str()),
        ]
    };
    let gateway = labels("gateway");

    // Connections that open, move data and close.
    let clients: Vec<SocketAddr> = SIZES.iter().map(|&n| echo_through(to, &payload(n))).collect();
    // One connection held open.
    let mut held = TcpStream::connect_timeout(&to, IO_TIMEOUT).expect("connect the held connection");
    held.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    held.write_all(&payload(HELD)).expect("send on the held connection");
    let mut back = [0u8; HELD];
    held.read_exact(&mut back).expect("echo on the held connection");
    let held_client = held.local_addr().expect("local address");

    let moved: usize = SIZES.iter().sum::<usize>() + HELD;
    let total = SIZES.len() + 1;
    let samples = wait_until("the gateway's metrics to count every connection and byte", STATE_TIMEOUT, || {
        let s = metrics(&env.owner_agent);
        let done = prometheus::value(&s, "trellis_connections_total", &gateway) == Some(total as f64)
            && prometheus::value(&s, "trellis_bytes_in_total", &gateway) == Some(moved as f64)
            && prometheus::value(&s, "trellis_bytes_out_total", &gateway) == Some(moved as f64);
        done.then_some(s)
    });
    assert_eq!(
        prometheus::value(&samples, "trellis_active_connections", &gateway),
        Some(1.0),
        "one connection is open now"
    );
    // The consumer agent counts the same flows on its side, same labels.
    let endpoint_side = labels("endpoint");
    wait_until("the consumer agent's metrics to count the same flows", STATE_TIMEOUT, || {
        let s = metrics(&env.consumer_agent);
        (prometheus::value(&s, "trellis_connections_total", &endpoint_side) == Some(total as f64)
            && prometheus::value(&s, "trellis_bytes_in_total", &endpoint_side) == Some(moved as f64))
        .then_some(())
    });

    // One access-log line per closed connection, with the exact bytes.
    let log_line = |client: SocketAddr| -> Option<Value> {
        env.owner_agent
            .access_log()
            .into_iter()
            .find(|r| r["role"] == "gateway" && r["clientAddr"] == client.to_string())
    };
    for (client, &size) in clients.iter().zip(&SIZES) {
        let line =
            wait_until(&format!("the gateway's access-log line for {client}"), STATE_TIMEOUT, || log_line(*client));
        assert_eq!(line["vpcEndpointId"], endpoint_id.as_str(), "{line}");
        assert_eq!(line["consumerAccountId"], consumer_id.as_str(), "{line}");
        assert_eq!(line["resourceConfigurationId"], config_id.as_str(), "{line}");
        assert_eq!(line["target"], echo.addr.to_string(), "{line}");
        assert_eq!(line["bytesIn"], size as u64, "bytes from the consumer: {line}");
        assert_eq!(line["bytesOut"], size as u64, "bytes to the consumer: {line}");
        assert_eq!(line["outcome"], "closed", "{line}");
        assert!(line["durationMs"].is_u64() && line["start"].is_string() && line["end"].is_string(), "{line}");
    }
    assert!(log_line(held_client).is_none(), "an open connection is logged when it ends, not before");

    // Closing the held connection: active goes back to 0, and its line appears.
    drop(held);
    wait_until("the gateway's active connections to drop to 0", STATE_TIMEOUT, || {
        (prometheus::value(&metrics(&env.owner_agent), "trellis_active_connections", &gateway) == Some(0.0))
            .then_some(())
    });
    let line = wait_until("the access-log line of the held connection", STATE_TIMEOUT, || log_line(held_client));
    assert_eq!((line["bytesIn"].as_u64(), line["bytesOut"].as_u64()), (Some(HELD as u64), Some(HELD as u64)), "{line}");
    assert_eq!(line["outcome"], "closed", "{line}");
    assert_eq!(
        env.owner_agent.access_log().iter().filter(|r| r["role"] == "gateway").count(),
        total,
        "exactly one gateway line per connection"
    );
    // Nothing was refused.
    let s = metrics(&env.owner_agent);
    assert!(
        prometheus::value(&s, "trellis_rejected_connections_total", &gateway).unwrap_or(0.0) == 0.0,
        "no connection was rejected"
    );
}
