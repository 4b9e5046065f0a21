//! Connection notifications: the `/v1/connectionnotifications` routes on the
//! router, and real deliveries by the worker to a real HTTP receiver on
//! loopback (signatures, order, retries, the deliveries log, a receiver that
//! never answers).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use trellis_control::Settings;
use trellis_control::notify::sign::verify;
use trellis_control::notify::{self, Event, EventKind, WebhookSettings};
use trellis_model::{RetrySchedule, VpcEndpoint, VpcEndpointService};
use trellis_store::TxExt;

mod support;

use support::{Acct, Api};

const NFN: &str = "/v1/connectionnotifications";

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

impl Api {
    fn with_webhooks(allow_private_webhooks: bool) -> Self {
        Api::with_settings(Settings { allow_private_webhooks, ..Settings::default() })
    }

    async fn notification(&self, a: &Acct, body: Value) -> String {
        s(&self.create(NFN, &a.key, body).await["id"]).to_string()
    }

    async fn deliveries(&self, a: &Acct, id: &str) -> Vec<Value> {
        let (status, v) = self.call("GET", &format!("{NFN}/{id}/deliveries"), &a.key, None).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v["items"].as_array().unwrap().clone()
    }

    /// Polls the deliveries log until `done` holds for it (15 s at most).
    async fn deliveries_until(&self, a: &Acct, id: &str, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let items = self.deliveries(a, id).await;
            if done(&items) {
                return items;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {items:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the delivery worker with short retries; stopped when the token drops.
    fn start_worker(&self, timeout: Duration) -> tokio_util::sync::DropGuard {
        let settings = WebhookSettings {
            allow_private: true,
            retry: RetrySchedule {
                first_retry: Duration::from_millis(200),
                max_retry: Duration::from_secs(1),
                give_up_after: Duration::from_secs(600),
            },
            timeout,
            max_in_flight: 8,
        };
        let stop = CancellationToken::new();
        tokio::spawn(notify::run(self.state.clone(), settings, stop.clone()));
        stop.drop_guard()
    }

    /// A provider's endpoint service and a consumer's Interface endpoint to
    /// it, written straight to the store (the service API lands separately).
    async fn service_and_endpoint(&self, provider: &Acct, consumer: &Acct) -> (VpcEndpointService, VpcEndpoint) {
        let service: VpcEndpointService = serde_json::from_value(json!({
            "id": "vpce-svc-0123456789abcdef0", "serviceId": "vpce-svc-0123456789abcdef0",
            "serviceName": "trellis.vpce.local.vpce-svc-0123456789abcdef0",
            "arn": "arn:trellis:ec2:local:x:vpc-endpoint-service/vpce-svc-0123456789abcdef0",
            "accountId": provider.id, "name": "orders", "vpcId": "vpc-0123456789abcdef0", "subnetIds": [],
            "targets": [], "ports": [], "acceptanceRequired": true, "loadBalancing": "ROUND_ROBIN",
            "healthCheck": {"protocol": "TCP", "intervalSeconds": 30, "timeoutSeconds": 10,
                            "healthyThresholdCount": 5, "unhealthyThresholdCount": 2},
            "proxyProtocol": "NONE", "allowedPrincipals": ["*"], "state": "Available",
            "createdAt": "2026-01-01T00:00:00Z"
        }))
        .unwrap();
        let endpoint: VpcEndpoint = serde_json::from_value(json!({
            "id": "vpce-0123456789abcdef0", "vpcEndpointId": "vpce-0123456789abcdef0",
            "arn": "arn:trellis:ec2:local:x:vpc-endpoint/vpce-0123456789abcdef0", "accountId": consumer.id,
            "vpcEndpointType": "Interface", "vpcId": "vpc-00000000000000001", "subnetIds": [],
            "serviceId": service.id, "serviceName": service.service_name, "serviceOwnerId": provider.id,
            "privateDnsEnabled": false, "state": "PendingAcceptance", "dnsEntries": [],
            "createdAt": "2026-01-01T00:00:00Z"
        }))
        .unwrap();
        let (svc, ep) = (service.clone(), endpoint.clone());
        self.state
            .write(move |tx| {
                tx.insert_obj(&svc)?;
                tx.insert_obj(&ep)?;
                Ok(())
            })
            .await
            .unwrap();
        (service, endpoint)
    }

    /// What a handler does: change the endpoint and record the event in the same write.
    async fn endpoint_event(&self, endpoint: &VpcEndpoint, kind: EventKind) {
        let mut ep = endpoint.clone();
        if kind == EventKind::Accept {
            ep.state = trellis_model::EndpointState::Pending;
        }
        let now = trellis_control::state::now();
        self.state
            .write(move |tx| {
                tx.update_obj(&ep)?;
                notify::record(tx, &Event::endpoint(kind, &ep), now)
            })
            .await
            .unwrap();
    }
}

/// One request a receiver got.
#[derive(Clone, Debug)]
struct Got {
    path: String,
    signature: String,
    event_id: String,
    content_type: String,
    body: Vec<u8>,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A webhook receiver on 127.0.0.1: `/ok/*` answers 204, `/flaky` 500 to its
/// first two requests then 200, `/hang` never answers.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Got>>>,
    flaky_failures: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start() -> (Self, String) {
        let r = Receiver::default();
        let app = Router::new().route("/{*path}", axum::routing::post(hook)).with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (r, base)
    }

    fn at(&self, path: &str) -> Vec<Got> {
        self.got.lock().unwrap().iter().filter(|g| g.path == path).cloned().collect()
    }

    async fn until(&self, path: &str, n: usize) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let got = self.at(path);
            if got.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "{path} got {} requests, expected {n}", got.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn hook(State(r): State<Receiver>, Path(path): Path<String>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let path = format!("/{path}");
    r.got.lock().unwrap().push(Got {
        path: path.clone(),
        signature: h("trellis-signature"),
        event_id: h("trellis-event-id"),
        content_type: h("content-type"),
        body: body.to_vec(),
    });
    match path.as_str() {
        "/hang" => std::future::pending().await,
        "/flaky" if r.flaky_failures.fetch_add(1, Ordering::SeqCst) < 2 => StatusCode::INTERNAL_SERVER_ERROR,
        "/flaky" => StatusCode::OK,
        _ => StatusCode::NO_CONTENT,
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// The signature of `got` verifies with `secret` (and not with another one or another body).
fn assert_signed(got: &Got, secret: &str) {
    assert!(verify(secret.as_bytes(), &got.signature, &got.body, now_unix(), 300), "{got:?}");
    assert!(!verify(b"wrong", &got.signature, &got.body, now_unix(), 300));
    let mut tampered = got.body.clone();
    tampered.push(b' ');
    assert!(!verify(secret.as_bytes(), &got.signature, &tampered, now_unix(), 300));
    assert_eq!(got.content_type, "application/json");
    assert_eq!(got.event_id, s(&got.json()["eventId"]));
}

/// The Python example of docs/notifications.md, run on a real delivery (when python3 is installed).
fn python_example_verifies(got: &Got, secret: &str) -> Option<bool> {
    let doc = include_str!("../../../docs/notifications.md");
    let code = doc.split("<!-- verify-python -->\n```python\n").nth(1)?.split("```").next()?;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("verify.py");
    let main =
        "\nimport sys\nsys.exit(0 if verify(sys.argv[1].encode(), sys.argv[2], sys.stdin.buffer.read()) else 1)\n";
    std::fs::write(&file, format!("{code}{main}")).unwrap();
    let run = |body: &[u8]| -> Option<bool> {
        use std::io::Write;
        let mut child = std::process::Command::new("python3")
            .arg(&file)
            .arg(secret)
            .arg(&got.signature)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        child.stdin.take().unwrap().write_all(body).unwrap();
        Some(child.wait().unwrap().success())
    };
    let good = run(&got.body)?;
    let mut tampered = got.body.clone();
    tampered.extend_from_slice(b"\n");
    Some(good && !run(&tampered)?)
}

#[tokio::test]
async fn a_receiver_gets_connect_then_accept_signed_and_a_failing_one_gets_it_on_the_third_attempt() {
    let api = Api::with_webhooks(true);
    let (receiver, base) = Receiver::start().await;
    let _worker = api.start_worker(Duration::from_secs(5));
    let provider = api.account("provider").await;
    let consumer = api.account("consumer").await;
    let (service, endpoint) = api.service_and_endpoint(&provider, &consumer).await;
    let on_service = api
        .notification(
            &provider,
            json!({"serviceId": service.id, "connectionEvents": ["Connect", "Accept", "Reject", "Delete"],
                   "url": format!("{base}/ok/provider"), "secret": "provider-secret"}),
        )
        .await;
    let on_endpoint = api
        .notification(
            &consumer,
            json!({"vpcEndpointId": endpoint.id, "connectionEvents": ["Accept"],
                   "url": format!("{base}/flaky"), "secret": "consumer-secret"}),
        )
        .await;

    api.endpoint_event(&endpoint, EventKind::Connect).await;
    api.endpoint_event(&endpoint, EventKind::Accept).await;

    let got = receiver.until("/ok/provider", 2).await;
    let types: Vec<String> = got.iter().map(|g| s(&g.json()["eventType"]).to_string()).collect();
    assert_eq!(types, ["Connect", "Accept"], "in order");
    for g in &got {
        assert_signed(g, "provider-secret");
        let body = g.json();
        assert_eq!(body["serviceId"], service.id.as_str());
        assert_eq!(body["vpcEndpointId"], endpoint.id.as_str());
        assert_eq!(body["vpcEndpointOwner"], consumer.id.as_str());
        assert_eq!(body["accountId"], provider.id.as_str());
        assert_eq!(body["connectionNotificationId"], on_service.as_str());
    }
    assert_eq!(got[0].json()["vpcEndpointState"], "PendingAcceptance");
    assert_eq!(got[1].json()["vpcEndpointState"], "Pending");
    if let Some(ok) = python_example_verifies(&got[0], "provider-secret") {
        assert!(ok, "the documented Python verification accepts a real delivery and refuses a changed body");
    }

    // The consumer's receiver fails twice, then takes the event: three tries of one event.
    let flaky = receiver.until("/flaky", 3).await;
    assert!(flaky.iter().all(|g| g.event_id == flaky[0].event_id && g.body == flaky[0].body), "same event, same bytes");
    assert_eq!(flaky[0].json()["eventType"], "Accept");
    assert_signed(&flaky[2], "consumer-secret");
    let log = api
        .deliveries_until(&consumer, &on_endpoint, "the third attempt in the log", |d| {
            d.first().is_some_and(|d| d["state"] == "Delivered")
        })
        .await;
    assert_eq!(log.len(), 1, "{log:#?}");
    let codes: Vec<&Value> = log[0]["attempts"].as_array().unwrap().iter().map(|a| &a["statusCode"]).collect();
    assert_eq!(codes, [&json!(500), &json!(500), &json!(200)], "{log:#?}");
    assert_eq!(log[0]["attemptCount"], 3);
    assert_eq!(log[0]["eventId"], flaky[0].event_id.as_str());
    assert!(log[0].get("nextAttemptAt").is_none());

    // The provider's log: newest first, each delivered at the first attempt.
    let log = api
        .deliveries_until(&provider, &on_service, "both delivered", |d| {
            d.len() == 2 && d.iter().all(|d| d["state"] == "Delivered")
        })
        .await;
    assert_eq!((log[0]["eventType"].as_str(), log[0]["sequence"].as_u64()), (Some("Accept"), Some(2)));
    assert_eq!((log[1]["eventType"].as_str(), log[1]["sequence"].as_u64()), (Some("Connect"), Some(1)));
    assert_eq!(log[1]["attempts"][0]["statusCode"], 204);
    assert_eq!(log[1]["event"], got[0].json(), "the log holds the body that was sent");
}

#[tokio::test]
async fn a_receiver_that_never_answers_does_not_slow_the_api() {
    let api = Api::with_webhooks(true);
    let (receiver, base) = Receiver::start().await;
    let timeout = Duration::from_secs(3);
    let _worker = api.start_worker(timeout);
    let provider = api.account("provider").await;
    let consumer = api.account("consumer").await;
    let (service, endpoint) = api.service_and_endpoint(&provider, &consumer).await;
    let id = api
        .notification(
            &provider,
            json!({"serviceId": service.id, "connectionEvents": ["Connect"], "url": format!("{base}/hang"),
                   "secret": "s"}),
        )
        .await;
    let started = Instant::now();
    api.endpoint_event(&endpoint, EventKind::Connect).await;
    receiver.until("/hang", 1).await;
    // The attempt hangs; the API answers meanwhile, without waiting for it.
    for i in 0..5 {
        let (status, v) = api.call("POST", "/v1/vpcs", &provider.key, Some(json!({"name": format!("v{i}")}))).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
    }
    let log = api.deliveries(&provider, &id).await;
    assert_eq!(log[0]["attemptCount"], 0, "the attempt is still in flight: {log:#?}");
    assert!(started.elapsed() < timeout, "API calls waited for the receiver: {:?}", started.elapsed());
    let log = api.deliveries_until(&provider, &id, "the timed-out attempt", |d| d[0]["attemptCount"] == 1).await;
    let error = s(&log[0]["attempts"][0]["error"]);
    assert!(error.contains("timed out") || error.contains("timeout"), "{error}");
    assert_eq!(log[0]["state"], "Pending", "retried later");
    assert!(log[0]["nextAttemptAt"].is_string());
}

#[tokio::test]
async fn share_invitations_and_resource_endpoints_notify_the_accounts_they_concern() {
    let api = Api::with_webhooks(true);
    let (receiver, base) = Receiver::start().await;
    let _worker = api.start_worker(Duration::from_secs(5));
    let owner = api.account("owner").await;
    let consumer = api.account("consumer").await;
    let for_owner = api
        .notification(
            &owner,
            json!({"connectionEvents": ["ResourceEndpointCreate"], "url": format!("{base}/ok/owner"), "secret": "o"}),
        )
        .await;
    api.notification(
        &consumer,
        json!({"connectionEvents": ["ResourceShareInvitation"], "url": format!("{base}/ok/consumer"), "secret": "c"}),
    )
    .await;

    // Owner: gateway, configuration, share to the consumer.
    let vpc = api.create("/v1/vpcs", &owner.key, json!({"name": "o"})).await;
    let subnet = api
        .create("/v1/subnets", &owner.key, json!({"vpcId": vpc["id"], "zone": "z1", "cidrBlock": "10.0.9.0/24"}))
        .await;
    let gw = api
        .create(
            "/v1/resourcegateways",
            &owner.key,
            json!({"name": "gw", "vpcIdentifier": vpc["id"], "subnetIds": [subnet["id"]]}),
        )
        .await;
    let cfg = api
        .create(
            "/v1/resourceconfigurations",
            &owner.key,
            json!({"name": "db", "type": "SINGLE", "resourceGatewayIdentifier": gw["id"],
                   "resourceConfigurationDefinition": {"ipResource": {"ipAddress": "10.0.0.10"}},
                   "portRanges": ["5432"], "protocol": "TCP"}),
        )
        .await;
    let share = api
        .create(
            "/v1/resourceshares",
            &owner.key,
            json!({"name": "s", "resourceArns": [cfg["arn"]], "principals": [consumer.id]}),
        )
        .await;
    let invitation = receiver.until("/ok/consumer", 1).await.remove(0);
    assert_signed(&invitation, "c");
    let body = invitation.json();
    assert_eq!(body["eventType"], "ResourceShareInvitation");
    assert_eq!(body["resourceShareId"], share["id"]);
    assert_eq!(body["senderAccountId"], owner.id.as_str());
    assert_eq!(body["accountId"], consumer.id.as_str());
    let inv_id = s(&body["resourceShareInvitationId"]).to_string();
    let (status, v) =
        api.call("POST", &format!("/v1/resourceshareinvitations/{inv_id}/accept"), &consumer.key, None).await;
    assert_eq!(status, StatusCode::OK, "the event names the invitation to accept: {v}");

    // Consumer: an endpoint to the owner's configuration.
    let cvpc = api.create("/v1/vpcs", &consumer.key, json!({"name": "c"})).await;
    let csub = api
        .create("/v1/subnets", &consumer.key, json!({"vpcId": cvpc["id"], "zone": "z1", "cidrBlock": "10.1.9.0/24"}))
        .await;
    let ep = api
        .create(
            "/v1/vpcendpoints",
            &consumer.key,
            json!({"vpcEndpointType": "Resource", "vpcId": cvpc["id"], "subnetIds": [csub["id"]],
                   "resourceConfigurationArn": cfg["arn"]}),
        )
        .await;
    let created = receiver.until("/ok/owner", 1).await.remove(0);
    assert_signed(&created, "o");
    let body = created.json();
    assert_eq!(body["eventType"], "ResourceEndpointCreate");
    assert_eq!(body["vpcEndpointId"], ep["id"]);
    assert_eq!(body["vpcEndpointOwner"], consumer.id.as_str());
    assert_eq!(body["resourceConfigurationId"], cfg["id"]);
    api.deliveries_until(&owner, &for_owner, "delivered", |d| d.len() == 1 && d[0]["state"] == "Delivered").await;

    // The owner's own endpoint to its own configuration is no news to it.
    let (status, _) = api
        .call(
            "POST",
            "/v1/vpcendpoints",
            &owner.key,
            Some(json!({"vpcEndpointType": "Resource", "vpcId": vpc["id"], "subnetIds": [subnet["id"]],
                         "resourceConfigurationArn": cfg["arn"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, n) = api.call("GET", &format!("{NFN}/{for_owner}"), &owner.key, None).await;
    assert_eq!(n["lastSequence"], 1, "{n}");
}

#[tokio::test]
async fn an_event_nobody_subscribes_to_costs_one_list_per_scope() {
    let api = Api::with_webhooks(true);
    let provider = api.account("provider").await;
    let consumer = api.account("consumer").await;
    let (_, endpoint) = api.service_and_endpoint(&provider, &consumer).await;
    let now = trellis_control::state::now();
    let (_, work) = api
        .state
        .write_counted(move |tx| notify::record(tx, &Event::endpoint(EventKind::Connect, &endpoint), now))
        .await
        .unwrap();
    assert_eq!(work.operations, 2, "the service's and the endpoint's subscribers: {work:?}");
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field_and_creates_nothing() {
    let api = Api::with_webhooks(false);
    let a = api.account("a").await;
    let b = api.account("b").await;
    let (service, endpoint) = api.service_and_endpoint(&a, &b).await;
    let ok_url = "https://hooks.example.com/trellis";
    let cases = [
        (json!({"connectionEvents": ["Connect"], "url": ok_url, "secret": "s"}), 422, "connectionEvents"),
        (
            json!({"serviceId": service.id, "connectionEvents": ["connect"], "url": ok_url, "secret": "s"}),
            422,
            "connectionEvents",
        ),
        (
            json!({"serviceId": service.id, "connectionEvents": ["ResourceShareInvitation"], "url": ok_url, "secret": "s"}),
            422,
            "connectionEvents",
        ),
        (
            json!({"serviceId": service.id, "connectionEvents": [], "url": ok_url, "secret": "s"}),
            422,
            "connectionEvents",
        ),
        (
            json!({"serviceId": service.id, "connectionEvents": ["Connect"], "url": "ftp://example.com/x", "secret": "s"}),
            400,
            "url",
        ),
        (
            json!({"serviceId": service.id, "connectionEvents": ["Connect"], "url": "example.com/x", "secret": "s"}),
            400,
            "url",
        ),
        (
            json!({"serviceId": service.id, "connectionEvents": ["Connect"], "url": "http://127.0.0.1:8080/", "secret": "s"}),
            400,
            "--allow-private-webhooks",
        ),
        (
            json!({"serviceId": service.id, "connectionEvents": ["Connect"], "url": "http://169.254.169.254/latest", "secret": "s"}),
            400,
            "link-local",
        ),
        (json!({"serviceId": service.id, "connectionEvents": ["Connect"], "url": ok_url, "secret": ""}), 422, "secret"),
        (
            json!({"serviceId": service.id, "connectionEvents": ["Connect"], "url": ok_url, "secret": "x".repeat(257)}),
            422,
            "secret",
        ),
        (
            json!({"serviceId": service.id, "vpcEndpointId": endpoint.id, "connectionEvents": ["Connect"], "url": ok_url, "secret": "s"}),
            422,
            "not both",
        ),
        (
            json!({"serviceId": "vpce-svc-nope", "connectionEvents": ["Connect"], "url": ok_url, "secret": "s"}),
            422,
            "serviceId",
        ),
        (
            json!({"serviceId": "vpce-svc-00000000000000000", "connectionEvents": ["Connect"], "url": ok_url, "secret": "s"}),
            404,
            "serviceId",
        ),
        // b's endpoint, not a's: a cannot watch it.
        (
            json!({"vpcEndpointId": endpoint.id, "connectionEvents": ["Connect"], "url": ok_url, "secret": "s"}),
            404,
            "vpcEndpointId",
        ),
        (json!({"connectionEvents": ["ResourceShareInvitation"], "url": ok_url}), 400, "secret"),
    ];
    for (body, status, needle) in cases {
        let (got, err) = api.call("POST", NFN, &a.key, Some(body.clone())).await;
        assert_eq!(got.as_u16(), status, "{body}: {err}");
        assert!(err["message"].as_str().unwrap_or_default().contains(needle), "{body}: {err}");
    }
    let (_, list) = api.call("GET", NFN, &a.key, None).await;
    assert_eq!(list["items"], json!([]), "nothing was created");
}

#[tokio::test]
async fn only_the_owner_sees_a_notification_and_never_its_secret() {
    let api = Api::with_webhooks(false);
    let a = api.account("a").await;
    let b = api.account("b").await;
    let body = json!({"connectionEvents": ["ResourceShareInvitation"], "url": "https://hooks.example.com/x",
                      "secret": "top-secret-value", "clientToken": "t-1"});
    let (status, n) = api.call("POST", NFN, &a.key, Some(body.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{n}");
    let id = s(&n["id"]).to_string();
    assert!(id.starts_with("vpce-nfn-"), "{id}");
    assert_eq!(n["secretSet"], true);
    let (status, again) = api.call("POST", NFN, &a.key, Some(body)).await;
    assert_eq!((status, &again["id"]), (StatusCode::OK, &n["id"]), "clientToken replays");

    let (_, got) = api.call("GET", &format!("{NFN}/{id}"), &a.key, None).await;
    let (_, list) = api.call("GET", NFN, &a.key, None).await;
    let patch = json!({"url": "https://other.example.com/y", "secret": "new-secret-value",
                       "connectionEvents": ["ResourceEndpointCreate", "ResourceShareInvitation"]});
    let (status, patched) = api.call("PATCH", &format!("{NFN}/{id}"), &a.key, Some(patch)).await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["url"], "https://other.example.com/y");
    assert_eq!(patched["connectionEvents"], json!(["ResourceEndpointCreate", "ResourceShareInvitation"]));
    for answer in [&n, &got, &list, &patched] {
        let text = answer.to_string();
        assert!(!text.contains("secret-value") && !text.contains("\"secret\""), "{text}");
    }

    // Invalid changes change nothing.
    let (status, err) =
        api.call("PATCH", &format!("{NFN}/{id}"), &a.key, Some(json!({"connectionEvents": ["Accept"]}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    let (status, _) = api.call("PATCH", &format!("{NFN}/{id}"), &a.key, Some(json!({"url": "gopher://x"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, now) = api.call("GET", &format!("{NFN}/{id}"), &a.key, None).await;
    assert_eq!(now, patched);

    // Another account: 404 for everything, and an empty list.
    for (method, path, body) in [
        ("GET", format!("{NFN}/{id}"), None),
        ("GET", format!("{NFN}/{id}/deliveries"), None),
        ("PATCH", format!("{NFN}/{id}"), Some(json!({"url": "https://evil.example.com/"}))),
        ("DELETE", format!("{NFN}/{id}"), None),
    ] {
        let (status, err) = api.call(method, &path, &b.key, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {err}");
    }
    let (_, list) = api.call("GET", NFN, &b.key, None).await;
    assert_eq!(list["items"], json!([]));

    let (status, _) = api.call("DELETE", &format!("{NFN}/{id}"), &a.key, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(api.call("GET", &format!("{NFN}/{id}"), &a.key, None).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_log_pages_newest_first_and_keeps_the_last_thousand() {
    let api = Api::with_webhooks(false);
    let a = api.account("a").await;
    let b = api.account("b").await;
    let (service, endpoint) = api.service_and_endpoint(&a, &b).await;
    let id = api
        .notification(
            &a,
            json!({"serviceId": service.id, "connectionEvents": ["Connect"], "url": "https://hooks.example.com/",
                   "secret": "s"}),
        )
        .await;
    let now = trellis_control::state::now();
    api.state
        .write(move |tx| {
            for _ in 0..1005 {
                notify::record(tx, &Event::endpoint(EventKind::Connect, &endpoint), now)?;
            }
            Ok(())
        })
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let path = match &token {
            Some(t) => format!("{NFN}/{id}/deliveries?maxResults=300&nextToken={t}"),
            None => format!("{NFN}/{id}/deliveries?maxResults=300"),
        };
        let (status, page) = api.call("GET", &path, &a.key, None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(page["items"].as_array().unwrap().iter().map(|d| d["sequence"].as_u64().unwrap()));
        match page["nextToken"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    let expected: Vec<u64> = (6..=1005).rev().collect();
    assert_eq!(seen, expected, "newest first, the oldest 5 pruned");
    let (status, _) = api.call("GET", &format!("{NFN}/{id}/deliveries?nextToken=x"), &a.key, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
