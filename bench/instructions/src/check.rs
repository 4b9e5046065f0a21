//! Runs every path under callgrind, reads the instruction count from its
//! output file, and compares it with the committed baseline (or writes a new
//! one with `--bless`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::Res;
use crate::workloads::{WORKLOADS, Workload};

/// The function callgrind collects inside (as it names it, demangled).
const MARKER: &str = "trellis_instructions::workloads::measured";
const SCHEMA: &str = "trellis-instructions/1";
/// A path may grow by this much (a fraction) before the check fails, unless the baseline says otherwise.
const DEFAULT_TOLERANCE: f64 = 0.10;

pub struct Options {
    baseline: PathBuf,
    bless: bool,
    runs: usize,
    paths: Option<Vec<String>>,
    valgrind: String,
}

impl Options {
    pub fn parse(args: &[String]) -> Res<Self> {
        let mut o = Self {
            baseline: PathBuf::from("bench/instructions.json"),
            bless: false,
            runs: 1,
            paths: None,
            valgrind: "valgrind".into(),
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value"));
            match arg.as_str() {
                "--baseline" => o.baseline = value("--baseline")?.into(),
                "--bless" => o.bless = true,
                "--runs" => {
                    o.runs = value("--runs")?
                        .parse()
                        .ok()
                        .filter(|n| *n >= 1)
                        .ok_or("--runs needs a whole number of at least 1")?
                }
                "--paths" => o.paths = Some(value("--paths")?.split(',').map(str::to_string).collect()),
                "--valgrind" => o.valgrind = value("--valgrind")?,
                other => return Err(format!("unknown argument {other:?}\n{}", crate::USAGE)),
            }
        }
        if let Some(paths) = &o.paths
            && let Some(bad) = paths.iter().find(|p| !WORKLOADS.iter().any(|w| &w.name == p))
        {
            let known: Vec<_> = WORKLOADS.iter().map(|w| w.name).collect();
            return Err(format!("no path named {bad:?}; the paths are {}", known.join(", ")));
        }
        Ok(o)
    }
}

pub fn main(o: &Options) -> Res<()> {
    let valgrind_version = first_line(&o.valgrind, &["--version"]).ok_or_else(|| {
        format!(
            "cannot run {}: install valgrind (Debian: apt-get install valgrind), or give --valgrind BIN",
            o.valgrind
        )
    })?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the trellis-instructions executable: {e}"))?;
    let selected: Vec<&Workload> =
        WORKLOADS.iter().filter(|w| o.paths.as_ref().is_none_or(|p| p.iter().any(|n| n == w.name))).collect();
    let tmp = std::env::temp_dir().join(format!("trellis-instructions-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;

    let mut counts: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let measuring = (|| {
        for run in 1..=o.runs {
            for w in &selected {
                let started = std::time::Instant::now();
                let n = measure(&o.valgrind, &exe, w.name, &tmp)?;
                eprintln!(
                    "instructions: {:<10} run {run}/{}: {:>14} ({:.1} s under callgrind)",
                    w.name,
                    o.runs,
                    thousands(n),
                    started.elapsed().as_secs_f64()
                );
                counts.entry(w.name).or_default().push(n);
            }
        }
        Ok::<_, String>(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    measuring?;
    if o.bless {
        return bless(o, &selected, &counts, &valgrind_version);
    }
    let baseline = read_baseline(&o.baseline)?;
    let tolerance = baseline.get("tolerance").and_then(Value::as_f64).unwrap_or(DEFAULT_TOLERANCE);
    let blessed = describe_blessing(&baseline);

    println!(
        "{:<10} {:>14} {:>14} {:>8}{}",
        "path",
        "baseline",
        "now",
        "ratio",
        if o.runs > 1 { "   spread of runs" } else { "" }
    );
    let mut failures = Vec::new();
    let mut notes = Vec::new();
    for w in &selected {
        let now = median(&counts[w.name]);
        let Some(base) = baseline.pointer(&format!("/paths/{}/instructions", w.name)).and_then(Value::as_u64) else {
            failures.push(format!(
                "no baseline for path `{}` in {}: record one with scripts/instructions --bless",
                w.name,
                o.baseline.display()
            ));
            continue;
        };
        let ratio = now as f64 / base.max(1) as f64;
        let spread = if o.runs > 1 { format!("   {}", spread(&counts[w.name])) } else { String::new() };
        println!("{:<10} {:>14} {:>14} {:>7.3}×{spread}", w.name, thousands(base), thousands(now), ratio);
        if ratio > 1.0 + tolerance {
            failures.push(format!(
                "path `{}` grew by {:.1} % (more than {:.0} %): {} → {} instructions ({})",
                w.name,
                (ratio - 1.0) * 100.0,
                tolerance * 100.0,
                thousands(base),
                thousands(now),
                w.what
            ));
        } else if ratio < 1.0 - tolerance {
            notes.push(format!(
                "path `{}` fell by {:.1} %: re-bless (scripts/instructions --bless) so that the gain is kept",
                w.name,
                (1.0 - ratio) * 100.0
            ));
        }
    }
    for n in &notes {
        println!("note: {n}");
    }
    if failures.is_empty() {
        println!("instruction counts within {:.0} % of the baseline ({blessed})", tolerance * 100.0);
        return Ok(());
    }
    Err(format!(
        "instruction counts grew against {} ({blessed}):\n  {}\nFind what made the path slower; if the change is intended, re-bless with \
         scripts/instructions --bless and commit {} with it.",
        o.baseline.display(),
        failures.join("\n  "),
        o.baseline.display()
    ))
}

/// Runs one path under callgrind and returns the instructions counted inside the marker.
fn measure(valgrind: &str, exe: &Path, name: &str, tmp: &Path) -> Res<u64> {
    let out = tmp.join(format!("callgrind.{name}.out"));
    let result = Command::new(valgrind)
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg("--collect-atstart=no")
        .arg(format!("--toggle-collect={MARKER}"))
        .arg(exe)
        .args(["workload", name])
        .output()
        .map_err(|e| format!("cannot run {valgrind}: {e}"))?;
    if !result.status.success() {
        let stderr = String::from_utf8_lossy(&result.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(format!("path `{name}` failed under callgrind ({}):\n{}", result.status, tail.join("\n")));
    }
    let text = std::fs::read_to_string(&out).map_err(|e| format!("cannot read {}: {e}", out.display()))?;
    let n = parse_total(&text).ok_or_else(|| format!("no `totals:` or `summary:` line in {}", out.display()))?;
    if n == 0 {
        return Err(format!(
            "callgrind counted nothing for path `{name}`: it never saw {MARKER} entered (renamed, or inlined?)"
        ));
    }
    Ok(n)
}

/// The instruction count of a callgrind output file: its `totals:` line (or `summary:`).
fn parse_total(text: &str) -> Option<u64> {
    let find = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    };
    find("totals:").or_else(|| find("summary:"))
}

fn read_baseline(path: &Path) -> Res<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!("cannot read the baseline {}: {e} (record one with scripts/instructions --bless)", path.display())
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{} is not valid JSON: {e}", path.display()))?;
    if v.get("schema").and_then(Value::as_str) != Some(SCHEMA) {
        return Err(format!(
            "{} is not a {SCHEMA} baseline; re-bless with scripts/instructions --bless",
            path.display()
        ));
    }
    Ok(v)
}

fn describe_blessing(baseline: &Value) -> String {
    let field = |k: &str| baseline.pointer(&format!("/blessed/{k}")).and_then(Value::as_str).unwrap_or("?").to_string();
    format!("blessed {} at commit {}", field("at"), field("commit"))
}

fn bless(o: &Options, selected: &[&Workload], counts: &BTreeMap<&str, Vec<u64>>, valgrind: &str) -> Res<()> {
    // Paths not measured now keep their old figures.
    let mut paths = std::fs::read_to_string(&o.baseline)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.get("paths").cloned())
        .and_then(|p| p.as_object().cloned())
        .unwrap_or_default();
    for w in selected {
        paths.insert(
            w.name.to_string(),
            json!({ "instructions": median(&counts[w.name]), "runs": counts[w.name], "what": w.what }),
        );
    }
    let commit = first_line("git", &["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|out| !out.stdout.is_empty())
        .unwrap_or(false);
    let baseline = json!({
        "schema": SCHEMA,
        "tolerance": DEFAULT_TOLERANCE,
        "blessed": {
            "at": first_line("date", &["-u", "+%Y-%m-%dT%H:%MZ"]).unwrap_or_else(|| "unknown".into()),
            "commit": if dirty { format!("{commit} + uncommitted changes") } else { commit },
            "rustc": first_line("rustc", &["--version"]).unwrap_or_else(|| "unknown".into()),
            "valgrind": valgrind,
            "cpu": cpu_model(),
        },
        "paths": paths,
    });
    let text = serde_json::to_string_pretty(&baseline).map_err(|e| e.to_string())? + "\n";
    std::fs::write(&o.baseline, text).map_err(|e| format!("cannot write {}: {e}", o.baseline.display()))?;
    for w in selected {
        let runs = &counts[w.name];
        let spread = if runs.len() > 1 { format!("   spread of runs {}", spread(runs)) } else { String::new() };
        println!("{:<10} {:>14}{spread}", w.name, thousands(median(runs)));
    }
    println!("wrote {}: commit it with the change it blesses", o.baseline.display());
    Ok(())
}

fn first_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_string()).filter(|l| !l.is_empty())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[v.len() / 2]
}

/// `(max − min) ÷ median` of the runs, with the runs themselves.
fn spread(v: &[u64]) -> String {
    let (min, max) = (v.iter().min().copied().unwrap_or(0), v.iter().max().copied().unwrap_or(0));
    let runs: Vec<String> = v.iter().map(|n| thousands(*n)).collect();
    format!("{:.3} % ({})", (max - min) as f64 / median(v).max(1) as f64 * 100.0, runs.join(", "))
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_are_read_from_a_callgrind_file() {
        let text = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 1234\n\nfn=(1) x\n0 5\ntotals: 1234\n";
        assert_eq!(parse_total(text), Some(1234));
        assert_eq!(parse_total("events: Ir\nsummary: 77\n"), Some(77));
        assert_eq!(parse_total("events: Ir\n"), None);
    }

    #[test]
    fn figures_are_grouped_and_spread_is_relative_to_the_median() {
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert!(spread(&[100, 101, 102]).starts_with("1.980 %"));
    }
}
