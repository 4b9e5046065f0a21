//! A real PostgreSQL server for a test, and `psql` as the real client.
//!
//! `initdb` and `postgres` refuse to run as root, so when the test runs as
//! root they run as the `postgres` user (via `setpriv`, which execs in place so
//! the PID we hold is the server's own) in a temp dir that user owns.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::net::{is_root, unique_suffix};
use crate::netns::Netns;
use crate::process::Proc;
use crate::wait::wait_until;

/// Rows of the `fruits` table every fixture database holds.
pub const FRUITS: &str = "apple,banana,cherry";
/// The query whose answer is [`FRUITS`].
pub const FRUITS_QUERY: &str = "select string_agg(name, ',' order by id) from fruits";

/// A running PostgreSQL cluster with a `fruits` table and a `whoami` row that
/// names this instance.
pub struct Postgres {
    proc: Proc,
    pub addr: IpAddr,
    pub port: u16,
    /// A value unique to this instance: `select name from whoami` returns it.
    pub instance: String,
    netns: Option<String>,
    dir: TempDir,
}

/// The directory with `initdb` and `postgres`: `$TRELLIS_PG_BINDIR`, else the
/// newest `/usr/lib/postgresql/<version>/bin`, else `pg_config --bindir`.
pub fn bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TRELLIS_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let out = Command::new("pg_config").arg("--bindir").output();
    match out {
        Ok(out) if out.status.success() => PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        _ => panic!(
            "PostgreSQL server binaries not found: install Debian's `postgresql` (scripts/test does) \
             or set TRELLIS_PG_BINDIR to the directory holding initdb and postgres"
        ),
    }
}

/// A command that runs `program` as the `postgres` user when we are root.
fn as_db_user(program: &Path, netns: Option<&Netns>) -> Command {
    let mut cmd = match netns {
        Some(ns) => ns.command(if is_root() { Path::new("setpriv") } else { program }),
        None => Command::new(if is_root() { Path::new("setpriv") } else { program }),
    };
    if is_root() {
        cmd.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(program);
    }
    cmd
}

impl Postgres {
    /// Starts PostgreSQL listening on `addr:port` (inside `netns` if given),
    /// trusting every client (gateways connect from their own address), and
    /// loads the fixture rows.
    pub fn start(addr: IpAddr, port: u16, netns: Option<&Netns>) -> Postgres {
        let bindir = bindir();
        let dir = tempfile::Builder::new().prefix("trellis-e2e-pg-").tempdir().expect("temp dir for PostgreSQL");
        if is_root() {
            let status =
                Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().expect("run chown");
            assert!(status.success(), "chown {} to postgres (does the `postgres` user exist?)", dir.path().display());
        }
        let data = dir.path().join("data");
        let out = as_db_user(&bindir.join("initdb"), None)
            .args(["-D"])
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"])
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let hba = data.join("pg_hba.conf");
        let mut conf = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
        conf.push_str("\nhost all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n");
        std::fs::write(&hba, conf).expect("write pg_hba.conf");

        let mut cmd = as_db_user(&bindir.join("postgres"), netns);
        cmd.arg("-D").arg(&data).arg("-k").arg(dir.path());
        cmd.args(["-c", &format!("listen_addresses={addr}"), "-p", &port.to_string()]);
        cmd.args(["-c", "fsync=off", "-c", "max_connections=50", "-c", "shared_buffers=16MB"]);
        // logs go to files the harness (root) opened; postgres only inherits them
        let proc = Proc::spawn(&format!("postgres-{port}"), cmd, &dir.path().join("logs"));
        let instance = format!("owner-db-{}", unique_suffix(8));
        let mut pg = Postgres { proc, addr, port, instance, netns: netns.map(|n| n.name().to_string()), dir };
        wait_until("PostgreSQL to accept connections", Duration::from_secs(60), || {
            pg.proc.assert_running();
            pg.psql("select 1").ok().filter(|s| s == "1").map(|_| ())
        });
        let setup = format!(
            "create table fruits(id int primary key, name text not null); \
             insert into fruits values (1, 'apple'), (2, 'banana'), (3, 'cherry'); \
             create table whoami(name text); insert into whoami values ('{}');",
            pg.instance
        );
        pg.psql(&setup).unwrap_or_else(|e| panic!("load fixture rows: {e}"));
        pg
    }

    /// Runs `sql` directly against this server (from its own namespace).
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        psql(self.netns.as_deref(), &self.addr.to_string(), self.port, sql)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn stop(&mut self) {
        self.proc.stop();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGTERM is PostgreSQL's "smart shutdown"; Proc escalates to SIGKILL
        self.proc.stop();
    }
}

/// Runs `psql` (the real client) as `postgres` against `host:port`, from
/// namespace `netns` if given, and returns the unaligned, tuples-only output.
pub fn psql(netns: Option<&str>, host: &str, port: u16, sql: &str) -> Result<String, String> {
    psql_with_timeout(netns, host, port, sql, 10)
}

/// [`psql`] with an explicit connect timeout in seconds.
pub fn psql_with_timeout(
    netns: Option<&str>,
    host: &str,
    port: u16,
    sql: &str,
    connect_timeout_secs: u32,
) -> Result<String, String> {
    let mut cmd = psql_command(netns);
    cmd.args(["-h", host, "-p", &port.to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-c", sql])
        .env("PGCONNECT_TIMEOUT", connect_timeout_secs.to_string());
    run_psql(cmd)
}

/// Runs `psql` as `postgres` with a libpq connection string (e.g.
/// `host=NAME hostaddr=IP port=P`), from namespace `netns` if given; returns
/// the unaligned, tuples-only output.
pub fn psql_conninfo(netns: Option<&str>, conninfo: &str, sql: &str) -> Result<String, String> {
    let mut cmd = psql_command(netns);
    cmd.args(["-d", &format!("{conninfo} user=postgres dbname=postgres connect_timeout=10"), "-c", sql]);
    run_psql(cmd)
}

/// `psql` with the harness's output flags, in `netns` if given.
fn psql_command(netns: Option<&str>) -> Command {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "psql"]);
            c
        }
        None => Command::new("psql"),
    };
    cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
        .env("PGSSLMODE", "disable")
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null());
    cmd
}

fn run_psql(mut cmd: Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("run psql (install postgresql-client): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// A PostgreSQL session spoken over a raw socket (startup, simple queries),
/// so a test can hold a connection open and watch it being closed.
pub struct PgSession {
    stream: std::net::TcpStream,
}

impl PgSession {
    /// Connects as `postgres` to database `postgres` (trust auth) and waits for
    /// ReadyForQuery; `Err` if the connection is refused, closed or times out.
    pub fn open(addr: std::net::SocketAddr, timeout: Duration) -> Result<PgSession, String> {
        use std::io::Write;
        let mut stream =
            std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        stream.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        stream.write_all(&startup_message()).map_err(|e| format!("send startup to {addr}: {e}"))?;
        let mut session = PgSession { stream };
        session.read_until_ready()?;
        Ok(session)
    }

    /// Runs one simple query and returns the first column of each row.
    pub fn query(&mut self, sql: &str) -> Result<Vec<String>, String> {
        use std::io::Write;
        let mut msg = vec![b'Q'];
        msg.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        msg.extend_from_slice(sql.as_bytes());
        msg.push(0);
        self.stream.write_all(&msg).map_err(|e| format!("send query: {e}"))?;
        self.read_until_ready()
    }

    /// Waits up to `timeout` for the server side to close the connection;
    /// true if it did (EOF or reset), false if it was still open.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        use std::io::Read;
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = [0u8; 1024];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = self.stream.set_read_timeout(Some(left.min(Duration::from_millis(250))));
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue, // e.g. a FATAL/notice from the server before it goes away
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return true,
            }
        }
    }

    fn read_until_ready(&mut self) -> Result<Vec<String>, String> {
        use std::io::Read;
        let mut rows = Vec::new();
        loop {
            let mut head = [0u8; 5];
            self.stream.read_exact(&mut head).map_err(|e| format!("read from PostgreSQL: {e}"))?;
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            let mut body = vec![0u8; len.saturating_sub(4)];
            self.stream.read_exact(&mut body).map_err(|e| format!("read from PostgreSQL: {e}"))?;
            match head[0] {
                b'Z' => return Ok(rows),
                b'E' => return Err(format!("PostgreSQL error: {}", String::from_utf8_lossy(&body))),
                b'R' if body.len() >= 4 && body[..4] != [0, 0, 0, 0] => {
                    return Err("PostgreSQL asked for a password; the fixture expects trust auth".into());
                }
                b'D' if body.len() >= 6 => {
                    let n = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
                    let value =
                        if n < 0 { String::new() } else { String::from_utf8_lossy(&body[6..6 + n as usize]).into() };
                    rows.push(value);
                }
                _ => {}
            }
        }
    }
}

/// A PostgreSQL StartupMessage (protocol 3.0) for user and database `postgres`.
pub fn startup_message() -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec(); // protocol 3.0
    for s in ["user", "postgres", "database", "postgres", "application_name", "trellis-e2e"] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}
