//! The real-workload figure: a PostgreSQL the harness starts (its own data
//! directory under the work directory, trust authentication on loopback),
//! initialized once with `pgbench -i`, and `pgbench -S` (read-only, one
//! primary-key SELECT per transaction) through every path.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::Res;
use crate::proc::{self, Daemon};

/// The database pgbench works in.
pub const DATABASE: &str = "postgres";
/// The role pgbench connects as (trust authentication: no password).
pub const USER: &str = "postgres";
/// `pgbench -i -s`: 100,000 accounts per unit, about 15 MiB: all in memory, so a transaction is
/// a round trip and a lookup, and the path is what differs.
const SCALE: u32 = 1;

pub struct Postgres {
    /// Kept for its Drop: stops the server.
    _daemon: Daemon,
    /// Where it listens on 127.0.0.1 (and on 127.0.0.2 at the same port when asked).
    pub addr: SocketAddr,
}

/// `/usr/lib/postgresql/<newest>/bin`, where Debian puts the server binaries.
pub fn default_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, dir)| dir)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// `program` run as the `postgres` user when this process is root (PostgreSQL refuses to run as
/// root); `setpriv` execs, so the PID is the program's own and the server is stopped by it.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--reset-env"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn check(out: std::process::Output, what: &str) -> Res<std::process::Output> {
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

impl Postgres {
    /// initdb, start the server on a free port of 127.0.0.1 (and 127.0.0.2 with `second_address`),
    /// wait until it accepts connections, and load pgbench's tables.
    pub fn start(bin_dir: &Path, pgbench: &Path, dir: &Path, logs: &Path, second_address: bool) -> Res<Self> {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).map_err(|e| format!("create {}: {e}", data.display()))?;
        if is_root() {
            let mut chown = Command::new("chown");
            chown.args(["-R", "postgres:postgres"]).arg(dir);
            check(proc::run(chown, Duration::from_secs(30))?, "chown of the PostgreSQL directory to postgres")?;
        }
        let mut initdb = as_postgres(&bin_dir.join("initdb"));
        initdb.args(["-A", "trust", "-U", USER, "--no-sync", "-D"]).arg(&data);
        check(proc::run(initdb, Duration::from_secs(120))?, "initdb")?;
        // `-A trust` trusts 127.0.0.1 only; the service path's second target is 127.0.0.2.
        let hba = data.join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba).map_err(|e| format!("read {}: {e}", hba.display()))?;
        text.push_str("\nhost all all 127.0.0.0/8 trust\n");
        std::fs::write(&hba, text).map_err(|e| format!("write {}: {e}", hba.display()))?;

        let mut last_error = String::new();
        for attempt in 1..=5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("pick a port for PostgreSQL: {e}"))?
                .port();
            let listen = if second_address { "127.0.0.1,127.0.0.2" } else { "127.0.0.1" };
            let mut cmd = as_postgres(&bin_dir.join("postgres"));
            cmd.arg("-D")
                .arg(&data)
                .arg("-k")
                .arg(dir)
                .args(["-p", &port.to_string(), "-c", &format!("listen_addresses={listen}")])
                // The benchmark's -C variant opens a connection per transaction from 8 clients.
                .args(["-c", "max_connections=100", "-c", "fsync=off", "-c", "synchronous_commit=off"]);
            // SIGINT: PostgreSQL's fast shutdown.
            let mut daemon = Daemon::spawn(&format!("postgres-{attempt}"), cmd, logs, "INT")?;
            let ready = daemon.wait_for_log("PostgreSQL to accept connections", Duration::from_secs(60), |l| {
                l.contains("ready to accept connections").then_some(())
            });
            match ready {
                Ok(()) => {
                    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
                    let mut init = Command::new(pgbench);
                    init.args(["-i", "-q", "-s", &SCALE.to_string(), "-h", "127.0.0.1", "-p", &port.to_string()])
                        .args(["-U", USER, DATABASE]);
                    check(proc::run(init, Duration::from_secs(300))?, "pgbench -i")?;
                    return Ok(Postgres { _daemon: daemon, addr });
                }
                Err(e) => last_error = e,
            }
        }
        Err(format!("PostgreSQL did not start: {last_error}"))
    }
}

/// What one pgbench run measured.
pub struct Tps {
    pub tps: f64,
    pub transactions: u64,
    pub failed: u64,
}

/// `pgbench -S -n -c clients -j 2 -T seconds` through `addr` (`-C`: a new connection per transaction).
pub fn measure(pgbench: &Path, addr: SocketAddr, seconds: u64, clients: usize, connect_each: bool) -> Res<Tps> {
    let mut cmd = Command::new(pgbench);
    cmd.args(["-S", "-n", "-c", &clients.to_string(), "-j", "2", "-T", &seconds.to_string()]).args([
        "-h",
        &addr.ip().to_string(),
        "-p",
        &addr.port().to_string(),
        "-U",
        USER,
    ]);
    if connect_each {
        cmd.arg("-C");
    }
    cmd.arg(DATABASE);
    cmd.env("PGCONNECT_TIMEOUT", "10");
    let out = check(proc::run(cmd, Duration::from_secs(seconds + 60))?, &format!("pgbench through {addr}"))?;
    parse(&String::from_utf8_lossy(&out.stdout)).ok_or_else(|| {
        format!("pgbench printed no tps: {}", String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or(""))
    })
}

/// Reads `tps = …`, `number of transactions actually processed: …` and
/// `number of failed transactions: …` from pgbench's report.
fn parse(text: &str) -> Option<Tps> {
    let after = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_string)
    };
    let tps = after("tps = ")?.parse().ok()?;
    let transactions = after("number of transactions actually processed: ")
        .and_then(|s| s.split('/').next().and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    let failed = after("number of failed transactions: ").and_then(|s| s.parse().ok()).unwrap_or(0);
    Some(Tps { tps, transactions, failed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_report_is_read() {
        let text = "pgbench (15.14 (Debian 15.14-0+deb12u1))\ntransaction type: <builtin: select only>\n\
                    scaling factor: 1\nquery mode: simple\nnumber of clients: 8\nnumber of threads: 2\n\
                    maximum number of tries: 1\nduration: 5 s\nnumber of transactions actually processed: 123456\n\
                    number of failed transactions: 0 (0.000%)\nlatency average = 0.321 ms\n\
                    initial connection time = 12.345 ms\ntps = 24680.123456 (without initial connection time)\n";
        let t = parse(text).unwrap();
        assert_eq!((t.tps, t.transactions, t.failed), (24680.123456, 123456, 0));
        assert!(parse("no report").is_none());
    }
}
