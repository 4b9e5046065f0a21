//! Checks of the harness itself, so that a failing suite points at Trellis and
//! not at the fixtures: PostgreSQL with the real client, raw sessions, and
//! namespaces with overlapping addresses that really are isolated.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use trellis_e2e::net::free_port;
use trellis_e2e::postgres::{FRUITS, FRUITS_QUERY, PgSession, psql};
use trellis_e2e::{Lab, Postgres, Proc, bins, require_root};

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
