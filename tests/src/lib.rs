//! Harness for the Trellis end-to-end suites.
//!
//! The suites under `tests/tests/` run the real `trellis` binary (control plane,
//! agents, CLI) against a real PostgreSQL, on loopback or inside network
//! namespaces that the harness creates. Every fixture here owns what it starts:
//! processes are stopped by PID and namespaces deleted when the fixture drops,
//! also when a test panics, so a failed run never breaks the next one.
//!
//! The harness never sends traffic anywhere but 127.0.0.0/8 or the namespaces
//! it made, never binds a fixed port on the host, and waits for conditions with
//! deadlines instead of sleeping.
#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod bins;
pub mod cli;
pub mod control;
pub mod dns;
pub mod flow;
pub mod net;
pub mod netns;
pub mod pair;
pub mod postgres;
pub mod process;
pub mod prometheus;
pub mod relay;
pub mod tcp_service;
pub mod tunnel;
pub mod wait;
pub mod webhook;

pub use agent::{Agent, AgentOptions};
pub use api::{Api, Response};
pub use cli::Cli;
pub use control::{Account, ControlPlane};
pub use flow::Tenant;
pub use netns::{Lab, NatSite, Netns, Site};
pub use pair::{LoopbackPair, PairOptions};
pub use postgres::Postgres;
pub use process::Proc;
pub use tcp_service::TcpService;
pub use wait::wait_until;
pub use webhook::WebhookReceiver;

/// Skips the calling test (returns early) with a printed reason unless the
/// test process runs as root; network namespaces need root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::net::is_root() {
            eprintln!("SKIPPED: this test creates network namespaces and must run as root (CI does)");
            return;
        }
    };
}
