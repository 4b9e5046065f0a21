//! Figures of a run: samples per (metric, path), medians with min–max, the
//! Trellis ratios (against the baselines, and of the service path against the
//! resource path), the table on stdout and the JSON file.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Value, json};

/// One figure the harness reports.
pub struct Metric {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
}

const fn m(key: &'static str, label: &'static str, unit: &'static str, higher_is_better: bool) -> Metric {
    Metric { key, label, unit, higher_is_better }
}

pub const TPUT_1_UP: &str = "throughput_1_stream_up_gbps";
pub const TPUT_1_DOWN: &str = "throughput_1_stream_down_gbps";
pub const TPUT_4_UP: &str = "throughput_4_streams_up_gbps";
pub const TPUT_4_DOWN: &str = "throughput_4_streams_down_gbps";
pub const CPU_PER_GB: &str = "tunnel_cpu_seconds_per_gb";
pub const RR_P50: &str = "rr_1b_p50_us";
pub const RR_P99: &str = "rr_1b_p99_us";
pub const CONN_RATE: &str = "new_connections_per_s";
pub const CONN_P50: &str = "connect_first_byte_p50_us";
pub const CONN_P99: &str = "connect_first_byte_p99_us";
pub const PGBENCH_TPS: &str = "pgbench_select_tps";
pub const PGBENCH_CONNECT_TPS: &str = "pgbench_select_connect_each_tps";
pub const IDLE_PER_1000: &str = "idle_rss_mib_per_1000_connections";
pub const IDLE_TOTAL: &str = "idle_rss_mib_at_n_connections";
pub const IDLE_HELD: &str = "idle_connections_held";
pub const CREATE_TO_FIRST_BYTE: &str = "endpoint_create_to_first_byte_ms";
pub const REVOKE_TO_REFUSED: &str = "revoke_to_refused_ms";

pub const METRICS: &[Metric] = &[
    m(TPUT_1_UP, "throughput 1 stream, client→server", "Gbit/s", true),
    m(TPUT_1_DOWN, "throughput 1 stream, server→client", "Gbit/s", true),
    m(TPUT_4_UP, "throughput 4 streams, client→server", "Gbit/s", true),
    m(TPUT_4_DOWN, "throughput 4 streams, server→client", "Gbit/s", true),
    m(CPU_PER_GB, "tunnel CPU per GB moved (the 4 throughput tests)", "CPU-s/GB", false),
    m(RR_P50, "request/response 1 B, p50", "µs", false),
    m(RR_P99, "request/response 1 B, p99", "µs", false),
    m(CONN_RATE, "new connections", "conn/s", true),
    m(CONN_P50, "connect + first byte, p50", "µs", false),
    m(CONN_P99, "connect + first byte, p99", "µs", false),
    m(PGBENCH_TPS, "pgbench -S, C clients", "tps", true),
    m(PGBENCH_CONNECT_TPS, "pgbench -S -C (connection per transaction), C clients", "tps", true),
    m(IDLE_PER_1000, "tunnel RSS per 1,000 idle conns", "MiB", false),
    m(IDLE_TOTAL, "tunnel RSS at the idle conns held", "MiB", false),
    m(IDLE_HELD, "idle conns held (the open-files limit may lower them)", "conns", true),
    m(CREATE_TO_FIRST_BYTE, "endpoint create → first byte", "ms", false),
    m(REVOKE_TO_REFUSED, "share revoke → refused", "ms", false),
];

pub const TRELLIS: &str = "trellis";
pub const TRELLIS_SERVICE: &str = "trellis-service";
pub const TRELLIS_RELAY: &str = "trellis-relay";

/// The ratio columns: (path, divided by path, JSON key under `ratios`).
pub const RATIOS: &[(&str, &str, &str)] = &[
    (TRELLIS, "haproxy-2hop", "trellisOver_haproxy-2hop"),
    (TRELLIS, "rathole-tls", "trellisOver_rathole-tls"),
    (TRELLIS_SERVICE, TRELLIS, "trellisServiceOver_trellis"),
    (TRELLIS_RELAY, "haproxy-2hop", "trellisRelayOver_haproxy-2hop"),
];

#[derive(Default)]
pub struct Cell {
    pub samples: Vec<f64>,
    pub errors: Vec<String>,
}

#[derive(Default)]
pub struct Results {
    cells: BTreeMap<(String, String), Cell>,
}

pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn summarize(samples: &[f64]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = s.len() / 2;
    let median = if s.len() % 2 == 1 { s[mid] } else { (s[mid - 1] + s[mid]) / 2.0 };
    Some(Summary { median, min: s[0], max: s[s.len() - 1] })
}

/// Three significant figures, at least no decimals for large numbers.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

impl Results {
    pub fn add(&mut self, metric: &str, path: &str, value: f64) {
        self.cells.entry((metric.to_string(), path.to_string())).or_default().samples.push(value);
    }

    pub fn error(&mut self, metric: &str, path: &str, error: &str) {
        self.cells.entry((metric.to_string(), path.to_string())).or_default().errors.push(error.to_string());
    }

    pub fn cell(&self, metric: &str, path: &str) -> Option<&Cell> {
        self.cells.get(&(metric.to_string(), path.to_string()))
    }

    fn median(&self, metric: &str, path: &str) -> Option<f64> {
        summarize(&self.cell(metric, path)?.samples).map(|s| s.median)
    }

    /// `path`'s median divided by the baseline's median.
    pub fn ratio_of(&self, metric: &str, path: &str, baseline: &str) -> Option<f64> {
        let base = self.median(metric, baseline)?;
        let ours = self.median(metric, path)?;
        (base != 0.0).then(|| ours / base)
    }

    /// Per-repetition ratios (`path`'s sample i ÷ baseline sample i), measured close together in time.
    fn paired_ratios(&self, metric: &str, path: &str, baseline: &str) -> Vec<f64> {
        let (Some(ours), Some(base)) = (self.cell(metric, path), self.cell(metric, baseline)) else {
            return Vec::new();
        };
        ours.samples.iter().zip(&base.samples).filter(|(_, b)| **b != 0.0).map(|(o, b)| o / b).collect()
    }

    /// The table: one row per metric with data, one column per path, then the ratio columns.
    pub fn table(&self, paths: &[&str], pg_clients: usize) -> String {
        let mut header = vec!["metric".to_string()];
        header.extend(paths.iter().map(|p| p.to_string()));
        let ratio_cols: Vec<(&str, &str)> = RATIOS
            .iter()
            .filter(|(p, b, _)| paths.contains(p) && paths.contains(b))
            .map(|(p, b, _)| (*p, *b))
            .collect();
        header.extend(ratio_cols.iter().map(|(p, b)| format!("{p} ÷ {b}")));
        let mut rows = vec![header];
        for metric in METRICS {
            if !paths.iter().any(|p| self.cell(metric.key, p).is_some()) {
                continue;
            }
            let arrow = if metric.higher_is_better { "↑" } else { "↓" };
            let label = metric.label.replace(", C clients", &format!(", {pg_clients} clients"));
            let mut row = vec![format!("{label} ({}) {arrow}", metric.unit)];
            for p in paths {
                row.push(match self.cell(metric.key, p) {
                    None => "–".to_string(),
                    Some(c) => match summarize(&c.samples) {
                        Some(s) if c.samples.len() > 1 => {
                            let err = if c.errors.is_empty() { "" } else { " !" };
                            format!("{} ({}–{}){err}", num(s.median), num(s.min), num(s.max))
                        }
                        Some(s) => num(s.median),
                        None => "failed".to_string(),
                    },
                });
            }
            for (p, b) in &ratio_cols {
                row.push(self.ratio_of(metric.key, p, b).map(|r| format!("{}×", num(r))).unwrap_or_else(|| "–".into()));
            }
            rows.push(row);
        }
        let widths: Vec<usize> =
            (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
        let mut out = String::new();
        for (n, row) in rows.iter().enumerate() {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let pad = widths[i] - c.chars().count();
                    if i == 0 { format!("{c}{}", " ".repeat(pad)) } else { format!("{}{c}", " ".repeat(pad)) }
                })
                .collect();
            let _ = writeln!(out, "{}", cells.join("  ").trim_end());
            if n == 0 {
                let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
                let _ = writeln!(out, "{}", "-".repeat(total));
            }
        }
        out
    }

    /// Errors recorded during the run, one line each.
    pub fn error_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for ((metric, path), cell) in &self.cells {
            for e in &cell.errors {
                lines.push(format!("{path} / {metric}: {e}"));
            }
        }
        lines
    }

    /// Every sample and summary, keyed by metric then path, with the ratios.
    pub fn json(&self, paths: &[&str]) -> Value {
        let mut metrics = serde_json::Map::new();
        for metric in METRICS {
            let mut per_path = serde_json::Map::new();
            for p in paths {
                let Some(cell) = self.cell(metric.key, p) else { continue };
                let summary = summarize(&cell.samples);
                per_path.insert(
                    p.to_string(),
                    json!({
                        "samples": cell.samples,
                        "median": summary.as_ref().map(|s| s.median),
                        "min": summary.as_ref().map(|s| s.min),
                        "max": summary.as_ref().map(|s| s.max),
                        "errors": cell.errors,
                    }),
                );
            }
            if per_path.is_empty() {
                continue;
            }
            let mut ratios = serde_json::Map::new();
            for (p, b, key) in RATIOS {
                if let Some(r) = self.ratio_of(metric.key, p, b) {
                    let paired = self.paired_ratios(metric.key, p, b);
                    let spread = summarize(&paired);
                    ratios.insert(
                        key.to_string(),
                        json!({
                            "ratioOfMedians": r,
                            "perRepetition": paired,
                            "perRepetitionMin": spread.as_ref().map(|s| s.min),
                            "perRepetitionMax": spread.as_ref().map(|s| s.max),
                        }),
                    );
                }
            }
            metrics.insert(
                metric.key.to_string(),
                json!({
                    "label": metric.label,
                    "unit": metric.unit,
                    "higherIsBetter": metric.higher_is_better,
                    "paths": per_path,
                    "ratios": ratios,
                }),
            );
        }
        Value::Object(metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_even_count_is_the_mean_of_the_middle_two() {
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
    }

    #[test]
    fn ratio_divides_trellis_median_by_the_baseline_median() {
        let mut r = Results::default();
        for v in [2.0, 4.0, 3.0] {
            r.add(RR_P50, "haproxy-2hop", v);
        }
        for v in [6.0, 9.0, 7.5] {
            r.add(RR_P50, TRELLIS, v);
        }
        assert_eq!(r.ratio_of(RR_P50, TRELLIS, "haproxy-2hop"), Some(2.5));
        assert_eq!(r.ratio_of(RR_P50, TRELLIS, "rathole-tls"), None);
    }

    #[test]
    fn the_service_path_is_compared_with_the_resource_path_in_table_and_json() {
        let mut r = Results::default();
        for (trellis, service) in [(8.0, 7.8), (10.0, 9.0), (9.0, 9.9)] {
            r.add(TPUT_1_UP, TRELLIS, trellis);
            r.add(TPUT_1_UP, TRELLIS_SERVICE, service);
        }
        assert_eq!(r.ratio_of(TPUT_1_UP, TRELLIS_SERVICE, TRELLIS), Some(1.0));
        let table = r.table(&[TRELLIS, TRELLIS_SERVICE], 8);
        let header = table.lines().next().unwrap();
        assert!(header.ends_with("trellis-service ÷ trellis"), "{header}");
        assert!(!header.contains("haproxy"), "no baseline measured, no baseline column: {header}");
        assert!(table.lines().nth(2).unwrap().ends_with("1.00×"), "{table}");
        let json = r.json(&[TRELLIS, TRELLIS_SERVICE]);
        let ratio = &json[TPUT_1_UP]["ratios"]["trellisServiceOver_trellis"];
        assert_eq!(ratio["ratioOfMedians"], 1.0);
        assert_eq!(ratio["perRepetition"].as_array().unwrap().len(), 3);
    }
}
