//! `trellis agent`: runs the data plane until Ctrl-C or SIGTERM. Also starts
//! the two in-process agents of `trellis dev`.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use trellis_agent::{AccessLog, AgentOptions, AgentTuning, RunningAgent};

use crate::cli::AgentRunConfig;

/// Runs `trellis agent` until a signal.
pub async fn run(config: AgentRunConfig) -> Result<()> {
    let state_dir = config.state_dir.display().to_string();
    let access_log = match &config.access_log {
        Some(path) => AccessLog::append_to(path)
            .with_context(|| format!("opening the access log {} (--access-log)", path.display()))?,
        None => AccessLog::stdout(),
    };
    let options = AgentOptions {
        control_plane: config.control_plane.to_string(),
        join_token: config.join_token.map(|t| t.to_string()),
        state_dir: config.state_dir,
        tunnel_listen: config.tunnel_listen,
        advertise: config.advertise,
        dns_listen: config.dns_listen,
        dns_upstream: config.dns_upstream,
        dns_allow: config.dns_allow,
        metrics_listen: config.metrics_listen,
        manage_routes: config.manage_routes,
        report_interval: config.report_interval,
        outbound_only: config.outbound_only,
        data_plane_threads: config.data_plane_threads,
    };
    let tuning = AgentTuning { access_log: access_log.clone(), ..AgentTuning::default() };
    let mut agent = AgentHandle::start(AgentRole::Agent, options, tuning)
        .await
        .with_context(|| format!("starting the agent with state in {state_dir}"))?;
    agent.access_log = config.access_log;
    tracing::info!("agent running: {}", agent.summary());
    let _reopen = tokio::spawn(reopen_on_sighup(access_log.clone()));
    let outcome = tokio::select! {
        () = crate::shutdown::signal() => {
            tracing::info!("shutting down (Ctrl-C again to exit at once)");
            Ok(())
        }
        result = agent.stopped() => result,
    };
    crate::shutdown::gracefully("agent", agent.shutdown()).await;
    // The last connections' lines (written by a thread of their own) reach the log before exit,
    // unless the log stopped taking lines (a stdout pipe nobody drains): then the agent exits anyway.
    if !access_log.flush(std::time::Duration::from_secs(5)) {
        tracing::warn!("the access log did not take its last lines within 5 s; exiting without them");
    }
    outcome
}

/// Reopens the access-log file on every SIGHUP (after log rotation).
pub(crate) async fn reopen_on_sighup(log: AccessLog) {
    #[cfg(unix)]
    if let Some(path) = log.path().map(Path::to_path_buf) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot listen for SIGHUP, so the access log is never reopened: {e}");
                return;
            }
        };
        while hup.recv().await.is_some() {
            // Off the runtime: reopening waits for the log's writer (up to 1 s
            // for its lines, longer if its sink hangs), and an agent's main
            // runtime has one worker, which serves DNS and the control plane.
            let reopening = log.clone();
            let reopened = tokio::task::spawn_blocking(move || reopening.reopen())
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            match reopened {
                Ok(()) => tracing::info!(path = %path.display(), "SIGHUP: reopened the access log"),
                Err(e) => {
                    tracing::error!(path = %path.display(), "SIGHUP: cannot reopen the access log, still writing to the old file: {e}")
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = log;
}

/// What an agent is for; only names it in `trellis dev`'s output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentRole {
    /// A standalone `trellis agent`: it plays whatever roles its VPC needs.
    Agent,
    /// The owner's agent in `trellis dev`.
    Gateway,
    /// The consumer's agent in `trellis dev`.
    Endpoint,
}

impl fmt::Display for AgentRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Agent => "agent",
            Self::Gateway => "gateway",
            Self::Endpoint => "endpoint",
        })
    }
}

/// Starts a `trellis dev` agent on loopback with its state in `DIR/<role>-agent`
/// and its access log in `DIR/<role>-access.log` (stdout is for dev's summary).
pub async fn start_for_dev(role: AgentRole, control_plane: &str, join_token: &str, dir: &Path) -> Result<AgentHandle> {
    let loopback = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let options = AgentOptions {
        control_plane: control_plane.to_string(),
        join_token: Some(join_token.to_string()),
        state_dir: dir.join(format!("{role}-agent")),
        tunnel_listen: (role == AgentRole::Gateway).then(|| loopback(0)),
        advertise: None,
        dns_listen: (role == AgentRole::Endpoint).then(|| loopback(0)),
        dns_upstream: None,
        dns_allow: None,
        metrics_listen: Some(loopback(0)),
        manage_routes: false,
        report_interval: Duration::from_secs(1),
        outbound_only: false,
        // On the dev command's runtime.
        data_plane_threads: 1,
    };
    let log_path = dir.join(format!("{role}-access.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("creating the access log {}", log_path.display()))?;
    let tuning = AgentTuning { access_log: AccessLog::to_writer(Box::new(log)), ..AgentTuning::default() };
    let mut agent =
        AgentHandle::start(role, options, tuning).await.with_context(|| format!("starting the {role} agent"))?;
    agent.access_log = Some(log_path);
    Ok(agent)
}

/// A running agent.
pub struct AgentHandle {
    role: AgentRole,
    inner: RunningAgent,
    access_log: Option<PathBuf>,
}

impl AgentHandle {
    async fn start(role: AgentRole, options: AgentOptions, tuning: AgentTuning) -> Result<Self> {
        let inner = trellis_agent::start_tuned(options, tuning).await?;
        Ok(Self { role, inner, access_log: None })
    }

    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.inner.dns_addr()
    }

    /// One line: id and bound addresses.
    pub fn summary(&self) -> String {
        let mut parts = vec![self.inner.agent_id().to_string()];
        parts.push(match self.inner.tunnel_addr() {
            Some(addr) => format!("tunnel {addr}"),
            None => "no tunnel listener (endpoints only)".to_string(),
        });
        if let Some(dns) = self.inner.dns_addr() {
            parts.push(format!("dns {dns}"));
        }
        if let Some(metrics) = self.inner.metrics_addr() {
            parts.push(format!("metrics http://{metrics}/metrics"));
        }
        match &self.access_log {
            Some(log) => parts.push(format!("access log {}", log.display())),
            None => parts.push("access log on stdout".to_string()),
        }
        parts.join(", ")
    }

    /// Resolves when the agent stops on its own (a fatal error).
    pub async fn stopped(&self) -> Result<()> {
        self.inner.wait().await.with_context(|| format!("the {} agent stopped", self.role))
    }

    /// Closes listeners and connections and waits for the agent's tasks.
    pub async fn shutdown(self) {
        self.inner.shutdown().await;
    }
}
