//! A GROUP resource configuration: several resources (its CHILD
//! configurations) shared once and reached through ONE Resource endpoint,
//! each CHILD at its own address and DNS name in the consumer's VPC, at its
//! own native port. A CHILD the owner adds later shows up in the existing
//! endpoint without the consumer doing anything.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::{Value, json};
use trellis_e2e::dns::resolve_a;
use trellis_e2e::flow::{EndpointAddress, STATE_TIMEOUT, endpoint_address_of};
use trellis_e2e::net::{free_port, tcp_exchange};
use trellis_e2e::postgres::{FRUITS, FRUITS_QUERY, psql};
use trellis_e2e::{LoopbackPair, Postgres, TcpService, wait_until};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_string()
}

fn addr(entry: &EndpointAddress, port: u16) -> SocketAddr {
    SocketAddr::new(entry.ip.parse().unwrap_or_else(|e| panic!("endpoint address {:?}: {e}", entry.ip)), port)
}

/// What a greeter service answers through `to`.
fn greeting(to: SocketAddr) -> Result<String, String> {
    tcp_exchange(to, b"", IO_TIMEOUT)
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .map_err(|e| format!("{to}: {e}"))
}

#[test]
fn each_child_of_a_shared_group_gets_its_own_address_and_name_in_one_endpoint() {
    let pg = Postgres::start(LOCALHOST, free_port(LOCALHOST), None);
    let inventory = TcpService::greeter("inventory-service", SocketAddr::new(LOCALHOST, 0), "inventory-v1", None);
    let pricing = TcpService::greeter("pricing-service", SocketAddr::new(LOCALHOST, 0), "pricing-v1", None);
    let env = LoopbackPair::start();
    let owner = &env.owner;

    // The owner's GROUP with two CHILDren: the database and the inventory service.
    let group = owner.create_group("shop", &env.gateway_id, &["1024-65535"]);
    let group_id = id(&group);
    let group_arn = group["arn"].as_str().expect("group arn").to_string();
    let db = owner.create_ip_child("shop-db", &group_id, "127.0.0.1", &[&pg.port.to_string()]);
    let inv = owner.create_ip_child("shop-inventory", &group_id, "127.0.0.1", &[&inventory.addr.port().to_string()]);
    let (db_id, inv_id) = (id(&db), id(&inv));
    assert_eq!(db["resourceGatewayId"], env.gateway_id.as_str(), "a CHILD inherits its GROUP's gateway: {db}");

    // A CHILD is never shared alone; the GROUP is shared once.
    let child_share = owner.api.post(
        "/v1/resourceshares",
        &json!({ "name": "child-alone", "resourceArns": [db["arn"]], "principals": [env.consumer.id()] }),
    );
    assert!(
        (400..500).contains(&child_share.status),
        "sharing a CHILD alone must be refused, got {} {}",
        child_share.status,
        child_share.text
    );
    env.share("shop-share", &group_arn);
    let endpoint = env.create_endpoint(&group_arn);
    let endpoint_id = endpoint["vpcEndpointId"].as_str().or(endpoint["id"].as_str()).expect("endpoint id").to_string();

    // One address and one name per CHILD, all from the consumer's pool.
    let entries = endpoint["dnsEntries"].as_array().expect("dnsEntries");
    assert_eq!(entries.len(), 2, "one entry per CHILD (one subnet): {endpoint}");
    let db_at = endpoint_address_of(&endpoint, &db_id).unwrap_or_else(|| panic!("no entry for {db_id}: {endpoint}"));
    let inv_at = endpoint_address_of(&endpoint, &inv_id).unwrap_or_else(|| panic!("no entry for {inv_id}: {endpoint}"));
    assert_ne!(db_at.ip, inv_at.ip, "each CHILD has its own address");
    for (at, child) in [(&db_at, &db_id), (&inv_at, &inv_id)] {
        assert!(env.in_consumer_pool(&at.ip), "{} is from the consumer pool {}", at.ip, env.consumer_pool);
        assert!(
            at.dns_name.starts_with(&format!("{endpoint_id}.{child}.")) && at.dns_name.ends_with(".trellis.internal"),
            "the name of {child} is <vpce>.<rcfg>.<region>.trellis.internal, got {:?}",
            at.dns_name
        );
    }

    // The first CHILD's address leads to the owner's database, with psql.
    let answer = psql(None, &db_at.ip, pg.port, FRUITS_QUERY).expect("psql through the database CHILD's address");
    assert_eq!(answer, FRUITS);
    assert_eq!(psql(None, &db_at.ip, pg.port, "select name from whoami").expect("psql"), pg.instance);
    // The second CHILD's address leads to the second service.
    assert_eq!(greeting(addr(&inv_at, inventory.addr.port())).as_deref(), Ok("inventory-v1"));
    // A CHILD's address serves only that CHILD's ports.
    assert!(
        greeting(addr(&db_at, inventory.addr.port())).is_err(),
        "the database CHILD's address must not serve the inventory port"
    );
    assert!(
        psql(None, &inv_at.ip, pg.port, "select 1").is_err(),
        "the inventory CHILD's address must not serve the database port"
    );
    // The consumer agent's DNS answers each CHILD's name with its own address.
    let dns = env.consumer_agent.dns_addr.expect("the consumer agent serves DNS");
    for at in [&db_at, &inv_at] {
        let resolved = resolve_a(dns, &at.dns_name).expect("the consumer agent resolves a CHILD name");
        assert_eq!(resolved, vec![at.ip.parse::<Ipv4Addr>().unwrap()], "{}", at.dns_name);
    }

    // The owner adds a third CHILD; the consumer touches nothing.
    let price = owner.create_ip_child("shop-pricing", &group_id, "127.0.0.1", &[&pricing.addr.port().to_string()]);
    let price_id = id(&price);
    let updated = wait_until("the existing endpoint to list the new CHILD", STATE_TIMEOUT, || {
        let ep = env.consumer.api.get(&format!("/v1/vpcendpoints/{endpoint_id}")).ok("get endpoint");
        endpoint_address_of(&ep, &price_id).map(|_| ep)
    });
    assert_eq!(updated["state"], "Available", "the endpoint stays Available: {updated}");
    assert_eq!(
        endpoint_address_of(&updated, &db_id).map(|a| a.ip),
        Some(db_at.ip.clone()),
        "the first CHILD keeps its address"
    );
    assert_eq!(endpoint_address_of(&updated, &inv_id).map(|a| a.ip), Some(inv_at.ip.clone()));
    let price_at = endpoint_address_of(&updated, &price_id).expect("checked by the wait above");
    assert!(env.in_consumer_pool(&price_at.ip) && price_at.ip != db_at.ip && price_at.ip != inv_at.ip, "{updated}");
    let reply = wait_until("the new CHILD to answer through the endpoint", STATE_TIMEOUT, || {
        greeting(addr(&price_at, pricing.addr.port())).ok().filter(|r| !r.is_empty())
    });
    assert_eq!(reply, "pricing-v1");
    assert_eq!(
        resolve_a(dns, &price_at.dns_name).expect("the new CHILD's name resolves"),
        vec![price_at.ip.parse::<Ipv4Addr>().unwrap()]
    );
    // The earlier CHILDren still work.
    assert_eq!(psql(None, &db_at.ip, pg.port, FRUITS_QUERY).expect("psql after the new CHILD"), FRUITS);
    assert_eq!(greeting(addr(&inv_at, inventory.addr.port())).as_deref(), Ok("inventory-v1"));

    // The owner removes the inventory CHILD: its address and name go away,
    // the other CHILDren of the same endpoint are untouched.
    owner.api.delete(&format!("/v1/resourceconfigurations/{inv_id}")).ok("delete the inventory CHILD");
    wait_until("the removed CHILD's address to stop answering", STATE_TIMEOUT, || {
        greeting(addr(&inv_at, inventory.addr.port())).is_err().then_some(())
    });
    let after = env.consumer.api.get(&format!("/v1/vpcendpoints/{endpoint_id}")).ok("get endpoint");
    assert!(endpoint_address_of(&after, &inv_id).is_none(), "the removed CHILD has no entry left: {after}");
    assert_eq!(after["dnsEntries"].as_array().map(Vec::len), Some(2), "{after}");
    assert!(resolve_a(dns, &inv_at.dns_name).is_err(), "the removed CHILD's name no longer resolves");
    assert_eq!(psql(None, &db_at.ip, pg.port, FRUITS_QUERY).expect("psql after a CHILD was removed"), FRUITS);
    assert_eq!(greeting(addr(&price_at, pricing.addr.port())).as_deref(), Ok("pricing-v1"));
}
