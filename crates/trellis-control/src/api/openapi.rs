//! `GET /v1/openapi.json`: an OpenAPI 3.1 document built from [`ROUTES`], the
//! table of every route the control plane serves (the agent and usage routes
//! included). A test checks the table against the router.

use axum::Json;
use serde_json::{Map, Value, json};

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    Anyone,
    Admin,
    Account,
    JoinToken,
    AgentCert,
}

/// One route of the API.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub caller: Caller,
    /// Whether the route takes a JSON body.
    pub body: bool,
}

const fn r(
    method: &'static str,
    path: &'static str,
    tag: &'static str,
    caller: Caller,
    body: bool,
    summary: &'static str,
) -> Route {
    Route { method, path, tag, summary, caller, body }
}

use Caller::*;

/// Every route, in the order the document lists them.
pub const ROUTES: &[Route] = &[
    r("post", "/v1/accounts", "accounts", Admin, true, "Create an account and its first API key"),
    r("get", "/v1/accounts", "accounts", Admin, false, "List accounts"),
    r("get", "/v1/accounts/{id}", "accounts", Admin, false, "Read an account"),
    r("patch", "/v1/accounts/{id}", "accounts", Admin, true, "Move an account into or out of an organization"),
    r("post", "/v1/accounts/{id}/apikeys", "accounts", Admin, false, "Create another API key for an account"),
    r("post", "/v1/organizations", "organizations", Admin, true, "Create an organization"),
    r("get", "/v1/organizations", "organizations", Admin, false, "List organizations"),
    r("get", "/v1/organizations/{id}", "organizations", Admin, false, "Read an organization"),
    r("post", "/v1/vpcs", "vpcs", Account, true, "Create a VPC"),
    r("get", "/v1/vpcs", "vpcs", Account, false, "List VPCs"),
    r("get", "/v1/vpcs/{id}", "vpcs", Account, false, "Read a VPC"),
    r("patch", "/v1/vpcs/{id}", "vpcs", Account, true, "Rename a VPC"),
    r("delete", "/v1/vpcs/{id}", "vpcs", Account, false, "Delete a VPC without subnets, gateways or endpoints"),
    r("post", "/v1/subnets", "subnets", Account, true, "Create a subnet (one zone and address pool of a VPC)"),
    r("get", "/v1/subnets", "subnets", Account, false, "List subnets (?vpcId=)"),
    r("get", "/v1/subnets/{id}", "subnets", Account, false, "Read a subnet"),
    r("delete", "/v1/subnets/{id}", "subnets", Account, false, "Delete an unused subnet"),
    r("post", "/v1/agent-tokens", "agents", Account, true, "Create a single-use join token for a subnet"),
    r("get", "/v1/agent-tokens", "agents", Account, false, "List join tokens (without secrets)"),
    r("get", "/v1/agent-tokens/{id}", "agents", Account, false, "Read a join token (without secret)"),
    r("delete", "/v1/agent-tokens/{id}", "agents", Account, false, "Revoke a join token"),
    r("get", "/v1/agents", "agents", Account, false, "List agents"),
    r("get", "/v1/agents/{id}", "agents", Account, false, "Read an agent"),
    r("delete", "/v1/agents/{id}", "agents", Account, false, "Remove an agent"),
    r("post", "/v1/agents/enroll", "agents", JoinToken, true, "Enroll an agent: join token + CSR → certificate"),
    r(
        "get",
        "/v1/agents/self/config",
        "agents",
        AgentCert,
        false,
        "Long-poll the agent's config (?after=&waitSeconds=)",
    ),
    r("post", "/v1/agents/self/report", "agents", AgentCert, true, "Report listener readiness and usage"),
    r("post", "/v1/resourcegateways", "resourcegateways", Account, true, "Create a resource gateway"),
    r("get", "/v1/resourcegateways", "resourcegateways", Account, false, "List resource gateways"),
    r("get", "/v1/resourcegateways/{id}", "resourcegateways", Account, false, "Read a resource gateway"),
    r("delete", "/v1/resourcegateways/{id}", "resourcegateways", Account, false, "Delete an unused resource gateway"),
    r(
        "post",
        "/v1/resourceconfigurations",
        "resourceconfigurations",
        Account,
        true,
        "Create a SINGLE, GROUP or CHILD resource configuration",
    ),
    r(
        "get",
        "/v1/resourceconfigurations",
        "resourceconfigurations",
        Account,
        false,
        "List own and shared resource configurations",
    ),
    r(
        "get",
        "/v1/resourceconfigurations/{id}",
        "resourceconfigurations",
        Account,
        false,
        "Read a resource configuration",
    ),
    r(
        "patch",
        "/v1/resourceconfigurations/{id}",
        "resourceconfigurations",
        Account,
        true,
        "Change port ranges or definition",
    ),
    r(
        "delete",
        "/v1/resourceconfigurations/{id}",
        "resourceconfigurations",
        Account,
        false,
        "Delete a resource configuration",
    ),
    r(
        "get",
        "/v1/resourceconfigurations/{id}/usage",
        "resourceconfigurations",
        Account,
        false,
        "Usage per consumer account and endpoint",
    ),
    r("post", "/v1/resourceshares", "resourceshares", Account, true, "Share resource configurations with accounts"),
    r("get", "/v1/resourceshares", "resourceshares", Account, false, "List own resource shares"),
    r("get", "/v1/resourceshares/{id}", "resourceshares", Account, false, "Read a resource share"),
    r("delete", "/v1/resourceshares/{id}", "resourceshares", Account, false, "Delete (revoke) a resource share"),
    r(
        "get",
        "/v1/resourceshareinvitations",
        "resourceshareinvitations",
        Account,
        false,
        "List received and sent invitations (?status=)",
    ),
    r("get", "/v1/resourceshareinvitations/{id}", "resourceshareinvitations", Account, false, "Read an invitation"),
    r(
        "post",
        "/v1/resourceshareinvitations/{id}/accept",
        "resourceshareinvitations",
        Account,
        false,
        "Accept a PENDING invitation",
    ),
    r(
        "post",
        "/v1/resourceshareinvitations/{id}/reject",
        "resourceshareinvitations",
        Account,
        false,
        "Reject a PENDING invitation",
    ),
    r("post", "/v1/vpcendpoints", "vpcendpoints", Account, true, "Create a Resource VPC endpoint"),
    r("get", "/v1/vpcendpoints", "vpcendpoints", Account, false, "List VPC endpoints (?vpcId=)"),
    r("get", "/v1/vpcendpoints/{id}", "vpcendpoints", Account, false, "Read a VPC endpoint"),
    r(
        "delete",
        "/v1/vpcendpoints/{id}",
        "vpcendpoints",
        Account,
        false,
        "Delete a VPC endpoint and free its addresses",
    ),
    r(
        "post",
        "/v1/domainverifications",
        "domainverifications",
        Account,
        true,
        "Start verifying a domain: answers the TXT record to publish",
    ),
    r("get", "/v1/domainverifications", "domainverifications", Account, false, "List domain verifications"),
    r("get", "/v1/domainverifications/{id}", "domainverifications", Account, false, "Read a domain verification"),
    r(
        "delete",
        "/v1/domainverifications/{id}",
        "domainverifications",
        Account,
        false,
        "Delete a domain verification (its domain stops counting as verified)",
    ),
    r("get", "/v1/openapi.json", "meta", Anyone, false, "This document"),
    r("get", "/v1/ca.pem", "meta", Anyone, false, "The CA certificate (PEM)"),
    r("get", "/healthz", "meta", Anyone, false, "Liveness: answers ok"),
];

fn operation(route: &Route) -> Value {
    let mut op = Map::new();
    op.insert("summary".into(), json!(route.summary));
    op.insert("tags".into(), json!([route.tag]));
    op.insert(
        "operationId".into(),
        json!(format!("{}{}", route.method, route.path.replace(['/', '{', '}', '-', '.'], "_"))),
    );
    let mut params = Vec::new();
    let mut rest = route.path;
    while let Some(start) = rest.find('{') {
        let end = rest[start..].find('}').map_or(rest.len(), |e| start + e);
        params
            .push(json!({"name": &rest[start + 1..end], "in": "path", "required": true, "schema": {"type": "string"}}));
        rest = &rest[end..];
    }
    let is_list =
        route.method == "get" && matches!(route.caller, Account | Admin) && route.path.matches('/').count() == 2;
    if is_list {
        params.push(
            json!({"name": "maxResults", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}),
        );
        params.push(json!({"name": "nextToken", "in": "query", "schema": {"type": "string"}}));
    }
    if !params.is_empty() {
        op.insert("parameters".into(), Value::Array(params));
    }
    if route.body {
        op.insert(
            "requestBody".into(),
            json!({"required": true, "content": {"application/json": {"schema": {"type": "object"}}}}),
        );
    }
    let security = match route.caller {
        Anyone | JoinToken => json!([]),
        Admin | Account => json!([{"apiKey": []}]),
        AgentCert => json!([{"agentCertificate": []}]),
    };
    op.insert("security".into(), security);
    let ok = match (route.method, route.path) {
        ("delete", _) | ("post", "/v1/agents/self/report") => "204",
        ("post", p) if !p.ends_with("/accept") && !p.ends_with("/reject") && !p.starts_with("/v1/agents/") => "201",
        _ => "200",
    };
    let error = json!({"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let mut responses = Map::new();
    let success = if ok == "204" {
        json!({"description": "success, no body"})
    } else {
        json!({"description": "success", "content": {"application/json": {"schema": {"type": "object"}}}})
    };
    responses.insert(ok.into(), success);
    if route.path == "/v1/agents/self/config" {
        responses.insert("304".into(), json!({"description": "no newer config within waitSeconds"}));
    }
    for code in ["400", "401", "403", "404", "409", "422"] {
        responses.insert(code.into(), error.clone());
    }
    op.insert("responses".into(), Value::Object(responses));
    Value::Object(op)
}

/// The OpenAPI 3.1 document of [`ROUTES`].
pub fn document() -> Value {
    let mut paths = Map::new();
    for route in ROUTES {
        let item = paths.entry(route.path).or_insert_with(|| Value::Object(Map::new()));
        item.as_object_mut().expect("path items are objects").insert(route.method.into(), operation(route));
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Trellis control plane API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Private resource connectivity (the VPC Lattice resources model). JSON, camelCase; \
                            errors are {\"code\", \"message\"}; creates take an optional clientToken."
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <api key>"},
                "agentCertificate": {"type": "mutualTLS", "description": "the agent's certificate from enrollment"}
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}}
                }
            }
        }
    })
}

pub async fn serve() -> Json<Value> {
    Json(document())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_once() {
        let doc = document();
        let mut seen = std::collections::BTreeSet::new();
        for route in ROUTES {
            assert!(seen.insert((route.method, route.path)), "{} {} listed twice", route.method, route.path);
            assert!(doc["paths"][route.path][route.method].is_object());
        }
        assert_eq!(doc["openapi"], "3.1.0");
        let params = &doc["paths"]["/v1/resourceshareinvitations/{id}/accept"]["post"]["parameters"];
        assert_eq!(params[0]["name"], "id");
    }
}
