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
/// Set to 1 (or true) for `--strict-machine`.
pub const STRICT_ENV: &str = "TRELLIS_INSTRUCTIONS_STRICT_MACHINE";

pub struct Options {
    baseline: PathBuf,
    bless: bool,
    runs: usize,
    paths: Option<Vec<String>>,
    valgrind: String,
    /// Fail, rather than skip with a notice, when the baseline was blessed on another machine.
    strict_machine: bool,
}

impl Options {
    /// `strict_env` is the value of [`STRICT_ENV`], if set.
    pub fn parse(args: &[String], strict_env: Option<&str>) -> Res<Self> {
        let strict_machine = match strict_env.map(str::trim) {
            None | Some("" | "0" | "false") => false,
            Some("1" | "true") => true,
            Some(other) => return Err(format!("{STRICT_ENV} is {other:?}: set it to 1 (or true) or 0 (or false)")),
        };
        let mut o = Self {
            baseline: PathBuf::from("bench/instructions.json"),
            bless: false,
            runs: 1,
            paths: None,
            valgrind: "valgrind".into(),
            strict_machine,
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
                "--strict-machine" => o.strict_machine = true,
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
    let valgrind = resolve_program(&o.valgrind).ok_or_else(|| format!("cannot find {} on PATH", o.valgrind))?;
    let machine = Machine::this(&valgrind_version);
    // Counts from another CPU or valgrind say nothing about a regression: decide before measuring.
    let baseline = if o.bless {
        refuse_mixed_blessing(o, &machine)?;
        None
    } else {
        let baseline = read_baseline(&o.baseline)?;
        match plan(&baseline, &machine, &o.baseline, o.strict_machine)? {
            Plan::Compare => Some(baseline),
            Plan::Skip(notice) => {
                println!("{notice}");
                return Ok(());
            }
        }
    };
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the trellis-instructions executable: {e}"))?;
    let selected: Vec<&Workload> =
        WORKLOADS.iter().filter(|w| o.paths.as_ref().is_none_or(|p| p.iter().any(|n| n == w.name))).collect();
    let tmp = std::env::temp_dir().join(format!("trellis-instructions-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;

    let mut counts: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let measuring = (|| {
        for w in &selected {
            let dir = tmp.join(w.name);
            std::fs::create_dir_all(&dir)
                .and_then(|()| std::os::unix::fs::symlink(&exe, dir.join(EXE_LINK)))
                .map_err(|e| format!("cannot link {} into {}: {e}", exe.display(), dir.display()))?;
        }
        for run in 1..=o.runs {
            for w in &selected {
                let started = std::time::Instant::now();
                let n = measure(&valgrind, w.name, &tmp)?;
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
    let Some(baseline) = baseline else { return bless(o, &selected, &counts, &machine) };
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

/// What the measured process is called, in its working directory (a link to this executable).
const EXE_LINK: &str = "ti";
/// Where callgrind writes, relative to the working directory.
const OUT_FILE: &str = "callgrind.out";
/// The only environment a workload runs with (see [`Invocation`]), sorted
/// by name (the order `Command` passes it in).
const WORKLOAD_ENV: &[(&str, &str)] = &[("LC_ALL", "C"), ("PATH", "/usr/local/bin:/usr/bin:/bin")];

/// How a path's process is started. Its argument vector and environment are
/// the same wherever the tree is checked out and whatever the caller's
/// environment holds: both sit on the process's stack and are copied to the
/// heap by `std::env::args`, and their sizes move the stack and heap
/// addresses of everything after them, which changes what `memcpy` and
/// `memcmp` execute (alignment) and so the counts, by up to 6 %. So the
/// executable is linked into a scratch directory and run as `./ti` from
/// there, callgrind writes to a relative file, and the environment is
/// [`WORKLOAD_ENV`] only.
#[derive(Debug, PartialEq)]
struct Invocation {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    dir: PathBuf,
}

impl Invocation {
    /// `valgrind` is an absolute path (resolved once, see [`resolve_program`]);
    /// `dir` holds the link [`EXE_LINK`] to this executable.
    fn new(valgrind: &Path, name: &str, dir: &Path) -> Self {
        Self {
            program: valgrind.to_path_buf(),
            args: vec![
                "--tool=callgrind".into(),
                format!("--callgrind-out-file={OUT_FILE}"),
                "--collect-atstart=no".into(),
                format!("--toggle-collect={MARKER}"),
                format!("./{EXE_LINK}"),
                "workload".into(),
                name.into(),
            ],
            env: WORKLOAD_ENV.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            dir: dir.to_path_buf(),
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args).env_clear().envs(self.env.iter().map(|(k, v)| (k, v))).current_dir(&self.dir);
        c
    }
}

/// `program` as an absolute path: as given when it names a file, else found on `PATH`.
fn resolve_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return std::path::absolute(program).ok();
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(program)).find(|p| p.is_file())
}

/// Runs one path under callgrind (in `tmp/<name>`, which holds the link
/// [`EXE_LINK`]) and returns the instructions counted inside the marker.
fn measure(valgrind: &Path, name: &str, tmp: &Path) -> Res<u64> {
    let dir = tmp.join(name);
    let out = dir.join(OUT_FILE);
    let _ = std::fs::remove_file(&out);
    let result = Invocation::new(valgrind, name, &dir)
        .command()
        .output()
        .map_err(|e| format!("cannot run {}: {e}", valgrind.display()))?;
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

/// Blessing only some paths keeps the others' counts: they must come from this machine too.
fn refuse_mixed_blessing(o: &Options, machine: &Machine) -> Res<()> {
    let Some(paths) = &o.paths else { return Ok(()) };
    let Some(old) = std::fs::read_to_string(&o.baseline).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok())
    else {
        return Ok(());
    };
    let differences = machine_differences(&old, machine);
    if differences.is_empty() || WORKLOADS.iter().all(|w| paths.iter().any(|p| p == w.name)) {
        return Ok(());
    }
    Err(format!(
        "{} was blessed on another machine ({}): blessing only {} would keep the other paths' counts from that \
         machine; bless every path here (scripts/instructions --bless, without --paths)",
        o.baseline.display(),
        differences.join("; "),
        paths.join(", ")
    ))
}

fn bless(o: &Options, selected: &[&Workload], counts: &BTreeMap<&str, Vec<u64>>, machine: &Machine) -> Res<()> {
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
            "valgrind": machine.valgrind,
            "cpu": machine.cpu,
            "cpu_features": machine.cpu_features,
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

/// What the counts depend on besides the code: valgrind (its translation,
/// and the CPUID it shows the program) and the CPU (glibc's `memcpy` and
/// `memcmp` and aws-lc's AES pick their code by its features).
#[derive(Debug, PartialEq)]
struct Machine {
    valgrind: String,
    cpu: String,
    /// The CPU flags among [`CPU_FEATURES`] that the CPU has, space-separated.
    cpu_features: String,
}

/// The CPU flags (as `/proc/cpuinfo` names them) that glibc and aws-lc choose code by.
const CPU_FEATURES: &[&str] = &[
    "sse4_1",
    "sse4_2",
    "ssse3",
    "avx",
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "bmi1",
    "bmi2",
    "erms",
    "fsrm",
    "aes",
    "vaes",
    "pclmulqdq",
    "vpclmulqdq",
    "sha_ni",
    "adx",
    "movbe",
];

impl Machine {
    fn this(valgrind: &str) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self::from_cpuinfo(valgrind, &cpuinfo)
    }

    fn from_cpuinfo(valgrind: &str, cpuinfo: &str) -> Self {
        let field = |name: &str| {
            cpuinfo.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_string())
            })
        };
        let flags = field("flags").unwrap_or_default();
        let has: Vec<&str> =
            CPU_FEATURES.iter().copied().filter(|f| flags.split_whitespace().any(|g| g == *f)).collect();
        Self {
            valgrind: valgrind.to_string(),
            cpu: field("model name").unwrap_or_else(|| "unknown".into()),
            cpu_features: has.join(" "),
        }
    }
}

/// The fields of `blessed` in which the baseline's machine differs from this
/// one, as "what: then → now". A field the baseline does not record (older
/// baselines have no `cpu_features`) is not compared.
fn machine_differences(baseline: &Value, machine: &Machine) -> Vec<String> {
    [
        ("valgrind", "valgrind", &machine.valgrind),
        ("cpu", "CPU", &machine.cpu),
        ("cpu_features", "CPU features", &machine.cpu_features),
    ]
    .into_iter()
    .filter_map(|(key, what, now)| {
        let then = baseline.pointer(&format!("/blessed/{key}")).and_then(Value::as_str)?;
        (then != now.as_str()).then(|| format!("{what} {then:?} there, {now:?} here"))
    })
    .collect()
}

/// What `check` does with a baseline.
#[derive(Debug, PartialEq)]
enum Plan {
    /// Measure and compare: the baseline was blessed on a machine like this one.
    Compare,
    /// Measure nothing and succeed, after printing this notice: the baseline
    /// was blessed on another CPU or valgrind, and counts from here would
    /// differ from it for that reason alone (a bogus regression or gain).
    Skip(String),
}

/// Compare when the baseline was blessed on a machine like this one. On
/// another machine, skip with a notice, or fail when `strict`: CI on a
/// machine of another kind must not fail for it, but a CI that means to gate
/// can insist (`--strict-machine`).
fn plan(baseline: &Value, machine: &Machine, file: &Path, strict: bool) -> Res<Plan> {
    let differences = machine_differences(baseline, machine);
    if differences.is_empty() {
        return Ok(Plan::Compare);
    }
    let file = file.display();
    let why = format!(
        "{file} was blessed on another machine ({}); instruction counts depend on the CPU (glibc's memcpy and \
         aws-lc's AES pick their code by its features) and on valgrind, so counts from this machine cannot be \
         compared with it",
        differences.join("; ")
    );
    if strict {
        return Err(format!(
            "{why}. Re-bless on the machine that runs the check (scripts/instructions --bless, then commit \
             {file}), or drop --strict-machine ({STRICT_ENV}) to skip the comparison on other machines."
        ));
    }
    Ok(Plan::Skip(format!(
        "notice: instruction counts NOT checked: {why}. Nothing was measured. To check them on this machine, \
         re-bless here (scripts/instructions --bless) and commit {file}; to make this an error, pass \
         --strict-machine or set {STRICT_ENV}=1."
    )))
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

    #[test]
    fn a_path_is_started_the_same_wherever_the_tree_is_and_whatever_the_environment() {
        let valgrind = Path::new("/usr/bin/valgrind");
        let here = Invocation::new(valgrind, "authorize", Path::new("/tmp/trellis-instructions-1/authorize"));
        let there = Invocation::new(valgrind, "authorize", Path::new("/home/ci/a/much/longer/checkout/authorize"));
        assert_eq!((&here.args, &here.env), (&there.args, &there.env));
        assert!(here.args.contains(&"./ti".to_string()), "{:?}", here.args);
        assert!(
            here.args.iter().all(|a| !a.contains("/tmp") && !a.contains("target")),
            "an argument names a location: {:?}",
            here.args
        );

        // The process sees exactly the fixed environment (nothing inherited) and runs in its directory.
        let dir = std::env::temp_dir();
        let mut env = Invocation::new(valgrind, "copy", &dir);
        (env.program, env.args) = ("/usr/bin/env".into(), vec![]);
        let out = env.command().output().expect("run env");
        let want: String = WORKLOAD_ENV.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        assert_eq!(String::from_utf8_lossy(&out.stdout), want);
        let mut pwd = Invocation::new(valgrind, "copy", &dir);
        (pwd.program, pwd.args) = ("/bin/sh".into(), vec!["-c".into(), "pwd -P".into()]);
        let out = pwd.command().output().expect("run pwd");
        assert_eq!(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()), dir.canonicalize().unwrap());
    }

    const CPUINFO: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7763 64-Core Processor\n\
                           flags\t\t: fpu sse4_1 avx avx2 aes vaes erms fsrm bmi2 avx512f\n";

    #[test]
    fn the_machine_is_read_from_cpuinfo() {
        let m = Machine::from_cpuinfo("valgrind-3.19.0", CPUINFO);
        assert_eq!(m.cpu, "AMD EPYC 7763 64-Core Processor");
        assert_eq!(m.cpu_features, "sse4_1 avx avx2 avx512f bmi2 erms fsrm aes vaes");
        assert_eq!(Machine::from_cpuinfo("v", "").cpu, "unknown");
    }

    fn blessed(valgrind: &str, cpu: &str, features: &str) -> Value {
        json!({ "schema": SCHEMA, "blessed": { "valgrind": valgrind, "cpu": cpu, "cpu_features": features } })
    }

    #[test]
    fn a_baseline_from_this_machine_is_compared_strict_or_not() {
        let here = Machine::from_cpuinfo("valgrind-3.19.0", CPUINFO);
        let file = Path::new("bench/instructions.json");
        let same = blessed(&here.valgrind, &here.cpu, &here.cpu_features);
        for strict in [false, true] {
            assert_eq!(plan(&same, &here, file, strict), Ok(Plan::Compare));
            // An older baseline without the features is compared on what it records.
            assert_eq!(plan(&json!({ "blessed": { "cpu": here.cpu } }), &here, file, strict), Ok(Plan::Compare));
        }
    }

    #[test]
    fn a_baseline_from_another_cpu_or_valgrind_is_skipped_with_a_notice_or_refused_when_strict() {
        let here = Machine::from_cpuinfo("valgrind-3.19.0", CPUINFO);
        let file = Path::new("bench/instructions.json");
        for (baseline, named) in [
            (blessed("valgrind-3.22.0", &here.cpu, &here.cpu_features), "valgrind \"valgrind-3.22.0\" there"),
            (blessed(&here.valgrind, "Intel(R) Xeon(R) Gold 6338", &here.cpu_features), "CPU \"Intel(R) Xeon(R)"),
            (blessed(&here.valgrind, &here.cpu, "avx avx2"), "CPU features \"avx avx2\" there"),
        ] {
            // Not strict (CI on a machine of another kind): a notice, nothing measured, success.
            let Ok(Plan::Skip(notice)) = plan(&baseline, &here, file, false) else {
                panic!("{named}: not skipped: {:?}", plan(&baseline, &here, file, false))
            };
            assert!(notice.contains("NOT checked"), "{notice}");
            assert!(notice.contains(named), "{notice}");
            assert!(notice.contains("re-bless here (scripts/instructions --bless) and commit bench/instructions.json"));
            assert!(notice.contains(STRICT_ENV), "{notice}");

            // Strict: an error before measuring, saying how to re-bless.
            let e = plan(&baseline, &here, file, true).unwrap_err();
            assert!(e.contains("bench/instructions.json was blessed on another machine"), "{e}");
            assert!(e.contains(named), "{e}");
            assert!(e.contains("scripts/instructions --bless"), "{e}");
        }
        // Every difference is named, not only the first.
        let e = plan(&blessed("valgrind-3.22.0", "Intel", "avx"), &here, file, true).unwrap_err();
        assert!(
            e.contains("valgrind \"valgrind-3.22.0\"") && e.contains("CPU \"Intel\"") && e.contains("CPU features")
        );
    }

    #[test]
    fn strictness_comes_from_the_flag_or_the_environment() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(!Options::parse(&args(&[]), None).unwrap().strict_machine);
        assert!(Options::parse(&args(&["--strict-machine"]), None).unwrap().strict_machine);
        for (value, strict) in [("1", true), ("true", true), ("0", false), ("false", false), ("", false)] {
            assert_eq!(Options::parse(&args(&[]), Some(value)).unwrap().strict_machine, strict, "{value:?}");
        }
        let e = Options::parse(&args(&[]), Some("yes please")).err().unwrap();
        assert!(e.contains(STRICT_ENV) && e.contains("set it to 1"), "{e}");
    }

    #[test]
    fn blessing_some_paths_on_another_machine_is_refused() {
        let here = Machine::from_cpuinfo("valgrind-3.19.0", CPUINFO);
        let dir = std::env::temp_dir().join(format!("trellis-instructions-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("baseline.json");
        let args = |a: &[&str]| {
            let mut v: Vec<String> = vec!["--bless".into(), "--baseline".into(), file.display().to_string()];
            v.extend(a.iter().map(|s| s.to_string()));
            Options::parse(&v, None).unwrap()
        };
        let every: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();

        // No baseline yet, or one from this machine: any paths may be blessed.
        assert_eq!(refuse_mixed_blessing(&args(&["--paths", "copy"]), &here), Ok(()));
        std::fs::write(&file, blessed(&here.valgrind, &here.cpu, &here.cpu_features).to_string()).unwrap();
        assert_eq!(refuse_mixed_blessing(&args(&["--paths", "copy"]), &here), Ok(()));

        // From another machine: only every path at once.
        std::fs::write(&file, blessed("valgrind-3.22.0", &here.cpu, &here.cpu_features).to_string()).unwrap();
        let e = refuse_mixed_blessing(&args(&["--paths", "copy"]), &here).unwrap_err();
        assert!(e.contains("bless every path here"), "{e}");
        assert_eq!(refuse_mixed_blessing(&args(&[]), &here), Ok(()));
        assert_eq!(refuse_mixed_blessing(&args(&["--paths", &every.join(",")]), &here), Ok(()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn programs_are_resolved_to_absolute_paths() {
        assert_eq!(resolve_program("sh").map(|p| p.is_absolute()), Some(true));
        assert_eq!(resolve_program("/bin/sh"), Some(PathBuf::from("/bin/sh")));
        assert_eq!(resolve_program("no-such-program-anywhere"), None);
    }
}
