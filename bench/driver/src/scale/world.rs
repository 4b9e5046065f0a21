//! The world of one run, built through the HTTP API: one owner (VPC, subnet,
//! resource gateway, one SINGLE resource configuration) and N consumer
//! accounts, each with a VPC, a subnet, a share of the configuration of its
//! own (created by the owner, accepted by the consumer) and a `Resource`
//! endpoint. Consumers are built `concurrency` at a time, each one's calls in
//! order; creates carry a `clientToken`, as a careful client's would.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::api::{Api, field};
use crate::Res;

/// An account and its API key.
#[derive(Clone, Debug)]
pub struct Account {
    pub id: String,
    pub key: String,
}

#[derive(Clone, Debug)]
pub struct Consumer {
    pub account: Account,
    pub vpc: String,
    pub subnet: String,
    pub share: String,
    pub endpoint: String,
}

pub struct World {
    pub owner: Account,
    pub owner_subnet: String,
    pub config_id: String,
    pub config_arn: String,
    /// Consumer `i < agents` runs an agent; consumer `agents` is the spare that creates endpoints.
    pub consumers: Vec<Consumer>,
    pub setup: Duration,
    pub requests: u64,
}

/// How consumer `i` is laid out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Role {
    /// Runs agent number `i`: its subnet's pool is a /28 of its own on loopback,
    /// so 49 agents on one host bind different endpoint addresses.
    WithAgent(usize),
    /// Creates endpoints during the run: a /16 pool.
    Spare,
    /// Has an endpoint no agent serves; pools overlap, as real address plans do.
    Plain,
}

pub fn role(i: usize, agents: usize) -> Role {
    match i {
        i if i < agents => Role::WithAgent(i),
        i if i == agents => Role::Spare,
        _ => Role::Plain,
    }
}

/// The address pool of a consumer's subnet; `run` keeps concurrent runs apart.
pub fn pool(role: Role, run: u8) -> String {
    match role {
        // 127.251-254.<run>.<16 k>/28: 16 agents per /24, 64 at most.
        Role::WithAgent(a) => {
            let ip = Ipv4Addr::new(127, 251 + (a / 16) as u8, run, ((a % 16) * 16) as u8);
            format!("{ip}/28")
        }
        Role::Spare => "10.64.0.0/16".into(),
        Role::Plain => "10.0.9.0/24".into(),
    }
}

/// Most agents [`pool`] has addresses for.
pub const MAX_AGENT_CONSUMERS: usize = 64;

struct Ctx {
    api: Api,
    admin: String,
    owner: Account,
    config_arn: String,
    run: u8,
    agents: usize,
    requests: AtomicU64,
}

impl Ctx {
    async fn post(&self, path: &str, key: &str, body: Value) -> Res<Value> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.api.post(path, key, &body).await
    }

    async fn get(&self, path: &str, key: &str) -> Res<Value> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.api.get(path, key).await
    }

    async fn consumer(&self, i: usize) -> Res<Consumer> {
        let name = format!("c{i}");
        let tok = |what: &str| format!("scale-{what}-{i}");
        let a = self.post("/v1/accounts", &self.admin, json!({"name": name, "clientToken": tok("account")})).await?;
        let account = Account { id: field(&a, &["accountId", "id"])?, key: field(&a, &["apiKey"])? };
        let key = account.key.as_str();
        let vpc = field(
            &self.post("/v1/vpcs", key, json!({"name": name, "clientToken": tok("vpc")})).await?,
            &["vpcId", "id"],
        )?;
        let subnet = self
            .post(
                "/v1/subnets",
                key,
                json!({"vpcId": vpc, "zone": "z1", "cidrBlock": pool(role(i, self.agents), self.run),
                       "clientToken": tok("subnet")}),
            )
            .await?;
        let subnet = field(&subnet, &["subnetId", "id"])?;
        let share = self
            .post(
                "/v1/resourceshares",
                &self.owner.key,
                json!({"name": name, "resourceArns": [self.config_arn], "principals": [account.id],
                       "clientToken": tok("share")}),
            )
            .await?;
        let share_id = field(&share, &["resourceShareId", "id"])?;
        let share_arn = field(&share, &["resourceShareArn", "arn"])?;
        let invitations = self.get("/v1/resourceshareinvitations?status=PENDING", key).await?;
        let invitation = invitations["items"]
            .as_array()
            .and_then(|items| items.iter().find(|i| i["resourceShareArn"] == share_arn.as_str()))
            .ok_or_else(|| format!("consumer {i} has no pending invitation for {share_arn}: {invitations}"))?;
        let invitation = field(invitation, &["resourceShareInvitationId", "id"])?;
        self.post(&format!("/v1/resourceshareinvitations/{invitation}/accept"), key, json!({})).await?;
        let endpoint = self
            .post(
                "/v1/vpcendpoints",
                key,
                json!({"vpcEndpointType": "Resource", "vpcId": vpc, "subnetIds": [subnet],
                       "resourceConfigurationArn": self.config_arn, "clientToken": tok("endpoint")}),
            )
            .await?;
        let endpoint = field(&endpoint, &["vpcEndpointId", "id"])?;
        Ok(Consumer { account, vpc, subnet, share: share_id, endpoint })
    }
}

/// Builds the owner and `n` consumers; `progress` is called now and then with (done, n).
pub async fn build(
    api: &Api,
    admin: &str,
    n: usize,
    agents: usize,
    run: u8,
    concurrency: usize,
    progress: impl Fn(usize, usize, Duration),
) -> Res<World> {
    let started = Instant::now();
    let mut requests = 0u64;
    let mut post = async |path: &str, key: &str, body: Value| {
        requests += 1;
        api.post(path, key, &body).await
    };
    let a = post("/v1/accounts", admin, json!({"name": "owner"})).await?;
    let owner = Account { id: field(&a, &["accountId", "id"])?, key: field(&a, &["apiKey"])? };
    let vpc = field(&post("/v1/vpcs", &owner.key, json!({"name": "owner"})).await?, &["vpcId", "id"])?;
    let subnet =
        post("/v1/subnets", &owner.key, json!({"vpcId": vpc, "zone": "z1", "cidrBlock": "10.0.9.0/24"})).await?;
    let owner_subnet = field(&subnet, &["subnetId", "id"])?;
    let gateway = post(
        "/v1/resourcegateways",
        &owner.key,
        json!({"name": "gw", "vpcIdentifier": vpc, "subnetIds": [owner_subnet]}),
    )
    .await?;
    let gateway = field(&gateway, &["id", "resourceGatewayId"])?;
    let config = post(
        "/v1/resourceconfigurations",
        &owner.key,
        json!({"name": "db", "type": "SINGLE", "resourceGatewayIdentifier": gateway,
               "resourceConfigurationDefinition": {"ipResource": {"ipAddress": "10.0.0.10"}},
               "portRanges": ["5432"], "protocol": "TCP"}),
    )
    .await?;
    let config_id = field(&config, &["id", "resourceConfigurationId"])?;
    let config_arn = field(&config, &["arn"])?;

    let ctx = Arc::new(Ctx {
        api: api.clone(),
        admin: admin.to_string(),
        owner: owner.clone(),
        config_arn: config_arn.clone(),
        run,
        agents,
        requests: AtomicU64::new(requests),
    });
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let (ctx, permits) = (ctx.clone(), permits.clone());
        tasks.spawn(async move {
            // The semaphore is never closed.
            let _permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
            ctx.consumer(i).await.map(|c| (i, c)).map_err(|e| format!("consumer {i}: {e}"))
        });
    }
    let mut consumers: Vec<Option<Consumer>> = vec![None; n];
    let mut done = 0;
    let step = (n / 10).max(1);
    while let Some(joined) = tasks.join_next().await {
        let (i, c) = joined.map_err(|e| format!("a set-up task failed: {e}"))??;
        consumers[i] = Some(c);
        done += 1;
        if done % step == 0 {
            progress(done, n, started.elapsed());
        }
    }
    let consumers = consumers.into_iter().flatten().collect();
    Ok(World {
        owner,
        owner_subnet,
        config_id,
        config_arn,
        consumers,
        setup: started.elapsed(),
        requests: ctx.requests.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_pools_are_disjoint_loopback_blocks() {
        let pools: Vec<String> = (0..MAX_AGENT_CONSUMERS).map(|a| pool(Role::WithAgent(a), 7)).collect();
        assert_eq!(pools[0], "127.251.7.0/28");
        assert_eq!(pools[17], "127.252.7.16/28");
        assert_eq!(pools[63], "127.254.7.240/28");
        let mut unique = pools.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), pools.len());
    }

    #[test]
    fn roles_put_agents_first_then_the_spare() {
        assert_eq!(role(0, 49), Role::WithAgent(0));
        assert_eq!(role(48, 49), Role::WithAgent(48));
        assert_eq!(role(49, 49), Role::Spare);
        assert_eq!(role(50, 49), Role::Plain);
    }
}
