//! Human-readable tables derived generically from the API's JSON, so every noun
//! prints well without per-noun code: a key/value table for one object, a table
//! of the most useful columns for a list (`{"items": [...]}`).
//!
//! `--output json` never comes through here: it prints the API's body unchanged.

use serde_json::{Map, Value};

/// At most this many columns in a list table; `get` shows everything.
const MAX_LIST_COLUMNS: usize = 8;
/// A column with a longer value in any row is left out of a list table.
const MAX_LIST_CELL: usize = 48;

/// Renders an API answer as text for a terminal. Ends with a newline unless empty.
pub fn render_table(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::Object(map) => match map.get("items") {
            Some(Value::Array(items)) => render_list(map, items),
            _ => render_object(map),
        },
        Value::Array(items) => render_list(&Map::new(), items),
        other => format!("{}\n", scalar_text(other)),
    }
}

fn render_object(map: &Map<String, Value>) -> String {
    let mut rows = Vec::new();
    for (key, value) in ordered(map) {
        flatten(key, value, &mut rows);
    }
    if rows.is_empty() {
        return String::new();
    }
    let key_width = rows.iter().map(|(k, _)| width(k)).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in rows {
        out.push_str(format!("{key:<key_width$}   {value}").trim_end());
        out.push('\n');
    }
    out
}

fn render_list(envelope: &Map<String, Value>, items: &[Value]) -> String {
    let mut out = String::new();
    // Scalars beside the items (e.g. usage's resourceConfigurationId) are context worth a line.
    for (key, value) in ordered(envelope) {
        if key != "items" && key != "nextToken" && is_cell(value) && !value.is_null() {
            out.push_str(&format!("{key}: {}\n", cell_text(value)));
        }
    }
    if items.is_empty() {
        out.push_str("No items.\n");
    } else {
        let columns = list_columns(items);
        let mut rows: Vec<Vec<String>> = vec![columns.iter().map(|c| header(c)).collect()];
        for item in items {
            rows.push(columns.iter().map(|c| item.get(c).map_or_else(|| "-".to_string(), list_cell_text)).collect());
        }
        out.push_str(&grid(&rows));
    }
    if let Some(Value::String(token)) = envelope.get("nextToken") {
        out.push_str(&format!("More items: repeat with --next-token {token}\n"));
    }
    out
}

/// Chooses a list's columns: id, name, state, type first, then other plain fields;
/// never ARNs, long values such as fingerprints (`get` shows them), nested
/// objects, or aliases of the id. A list of named objects (an invitation's
/// `resources`) is a column of their names, shortened rather than left out.
fn list_columns(items: &[Value]) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for item in items {
        if let Value::Object(map) = item {
            for (k, v) in map {
                if (is_cell(v) || is_named_list(v)) && !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
        }
    }
    keys.retain(|k| {
        if k == "id" || k == "name" || items.iter().any(|item| item.get(k).is_some_and(is_named_list)) {
            return true;
        }
        let arn = k == "arn" || k.ends_with("Arn") || k.ends_with("Arns");
        let id_alias =
            items.iter().all(|item| item.get("id").is_some_and(|id| !id.is_null() && item.get(k) == Some(id)));
        let long = items.iter().any(|item| item.get(k).is_some_and(|v| width(&cell_text(v)) > MAX_LIST_CELL));
        !arn && !id_alias && !long
    });
    keys.sort_by_key(|k| (column_rank(k), k.clone()));
    keys.truncate(MAX_LIST_COLUMNS);
    keys
}

fn column_rank(key: &str) -> u8 {
    match key {
        "id" => 0,
        "name" => 1,
        "status" | "state" => 2,
        "type" => 3,
        k if k.ends_with("Type") => 3,
        "accountId" | "createdAt" => 5,
        _ => 4,
    }
}

/// Keys of one object with the important ones first, the rest in map order.
fn ordered(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by_key(|(k, _)| match k.as_str() {
        "id" => 0,
        "name" => 1,
        "status" | "state" => 2,
        "type" => 3,
        "arn" => 4,
        _ => 5,
    });
    entries
}

/// One row per leaf: nested objects as `a.b`, arrays of objects as `a[0].b`.
fn flatten(key: &str, value: &Value, rows: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                flatten(&format!("{key}.{k}"), v, rows);
            }
        }
        Value::Array(items) if !is_cell(value) => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{key}[{i}]"), v, rows);
            }
        }
        _ => rows.push((key.to_string(), cell_text(value))),
    }
}

/// A value that fits one cell: a scalar, or an array of scalars.
fn is_cell(value: &Value) -> bool {
    match value {
        Value::Object(_) => false,
        Value::Array(items) => items.iter().all(|v| !v.is_object() && !v.is_array()),
        _ => true,
    }
}

/// A non-empty array of objects that all have a string `name`.
fn is_named_list(value: &Value) -> bool {
    match value {
        Value::Array(items) => !items.is_empty() && items.iter().all(|i| i.get("name").is_some_and(Value::is_string)),
        _ => false,
    }
}

/// A list table's cell: [`cell_text`], or for a list of named objects their
/// names (with their `type`), as many as fit, then how many more.
fn list_cell_text(value: &Value) -> String {
    let Value::Array(items) = value else { return cell_text(value) };
    if !is_named_list(value) {
        return cell_text(value);
    }
    let names: Vec<String> = items
        .iter()
        .map(|i| {
            let name = scalar_text(&i["name"]);
            match i.get("type").and_then(Value::as_str) {
                Some(t) => format!("{name} ({t})"),
                None => name,
            }
        })
        .collect();
    let mut out = String::new();
    for (shown, name) in names.iter().enumerate() {
        let more = format!(", +{} more", names.len() - shown);
        let sep = if out.is_empty() { "" } else { ", " };
        let last = shown + 1 == names.len();
        let room = if last { MAX_LIST_CELL } else { MAX_LIST_CELL.saturating_sub(width(&more)) };
        if !out.is_empty() && width(&out) + sep.len() + width(name) > room {
            out.push_str(&more);
            return out;
        }
        out.push_str(sep);
        out.push_str(name);
    }
    out
}

fn cell_text(value: &Value) -> String {
    match value {
        Value::Array(items) if items.is_empty() => "-".to_string(),
        Value::Array(items) => items.iter().map(scalar_text).collect::<Vec<_>>().join(","),
        Value::Object(map) if map.is_empty() => "-".to_string(),
        other => scalar_text(other),
    }
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        Value::String(s) if s.is_empty() => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `vpcEndpointType` → `VPC-ENDPOINT-TYPE`.
fn header(key: &str) -> String {
    let mut out = String::new();
    for (i, c) in key.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('-');
        }
        out.extend(c.to_uppercase());
    }
    out
}

fn width(s: &str) -> usize {
    s.chars().count()
}

fn grid(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns).map(|c| rows.iter().map(|r| width(&r[c])).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 < columns {
                line.push_str(&format!("{cell:<w$}   ", w = widths[c]));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn single_object_is_a_key_value_table_with_nested_fields_flattened() {
        let vpce = json!({
            "id": "vpce-0123456789abcdef0",
            "vpcEndpointId": "vpce-0123456789abcdef0",
            "state": "Available",
            "subnetIds": ["subnet-a", "subnet-b"],
            "failureReason": null,
            "dnsEntries": [{"dnsName": "vpce-1.rcfg-1.local.trellis.internal", "ipAddresses": ["10.0.9.4"]}],
        });
        let text = render_table(&vpce);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "id                          vpce-0123456789abcdef0");
        assert_eq!(lines[1], "state                       Available");
        assert!(lines.contains(&"dnsEntries[0].dnsName       vpce-1.rcfg-1.local.trellis.internal"), "{text}");
        assert!(lines.contains(&"dnsEntries[0].ipAddresses   10.0.9.4"), "{text}");
        assert!(lines.contains(&"subnetIds                   subnet-a,subnet-b"), "{text}");
        assert!(lines.contains(&"failureReason               -"), "{text}");
    }

    #[test]
    fn nested_objects_use_dotted_keys() {
        let rcfg =
            json!({"id": "rcfg-1", "resourceConfigurationDefinition": {"ipResource": {"ipAddress": "10.0.0.10"}}});
        assert!(render_table(&rcfg).contains("resourceConfigurationDefinition.ipResource.ipAddress   10.0.0.10\n"));
    }

    #[test]
    fn list_puts_id_name_status_first_and_drops_arns_and_id_aliases() {
        let list = json!({"items": [
            {"id": "vpc-1", "vpcId": "vpc-1", "arn": "arn:trellis:vpc:local:acct-1:vpc/vpc-1", "name": "prod",
             "status": "ACTIVE", "createdAt": "2026-01-01T00:00:00Z", "tags": {"a": "b"}},
            {"id": "vpc-2", "vpcId": "vpc-2", "arn": "arn:trellis:vpc:local:acct-1:vpc/vpc-2", "name": "staging-eu",
             "status": "ACTIVE", "createdAt": "2026-01-02T00:00:00Z", "tags": {}},
        ], "nextToken": null});
        let text = render_table(&list);
        assert_eq!(
            text,
            "ID      NAME         STATUS   CREATED-AT\n\
             vpc-1   prod         ACTIVE   2026-01-01T00:00:00Z\n\
             vpc-2   staging-eu   ACTIVE   2026-01-02T00:00:00Z\n"
        );
    }

    #[test]
    fn list_keeps_foreign_ids_and_type_columns() {
        let list = json!({"items": [
            {"id": "subnet-1", "subnetId": "subnet-1", "vpcId": "vpc-9", "zone": "z1", "cidrBlock": "10.0.9.0/24"},
        ]});
        let text = render_table(&list);
        assert_eq!(text.lines().next().unwrap(), "ID         CIDR-BLOCK    VPC-ID   ZONE");
        let list =
            json!({"items": [{"id": "rcfg-1", "name": "db", "type": "SINGLE", "portRanges": ["5432", "8000-8100"]}]});
        assert_eq!(
            render_table(&list),
            "ID       NAME   TYPE     PORT-RANGES\nrcfg-1   db     SINGLE   5432,8000-8100\n"
        );
    }

    #[test]
    fn list_leaves_out_long_values_and_arn_lists() {
        let list = json!({"items": [{
            "id": "agent-1", "status": "ONLINE", "certSha256": "ab".repeat(32),
            "resourceArns": ["arn:x"], "advertise": "127.0.0.1:7443",
        }]});
        assert_eq!(render_table(&list), "ID        STATUS   ADVERTISE\nagent-1   ONLINE   127.0.0.1:7443\n");
    }

    #[test]
    fn list_columns_are_capped_and_missing_cells_show_a_dash() {
        let mut wide = Map::new();
        for i in 0..20 {
            wide.insert(format!("field{i:02}"), json!(i));
        }
        wide.insert("id".into(), json!("x-1"));
        let list = json!({"items": [Value::Object(wide), {"id": "x-2"}]});
        let text = render_table(&list);
        assert_eq!(text.lines().next().unwrap().split_whitespace().count(), MAX_LIST_COLUMNS);
        assert!(text.lines().nth(2).unwrap().starts_with("x-2 "), "{text}");
        assert!(text.lines().nth(2).unwrap().ends_with(" -"), "{text}");
    }

    #[test]
    fn empty_lists_say_so_and_more_pages_are_announced() {
        assert_eq!(render_table(&json!({"items": [], "nextToken": null})), "No items.\n");
        let text = render_table(&json!({"items": [{"id": "a"}], "nextToken": "tok123"}));
        assert!(text.ends_with("More items: repeat with --next-token tok123\n"), "{text}");
    }

    #[test]
    fn usage_prints_its_context_and_a_table() {
        let usage = json!({"resourceConfigurationId": "rcfg-1", "items": [
            {"consumerAccountId": "acct-000000000002", "vpcEndpointId": "vpce-1", "resourceConfigurationId": "rcfg-1",
             "activeConnections": 1, "totalConnections": 7, "rejectedConnections": 0, "bytesIn": 10, "bytesOut": 20}
        ]});
        let text = render_table(&usage);
        assert!(text.starts_with("resourceConfigurationId: rcfg-1\n"), "{text}");
        assert!(text.contains("ACTIVE-CONNECTIONS"), "{text}");
        assert!(text.contains("acct-000000000002"), "{text}");
    }

    #[test]
    fn invitation_lists_show_the_shared_resources() {
        let owner = "acct-000000000001";
        let resource = |name: &str, t: &str| json!({"id": "rcfg-1", "arn": "arn:x", "name": name, "type": t, "ownerAccountId": owner});
        let list = json!({"items": [
            {"id": "rsi-1", "status": "PENDING", "resourceShareName": "for-you", "senderAccountId": owner,
             "resources": [resource("orders-db", "SINGLE"), resource("cache", "GROUP")]},
            {"id": "rsi-2", "status": "ACCEPTED", "resourceShareName": "many", "senderAccountId": owner,
             "resources": (0..9).map(|i| resource(&format!("database-{i}"), "SINGLE")).collect::<Vec<_>>()},
        ]});
        let text = render_table(&list);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("RESOURCES") && lines[0].contains("SENDER-ACCOUNT-ID"), "{text}");
        assert!(lines[1].contains("orders-db (SINGLE), cache (GROUP)"), "{text}");
        assert!(lines[2].contains("database-0 (SINGLE), +8 more"), "{text}");
        // `get` shows each resource in full.
        let one = render_table(&list["items"][0]);
        assert!(one.contains("resources[1].name             cache"), "{one}");
        assert!(one.contains(&format!("resources[0].ownerAccountId   {owner}")), "{one}");
    }

    #[test]
    fn empty_body_prints_nothing() {
        assert_eq!(render_table(&Value::Null), "");
    }
}
