//! The command line: every subcommand and flag, parsed with clap.
//!
//! Parsing validates everything that can be checked without the network (URLs,
//! socket addresses, join tokens, port ranges), so a bad flag fails before any
//! port is bound. Nothing here does I/O.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use reqwest::Url;
use trellis_proto::join_token::JoinToken;

use crate::nouns::{
    AccountVerb, AgentTokenVerb, AgentVerb, ConnectionNotificationVerb, DomainVerificationVerb, EndpointServiceVerb,
    InvitationVerb, OrganizationVerb, RelayTokenVerb, RelaysVerb, ResourceConfigurationVerb, ResourceGatewayVerb,
    ResourceShareVerb, SubnetVerb, VpcEndpointVerb, VpcVerb,
};
use crate::secret::ApiKey;

/// Trellis: private connectivity to resources in any network (PrivateLink / VPC Lattice "resources").
#[derive(Debug, Parser)]
#[command(name = "trellis", version, max_term_width = 120)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Command,
}

const GLOBAL: &str = "Global options";

/// Shown under the help of every command that takes the global options, which `trellis --help` documents.
const GLOBAL_NOTE: &str = "Global options: --url, --api-key, --ca-cert, -o/--output \
    (TRELLIS_URL, TRELLIS_API_KEY, TRELLIS_CA_CERT, TRELLIS_OUTPUT); see `trellis --help`.";

impl Cli {
    /// The command line as parsed and as `--help` shows it: environment
    /// variables by name only (`[env: TRELLIS_URL]`, never a value, set or
    /// empty), and the global options documented once, in `trellis --help`;
    /// every other page takes them (hidden) and points there.
    pub fn tidy_command() -> clap::Command {
        let cmd = <Cli as CommandFactory>::command();
        let globals: Vec<clap::Arg> =
            cmd.get_arguments().filter(|a| a.is_global_set()).map(|a| a.clone().hide(true)).collect();
        fn tidy(cmd: clap::Command, globals: &[clap::Arg], top: bool) -> clap::Command {
            let mut cmd = cmd.mut_args(|a| a.hide_env_values(true));
            if !top {
                // A subcommand's own (hidden) copy is not replaced by the propagated, visible one.
                for arg in globals {
                    cmd = cmd.arg(arg.clone());
                }
                if !["server", "version", "reset-admin-key"].contains(&cmd.get_name()) {
                    cmd = cmd.after_help(GLOBAL_NOTE);
                }
            }
            let names: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_string()).collect();
            for name in names {
                cmd = cmd.mut_subcommand(name, |sub| tidy(sub, globals, false));
            }
            cmd
        }
        tidy(cmd, &globals, true)
    }

    /// Parses `args` (the program name first) with [`Cli::tidy_command`].
    pub fn parse_args<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut cmd = Self::tidy_command();
        let matches = cmd.try_get_matches_from_mut(args)?;
        Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
    }
}

/// Flags every API verb uses to reach the control plane.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Control-plane URL, e.g. https://127.0.0.1:8443
    #[arg(long, env = "TRELLIS_URL", global = true, help_heading = GLOBAL, value_name = "URL", value_parser = parse_url)]
    pub url: Option<Url>,

    /// API key of the account to act as (from `trellis account create`), or the admin key (DATA_DIR/admin.key)
    #[arg(long, env = "TRELLIS_API_KEY", global = true, help_heading = GLOBAL, hide_env_values = true, value_name = "KEY")]
    pub api_key: Option<ApiKey>,

    /// PEM file of the control plane's CA (DATA_DIR/ca.pem); required for https URLs
    #[arg(long, env = "TRELLIS_CA_CERT", global = true, help_heading = GLOBAL, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,

    /// How to print answers: human tables, or the API's JSON unchanged
    #[arg(long, short = 'o', env = "TRELLIS_OUTPUT", global = true, help_heading = GLOBAL, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable tables
    Table,
    /// The API's JSON body, unchanged
    Json,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per process; boxing would only complicate the matches")]
pub enum Command {
    /// Run the control plane (API, CA, store), or replace its admin key (`trellis server reset-admin-key`)
    Server(ServerCommand),
    /// Run an agent (`trellis agent --control-plane …`), or manage enrolled agents (`trellis agent list`)
    Agent(AgentCommand),
    /// Run a relay (`trellis relay --control-plane …`): where outbound-only gateway agents and endpoint agents meet
    Relay(RelayCommand),
    /// Run a control plane, an owner agent and a consumer agent in one process, with a demo share
    Dev(DevArgs),
    /// Print the version
    Version,
    /// Accounts and their API keys (admin)
    #[command(subcommand)]
    Account(AccountVerb),
    /// Organizations: accounts whose shares need no invitation (admin)
    #[command(subcommand)]
    Organization(OrganizationVerb),
    /// VPCs: networks where agents run
    #[command(subcommand)]
    Vpc(VpcVerb),
    /// Subnets: one zone of a VPC and its endpoint address pool
    #[command(subcommand)]
    Subnet(SubnetVerb),
    /// Single-use join tokens that enroll agents into a subnet
    #[command(subcommand)]
    AgentToken(AgentTokenVerb),
    /// Single-use join tokens that enroll relays (admin)
    #[command(subcommand)]
    RelayToken(RelayTokenVerb),
    /// Relays: where agents without a reachable address meet endpoint agents (admin)
    #[command(subcommand)]
    Relays(RelaysVerb),
    /// Resource gateways: points of ingress into an owner VPC
    #[command(subcommand)]
    ResourceGateway(ResourceGatewayVerb),
    /// Resource configurations: the resources (ip or DNS name, ports) behind a gateway
    #[command(subcommand)]
    ResourceConfiguration(ResourceConfigurationVerb),
    /// Resource shares: share resource configurations with other accounts
    #[command(subcommand)]
    ResourceShare(ResourceShareVerb),
    /// Resource share invitations received (or sent)
    #[command(subcommand)]
    Invitation(InvitationVerb),
    /// Endpoint services: publish a service to other accounts' VPCs (load-balanced, health-checked)
    #[command(subcommand)]
    EndpointService(EndpointServiceVerb),
    /// VPC endpoints: a consumer's addresses and DNS names for a shared resource or an endpoint service
    #[command(subcommand)]
    VpcEndpoint(VpcEndpointVerb),
    /// Domain verifications: prove with a TXT record that you own a domain used in custom DNS names
    #[command(subcommand)]
    DomainVerification(DomainVerificationVerb),
    /// Connection notifications: signed webhooks for connection events, with a log of every delivery
    #[command(subcommand)]
    ConnectionNotification(ConnectionNotificationVerb),
}

/// `trellis server`: without a verb it runs the control plane.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ServerCommand {
    #[command(subcommand)]
    pub verb: Option<ServerVerb>,

    #[command(flatten)]
    pub run: ServerArgs,
}

/// Maintenance of a control plane's data directory.
#[derive(Debug, Subcommand)]
pub enum ServerVerb {
    /// Replace the admin API key with a new one written to DATA_DIR/admin.key (the old key stops working)
    ResetAdminKey {
        /// Data directory of the control plane (as given to `trellis server`)
        #[arg(long, env = "TRELLIS_DATA_DIR", value_name = "DIR")]
        data_dir: PathBuf,
    },
}

/// The flags of a running control plane. `data_dir` is an `Option` so that
/// `trellis server reset-admin-key` parses without the run flags; clap still requires it.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address for the HTTPS API
    #[arg(long, env = "TRELLIS_LISTEN", value_name = "ADDR", default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,

    /// Directory for the store, the CA and the admin key (created mode 0700 when missing)
    #[arg(long, env = "TRELLIS_DATA_DIR", value_name = "DIR", required = true)]
    pub data_dir: Option<PathBuf>,

    /// Region named in ARNs and DNS names
    #[arg(long, env = "TRELLIS_REGION", value_name = "REGION", default_value = "local", value_parser = parse_region)]
    pub region: String,

    /// Extra DNS name or IP address for the server certificate (repeatable; the listen address is always included)
    #[arg(long = "tls-name", env = "TRELLIS_TLS_NAME", value_name = "NAME", value_delimiter = ',')]
    pub tls_names: Vec<String>,

    /// DNS resolver that domain verification asks for TXT records, IP:PORT (default: the first nameserver in /etc/resolv.conf)
    #[arg(long, env = "TRELLIS_DNS_RESOLVER", value_name = "IP:PORT", value_parser = parse_resolver)]
    pub dns_resolver: Option<SocketAddr>,

    /// Deliver connection-notification webhooks to loopback, link-local and private addresses too (refused by default)
    #[arg(long, env = "TRELLIS_ALLOW_PRIVATE_WEBHOOKS")]
    pub allow_private_webhooks: bool,

    /// Resource shares one account may create per minute, after a burst of twice as many
    #[arg(long, env = "TRELLIS_SHARES_PER_MINUTE", value_name = "N", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub shares_per_minute: u32,
}

/// `trellis agent`: with a verb it manages agents through the API; without one it runs an agent.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct AgentCommand {
    #[command(subcommand)]
    pub verb: Option<AgentVerb>,

    #[command(flatten)]
    pub run: AgentRunArgs,
}

/// The flags of a running agent. Required ones are `Option` so that `trellis agent list`
/// parses without them; [`AgentRunArgs::validate`] turns them into [`AgentRunConfig`].
#[derive(Debug, Args)]
pub struct AgentRunArgs {
    /// Control-plane URL, e.g. https://cp.example:8443
    #[arg(long, env = "TRELLIS_CONTROL_PLANE", value_name = "URL", required = true, value_parser = parse_url)]
    pub control_plane: Option<Url>,

    /// Join token from `trellis agent-token create`, needed on the first start only (later starts use the state
    /// dir; a different token for an enrolled state dir is an error). Prefer the TRELLIS_JOIN_TOKEN environment
    /// variable: a flag's value is visible to every user in `ps`
    #[arg(long, env = "TRELLIS_JOIN_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub join_token: Option<JoinToken>,

    /// Directory for the agent's key, certificate and last config (created when missing)
    #[arg(long, env = "TRELLIS_STATE_DIR", value_name = "DIR", required = true)]
    pub state_dir: Option<PathBuf>,

    /// Address where this agent accepts tunnels from endpoint agents (gateway role). Default: 0.0.0.0:7443 when --advertise is given; without either flag the agent binds no tunnel listener and serves endpoints only
    #[arg(long, env = "TRELLIS_TUNNEL_LISTEN", value_name = "ADDR")]
    pub tunnel_listen: Option<SocketAddr>,

    /// Accept no inbound connection: the gateway role is reached through the relays of the agent's config, to which it keeps outbound connections (for sites behind NAT or a firewall that lets nothing in)
    #[arg(long, env = "TRELLIS_OUTBOUND_ONLY", conflicts_with_all = ["tunnel_listen", "advertise"])]
    pub outbound_only: bool,

    /// host:port where endpoint agents reach the tunnel listener; what makes the agent a gateway (default: the tunnel listen address when it is a specific IP)
    #[arg(long, env = "TRELLIS_ADVERTISE", value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub advertise: Option<String>,

    /// Address for the DNS server answering endpoint names (off when not set)
    #[arg(long, env = "TRELLIS_DNS_LISTEN", value_name = "ADDR")]
    pub dns_listen: Option<SocketAddr>,

    /// DNS server to forward other names to (default: the first nameserver in /etc/resolv.conf)
    #[arg(long, env = "TRELLIS_DNS_UPSTREAM", value_name = "ADDR")]
    pub dns_upstream: Option<SocketAddr>,

    /// Networks whose clients the DNS server answers; others get REFUSED (default: loopback, 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7, fe80::/10 and the subnet's address pool)
    #[arg(long, env = "TRELLIS_DNS_ALLOW", value_name = "CIDR[,CIDR…]", value_delimiter = ',', value_parser = parse_network)]
    pub dns_allow: Vec<IpNet>,

    /// Where the access log (one JSON line per connection) goes: `-` for stdout, or a FILE appended to and reopened on SIGHUP
    #[arg(long, env = "TRELLIS_ACCESS_LOG", value_name = "FILE", default_value = "-")]
    pub access_log: PathBuf,

    /// Address for Prometheus /metrics (off when not set)
    #[arg(long, env = "TRELLIS_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// Make the subnet's endpoint address pool local (ip route replace local POOL dev lo; needs CAP_NET_ADMIN)
    #[arg(long, env = "TRELLIS_MANAGE_ROUTES")]
    pub manage_routes: bool,

    /// How often to report listener state and usage to the control plane
    #[arg(long, env = "TRELLIS_REPORT_INTERVAL", value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub report_interval: Duration,
    /// Threads that run the data plane (default: one per CPU the process may use, at most 8). Each accepts and
    /// serves connections of its own (tunnel and endpoint listeners are bound once per thread with SO_REUSEPORT),
    /// so a connection's bytes never change threads: see docs/performance.md, "Data-plane threads"
    #[arg(long, env = "TRELLIS_WORKER_THREADS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
}

/// A running agent's configuration after validation.
#[derive(Debug, Clone)]
pub struct AgentRunConfig {
    pub control_plane: Url,
    pub join_token: Option<JoinToken>,
    pub state_dir: PathBuf,
    /// `None`: no tunnel listener (endpoint role only).
    pub tunnel_listen: Option<SocketAddr>,
    pub advertise: Option<String>,
    pub dns_listen: Option<SocketAddr>,
    pub dns_upstream: Option<SocketAddr>,
    /// `None`: the agent's default networks.
    pub dns_allow: Option<Vec<IpNet>>,
    /// `None`: stdout.
    pub access_log: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
    pub manage_routes: bool,
    pub report_interval: Duration,
    /// No tunnel listener; reached through relays.
    pub outbound_only: bool,
    /// Data-plane threads: `--worker-threads`, else one per CPU the process may use.
    pub data_plane_threads: usize,
}

impl AgentRunArgs {
    /// Checks the required flags (clap enforces them too; this keeps the types honest).
    pub fn validate(self) -> Result<AgentRunConfig, String> {
        let missing = |flag: &str, env: &str| format!("`trellis agent` needs --{flag} (or {env})");
        Ok(AgentRunConfig {
            control_plane: self.control_plane.ok_or_else(|| missing("control-plane", "TRELLIS_CONTROL_PLANE"))?,
            join_token: self.join_token,
            state_dir: self.state_dir.ok_or_else(|| missing("state-dir", "TRELLIS_STATE_DIR"))?,
            // An advertised address needs a listener: the documented default one.
            tunnel_listen: self.tunnel_listen.or_else(|| {
                self.advertise
                    .as_ref()
                    .map(|_| trellis_agent::DEFAULT_TUNNEL_LISTEN.parse().expect("a literal socket address"))
            }),
            advertise: self.advertise,
            dns_listen: self.dns_listen,
            dns_upstream: self.dns_upstream,
            dns_allow: (!self.dns_allow.is_empty()).then_some(self.dns_allow),
            access_log: (self.access_log.as_os_str() != "-").then_some(self.access_log),
            metrics_listen: self.metrics_listen,
            manage_routes: self.manage_routes,
            report_interval: self.report_interval,
            outbound_only: self.outbound_only,
            data_plane_threads: self.worker_threads.map_or_else(trellis_agent::default_data_plane_threads, usize::from),
        })
    }
}

/// `trellis relay`: runs a relay.
#[derive(Debug, Args)]
pub struct RelayCommand {
    #[command(flatten)]
    pub run: RelayRunArgs,
}

/// The flags of a running relay.
#[derive(Debug, Args)]
pub struct RelayRunArgs {
    /// Control-plane URL, e.g. https://cp.example:8443
    #[arg(long, env = "TRELLIS_CONTROL_PLANE", value_name = "URL", required = true, value_parser = parse_url)]
    pub control_plane: Option<Url>,

    /// Relay join token from `trellis relay-token create`, needed on the first start only (later starts use the
    /// state dir). Prefer the TRELLIS_JOIN_TOKEN environment variable: a flag's value is visible to every user in `ps`
    #[arg(long, env = "TRELLIS_JOIN_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub join_token: Option<JoinToken>,

    /// Directory for the relay's key, certificate and last config (created when missing)
    #[arg(long, env = "TRELLIS_STATE_DIR", value_name = "DIR", required = true)]
    pub state_dir: Option<PathBuf>,

    /// Address where agents connect (outbound-only gateway agents attach, endpoint agents connect through)
    #[arg(long, env = "TRELLIS_RELAY_LISTEN", value_name = "ADDR", default_value = "0.0.0.0:7444")]
    pub listen: SocketAddr,

    /// host:port where agents reach the listener (given to the control plane, which puts it in agents' configs)
    #[arg(long, env = "TRELLIS_ADVERTISE", value_name = "HOST:PORT", required = true, value_parser = parse_host_port)]
    pub advertise: Option<String>,

    /// Address for Prometheus /metrics (off when not set)
    #[arg(long, env = "TRELLIS_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// Where the access log (one JSON line per relayed tunnel connection, which carries many client flows, or refused connect; no payload) goes: `-` for stdout, or a FILE appended to and reopened on SIGHUP
    #[arg(long, env = "TRELLIS_ACCESS_LOG", value_name = "FILE", default_value = "-")]
    pub access_log: PathBuf,

    /// How often to report to the control plane
    #[arg(long, env = "TRELLIS_REPORT_INTERVAL", value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub report_interval: Duration,
    /// Threads that run the data plane (default: one per CPU the process may use). On a host whose cores are
    /// busy with other work, e.g. a 2-CPU machine shared with the application, 1 can move more: see
    /// docs/performance.md, "Worker threads"
    #[arg(long, env = "TRELLIS_WORKER_THREADS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
}

/// `trellis dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Loopback address for the control plane's API
    #[arg(long, env = "TRELLIS_DEV_LISTEN", value_name = "ADDR", default_value = "127.0.0.1:0", value_parser = parse_loopback)]
    pub listen: SocketAddr,

    /// Share this HOST:PORT (e.g. a local PostgreSQL at 127.0.0.1:5432) instead of the built-in demo service
    #[arg(long, env = "TRELLIS_DEV_SHARE", value_name = "HOST:PORT", value_parser = parse_share_target)]
    pub share: Option<ShareTarget>,

    /// Directory for the control plane's and agents' state (default: a temporary directory removed on exit)
    #[arg(long, env = "TRELLIS_DEV_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// What `trellis dev --share` points the resource configuration at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareTarget {
    pub host: ShareHost,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShareHost {
    Ip(std::net::IpAddr),
    Dns(String),
}

/// A control-plane URL: `https://HOST[:PORT][/PATH]`. The control plane only speaks HTTPS.
fn parse_url(s: &str) -> Result<Url, String> {
    let shown = trellis_model::clip_echo(s);
    let url = Url::parse(s).map_err(|e| format!("{shown:?} is not a URL ({e}); write e.g. https://127.0.0.1:8443"))?;
    match url.scheme() {
        "https" => {}
        "http" => {
            let mut https = url.clone();
            // Url refuses only scheme changes between special and non-special schemes; http → https is allowed.
            let _ = https.set_scheme("https");
            return Err(format!("the control plane speaks HTTPS; use {}", https.as_str().trim_end_matches('/')));
        }
        other => {
            return Err(format!(
                "URL scheme {:?} is not supported; the control plane speaks HTTPS, use https://",
                trellis_model::clip_echo(other)
            ));
        }
    }
    if url.host().is_none() {
        return Err(format!("{shown:?} has no host; write e.g. https://127.0.0.1:8443"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{shown:?} must not have a query or fragment"));
    }
    Ok(url)
}

fn parse_region(s: &str) -> Result<String, String> {
    trellis_model::validate_region(s).map(|()| s.to_string()).map_err(|e| e.to_string())
}

/// `IP:PORT` (or a bare IP, port 53) of a DNS resolver.
fn parse_resolver(s: &str) -> Result<SocketAddr, String> {
    let addr = match s.parse::<std::net::IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, 53),
        Err(_) => s.parse().map_err(|_| format!("{s:?} is not IP:PORT; write e.g. 10.0.0.2:53 or [fd00::53]:53"))?,
    };
    if addr.port() == 0 || addr.ip().is_unspecified() {
        return Err(format!("{s:?} cannot be a resolver address; write e.g. 10.0.0.2:53"));
    }
    Ok(addr)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 10s or 1m"))?;
    if d.is_zero() {
        return Err("the duration must be greater than zero".into());
    }
    Ok(d)
}

/// A network (`10.0.0.0/8`) or one address (`10.0.0.5`).
fn parse_network(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>().or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from)).map(|n| n.trunc()).map_err(|_| {
        format!("{:?} is not a network; write e.g. 10.0.0.0/8 or 192.168.1.5", trellis_model::clip_echo(s))
    })
}

/// `--advertise`: `host:port` with a non-empty host and a port in 1-65535; `[v6]:port` allowed.
fn parse_host_port(s: &str) -> Result<String, String> {
    check_host_port(s, "gw1.example.net:7443 or 10.0.0.5:7443")
}

/// `host:port` as [`parse_host_port`] takes it; the error shows `examples`.
fn check_host_port(s: &str, examples: &str) -> Result<String, String> {
    let shown = trellis_model::clip_echo(s);
    let err = || format!("{shown:?} is not HOST:PORT (e.g. {examples})");
    let (host, port) = s.rsplit_once(':').ok_or_else(err)?;
    let port: u16 = port.parse().map_err(|_| err())?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if port == 0 || host.is_empty() || host.contains(char::is_whitespace) {
        return Err(err());
    }
    if host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_err() {
        return Err(err());
    }
    Ok(s.to_string())
}

fn parse_share_target(s: &str) -> Result<ShareTarget, String> {
    check_host_port(s, "127.0.0.1:5432 for a local PostgreSQL, or localhost:6379 for a local Redis")?;
    // check_host_port checked the shape: a ':' and a port in 1-65535.
    let (host, port) = s.rsplit_once(':').ok_or("missing port")?;
    let port: u16 = port.parse().map_err(|_| "bad port".to_string())?;
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let host = match bare.parse() {
        Ok(ip) => ShareHost::Ip(ip),
        Err(_) => ShareHost::Dns(bare.to_string()),
    };
    Ok(ShareTarget { host, port })
}

fn parse_loopback(s: &str) -> Result<SocketAddr, String> {
    let shown = trellis_model::clip_echo(s);
    let addr: SocketAddr = s.parse().map_err(|e| format!("{shown:?} is not an address like 127.0.0.1:0 ({e})"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{shown:?} is not a loopback address; dev mode listens on 127.0.0.1 or ::1 only"));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::parse_args(std::iter::once("trellis").chain(args.iter().copied()))
    }

    const TOKEN: &str = "trellis1.jt-0123456789abcdef.\
        aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.\
        bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
        Cli::tidy_command().debug_assert();
    }

    #[test]
    fn top_level_help_mentions_every_noun() {
        let help = Cli::tidy_command().render_help().to_string();
        for noun in [
            "server",
            "agent",
            "dev",
            "version",
            "account",
            "organization",
            "vpc",
            "subnet",
            "agent-token",
            "resource-gateway",
            "resource-configuration",
            "resource-share",
            "invitation",
            "vpc-endpoint",
            "domain-verification",
        ] {
            assert!(help.contains(&format!("  {noun} ")), "`trellis --help` does not mention {noun}:\n{help}");
        }
    }

    #[test]
    fn server_parses_listen_data_dir_region_and_tls_names() {
        let cli = parse(&[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "/tmp/x",
            "--region",
            "eu-1",
            "--tls-name",
            "cp.example",
            "--tls-name",
            "10.0.0.1",
        ])
        .unwrap();
        let Command::Server(ServerCommand { verb: None, run: s }) = cli.command else { panic!("not server") };
        assert_eq!(s.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(s.data_dir, Some(PathBuf::from("/tmp/x")));
        assert_eq!(s.region, "eu-1");
        assert_eq!(s.tls_names, ["cp.example", "10.0.0.1"]);
    }

    #[test]
    fn server_takes_a_dns_resolver_for_domain_verification() {
        let resolver = |args: &[&str]| {
            let mut argv = vec!["server", "--data-dir", "/tmp/x"];
            argv.extend_from_slice(args);
            let Command::Server(s) = parse(&argv).unwrap().command else { panic!("not server") };
            s.run.dns_resolver
        };
        assert_eq!(resolver(&[]), None);
        assert_eq!(resolver(&["--dns-resolver", "127.0.0.1:5353"]), Some("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(resolver(&["--dns-resolver", "10.0.0.2"]), Some("10.0.0.2:53".parse().unwrap()));
        assert_eq!(resolver(&["--dns-resolver", "[fd00::53]:53"]), Some("[fd00::53]:53".parse().unwrap()));
        for bad in ["dns.example:53", "10.0.0.2:0", "0.0.0.0:53", "10.0.0.2:x"] {
            let err = parse(&["server", "--data-dir", "/tmp/x", "--dns-resolver", bad]).unwrap_err();
            assert!(err.to_string().contains("--dns-resolver"), "{bad}: {err}");
        }
    }

    #[test]
    fn server_takes_a_share_rate_of_at_least_one() {
        let rate = |args: &[&str]| {
            let mut argv = vec!["server", "--data-dir", "/tmp/x"];
            argv.extend_from_slice(args);
            parse(&argv).map(|cli| match cli.command {
                Command::Server(s) => s.run.shares_per_minute,
                _ => panic!("not server"),
            })
        };
        assert_eq!(rate(&[]).unwrap(), 30);
        assert_eq!(rate(&["--shares-per-minute", "100000"]).unwrap(), 100_000);
        for bad in ["0", "many", "4294967296"] {
            let err = rate(&["--shares-per-minute", bad]).unwrap_err();
            assert!(err.to_string().contains("--shares-per-minute"), "{bad}: {err}");
        }
    }

    #[test]
    fn server_rejects_a_bad_listen_address_and_region() {
        assert!(parse(&["server", "--listen", "nonsense", "--data-dir", "/tmp/x"]).is_err());
        assert!(parse(&["server", "--data-dir", "/tmp/x", "--region", "EU_1"]).is_err());
        assert!(parse(&["server", "--data-dir", "/tmp/x", "--region", "1eu"]).is_err());
        assert!(parse(&["server"]).is_err(), "--data-dir is required");
    }

    #[test]
    fn server_reset_admin_key_takes_only_the_data_dir() {
        let cli = parse(&["server", "reset-admin-key", "--data-dir", "/tmp/x"]).unwrap();
        let Command::Server(ServerCommand { verb: Some(ServerVerb::ResetAdminKey { data_dir }), .. }) = cli.command
        else {
            panic!("not reset-admin-key")
        };
        assert_eq!(data_dir, PathBuf::from("/tmp/x"));
        assert!(parse(&["server", "reset-admin-key"]).is_err(), "--data-dir is required");
        assert!(parse(&["server", "--listen", "127.0.0.1:1", "reset-admin-key", "--data-dir", "/x"]).is_err());
    }

    #[test]
    fn agent_run_parses_every_flag() {
        let cli = parse(&[
            "agent",
            "--control-plane",
            "https://127.0.0.1:8443",
            "--join-token",
            TOKEN,
            "--state-dir",
            "/tmp/a",
            "--tunnel-listen",
            "127.0.0.1:0",
            "--advertise",
            "gw.example:7443",
            "--dns-listen",
            "127.0.0.1:0",
            "--dns-upstream",
            "127.0.0.53:53",
            "--metrics-listen",
            "127.0.0.1:0",
            "--manage-routes",
            "--report-interval",
            "2s",
            "--dns-allow",
            "10.0.0.0/8,192.168.1.5",
            "--access-log",
            "/var/log/trellis/access.log",
        ])
        .unwrap();
        let Command::Agent(AgentCommand { verb: None, run }) = cli.command else { panic!("not agent run") };
        let cfg = run.validate().unwrap();
        assert_eq!(cfg.control_plane.as_str(), "https://127.0.0.1:8443/");
        assert_eq!(cfg.join_token.unwrap().token_id, "jt-0123456789abcdef");
        assert_eq!(cfg.tunnel_listen, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(cfg.advertise.as_deref(), Some("gw.example:7443"));
        assert!(cfg.manage_routes);
        assert_eq!(cfg.report_interval, Duration::from_secs(2));
        let allow: Vec<String> = cfg.dns_allow.unwrap().iter().map(ToString::to_string).collect();
        assert_eq!(allow, ["10.0.0.0/8", "192.168.1.5/32"]);
        assert_eq!(cfg.access_log.unwrap(), PathBuf::from("/var/log/trellis/access.log"));
    }

    #[test]
    fn only_an_agent_told_to_be_reachable_binds_a_tunnel_listener() {
        let base = ["agent", "--control-plane", "https://h:1", "--state-dir", "/tmp/a"];
        let run = |extra: &[&str]| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            let Command::Agent(AgentCommand { run, .. }) = parse(&args).unwrap().command else { panic!("not agent") };
            run.validate().unwrap()
        };
        let endpoint_only = run(&[]);
        assert_eq!(endpoint_only.tunnel_listen, None);
        assert_eq!(endpoint_only.access_log, None, "stdout by default");
        assert_eq!(endpoint_only.dns_allow, None);
        let advertised = run(&["--advertise", "gw1.example:7443"]);
        assert_eq!(advertised.tunnel_listen, Some("0.0.0.0:7443".parse().unwrap()));
        let explicit = run(&["--tunnel-listen", "10.0.0.5:9443"]);
        assert_eq!(explicit.tunnel_listen, Some("10.0.0.5:9443".parse().unwrap()));
        assert_eq!(run(&["--access-log", "-"]).access_log, None);
        assert!(parse(&[&base[..], &["--dns-allow", "not-a-net"]].concat()).is_err());
    }

    #[test]
    fn agents_and_relays_take_a_worker_thread_count_of_at_least_one() {
        let agent = ["agent", "--control-plane", "https://h:1", "--state-dir", "/tmp/a"];
        let relay =
            ["relay", "--control-plane", "https://h:1", "--state-dir", "/tmp/r", "--advertise", "r.example:7444"];
        let threads = |args: &[&str]| match parse(args).unwrap().command {
            Command::Agent(AgentCommand { run, .. }) => run.worker_threads,
            Command::Relay(RelayCommand { run }) => run.worker_threads,
            other => panic!("parsed as {other:?}"),
        };
        assert_eq!(threads(&agent), None, "one per CPU unless told");
        assert_eq!(threads(&[&agent[..], &["--worker-threads", "1"]].concat()), Some(1));
        assert_eq!(threads(&[&relay[..], &["--worker-threads", "4"]].concat()), Some(4));
        let err = parse(&[&agent[..], &["--worker-threads", "0"]].concat()).unwrap_err().to_string();
        assert!(err.contains("--worker-threads") && err.contains("1..=1024"), "{err}");
    }

    #[test]
    fn an_outbound_only_agent_binds_no_tunnel_listener_and_cannot_advertise_one() {
        let base = ["agent", "--control-plane", "https://h:1", "--state-dir", "/tmp/a", "--outbound-only"];
        let Command::Agent(AgentCommand { run, .. }) = parse(&base).unwrap().command else { panic!("not agent") };
        let cfg = run.validate().unwrap();
        assert!(cfg.outbound_only);
        assert_eq!(cfg.tunnel_listen, None);
        for extra in [["--advertise", "gw.example:7443"], ["--tunnel-listen", "0.0.0.0:7443"]] {
            let err = parse(&[&base[..], &extra[..]].concat()).unwrap_err();
            assert!(err.to_string().contains("cannot be used with"), "{err}");
        }
    }

    #[test]
    fn relay_run_parses_its_flags_and_needs_an_advertised_address() {
        let cli = parse(&[
            "relay",
            "--control-plane",
            "https://127.0.0.1:8443",
            "--join-token",
            TOKEN,
            "--state-dir",
            "/tmp/r",
            "--listen",
            "0.0.0.0:7444",
            "--advertise",
            "relay.example:7444",
            "--metrics-listen",
            "127.0.0.1:9100",
        ])
        .unwrap();
        let Command::Relay(RelayCommand { run }) = cli.command else { panic!("not relay") };
        assert_eq!(run.listen, "0.0.0.0:7444".parse().unwrap());
        assert_eq!(run.advertise.as_deref(), Some("relay.example:7444"));
        assert_eq!(run.join_token.unwrap().token_id, "jt-0123456789abcdef");
        let err = parse(&["relay", "--control-plane", "https://h:1", "--state-dir", "/tmp/r"]).unwrap_err();
        assert!(err.to_string().contains("--advertise"), "{err}");
    }

    #[test]
    fn agent_run_rejects_a_malformed_join_token_before_starting() {
        let err = parse(&["agent", "--control-plane", "https://h:1", "--join-token", "abc", "--state-dir", "/tmp/a"])
            .unwrap_err();
        assert!(err.to_string().contains("join token is malformed"), "{err}");
    }

    #[test]
    fn agent_run_requires_control_plane_and_state_dir_but_not_a_token() {
        let err = parse(&["agent", "--state-dir", "/tmp/a"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let err = parse(&["agent", "--control-plane", "https://h:1"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        // A restart reuses the identity in the state directory.
        let cli = parse(&["agent", "--control-plane", "https://h:1", "--state-dir", "/tmp/a"]).unwrap();
        let Command::Agent(AgentCommand { run, .. }) = cli.command else { panic!("not agent") };
        assert!(run.validate().unwrap().join_token.is_none());
    }

    #[test]
    fn agent_verbs_parse_without_run_flags() {
        for args in [&["agent", "list"][..], &["agent", "get", "agent-1"], &["agent", "delete", "agent-1"]] {
            let cli = parse(args).unwrap();
            assert!(matches!(cli.command, Command::Agent(AgentCommand { verb: Some(_), .. })), "{args:?}");
        }
    }

    #[test]
    fn bad_advertise_and_urls_are_rejected() {
        for bad in ["nohost", "host:0", ":80", "host:99999", "a:b:c"] {
            assert!(parse_host_port(bad).is_err(), "{bad}");
        }
        assert!(parse_host_port("[::1]:7443").is_ok());
        assert!(parse_url("ftp://x").is_err());
        assert!(parse_url("not a url").is_err());
        assert!(parse_url("https://127.0.0.1:8443").is_ok());
    }

    #[test]
    fn an_http_url_says_the_control_plane_speaks_https() {
        let expected = "the control plane speaks HTTPS; use https://127.0.0.1:8443";
        assert_eq!(parse_url("http://127.0.0.1:8443").unwrap_err(), expected);
        for args in [
            &["vpc", "list", "--url", "http://127.0.0.1:8443"][..],
            &["agent", "--control-plane", "http://127.0.0.1:8443", "--state-dir", "/tmp/a"],
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(expected), "{args:?}: {err}");
        }
    }

    #[test]
    fn a_bad_share_target_suggests_something_to_share() {
        let err = parse(&["dev", "--share", "nonsense"]).unwrap_err().to_string();
        assert!(err.contains("\"nonsense\" is not HOST:PORT (e.g. 127.0.0.1:5432 for a local PostgreSQL"), "{err}");
        assert!(!err.contains("7443"), "no tunnel addresses: {err}");
    }

    #[test]
    fn help_names_environment_variables_without_values_and_documents_global_options_once() {
        let mut cmd = Cli::tidy_command();
        let top = cmd.render_long_help().to_string();
        assert!(top.contains("[env: TRELLIS_URL]") && top.contains("[env: TRELLIS_OUTPUT]"), "{top}");
        assert!(top.contains("--ca-cert <FILE>"), "the global options are in `trellis --help`:\n{top}");
        for path in [&["vpc", "create"][..], &["resource-configuration", "create"], &["agent"], &["dev"]] {
            let mut sub = &mut cmd;
            for name in path {
                sub = sub.find_subcommand_mut(name).unwrap();
            }
            let help = sub.render_long_help().to_string();
            assert!(!help.contains("--ca-cert <FILE>"), "{path:?} repeats the global options:\n{help}");
            assert!(!help.contains("=]"), "{path:?} shows an empty env value:\n{help}");
            assert!(help.contains("see `trellis --help`"), "{path:?}:\n{help}");
        }
        // Set variables are not shown either.
        let agent = cmd.find_subcommand_mut("agent").unwrap().render_long_help().to_string();
        assert!(agent.contains("[env: TRELLIS_CONTROL_PLANE]"), "{agent}");
        assert!(agent.contains("Prefer the TRELLIS_JOIN_TOKEN environment variable"), "{agent}");
        // The hidden copies still parse, before or after the verb.
        let cli = parse(&["vpc", "list", "--url", "https://h:1", "-o", "json"]).unwrap();
        assert_eq!(cli.global.output, OutputFormat::Json);
        assert!(cli.global.url.is_some());
        let cli = parse(&["--output", "json", "agent", "list"]).unwrap();
        assert_eq!(cli.global.output, OutputFormat::Json);
    }

    #[test]
    fn dev_defaults_and_share_targets() {
        let cli = parse(&["dev"]).unwrap();
        let Command::Dev(d) = cli.command else { panic!("not dev") };
        assert!(d.listen.ip().is_loopback());
        assert_eq!(d.share, None);

        let Command::Dev(d) = parse(&["dev", "--share", "127.0.0.1:5432"]).unwrap().command else { panic!() };
        assert_eq!(d.share, Some(ShareTarget { host: ShareHost::Ip([127, 0, 0, 1].into()), port: 5432 }));
        let Command::Dev(d) = parse(&["dev", "--share", "db.local:6379"]).unwrap().command else { panic!() };
        assert_eq!(d.share, Some(ShareTarget { host: ShareHost::Dns("db.local".into()), port: 6379 }));

        assert!(parse(&["dev", "--listen", "0.0.0.0:0"]).is_err(), "dev mode stays on loopback");
    }

    #[test]
    fn global_flags_are_accepted_after_the_verb() {
        let cli =
            parse(&["vpc", "list", "--output", "json", "--url", "https://127.0.0.1:1", "--api-key", "k"]).unwrap();
        assert_eq!(cli.global.output, OutputFormat::Json);
        assert_eq!(cli.global.url.unwrap().as_str(), "https://127.0.0.1:1/");
        assert_eq!(format!("{:?}", cli.global.api_key.unwrap()), "***");
    }

    /// docs/cli.md is the CLI reference: it must name every command and flag.
    #[test]
    fn cli_reference_mentions_every_command_and_flag() {
        let doc = include_str!("../../../docs/cli.md");
        fn walk(cmd: &clap::Command, path: &str, doc: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if let Some(long) = arg.get_long()
                    && !["help", "version"].contains(&long)
                    && !doc.contains(&format!("`--{long}"))
                {
                    missing.push(format!("{path} --{long}"));
                }
            }
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                let name = sub.get_name();
                let mentioned = doc.contains(&format!("`{name}")) || doc.contains(&format!("trellis {name}"));
                if !mentioned {
                    missing.push(format!("{path} {name}"));
                }
                walk(sub, &format!("{path} {name}"), doc, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::tidy_command(), "trellis", doc, &mut missing);
        assert!(missing.is_empty(), "docs/cli.md does not mention: {missing:?}");
    }

    #[test]
    fn version_parses() {
        assert!(matches!(parse(&["version"]).unwrap().command, Command::Version));
    }
}
