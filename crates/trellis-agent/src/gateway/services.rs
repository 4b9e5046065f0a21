//! Endpoint services on the provider's side: the built-in load balancer and
//! its health checks.
//!
//! [`ServiceRuntime`] keeps, per (service, target, target port), the target's
//! health and its open connections, and per service a balancer
//! (`trellis_policy`). A new connection goes to a healthy target the
//! service's policy picks; if the connect fails, the next pick is tried (at
//! most [`MAX_ATTEMPTS`] targets, all within the dial deadline), so a target
//! that died between two checks costs a retry, not a failed client. With no
//! healthy target the answer is an immediate refusal.
//!
//! [`run_health_checks`] follows the config and runs one check loop per
//! (service, target, check port): a TCP connect, or an HTTP GET that must
//! answer 2xx or 3xx, every `intervalSeconds`, each within
//! `timeoutSeconds`. A change of health is logged (a JSON access-log line
//! with `"event": "health"`), counted in metrics, and reported to the control
//! plane, which shows it in the service's view.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_policy::balance::{Balancer, Candidate, Policy, target_key};
use trellis_policy::health::{Check, Health, TargetHealth};
use trellis_proto::agent_api::TargetHealthReport;
use trellis_proto::{AgentConfig, GatewayService, HealthCheck, HealthCheckProtocol, LoadBalancing, Target};

use super::dial::{DialError, describe, dial};
use crate::access_log::AccessLog;
use crate::metrics::Metrics;

/// Most targets one new connection tries before it is refused.
pub const MAX_ATTEMPTS: usize = 3;
/// Most bytes of an HTTP health-check answer read (the status line is enough).
const MAX_HTTP_ANSWER: usize = 16 * 1024;

/// One target of one service on one port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetRef {
    pub service_id: String,
    pub target: String,
    pub port: u16,
}

#[derive(Debug, Default)]
struct TargetState {
    health: TargetHealth,
    active: u32,
    /// The last failed check's error.
    reason: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    targets: HashMap<TargetRef, TargetState>,
    balancers: HashMap<String, Balancer>,
}

/// Health and load of every service target this agent runs.
#[derive(Debug, Default)]
pub struct ServiceRuntime {
    inner: Mutex<Inner>,
    /// Bumped when a target's health changes (the reporter sends it).
    changed: watch::Sender<u64>,
}

/// A connection's hold on its target: counted as open until dropped.
#[derive(Debug)]
pub struct ActiveGuard {
    runtime: Arc<ServiceRuntime>,
    target: TargetRef,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut inner = self.runtime.lock();
        if let Some(state) = inner.targets.get_mut(&self.target) {
            state.active = state.active.saturating_sub(1);
        }
    }
}

/// Why a service connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ServiceDialError {
    #[error("service {0} has no healthy target")]
    NoHealthyTarget(String),
    #[error(transparent)]
    Dial(#[from] DialError),
}

fn policy(lb: LoadBalancing) -> Policy {
    match lb {
        LoadBalancing::LeastConnections => Policy::LeastConnections,
        LoadBalancing::RoundRobin => Policy::RoundRobin,
        LoadBalancing::SourceHash => Policy::SourceHash,
    }
}

fn target_text(target: &Target) -> String {
    match target {
        Target::Ip { address } => address.to_string(),
        Target::Dns { domain_name } => domain_name.clone(),
    }
}

fn health_text(h: Health) -> &'static str {
    match h {
        Health::Initial => "INITIAL",
        Health::Healthy => "HEALTHY",
        Health::Unhealthy => "UNHEALTHY",
    }
}

impl ServiceRuntime {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain maps that every method leaves consistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Subscribes to health changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Picks a healthy target of `service` for a client and counts the
    /// connection on it; `skip` lists targets already tried.
    fn pick(
        self: &Arc<Self>,
        service: &GatewayService,
        target_port: u16,
        client: IpAddr,
        skip: &[usize],
    ) -> Option<(usize, ActiveGuard)> {
        let mut inner = self.lock();
        let refs: Vec<TargetRef> = service
            .targets
            .iter()
            .map(|t| TargetRef { service_id: service.service_id.clone(), target: target_text(t), port: target_port })
            .collect();
        let candidates: Vec<Candidate> = refs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let state = inner.targets.get(r);
                Candidate {
                    key: target_key(&r.target, r.port),
                    healthy: !skip.contains(&i) && state.is_none_or(|s| s.health.health().serves()),
                    active: state.map_or(0, |s| s.active),
                }
            })
            .collect();
        let balancer = inner
            .balancers
            .entry(service.service_id.clone())
            .or_insert_with(|| Balancer::new(policy(service.load_balancing)));
        if balancer.policy() != policy(service.load_balancing) {
            *balancer = Balancer::new(policy(service.load_balancing));
        }
        let index = balancer.pick(&candidates, client)?;
        inner.targets.entry(refs[index].clone()).or_default().active += 1;
        Some((index, ActiveGuard { runtime: self.clone(), target: refs[index].clone() }))
    }

    /// Connects a consumer's connection to a target of `service`, trying the
    /// next healthy target when one does not answer; every try within `timeout`.
    pub async fn connect(
        self: &Arc<Self>,
        service: &GatewayService,
        port: u16,
        client: IpAddr,
        timeout: Duration,
    ) -> Result<(TcpStream, String, ActiveGuard), ServiceDialError> {
        let target_port = service.target_port(port).unwrap_or(port);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tried = Vec::new();
        let mut last = None;
        while tried.len() < MAX_ATTEMPTS {
            let Some((index, guard)) = self.pick(service, target_port, client, &tried) else { break };
            tried.push(index);
            let target = &service.targets[index];
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match dial(target, target_port, left).await {
                Ok(stream) => return Ok((stream, describe(target, target_port), guard)),
                Err(e) => {
                    tracing::debug!(service = %service.service_id, target = %describe(target, target_port), error = %e, "service target did not answer; trying the next");
                    last = Some(e);
                    if left.is_zero() {
                        break;
                    }
                }
            }
        }
        Err(match last {
            Some(e) => ServiceDialError::Dial(e),
            None => ServiceDialError::NoHealthyTarget(service.service_id.clone()),
        })
    }

    /// Counts one check of `target`; returns the new health when it changed.
    fn observe(&self, target: &TargetRef, check: &HealthCheck, result: Result<(), String>) -> Option<Health> {
        let mut inner = self.lock();
        let state = inner.targets.entry(target.clone()).or_default();
        let passed = if result.is_ok() { Check::Passed } else { Check::Failed };
        if let Err(reason) = &result {
            state.reason = Some(reason.clone());
        }
        let changed = state.health.observe(passed, check.healthy_threshold_count, check.unhealthy_threshold_count);
        if state.health.health() != Health::Unhealthy {
            state.reason = None;
        }
        drop(inner);
        if changed.is_some() {
            self.changed.send_modify(|g| *g = g.wrapping_add(1));
        }
        changed
    }

    /// Forgets targets no service of `config` has any more.
    fn retain(&self, live: &BTreeMap<TargetRef, HealthCheck>, services: &[String]) {
        let mut inner = self.lock();
        inner.targets.retain(|t, s| live.contains_key(t) || s.active > 0);
        inner.balancers.retain(|id, _| services.contains(id));
    }

    /// Every target's health, for the control plane (sorted, so equal state reports equally).
    pub fn report(&self) -> Vec<TargetHealthReport> {
        let inner = self.lock();
        let mut out: Vec<TargetHealthReport> = inner
            .targets
            .iter()
            .map(|(t, s)| TargetHealthReport {
                service_id: t.service_id.clone(),
                target: t.target.clone(),
                target_port: t.port,
                state: health_text(s.health.health()).to_string(),
                reason: s.reason.clone(),
            })
            .collect();
        out.sort_by(|a, b| (&a.service_id, &a.target, a.target_port).cmp(&(&b.service_id, &b.target, b.target_port)));
        out
    }

    /// The health of one target (for tests and metrics).
    pub fn health(&self, target: &TargetRef) -> Health {
        self.lock().targets.get(target).map_or(Health::Initial, |s| s.health.health())
    }
}

/// The checks `config` asks for: (service, target, port) → the check.
fn wanted(config: &AgentConfig) -> BTreeMap<TargetRef, (Target, HealthCheck)> {
    let mut out = BTreeMap::new();
    for service in &config.gateway.services {
        for target in &service.targets {
            for port in &service.ports {
                let check_port = service.health_check.port.unwrap_or(port.target_port);
                let key = TargetRef {
                    service_id: service.service_id.clone(),
                    target: target_text(target),
                    port: port.target_port,
                };
                out.insert(
                    key,
                    (target.clone(), HealthCheck { port: Some(check_port), ..service.health_check.clone() }),
                );
            }
        }
    }
    out
}

/// Runs the health checks `config` asks for until `shutdown`, starting and
/// stopping check loops as the config changes.
pub async fn run_health_checks(
    mut config: watch::Receiver<Arc<AgentConfig>>,
    runtime: Arc<ServiceRuntime>,
    metrics: Arc<Metrics>,
    access_log: AccessLog,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut loops: BTreeMap<TargetRef, (HealthCheck, Target, CancellationToken)> = BTreeMap::new();
    loop {
        let wanted = wanted(&config.borrow_and_update());
        loops.retain(|key, (check, target, stop)| {
            let keep = wanted.get(key).is_some_and(|(t, c)| c == check && t == target);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for (key, (target, check)) in &wanted {
            if loops.contains_key(key) {
                continue;
            }
            let stop = shutdown.child_token();
            loops.insert(key.clone(), (check.clone(), target.clone(), stop.clone()));
            tracker.spawn(check_loop(
                key.clone(),
                target.clone(),
                check.clone(),
                runtime.clone(),
                metrics.clone(),
                access_log.clone(),
                stop,
            ));
        }
        let services: Vec<String> = config.borrow().gateway.services.iter().map(|s| s.service_id.clone()).collect();
        runtime.retain(&wanted.iter().map(|(k, (_, c))| (k.clone(), c.clone())).collect(), &services);
        tokio::select! {
            r = config.changed() => if r.is_err() { return },
            () = shutdown.cancelled() => return,
        }
    }
}

async fn check_loop(
    key: TargetRef,
    target: Target,
    check: HealthCheck,
    runtime: Arc<ServiceRuntime>,
    metrics: Arc<Metrics>,
    access_log: AccessLog,
    stop: CancellationToken,
) {
    let interval = Duration::from_secs(u64::from(check.interval_seconds.max(1)));
    let timeout = Duration::from_secs(u64::from(check.timeout_seconds.max(1)));
    let port = check.port.unwrap_or(key.port);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    metrics.set_target_health(&key.service_id, &key.target, key.port, Health::Initial);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => {
                metrics.forget_target(&key.service_id, &key.target, key.port);
                return;
            }
        }
        let result = tokio::select! {
            r = run_check(&target, port, &check, timeout) => r,
            () = stop.cancelled() => continue,
        };
        if let Some(health) = runtime.observe(&key, &check, result.clone()) {
            metrics.set_target_health(&key.service_id, &key.target, key.port, health);
            tracing::info!(service = %key.service_id, target = %key.target, port = key.port, state = health_text(health), reason = ?result.as_ref().err(), "service target health changed");
            access_log.write_event(&serde_json::json!({
                "event": "health",
                "serviceId": key.service_id,
                "target": describe(&target, key.port),
                "checkPort": port,
                "state": health_text(health),
                "reason": result.err(),
            }));
        }
    }
}

/// One check: a TCP connect, or an HTTP GET answered with 2xx or 3xx, within `timeout`.
async fn run_check(target: &Target, port: u16, check: &HealthCheck, timeout: Duration) -> Result<(), String> {
    let started = tokio::time::Instant::now();
    let stream = dial(target, port, timeout).await.map_err(|e| e.to_string())?;
    match check.protocol {
        HealthCheckProtocol::Tcp => Ok(()),
        HealthCheckProtocol::Http => {
            let left = timeout.saturating_sub(started.elapsed());
            let path = check.path.as_deref().unwrap_or("/");
            let host = describe(target, port);
            match tokio::time::timeout(left, http_status(stream, &host, path)).await {
                Err(_) => Err(format!("GET {path} on {host} did not answer within {timeout:?}")),
                Ok(Err(e)) => Err(format!("GET {path} on {host}: {e}")),
                Ok(Ok(code)) if (200..400).contains(&code) => Ok(()),
                Ok(Ok(code)) => Err(format!("GET {path} on {host} answered {code}")),
            }
        }
    }
}

/// The status code of `GET path` over `stream` (HTTP/1.1, connection closed after).
async fn http_status(stream: TcpStream, host: &str, path: &str) -> Result<u16, String> {
    use http_body_util::Empty;
    use hyper::body::Bytes;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HTTP_ANSWER)
        .handshake::<_, Empty<Bytes>>(io)
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "trellis-health-check")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let answer = sender.send_request(request).await.map_err(|e| e.to_string());
    driver.abort();
    Ok(answer?.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use trellis_proto::ServicePort;

    fn service(targets: &[SocketAddr]) -> GatewayService {
        GatewayService {
            service_id: "vpce-svc-1".into(),
            owner_account_id: "acct-o".into(),
            targets: targets.iter().map(|a| Target::Ip { address: a.ip() }).collect(),
            ports: vec![ServicePort { port: 443, target_port: targets[0].port() }],
            load_balancing: LoadBalancing::RoundRobin,
            health_check: HealthCheck::default(),
            proxy_protocol: false,
            limits: None,
            allowed: vec![],
        }
    }

    async fn listener(ip: [u8; 4]) -> (tokio::net::TcpListener, SocketAddr) {
        let l = tokio::net::TcpListener::bind((IpAddr::from(ip), 0)).await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    #[tokio::test]
    async fn a_dead_target_costs_a_retry_not_a_failed_connection() {
        // Two loopback addresses, one port: only 127.0.0.1 listens.
        let (_live, addr) = listener([127, 0, 0, 1]).await;
        let dead = SocketAddr::new([127, 0, 0, 2].into(), addr.port());
        let runtime = Arc::new(ServiceRuntime::default());
        let svc = service(&[dead, addr]);
        for _ in 0..4 {
            let (_, target, _guard) =
                runtime.connect(&svc, 443, [192, 0, 2, 1].into(), Duration::from_secs(2)).await.unwrap();
            assert_eq!(target, addr.to_string());
        }
    }

    #[tokio::test]
    async fn unhealthy_targets_get_nothing_and_none_healthy_is_refused_at_once() {
        let (_a, a) = listener([127, 0, 0, 1]).await;
        let runtime = Arc::new(ServiceRuntime::default());
        let svc = service(&[a]);
        let key = TargetRef { service_id: svc.service_id.clone(), target: a.ip().to_string(), port: a.port() };
        let check = HealthCheck::default();
        runtime.observe(&key, &check, Err("refused".into()));
        assert_eq!(runtime.observe(&key, &check, Err("refused".into())), Some(Health::Unhealthy));
        let started = std::time::Instant::now();
        let err = runtime.connect(&svc, 443, [192, 0, 2, 1].into(), Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, ServiceDialError::NoHealthyTarget(_)), "{err}");
        assert!(started.elapsed() < Duration::from_millis(500), "refused at once");
        let report = runtime.report();
        assert_eq!((report[0].state.as_str(), report[0].reason.as_deref()), ("UNHEALTHY", Some("refused")));
    }

    #[tokio::test]
    async fn open_connections_are_counted_for_least_connections() {
        let (_a, a) = listener([127, 0, 0, 1]).await;
        let b = SocketAddr::new([127, 0, 0, 3].into(), a.port());
        let _b_listener = tokio::net::TcpListener::bind(b).await.unwrap();
        let runtime = Arc::new(ServiceRuntime::default());
        let svc = GatewayService { load_balancing: LoadBalancing::LeastConnections, ..service(&[a, b]) };
        let (_, first, held) = runtime.connect(&svc, 443, [192, 0, 2, 1].into(), Duration::from_secs(2)).await.unwrap();
        let (_, second, _) = runtime.connect(&svc, 443, [192, 0, 2, 1].into(), Duration::from_secs(2)).await.unwrap();
        assert_ne!(first, second, "the busy target is avoided");
        drop(held);
    }
}
