//! `trellis dev`, the first thing a newcomer runs: one process with a control
//! plane and two agents on loopback, sharing a real PostgreSQL; what it prints
//! must work with the real client and the CLI.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use trellis_e2e::net::free_port;
use trellis_e2e::postgres::{FRUITS, FRUITS_QUERY, psql};
use trellis_e2e::{Cli, Postgres, Proc, bins};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[test]
fn dev_mode_shares_a_local_database_reachable_with_psql_and_the_cli() {
    let pg = Postgres::start(LOCALHOST, free_port(LOCALHOST), None);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new(bins::trellis());
    cmd.args(["dev", "--share", &format!("127.0.0.1:{}", pg.port), "--output", "json", "--data-dir"])
        .arg(dir.path().join("data"));
    let mut dev = Proc::spawn("trellis-dev", cmd, &dir.path().join("logs"));
    let summary: Value = dev.wait_for_line("the dev summary", Duration::from_secs(90), |line| {
        serde_json::from_str::<Value>(line).ok().filter(|v| v.get("endpointAddress").is_some())
    });
    let endpoint: std::net::SocketAddr =
        summary["endpointAddress"].as_str().expect("endpointAddress").parse().expect("endpointAddress is ip:port");
    assert_eq!(endpoint.port(), pg.port, "the endpoint keeps the resource's port");
    assert_ne!(endpoint.ip(), LOCALHOST, "the endpoint has its own address");
    assert_eq!(psql(None, &endpoint.ip().to_string(), endpoint.port(), FRUITS_QUERY).as_deref(), Ok(FRUITS));

    // The printed files let the CLI act as the consumer.
    let key = std::fs::read_to_string(summary["consumer"]["apiKeyFile"].as_str().expect("consumer apiKeyFile"))
        .expect("read the consumer's key file");
    let ca = std::path::PathBuf::from(summary["caCert"].as_str().expect("caCert"));
    let cli = Cli::new(&bins::trellis(), summary["url"].as_str().expect("url"), Some(key.trim()), &ca);
    let vpce = summary["vpcEndpointId"].as_str().expect("vpcEndpointId");
    let ep = cli.json(&["vpc-endpoint", "get", vpce]);
    assert_eq!(ep["state"], "Available", "{ep}");
    dev.assert_running();
}
