//! The OpenAPI 3.1 document of every route in [`crate::routes`], with the
//! JSON Schemas (2020-12) of their bodies, queries and answers generated from
//! the types the handlers and the CLI use.
//!
//! Request bodies and queries are described as the server deserializes them,
//! answers as it serializes them: two generators, whose named schemas land
//! side by side in `components/schemas` (a test checks no name means two
//! different schemas).

use schemars::SchemaGenerator;
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use crate::meta::ErrorBody;
use crate::route::{Answer, Caller, RouteInfo};

fn settings() -> SchemaSettings {
    SchemaSettings::draft2020_12().with(|s| {
        s.definitions_path = "/components/schemas".into();
        s.meta_schema = None;
    })
}

/// The schema generators of one document.
struct Generators {
    requests: SchemaGenerator,
    answers: SchemaGenerator,
    /// Queries become parameters, so their schemas are inlined.
    queries: SchemaGenerator,
}

impl Generators {
    fn new() -> Self {
        Self {
            requests: settings().for_deserialize().into_generator(),
            answers: settings().for_serialize().into_generator(),
            queries: settings().with(|s| s.inline_subschemas = true).for_deserialize().into_generator(),
        }
    }

    /// The named schemas of both generators, and the names that mean two different schemas.
    fn components(mut self) -> (Map<String, Value>, Vec<String>) {
        let mut schemas = self.requests.take_definitions(true);
        let mut conflicts = Vec::new();
        for (name, schema) in self.answers.take_definitions(true) {
            match schemas.get(&name) {
                Some(existing) if *existing != schema => conflicts.push(name),
                Some(_) => {}
                None => {
                    schemas.insert(name, schema);
                }
            }
        }
        (schemas, conflicts)
    }
}

/// The schema `schema` refers to (itself when it is no `$ref`) among `definitions`.
fn resolve<'a>(definitions: &'a Map<String, Value>, schema: &'a Value) -> &'a Value {
    schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
        .and_then(|name| definitions.get(name))
        .unwrap_or(schema)
}

fn operation_id(route: &RouteInfo) -> String {
    format!("{}{}", route.method.as_str(), route.path.replace(['/', '{', '}', '-', '.'], "_"))
}

/// `schema` without the `null` an `Option` adds: a query parameter is absent, never null.
fn not_null(mut schema: Value) -> Value {
    if let Some(types) = schema.get_mut("type").and_then(Value::as_array_mut) {
        types.retain(|t| t != "null");
        if let [only] = types.as_slice() {
            schema["type"] = only.clone();
        }
    }
    if let Some(options) = schema.get_mut("enum").and_then(Value::as_array_mut) {
        options.retain(|o| !o.is_null());
    }
    if let Some(any) = schema.get("anyOf").and_then(Value::as_array)
        && let [one, null] = any.as_slice()
        && null == &json!({"type": "null"})
    {
        let mut one = one.clone();
        if let (Some(one), Some(outer)) = (one.as_object_mut(), schema.as_object()) {
            one.extend(outer.iter().filter(|(k, _)| *k != "anyOf").map(|(k, v)| (k.clone(), v.clone())));
        }
        return one;
    }
    schema
}

fn parameters(route: &RouteInfo, g: &mut Generators) -> Vec<Value> {
    let mut params = Vec::new();
    if route.has_id() {
        params.push(json!({
            "name": "id", "in": "path", "required": true, "schema": {"type": "string"},
            "description": "the object's id (or its ARN, where the route accepts one)"
        }));
    }
    if let Some(query) = route.query {
        let schema = query(&mut g.queries).to_value();
        let required = schema.get("required").and_then(Value::as_array).cloned().unwrap_or_default();
        for (name, property) in schema.get("properties").and_then(Value::as_object).into_iter().flatten() {
            let mut property = not_null(property.clone());
            let description = property.as_object_mut().and_then(|p| p.remove("description"));
            let mut param = json!({
                "name": name, "in": "query", "required": required.contains(&json!(name)), "schema": property
            });
            if let Some(description) = description {
                param["description"] = description;
            }
            params.push(param);
        }
    }
    params
}

fn operation(route: &RouteInfo, g: &mut Generators) -> Value {
    let mut op = Map::new();
    op.insert("summary".into(), json!(route.summary));
    op.insert("tags".into(), json!([route.tag]));
    op.insert("operationId".into(), json!(operation_id(route)));
    let params = parameters(route, g);
    if !params.is_empty() {
        op.insert("parameters".into(), Value::Array(params));
    }
    let mut replayable = false;
    if let Some(body) = route.body {
        let schema = body(&mut g.requests).to_value();
        replayable = resolve(g.requests.definitions(), &schema)["properties"].get("clientToken").is_some();
        op.insert("requestBody".into(), json!({"required": true, "content": {"application/json": {"schema": schema}}}));
    }
    let security = match route.caller {
        Caller::Anyone | Caller::JoinToken => json!([]),
        Caller::Admin | Caller::Account => json!([{"apiKey": []}]),
        Caller::AgentCert => json!([{"agentCertificate": []}]),
        Caller::RelayCert => json!([{"relayCertificate": []}]),
    };
    op.insert("security".into(), security);
    let mut responses = Map::new();
    let content = match route.answer {
        Answer::Empty => None,
        Answer::Json(answer) => Some(json!({"application/json": {"schema": answer(&mut g.answers).to_value()}})),
        Answer::Text(content_type) => Some(json!({content_type: {"schema": {"type": "string"}}})),
    };
    match &content {
        None => responses.insert(route.status.to_string(), json!({"description": "success, no body"})),
        Some(content) => {
            responses.insert(route.status.to_string(), json!({"description": "success", "content": content}))
        }
    };
    if replayable && route.status == 201 {
        responses.insert(
            "200".into(),
            json!({"description": "the object an earlier create with the same clientToken made", "content": content}),
        );
    }
    let error = g.answers.subschema_for::<ErrorBody>().to_value();
    let error = |description: &str| json!({"description": description, "content": {"application/json": {"schema": error.clone()}}});
    for code in ["400", "401", "403", "404", "409", "422"] {
        responses.insert(code.into(), error("error"));
    }
    if route.body.is_some() {
        responses.insert("413".into(), error("the body is over the listener's limit"));
    }
    for (status, description) in route.also {
        let answer = if *status >= 400 { error(description) } else { json!({"description": description}) };
        responses.insert(status.to_string(), answer);
    }
    op.insert("responses".into(), Value::Object(responses));
    Value::Object(op)
}

fn build() -> (Value, Vec<String>) {
    let mut g = Generators::new();
    let mut paths = Map::new();
    for route in crate::routes() {
        let item = paths.entry(route.path).or_insert_with(|| json!({}));
        item.as_object_mut()
            .expect("path items are objects")
            .insert(route.method.as_str().into(), operation(route, &mut g));
    }
    let (schemas, conflicts) = g.components();
    let doc = json!({
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
                "agentCertificate": {"type": "mutualTLS", "description": "the agent's certificate from enrollment"},
                "relayCertificate": {"type": "mutualTLS", "description": "the relay's certificate from enrollment"}
            },
            "schemas": schemas
        }
    });
    (doc, conflicts)
}

/// The OpenAPI 3.1 document of every route.
pub fn document() -> Value {
    build().0
}

/// Schema names that the request side and the answer side use for two
/// different schemas (the document keeps the request side's); should be none.
pub fn schema_name_conflicts() -> Vec<String> {
    build().1
}
