//! The owner → consumer flow of DESIGN §7 as API calls, one helper per step,
//! so suites read as the story they test.

use std::time::Duration;

use serde_json::{Value, json};

use crate::api::Api;
use crate::control::{Account, ControlPlane};
use crate::wait::wait_until;

/// How long a state change driven by agents (ACTIVE, Available, ONLINE) may take.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(30);

/// An account and an API client holding its key.
#[derive(Clone)]
pub struct Tenant {
    pub account: Account,
    pub api: Api,
}

/// An endpoint's address for one resource, from its `dnsEntries`.
#[derive(Clone, Debug)]
pub struct EndpointAddress {
    pub dns_name: String,
    pub ip: String,
}

fn id_of(v: &Value, field: &str, what: &str) -> String {
    v[field].as_str().or(v["id"].as_str()).unwrap_or_else(|| panic!("{what}: no `{field}` in {v}")).to_string()
}

impl Tenant {
    /// Creates an account named `name` and a client for it.
    pub fn create(cp: &ControlPlane, name: &str) -> Tenant {
        let account = cp.create_account(name);
        Tenant { api: cp.api(&account.api_key), account }
    }

    pub fn id(&self) -> &str {
        &self.account.id
    }

    pub fn create_vpc(&self, name: &str) -> String {
        let v = self.api.post("/v1/vpcs", &json!({ "name": name })).ok("create VPC");
        id_of(&v, "vpcId", "create VPC")
    }

    pub fn create_subnet(&self, vpc_id: &str, zone: &str, cidr: &str) -> String {
        let body = json!({ "vpcId": vpc_id, "zone": zone, "cidrBlock": cidr });
        let v = self.api.post("/v1/subnets", &body).ok("create subnet");
        id_of(&v, "subnetId", "create subnet")
    }

    /// A single-use join token for an agent in `subnet_id`.
    pub fn join_token(&self, subnet_id: &str) -> String {
        let v = self.api.post("/v1/agent-tokens", &json!({ "subnetId": subnet_id })).ok("create agent token");
        v["token"].as_str().unwrap_or_else(|| panic!("no token in {v}")).to_string()
    }

    /// Waits until an agent of this account in `subnet_id` reports ONLINE.
    pub fn wait_agent_online(&self, subnet_id: &str) -> Value {
        wait_until(&format!("an ONLINE agent in {subnet_id}"), STATE_TIMEOUT, || {
            let list = self.api.get("/v1/agents").ok("list agents");
            list["items"].as_array()?.iter().find(|a| a["subnetId"] == subnet_id && a["status"] == "ONLINE").cloned()
        })
    }

    /// Creates a resource gateway and waits for ACTIVE; returns it.
    pub fn create_gateway(&self, name: &str, vpc_id: &str, subnet_ids: &[&str]) -> Value {
        let body = json!({ "name": name, "vpcIdentifier": vpc_id, "subnetIds": subnet_ids });
        let gw = self.api.post("/v1/resourcegateways", &body).ok("create resource gateway");
        let id = id_of(&gw, "id", "create resource gateway");
        self.wait_status(&format!("/v1/resourcegateways/{id}"), "status", "ACTIVE")
    }

    /// Creates a SINGLE ip resource configuration and waits for ACTIVE.
    pub fn create_ip_config(&self, name: &str, gateway_id: &str, ip: &str, ports: &[&str]) -> Value {
        let body = json!({
            "name": name,
            "type": "SINGLE",
            "resourceGatewayIdentifier": gateway_id,
            "resourceConfigurationDefinition": { "ipResource": { "ipAddress": ip } },
            "portRanges": ports,
            "protocol": "TCP",
        });
        let cfg = self.api.post("/v1/resourceconfigurations", &body).ok("create resource configuration");
        let id = id_of(&cfg, "id", "create resource configuration");
        self.wait_status(&format!("/v1/resourceconfigurations/{id}"), "status", "ACTIVE")
    }

    /// Creates a resource configuration from a full request body (any type
    /// or definition) and waits for ACTIVE; returns it.
    pub fn create_config(&self, body: &Value) -> Value {
        let cfg = self.api.post("/v1/resourceconfigurations", body).ok("create resource configuration");
        let id = id_of(&cfg, "id", "create resource configuration");
        self.wait_status(&format!("/v1/resourceconfigurations/{id}"), "status", "ACTIVE")
    }

    /// Creates a SINGLE configuration whose target is a DNS name, resolved by
    /// the gateway agent in the owner's network; waits for ACTIVE.
    pub fn create_dns_config(&self, name: &str, gateway_id: &str, domain_name: &str, ports: &[&str]) -> Value {
        self.create_config(&json!({
            "name": name,
            "type": "SINGLE",
            "resourceGatewayIdentifier": gateway_id,
            "resourceConfigurationDefinition": { "dnsResource": { "domainName": domain_name } },
            "portRanges": ports,
            "protocol": "TCP",
        }))
    }

    /// Creates a GROUP configuration (no definition of its own) and waits for ACTIVE.
    pub fn create_group(&self, name: &str, gateway_id: &str, ports: &[&str]) -> Value {
        self.create_config(&json!({
            "name": name,
            "type": "GROUP",
            "resourceGatewayIdentifier": gateway_id,
            "portRanges": ports,
            "protocol": "TCP",
        }))
    }

    /// Creates a CHILD of `group_id` for the ip `ip` and waits for ACTIVE.
    pub fn create_ip_child(&self, name: &str, group_id: &str, ip: &str, ports: &[&str]) -> Value {
        self.create_config(&json!({
            "name": name,
            "type": "CHILD",
            "resourceConfigurationGroupIdentifier": group_id,
            "resourceConfigurationDefinition": { "ipResource": { "ipAddress": ip } },
            "portRanges": ports,
            "protocol": "TCP",
        }))
    }

    /// Shares resources (by ARN) with account ids; returns the share.
    pub fn share(&self, name: &str, resource_arns: &[&str], principals: &[&str]) -> Value {
        let body = json!({ "name": name, "resourceArns": resource_arns, "principals": principals });
        self.api.post("/v1/resourceshares", &body).ok("create resource share")
    }

    /// Accepts the pending invitation for `share_arn`; returns the invitation.
    pub fn accept_invitation(&self, share_arn: &str) -> Value {
        let inv = wait_until(&format!("an invitation to {share_arn}"), STATE_TIMEOUT, || {
            let list = self.api.get("/v1/resourceshareinvitations").ok("list invitations");
            list["items"].as_array()?.iter().find(|i| i["resourceShareArn"] == share_arn).cloned()
        });
        assert_eq!(inv["status"], "PENDING", "a fresh invitation is PENDING: {inv}");
        let id = id_of(&inv, "id", "invitation");
        self.api.post(&format!("/v1/resourceshareinvitations/{id}/accept"), &json!({})).ok("accept invitation")
    }

    /// Creates a Resource endpoint and waits for `Available`; returns it.
    pub fn create_endpoint(&self, vpc_id: &str, subnet_ids: &[&str], config_arn: &str) -> Value {
        self.create_endpoint_from(&json!({
            "vpcEndpointType": "Resource",
            "vpcId": vpc_id,
            "subnetIds": subnet_ids,
            "resourceConfigurationArn": config_arn,
        }))
    }

    /// Creates an endpoint from a full request body (e.g. with
    /// `privateDnsEnabled`) and waits for `Available`; returns it.
    pub fn create_endpoint_from(&self, body: &Value) -> Value {
        let ep = self.api.post("/v1/vpcendpoints", body).ok("create VPC endpoint");
        let id = id_of(&ep, "vpcEndpointId", "create VPC endpoint");
        self.wait_status(&format!("/v1/vpcendpoints/{id}"), "state", "Available")
    }

    /// GETs `path` until `field == want`; fails fast on a `*FAILED`/`Failed` state.
    pub fn wait_status(&self, path: &str, field: &str, want: &str) -> Value {
        self.wait_status_for(path, field, want, STATE_TIMEOUT)
    }

    /// [`Tenant::wait_status`] with its own deadline.
    pub fn wait_status_for(&self, path: &str, field: &str, want: &str, timeout: Duration) -> Value {
        wait_until(&format!("{path} to reach {field}={want}"), timeout, || {
            let v = self.api.get(path).ok(path);
            let state = v[field].as_str().unwrap_or("");
            assert!(!state.to_ascii_uppercase().contains("FAILED"), "{path} failed: {v}");
            (state == want).then_some(v)
        })
    }

    /// The usage rows of a resource configuration (owner only).
    pub fn usage(&self, config_id: &str) -> Vec<Value> {
        let v = self.api.get(&format!("/v1/resourceconfigurations/{config_id}/usage")).ok("usage");
        v["items"].as_array().cloned().unwrap_or_default()
    }
}

/// The ARN of a resource share as the API returns it.
pub fn share_arn(share: &Value) -> String {
    share["resourceShareArn"]
        .as_str()
        .or(share["arn"].as_str())
        .unwrap_or_else(|| panic!("no arn in {share}"))
        .to_string()
}

/// The address and name of `config_id` among an endpoint's `dnsEntries`
/// (one per resource of a GROUP endpoint); `None` if it has none.
pub fn endpoint_address_of(endpoint: &Value, config_id: &str) -> Option<EndpointAddress> {
    let entry = endpoint["dnsEntries"].as_array()?.iter().find(|e| e["resourceConfigurationId"] == config_id)?;
    Some(EndpointAddress {
        dns_name: entry["dnsName"].as_str()?.to_string(),
        ip: entry["ipAddresses"].as_array()?.first()?.as_str()?.to_string(),
    })
}

/// The first address of an endpoint (its only one for a SINGLE configuration).
pub fn endpoint_address(endpoint: &Value) -> EndpointAddress {
    let entry = endpoint["dnsEntries"]
        .as_array()
        .and_then(|e| e.first())
        .unwrap_or_else(|| panic!("endpoint has no dnsEntries: {endpoint}"));
    let ip = entry["ipAddresses"]
        .as_array()
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("dns entry has no ipAddresses: {entry}"))
        .to_string();
    let dns_name = entry["dnsName"].as_str().unwrap_or_default().to_string();
    EndpointAddress { dns_name, ip }
}
