//! Checks of the harness itself, so that a failing suite points at Trellis and
//! not at the fixtures: PostgreSQL with the real client, raw sessions, and
//! namespaces with overlapping addresses that really are isolated.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use trellis_e2e::net::free_port;
use trellis_e2e::postgres::{FRUITS, FRUITS_QUERY, PgSession, psql};
use trellis_e2e::{Lab, NatSite, Postgres, Proc, Site, bins, require_root};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[test]
fn postgres_fixture_serves_its_rows_to_psql_and_to_raw_sessions() {
    let pg = Postgres::start(LOCALHOST, free_port(LOCALHOST), None);
    assert_eq!(psql(None, "127.0.0.1", pg.port, FRUITS_QUERY).unwrap(), FRUITS);
    assert_eq!(psql(None, "127.0.0.1", pg.port, "select name from whoami").unwrap(), pg.instance);
    let mut session = PgSession::open(SocketAddr::new(LOCALHOST, pg.port), Duration::from_secs(5)).unwrap();
    assert_eq!(session.query("select name from fruits order by id").unwrap(), ["apple", "banana", "cherry"]);
    assert!(session.query("select * from no_such_table").is_err(), "errors are reported");
    assert!(!session.wait_closed(Duration::from_millis(300)), "an idle session stays open");
    // killing the server closes the session: wait_closed can see a close
    drop(pg);
    assert!(session.wait_closed(Duration::from_secs(10)), "the session closes when the server stops");
}

#[test]
fn psql_reports_a_refused_connection_as_an_error() {
    let port = free_port(LOCALHOST);
    let err = psql(None, "127.0.0.1", port, "select 1").expect_err("nothing listens there");
    assert!(err.contains("onnection refused") || err.contains("could not connect"), "psql said: {err}");
    assert!(PgSession::open(SocketAddr::new(LOCALHOST, port), Duration::from_secs(2)).is_err());
}

#[test]
fn lab_sites_with_the_same_cidr_are_isolated_and_meet_only_on_the_backbone() {
    require_root!();
    let mut lab = Lab::new();
    let a = lab.add_site("trha");
    let b = lab.add_site("trhb");
    let host = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10));
    a.add_local_address(host);
    b.add_local_address(host);
    let logs = tempfile::tempdir().unwrap();
    let mut serve_a = a.command(bins::tcp_helper());
    serve_a.args(["serve", "10.0.0.10:7000", "site-a"]);
    let mut serve_b = b.command(bins::tcp_helper());
    serve_b.args(["serve", "10.0.0.10:7000", "site-b"]);
    let mut serve_a_backbone = a.command(bins::tcp_helper());
    serve_a_backbone.args(["serve", &format!("{}:7001", a.backbone_addr), "site-a-backbone"]);
    let mut pa = Proc::spawn("serve-a", serve_a, logs.path());
    let mut pb = Proc::spawn("serve-b", serve_b, logs.path());
    let mut pab = Proc::spawn("serve-a-backbone", serve_a_backbone, logs.path());
    for p in [&mut pa, &mut pb, &mut pab] {
        p.wait_for_line("listening", Duration::from_secs(10), |l| l.starts_with("listening on").then_some(()));
    }
    let probe = |site: &trellis_e2e::Site, addr: &str| {
        let out = site.command(bins::tcp_helper()).args(["probe", addr]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(probe(&a, "10.0.0.10:7000"), "site-a");
    assert_eq!(probe(&b, "10.0.0.10:7000"), "site-b");
    // b reaches a only through a's backbone address
    assert_eq!(probe(&b, &format!("{}:7001", a.backbone_addr)), "site-a-backbone");
    // the root namespace reaches the backbone too (where a control plane listens)
    let answer =
        trellis_e2e::net::tcp_exchange(SocketAddr::new(IpAddr::V4(a.backbone_addr), 7001), b"", Duration::from_secs(5))
            .unwrap();
    assert_eq!(String::from_utf8_lossy(&answer).trim(), "site-a-backbone");
    let names = [a.ns.name().to_string(), b.ns.name().to_string()];
    drop((pa, pb, pab));
    drop((a, b, lab));
    let list =
        String::from_utf8(std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).unwrap();
    for name in names {
        assert!(!list.contains(&name), "namespace {name} was deleted on drop");
    }
}

/// Probes `addr` from inside `ns` with the TCP helper: what the server sent, or the error.
fn probe_from(ns: &trellis_e2e::Netns, addr: &str, timeout_ms: u64) -> Result<String, String> {
    let out = ns.command(bins::tcp_helper()).args(["probe", addr, &timeout_ms.to_string()]).output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

#[test]
fn a_nat_site_opens_connections_out_and_accepts_none_in() {
    require_root!();
    let mut lab = Lab::new();
    let nat: NatSite = lab.add_nat_site("trhn");
    let outside: Site = lab.add_site("trho");
    let logs = tempfile::tempdir().unwrap();
    let serve = |ns: &trellis_e2e::Netns, name: &str, addr: String, reply: &str| {
        let mut cmd = ns.command(bins::tcp_helper());
        cmd.args(["serve", &addr, reply]);
        let mut p = Proc::spawn(name, cmd, logs.path());
        p.wait_for_line("listening", Duration::from_secs(10), |l| l.starts_with("listening on").then_some(()));
        p
    };
    let _outside_server = serve(&outside.ns, "serve-outside", format!("{}:7002", outside.backbone_addr), "outside");
    let _inside_server = serve(&nat.ns, "serve-inside", format!("{}:7003", nat.lan_addr), "inside");

    // Out: the site reaches another site on the backbone.
    assert_eq!(probe_from(&nat.ns, &format!("{}:7002", outside.backbone_addr), 5000).as_deref(), Ok("outside"));
    // ... and the root namespace, which sees the router's address (masquerade), not the LAN's.
    let listener = std::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(lab.root_addr()), 0)).unwrap();
    let root_port = listener.local_addr().unwrap().port();
    let accepted = std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().unwrap();
        std::io::Write::write_all(&mut stream, b"root\n").unwrap();
        peer.ip()
    });
    assert_eq!(probe_from(&nat.ns, &format!("{}:{root_port}", lab.root_addr()), 5000).as_deref(), Ok("root"));
    assert_eq!(accepted.join().unwrap(), IpAddr::V4(nat.public_addr), "the router masquerades the site");

    // In: the site's own listener answers inside the site ...
    let inside = format!("{}:7003", nat.lan_addr);
    assert_eq!(probe_from(&nat.ns, &inside, 5000).as_deref(), Ok("inside"));
    // ... but not from outside, even with a route to the LAN through the router: the forward chain drops it.
    outside.ns.ip(&["route", "add", &nat.lan_cidr(), "via", &nat.public_addr.to_string()]);
    let started = std::time::Instant::now();
    let err = probe_from(&outside.ns, &inside, 1000).expect_err("a connection into the NAT site");
    assert!(err.contains("timed out") || err.contains("refused"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "the probe gave up after its short timeout");
    // The router forwards no port: its own address on that port refuses.
    let err = probe_from(&outside.ns, &format!("{}:7003", nat.public_addr), 1000).expect_err("no port forward");
    assert!(err.contains("refused"), "{err}");
}
