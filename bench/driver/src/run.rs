//! One benchmark run: start the servers and every path, then for each
//! repetition measure every figure on every path, alternating the order of the
//! paths so that a noisy moment on the shared machine does not land on one
//! path only; then print the table and write the JSON.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use serde_json::json;

use crate::paths::{self, Backends, Loopback, Path};
use crate::proc;
use crate::report::{self, Results};
use crate::{Res, client, echo, iperf, open_files, postgres};

// A new path: a module in `paths/`, its name here and in `--paths`' help, a ratio column in
// `report::RATIOS`, and its descriptors per connection in `open_files::capacity`.
const ALL_PATHS: &[&str] = &["direct", "haproxy-2hop", "rathole-tls", "trellis", "trellis-service", "trellis-relay"];

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The `trellis` binary (release build).
    #[arg(long, value_name = "FILE")]
    trellis_bin: Option<PathBuf>,
    /// The `rathole` binary (built with its `tls` feature).
    #[arg(long, value_name = "FILE", default_value = "rathole")]
    rathole_bin: PathBuf,
    #[arg(long, value_name = "FILE", default_value = "haproxy")]
    haproxy_bin: PathBuf,
    #[arg(long, value_name = "FILE", default_value = "iperf3")]
    iperf3_bin: PathBuf,
    #[arg(long, value_name = "FILE", default_value = "openssl")]
    openssl_bin: PathBuf,
    /// PostgreSQL's server binaries (initdb, postgres) for the pgbench figures; default: the
    /// newest /usr/lib/postgresql/*/bin.
    #[arg(long, value_name = "DIR")]
    pg_bin_dir: Option<PathBuf>,
    #[arg(long, value_name = "FILE", default_value = "pgbench")]
    pgbench_bin: PathBuf,
    /// Leave out the pgbench figures (no PostgreSQL is started).
    #[arg(long)]
    no_pgbench: bool,
    /// Seconds of each pgbench run (`-T`).
    #[arg(long, default_value_t = 5)]
    pgbench_seconds: u64,
    /// pgbench clients (`-c`), on two threads (`-j 2`).
    #[arg(long, default_value_t = 8)]
    pgbench_clients: usize,
    /// Paths to measure, comma-separated: direct, haproxy-2hop, rathole-tls, trellis (a resource
    /// endpoint), trellis-service (an Interface endpoint to a service with two targets; also
    /// measures health-check failover once, at the end), trellis-relay (a resource endpoint whose
    /// gateway agent runs --outbound-only, reached through a `trellis relay`: three hops; the
    /// relay is weighed with the agents, and the run fails the path if a flow went around it).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,haproxy-2hop,rathole-tls,trellis,trellis-service,trellis-relay"
    )]
    paths: Vec<String>,
    /// Repetitions of every measurement; the report gives the median and min–max.
    #[arg(long, default_value_t = 5)]
    repetitions: usize,
    /// Seconds of each iperf3 test (after one omitted warm-up second).
    #[arg(long, default_value_t = 2)]
    throughput_seconds: u64,
    /// Seconds of request/response exchanges per path.
    #[arg(long, default_value_t = 2.0)]
    rr_seconds: f64,
    /// Seconds of connection churn per path.
    #[arg(long, default_value_t = 2.0)]
    conn_seconds: f64,
    /// Concurrent connecting clients in the connection-rate test.
    #[arg(long, default_value_t = 4)]
    conn_concurrency: usize,
    /// Idle connections held open while the tunnel processes are weighed; lowered to what the
    /// open-files limit allows every path (haproxy and rathole hold two descriptors per connection
    /// in each process, a Trellis agent one, and a Trellis gateway caps one peer agent's flows).
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Short run: 2 repetitions, 1-second tests (2-second pgbench runs), 2,000 idle connections.
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON results.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the JSON results to DIR/bench-<UTC time>.json (unless --json is given).
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Directory for configs, logs and agent state (default: a new one under /tmp, removed after a successful run).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Keep the work directory after a successful run.
    #[arg(long)]
    keep_work_dir: bool,
}

struct Settings {
    repetitions: usize,
    throughput_seconds: u64,
    rr: Duration,
    conn: Duration,
    conn_concurrency: usize,
    /// Wanted: each path holds what it carries within `open_files` ([`Settings::idle_for`]).
    idle_connections: usize,
    open_files: u64,
    pgbench_seconds: u64,
    pgbench_clients: usize,
}

impl Settings {
    /// The idle connections `path` holds.
    fn idle_for(&self, path: &str) -> usize {
        open_files::idle_for(self.idle_connections, path, self.open_files)
    }
}

impl RunArgs {
    /// The settings asked for; the idle connections are lowered to the open-files limit later.
    fn settings(&self) -> Settings {
        let mut s = Settings {
            repetitions: self.repetitions.max(1),
            throughput_seconds: self.throughput_seconds.max(1),
            rr: Duration::from_secs_f64(self.rr_seconds.max(0.1)),
            conn: Duration::from_secs_f64(self.conn_seconds.max(0.1)),
            conn_concurrency: self.conn_concurrency.max(1),
            idle_connections: self.idle_connections,
            open_files: u64::MAX,
            pgbench_seconds: self.pgbench_seconds.max(1),
            pgbench_clients: self.pgbench_clients.max(1),
        };
        if self.quick {
            s.repetitions = s.repetitions.min(2);
            s.throughput_seconds = 1;
            s.rr = Duration::from_secs(1);
            s.conn = Duration::from_secs(1);
            s.idle_connections = s.idle_connections.min(2000);
            s.pgbench_seconds = s.pgbench_seconds.min(2);
        }
        s
    }
}

/// The open-files limit (soft, hard) of this process.
pub(crate) fn nofile_limit() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut nums = line["Max open files".len()..].split_whitespace().map(|n| n.parse::<u64>().ok());
    Some((nums.next()??, nums.next()??))
}

pub(crate) fn random_byte() -> u8 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    (h.finish() % 251) as u8
}

/// `YYYYMMDDTHHMMSSZ` for a UNIX time (UTC).
pub(crate) fn timestamp(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Stops every child on Ctrl-C or SIGTERM, wherever the main thread is, removes the work dir, exits 130.
pub(crate) fn install_signal_handler(work_dir: PathBuf, remove: bool) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        let name = rt.block_on(async {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                let _ = tokio::signal::ctrl_c().await;
                return "SIGINT";
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            }
        });
        eprintln!("\ntrellis-bench: {name}: stopping every process it started");
        proc::stop_all(Duration::from_secs(3));
        if remove {
            let _ = std::fs::remove_dir_all(&work_dir);
        }
        std::process::exit(130);
    });
}

pub(crate) fn say(line: &str) {
    eprintln!("{line}");
    let _ = std::io::stderr().flush();
}

/// One figure group on one path: its values in the order of the group's metric keys, or None
/// when the group does not apply to the path.
type Measurement<'a> = dyn FnMut(&mut dyn Path) -> Res<Option<Vec<f64>>> + 'a;

pub fn main(args: RunArgs) -> Res<()> {
    for p in &args.paths {
        if !ALL_PATHS.contains(&p.as_str()) {
            return Err(format!("unknown path {p:?}; choose from {}", ALL_PATHS.join(", ")));
        }
    }
    if args.paths.iter().any(|p| p.starts_with("trellis")) && args.trellis_bin.is_none() {
        return Err("--trellis-bin is required for the trellis paths (or leave them out with --paths)".into());
    }
    let soft = open_files::raise_to_hard()
        .or_else(|| nofile_limit().map(|(soft, _)| soft))
        .ok_or("cannot read the open-files limit from /proc/self/limits")?;
    let mut settings = args.settings();
    let names: Vec<&str> = ALL_PATHS.iter().copied().filter(|n| args.paths.iter().any(|p| p == n)).collect();
    for path in &names {
        let idle = open_files::idle_for(settings.idle_connections, path, soft);
        if idle < settings.idle_connections {
            say(&format!(
                "note: with the open-files limit at {soft}, {path} carries at most {idle} idle connections (see \
                 docs/performance.md); {} needs a hard limit (`ulimit -Hn`) of at least {}",
                settings.idle_connections,
                open_files::needed_for(settings.idle_connections, &[path])
            ));
        }
    }
    settings.open_files = soft;

    let started_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let stamp = timestamp(started_at);
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("trellis-bench-{}", std::process::id())));
    std::fs::create_dir_all(&work_dir).map_err(|e| format!("create {}: {e}", work_dir.display()))?;
    install_signal_handler(work_dir.clone(), args.work_dir.is_none() && !args.keep_work_dir);

    let outcome = run(&args, &settings, &work_dir, &stamp);
    match &outcome {
        Ok(()) if args.work_dir.is_none() && !args.keep_work_dir => {
            let _ = std::fs::remove_dir_all(&work_dir);
        }
        _ if proc::interrupted() => {}
        _ => say(&format!("configs and logs kept in {}", work_dir.display())),
    }
    outcome
}

fn run(args: &RunArgs, s: &Settings, work: &FsPath, stamp: &str) -> Res<()> {
    let logs = work.join("logs");
    let ips = Loopback { run: random_byte() };

    // The servers every path leads to.
    let with_service = args.paths.iter().any(|p| p == "trellis-service");
    let (mut echo, mut echo_second) = start_echo_servers(&logs, with_service)?;
    let (mut iperf_server, iperf_addr) = iperf::start_server(&args.iperf3_bin, &logs, "iperf3-server", false)?;
    // The service's targets' iperf3 server, behind 127.0.0.1 and 127.0.0.2 (see `iperf::start_server`).
    let mut service_iperf = match with_service {
        true => Some(iperf::start_server(&args.iperf3_bin, &logs, "iperf3-service-server", true)?),
        false => None,
    };
    // PostgreSQL for pgbench; on 127.0.0.2 too when the service path balances over both targets.
    let pg = match (args.no_pgbench, args.pg_bin_dir.clone().or_else(postgres::default_bin_dir)) {
        (true, _) => None,
        (false, None) => {
            return Err("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: install Debian's postgresql \
                        (bench/run does), give --pg-bin-dir, or leave the pgbench figures out with --no-pgbench"
                .into());
        }
        (false, Some(bin_dir)) => {
            say("starting PostgreSQL and loading pgbench's tables …");
            Some(postgres::Postgres::start(&bin_dir, &args.pgbench_bin, &work.join("postgres"), &logs, with_service)?)
        }
    };
    let backends = Backends { echo: echo.addr, iperf: iperf_addr, postgres: pg.as_ref().map(|p| p.addr) };

    // Every path, set up once. A path that cannot be set up is reported and left out.
    let mut paths: Vec<Box<dyn Path>> = Vec::new();
    let mut setup_errors: Vec<(String, String)> = Vec::new();
    // Both Trellis paths run through one control plane and one pair of agents.
    let mut trellis: Option<Result<Rc<RefCell<paths::trellis::Trellis>>, String>> = None;
    for name in ALL_PATHS.iter().filter(|n| args.paths.iter().any(|p| p == *n)) {
        say(&format!("setting up {name} …"));
        let t = Instant::now();
        let dir = work.join(name);
        let made: Res<Box<dyn Path>> = match *name {
            "direct" => Ok(Box::new(paths::direct::Direct::new(backends))),
            "haproxy-2hop" => {
                paths::haproxy::Haproxy2Hop::start(&args.haproxy_bin, &dir, ips, backends, s.idle_for(name))
                    .map(|p| Box::new(p) as Box<dyn Path>)
            }
            "rathole-tls" => {
                paths::rathole::RatholeTls::start(&args.rathole_bin, &args.openssl_bin, &dir, ips, backends)
                    .map(|p| Box::new(p) as Box<dyn Path>)
            }
            "trellis" | "trellis-service" | "trellis-relay" => {
                let bin = args.trellis_bin.as_deref().expect("checked in main");
                let setup = trellis
                    .get_or_insert_with(|| {
                        paths::trellis::Trellis::start(bin, &work.join("trellis"), ips, backends).map(|t| t.shared())
                    })
                    .clone();
                setup.and_then(|setup| {
                    if *name == "trellis" {
                        Ok(Box::new(paths::trellis::ResourcePath(setup)) as Box<dyn Path>)
                    } else if *name == "trellis-relay" {
                        paths::trellis_relay::TrellisRelay::start(setup, ips, backends)
                            .map(|p| Box::new(p) as Box<dyn Path>)
                    } else {
                        let iperf_target_port = service_iperf.as_ref().map_or(iperf_addr.port(), |(_, a)| a.port());
                        paths::trellis_service::TrellisService::start(setup, backends, iperf_target_port)
                            .map(|p| Box::new(p) as Box<dyn Path>)
                    }
                })
            }
            _ => unreachable!("names come from ALL_PATHS"),
        };
        match made {
            Ok(p) => {
                say(&format!("  {name} ready in {:.1} s (entry {})", t.elapsed().as_secs_f64(), p.echo_addr()));
                paths.push(p);
            }
            Err(e) => {
                say(&format!("  {name} could not be set up: {e}"));
                setup_errors.push((name.to_string(), e));
            }
        }
    }
    if paths.is_empty() {
        return Err("no path could be set up".into());
    }

    let sources = ips.client_sources();
    let mut results = Results::default();
    let mut dead: Vec<bool> = vec![false; paths.len()];
    let mut load = vec![json!({"when": "start", "loadavg": loadavg()})];
    let run_start = Instant::now();
    for rep in 0..s.repetitions {
        // Rotate the order every repetition: each path goes first once in a while.
        let order: Vec<usize> = (0..paths.len()).map(|i| (i + rep) % paths.len()).collect();
        say(&format!("repetition {}/{} (load {})", rep + 1, s.repetitions, loadavg()));

        let mut measure = |metric_keys: &[&str], what: &str, results: &mut Results, f: &mut Measurement<'_>| {
            for &i in &order {
                if dead[i] {
                    continue;
                }
                let path = paths[i].as_mut();
                let name = path.name();
                match f(path) {
                    Ok(None) => continue,
                    Ok(Some(values)) => {
                        let shown: Vec<String> =
                            metric_keys.iter().zip(&values).map(|(k, v)| format!("{k} {}", report::num(*v))).collect();
                        say(&format!("  {what:<28} {name:<13} {}", shown.join("  ")));
                        for (k, v) in metric_keys.iter().zip(values) {
                            results.add(k, name, v);
                        }
                    }
                    Err(e) => {
                        say(&format!("  {what:<28} {name:<13} failed: {e}"));
                        for k in metric_keys {
                            results.error(k, name, &e);
                        }
                    }
                }
                if let Err(e) = paths[i].check() {
                    say(&format!("  {} is down and is left out from here on: {e}", paths[i].name()));
                    results.error(metric_keys[0], paths[i].name(), &e);
                    dead[i] = true;
                }
            }
        };

        // CPU time of each path's tunnel processes over the four throughput tests, and the bytes moved.
        let cpu: RefCell<BTreeMap<&'static str, (f64, u64)>> = RefCell::default();
        for (key, streams, reverse, what) in [
            (report::TPUT_1_UP, 1, false, "throughput 1 stream up"),
            (report::TPUT_1_DOWN, 1, true, "throughput 1 stream down"),
            (report::TPUT_4_UP, 4, false, "throughput 4 streams up"),
            (report::TPUT_4_DOWN, 4, true, "throughput 4 streams down"),
        ] {
            measure(&[key], what, &mut results, &mut |p| {
                let pids = p.tunnel_pids();
                let before = cpu_seconds(&pids);
                let t = iperf::measure(&args.iperf3_bin, p.iperf_addr(), s.throughput_seconds, streams, reverse)?;
                if let (Some(before), Some(after)) = (before, cpu_seconds(&pids)) {
                    let mut cpu = cpu.borrow_mut();
                    let sums = cpu.entry(p.name()).or_default();
                    sums.0 += after - before;
                    sums.1 += t.bytes;
                }
                Ok(Some(vec![t.gbps]))
            });
            iperf_server.check_running()?;
            if let Some((server, _)) = service_iperf.as_mut() {
                server.check_running()?;
            }
        }
        for (name, (seconds, bytes)) in cpu.into_inner() {
            if bytes > 0 {
                let per_gb = seconds / (bytes as f64 / 1e9);
                say(&format!(
                    "  {:<28} {name:<13} {} CPU-s over {} GB",
                    "tunnel CPU per GB",
                    report::num(per_gb),
                    report::num(bytes as f64 / 1e9)
                ));
                results.add(report::CPU_PER_GB, name, per_gb);
            }
        }
        if pg.is_some() {
            for (key, connect_each, what) in
                [(report::PGBENCH_TPS, false, "pgbench -S"), (report::PGBENCH_CONNECT_TPS, true, "pgbench -S -C")]
            {
                measure(&[key], what, &mut results, &mut |p| {
                    let Some(addr) = p.pg_addr() else { return Ok(None) };
                    let r =
                        postgres::measure(&args.pgbench_bin, addr, s.pgbench_seconds, s.pgbench_clients, connect_each)?;
                    if r.failed > 0 {
                        return Err(format!("{} of {} transactions failed", r.failed, r.failed + r.transactions));
                    }
                    Ok(Some(vec![r.tps]))
                });
            }
        }
        measure(&[report::RR_P50, report::RR_P99], "request/response 1 B", &mut results, &mut |p| {
            let r = client::request_response(p.echo_addr(), s.rr)?;
            Ok(Some(vec![r.p50_us, r.p99_us]))
        });
        measure(&[report::CONN_RATE, report::CONN_P50, report::CONN_P99], "new connections", &mut results, &mut |p| {
            let r = client::connection_rate(p.echo_addr(), s.conn, s.conn_concurrency, &sources)?;
            if r.errors * 100 > r.connections {
                return Err(format!(
                    "{} of {} connections failed: {}",
                    r.errors,
                    r.errors + r.connections,
                    r.first_error.unwrap_or_default()
                ));
            }
            Ok(Some(vec![r.per_second, r.p50_us, r.p99_us]))
        });
        let idle_metrics = [report::IDLE_PER_1000, report::IDLE_TOTAL, report::IDLE_HELD];
        measure(&idle_metrics, "idle connections (fresh)", &mut results, &mut |p| {
            if p.tunnel_pids().is_empty() {
                return Ok(None);
            }
            p.restart()?;
            let r = client::idle_connections(p.echo_addr(), s.idle_for(p.name()), &p.tunnel_pids())?;
            Ok(Some(vec![r.mib_per_1000(), r.rss_at_n as f64 / (1024.0 * 1024.0), r.connections as f64]))
        });
        measure(
            &[report::CREATE_TO_FIRST_BYTE, report::REVOKE_TO_REFUSED],
            "endpoint lifecycle",
            &mut results,
            &mut |p| match p.lifecycle(rep) {
                Some(r) => {
                    let l = r?;
                    Ok(Some(vec![l.create_to_first_byte.as_secs_f64() * 1e3, l.revoke_to_refused.as_secs_f64() * 1e3]))
                }
                None => Ok(None),
            },
        );
        echo.check_running()?;
        if let Some(second) = echo_second.as_mut() {
            second.check_running()?;
        }
        load.push(json!({"when": format!("after repetition {}", rep + 1), "loadavg": loadavg()}));
    }

    // Failover last: it stops a target, and the target takes a few checks to come back.
    let mut failovers = Vec::new();
    if let Some(second) = echo_second.as_mut() {
        for (i, path) in paths.iter_mut().enumerate() {
            if dead[i] {
                continue;
            }
            let name = path.name();
            let Some(outcome) = path.failover(second) else { continue };
            match &outcome {
                Ok(f) => f.lines().iter().for_each(|l| say(l)),
                Err(e) => say(&format!("failover on {name} failed: {e}")),
            }
            failovers.push((name, outcome));
        }
    }
    // Whole-run checks (the relay path: every flow went through the relay).
    let mut verified = Vec::new();
    for (i, path) in paths.iter_mut().enumerate() {
        if dead[i] {
            continue;
        }
        let name = path.name();
        if let Some(outcome) = path.verify() {
            match &outcome {
                Ok(line) => say(line),
                Err(e) => say(&format!("{name} failed its check: {e}")),
            }
            verified.push((name, outcome));
        }
    }
    let elapsed = run_start.elapsed();

    let names: Vec<&str> = ALL_PATHS.iter().copied().filter(|n| paths.iter().any(|p| p.name() == *n)).collect();
    let table = results.table(&names, s.pgbench_clients);
    println!();
    println!(
        "Trellis benchmark {stamp}: {} repetitions, medians (min–max); loopback, {} CPUs, load {}",
        s.repetitions,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        loadavg()
    );
    print!("{table}");
    for (name, e) in &setup_errors {
        println!("{name}: not measured: {e}");
    }
    for line in results.error_lines() {
        println!("error: {line}");
    }
    for (name, outcome) in &verified {
        match outcome {
            Ok(line) => println!("{line}"),
            Err(e) => println!("error: {name}: {e}"),
        }
    }
    for (name, outcome) in &failovers {
        match outcome {
            Ok(f) => f.lines().iter().for_each(|l| println!("{l}")),
            Err(e) => println!("failover ({name}): failed: {e}"),
        }
    }

    let versions: serde_json::Map<String, serde_json::Value> = paths
        .iter()
        .filter_map(|p| p.version().map(|v| (p.name().to_string(), json!(v))))
        .chain([("iperf3".to_string(), json!(iperf::version(&args.iperf3_bin)))])
        .chain(
            pg.as_ref()
                .map(|_| ("pgbench".to_string(), json!(crate::first_line_of(&args.pgbench_bin, &["--version"])))),
        )
        .collect();
    let doc = json!({
        "schema": "trellis-bench/1",
        "startedAt": stamp,
        "durationSeconds": elapsed.as_secs_f64(),
        "host": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "load": load,
        },
        "settings": {
            "repetitions": s.repetitions,
            "throughputSeconds": s.throughput_seconds,
            "requestResponseSeconds": s.rr.as_secs_f64(),
            "connectionSeconds": s.conn.as_secs_f64(),
            "connectionConcurrency": s.conn_concurrency,
            "idleConnections": s.idle_connections,
            "idleConnectionsHeld": names.iter().map(|n| (n.to_string(), json!(s.idle_for(n)))).collect::<serde_json::Map<_, _>>(),
            "pgbenchSeconds": pg.as_ref().map(|_| s.pgbench_seconds),
            "pgbenchClients": pg.as_ref().map(|_| s.pgbench_clients),
            "quick": args.quick,
        },
        "versions": versions,
        "paths": names,
        "notMeasured": setup_errors.iter().map(|(n, e)| json!({"path": n, "error": e})).collect::<Vec<_>>(),
        "metrics": results.json(&names),
        "checks": verified
            .iter()
            .map(|(name, outcome)| match outcome {
                Ok(line) => json!({"path": name, "ok": line}),
                Err(e) => json!({"path": name, "error": e}),
            })
            .collect::<Vec<_>>(),
        "failover": failovers
            .iter()
            .map(|(name, f)| match f {
                Ok(f) => f.json(),
                Err(e) => json!({"path": name, "error": e}),
            })
            .collect::<Vec<_>>(),
        "table": table,
    });
    let json_file = args.json.clone().or_else(|| args.out_dir.as_ref().map(|d| d.join(format!("bench-{stamp}.json"))));
    if let Some(file) = &json_file {
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
        }
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(file, text + "\n").map_err(|e| format!("write {}: {e}", file.display()))?;
        println!("JSON: {}", file.display());
    }
    // Stop the paths before the servers they lead to.
    drop(paths);
    drop(iperf_server);
    drop(service_iperf);
    drop(echo);
    drop(echo_second);
    drop(pg);
    Ok(())
}

/// The CPU seconds the processes have used together; None for no process or when one is gone.
fn cpu_seconds(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|pid| proc::cpu_seconds(*pid)).sum()
}

/// The echo server on 127.0.0.1 at a free port and, for the `trellis-service` path, a second one
/// on its second target (127.0.0.2) at the same port; a port taken there means a new pick.
fn start_echo_servers(logs: &FsPath, second: bool) -> Res<(echo::Server, Option<echo::Server>)> {
    let mut last_error = String::new();
    for _ in 0..5 {
        let first = echo::Server::start("echo-server", SocketAddr::from(([127, 0, 0, 1], 0)), logs)?;
        if !second {
            return Ok((first, None));
        }
        let at = SocketAddr::new(paths::trellis_service::SECOND_TARGET, first.addr.port());
        match echo::Server::start("echo-server-2", at, logs) {
            Ok(s) => return Ok((first, Some(s))),
            Err(e) => last_error = e,
        }
    }
    Err(format!("no port free for echo servers on both 127.0.0.1 and 127.0.0.2: {last_error}"))
}
