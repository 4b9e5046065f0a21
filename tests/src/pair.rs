//! The usual cast of a loopback suite, set up through the API: a control
//! plane; an owner account with a VPC, a subnet, an ONLINE agent and an ACTIVE
//! resource gateway; a consumer account with a VPC, a subnet whose endpoint
//! pool is a random /24 of 127.0.0.0/8, and an ONLINE agent. Suites add the
//! resource configurations, shares and endpoints they are about.

use std::net::{IpAddr, Ipv4Addr};

use serde_json::Value;

use crate::agent::{Agent, AgentOptions};
use crate::control::ControlPlane;
use crate::flow::{Tenant, share_arn};
use crate::net::loopback_pool;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Extra arguments for the two agents.
#[derive(Clone, Debug, Default)]
pub struct PairOptions {
    pub owner_agent_args: Vec<String>,
    pub consumer_agent_args: Vec<String>,
    /// Start the consumer's agent without a tunnel listener (endpoint role only).
    pub consumer_endpoint_only: bool,
    /// Extra arguments for `trellis server` (e.g. `--dns-resolver`).
    pub server_args: Vec<String>,
}

/// An owner and a consumer on loopback, ready to share.
pub struct LoopbackPair {
    // agents first: they stop before the control plane does
    pub owner_agent: Agent,
    pub consumer_agent: Agent,
    pub cp: ControlPlane,
    pub owner: Tenant,
    pub owner_vpc: String,
    pub owner_subnet: String,
    pub gateway_id: String,
    pub consumer: Tenant,
    pub consumer_vpc: String,
    pub consumer_subnet: String,
    /// The consumer subnet's endpoint address pool (CIDR).
    pub consumer_pool: String,
}

fn start_agent(cp: &ControlPlane, name: &str, token: &str, extra_args: Vec<String>, tunnel: bool) -> Agent {
    let opts = AgentOptions {
        name,
        control_plane_url: &cp.url,
        join_token: token,
        bind_ip: LOCALHOST,
        netns: None,
        extra_args,
    };
    if tunnel { Agent::start(opts) } else { Agent::start_endpoint_only(opts) }
}

impl LoopbackPair {
    pub fn start() -> LoopbackPair {
        LoopbackPair::start_with(PairOptions::default())
    }

    pub fn start_with(opts: PairOptions) -> LoopbackPair {
        let server_args: Vec<&str> = opts.server_args.iter().map(String::as_str).collect();
        let cp = ControlPlane::start_with_args(LOCALHOST, &server_args);
        let owner = Tenant::create(&cp, "owner-co");
        let consumer = Tenant::create(&cp, "consumer-co");

        let owner_vpc = owner.create_vpc("owner-prod");
        let (owner_pool, _) = loopback_pool();
        let owner_subnet = owner.create_subnet(&owner_vpc, "z1", &owner_pool);
        let owner_agent =
            start_agent(&cp, "owner-agent", &owner.join_token(&owner_subnet), opts.owner_agent_args, true);
        owner.wait_agent_online(&owner_subnet);
        let gateway = owner.create_gateway("owner-gw", &owner_vpc, &[&owner_subnet]);
        let gateway_id = gateway["id"].as_str().unwrap_or_else(|| panic!("no gateway id in {gateway}")).to_string();

        let consumer_vpc = consumer.create_vpc("consumer-app");
        let (consumer_pool, _) = loopback_pool();
        let consumer_subnet = consumer.create_subnet(&consumer_vpc, "z1", &consumer_pool);
        let consumer_agent = start_agent(
            &cp,
            "consumer-agent",
            &consumer.join_token(&consumer_subnet),
            opts.consumer_agent_args,
            !opts.consumer_endpoint_only,
        );
        consumer.wait_agent_online(&consumer_subnet);

        LoopbackPair {
            owner_agent,
            consumer_agent,
            cp,
            owner,
            owner_vpc,
            owner_subnet,
            gateway_id,
            consumer,
            consumer_vpc,
            consumer_subnet,
            consumer_pool,
        }
    }

    /// The owner shares `config_arn` with the consumer, which accepts the
    /// invitation; returns the share.
    pub fn share(&self, name: &str, config_arn: &str) -> Value {
        let share = self.owner.share(name, &[config_arn], &[self.consumer.id()]);
        self.consumer.accept_invitation(&share_arn(&share));
        share
    }

    /// The consumer's `Resource` endpoint for `config_arn` in its subnet,
    /// once `Available`.
    pub fn create_endpoint(&self, config_arn: &str) -> Value {
        self.consumer.create_endpoint(&self.consumer_vpc, &[&self.consumer_subnet], config_arn)
    }

    /// Whether `ip` lies in the consumer's endpoint pool.
    pub fn in_consumer_pool(&self, ip: &str) -> bool {
        let prefix = self.consumer_pool.trim_end_matches("0/24");
        ip.starts_with(prefix)
    }
}
