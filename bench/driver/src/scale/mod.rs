//! `trellis-bench scale`: the control plane with N consumers of one resource
//! configuration (`bench/scale`).
//!
//! Per N, with a fresh `trellis server` each time: build the owner and N
//! consumers through the API; start the agents (one gateway agent of the
//! owner, the others in consumers' subnets) and wait until every one has its
//! config; then measure, in this order, the idle server, API latency of reads
//! and of endpoint creates, the gateway config's compile cost and size, and
//! share deletions. It reports figures; it never asserts a time.

mod agents;
mod api;
mod report;
mod sys;
mod world;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use reqwest::Method;
use serde_json::{Value, json};

use self::agents::{Agent, AgentSpec};
use self::api::{Api, field};
use self::report::{NResult, ms};
use self::sys::{CpuClock, ThreadCpu};
use self::world::{MAX_AGENT_CONSUMERS, World};
use crate::Res;
use crate::proc::{self, Daemon};
use crate::run::{install_signal_handler, loadavg, random_byte, say, timestamp};

#[derive(Args, Debug)]
pub struct ScaleArgs {
    /// The `trellis` binary (release build).
    #[arg(long, value_name = "FILE")]
    trellis_bin: PathBuf,
    /// Numbers of consumer accounts, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    n: Vec<usize>,
    /// A short check that it all works: N = 200, fewer samples, a 10-second idle window.
    #[arg(long)]
    quick: bool,
    /// Agents: one gateway agent of the owner, the rest in consumers' subnets.
    #[arg(long, default_value_t = 50)]
    agents: usize,
    /// Consumers built at once during set-up.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Timed calls of each read (one after the other, the five reads interleaved).
    #[arg(long, default_value_t = 300)]
    samples: usize,
    /// Timed endpoint creates of the spare consumer (one after the other).
    #[arg(long, default_value_t = 200)]
    creates: usize,
    /// Timed share deletions, each of a different agent-bearing consumer.
    #[arg(long, default_value_t = 24)]
    deletions: usize,
    /// Gateway config compiles weighed with the gateway agent stopped.
    #[arg(long, default_value_t = 10)]
    compiles: usize,
    /// Seconds of the idle window.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// After a deletion reached both affected agents, how long the others are watched for configs.
    #[arg(long, default_value_t = 1000)]
    settle_ms: u64,
    /// Where to write the JSON results.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the JSON results to DIR/scale-<UTC time>.json (unless --json is given).
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Directory for data, logs and agent state (default: a new one under /tmp, removed after a successful run).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Keep the work directory after a successful run.
    #[arg(long)]
    keep_work_dir: bool,
}

/// The settings of a run after `--quick`.
#[derive(Clone, Debug)]
struct Settings {
    ns: Vec<usize>,
    consumer_agents: usize,
    concurrency: usize,
    samples: usize,
    creates: usize,
    deletions: usize,
    compiles: usize,
    idle: Duration,
    settle: Duration,
}

impl ScaleArgs {
    fn settings(&self) -> Res<Settings> {
        let mut s = Settings {
            ns: self.n.clone(),
            consumer_agents: self.agents.saturating_sub(1),
            concurrency: self.concurrency.max(1),
            samples: self.samples.max(1),
            creates: self.creates.max(1),
            deletions: self.deletions,
            compiles: self.compiles.max(1),
            idle: Duration::from_secs(self.idle_seconds.max(1)),
            settle: Duration::from_millis(self.settle_ms),
        };
        if self.quick {
            s.ns = vec![200];
            s.samples = s.samples.min(50);
            s.creates = s.creates.min(30);
            s.deletions = s.deletions.min(5);
            s.compiles = s.compiles.min(3);
            s.idle = s.idle.min(Duration::from_secs(10));
        }
        if !(2..=MAX_AGENT_CONSUMERS + 1).contains(&self.agents) {
            return Err(format!(
                "--agents must be from 2 to {} (one gateway agent and consumers' agents)",
                MAX_AGENT_CONSUMERS + 1
            ));
        }
        if s.deletions >= s.consumer_agents {
            return Err(format!(
                "--deletions must be below the {} consumer agents, so that some consumers' shares stay",
                s.consumer_agents
            ));
        }
        if let Some(n) = s.ns.iter().find(|n| **n < s.consumer_agents + 2) {
            return Err(format!(
                "N = {n} is too small: the {} agent-bearing consumers, the spare and at least one more",
                s.consumer_agents
            ));
        }
        Ok(s)
    }
}

pub fn main(args: ScaleArgs) -> Res<()> {
    let s = args.settings()?;
    let started_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let stamp = timestamp(started_at);
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("trellis-scale-{}", std::process::id())));
    std::fs::create_dir_all(&work).map_err(|e| format!("create {}: {e}", work.display()))?;
    let remove_work = args.work_dir.is_none() && !args.keep_work_dir;
    install_signal_handler(work.clone(), remove_work);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("start the async runtime: {e}"))?;
    let version = crate::first_line_of(&args.trellis_bin, &["version"]);
    let load_start = loadavg();
    let mut results: Vec<(usize, Result<NResult, String>)> = Vec::new();
    for &n in &s.ns {
        say(&format!("N = {n}: starting (load {})", loadavg()));
        let t = Instant::now();
        let outcome = run_one(&rt, &args.trellis_bin, &s, n, &work.join(format!("n{n}")));
        if proc::interrupted() {
            // The signal handler stops the children and exits.
            return Err("interrupted".into());
        }
        match &outcome {
            Ok(_) => say(&format!("N = {n}: done in {:.0} s", t.elapsed().as_secs_f64())),
            Err(e) => say(&format!("N = {n}: failed after {:.0} s: {e}", t.elapsed().as_secs_f64())),
        }
        results.push((n, outcome));
    }
    drop(rt);

    let table = report::table(&results);
    println!();
    println!(
        "Trellis control plane at scale {stamp}: {} agents (1 gateway + {} consumers), {} CPUs, load {} at the start, {} at the end",
        s.consumer_agents + 1,
        s.consumer_agents,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        load_start,
        loadavg()
    );
    print!("{table}");
    for (n, r) in &results {
        match r {
            Ok(r) => r.notes.iter().for_each(|note| println!("N = {n}: {note}")),
            Err(e) => println!("N = {n}: failed: {e}"),
        }
    }
    let mut doc = report::json(&results);
    doc["schema"] = json!("trellis-bench-scale/1");
    doc["startedAt"] = json!(stamp);
    doc["version"] = json!(version);
    doc["host"] = json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "loadStart": load_start,
        "loadEnd": loadavg(),
    });
    doc["settings"] = json!({
        "agents": s.consumer_agents + 1,
        "concurrency": s.concurrency,
        "samples": s.samples,
        "creates": s.creates,
        "deletions": s.deletions,
        "compiles": s.compiles,
        "idleSeconds": s.idle.as_secs(),
        "settleMs": s.settle.as_millis() as u64,
        "quick": args.quick,
    });
    doc["table"] = json!(table);
    let json_file = args.json.clone().or_else(|| args.out_dir.as_ref().map(|d| d.join(format!("scale-{stamp}.json"))));
    if let Some(file) = &json_file {
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
        }
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(file, text + "\n").map_err(|e| format!("write {}: {e}", file.display()))?;
        println!("JSON: {}", file.display());
    }
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    if failed == 0 && remove_work {
        let _ = std::fs::remove_dir_all(&work);
    } else if failed > 0 {
        say(&format!("data, logs and agent state kept in {}", work.display()));
    }
    if failed > 0 { Err(format!("{failed} of {} runs failed", results.len())) } else { Ok(()) }
}

/// A free TCP port on 127.0.0.1 (for the gateway agent's advertised tunnel address).
fn free_port() -> Res<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("find a free port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// Polls `check` every `every` until it returns Some, failing after `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, every: Duration, mut check: impl FnMut() -> Res<Option<T>>) -> Res<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if proc::interrupted() {
            return Err("interrupted".into());
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(every);
    }
}

/// The control plane of one run, and how to reach it.
struct Server {
    daemon: Daemon,
    url: String,
    ca: PathBuf,
    admin: String,
    data: PathBuf,
}

fn start_server(bin: &Path, dir: &Path) -> Res<Server> {
    let data = dir.join("control-plane");
    let mut cmd = Command::new(bin);
    // Each consumer gets a share of its own, as a provider onboarding customers one by one
    // would make them; the default rate (30 a minute) would take hours at N = 10,000.
    cmd.arg("server").args(["--listen", "127.0.0.1:0", "--shares-per-minute", "1000000"]).arg("--data-dir").arg(&data);
    let mut daemon = Daemon::spawn("trellis-server", cmd, &dir.join("logs"), "TERM")?;
    let url = daemon.wait_for_log("the control plane's URL", Duration::from_secs(60), |l| {
        let rest = &l[l.find("listening on https://")? + "listening on ".len()..];
        Some(rest.split_whitespace().next()?.trim_end_matches('/').to_string())
    })?;
    let key_file = data.join("admin.key");
    let ca = data.join("ca.pem");
    let admin = daemon.wait_for_log("admin.key", Duration::from_secs(60), |_| {
        let key = std::fs::read_to_string(&key_file).ok()?;
        (ca.is_file() && !key.trim().is_empty()).then(|| key.trim().to_string())
    })?;
    Ok(Server { daemon, url, ca, admin, data })
}

/// The agents of a run: the owner's gateway agent, then one per agent-bearing consumer.
struct Fleet {
    gateway: Agent,
    consumers: Vec<Agent>,
}

impl Fleet {
    fn poll_all(&mut self) -> usize {
        self.gateway.poll() + self.consumers.iter_mut().map(Agent::poll).sum::<usize>()
    }

    fn received(&self) -> usize {
        self.gateway.received() + self.consumers.iter().map(Agent::received).sum::<usize>()
    }

    fn check_running(&mut self) -> Res<()> {
        self.gateway.check_running()?;
        self.consumers.iter_mut().try_for_each(Agent::check_running)
    }
}

fn run_one(rt: &tokio::runtime::Runtime, bin: &Path, s: &Settings, n: usize, dir: &Path) -> Res<NResult> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let logs = dir.join("logs");
    let mut out = NResult::default();
    let mut server = start_server(bin, dir)?;
    let pid = server.daemon.pid();
    let api = Api::new(&server.url, &server.ca)?;

    // The world, through the API.
    let run = random_byte();
    let world =
        rt.block_on(world::build(&api, &server.admin, n, s.consumer_agents, run, s.concurrency, |done, n, t| {
            say(&format!("  set-up: {done}/{n} consumers in {:.0} s (load {})", t.as_secs_f64(), loadavg()))
        }))?;
    out.set("setup_s", world.setup.as_secs_f64());
    out.set("setup_requests_per_s", world.requests as f64 / world.setup.as_secs_f64());
    say(&format!("  set-up: {n} consumers, {} API calls in {:.1} s", world.requests, world.setup.as_secs_f64()));

    // The agents, each with a join token for its subnet.
    let tokens: Vec<String> = rt.block_on(async {
        let mut tokens = Vec::new();
        let subnets = std::iter::once((&world.owner.key, &world.owner_subnet))
            .chain(world.consumers[..s.consumer_agents].iter().map(|c| (&c.account.key, &c.subnet)));
        for (key, subnet) in subnets {
            let t = api.post("/v1/agent-tokens", key, &json!({"subnetId": subnet})).await?;
            tokens.push(field(&t, &["token"])?);
        }
        Ok::<_, String>(tokens)
    })?;
    let agents_started = Instant::now();
    let gateway_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let spec = |name: String, token: Option<String>, listen: SocketAddr, advertise: Option<SocketAddr>| AgentSpec {
        bin,
        url: &server.url,
        logs: &logs,
        state_dir: dir.join("agents").join(&name),
        name,
        join_token: token,
        tunnel_listen: listen,
        advertise,
    };
    let gateway =
        Agent::start(spec("gateway-agent".into(), Some(tokens[0].clone()), gateway_addr, Some(gateway_addr)))?;
    let mut consumers = Vec::new();
    for (i, token) in tokens[1..].iter().enumerate() {
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        consumers.push(Agent::start(spec(format!("consumer-agent-{i:02}"), Some(token.clone()), listen, None))?);
    }
    let mut fleet = Fleet { gateway, consumers };
    let mut waiting = String::new();
    wait_for("every agent's first config", Duration::from_secs(300), Duration::from_millis(50), || {
        fleet.poll_all();
        fleet.check_running()?;
        let mut late = std::iter::once(&fleet.gateway).chain(&fleet.consumers).filter(|a| a.applied.is_empty());
        waiting = late.next().map(|a| format!("{} has none; {}", a.name, a.log_tail())).unwrap_or_default();
        Ok(waiting.is_empty().then_some(()))
    })
    .map_err(|e| format!("{e}: {waiting}"))?;
    rt.block_on(wait_available(&api, &world, s.consumer_agents))?;
    out.set("agents_ready_s", agents_started.elapsed().as_secs_f64());
    say(&format!(
        "  agents: {} running, every config applied and every endpoint Available after {:.1} s",
        s.consumer_agents + 1,
        agents_started.elapsed().as_secs_f64()
    ));

    // Quiet: no agent receives anything for 5 s (endpoints turning Available recompile the gateway's config).
    let mut last = (fleet.received(), Instant::now());
    wait_for("the agents to settle", Duration::from_secs(120), Duration::from_millis(200), || {
        fleet.poll_all();
        if fleet.received() != last.0 {
            last = (fleet.received(), Instant::now());
        }
        Ok((last.1.elapsed() >= Duration::from_secs(5)).then_some(()))
    })?;

    let clock = CpuClock::new(pid);
    let idle_rate = measure_idle(&mut fleet, &clock, pid, s, &mut out)?;
    measure_reads(rt, &api, &world, s, &clock, idle_rate, &mut out)?;
    measure_creates(rt, &api, &world, &mut fleet, s, &clock, idle_rate, &mut out)?;
    let gateway_state = fleet.gateway.state_dir.clone();
    measure_compiles(rt, &api, &server, &world, &mut fleet, s, n, pid, &mut out, &|name, token| AgentSpec {
        state_dir: gateway_state.clone(),
        ..spec(name, token, gateway_addr, Some(gateway_addr))
    })?;
    measure_deletions(rt, &api, &world, &mut fleet, s, pid, &mut out)?;

    if let Some((rss, peak)) = sys::memory(pid) {
        out.set("rss_end_mib", rss as f64 / (1 << 20) as f64);
        out.set("rss_peak_mib", peak as f64 / (1 << 20) as f64);
    }
    out.set("store_mib", sys::files_size(&server.data, "") as f64 / (1 << 20) as f64);
    server.daemon.check_running()?;
    out.notes.push(format!("load average at the end: {}", loadavg()));
    // Agents first, then the server.
    drop(fleet);
    server.daemon.stop();
    Ok(out)
}

/// Waits until the endpoint of every agent-bearing consumer is Available (its agent listens).
async fn wait_available(api: &Api, world: &World, agents: usize) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    for c in &world.consumers[..agents] {
        loop {
            let e = api.get(&format!("/v1/vpcendpoints/{}", c.endpoint), &c.account.key).await?;
            match e["state"].as_str() {
                Some("Available") => break,
                Some("Failed") => return Err(format!("endpoint {} failed: {e}", c.endpoint)),
                _ if Instant::now() >= deadline => {
                    return Err(format!("endpoint {} is not Available after 120 s: {e}", c.endpoint));
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Ok(())
}

/// The idle window: server CPU (and how many configs were sent) while every agent long-polls and reports.
/// Returns the idle CPU rate (CPU seconds per second), subtracted from the phases below.
fn measure_idle(fleet: &mut Fleet, clock: &CpuClock, pid: u32, s: &Settings, out: &mut NResult) -> Res<f64> {
    say(&format!("  idle: {} s with every agent connected (load {})", s.idle.as_secs(), loadavg()));
    fleet.poll_all();
    let received = fleet.received();
    let (cpu0, t0) = (clock.now(), Instant::now());
    while t0.elapsed() < s.idle {
        if proc::interrupted() {
            return Err("interrupted".into());
        }
        fleet.check_running()?;
        std::thread::sleep(Duration::from_millis(250).min(s.idle.saturating_sub(t0.elapsed())));
    }
    let (cpu, wall) = (clock.now() - cpu0, t0.elapsed());
    fleet.poll_all();
    let rate = cpu.as_secs_f64() / wall.as_secs_f64();
    out.set("idle_cpu_pct", rate * 100.0);
    out.set("idle_configs", (fleet.received() - received) as f64);
    if let Some((rss, _)) = sys::memory(pid) {
        out.set("rss_idle_mib", rss as f64 / (1 << 20) as f64);
    }
    say(&format!("  idle: {:.2} % of one core, {} configs sent", rate * 100.0, fleet.received() - received));
    Ok(rate)
}

/// Server CPU of a phase beyond what the idle server would have used, per operation.
fn cpu_per_op(cpu: Duration, wall: Duration, idle_rate: f64, ops: usize) -> f64 {
    ((cpu.as_secs_f64() - idle_rate * wall.as_secs_f64()).max(0.0) / ops.max(1) as f64) * 1e3
}

/// Read latency: five GETs, interleaved, one call at a time, as consumers (rotating) and as the owner.
fn measure_reads(
    rt: &tokio::runtime::Runtime,
    api: &Api,
    world: &World,
    s: &Settings,
    clock: &CpuClock,
    idle_rate: f64,
    out: &mut NResult,
) -> Res<()> {
    say(&format!("  reads: {} of each of five GETs (load {})", s.samples, loadavg()));
    let plain = &world.consumers[s.consumer_agents + 1..];
    let owner = &world.owner.key;
    let config_path = format!("/v1/resourceconfigurations/{}", world.config_id);
    let kinds = ["read_config", "list_configs_consumer", "list_configs_owner", "list_shares_owner", "list_endpoints"];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let (cpu0, t0) = (clock.now(), Instant::now());
    rt.block_on(async {
        // A few untimed rounds first: connections, the database's page cache.
        for round in 0..s.samples + 10 {
            let consumer = &plain[round % plain.len()].account.key;
            let calls: [(&str, &str); 5] = [
                (&config_path, consumer),
                ("/v1/resourceconfigurations", consumer),
                ("/v1/resourceconfigurations", owner),
                ("/v1/resourceshares", owner),
                ("/v1/vpcendpoints", consumer),
            ];
            for (k, (path, key)) in calls.iter().enumerate() {
                let (took, v) = api.timed(Method::GET, path, key, None).await?;
                let items = v["items"].as_array().map_or(0, Vec::len);
                if (k == 3 && items != 100) || (k == 4 && items != 1) {
                    return Err(format!("GET {path}: unexpected number of items: {v}"));
                }
                if round >= 10 {
                    samples[k].push(ms(took));
                }
            }
        }
        Ok::<_, String>(())
    })?;
    let (cpu, wall) = (clock.now() - cpu0, t0.elapsed());
    out.set("cpu_per_read_ms", cpu_per_op(cpu, wall, idle_rate, (s.samples + 10) * kinds.len()));
    let keys: [(&str, &str, &str); 5] = [
        ("read_config_ms", "read_config_p50_ms", "read_config_p99_ms"),
        ("list_configs_consumer_ms", "list_configs_consumer_p50_ms", "list_configs_consumer_p99_ms"),
        ("list_configs_owner_ms", "list_configs_owner_p50_ms", "list_configs_owner_p99_ms"),
        ("list_shares_owner_ms", "list_shares_owner_p50_ms", "list_shares_owner_p99_ms"),
        ("list_endpoints_ms", "list_endpoints_p50_ms", "list_endpoints_p99_ms"),
    ];
    for ((name, p50, p99), samples) in keys.into_iter().zip(samples) {
        out.latencies(name, p50, p99, samples);
    }
    Ok(())
}

fn endpoint_body(world: &World, spare: usize) -> Value {
    let c = &world.consumers[spare];
    json!({"vpcEndpointType": "Resource", "vpcId": c.vpc, "subnetIds": [c.subnet],
           "resourceConfigurationArn": world.config_arn})
}

/// Endpoint creates of the spare consumer, one at a time, while the gateway agent is connected:
/// each create changes the gateway's config, so the server recompiles and pushes it meanwhile.
#[allow(clippy::too_many_arguments)]
fn measure_creates(
    rt: &tokio::runtime::Runtime,
    api: &Api,
    world: &World,
    fleet: &mut Fleet,
    s: &Settings,
    clock: &CpuClock,
    idle_rate: f64,
    out: &mut NResult,
) -> Res<()> {
    say(&format!("  creates: {} endpoints of the spare consumer (load {})", s.creates, loadavg()));
    let spare = s.consumer_agents;
    let key = world.consumers[spare].account.key.clone();
    let body = endpoint_body(world, spare);
    fleet.poll_all();
    let gateway_before = fleet.gateway.applied.len();
    let (cpu0, t0, started) = (clock.now(), Instant::now(), SystemTime::now());
    let samples = rt.block_on(async {
        let mut samples = Vec::new();
        for _ in 0..s.creates {
            let (took, _) = api.timed(Method::POST, "/v1/vpcendpoints", &key, Some(&body)).await?;
            samples.push(ms(took));
        }
        Ok::<_, String>(samples)
    })?;
    let creates_took = t0.elapsed();
    // Until the gateway agent has taken the last of them: no new config for 2 s.
    let mut last = (fleet.gateway.applied.len(), Instant::now());
    wait_for(
        "the gateway agent to take the new endpoints",
        Duration::from_secs(120),
        Duration::from_millis(20),
        || {
            fleet.gateway.poll();
            fleet.gateway.check_running()?;
            if fleet.gateway.applied.len() != last.0 {
                last = (fleet.gateway.applied.len(), Instant::now());
            }
            Ok((last.0 > gateway_before && last.1.elapsed() >= Duration::from_secs(2)).then_some(()))
        },
    )?;
    let wall = t0.elapsed() - last.1.elapsed();
    let cpu = clock.now() - cpu0;
    // The quiet tail after the last config was idle time: count its idle CPU out too.
    out.set("cpu_per_create_ms", cpu_per_op(cpu, wall + last.1.elapsed(), idle_rate, s.creates));
    let applied = fleet.gateway.applied.len() - gateway_before;
    // With a write every few milliseconds, how long the gateway agent went without any new config.
    let first = fleet.gateway.applied[gateway_before].1.and_then(|at| at.duration_since(started).ok());
    out.set("creates_duration_ms", ms(creates_took));
    if let Some(first) = first {
        out.set("creates_first_gateway_config_ms", ms(first));
    }
    out.set("gateway_configs_per_100_creates", applied as f64 * 100.0 / s.creates as f64);
    out.latencies("create_endpoint_ms", "create_endpoint_p50_ms", "create_endpoint_p99_ms", samples);
    Ok(())
}

/// The gateway config's cost and size, read as the gateway agent with the agent itself stopped, so
/// that each read compiles once and nothing else runs: create one endpoint (the config goes stale),
/// then time one `GET /v1/agents/self/config?after=0` (compile, hash, JSON, gzip, TLS).
#[allow(clippy::too_many_arguments)]
fn measure_compiles<'a>(
    rt: &tokio::runtime::Runtime,
    api: &Api,
    server: &Server,
    world: &World,
    fleet: &mut Fleet,
    s: &Settings,
    n: usize,
    pid: u32,
    out: &mut NResult,
    restart: &dyn Fn(String, Option<String>) -> AgentSpec<'a>,
) -> Res<()> {
    say(&format!("  compiles: {} gateway config compiles, gateway agent stopped (load {})", s.compiles, loadavg()));
    fleet.gateway.stop();
    let as_gateway = Api::as_agent(&server.url, &server.ca, &fleet.gateway.state_dir)?;
    let spare = s.consumer_agents;
    let key = world.consumers[spare].account.key.clone();
    let body = endpoint_body(world, spare);
    let mut cpu = Vec::new();
    let mut wall = Vec::new();
    let mut gzip_bytes = 0;
    for _ in 0..s.compiles {
        rt.block_on(api.post("/v1/vpcendpoints", &key, &body))?;
        let before = ThreadCpu::read(pid);
        let t = Instant::now();
        let sent = rt.block_on(as_gateway.agent_config(true))?;
        wall.push(ms(t.elapsed()));
        cpu.push(ms(before.used_until(&ThreadCpu::read(pid))));
        if !sent.gzip {
            return Err("the control plane did not gzip the gateway's config although the request accepted gzip".into());
        }
        gzip_bytes = sent.bytes;
    }
    let plain = rt.block_on(as_gateway.agent_config(false))?;
    let config: Value =
        serde_json::from_slice(&plain.body).map_err(|e| format!("the gateway config is not JSON: {e}"))?;
    let endpoints: usize = config["gateway"]["resources"]
        .as_array()
        .map(|rs| rs.iter().map(|r| r["allowed"].as_array().map_or(0, Vec::len)).sum())
        .unwrap_or(0);
    let expected = n + s.creates + s.compiles;
    if endpoints != expected {
        out.notes.push(format!("the gateway's config lists {endpoints} endpoints; {expected} were created"));
    }
    out.set("gateway_endpoints", endpoints as f64);
    out.set("gateway_config_gzip_kib", gzip_bytes as f64 / 1024.0);
    out.set("gateway_config_json_kib", plain.bytes as f64 / 1024.0);
    out.set("gateway_compile_cpu_ms", cpu.iter().sum::<f64>() / cpu.len() as f64);
    if let Some(m) = report::percentile(&wall, 0.5) {
        out.set("gateway_compile_wall_ms", m);
    }
    out.samples.insert("gateway_compile_cpu_ms", cpu);
    out.samples.insert("gateway_compile_wall_ms", wall);

    // The gateway agent again, from its state directory; it takes the config with the new endpoints.
    fleet.gateway = Agent::start(restart("gateway-agent-restarted".into(), None))?;
    wait_for("the restarted gateway agent's config", Duration::from_secs(60), Duration::from_millis(20), || {
        fleet.gateway.poll();
        fleet.gateway.check_running()?;
        Ok((!fleet.gateway.applied.is_empty()).then_some(()))
    })?;
    Ok(())
}

/// Share deletions, one at a time, each of a different agent-bearing consumer: the time until that
/// consumer's agent and the gateway agent applied their new configs (by the agents' own log times),
/// and how many configs every other consumer agent received meanwhile.
fn measure_deletions(
    rt: &tokio::runtime::Runtime,
    api: &Api,
    world: &World,
    fleet: &mut Fleet,
    s: &Settings,
    pid: u32,
    out: &mut NResult,
) -> Res<()> {
    say(&format!("  deletions: {} shares of agent-bearing consumers (load {})", s.deletions, loadavg()));
    let mut to_affected = Vec::new();
    let mut to_gateway = Vec::new();
    let mut calls = Vec::new();
    let mut cpu = Vec::new();
    let mut unaffected = 0usize;
    let since = |at: Option<SystemTime>, t0: SystemTime, seen: Instant, i0: Instant| match at {
        Some(at) => at.duration_since(t0).unwrap_or_default(),
        None => seen - i0,
    };
    for d in 0..s.deletions {
        fleet.poll_all();
        fleet.check_running()?;
        let received: Vec<usize> = fleet.consumers.iter().map(Agent::received).collect();
        let (target_before, gateway_before) = (fleet.consumers[d].applied.len(), fleet.gateway.applied.len());
        let share = &world.consumers[d].share;
        let cpu0 = ThreadCpu::read(pid);
        let (t0, i0) = (SystemTime::now(), Instant::now());
        let (took, _) =
            rt.block_on(api.timed(Method::DELETE, &format!("/v1/resourceshares/{share}"), &world.owner.key, None))?;
        calls.push(ms(took));
        let mut seen: [Option<Instant>; 2] = [None, None];
        wait_for(
            &format!("consumer agent {d} and the gateway agent to apply the deletion of {share}"),
            Duration::from_secs(60),
            Duration::from_millis(1),
            || {
                if fleet.consumers[d].poll() > 0 && seen[0].is_none() {
                    seen[0] = Some(Instant::now());
                }
                if fleet.gateway.poll() > 0 && seen[1].is_none() {
                    seen[1] = Some(Instant::now());
                }
                Ok(seen.iter().all(Option::is_some).then_some(()))
            },
        )
        .map_err(|e| format!("{e}; {}", fleet.consumers[d].log_tail()))?;
        cpu.push(ms(cpu0.used_until(&ThreadCpu::read(pid))));
        let (seen_target, seen_gateway) = (seen[0].unwrap_or(i0), seen[1].unwrap_or(i0));
        to_affected.push(ms(since(fleet.consumers[d].applied[target_before].1, t0, seen_target, i0)));
        to_gateway.push(ms(since(fleet.gateway.applied[gateway_before].1, t0, seen_gateway, i0)));
        std::thread::sleep(s.settle);
        fleet.poll_all();
        let others: usize = fleet
            .consumers
            .iter()
            .zip(&received)
            .enumerate()
            .filter(|(j, _)| *j != d)
            .map(|(_, (a, before))| a.received() - before)
            .sum();
        unaffected += others;
        say(&format!(
            "    deletion {}/{}: affected agent {:.1} ms, gateway {:.1} ms, other agents {} configs",
            d + 1,
            s.deletions,
            to_affected[d],
            to_gateway[d],
            others
        ));
    }
    out.set("unaffected_configs", unaffected as f64);
    if let Some(m) = report::percentile(&calls, 0.5) {
        out.set("delete_call_p50_ms", m);
    }
    out.set("cpu_per_delete_ms", cpu.iter().sum::<f64>() / cpu.len().max(1) as f64);
    out.samples.insert("delete_call_ms", calls);
    out.samples.insert("delete_cpu_ms", cpu);
    out.latencies("delete_to_gateway_ms", "delete_to_gateway_p50_ms", "delete_to_gateway_p99_ms", to_gateway);
    out.latencies("delete_to_affected_ms", "delete_to_affected_p50_ms", "delete_to_affected_p99_ms", to_affected);
    Ok(())
}
