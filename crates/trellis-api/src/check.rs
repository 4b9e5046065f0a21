//! A small JSON Schema check: does a value fit a schema of the OpenAPI
//! document? Types, `required` and unknown properties, `enum` and `const`,
//! array items, `oneOf`/`anyOf`/`allOf`, number bounds, and `$ref`s into the
//! document. Patterns and formats are not checked.
//!
//! Tests hold bodies to the document with it: the CLI's request bodies
//! ([`validate`]), the handlers' answers ([`validate_answer`], which also
//! refuses fields the schema does not name).

use serde_json::Value;

/// Checks `value` against `schema`, resolving `$ref`s in `doc`; the error names where it does not fit.
pub fn validate(doc: &Value, schema: &Value, value: &Value) -> Result<(), String> {
    Check { doc, closed: false }.check(schema, value, "$")
}

/// [`validate`] for an answer: a field the schema does not name is an error
/// too (answer schemas do not say `additionalProperties: false`).
pub fn validate_answer(doc: &Value, schema: &Value, value: &Value) -> Result<(), String> {
    Check { doc, closed: true }.check(schema, value, "$")
}

struct Check<'a> {
    doc: &'a Value,
    /// Whether objects may hold only the fields their schema names.
    closed: bool,
}

fn type_matches(name: &str, value: &Value) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "number" => value.is_number(),
        "integer" => value.is_i64() || value.is_u64(),
        "string" => value.is_string(),
        _ => false,
    }
}

impl Check<'_> {
    fn check(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let schema = match schema {
            Value::Bool(true) => return Ok(()),
            Value::Bool(false) => return Err(format!("{at}: no value is allowed here")),
            Value::Object(schema) => schema,
            other => return Err(format!("{at}: {other} is not a schema")),
        };
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            let target = reference
                .strip_prefix('#')
                .and_then(|pointer| self.doc.pointer(pointer))
                .ok_or_else(|| format!("{at}: $ref {reference} names no schema of the document"))?;
            self.check(target, value, at)?;
        }
        if let Some(types) = schema.get("type") {
            let names: Vec<&str> = match types {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            if !names.iter().any(|t| type_matches(t, value)) {
                return Err(format!("{at}: {value} is not of type {types}"));
            }
        }
        if let Some(options) = schema.get("enum").and_then(Value::as_array)
            && !options.contains(value)
        {
            return Err(format!("{at}: {value} is not one of {}", Value::Array(options.clone())));
        }
        if let Some(constant) = schema.get("const")
            && constant != value
        {
            return Err(format!("{at}: {value} is not {constant}"));
        }
        if let Some(n) = value.as_f64() {
            if schema.get("minimum").and_then(Value::as_f64).is_some_and(|min| n < min) {
                return Err(format!("{at}: {n} is below the minimum"));
            }
            if schema.get("maximum").and_then(Value::as_f64).is_some_and(|max| n > max) {
                return Err(format!("{at}: {n} is above the maximum"));
            }
        }
        if let Value::Object(object) = value {
            self.check_object(schema, object, at)?;
        }
        if let (Value::Array(items), Some(item_schema)) = (value, schema.get("items")) {
            for (i, item) in items.iter().enumerate() {
                self.check(item_schema, item, &format!("{at}[{i}]"))?;
            }
        }
        for sub in schema.get("allOf").and_then(Value::as_array).into_iter().flatten() {
            self.check(sub, value, at)?;
        }
        for (keyword, wanted) in [("oneOf", Some(1)), ("anyOf", None)] {
            if let Some(subs) = schema.get(keyword).and_then(Value::as_array) {
                let fits = subs.iter().filter(|s| self.check(s, value, at).is_ok()).count();
                if fits == 0 || wanted.is_some_and(|n| fits != n) {
                    return Err(format!("{at}: {value} fits {fits} of the {keyword} schemas"));
                }
            }
        }
        Ok(())
    }

    fn check_object(
        &self,
        schema: &serde_json::Map<String, Value>,
        object: &serde_json::Map<String, Value>,
        at: &str,
    ) -> Result<(), String> {
        let properties = schema.get("properties").and_then(Value::as_object);
        for name in schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
            if !object.contains_key(name) {
                return Err(format!("{at}: the required field {name} is missing"));
            }
        }
        for (name, field) in object {
            let at = format!("{at}.{name}");
            match (properties.and_then(|p| p.get(name)), schema.get("additionalProperties")) {
                (Some(property), _) => self.check(property, field, &at)?,
                (None, Some(Value::Bool(false))) => return Err(format!("{at}: no such field")),
                (None, Some(additional)) => self.check(additional, field, &at)?,
                (None, None) if self.closed && properties.is_some() => {
                    return Err(format!("{at}: the schema does not name this field"));
                }
                (None, None) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{validate, validate_answer};

    #[test]
    fn checks_types_required_fields_unknown_fields_and_refs() {
        let doc = json!({"components": {"schemas": {
            "Port": {"type": "string"},
            "Body": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "ports": {"type": "array", "items": {"$ref": "#/components/schemas/Port"}},
                               "kind": {"type": "string", "enum": ["A", "B"]}},
                "required": ["name"],
                "additionalProperties": false
            }
        }}});
        let body = json!({"$ref": "#/components/schemas/Body"});
        assert_eq!(validate(&doc, &body, &json!({"name": "x", "ports": ["1"], "kind": "A"})), Ok(()));
        assert!(validate(&doc, &body, &json!({"ports": []})).unwrap_err().contains("required field name"));
        assert!(
            validate(&doc, &body, &json!({"name": "x", "extra": 1})).unwrap_err().contains("$.extra: no such field")
        );
        assert!(validate(&doc, &body, &json!({"name": "x", "ports": [1]})).unwrap_err().contains("$.ports[0]"));
        assert!(validate(&doc, &body, &json!({"name": "x", "kind": "C"})).unwrap_err().contains("not one of"));
        assert!(validate(&doc, &json!({"$ref": "#/components/schemas/Nope"}), &json!(1)).is_err());
        let open = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(validate(&doc, &open, &json!({"a": 1, "b": 2})), Ok(()));
        assert!(validate_answer(&doc, &open, &json!({"a": 1, "b": 2})).unwrap_err().contains("$.b"));
    }
}
