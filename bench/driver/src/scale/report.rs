//! Figures of a scale run: one column per N, one row per figure; the table on
//! stdout and every sample in the JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use crate::report::num;

/// One figure of the table.
pub struct Figure {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
}

const fn f(key: &'static str, label: &'static str, unit: &'static str) -> Figure {
    Figure { key, label, unit }
}

pub const FIGURES: &[Figure] = &[
    f("setup_s", "set-up: owner + N consumers through the API", "s"),
    f("setup_requests_per_s", "set-up API calls per second", "calls/s"),
    f("agents_ready_s", "agents started → all configs applied, endpoints Available", "s"),
    f("create_endpoint_p50_ms", "POST /v1/vpcendpoints (consumer), p50", "ms"),
    f("create_endpoint_p99_ms", "POST /v1/vpcendpoints (consumer), p99", "ms"),
    f("read_config_p50_ms", "GET /v1/resourceconfigurations/{id} (consumer), p50", "ms"),
    f("read_config_p99_ms", "GET /v1/resourceconfigurations/{id} (consumer), p99", "ms"),
    f("list_configs_consumer_p50_ms", "GET /v1/resourceconfigurations page 1 (consumer), p50", "ms"),
    f("list_configs_consumer_p99_ms", "GET /v1/resourceconfigurations page 1 (consumer), p99", "ms"),
    f("list_configs_owner_p50_ms", "GET /v1/resourceconfigurations page 1 (owner), p50", "ms"),
    f("list_configs_owner_p99_ms", "GET /v1/resourceconfigurations page 1 (owner), p99", "ms"),
    f("list_shares_owner_p50_ms", "GET /v1/resourceshares page 1 (owner), p50", "ms"),
    f("list_shares_owner_p99_ms", "GET /v1/resourceshares page 1 (owner), p99", "ms"),
    f("list_endpoints_p50_ms", "GET /v1/vpcendpoints page 1 (consumer), p50", "ms"),
    f("list_endpoints_p99_ms", "GET /v1/vpcendpoints page 1 (consumer), p99", "ms"),
    f("delete_call_p50_ms", "DELETE /v1/resourceshares/{id} call, p50", "ms"),
    f("delete_to_affected_p50_ms", "share deleted → its consumer's agent applied, p50", "ms"),
    f("delete_to_affected_p99_ms", "share deleted → its consumer's agent applied, p99", "ms"),
    f("delete_to_gateway_p50_ms", "share deleted → gateway agent applied, p50", "ms"),
    f("delete_to_gateway_p99_ms", "share deleted → gateway agent applied, p99", "ms"),
    f("unaffected_configs", "configs received by the other consumer agents, all deletions", "configs"),
    f("gateway_configs_per_100_creates", "configs the gateway agent applied per 100 endpoint creates", "configs"),
    f("creates_duration_ms", "the endpoint creates, one after the other, took", "ms"),
    f("creates_first_gateway_config_ms", "first create → the gateway agent's first new config", "ms"),
    f("gateway_endpoints", "endpoints in the gateway agent's config", "endpoints"),
    f("gateway_config_gzip_kib", "gateway config as sent, gzip", "KiB"),
    f("gateway_config_json_kib", "gateway config as sent, uncompressed JSON", "KiB"),
    f("gateway_compile_cpu_ms", "gateway config compile + encode + send: server CPU, mean", "ms"),
    f("gateway_compile_wall_ms", "gateway config compile + encode + send: wall, median", "ms"),
    f("idle_cpu_pct", "server CPU idle, agents long-polling (% of one core)", "%"),
    f("idle_configs", "configs sent during the idle minute", "configs"),
    f("cpu_per_read_ms", "server CPU per read (the five GETs above)", "ms"),
    f("cpu_per_create_ms", "server CPU per endpoint create, gateway recompile + push included", "ms"),
    f("cpu_per_delete_ms", "server CPU per share deletion, both recompiles + pushes included", "ms"),
    f("rss_idle_mib", "server RSS after the idle minute", "MiB"),
    f("rss_end_mib", "server RSS at the end", "MiB"),
    f("rss_peak_mib", "server peak RSS (VmHWM)", "MiB"),
    f("store_mib", "data directory (SQLite database and log)", "MiB"),
];

/// Nearest-rank percentile (`q` in 0..=1) of unsorted samples.
pub fn percentile(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Some(s[rank - 1])
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The figures and samples of one N.
#[derive(Default)]
pub struct NResult {
    pub figures: BTreeMap<&'static str, f64>,
    pub samples: BTreeMap<&'static str, Vec<f64>>,
    pub notes: Vec<String>,
}

impl NResult {
    pub fn set(&mut self, key: &'static str, value: f64) {
        debug_assert!(FIGURES.iter().any(|f| f.key == key), "unknown figure {key}");
        self.figures.insert(key, value);
    }

    /// Records `samples` (ms) under `name` and their p50 and p99 as `<prefix>_p50_ms` / `_p99_ms`.
    pub fn latencies(&mut self, name: &'static str, p50: &'static str, p99: &'static str, samples: Vec<f64>) {
        if let Some(v) = percentile(&samples, 0.5) {
            self.set(p50, v);
        }
        if let Some(v) = percentile(&samples, 0.99) {
            self.set(p99, v);
        }
        self.samples.insert(name, samples);
    }
}

/// The table: one row per figure that any N has, one column per N.
pub fn table(results: &[(usize, Result<NResult, String>)]) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header = vec!["figure".to_string()];
    header.extend(results.iter().map(|(n, _)| format!("N = {n}")));
    rows.push(header);
    for fig in FIGURES {
        let cells: Vec<Option<f64>> =
            results.iter().map(|(_, r)| r.as_ref().ok().and_then(|r| r.figures.get(fig.key).copied())).collect();
        if cells.iter().all(Option::is_none) {
            continue;
        }
        let mut row = vec![format!("{} ({})", fig.label, fig.unit)];
        for (cell, (_, r)) in cells.iter().zip(results) {
            row.push(match (cell, r) {
                (Some(v), _) => num(*v),
                (None, Err(_)) => "failed".into(),
                (None, Ok(_)) => "–".into(),
            });
        }
        rows.push(row);
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, text)| {
                let pad = " ".repeat(widths[c] - text.chars().count());
                if c == 0 { format!("{text}{pad}") } else { format!("{pad}{text}") }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        if i == 0 {
            let _ = writeln!(out, "{}", "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1)));
        }
    }
    out
}

/// Every figure and sample per N.
pub fn json(results: &[(usize, Result<NResult, String>)]) -> Value {
    let runs: Vec<Value> = results
        .iter()
        .map(|(n, r)| match r {
            Ok(r) => json!({
                "n": n,
                "figures": r.figures,
                "samples": r.samples,
                "notes": r.notes,
            }),
            Err(e) => json!({"n": n, "error": e}),
        })
        .collect();
    let figures: Vec<Value> = FIGURES.iter().map(|f| json!({"key": f.key, "label": f.label, "unit": f.unit})).collect();
    json!({"figures": figures, "runs": runs})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&s, 0.5), Some(50.0));
        assert_eq!(percentile(&s, 0.99), Some(99.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.99), Some(3.0), "few samples: p99 is the maximum");
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn the_table_has_a_column_per_n_and_marks_failed_runs() {
        let mut ok = NResult::default();
        ok.set("idle_cpu_pct", 0.42);
        let results = vec![(1000, Ok(ok)), (5000, Err("boom".to_string()))];
        let t = table(&results);
        assert!(t.contains("N = 1000") && t.contains("N = 5000"), "{t}");
        let row = t.lines().find(|l| l.starts_with("server CPU idle")).unwrap();
        assert!(row.contains("0.420") && row.contains("failed"), "{row}");
        assert!(!t.contains("set-up API"), "rows no run has are left out: {t}");
    }
}
