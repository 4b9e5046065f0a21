//! Connection notifications through the real binary: `trellis server
//! --allow-private-webhooks` delivers a signed `ResourceShareInvitation` to a
//! receiver on loopback, retries it after two failures, and `trellis
//! connection-notification deliveries` shows the three attempts; without the
//! flag a loopback URL is refused at create with a message naming `url`.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use serde_json::{Value, json};
use trellis_e2e::{ControlPlane, WebhookReceiver, wait_until};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The receiver's check, as docs/notifications.md shows it.
fn verify(secret: &[u8], header: &str, body: &[u8], now_unix: u64) -> bool {
    let (mut t, mut mac) = (None, None);
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<u64>().ok(),
            Some(("v1", v)) => mac = hex::decode(v).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(mac)) = (t, mac) else { return false };
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    t.abs_diff(now_unix) <= 300 && hmac::verify(&key, &[t.to_string().as_bytes(), b".", body].concat(), &mac).is_ok()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

#[test]
fn an_invitation_is_delivered_signed_after_two_failures_and_the_log_shows_every_attempt() {
    let cp = ControlPlane::start_with_args(LOCALHOST, &["--allow-private-webhooks"]);
    let receiver = WebhookReceiver::start(&[503, 500]);
    let owner = cp.create_account("owner");
    let consumer = cp.create_account("consumer");
    let cli = cp.cli(Some(&consumer.api_key));
    let n = cli.json(&[
        "connection-notification",
        "create",
        "--event",
        "ResourceShareInvitation",
        "--webhook-url",
        &receiver.url("/hooks/trellis"),
        "--secret",
        "e2e-secret",
    ]);
    let id = s(&n["id"]).to_string();
    assert_eq!(n["secretSet"], true);
    assert!(n.get("secret").is_none(), "{n}");

    let api = cp.api(&owner.api_key);
    let vpc = api.post("/v1/vpcs", &json!({"name": "o"})).ok("vpc");
    let subnet =
        api.post("/v1/subnets", &json!({"vpcId": vpc["id"], "zone": "z1", "cidrBlock": "10.0.9.0/24"})).ok("subnet");
    let gw = api
        .post("/v1/resourcegateways", &json!({"name": "gw", "vpcIdentifier": vpc["id"], "subnetIds": [subnet["id"]]}))
        .ok("gateway");
    let cfg = api
        .post(
            "/v1/resourceconfigurations",
            &json!({"name": "db", "type": "SINGLE", "resourceGatewayIdentifier": gw["id"],
                    "resourceConfigurationDefinition": {"ipResource": {"ipAddress": "10.0.0.10"}},
                    "portRanges": ["5432"], "protocol": "TCP"}),
        )
        .ok("configuration");
    let share = api
        .post("/v1/resourceshares", &json!({"name": "s", "resourceArns": [cfg["arn"]], "principals": [consumer.id]}))
        .ok("share");

    let got = receiver.wait_for(3, Duration::from_secs(30));
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    for d in &got {
        assert_eq!(d.path, "/hooks/trellis");
        assert_eq!(d.header("content-type"), "application/json");
        assert!(verify(b"e2e-secret", d.header("trellis-signature"), &d.body, now), "{d:?}");
        assert_eq!(d.header("trellis-event-id"), got[0].header("trellis-event-id"), "one event, retried");
        assert_eq!(d.body, got[0].body, "the same bytes on every attempt");
    }
    let event = got[0].json();
    assert_eq!(event["eventType"], "ResourceShareInvitation");
    assert_eq!(event["resourceShareId"], share["id"]);
    assert_eq!(event["senderAccountId"], owner.id.as_str());

    let log = wait_until("the third attempt in the deliveries log", Duration::from_secs(10), || {
        let page = cli.json(&["connection-notification", "deliveries", &id]);
        let first = page["items"][0].clone();
        (first["state"] == "Delivered").then_some(first)
    });
    let codes: Vec<u64> =
        log["attempts"].as_array().unwrap().iter().map(|a| a["statusCode"].as_u64().unwrap()).collect();
    assert_eq!(codes, [503, 500, 204], "{log}");
    assert_eq!(log["eventId"], got[0].header("trellis-event-id"));
}

#[test]
fn without_the_flag_a_loopback_or_non_http_url_is_refused_naming_url() {
    let cp = ControlPlane::start(LOCALHOST);
    let a = cp.create_account("a");
    let cli = cp.cli(Some(&a.api_key));
    for (url, needle) in [("http://127.0.0.1:9/x", "--allow-private-webhooks"), ("ftp://example.com/x", "http")] {
        let run = cli.run(&[
            "connection-notification",
            "create",
            "--event",
            "ResourceShareInvitation",
            "--webhook-url",
            url,
            "--secret",
            "s",
        ]);
        assert!(!run.success, "{url}: {run:?}");
        assert!(run.stderr.contains("url") && run.stderr.contains(needle), "{url}: {}", run.stderr);
    }
    let list = cli.json(&["connection-notification", "list"]);
    assert_eq!(list["items"], json!([]), "nothing was created");
}

/// The test 5 with an endpoint service: the provider's notification on
/// its service gets Connect (after two failed attempts, on a retry) and then
/// Accept, in order and signed; the deliveries log shows all three attempts.
#[test]
fn a_services_connect_and_accept_arrive_in_order_signed_and_retried() {
    let cp = ControlPlane::start_with_args(LOCALHOST, &["--allow-private-webhooks"]);
    let receiver = WebhookReceiver::start(&[500, 502]);
    let provider = cp.create_account("provider");
    let consumer = cp.create_account("consumer");
    let (papi, capi) = (cp.api(&provider.api_key), cp.api(&consumer.api_key));
    let network = |api: &trellis_e2e::Api, cidr: &str| {
        let vpc = api.post("/v1/vpcs", &json!({"name": "net"})).ok("vpc");
        let subnet =
            api.post("/v1/subnets", &json!({"vpcId": vpc["id"], "zone": "z1", "cidrBlock": cidr})).ok("subnet");
        (s(&vpc["id"]).to_string(), s(&subnet["id"]).to_string())
    };
    let (pvpc, psubnet) = network(&papi, "10.0.9.0/24");
    let service = papi
        .post(
            "/v1/vpcendpointservices",
            &json!({"name": "api", "vpcId": pvpc, "subnetIds": [psubnet],
                    "targets": [{"ipAddress": "10.0.1.5"}], "ports": [{"port": 443}]}),
        )
        .ok("service");
    let sid = s(&service["id"]).to_string();
    papi.post(&format!("/v1/vpcendpointservices/{sid}/permissions"), &json!({"addAllowedPrincipals": [consumer.id]}))
        .ok("allow");
    let cli = cp.cli(Some(&provider.api_key));
    let n = cli.json(&[
        "connection-notification",
        "create",
        "--service-id",
        &sid,
        "--event",
        "Connect",
        "--event",
        "Accept",
        "--webhook-url",
        &receiver.url("/hooks"),
        "--secret",
        "svc-secret",
    ]);
    let nid = s(&n["id"]).to_string();

    let (cvpc, csubnet) = network(&capi, "10.1.9.0/24");
    let endpoint = capi
        .post(
            "/v1/vpcendpoints",
            &json!({"vpcEndpointType": "Interface", "vpcId": cvpc, "subnetIds": [csubnet], "serviceName": service["serviceName"]}),
        )
        .ok("endpoint");
    let eid = s(&endpoint["id"]).to_string();
    papi.post(&format!("/v1/vpcendpointservices/{sid}/connections/accept"), &json!({"vpcEndpointIds": [eid]}))
        .ok("accept");

    let got = receiver.wait_for(4, Duration::from_secs(30));
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    for d in &got {
        assert!(verify(b"svc-secret", d.header("trellis-signature"), &d.body, now), "{d:?}");
    }
    let events: Vec<(String, String)> = got
        .iter()
        .map(|d| {
            (d.json()["eventType"].as_str().unwrap_or_default().to_string(), d.json()["vpcEndpointId"].to_string())
        })
        .collect();
    let connect = ("Connect".to_string(), format!("\"{eid}\""));
    let accept = ("Accept".to_string(), format!("\"{eid}\""));
    assert_eq!(events, [connect.clone(), connect.clone(), connect, accept], "Connect retried twice, then Accept");
    assert_eq!(got[3].json()["vpcEndpointState"], "Pending", "{:?}", got[3].json());

    let log = wait_until("both deliveries delivered", Duration::from_secs(10), || {
        let page = cli.json(&["connection-notification", "deliveries", &nid]);
        let items = page["items"].as_array()?.clone();
        (items.len() == 2 && items.iter().all(|i| i["state"] == "Delivered")).then_some(items)
    });
    let codes = |i: &Value| -> Vec<u64> {
        i["attempts"].as_array().unwrap().iter().map(|a| a["statusCode"].as_u64().unwrap_or(0)).collect()
    };
    // Newest first: Accept, then Connect with its three attempts.
    assert_eq!((log[0]["eventType"].as_str(), codes(&log[0])), (Some("Accept"), vec![204]));
    assert_eq!((log[1]["eventType"].as_str(), codes(&log[1])), (Some("Connect"), vec![500, 502, 204]));
}
