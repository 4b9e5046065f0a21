//! Domain verification through the real binary: `trellis server
//! --dns-resolver` sends the verifier's TXT lookups to the given resolver, and
//! `trellis domain-verification` creates, shows, lists and deletes
//! verifications with the TXT record a user pastes into their DNS.
//!
//! The resolver here is a stub on loopback that holds each query until the
//! test has read the record's value from the CLI (the value is random, known
//! only after the create), so the first check already finds it. The control
//! plane's own suite checks the same against dnsmasq.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{RData, Record, RecordType};
use trellis_e2e::{ControlPlane, wait_until};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// How long the stub holds a query for a value the test has not set yet
/// (below the verifier's 5 s query deadline).
const HOLD: Duration = Duration::from_secs(3);

/// A resolver answering TXT queries for one name with the value set through
/// `value`, NXDOMAIN for other names. Stops when dropped.
struct HeldTxtResolver {
    addr: SocketAddr,
    value: Arc<Mutex<Option<String>>>,
    queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HeldTxtResolver {
    fn start(name: &str) -> Self {
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let addr = sock.local_addr().unwrap();
        let value: Arc<Mutex<Option<String>>> = Arc::default();
        let queries = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (v, q, s, name) = (value.clone(), queries.clone(), stop.clone(), name.to_string());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
                let Ok(request) = Message::from_vec(&buf[..n]) else { continue };
                let Some(question) = request.queries.first().cloned() else { continue };
                q.fetch_add(1, Ordering::Relaxed);
                let asked = question.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
                let held_until = Instant::now() + HOLD;
                let answer = loop {
                    let current = v.lock().unwrap().clone();
                    if current.is_some() || Instant::now() >= held_until || s.load(Ordering::Relaxed) {
                        break current.filter(|_| asked == name && question.query_type() == RecordType::TXT);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                let mut response = Message::response(request.metadata.id, OpCode::Query);
                response.add_query(question.clone());
                match answer {
                    Some(value) => {
                        response.add_answer(Record::from_rdata(
                            question.name().clone(),
                            60,
                            RData::TXT(TXT::new(vec![value])),
                        ));
                    }
                    None => {
                        response.metadata.response_code = ResponseCode::NXDomain;
                    }
                }
                let _ = sock.send_to(&response.to_vec().unwrap(), from);
            }
        });
        Self { addr, value, queries, stop, thread: Some(thread) }
    }
}

impl Drop for HeldTxtResolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The value of `key` in a `get`-style table (`key   value` lines).
fn table_value<'a>(table: &'a str, key: &str) -> &'a str {
    table
        .lines()
        .find_map(|l| l.strip_prefix(key).filter(|rest| rest.starts_with(' ')).map(str::trim))
        .unwrap_or_else(|| panic!("no {key} in:\n{table}"))
}

#[test]
fn server_dns_resolver_flag_and_the_cli_verify_a_domain() {
    let resolver = HeldTxtResolver::start("_trellis-verification.example.com");
    let cp = ControlPlane::start_with_args(LOCALHOST, &["--dns-resolver", &resolver.addr.to_string()]);
    let owner = cp.create_account("acme");
    let cli = cp.cli(Some(&owner.api_key));

    let created = cli.run(&["domain-verification", "create", "--domain-name", "Example.COM"]);
    assert!(created.success, "{}{}", created.stdout, created.stderr);
    let table = created.stdout;
    assert_eq!(table_value(&table, "status"), "PENDING");
    assert_eq!(table_value(&table, "domainName"), "example.com");
    assert_eq!(table_value(&table, "txtRecordName"), "_trellis-verification.example.com");
    let value = table_value(&table, "txtRecordValue").to_string();
    assert!(value.starts_with("trellis-verification="), "{table}");
    let id = table_value(&table, "id").to_string();
    // The user publishes the record.
    *resolver.value.lock().unwrap() = Some(value);

    let verified = wait_until("the domain to be VERIFIED", Duration::from_secs(20), || {
        let v = cli.json(&["domain-verification", "get", &id]);
        (v["status"] == "VERIFIED").then_some(v)
    });
    assert!(verified["verifiedAt"].is_string(), "{verified}");
    assert!(resolver.queries.load(Ordering::Relaxed) >= 1, "the server asked the --dns-resolver");

    let list = cli.run(&["domain-verification", "list"]);
    assert!(list.success, "{}", list.stderr);
    let row = list.stdout.lines().find(|l| l.starts_with(&id)).unwrap_or_else(|| panic!("{}", list.stdout));
    assert!(row.contains("VERIFIED") && row.contains("example.com"), "{}", list.stdout);

    let bad = cli.run(&["domain-verification", "create", "--domain-name", "*.example.com"]);
    assert_eq!(bad.code, Some(1));
    assert_eq!(bad.stderr.trim().lines().count(), 1, "one line: {}", bad.stderr);
    assert!(bad.stderr.contains("--domain-name") && bad.stderr.contains("HTTP 422"), "{}", bad.stderr);
    let twice = cli.run(&["domain-verification", "create", "--domain-name", "example.com"]);
    assert!(!twice.success && twice.stderr.contains("HTTP 409"), "{}", twice.stderr);

    assert!(cli.run(&["domain-verification", "delete", &id]).success);
    let gone = cli.run(&["domain-verification", "get", &id]);
    assert!(!gone.success && gone.stderr.contains("HTTP 404"), "{}", gone.stderr);
}
