//! The scale guard: the store work one share deletion causes, counted (not
//! timed) at N = 200 and N = 2,000 consumers of one resource. Work must follow
//! what changed: the deletion itself costs the same at any N, only the agents
//! it affects recompile, and their compiles are linear in their own configs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;
use trellis_model::*;
use trellis_store::sqlite::SqliteStore;
use trellis_store::{Filter, Record, Store, StoreError, Tx, TxExt, write_with};

use crate::agents::tests::{REGION, t0};
use crate::pki::Ca;
use crate::state::{AppState, Settings};

/// A store that counts the operations and records of every transaction.
struct Counting {
    inner: SqliteStore,
    operations: AtomicU64,
    records: AtomicU64,
}

impl Counting {
    fn work(&self) -> (u64, u64) {
        (self.operations.load(Ordering::Relaxed), self.records.load(Ordering::Relaxed))
    }
}

struct CountingTx<'a> {
    inner: &'a mut dyn Tx,
    store: &'a Counting,
}

impl Tx for CountingTx<'_> {
    fn revision(&mut self) -> Result<u64, StoreError> {
        self.inner.revision()
    }
    fn get(&mut self, kind: &str, id: &str) -> Result<Option<Record>, StoreError> {
        self.store.operations.fetch_add(1, Ordering::Relaxed);
        let r = self.inner.get(kind, id)?;
        self.store.records.fetch_add(u64::from(r.is_some()), Ordering::Relaxed);
        Ok(r)
    }
    fn list(&mut self, kind: &str, filter: &Filter<'_>) -> Result<Vec<Record>, StoreError> {
        self.store.operations.fetch_add(1, Ordering::Relaxed);
        let r = self.inner.list(kind, filter)?;
        self.store.records.fetch_add(r.len() as u64, Ordering::Relaxed);
        Ok(r)
    }
    fn insert(&mut self, record: &Record) -> Result<(), StoreError> {
        self.store.operations.fetch_add(1, Ordering::Relaxed);
        self.inner.insert(record)
    }
    fn update(&mut self, record: &Record) -> Result<(), StoreError> {
        self.store.operations.fetch_add(1, Ordering::Relaxed);
        self.inner.update(record)
    }
    fn delete(&mut self, kind: &str, id: &str) -> Result<bool, StoreError> {
        self.store.operations.fetch_add(1, Ordering::Relaxed);
        self.inner.delete(kind, id)
    }
}

impl Store for Counting {
    fn write(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), StoreError>) -> Result<(), StoreError> {
        self.inner.write(&mut |tx| f(&mut CountingTx { inner: tx, store: self }))
    }
    fn read(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), StoreError>) -> Result<(), StoreError> {
        self.inner.read(&mut |tx| f(&mut CountingTx { inner: tx, store: self }))
    }
    fn revision(&self) -> Result<u64, StoreError> {
        self.inner.revision()
    }
}

fn seed(kind: u8, n: u32) -> Seed {
    let mut s = [0u8; 16];
    s[0] = kind;
    s[1..5].copy_from_slice(&n.to_be_bytes());
    s[15] = 0x5a;
    s
}

/// One owner with a gateway agent and a database shared (one share each)
/// with `n` consumer accounts, each with a VPC, a subnet, an agent and an
/// endpoint; shares accepted. Returns the store, the gateway agent, and per
/// consumer (account, agent, share).
struct ScaleWorld {
    gateway_agent: AgentId,
    consumers: Vec<(AccountId, AgentId, ResourceShareId)>,
    owner_key: String,
}

fn build(store: &dyn Store, n: u32) -> ScaleWorld {
    let owner = Account::new(AccountId::generate(&seed(1, 0)), "owner".into(), None, REGION, t0());
    let owner_key = crate::auth::generate_key().unwrap();
    let mut consumers = Vec::new();
    let mut gateway_agent = None;
    write_with(store, |tx| {
        tx.insert_obj(&owner)?;
        crate::auth::insert_key(tx, &owner_key, Some(&owner.id), t0()).map_err(|_| StoreError::Aborted)?;
        let vpc = Vpc::new(VpcId::generate(&seed(2, 0)), owner.id.clone(), "owner".into(), REGION, t0());
        let subnet = Subnet::new(
            SubnetId::generate(&seed(3, 0)),
            owner.id.clone(),
            vpc.id.clone(),
            "z1".into(),
            AddressPool::parse("10.0.9.0/24").unwrap(),
            None,
            REGION,
            t0(),
        );
        let agent = crate::agents::tests::agent(&subnet, 200, Some("192.0.2.1:7443"));
        let mut gw = ResourceGateway::new(
            ResourceGatewayId::generate(&seed(5, 0)),
            owner.id.clone(),
            "gw".into(),
            vpc.id.clone(),
            vec![subnet.id.clone()],
            IpAddressType::Ipv4,
            REGION,
            t0(),
        );
        gw.status = ResourceStatus::Active;
        let db = crate::agents::tests::configuration(
            &gw,
            1,
            ConfigurationType::Single,
            None,
            crate::agents::tests::ip("10.0.0.10"),
            &["5432"],
        );
        tx.insert_obj(&vpc)?;
        tx.insert_obj(&subnet)?;
        tx.insert_obj(&agent)?;
        tx.insert_obj(&gw)?;
        tx.insert_obj(&db)?;
        gateway_agent = Some(agent.id.clone());
        for i in 1..=n {
            let consumer = Account::new(AccountId::generate(&seed(1, i)), format!("c{i}"), None, REGION, t0());
            let cvpc = Vpc::new(VpcId::generate(&seed(2, i)), consumer.id.clone(), "c".into(), REGION, t0());
            let csubnet = Subnet::new(
                SubnetId::generate(&seed(3, i)),
                consumer.id.clone(),
                cvpc.id.clone(),
                "z1".into(),
                AddressPool::parse("10.0.9.0/24").unwrap(),
                None,
                REGION,
                t0(),
            );
            let id = AgentId::generate(&seed(4, i));
            let cagent = Agent {
                arn: Agent::arn_for(REGION, &consumer.id, &id),
                agent_id: id.clone(),
                id: id.clone(),
                ..crate::agents::tests::agent(&csubnet, 1, None)
            };
            let share = ResourceShare::new(
                ResourceShareId::generate(&seed(7, i)),
                owner.id.clone(),
                format!("s{i}"),
                vec![db.arn.clone()],
                vec![consumer.id.clone()],
                REGION,
                t0(),
            );
            let mut invitation = ResourceShareInvitation::new(
                ResourceShareInvitationId::generate(&seed(8, i)),
                &share,
                consumer.id.clone(),
                REGION,
                t0(),
            );
            invitation.status = InvitationStatus::Accepted;
            let eid = VpcEndpointId::generate(&seed(9, i));
            let dns_entries =
                plan_dns_entries(&eid, REGION, &[&db], std::slice::from_ref(&csubnet), false, &mut Pools::default())
                    .unwrap();
            let endpoint = VpcEndpoint {
                arn: VpcEndpoint::arn_for(REGION, &consumer.id, &eid),
                vpc_endpoint_id: eid.clone(),
                id: eid,
                account_id: consumer.id.clone(),
                vpc_endpoint_type: VpcEndpointType::Resource,
                vpc_id: cvpc.id.clone(),
                subnet_ids: vec![csubnet.id.clone()],
                resource_configuration_arn: Some(db.arn.clone()),
                resource_configuration_id: Some(db.id.clone()),
                resource_configuration_owner_id: Some(owner.id.clone()),
                service_id: None,
                service_name: None,
                service_owner_id: None,
                private_dns_enabled: false,
                private_dns_preference: PrivateDnsPreference::default(),
                private_dns_specified_domains: vec![],
                state: EndpointState::Available,
                failure_reason: None,
                dns_entries,
                created_at: t0(),
            };
            tx.insert_obj(&consumer)?;
            tx.insert_obj(&cvpc)?;
            tx.insert_obj(&csubnet)?;
            tx.insert_obj(&cagent)?;
            tx.insert_obj(&share)?;
            tx.insert_obj(&invitation)?;
            tx.insert_obj(&endpoint)?;
            consumers.push((consumer.id.clone(), cagent.id.clone(), share.id.clone()));
        }
        Ok::<_, StoreError>(())
    })
    .unwrap();
    ScaleWorld { gateway_agent: gateway_agent.unwrap(), consumers, owner_key }
}

/// What one share deletion cost at `n` consumers.
#[derive(Debug)]
struct Cost {
    /// Store operations of the DELETE call itself.
    delete_operations: u64,
    /// Agents whose config was recompiled afterwards.
    recompiled: usize,
    /// Agents that got a different config.
    changed: usize,
    /// Store operations of those recompiles.
    compile_operations: u64,
    /// Records the recompiles read.
    compile_records: u64,
    /// Endpoints in the gateway's config before the deletion.
    gateway_endpoints: usize,
}

async fn deletion_cost(n: u32) -> Cost {
    let counting = Arc::new(Counting {
        inner: SqliteStore::open_in_memory().unwrap(),
        operations: AtomicU64::new(0),
        records: AtomicU64::new(0),
    });
    let world = build(&*counting, n);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(dir.path()).unwrap();
    let state =
        AppState::new(counting.clone(), Settings { region: REGION.into(), ..Settings::default() }, Arc::new(ca));
    let router = crate::api_router(state.clone());
    let agents: Vec<AgentId> =
        std::iter::once(world.gateway_agent.clone()).chain(world.consumers.iter().map(|c| c.1.clone())).collect();
    let mut before = Vec::new();
    for agent in &agents {
        let started = std::time::Instant::now();
        before.push(state.configs.current(&state, agent).await.unwrap());
        if before.len() == 1 {
            eprintln!(
                "N={n}: gateway compile {:?}, {} bytes, {} gzipped",
                started.elapsed(),
                before[0].json.len(),
                before[0].gzip.len()
            );
        }
    }
    let gateway_endpoints = before[0].config.gateway.resources[0].allowed.len();
    assert_eq!(gateway_endpoints, n as usize);
    // The gateway's config as sent: tens of kilobytes per thousand endpoints, not hundreds.
    let per_thousand = before[0].gzip.len() * 1000 / n as usize;
    assert!(per_thousand < 64 * 1024, "the gateway config takes {per_thousand} bytes per 1,000 endpoints");

    let (_, _, share) = &world.consumers[n as usize / 2];
    let start = counting.work();
    let req = Request::delete(format!("/v1/resourceshares/{share}"))
        .header("authorization", format!("Bearer {}", world.owner_key))
        .body(Body::empty())
        .unwrap();
    assert_eq!(router.oneshot(req).await.unwrap().status(), StatusCode::NO_CONTENT);
    let deleted = counting.work();

    let mut recompiled = 0;
    let mut changed = 0;
    for (agent, old) in agents.iter().zip(&before) {
        let new = state.configs.current(&state, agent).await.unwrap();
        if !Arc::ptr_eq(&new, old) {
            recompiled += 1;
        }
        if new.version() != old.version() {
            changed += 1;
        }
    }
    let compiled = counting.work();
    Cost {
        delete_operations: deleted.0 - start.0,
        recompiled,
        changed,
        compile_operations: compiled.0 - deleted.0,
        compile_records: compiled.1 - deleted.1,
        gateway_endpoints,
    }
}

#[tokio::test]
async fn a_share_deletion_costs_work_in_proportion_to_what_it_affects() {
    let small = deletion_cost(200).await;
    let large = deletion_cost(2_000).await;
    eprintln!("N=200: {small:?}\nN=2000: {large:?}");
    for cost in [&small, &large] {
        // The gateway and the one consumer whose share went; nobody else.
        assert_eq!(cost.recompiled, 2, "{cost:?}");
        assert_eq!(cost.changed, 2, "{cost:?}");
    }
    // The deletion touches one share, its invitation and its consumer's endpoint: constant.
    assert_eq!(small.delete_operations, large.delete_operations, "the DELETE grew with N: {small:?} {large:?}");
    // The recompiles re-read what the deletion wrote, not the gateway's thousands of
    // endpoints, shares and invitations (kept between compilations): constant in N.
    assert_eq!(
        (small.compile_operations, small.compile_records),
        (large.compile_operations, large.compile_records),
        "the recompiles' store work grew with N: {small:?} {large:?}"
    );
    assert!(large.compile_records < 50, "the recompiles read {} records", large.compile_records);
    assert_eq!((small.gateway_endpoints, large.gateway_endpoints), (200, 2_000));
}

/// Writes that keep touching what the gateway's config reads (a provider's
/// consumers creating endpoints one after another) never starve its agent:
/// every compilation ends stale, and the agent still gets the first one that
/// started after it asked, instead of waiting for a quiet moment that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_stream_of_writes_does_not_starve_a_config() {
    let dir = tempfile::tempdir().unwrap();
    // A file store: its reads run beside writes, as in production.
    let store = Arc::new(SqliteStore::open(&dir.path().join("store.db")).unwrap());
    let world = build(&*store, 2_000);
    let ca = Ca::load_or_create(dir.path()).unwrap();
    let state = AppState::new(store.clone(), Settings { region: REGION.into(), ..Settings::default() }, Arc::new(ca));
    state.configs.current(&state, &world.gateway_agent).await.unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (wrote, mut first_write) = tokio::sync::watch::channel(0u64);
    let writer = {
        let (state, stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                state
                    .write(|tx| {
                        let configs = tx.list_obj::<ResourceConfiguration>(&Filter::default())?;
                        tx.update_obj(&configs[0])?;
                        Ok(())
                    })
                    .await
                    .unwrap();
                n += 1;
                let _ = wrote.send(n);
                tokio::task::yield_now().await;
            }
            n
        })
    };
    first_write.changed().await.unwrap();
    for _ in 0..3 {
        let got = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            state.configs.current(&state, &world.gateway_agent),
        )
        .await;
        assert!(matches!(got, Ok(Ok(_))), "the gateway's config starved under a stream of writes");
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 3, "the writer kept writing meanwhile ({writes} writes)");
}

/// Where a gateway compile's time goes at N = 5,000 (run by hand, in release:
/// `cargo test --release -p trellis-control gateway_compile_profile -- --ignored --nocapture`).
#[test]
#[ignore]
fn gateway_compile_profile() {
    let store = SqliteStore::open_in_memory().unwrap();
    let world = build(&store, 5_000);
    let db_id = {
        let mut id = String::new();
        store
            .read(&mut |tx| {
                id = tx.list_obj::<ResourceConfiguration>(&Filter::default())?[0].id.to_string();
                Ok(())
            })
            .unwrap();
        id
    };
    store
        .read(&mut |tx| {
            for kind in ["vpc-endpoint", "resource-share", "resource-share-invitation"] {
                let t = std::time::Instant::now();
                let raw = tx.list(kind, &Filter::reference(&db_id))?;
                let raw_t = t.elapsed();
                eprintln!("{kind}: {} raw records by reference {raw_t:?}", raw.len());
            }
            let t = std::time::Instant::now();
            let eps = tx.list_obj::<VpcEndpoint>(&Filter::reference(&db_id))?;
            eprintln!("typed endpoints {} {:?}", eps.len(), t.elapsed());
            let t = std::time::Instant::now();
            let raw = tx.list("vpc-endpoint", &Filter::default())?;
            eprintln!("all endpoints raw {} {:?}", raw.len(), t.elapsed());
            let t = std::time::Instant::now();
            let n = raw.iter().filter(|r| serde_json::from_str::<VpcEndpoint>(&r.body).is_ok()).count();
            eprintln!("decode {n} {:?}", t.elapsed());
            Ok(())
        })
        .unwrap();
    // CPU time of this thread (ns on CPU, from the scheduler), not wall time: the machine is shared.
    fn cpu() -> std::time::Duration {
        let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
        std::time::Duration::from_nanos(stat.split_whitespace().next().unwrap().parse().unwrap())
    }
    let cache = crate::configs::ConfigCache::new(store.revision().unwrap());
    let mut best = [std::time::Duration::MAX; 4];
    for round in 0..16 {
        if round > 0 {
            // One consumer's endpoint changes, as an endpoint create or state change does.
            let (revision, keys) = trellis_store::write_with(&store, |tx| {
                let start = tx.revision()?;
                let mut tracked = trellis_store::track::Tracked::new(tx, trellis_store::track::Mode::Writes);
                let ep = tracked.list_obj::<VpcEndpoint>(&Filter::reference(&db_id))?.swap_remove(round);
                tracked.update_obj(&ep)?;
                Ok::<_, StoreError>((start + 1, tracked.finish().0))
            })
            .unwrap();
            cache.invalidate(revision, keys);
        }
        let t = cpu();
        let mut out = None;
        store
            .read(&mut |tx| {
                let revision = tx.revision()?;
                let kept = crate::compile::KeptLists { cache: &cache, revision };
                out = Some(crate::configs::compile_tracked(tx, &world.gateway_agent, REGION, Some(kept)).unwrap());
                Ok(())
            })
            .unwrap();
        let compiled = cpu() - t;
        let (config, _, work) = out.unwrap();
        let t = cpu();
        let json = serde_json::to_vec(&config).unwrap();
        let encoded = cpu() - t;
        let t = cpu();
        let _ = crate::pki::sha256_hex(&json);
        let hashed = cpu() - t;
        let t = cpu();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &json).unwrap();
        let gzipped = gz.finish().unwrap().len();
        let zipped = cpu() - t;
        if round == 0 {
            eprintln!("cold: compile {compiled:?} ({work:?}), json {} bytes, gzip {gzipped} bytes", json.len());
        } else {
            for (b, d) in best.iter_mut().zip([compiled, encoded, hashed, zipped]) {
                *b = (*b).min(d);
            }
        }
    }
    eprintln!("warm, best of 15: compile {:?}, json {:?}, sha256 {:?}, gzip {:?}", best[0], best[1], best[2], best[3]);
}
