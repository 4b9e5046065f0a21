//! Throughput with iperf3: one server for every path, the client run once per
//! figure with `-J` and read from its JSON.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::Res;
use crate::proc::{self, Daemon};

/// Starts `iperf3 -s` on 127.0.0.1 at a free port, or with `all_loopback` on every loopback
/// address (`0.0.0.0%lo`: bound to the loopback device, so nothing outside this host reaches
/// it); returns it with its address on 127.0.0.1.
///
/// All loopback addresses is for the `trellis-service` path's targets, 127.0.0.1 and
/// 127.0.0.2: one iperf3 test is several connections (control, one per stream) that least
/// connections spreads over both targets, and they must all reach the same iperf3 process.
/// Its port then is taken on every loopback address, so no path's entry may use it.
pub fn start_server(bin: &Path, logs: &Path, name: &str, all_loopback: bool) -> Res<(Daemon, SocketAddr)> {
    let mut last_error = String::new();
    // The port is picked by binding port 0 and released before iperf3 binds it: retry if someone took it meanwhile.
    for attempt in 1..=5 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("pick a port for iperf3: {e}"))?
            .port();
        let mut cmd = Command::new(bin);
        let bind = if all_loopback { "0.0.0.0%lo" } else { "127.0.0.1" };
        cmd.args(["-s", "-B", bind, "-p", &port.to_string(), "--forceflush"]);
        let mut daemon = Daemon::spawn(&format!("{name}-{attempt}"), cmd, logs, "TERM")?;
        let wanted = format!("Server listening on {port}");
        match daemon.wait_for_log("iperf3 -s to listen", Duration::from_secs(10), |l| l.contains(&wanted).then_some(()))
        {
            Ok(()) => return Ok((daemon, SocketAddr::from(([127, 0, 0, 1], port)))),
            Err(e) => last_error = e,
        }
    }
    Err(format!("iperf3 server did not start: {last_error}"))
}

/// What one iperf3 test measured.
pub struct Throughput {
    /// The receiver's rate over the measured seconds (the omitted first second left out).
    pub gbps: f64,
    /// Every byte the test moved, the omitted second's included: what the tunnel's CPU time
    /// during the whole test is divided by.
    pub bytes: u64,
}

/// Runs one iperf3 test through `addr`.
pub fn measure(bin: &Path, addr: SocketAddr, seconds: u64, streams: u32, reverse: bool) -> Res<Throughput> {
    let mut cmd = Command::new(bin);
    cmd.args(["-c", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-t", &seconds.to_string(), "-O", "1", "-P", &streams.to_string(), "-J"])
        .args(["--connect-timeout", "5000"]);
    if reverse {
        cmd.arg("-R");
    }
    let out = proc::run(cmd, Duration::from_secs(seconds + 30))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("iperf3 printed no JSON ({e}): {}", stderr_or(&out)))?;
    if let Some(err) = json["error"].as_str() {
        return Err(format!("iperf3 through {addr}: {err}"));
    }
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| format!("iperf3 JSON has no end.sum_received.bits_per_second: {}", stderr_or(&out)))?;
    Ok(Throughput { gbps: bps / 1e9, bytes: bytes_moved(&json) })
}

/// The bytes of every interval the client reported, omitted ones included (the client's side:
/// sent, or received with `-R`); the receiver's total when there are no intervals.
fn bytes_moved(json: &serde_json::Value) -> u64 {
    let intervals: u64 =
        json["intervals"].as_array().map(|a| a.iter().filter_map(|i| i["sum"]["bytes"].as_u64()).sum()).unwrap_or(0);
    if intervals > 0 { intervals } else { json["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0) }
}

fn stderr_or(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if err.is_empty() { format!("exit {}", out.status) } else { err }
}

/// `iperf3 --version`'s first line.
pub fn version(bin: &Path) -> String {
    crate::first_line_of(bin, &["--version"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_moved_counts_the_omitted_second_too() {
        let json = serde_json::json!({
            "intervals": [
                {"sum": {"bytes": 100, "omitted": true}},
                {"sum": {"bytes": 250, "omitted": false}},
            ],
            "end": {"sum_received": {"bytes": 240}},
        });
        assert_eq!(bytes_moved(&json), 350);
        assert_eq!(bytes_moved(&serde_json::json!({"end": {"sum_received": {"bytes": 240}}})), 240);
    }
}
