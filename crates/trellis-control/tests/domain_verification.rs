//! Domain verification: the `/v1/domainverifications` routes on the router
//! (no sockets), then a real control plane (`server::start`) whose verifier
//! asks a real DNS server (dnsmasq) or a stub resolver on loopback.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{RData, Record};
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tower::ServiceExt;
use trellis_control::domain_verification::lookup::lookup_txt;
use trellis_control::domain_verification::{VerificationSettings, verified_domain_covering};
use trellis_control::pki::Ca;
use trellis_control::server::{RunningServer, ServerOptions};
use trellis_control::{AppState, Settings, api_router, bootstrap_admin};
use trellis_model::AccountId;
use trellis_store::sqlite::SqliteStore;

const DV: &str = "/v1/domainverifications";

/// The API as a router, with the admin key.
struct Api {
    router: Router,
    admin: String,
}

/// An account and its key.
struct Acct {
    id: String,
    key: String,
}

impl Api {
    /// A router on an in-memory store, with no verifier running.
    fn new(dir: &tempfile::TempDir) -> Self {
        let store = SqliteStore::open_in_memory().unwrap();
        let admin = bootstrap_admin(&store).unwrap().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let state = AppState::new(Arc::new(store), Settings::default(), Arc::new(ca));
        Self { router: api_router(state), admin }
    }

    /// The router of a running control plane (its verifier sees what the router writes).
    fn of(server: &RunningServer) -> Self {
        Self { router: api_router(server.state().clone()), admin: server.admin_key_created.clone().unwrap() }
    }

    async fn call(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req =
            Request::builder().method(method).uri(path).header(header::AUTHORIZATION, format!("Bearer {key}"));
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let resp = self.router.clone().oneshot(req.body(body).unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        (status, value)
    }

    async fn account(&self, name: &str) -> Acct {
        let (status, v) = self.call("POST", "/v1/accounts", &self.admin.clone(), Some(json!({"name": name}))).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        Acct { id: s(&v["accountId"]).into(), key: s(&v["apiKey"]).into() }
    }

    /// POST that must create; returns the verification.
    async fn verify(&self, a: &Acct, domain: &str) -> Value {
        let (status, v) = self.call("POST", DV, &a.key, Some(json!({"domainName": domain}))).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        v
    }

    async fn get(&self, a: &Acct, id: &str) -> (StatusCode, Value) {
        self.call("GET", &format!("{DV}/{id}"), &a.key, None).await
    }

    async fn list(&self, a: &Acct) -> Vec<Value> {
        let (status, v) = self.call("GET", &format!("{DV}?maxResults=1000"), &a.key, None).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v["items"].as_array().unwrap().clone()
    }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

#[tokio::test]
async fn create_list_get_and_delete_a_verification() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::new(&dir);
    let a = api.account("acme").await;
    let v = api.verify(&a, "Example.COM.").await;
    let id = s(&v["id"]);
    assert!(id.starts_with("dv-") && id.len() == 3 + 17, "{id}");
    assert_eq!(v["status"], "PENDING");
    assert_eq!(v["domainName"], "example.com", "lowercase, no trailing dot");
    assert_eq!(v["accountId"], a.id.as_str());
    assert_eq!(v["txtRecordName"], "_trellis-verification.example.com");
    assert!(s(&v["txtRecordValue"]).starts_with("trellis-verification="), "{v}");
    assert!(s(&v["arn"]).ends_with(&format!(":{}:domainverification/{id}", a.id)), "{v}");
    assert!(v["createdAt"].is_string() && v.get("verifiedAt").is_none(), "{v}");

    assert_eq!(api.list(&a).await, vec![v.clone()]);
    assert_eq!(api.get(&a, id).await, (StatusCode::OK, v.clone()));

    let (status, _) = api.call("DELETE", &format!("{DV}/{id}"), &a.key, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(api.get(&a, id).await.0, StatusCode::NOT_FOUND);
    assert!(api.list(&a).await.is_empty());
    let (status, _) = api.call("DELETE", &format!("{DV}/{id}"), &a.key, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(api.get(&a, "dv-nope").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn another_accounts_verification_is_404_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::new(&dir);
    let (a, b) = (api.account("acme").await, api.account("globex").await);
    let v = api.verify(&a, "example.com").await;
    let id = s(&v["id"]);
    let (status, err) = api.get(&b, id).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!err.to_string().contains("example.com"), "a 404 tells nothing: {err}");
    assert_eq!(api.call("DELETE", &format!("{DV}/{id}"), &b.key, None).await.0, StatusCode::NOT_FOUND);
    assert!(api.list(&b).await.is_empty());
    assert_eq!(api.get(&a, id).await.0, StatusCode::OK, "still there");
    // The same domain in another account is another claim, with its own secret value.
    let w = api.verify(&b, "example.com").await;
    assert_ne!(w["txtRecordValue"], v["txtRecordValue"]);
    assert_eq!(w["txtRecordName"], v["txtRecordName"]);
    // The admin key has no verifications of its own.
    assert_eq!(api.call("GET", DV, &api.admin, None).await.0, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn the_same_domain_twice_in_one_account_is_409_and_a_client_token_replays() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::new(&dir);
    let a = api.account("acme").await;
    let v = api.verify(&a, "example.com").await;
    for again in ["example.com", "EXAMPLE.com.", "Example.Com"] {
        let (status, err) = api.call("POST", DV, &a.key, Some(json!({"domainName": again}))).await;
        assert_eq!((status, s(&err["code"])), (StatusCode::CONFLICT, "AlreadyExists"), "{again}: {err}");
        assert!(s(&err["message"]).contains(s(&v["id"])), "names the existing one: {err}");
        assert!(s(&err["message"]).contains("delete it first"), "{err}");
    }
    // A subdomain is a claim of its own.
    api.verify(&a, "db.example.com").await;
    assert_eq!(api.list(&a).await.len(), 2);

    let body = json!({"domainName": "corp.example.net", "clientToken": "t-1"});
    let (first, v1) = api.call("POST", DV, &a.key, Some(body.clone())).await;
    let (second, v2) = api.call("POST", DV, &a.key, Some(body)).await;
    assert_eq!((first, second), (StatusCode::CREATED, StatusCode::OK));
    assert_eq!(v1, v2, "a retry with the same clientToken answers the same verification");
    assert_eq!(api.list(&a).await.len(), 3);
}

#[tokio::test]
async fn bad_domain_names_are_refused_with_the_field_and_what_to_write() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::new(&dir);
    let a = api.account("acme").await;
    for (bad, hint) in [
        ("*.example.com", "without \"*\""),
        ("com", "at least two labels"),
        ("trellis.internal", "reserved"),
        ("vpce-0123456789abcdef0.rcfg-0123456789abcdef0.local.trellis.internal", "reserved"),
        ("a_b.example.com", "RFC 1123"),
        ("", "RFC 1123"),
        ("10.0.0.1", "RFC 1123"),
        (&format!("{}com", "a.".repeat(120)), "too long"),
    ] {
        let (status, err) = api.call("POST", DV, &a.key, Some(json!({"domainName": bad}))).await;
        assert_eq!((status, s(&err["code"])), (StatusCode::UNPROCESSABLE_ENTITY, "ValidationError"), "{bad}: {err}");
        let message = s(&err["message"]);
        assert!(message.starts_with("domainName: ") && message.contains(hint), "{bad}: {message}");
    }
    for body in [json!({}), json!({"domainName": "example.com", "extra": 1}), json!({"domainName": 5})] {
        let (status, err) = api.call("POST", DV, &a.key, Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {err}");
    }
    assert!(api.list(&a).await.is_empty(), "bad input creates nothing");
}

#[tokio::test]
async fn one_account_holds_at_most_100_verifications() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::new(&dir);
    let (a, b) = (api.account("acme").await, api.account("globex").await);
    let mut first = String::new();
    for i in 0..trellis_control::api::domains::MAX_PER_ACCOUNT {
        let v = api.verify(&a, &format!("d{i}.example.com")).await;
        if i == 0 {
            first = s(&v["id"]).to_string();
        }
    }
    let (status, err) = api.call("POST", DV, &a.key, Some(json!({"domainName": "one-more.example.com"}))).await;
    assert_eq!((status, s(&err["code"])), (StatusCode::CONFLICT, "LimitExceeded"), "{err}");
    assert!(s(&err["message"]).contains("100") && s(&err["message"]).contains("delete"), "{err}");
    assert_eq!(api.list(&a).await.len(), 100, "nothing created");
    // The cap is per account, and deleting makes room again.
    api.verify(&b, "one-more.example.com").await;
    assert_eq!(api.call("DELETE", &format!("{DV}/{first}"), &a.key, None).await.0, StatusCode::NO_CONTENT);
    api.verify(&a, "one-more.example.com").await;
}

// --- a real control plane and real DNS --------------------------------------

/// Waits until `f` gives `Some`, polling, for at most `limit`.
async fn wait_for<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A port free on 127.0.0.1 for both UDP and TCP when this returns.
fn free_dns_port() -> u16 {
    for _ in 0..32 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1");
}

/// dnsmasq serving TXT records on loopback; stopped by PID on drop.
struct Dnsmasq {
    child: Child,
}

impl Dnsmasq {
    fn start(port: u16, txt_records: &[(&str, &str)]) -> Self {
        let program = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("dnsmasq");
        let mut cmd = Command::new(program);
        cmd.args([
            "--no-daemon",
            &format!("--port={port}"),
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--pid-file=",
        ]);
        for (name, value) in txt_records {
            cmd.arg(format!("--txt-record={name},{value}"));
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| {
            panic!("cannot start dnsmasq ({e}): install Debian's dnsmasq-base (scripts/test does)")
        });
        Self { child }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fast_settings(resolver: SocketAddr) -> VerificationSettings {
    VerificationSettings {
        resolver: Some(resolver),
        first_retry: Duration::from_millis(200),
        max_retry: Duration::from_millis(400),
        timeout: Duration::from_secs(6),
        query_timeout: Duration::from_millis(500),
        ..VerificationSettings::default()
    }
}

async fn start_server(dir: &tempfile::TempDir, settings: VerificationSettings) -> RunningServer {
    let mut opts = ServerOptions::new("127.0.0.1:0".parse().unwrap(), dir.path());
    opts.domain_verification = settings;
    trellis_control::server::start(opts).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_txt_record_verifies_and_a_wrong_one_times_out() {
    let port = free_dns_port();
    let resolver: SocketAddr = ([127, 0, 0, 1], port).into();
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&dir, fast_settings(resolver)).await;
    let api = Api::of(&server);
    let a = api.account("acme").await;
    let good = api.verify(&a, "example.com").await;
    let wrong = api.verify(&a, "wrong.example.net").await;
    let (good_id, wrong_id) = (s(&good["id"]).to_string(), s(&wrong["id"]).to_string());

    // The records go live after the creates, as when a user pastes them into their DNS.
    let _dns = Dnsmasq::start(
        port,
        &[
            (s(&good["txtRecordName"]), s(&good["txtRecordValue"])),
            (s(&wrong["txtRecordName"]), "trellis-verification=somebodyelse"),
        ],
    );
    wait_for("dnsmasq to answer", Duration::from_secs(10), || async {
        let name = s(&good["txtRecordName"]).to_string();
        lookup_txt(resolver, &name, Duration::from_millis(200)).await.ok().filter(|r| !r.is_empty())
    })
    .await;

    let verified = wait_for("the served record to verify", Duration::from_secs(5), || async {
        let (_, v) = api.get(&a, &good_id).await;
        (v["status"] == "VERIFIED").then_some(v)
    })
    .await;
    assert!(verified["verifiedAt"].is_string() && verified["lastCheckedAt"].is_string(), "{verified}");
    assert!(verified.get("statusReason").is_none(), "{verified}");

    // The wrong value keeps its verification PENDING, saying what is wrong ...
    let pending = wait_for("the wrong record to be seen", Duration::from_secs(5), || async {
        let (_, v) = api.get(&a, &wrong_id).await;
        v["statusReason"].as_str().is_some_and(|r| r.contains("found 1 TXT record(s)")).then_some(v)
    })
    .await;
    assert_eq!(pending["status"], "PENDING", "{pending}");
    assert!(s(&pending["statusReason"]).contains(s(&wrong["txtRecordValue"])), "{pending}");

    // ... and only the verified domain covers names for the config compiler.
    let account = AccountId::parse(&a.id).unwrap();
    let covering = server
        .state()
        .read(move |tx| {
            Ok((
                verified_domain_covering(tx, &account, "db.example.com")?,
                verified_domain_covering(tx, &account, "db.wrong.example.net")?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(covering, (Some("example.com".to_string()), None));

    // ... until its deadline (6 s after creation) passes.
    let timed_out = wait_for("the wrong record to time out", Duration::from_secs(10), || async {
        let (_, v) = api.get(&a, &wrong_id).await;
        (v["status"] != "PENDING").then_some(v)
    })
    .await;
    assert_eq!(timed_out["status"], "VERIFICATION_TIMED_OUT", "{timed_out}");
    assert!(s(&timed_out["statusReason"]).contains("was not found within 6s"), "{timed_out}");
    assert!(timed_out.get("verifiedAt").is_none());
    assert_eq!(api.get(&a, &good_id).await.1["status"], "VERIFIED", "a verified domain stays verified");

    server.shutdown();
    tokio::time::timeout(Duration::from_secs(10), server.wait()).await.expect("the server stops");
}

/// A resolver stub on loopback: answers the TXT records in `records`, reads
/// and drops every query for a name containing `hostile`, NXDOMAIN otherwise.
/// Returns its address, the records to fill, and the count of dropped queries.
async fn stub_resolver() -> (SocketAddr, Arc<Mutex<HashMap<String, String>>>, Arc<Mutex<usize>>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let records: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let dropped: Arc<Mutex<usize>> = Arc::default();
    let (table, count) = (records.clone(), dropped.clone());
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
            let Some(q) = query.queries.first().cloned() else { continue };
            let name = q.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
            if name.contains("hostile") {
                *count.lock().unwrap() += 1;
                continue;
            }
            let value = table.lock().unwrap().get(&name).cloned();
            let mut reply = Message::response(query.metadata.id, OpCode::Query);
            reply.add_query(q.clone());
            match value {
                Some(v) => {
                    reply.add_answer(Record::from_rdata(q.name().clone(), 60, RData::TXT(TXT::new(vec![v]))));
                }
                None => {
                    reply.metadata.response_code = ResponseCode::NXDomain;
                }
            }
            let _ = socket.send_to(&reply.to_vec().unwrap(), from).await;
        }
    });
    (addr, records, dropped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_never_resolve_do_not_hold_up_another_accounts_verification() {
    let (resolver, records, dropped) = stub_resolver().await;
    let query_timeout = Duration::from_secs(4);
    let settings = VerificationSettings {
        resolver: Some(resolver),
        first_retry: Duration::from_millis(100),
        max_retry: Duration::from_millis(200),
        timeout: Duration::from_secs(600),
        query_timeout,
        max_lookups: 4,
        max_lookups_per_account: 2,
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&dir, settings).await;
    let api = Api::of(&server);
    let (hostile, good) = (api.account("hostile").await, api.account("good").await);
    for i in 0..10 {
        api.verify(&hostile, &format!("d{i}.hostile.example")).await;
    }
    wait_for("the hostile account's lookups to start", Duration::from_secs(5), || async {
        (*dropped.lock().unwrap() >= 2).then_some(())
    })
    .await;

    let started = Instant::now();
    let v = api.verify(&good, "example.com").await;
    records.lock().unwrap().insert(s(&v["txtRecordName"]).to_string(), s(&v["txtRecordValue"]).to_string());
    let id = s(&v["id"]).to_string();
    wait_for("the good account's domain to verify", query_timeout / 2, || async {
        (api.get(&good, &id).await.1["status"] == "VERIFIED").then_some(())
    })
    .await;
    assert!(started.elapsed() < query_timeout / 2);
    assert_eq!(*dropped.lock().unwrap(), 2, "one account never has more than its 2 lookups in flight");

    server.shutdown();
    tokio::time::timeout(Duration::from_secs(10), server.wait()).await.expect("the server stops");
}
