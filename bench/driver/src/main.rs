//! `trellis-bench`: measures Trellis against a direct connection, two plain
//! haproxy hops and rathole with TLS, in one run on loopback, with the same
//! client and server on every path. `bench/run` installs the tools, builds
//! everything in release mode and calls `trellis-bench run`.
//!
//! `trellis-bench scale` (through `bench/scale`) measures the control plane
//! with thousands of consumers of one resource and 50 real agents.
//!
//! It reports figures with their spread and ratios; it never asserts a time.

mod client;
mod echo;
mod iperf;
mod open_files;
mod paths;
mod postgres;
mod proc;
mod report;
mod run;
mod scale;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Errors of the driver are one line for a person: what failed and why.
pub type Res<T> = Result<T, String>;

#[derive(Parser)]
#[command(name = "trellis-bench", about = "Benchmark Trellis against direct, haproxy and rathole paths on loopback")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the benchmark (normally through `bench/run`).
    Run(Box<run::RunArgs>),
    /// Run the control plane's scale benchmark (normally through `bench/scale`).
    Scale(Box<scale::ScaleArgs>),
    /// The echo server every path leads to (started by `run`).
    EchoServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
}

/// The first line a program prints for `args`, or why it printed none.
pub fn first_line_of(bin: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    match proc::run(cmd, Duration::from_secs(10)) {
        Ok(out) => {
            let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or_default().trim().to_string()
        }
        Err(e) => format!("unknown ({e})"),
    }
}

/// The running driver itself, to start the echo server as its own process.
pub fn self_exe() -> Res<PathBuf> {
    std::env::current_exe().map_err(|e| format!("cannot find the trellis-bench executable: {e}"))
}

fn main() {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Cmd::Run(args) => run::main(*args),
        Cmd::Scale(args) => scale::main(*args),
        Cmd::EchoServer { listen } => echo::serve(listen),
    };
    if proc::interrupted() {
        // The signal handler is stopping the children and exits the process when done.
        loop {
            std::thread::park();
        }
    }
    if let Err(e) = outcome {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
