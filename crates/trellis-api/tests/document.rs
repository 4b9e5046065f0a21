//! The OpenAPI document generated from the route table and the types:
//! complete, with real schemas everywhere a route takes or answers JSON.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use trellis_api::check::validate;
use trellis_api::openapi::{document, schema_name_conflicts};
use trellis_api::route::Answer;

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => doc.pointer(&r[1..]).unwrap_or_else(|| panic!("$ref {r} resolves to nothing")),
        None => schema,
    }
}

/// Every `$ref` under `value`.
fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            if let Some(r) = map.get("$ref").and_then(Value::as_str) {
                out.push(r);
            }
            map.values().for_each(|v| refs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

/// Schemas under `value` that say `object` and nothing about its fields.
fn bare_objects(value: &Value, at: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            let is_object = map
                .get("type")
                .is_some_and(|t| t == "object" || t.as_array().is_some_and(|a| a.contains(&json!("object"))));
            let described = ["properties", "additionalProperties", "oneOf", "anyOf", "allOf", "$ref"]
                .iter()
                .any(|k| map.contains_key(*k));
            if is_object && !described {
                out.push(at.to_string());
            }
            for (k, v) in map {
                bare_objects(v, &format!("{at}/{k}"), out);
            }
        }
        Value::Array(items) => items.iter().enumerate().for_each(|(i, v)| bare_objects(v, &format!("{at}/{i}"), out)),
        _ => {}
    }
}

#[test]
fn every_route_is_documented_once() {
    let doc = document();
    let mut seen = BTreeSet::new();
    for route in trellis_api::routes() {
        assert!(seen.insert((route.method, route.path)), "{:?} {} listed twice", route.method, route.path);
        let op = &doc["paths"][route.path][route.method.as_str()];
        assert!(op.is_object(), "{:?} {} is not in the document", route.method, route.path);
        assert!(op["responses"][route.status.to_string()].is_object(), "{} lacks its success status", route.path);
    }
    assert_eq!(doc["openapi"], "3.1.0");
    let params = &doc["paths"]["/v1/resourceshareinvitations/{id}/accept"]["post"]["parameters"];
    assert_eq!(params[0]["name"], "id");
}

#[test]
fn outcomes_beside_success_are_documented() {
    let doc = document();
    let responses = |path: &str, method: &str| doc["paths"][path][method]["responses"].clone();
    let create = responses("/v1/vpcs", "post");
    assert_eq!(create["200"]["content"], create["201"]["content"], "a clientToken replay answers the same object");
    assert!(create["413"].is_object() && create["422"]["content"].is_object());
    assert!(responses("/v1/resourceshares", "post")["429"]["content"].is_object());
    assert!(responses("/v1/agents/self/config", "get")["304"].is_object());
    let token = responses("/v1/agent-tokens", "post");
    assert!(token["200"].is_null(), "join tokens take no clientToken, so are never replayed");
    assert!(responses("/v1/vpcs/{id}", "get")["413"].is_null(), "no body, no 413");
}

#[test]
fn every_body_and_answer_is_an_object_schema_with_fields() {
    let doc = document();
    for route in trellis_api::routes() {
        let op = &doc["paths"][route.path][route.method.as_str()];
        let body = &op["requestBody"]["content"]["application/json"]["schema"];
        assert_eq!(route.body.is_some(), !body.is_null(), "{} {}", route.method.as_str(), route.path);
        let answer = &op["responses"][route.status.to_string()]["content"]["application/json"]["schema"];
        assert_eq!(
            matches!(route.answer, Answer::Json(_)),
            !answer.is_null(),
            "{} {}",
            route.method.as_str(),
            route.path
        );
        for schema in [body, answer].into_iter().filter(|s| !s.is_null()) {
            let resolved = resolve(&doc, schema);
            assert_eq!(resolved["type"], "object", "{} {}: {resolved}", route.method.as_str(), route.path);
            let fields = resolved["properties"].as_object().map_or(0, |p| p.len());
            assert!(fields > 0, "{} {} has a schema without fields: {resolved}", route.method.as_str(), route.path);
        }
    }
    let mut bare = Vec::new();
    bare_objects(&doc, "#", &mut bare);
    assert!(bare.is_empty(), "bare `object` schemas: {bare:?}");
}

#[test]
fn every_reference_resolves_and_no_schema_name_means_two_schemas() {
    let doc = document();
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.len() > 50, "{} refs", all.len());
    for r in all {
        assert!(r.strip_prefix('#').and_then(|p| doc.pointer(p)).is_some(), "{r} resolves to nothing");
    }
    assert_eq!(schema_name_conflicts(), Vec::<String>::new());
}

#[test]
fn list_routes_document_their_paging_and_filters_as_query_parameters() {
    let doc = document();
    let names = |path: &str| -> Vec<String> {
        doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["in"] == "query")
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("/v1/vpcs"), ["maxResults", "nextToken"]);
    assert_eq!(names("/v1/subnets"), ["maxResults", "nextToken", "vpcId"]);
    assert_eq!(names("/v1/agents"), ["maxResults", "nextToken", "subnetId", "vpcId"]);
    assert_eq!(names("/v1/resourceshareinvitations"), ["maxResults", "nextToken", "status"]);
    assert_eq!(names("/v1/agents/self/config"), ["after", "have", "waitSeconds"]);
    let max = &doc["paths"]["/v1/vpcs"]["get"]["parameters"][0]["schema"];
    assert_eq!((max["type"].as_str(), &max["maximum"]), (Some("integer"), &json!(1000)));
    let status = &doc["paths"]["/v1/resourceshareinvitations"]["get"]["parameters"][2]["schema"];
    assert_eq!(status["enum"], json!(["PENDING", "ACCEPTED", "REJECTED"]));
}

/// The bodies of DESIGN.md's main flow fit the documented request schemas,
/// and the schemas refuse what the handlers refuse.
#[test]
fn the_documented_flow_bodies_fit_their_schemas() {
    use trellis_api::{configurations, endpoints, gateways, shares, subnets, vpcs};
    let doc = document();
    let body = |route: &trellis_api::RouteInfo| {
        doc["paths"][route.path][route.method.as_str()]["requestBody"]["content"]["application/json"]["schema"].clone()
    };
    let fits = [
        (&vpcs::CREATE.info, json!({"name": "prod"})),
        (&subnets::CREATE.info, json!({"vpcId": "vpc-0123456789abcdef0", "zone": "z1", "cidrBlock": "10.0.9.0/24"})),
        (
            &gateways::CREATE.info,
            json!({"name": "gw", "vpcIdentifier": "vpc-0123456789abcdef0", "subnetIds": ["subnet-0123456789abcdef0"]}),
        ),
        (
            &configurations::CREATE.info,
            json!({"name": "db", "type": "SINGLE", "resourceGatewayIdentifier": "rgw-0123456789abcdef0",
                   "resourceConfigurationDefinition": {"ipResource": {"ipAddress": "10.0.0.10"}},
                   "portRanges": ["5432"], "protocol": "TCP"}),
        ),
        (&shares::CREATE.info, json!({"name": "s", "resourceArns": ["arn:x"], "principals": ["acct-123456789012"]})),
        (
            &endpoints::CREATE.info,
            json!({"vpcEndpointType": "Resource", "vpcId": "vpc-0123456789abcdef0", "subnetIds": ["subnet-0123456789abcdef0"],
                   "resourceConfigurationArn": "arn:x", "clientToken": null}),
        ),
    ];
    for (route, value) in &fits {
        assert_eq!(validate(&doc, &body(route), value), Ok(()), "{} {value}", route.path);
    }
    let refused = [
        (&vpcs::CREATE.info, json!({"name": "prod", "tags": []}), "no such field"),
        (&vpcs::CREATE.info, json!({}), "required field name"),
        (&configurations::CREATE.info, json!({"name": "db", "type": "TRIPLE"}), "not one of"),
        (&shares::CREATE.info, json!({"name": "s", "principals": null}), "not of type"),
        (
            &endpoints::CREATE.info,
            json!({"vpcEndpointType": "Gateway", "vpcId": "v", "subnetIds": [], "resourceConfigurationArn": "a"}),
            "not one of",
        ),
    ];
    for (route, value, why) in &refused {
        let err = validate(&doc, &body(route), value).expect_err(&value.to_string());
        assert!(err.contains(why), "{value}: {err}");
    }
}
