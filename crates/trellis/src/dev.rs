//! `trellis dev`: a whole Trellis on loopback in one process, for a first look.
//!
//! It starts a control plane, then acts as three API users through the real
//! HTTP API: the admin creates an owner account (a customer that owns a
//! resource) and a consumer account (a SaaS provider that needs to reach it);
//! the owner enrolls a gateway agent, creates a resource gateway, a resource
//! configuration and a share; the consumer enrolls an endpoint agent, accepts
//! the invitation and creates a resource endpoint. When the endpoint is
//! Available it prints how to use it, then runs until Ctrl-C.
//!
//! Everything binds 127.0.0.0/8 only. Objects are created through the public
//! API alone, so every step can be repeated with the CLI.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::time::Instant;
use trellis_api::accounts::CreateAccount;
use trellis_api::agents::CreateAgentToken;
use trellis_api::configurations::{CreateConfiguration, DefinitionInput, DnsInput, IpInput};
use trellis_api::endpoints::CreateEndpoint;
use trellis_api::gateways::CreateGateway;
use trellis_api::services::{
    ConnectionIds, CreateService, HealthCheckInput, ModifyPermissions, PortInput, TargetInput,
};
use trellis_api::shares::CreateShare;
use trellis_api::subnets::CreateSubnet;
use trellis_api::vpcs::CreateVpc;
use trellis_api::{
    Route, accounts, agents, configurations, endpoints, gateways, invitations, services, shares, subnets, vpcs,
};

use crate::cli::{DevArgs, OutputFormat, ShareHost, ShareTarget};
use crate::client::{ApiClient, ApiRequest, CaSource};
use crate::demo_service::DemoService;
use crate::program::shell_quote;
use crate::run_agent::{AgentHandle, AgentRole};
use crate::run_server::ServerHandle;
use crate::secret::ApiKey;

const OWNER_ACCOUNT: &str = "acme-saas-customer";
const CONSUMER_ACCOUNT: &str = "acme-saas-provider";
const ZONE: &str = "z1";
const OWNER_POOL: &str = "127.77.1.0/24";
const CONSUMER_POOL: &str = "127.77.0.0/24";
const REGION: &str = "local";
/// How long one step (a gateway turning ACTIVE, an endpoint turning Available) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs dev mode until Ctrl-C or SIGTERM, then stops everything it started.
pub async fn run(args: DevArgs, output: OutputFormat) -> Result<()> {
    let data = DataDir::prepare(args.data_dir.clone())?;
    let mut parts = Parts::default();
    let result = tokio::select! {
        result = set_up(&args, data.path(), &mut parts) => match result {
            Ok(summary) => {
                print_summary(&summary, output);
                parts.run_until_stopped().await
            }
            Err(e) => Err(e),
        },
        () = crate::shutdown::signal() => Ok(()),
    };
    if output == OutputFormat::Table {
        eprintln!("Stopping… (Ctrl-C again to exit at once)");
    }
    crate::shutdown::gracefully("dev system", parts.stop()).await;
    result
}

/// Everything dev mode started, stopped in reverse order.
#[derive(Default)]
struct Parts {
    demo: Option<DemoService>,
    /// The two targets of the demo endpoint service.
    service_targets: Vec<DemoService>,
    server: Option<ServerHandle>,
    agents: Vec<AgentHandle>,
}

impl Parts {
    /// Waits for Ctrl-C, or fails as soon as an agent stops on its own.
    async fn run_until_stopped(&self) -> Result<()> {
        let agent_stopped = async {
            if self.agents.is_empty() {
                return std::future::pending().await;
            }
            let (result, _, _) =
                futures_util::future::select_all(self.agents.iter().map(|a| Box::pin(a.stopped()))).await;
            result.and_then(|()| Err(anyhow!("an agent stopped")))
        };
        tokio::select! {
            () = crate::shutdown::signal() => Ok(()),
            result = agent_stopped => result,
        }
    }

    async fn stop(&mut self) {
        for agent in self.agents.drain(..) {
            agent.shutdown().await;
        }
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        if let Some(demo) = self.demo.take() {
            demo.stop().await;
        }
        for target in self.service_targets.drain(..) {
            target.stop().await;
        }
    }
}

/// The data directory: the one given (must be empty), or a temporary one removed on exit.
struct DataDir {
    path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl DataDir {
    fn prepare(given: Option<PathBuf>) -> Result<Self> {
        let Some(path) = given else {
            let temp =
                tempfile::Builder::new().prefix("trellis-dev-").tempdir().context("creating a temporary directory")?;
            return Ok(Self { path: temp.path().to_path_buf(), _temp: Some(temp) });
        };
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let not_empty =
            std::fs::read_dir(&path).with_context(|| format!("reading {}", path.display()))?.next().is_some();
        if not_empty {
            bail!(
                "{} is not empty: trellis dev sets up a fresh system on every run; pass a new directory, or omit --data-dir for a temporary one",
                path.display()
            );
        }
        Ok(Self { path, _temp: None })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// What dev mode prints once everything is up.
#[derive(Debug)]
struct Summary {
    url: String,
    ca_file: PathBuf,
    ca_sha256: String,
    data_dir: PathBuf,
    admin_key_file: PathBuf,
    owner: Account,
    consumer: Account,
    target: ShareTarget,
    demo: bool,
    resource_configuration_id: String,
    endpoint_id: String,
    endpoint_addr: SocketAddr,
    dns_name: String,
    dns_listen: Option<SocketAddr>,
    agents: Vec<(AgentRole, String)>,
    service: ServiceDemo,
}

/// The demo endpoint service and the consumer's Interface endpoint to it.
#[derive(Debug)]
struct ServiceDemo {
    service_id: String,
    endpoint_id: String,
    endpoint_addr: SocketAddr,
    dns_name: String,
    targets: Vec<SocketAddr>,
}

#[derive(Debug, Clone)]
struct Account {
    name: &'static str,
    id: String,
    key_file: PathBuf,
}

async fn set_up(args: &DevArgs, dir: &Path, parts: &mut Parts) -> Result<Summary> {
    let target = match &args.share {
        Some(share) => share.clone(),
        None => {
            let demo = DemoService::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                .await
                .context("starting the built-in demo service on 127.0.0.1")?;
            let addr = demo.local_addr();
            parts.demo = Some(demo);
            ShareTarget { host: ShareHost::Ip(addr.ip()), port: addr.port() }
        }
    };

    let server = crate::run_server::start_for_dev(args.listen, dir.join("control"), REGION)
        .await
        .context("starting the control plane")?;
    let url = format!("https://{}", server.local_addr());
    let ca_pem = server.ca_pem().to_string();
    let ca_sha256 = server.ca_sha256().to_string();
    let ca_file = server.ca_file();
    let admin_key_file = server.admin_key_file();
    let admin_key = server.admin_key()?;
    parts.server = Some(server);

    let admin = ApiClient::new(url.parse()?, Some(admin_key), &CaSource::Pem(ca_pem.into_bytes()))?;
    let (owner, owner_api) = create_account(&admin, OWNER_ACCOUNT, dir).await?;
    let (consumer, consumer_api) = create_account(&admin, CONSUMER_ACCOUNT, dir).await?;

    // Owner side: a VPC whose agent is the resource gateway.
    let owner_vpc = create_vpc(&owner_api, "customer-vpc").await?;
    let owner_subnet = create_subnet(&owner_api, &owner_vpc, OWNER_POOL).await?;
    // Consumer side: a VPC whose agent serves the endpoint.
    let consumer_vpc = create_vpc(&consumer_api, "provider-vpc").await?;
    let consumer_subnet = create_subnet(&consumer_api, &consumer_vpc, CONSUMER_POOL).await?;

    let owner_token = join_token(&owner_api, &owner_subnet).await?;
    let consumer_token = join_token(&consumer_api, &consumer_subnet).await?;
    let gateway_agent = crate::run_agent::start_for_dev(AgentRole::Gateway, &url, &owner_token, dir).await?;
    let endpoint_agent = crate::run_agent::start_for_dev(AgentRole::Endpoint, &url, &consumer_token, dir).await?;
    let dns_listen = endpoint_agent.dns_addr();
    let agents = vec![(AgentRole::Gateway, gateway_agent.summary()), (AgentRole::Endpoint, endpoint_agent.summary())];
    parts.agents.push(gateway_agent);
    parts.agents.push(endpoint_agent);

    // The owner shares the resource.
    let gateway = CreateGateway {
        name: "customer-gateway".into(),
        vpc_identifier: owner_vpc.clone(),
        subnet_ids: vec![owner_subnet.clone()],
        ..Default::default()
    };
    let gateway = call(&owner_api, ApiRequest::send(&gateways::CREATE, &gateway)).await?;
    let gateway_id = id_of(&gateway)?;
    wait_for_status(&owner_api, &gateways::GET, &gateway_id, "status", "ACTIVE").await?;

    let definition = match &target.host {
        ShareHost::Ip(ip) => {
            DefinitionInput { ip_resource: Some(IpInput { ip_address: ip.to_string() }), ..Default::default() }
        }
        ShareHost::Dns(name) => DefinitionInput {
            dns_resource: Some(DnsInput { domain_name: name.clone(), ip_address_type: None }),
            ..Default::default()
        },
    };
    let rcfg_name = if args.share.is_some() { "shared-service" } else { "demo-service" };
    let rcfg = CreateConfiguration {
        name: rcfg_name.into(),
        config_type: "SINGLE".into(),
        resource_gateway_identifier: Some(gateway_id),
        resource_configuration_definition: Some(definition),
        port_ranges: Some(vec![target.port.to_string()]),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let rcfg = call(&owner_api, ApiRequest::send(&configurations::CREATE, &rcfg)).await?;
    let rcfg_id = id_of(&rcfg)?;
    let rcfg_arn = str_field(&rcfg, "arn")?;
    wait_for_status(&owner_api, &configurations::GET, &rcfg_id, "status", "ACTIVE").await?;

    let share = CreateShare {
        name: "customer-share".into(),
        resource_arns: vec![rcfg_arn.clone()],
        principals: vec![consumer.id.clone()],
        client_token: None,
    };
    let share = call(&owner_api, ApiRequest::send(&shares::CREATE, &share)).await?;
    let share_arn = share
        .get("resourceShareArn")
        .or_else(|| share.get("arn"))
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("the resource share has no resourceShareArn: {share}"))?
        .to_string();

    // The consumer accepts and creates its endpoint.
    accept_invitation(&consumer_api, &share_arn).await?;
    let endpoint = CreateEndpoint {
        vpc_endpoint_type: "Resource".into(),
        vpc_id: consumer_vpc.clone(),
        subnet_ids: vec![consumer_subnet.clone()],
        resource_configuration_arn: Some(rcfg_arn),
        ..Default::default()
    };
    let endpoint = call(&consumer_api, ApiRequest::send(&endpoints::CREATE, &endpoint)).await?;
    let endpoint_id = id_of(&endpoint)?;
    let endpoint = wait_for_status(&consumer_api, &endpoints::GET, &endpoint_id, "state", "Available").await?;
    let (dns_name, ip) = dns_entry(&endpoint)?;

    let provider = (&owner_api, owner_vpc.as_str(), owner_subnet.as_str());
    let customer = (&consumer_api, consumer.id.as_str(), consumer_vpc.as_str(), consumer_subnet.as_str());
    let service = publish_demo_service(parts, provider, customer).await?;

    Ok(Summary {
        url,
        ca_file,
        ca_sha256,
        data_dir: dir.to_path_buf(),
        admin_key_file,
        owner,
        consumer,
        demo: args.share.is_none(),
        endpoint_addr: SocketAddr::new(ip, target.port),
        target,
        resource_configuration_id: rcfg_id,
        endpoint_id,
        dns_name,
        dns_listen,
        agents,
        service,
    })
}

/// Two demo targets on one port, at 127.0.0.1 and 127.0.0.2 (retrying when
/// the second address has the port taken).
async fn two_demo_targets() -> Result<Vec<DemoService>> {
    let mut last_error = None;
    for _ in 0..20 {
        let first = DemoService::start_named(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), "target 1")
            .await
            .context("starting a demo service target on 127.0.0.1")?;
        let port = first.local_addr().port();
        match DemoService::start_named(SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), port)), "target 2").await {
            Ok(second) => return Ok(vec![first, second]),
            Err(e) => {
                last_error = Some(e);
                first.stop().await;
            }
        }
    }
    Err(anyhow!("no port free on both 127.0.0.1 and 127.0.0.2 for the demo service's targets: {last_error:?}"))
}

/// The provider → customer direction: the owner publishes an endpoint service
/// with two targets, allows the consumer, which connects with an Interface
/// endpoint; the owner accepts it (acceptance is required, as on AWS).
async fn publish_demo_service(
    parts: &mut Parts,
    (owner_api, owner_vpc, owner_subnet): (&ApiClient, &str, &str),
    (consumer_api, consumer_id, consumer_vpc, consumer_subnet): (&ApiClient, &str, &str, &str),
) -> Result<ServiceDemo> {
    let targets = two_demo_targets().await?;
    let addrs: Vec<SocketAddr> = targets.iter().map(DemoService::local_addr).collect();
    parts.service_targets.extend(targets);
    let port = addrs[0].port();
    let service = CreateService {
        name: "demo-endpoint-service".into(),
        vpc_id: owner_vpc.into(),
        subnet_ids: vec![owner_subnet.into()],
        targets: addrs
            .iter()
            .map(|a| TargetInput { ip_address: Some(a.ip().to_string()), domain_name: None })
            .collect(),
        ports: vec![PortInput { port: u32::from(port), target_port: None }],
        health_check: Some(HealthCheckInput {
            interval_seconds: Some(5),
            timeout_seconds: Some(2),
            healthy_threshold_count: Some(2),
            ..Default::default()
        }),
        ..Default::default()
    };
    let service = call(owner_api, ApiRequest::send(&services::CREATE, &service)).await?;
    let service_id = id_of(&service)?;
    let allow = ModifyPermissions { add_allowed_principals: vec![consumer_id.into()], ..Default::default() };
    call(owner_api, ApiRequest::send_to(&services::MODIFY_PERMISSIONS, &service_id, &allow)).await?;
    let endpoint = CreateEndpoint {
        vpc_endpoint_type: "Interface".into(),
        vpc_id: consumer_vpc.into(),
        subnet_ids: vec![consumer_subnet.into()],
        service_name: Some(str_field(&service, "serviceName")?),
        ..Default::default()
    };
    let endpoint = call(consumer_api, ApiRequest::send(&endpoints::CREATE, &endpoint)).await?;
    let endpoint_id = id_of(&endpoint)?;
    let accept = ConnectionIds { vpc_endpoint_ids: vec![endpoint_id.clone()] };
    call(owner_api, ApiRequest::send_to(&services::ACCEPT, &service_id, &accept)).await?;
    let endpoint = wait_for_status(consumer_api, &endpoints::GET, &endpoint_id, "state", "Available").await?;
    let (dns_name, ip) = dns_entry(&endpoint)?;
    Ok(ServiceDemo { service_id, endpoint_id, endpoint_addr: SocketAddr::new(ip, port), dns_name, targets: addrs })
}

async fn call(api: &ApiClient, req: ApiRequest) -> Result<Value> {
    api.call(&req).await.with_context(|| format!("{} {}", req.method, req.path))
}

fn str_field(value: &Value, key: &str) -> Result<String> {
    value
        .get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("the control plane's answer has no {key:?}: {value}"))
}

fn id_of(value: &Value) -> Result<String> {
    str_field(value, "id")
}

/// Creates an account as admin and stores its API key in `DIR/<name>.key` (mode 0600).
async fn create_account(admin: &ApiClient, name: &'static str, dir: &Path) -> Result<(Account, ApiClient)> {
    let account =
        call(admin, ApiRequest::send(&accounts::CREATE, &CreateAccount { name: name.into(), ..Default::default() }))
            .await?;
    let id = account
        .get("accountId")
        .or_else(|| account.get("id"))
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("the new account has no id: {account}"))?
        .to_string();
    let key = str_field(&account, "apiKey")?;
    let key_file = dir.join(format!("{name}.key"));
    write_secret(&key_file, &key)?;
    let key: ApiKey = key.parse().map_err(|e: String| anyhow!("the new account's API key: {e}"))?;
    Ok((Account { name, id, key_file }, admin.with_api_key(key)))
}

fn write_secret(path: &Path, secret: &str) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut file, format!("{secret}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

async fn create_vpc(api: &ApiClient, name: &str) -> Result<String> {
    id_of(&call(api, ApiRequest::send(&vpcs::CREATE, &CreateVpc { name: name.into(), client_token: None })).await?)
}

async fn create_subnet(api: &ApiClient, vpc: &str, pool: &str) -> Result<String> {
    let subnet =
        CreateSubnet { vpc_id: vpc.into(), zone: ZONE.into(), cidr_block: pool.into(), name: None, client_token: None };
    id_of(&call(api, ApiRequest::send(&subnets::CREATE, &subnet)).await?)
}

async fn join_token(api: &ApiClient, subnet: &str) -> Result<String> {
    let token = CreateAgentToken { subnet_id: subnet.into(), expires_in_seconds: None };
    str_field(&call(api, ApiRequest::send(&agents::CREATE_TOKEN, &token)).await?, "token")
}

/// Polls `route` (a read) for `id` until `field` is `want`; fails at once on a failed state.
async fn wait_for_status<R>(
    api: &ApiClient,
    route: &Route<(), (), R>,
    id: &str,
    field: &str,
    want: &str,
) -> Result<Value> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut delay = Duration::from_millis(50);
    loop {
        let object = call(api, ApiRequest::at(route, id)).await?;
        let state = object.get(field).and_then(Value::as_str).unwrap_or_default();
        if state == want {
            return Ok(object);
        }
        if state.ends_with("FAILED") || state == "Failed" || state == "Rejected" {
            let reason = object.get("failureReason").and_then(Value::as_str).unwrap_or("no reason given");
            bail!("{id} is {state}: {reason}");
        }
        if Instant::now() >= deadline {
            bail!("{id} is still {state:?} after {}s; expected {want}", STEP_TIMEOUT.as_secs());
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// Accepts the consumer's pending invitation to `share_arn`. Inside one
/// organization shares need no invitation; dev accounts are in none, so one must come.
async fn accept_invitation(api: &ApiClient, share_arn: &str) -> Result<()> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let list = call(api, ApiRequest::list(&invitations::LIST, &Default::default())).await?;
        let items = list.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
        let invitation = items.iter().find(|i| i.get("resourceShareArn").and_then(Value::as_str) == Some(share_arn));
        if let Some(invitation) = invitation {
            let id = id_of(invitation)?;
            if invitation.get("status").and_then(Value::as_str) == Some("PENDING") {
                call(api, ApiRequest::at(&invitations::ACCEPT, &id)).await?;
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("no invitation to {share_arn} reached the consumer within {}s", STEP_TIMEOUT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn dns_entry(endpoint: &Value) -> Result<(String, std::net::IpAddr)> {
    let entry = endpoint
        .get("dnsEntries")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
        .ok_or_else(|| anyhow!("the endpoint has no dnsEntries: {endpoint}"))?;
    let name = str_field(entry, "dnsName")?;
    let ip = entry
        .get("ipAddresses")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("the endpoint's DNS entry has no ipAddresses: {entry}"))?
        .parse()
        .context("the endpoint's address is not an IP address")?;
    Ok((name, ip))
}

/// Commands that exercise the endpoint, chosen by the shared port; two where
/// the first tool may be missing (`nc` is not installed everywhere).
fn try_commands(addr: &SocketAddr, demo: bool) -> Vec<String> {
    let (ip, port) = (addr.ip(), addr.port());
    match (demo, port) {
        (true, _) => vec![format!("curl http://{addr}/"), format!("echo hi | nc -q 1 {ip} {port}")],
        (false, 5432) => vec![format!("psql -h {ip} -p {port} -U postgres")],
        (false, 6379) => vec![format!("redis-cli -h {ip} -p {port} ping")],
        (false, 3306) => vec![format!("mysql -h {ip} -P {port} -u root -p")],
        (false, 80 | 8080 | 8000 | 3000) => vec![format!("curl http://{addr}/")],
        (false, 443 | 8443) => vec![format!("curl -k https://{addr}/")],
        (false, _) => vec![format!("nc {ip} {port}"), format!("curl telnet://{addr}")],
    }
}

fn exports(s: &Summary, key_file: &Path) -> String {
    format!(
        "export TRELLIS_URL={} TRELLIS_CA_CERT={} TRELLIS_API_KEY=$(cat {})",
        s.url,
        shell_quote(&s.ca_file),
        shell_quote(key_file)
    )
}

fn print_summary(s: &Summary, output: OutputFormat) {
    let text = summary_text(s, output, &crate::program::command_name());
    let mut stdout = std::io::stdout().lock();
    // Nothing useful to do when stdout is gone; dev keeps running until Ctrl-C.
    let _ = std::io::Write::write_all(&mut stdout, text.as_bytes()).and_then(|()| std::io::Write::flush(&mut stdout));
}

/// What dev prints once everything is up. `program` names this binary in the
/// printed commands, so that they run as printed.
fn summary_text(s: &Summary, output: OutputFormat, program: &str) -> String {
    if output == OutputFormat::Json {
        let summary = json!({
            "url": s.url,
            "caCert": s.ca_file,
            "caSha256": s.ca_sha256,
            "dataDir": s.data_dir,
            "adminKeyFile": s.admin_key_file,
            "owner": {"name": s.owner.name, "accountId": s.owner.id, "apiKeyFile": s.owner.key_file},
            "consumer": {"name": s.consumer.name, "accountId": s.consumer.id, "apiKeyFile": s.consumer.key_file},
            "resourceConfigurationId": s.resource_configuration_id,
            "vpcEndpointId": s.endpoint_id,
            "endpointAddress": s.endpoint_addr.to_string(),
            "dnsName": s.dns_name,
            "dnsListen": s.dns_listen.map(|a| a.to_string()),
            "target": target_text(&s.target),
            "demo": s.demo,
            "endpointService": {
                "serviceId": s.service.service_id,
                "vpcEndpointId": s.service.endpoint_id,
                "endpointAddress": s.service.endpoint_addr.to_string(),
                "dnsName": s.service.dns_name,
                "targets": s.service.targets.iter().map(ToString::to_string).collect::<Vec<_>>(),
            },
            "program": program,
        });
        return format!("{summary}\n");
    }
    let shared = if s.demo {
        format!("the built-in demo service at {}", target_text(&s.target))
    } else {
        target_text(&s.target)
    };
    let mut out = String::new();
    out.push_str("Trellis dev is running. Press Ctrl-C to stop.\n\n");
    out.push_str(&format!("  control plane   {}  (CA sha256 {})\n", s.url, s.ca_sha256));
    for (role, text) in &s.agents {
        out.push_str(&format!("  {:<15} {text}\n", format!("{role} agent")));
    }
    out.push_str(&format!("  data directory  {}\n\n", s.data_dir.display()));
    out.push_str(&format!(
        "{} ({}) shares {shared}\nwith {} ({}), which reaches it through endpoint {}:\n\n",
        s.owner.name, s.owner.id, s.consumer.name, s.consumer.id, s.endpoint_id
    ));
    out.push_str(&format!("  address    {}\n", s.endpoint_addr));
    out.push_str(&format!("  DNS name   {}\n", s.dns_name));
    if let Some(dns) = s.dns_listen {
        out.push_str(&format!("  DNS server {dns}   (dig @{} -p {} {})\n", dns.ip(), dns.port(), s.dns_name));
    }
    let commands = try_commands(&s.endpoint_addr, s.demo);
    out.push_str(if commands.len() > 1 { "\nTry it (either line, with the tool you have):\n" } else { "\nTry it:\n" });
    for command in commands {
        out.push_str(&format!("  {command}\n"));
    }
    let svc = &s.service;
    out.push_str(&format!(
        "\n{} also publishes endpoint service {} with two targets ({}); {} connected with\n\
         Interface endpoint {}, which {} accepted. Each request goes to the next healthy target:\n\n",
        s.owner.name,
        svc.service_id,
        svc.targets.iter().map(ToString::to_string).collect::<Vec<_>>().join(" and "),
        s.consumer.name,
        svc.endpoint_id,
        s.owner.name
    ));
    out.push_str(&format!("  address    {}\n  DNS name   {}\n", svc.endpoint_addr, svc.dns_name));
    out.push_str(&format!("\nTry it:\n  for i in 1 2 3 4; do curl -s http://{}/; done\n", svc.endpoint_addr));
    out.push_str(&format!(
        "\nUse the CLI as the consumer ({}):\n  {}\n  {program} invitation list\n  {program} vpc-endpoint list\n",
        s.consumer.name,
        exports(s, &s.consumer.key_file)
    ));
    out.push_str(&format!(
        "\nAs the owner ({}):\n  {}\n  {program} resource-configuration usage {}\n  \
         {program} endpoint-service get {}        (targets' health)\n  {program} endpoint-service connections {}\n",
        s.owner.name,
        exports(s, &s.owner.key_file),
        s.resource_configuration_id,
        s.service.service_id,
        s.service.service_id
    ));
    out.push_str(&format!("\nAs the admin:\n  {}\n  {program} account list\n", exports(s, &s.admin_key_file)));
    out.push_str(
        "\nThese API keys belong to this throwaway local demo, so dev points at them freely;\n\
         `trellis server` never prints its admin key, only where its file is.\n",
    );
    out
}

fn target_text(t: &ShareTarget) -> String {
    match &t.host {
        ShareHost::Ip(ip) => SocketAddr::new(*ip, t.port).to_string(),
        ShareHost::Dns(name) => format!("{name}:{}", t.port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole dev flow against the real control plane and agents: the demo
    /// service answers through the consumer's endpoint address.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dev_mode_serves_the_demo_service_through_an_endpoint() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let dir = tempfile::tempdir().unwrap();
        let args = DevArgs { listen: "127.0.0.1:0".parse().unwrap(), share: None, data_dir: None };
        let mut parts = Parts::default();
        let result = async {
            let summary = set_up(&args, dir.path(), &mut parts).await?;

            let mut conn = tokio::net::TcpStream::connect(summary.endpoint_addr).await?;
            conn.write_all(b"ping\n").await?;
            conn.shutdown().await?;
            let mut answer = String::new();
            tokio::time::timeout(Duration::from_secs(20), conn.read_to_string(&mut answer)).await??;
            assert_eq!(answer, format!("{}ping\n", crate::demo_service::GREETING));

            // The consumer's CLI resolves a configuration id to its ARN.
            let key: ApiKey =
                std::fs::read_to_string(&summary.consumer.key_file)?.parse().map_err(anyhow::Error::msg)?;
            let consumer = ApiClient::new(summary.url.parse()?, Some(key), &CaSource::File(summary.ca_file.clone()))?;
            let mut verb = crate::nouns::VpcEndpointVerb::Create {
                vpc_id: "vpc-x".into(),
                subnet_ids: vec!["subnet-x".into()],
                target: crate::nouns::EndpointTargetArgs {
                    resource_configuration: Some(summary.resource_configuration_id.clone()),
                    service_name: None,
                },
                private_dns_enabled: false,
                create: Default::default(),
            };
            crate::api_cmd::resolve_identifiers(&consumer, &mut verb).await?;
            let crate::nouns::VpcEndpointVerb::Create {
                target: crate::nouns::EndpointTargetArgs { resource_configuration: Some(resource_configuration), .. },
                ..
            } = &verb
            else {
                unreachable!()
            };
            assert!(resource_configuration.starts_with("arn:"), "{resource_configuration}");
            assert!(resource_configuration.ends_with(&summary.resource_configuration_id), "{resource_configuration}");

            // The printed curl line works: the demo answers HTTP through the endpoint too.
            let text = summary_text(&summary, OutputFormat::Table, "/opt/bin/trellis");
            assert!(text.contains(&format!("curl http://{}/", summary.endpoint_addr)), "{text}");
            let mut conn = tokio::net::TcpStream::connect(summary.endpoint_addr).await?;
            conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
            let mut answer = String::new();
            tokio::time::timeout(Duration::from_secs(20), conn.read_to_string(&mut answer)).await??;
            assert!(
                answer.starts_with("HTTP/1.1 200 OK") && answer.contains(crate::demo_service::GREETING),
                "{answer}"
            );
            assert!(
                text.contains(&format!(
                    "echo hi | nc -q 1 {} {}",
                    summary.endpoint_addr.ip(),
                    summary.endpoint_addr.port()
                )),
                "{text}"
            );
            assert!(
                text.contains(&format!("TRELLIS_API_KEY=$(cat {})", summary.consumer.key_file.display())),
                "{text}"
            );
            assert!(text.contains("\n  /opt/bin/trellis vpc-endpoint list\n"), "commands run as printed: {text}");
            assert!(!text.lines().any(|l| l.trim_start().starts_with("trellis ")), "{text}");
            let json: Value = serde_json::from_str(&summary_text(&summary, OutputFormat::Json, "trellis"))?;
            assert_eq!(json["endpointAddress"], summary.endpoint_addr.to_string());
            assert_eq!(json["dnsName"], summary.dns_name);

            // The demo endpoint service: requests through its Interface endpoint reach both targets.
            let svc = &summary.service;
            assert!(text.contains(&format!("curl -s http://{}/", svc.endpoint_addr)), "{text}");
            assert_eq!(json["endpointService"]["serviceId"], svc.service_id);
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..6 {
                let mut conn = tokio::net::TcpStream::connect(svc.endpoint_addr).await?;
                conn.write_all(b"hi\n").await?;
                conn.shutdown().await?;
                let mut answer = String::new();
                tokio::time::timeout(Duration::from_secs(20), conn.read_to_string(&mut answer)).await??;
                seen.insert(answer);
            }
            let both: std::collections::BTreeSet<String> =
                ["target 1", "target 2"].map(|t| format!("{}hi\n", crate::demo_service::greeting_of(t))).into();
            assert_eq!(seen, both, "the load balancer spreads requests over both targets");
            anyhow::Ok(())
        }
        .await;
        tokio::time::timeout(Duration::from_secs(30), parts.stop()).await.expect("dev mode stops within 30s");
        result.unwrap();
    }

    #[test]
    fn try_commands_fit_the_shared_port_and_never_rely_on_nc_alone() {
        let addr: SocketAddr = "127.77.0.4:5432".parse().unwrap();
        assert_eq!(try_commands(&addr, false), ["psql -h 127.77.0.4 -p 5432 -U postgres"]);
        assert_eq!(try_commands(&addr, true), ["curl http://127.77.0.4:5432/", "echo hi | nc -q 1 127.77.0.4 5432"]);
        assert_eq!(
            try_commands(&"127.77.0.4:9999".parse().unwrap(), false),
            ["nc 127.77.0.4 9999", "curl telnet://127.77.0.4:9999"]
        );
    }

    #[test]
    fn a_non_empty_data_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x"), "").unwrap();
        let err = DataDir::prepare(Some(dir.path().to_path_buf())).err().unwrap();
        assert!(err.to_string().contains("is not empty"), "{err}");
        let fresh = dir.path().join("new");
        assert_eq!(DataDir::prepare(Some(fresh.clone())).unwrap().path(), fresh);
    }

    #[test]
    fn secrets_are_written_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        write_secret(&path, "s3cret").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "s3cret\n");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert!(write_secret(&path, "again").is_err(), "an existing key file is never overwritten");
    }
}
