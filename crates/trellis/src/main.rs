//! `trellis`: the one binary. It parses flags and wires the library crates
//! together: the control plane (`server`), the data plane (`agent`), both at
//! once (`dev`), and the API verbs (`trellis <noun> <verb>`). It holds no
//! business logic.
#![forbid(unsafe_code)]

mod api_cmd;
mod cli;
mod client;
mod demo_service;
mod dev;
mod nouns;
mod output;
mod program;
mod run_agent;
mod run_relay;
mod run_server;
mod secret;
mod shutdown;

use std::process::ExitCode;

use clap::error::ErrorKind;

use crate::cli::{AgentCommand, Cli, Command, RelayCommand, ServerCommand};

fn main() -> ExitCode {
    let cli = match Cli::parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(err) => return clap_error(err),
    };
    init_tracing(&cli.command);
    let long_running = matches!(cli.command, Command::Server(ServerCommand { verb: None, .. }) | Command::Dev(_))
        || matches!(cli.command, Command::Agent(AgentCommand { verb: None, .. }) | Command::Relay(_));
    let runtime = if long_running {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = worker_threads(&cli.command) {
            builder.worker_threads(usize::from(n));
        }
        builder.enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", trellis_model::clip_quoted(&error_line(&e)));
            ExitCode::FAILURE
        }
    }
}

/// Workers of the main runtime. An agent's data plane runs on threads of its
/// own (`--worker-threads` of them, see `trellis_agent::shards`; with one, on
/// this runtime), so its main runtime needs one worker for the control-plane
/// client, DNS, metrics and health checks. A relay runs on this runtime,
/// `--worker-threads` workers.
fn worker_threads(command: &Command) -> Option<u16> {
    match command {
        Command::Agent(AgentCommand { verb: None, .. }) => Some(1),
        Command::Relay(RelayCommand { run }) => run.worker_threads,
        _ => None,
    }
}

/// The error and its causes on one line. Causes whose text the line already
/// holds are skipped: many library errors repeat their source in their message.
fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let Cli { global, command } = cli;
    let request = match command {
        Command::Server(ServerCommand { verb: None, run }) => return run_server::run(run).await,
        Command::Server(ServerCommand { verb: Some(verb), .. }) => return run_server::maintain(verb),
        Command::Agent(AgentCommand { verb: None, run }) => {
            let config = run.validate().map_err(anyhow::Error::msg)?;
            return run_agent::run(config).await;
        }
        Command::Relay(RelayCommand { run }) => return run_relay::run(run).await,
        Command::Dev(args) => return dev::run(args, global.output).await,
        Command::Version => {
            println!("trellis {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        Command::Agent(AgentCommand { verb: Some(verb), .. }) => verb.request(),
        Command::Account(verb) => verb.request(),
        Command::Organization(verb) => verb.request(),
        Command::Vpc(verb) => verb.request(),
        Command::Subnet(verb) => verb.request(),
        Command::AgentToken(verb) => verb.request(),
        Command::RelayToken(verb) => verb.request(),
        Command::Relays(verb) => verb.request(),
        Command::ResourceGateway(verb) => verb.request(),
        Command::ResourceConfiguration(verb) => verb.request(),
        Command::ResourceShare(verb) => verb.request(),
        Command::Invitation(verb) => verb.request(),
        Command::DomainVerification(verb) => verb.request(),
        Command::EndpointService(verb) => verb.request(),
        Command::ConnectionNotification(verb) => verb.request(),
        Command::VpcEndpoint(mut verb) => {
            let client = api_cmd::client_from_flags(&global)?;
            api_cmd::resolve_identifiers(&client, &mut verb).await?;
            api_cmd::run(&client, &verb.request(), global.output).await?;
            return Ok(());
        }
    };
    let client = api_cmd::client_from_flags(&global)?;
    api_cmd::run(&client, &request, global.output).await?;
    Ok(())
}

/// Logs go to stderr. `TRELLIS_LOG` (or `RUST_LOG`) overrides the default:
/// `info` for the server and agent, `warn` for `dev` (its own output is the
/// point) and for API verbs.
fn init_tracing(command: &Command) {
    use tracing_subscriber::EnvFilter;
    let default = match command {
        Command::Server(_) | Command::Agent(AgentCommand { verb: None, .. }) | Command::Relay(_) => "info",
        _ => "warn",
    };
    let filter = EnvFilter::try_from_env("TRELLIS_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

/// Help and version print as clap renders them; a usage error becomes one line
/// on stderr and exit status 2.
fn clap_error(err: clap::Error) -> ExitCode {
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            err.exit()
        }
        _ => {
            eprintln!("{}", usage_error_line(&err));
            ExitCode::from(2)
        }
    }
}

/// A usage error as one line, with long echoed input (a 5,000-character
/// value) cut to [`trellis_model::MAX_ECHO_CHARS`] characters.
fn usage_error_line(err: &clap::Error) -> String {
    use clap::error::ContextValue;
    let mut line = one_line(&err.render().to_string());
    for (_, value) in err.context() {
        let values = match value {
            ContextValue::String(v) => std::slice::from_ref(v),
            ContextValue::Strings(vs) => vs.as_slice(),
            _ => &[],
        };
        for v in values.iter().filter(|v| v.chars().count() > trellis_model::MAX_ECHO_CHARS) {
            line = line.replace(v.as_str(), &trellis_model::clip_echo(v));
        }
    }
    trellis_model::clip_quoted(&line)
}

/// Joins clap's message (everything before the usage block) into one line.
fn one_line(rendered: &str) -> String {
    let message: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    message.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_time_errors_are_one_line_without_repeated_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let err = anyhow::Error::new(io)
            .context("cannot listen on 127.0.0.1:1: Address already in use")
            .context("starting the control plane");
        assert_eq!(
            error_line(&err),
            "starting the control plane: cannot listen on 127.0.0.1:1: Address already in use"
        );

        let api =
            crate::client::ClientError::Api { status: 409, code: Some("Conflict".into()), message: "in use".into() };
        assert_eq!(format!("error: {}", error_line(&api.into())), "error: in use (HTTP 409 Conflict)");
    }

    #[test]
    fn usage_errors_repeat_at_most_64_characters_of_the_input() {
        let long = "9".repeat(5000);
        let cut = format!("{}…", "9".repeat(64));
        for args in [
            vec![
                "trellis",
                "resource-configuration",
                "create",
                "--name",
                "x",
                "--type",
                "SINGLE",
                "--port-range",
                &long,
            ],
            vec!["trellis", "dev", "--share", &long],
            vec!["trellis", "vpc", "list", "--url", &long],
            vec!["trellis", "vpc", &long],
        ] {
            let err = Cli::parse_args(args.iter().copied()).unwrap_err();
            let line = usage_error_line(&err);
            assert!(line.contains(&cut), "{line}");
            assert!(line.len() < 400, "{} characters: {line}", line.len());
        }
    }

    #[test]
    fn usage_errors_are_one_line() {
        let err = Cli::parse_args(["trellis", "vpc", "create"]).unwrap_err();
        let line = one_line(&err.render().to_string());
        assert_eq!(line, "error: the following required arguments were not provided: --name <NAME>");

        let err = Cli::parse_args(["trellis", "vpc", "create", "--nam", "x"]).unwrap_err();
        let line = one_line(&err.render().to_string());
        assert!(line.starts_with("error: unexpected argument '--nam' found"), "{line}");
        assert!(!line.contains('\n'));
    }
}
