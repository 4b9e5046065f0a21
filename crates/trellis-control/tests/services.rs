//! Endpoint services on the router: publish, allow, connect, accept or
//! reject; who sees what; bad input names its field and creates nothing.

mod support;

use axum::http::StatusCode;
use serde_json::{Value, json};
use support::{Acct, Api};

/// A VPC with one subnet in `zone` of `account`.
async fn network(api: &Api, who: &Acct, zone: &str, cidr: &str) -> (String, String) {
    let vpc = api.create("/v1/vpcs", &who.key, json!({"name": "net"})).await;
    let subnet =
        api.create("/v1/subnets", &who.key, json!({"vpcId": vpc["id"], "zone": zone, "cidrBlock": cidr})).await;
    (vpc["id"].as_str().unwrap().into(), subnet["id"].as_str().unwrap().into())
}

fn service_body(vpc: &str, subnet: &str) -> Value {
    json!({
        "name": "orders-api", "vpcId": vpc, "subnetIds": [subnet],
        "targets": [{"ipAddress": "10.0.1.5"}, {"domainName": "api-2.internal"}],
        "ports": [{"port": 443, "targetPort": 8443}],
        "healthCheck": {"protocol": "HTTP", "path": "/healthz", "intervalSeconds": 5, "timeoutSeconds": 2},
    })
}

fn endpoint_body(vpc: &str, subnet: &str, service_name: &Value) -> Value {
    json!({"vpcEndpointType": "Interface", "vpcId": vpc, "subnetIds": [subnet], "serviceName": service_name})
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[tokio::test]
async fn a_consumer_connects_once_allowed_and_accepted_and_nobody_else_sees_the_service() {
    let api = Api::new();
    let (provider, consumer, stranger) = (api.account("saas").await, api.account("acme").await, api.account("x").await);
    let (pvpc, psubnet) = network(&api, &provider, "z1", "10.0.9.0/24").await;
    let service = api.create("/v1/vpcendpointservices", &provider.key, service_body(&pvpc, &psubnet)).await;
    let sid = str_of(&service, "serviceId").to_string();
    assert!(str_of(&service, "serviceName").ends_with(&sid), "{service}");
    assert_eq!(service["acceptanceRequired"], true, "AWS's default");
    assert_eq!(service["loadBalancing"], "LEAST_CONNECTIONS");
    assert_eq!(service["healthCheck"]["healthyThresholdCount"], 5, "defaults fill what is not given");
    let (cvpc, csubnet) = network(&api, &consumer, "z1", "10.1.9.0/24").await;

    // Not allowed yet: the consumer sees nothing and cannot connect.
    let (status, _) = api.get(&format!("/v1/vpcendpointservices/{sid}"), &consumer.key).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, available) = api.get("/v1/vpcendpointservices/available", &consumer.key).await;
    assert_eq!(available["items"], json!([]), "{available}");
    let (status, refused) = api
        .call("POST", "/v1/vpcendpoints", &consumer.key, Some(endpoint_body(&cvpc, &csubnet, &service["serviceName"])))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert_eq!(refused["code"], "InvalidServiceName", "{refused}");

    let (status, perms) = api
        .call(
            "POST",
            &format!("/v1/vpcendpointservices/{sid}/permissions"),
            &provider.key,
            Some(json!({"addAllowedPrincipals": [consumer.id]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{perms}");
    assert_eq!(perms["allowedPrincipals"], json!([consumer.id]));
    let (_, available) = api.get("/v1/vpcendpointservices/available", &consumer.key).await;
    assert_eq!(available["items"][0]["serviceName"], service["serviceName"], "{available}");
    assert_eq!(available["items"][0]["ports"], json!([443]));
    assert_eq!(available["items"][0]["zones"], json!(["z1"]));
    assert!(available["items"][0].get("targets").is_none(), "a consumer never sees the targets");

    let endpoint =
        api.create("/v1/vpcendpoints", &consumer.key, endpoint_body(&cvpc, &csubnet, &service["serviceName"])).await;
    let eid = str_of(&endpoint, "id").to_string();
    assert_eq!(endpoint["state"], "PendingAcceptance", "{endpoint}");
    assert_eq!(endpoint["vpcEndpointType"], "Interface");
    assert_eq!(endpoint["serviceId"], json!(sid));
    let names: Vec<&str> = endpoint["dnsEntries"].as_array().unwrap().iter().map(|e| str_of(e, "dnsName")).collect();
    assert!(names.contains(&format!("{eid}.{sid}.local.trellis.internal").as_str()), "regional name: {names:?}");
    assert!(names.contains(&format!("{eid}-z1.{sid}.local.trellis.internal").as_str()), "zonal name: {names:?}");

    // The stranger: 404 for the service, 4xx for an endpoint, nothing in its lists.
    let (status, _) = api.get(&format!("/v1/vpcendpointservices/{sid}/connections"), &stranger.key).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (svpc, ssubnet) = network(&api, &stranger, "z1", "10.2.9.0/24").await;
    let (status, _) =
        api.call("POST", "/v1/vpcendpoints", &stranger.key, Some(endpoint_body(&svpc, &ssubnet, &json!(sid)))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = api
        .call(
            "POST",
            &format!("/v1/vpcendpointservices/{sid}/connections/accept"),
            &consumer.key,
            Some(json!({"vpcEndpointIds": [eid]})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "only the provider accepts");

    let (_, connections) = api.get(&format!("/v1/vpcendpointservices/{sid}/connections"), &provider.key).await;
    assert_eq!(connections["items"][0]["vpcEndpointId"], json!(eid), "{connections}");
    assert_eq!(connections["items"][0]["vpcEndpointOwner"], json!(consumer.id));
    assert_eq!(connections["items"][0]["vpcEndpointState"], "PendingAcceptance");

    let accept_path = format!("/v1/vpcendpointservices/{sid}/connections/accept");
    let accept = |ids: Value| api.call("POST", &accept_path, &provider.key, Some(json!({"vpcEndpointIds": ids})));
    // An id that is not an endpoint of this service (another provider's, or none): 422, nothing moves.
    let (status, refused) = accept(json!([eid, "vpce-0123456789abcdef0"])).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert!(str_of(&refused, "message").contains("vpcEndpointIds: vpce-0123456789abcdef0"), "{refused}");
    let (_, endpoint) = api.get(&format!("/v1/vpcendpoints/{eid}"), &consumer.key).await;
    assert_eq!(endpoint["state"], "PendingAcceptance", "nothing moved");
    let (status, outcome) = accept(json!([eid])).await;
    assert_eq!((status, &outcome["unsuccessful"]), (StatusCode::OK, &json!([])), "{outcome}");
    let (_, endpoint) = api.get(&format!("/v1/vpcendpoints/{eid}"), &consumer.key).await;
    assert_eq!(endpoint["state"], "Pending", "accepted: the consumer's agent brings it to Available");

    // The service cannot go while an endpoint uses it; rejecting cuts the endpoint off.
    let (status, _) = api.call("DELETE", &format!("/v1/vpcendpointservices/{sid}"), &provider.key, None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = api
        .call(
            "POST",
            &format!("/v1/vpcendpointservices/{sid}/connections/reject"),
            &provider.key,
            Some(json!({"vpcEndpointIds": [eid]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, endpoint) = api.get(&format!("/v1/vpcendpoints/{eid}"), &consumer.key).await;
    assert_eq!(endpoint["state"], "Rejected");
    let (_, outcome) = accept(json!([eid])).await;
    assert!(str_of(&outcome["unsuccessful"][0], "error").contains("Rejected"), "{outcome}");
    let (status, _) = api.call("DELETE", &format!("/v1/vpcendpointservices/{sid}"), &provider.key, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn removing_a_principal_fails_its_endpoints_and_own_or_unaccepted_services_connect_at_once() {
    let api = Api::new();
    let (provider, consumer) = (api.account("saas").await, api.account("acme").await);
    let (pvpc, psubnet) = network(&api, &provider, "z1", "10.0.9.0/24").await;
    let mut body = service_body(&pvpc, &psubnet);
    body["acceptanceRequired"] = json!(false);
    let service = api.create("/v1/vpcendpointservices", &provider.key, body).await;
    let sid = str_of(&service, "id").to_string();
    let perms = format!("/v1/vpcendpointservices/{sid}/permissions");
    api.call("POST", &perms, &provider.key, Some(json!({"addAllowedPrincipals": ["*"]}))).await;

    let (cvpc, csubnet) = network(&api, &consumer, "z1", "10.1.9.0/24").await;
    let endpoint = api.create("/v1/vpcendpoints", &consumer.key, endpoint_body(&cvpc, &csubnet, &json!(sid))).await;
    assert_eq!(endpoint["state"], "Pending", "no acceptance needed: {endpoint}");
    let own = api.create("/v1/vpcendpoints", &provider.key, endpoint_body(&pvpc, &psubnet, &json!(sid))).await;
    assert_eq!(own["state"], "Pending");

    let (status, _) = api.call("POST", &perms, &provider.key, Some(json!({"removeAllowedPrincipals": ["*"]}))).await;
    assert_eq!(status, StatusCode::OK);
    let (_, endpoint) = api.get(&format!("/v1/vpcendpoints/{}", str_of(&endpoint, "id")), &consumer.key).await;
    assert_eq!(endpoint["state"], "Failed", "{endpoint}");
    assert!(str_of(&endpoint, "failureReason").contains("no longer allowed"), "{endpoint}");
    let (_, own) = api.get(&format!("/v1/vpcendpoints/{}", str_of(&own, "id")), &provider.key).await;
    assert_eq!(own["state"], "Pending", "the provider's own endpoint needs no permission");
    let (status, _) = api.get(&format!("/v1/vpcendpointservices/{sid}"), &consumer.key).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_service_input_names_the_field_and_creates_nothing() {
    let api = Api::new();
    let provider = api.account("saas").await;
    let (vpc, subnet) = network(&api, &provider, "z1", "10.0.9.0/24").await;
    let base = service_body(&vpc, &subnet);
    let with = |key: &str, value: Value| {
        let mut b = base.clone();
        b[key] = value;
        b
    };
    let cases = [
        (with("targets", json!([])), "targets"),
        (with("targets", json!([{"ipAddress": "10.0.0.300"}])), "targets[0].ipAddress"),
        (with("targets", json!([{"ipAddress": "10.0.0.3", "domainName": "x.internal"}])), "exactly one"),
        (with("targets", json!([{"ipAddress": "0.0.0.0"}])), "targets"),
        (with("ports", json!([{"port": 0}])), "ports"),
        (with("ports", json!([{"port": 443}, {"port": 443}])), "twice"),
        (with("healthCheck", json!({"intervalSeconds": 1})), "healthCheck.intervalSeconds"),
        (with("healthCheck", json!({"protocol": "ICMP"})), "healthCheck.protocol"),
        (with("loadBalancing", json!("RANDOM")), "loadBalancing"),
        (with("proxyProtocol", json!("V3")), "proxyProtocol"),
        (with("perConsumerLimits", json!({"maxConnections": 0})), "perConsumerLimits.maxConnections"),
        (with("privateDnsName", json!("api.orders.example")), "not under a verified domain"),
        (with("privateDnsName", json!("api.trellis.internal")), "privateDnsName"),
        (with("subnetIds", json!(["subnet-0123456789abcdef0"])), "subnet"),
        (with("colour", json!("blue")), "colour"),
    ];
    for (body, field) in cases {
        let (status, err) = api.call("POST", "/v1/vpcendpointservices", &provider.key, Some(body.clone())).await;
        assert!(status.is_client_error(), "{body} → {status} {err}");
        assert!(err["message"].as_str().unwrap_or_default().contains(field), "{body} → {err} should name {field}");
    }
    let (_, list) = api.get("/v1/vpcendpointservices", &provider.key).await;
    assert_eq!(list["items"], json!([]), "nothing was created");

    let service = api.create("/v1/vpcendpointservices", &provider.key, base).await;
    let sid = str_of(&service, "id");
    let perms = format!("/v1/vpcendpointservices/{sid}/permissions");
    let (status, err) =
        api.call("POST", &perms, &provider.key, Some(json!({"addAllowedPrincipals": ["everyone"]}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(str_of(&err, "message").contains("addAllowedPrincipals"), "{err}");
    let (status, err) =
        api.call("PATCH", &format!("/v1/vpcendpointservices/{sid}"), &provider.key, Some(json!({"ports": []}))).await;
    assert!(status.is_client_error(), "{err}");
    let (_, unchanged) = api.get(&format!("/v1/vpcendpointservices/{sid}"), &provider.key).await;
    assert_eq!(unchanged["ports"], service["ports"], "a failed update changes nothing");
    let (status, updated) = api
        .call(
            "PATCH",
            &format!("/v1/vpcendpointservices/{sid}"),
            &provider.key,
            Some(json!({"loadBalancing": "ROUND_ROBIN", "perConsumerLimits": {"maxConnections": 3}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(
        (&updated["loadBalancing"], &updated["perConsumerLimits"]["maxConnections"]),
        (&json!("ROUND_ROBIN"), &json!(3))
    );
}

#[tokio::test]
async fn resource_configurations_take_proxy_protocol_and_consumer_limits() {
    let api = Api::new();
    let owner = api.account("owner").await;
    let (vpc, subnet) = network(&api, &owner, "z1", "10.0.9.0/24").await;
    let gw = api
        .create("/v1/resourcegateways", &owner.key, json!({"name": "gw", "vpcIdentifier": vpc, "subnetIds": [subnet]}))
        .await;
    let config = api
        .create(
            "/v1/resourceconfigurations",
            &owner.key,
            json!({
                "name": "db", "type": "SINGLE", "resourceGatewayIdentifier": gw["id"],
                "resourceConfigurationDefinition": {"ipResource": {"ipAddress": "10.0.0.10"}},
                "portRanges": ["5432"], "proxyProtocol": "V2", "perConsumerLimits": {"maxConnections": 5}
            }),
        )
        .await;
    assert_eq!(config["proxyProtocol"], "V2", "{config}");
    assert_eq!(config["perConsumerLimits"]["maxConnections"], 5);
    let path = format!("/v1/resourceconfigurations/{}", str_of(&config, "id"));
    let (status, updated) =
        api.call("PATCH", &path, &owner.key, Some(json!({"proxyProtocol": "NONE", "perConsumerLimits": {}}))).await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["proxyProtocol"], "NONE");
    assert!(updated.get("perConsumerLimits").is_none(), "{{}} removes the limits: {updated}");
    let (status, err) =
        api.call("PATCH", &path, &owner.key, Some(json!({"perConsumerLimits": {"maxBitsPerSecond": 10}}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(str_of(&err, "message").contains("maxBitsPerSecond"), "{err}");
}

#[tokio::test]
async fn available_pages_through_services_allowed_by_id_by_star_and_owned() {
    let api = Api::new();
    let (provider, consumer) = (api.account("saas").await, api.account("acme").await);
    let (vpc, subnet) = network(&api, &provider, "z1", "10.0.9.0/24").await;
    let mut ids = Vec::new();
    for principal in [consumer.id.as_str(), "*", consumer.id.as_str()] {
        let service = api.create("/v1/vpcendpointservices", &provider.key, service_body(&vpc, &subnet)).await;
        let id = str_of(&service, "id").to_string();
        let perms = format!("/v1/vpcendpointservices/{id}/permissions");
        api.call("POST", &perms, &provider.key, Some(json!({"addAllowedPrincipals": [principal]}))).await;
        ids.push(id);
    }
    let (cvpc, csubnet) = network(&api, &consumer, "z1", "10.1.9.0/24").await;
    let mut own = service_body(&cvpc, &csubnet);
    own["name"] = json!("own");
    ids.push(str_of(&api.create("/v1/vpcendpointservices", &consumer.key, own).await, "id").to_string());
    ids.sort();

    let mut seen = Vec::new();
    let mut path = "/v1/vpcendpointservices/available?maxResults=3".to_string();
    loop {
        let (status, page) = api.get(&path, &consumer.key).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(page["items"].as_array().unwrap().iter().map(|i| str_of(i, "serviceId").to_string()));
        match page["nextToken"].as_str() {
            Some(token) => path = format!("/v1/vpcendpointservices/available?maxResults=3&nextToken={token}"),
            None => break,
        }
    }
    assert_eq!(seen, ids, "every allowed or own service once, in order");
    let stranger = api.account("x").await;
    let (_, page) = api.get("/v1/vpcendpointservices/available", &stranger.key).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "a stranger sees only the * service: {page}");
}

#[tokio::test]
async fn the_service_lifecycle_records_connect_accept_reject_and_delete_in_order() {
    let api = Api::new();
    let (provider, consumer) = (api.account("saas").await, api.account("acme").await);
    let (pvpc, psubnet) = network(&api, &provider, "z1", "10.0.9.0/24").await;
    let service = api.create("/v1/vpcendpointservices", &provider.key, service_body(&pvpc, &psubnet)).await;
    let sid = str_of(&service, "id").to_string();
    let perms = format!("/v1/vpcendpointservices/{sid}/permissions");
    api.call("POST", &perms, &provider.key, Some(json!({"addAllowedPrincipals": [consumer.id]}))).await;
    let n = api
        .create(
            "/v1/connectionnotifications",
            &provider.key,
            json!({"serviceId": sid, "connectionEvents": ["Connect", "Accept", "Reject", "Delete"],
                   "url": "https://hooks.example.com/trellis", "secret": "s"}),
        )
        .await;
    let (cvpc, csubnet) = network(&api, &consumer, "z1", "10.1.9.0/24").await;
    let endpoint =
        api.create("/v1/vpcendpoints", &consumer.key, endpoint_body(&cvpc, &csubnet, &service["serviceName"])).await;
    let eid = str_of(&endpoint, "id");
    for verb in ["accept", "reject"] {
        let path = format!("/v1/vpcendpointservices/{sid}/connections/{verb}");
        let (status, _) = api.call("POST", &path, &provider.key, Some(json!({"vpcEndpointIds": [eid]}))).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, _) = api.call("DELETE", &format!("/v1/vpcendpoints/{eid}"), &consumer.key, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let path = format!("/v1/connectionnotifications/{}/deliveries", str_of(&n, "id"));
    let (status, log) = api.get(&path, &provider.key).await;
    assert_eq!(status, StatusCode::OK, "{log}");
    let mut events: Vec<(String, String)> = log["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (str_of(d, "eventType").to_string(), str_of(&d["event"], "vpcEndpointState").to_string()))
        .collect();
    events.reverse(); // the log is newest first
    let expected =
        [("Connect", "PendingAcceptance"), ("Accept", "Pending"), ("Reject", "Rejected"), ("Delete", "Rejected")]
            .map(|(e, s)| (e.to_string(), s.to_string()));
    assert_eq!(events, expected, "{log}");
}
