//! `trellis-instructions`: instruction counts of the data plane's hot paths,
//! measured with valgrind's callgrind and checked against a committed
//! baseline (`bench/instructions.json`), so that a regression fails CI
//! whatever the machine's load. Run it through `scripts/instructions`, which
//! builds it in release mode.
//!
//! ```text
//! trellis-instructions check [--baseline FILE] [--bless] [--runs N] [--paths a,b] [--valgrind BIN] [--strict-machine]
//! trellis-instructions workload NAME     one path, run by `check` under callgrind
//! ```
//!
//! Each path runs in its own process under
//! `valgrind --tool=callgrind --collect-atstart=no --toggle-collect=<marker>`:
//! only the instructions executed inside [`workloads::measured`] (and what it
//! calls, on the main thread) count; the set-up does not.

mod check;
mod workloads;

/// Errors are one line for a person: what failed and why.
pub type Res<T> = Result<T, String>;

const USAGE: &str = "\
usage: trellis-instructions check [--baseline FILE] [--bless] [--runs N] [--paths a,b] [--valgrind BIN] [--strict-machine]
       trellis-instructions workload NAME
       trellis-instructions list

check      runs every path under callgrind and compares its instruction count with the
           baseline (default bench/instructions.json): fails when one grew by more than
           the baseline's tolerance (10 %), prints every path's ratio otherwise
  --bless  writes the counts measured now as the new baseline instead (an intended change)
  --runs N runs every path N times (the median counts) and prints the spread between runs
  --paths  only these paths (comma-separated; see `list`)
  --strict-machine
           fail when the baseline was blessed on another CPU or valgrind (also
           TRELLIS_INSTRUCTIONS_STRICT_MACHINE=1); without it such a check prints a
           notice, measures nothing and succeeds: counts from another machine cannot be
           compared
workload   runs one path's workload (what `check` runs under callgrind)
list       the paths and what each one measures";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("workload") => match args.get(1) {
            Some(name) => run_workload(name),
            None => Err(format!("workload: which one?\n{USAGE}")),
        },
        Some("check") => check::Options::parse(&args[1..], std::env::var(check::STRICT_ENV).ok().as_deref())
            .and_then(|o| check::main(&o)),
        Some("list") => {
            for w in workloads::WORKLOADS {
                println!("{:<10} {}", w.name, w.what);
            }
            Ok(())
        }
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(USAGE.to_string()),
    };
    if let Err(e) = outcome {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run_workload(name: &str) -> Res<()> {
    let w = workloads::WORKLOADS
        .iter()
        .find(|w| w.name == name)
        .ok_or_else(|| format!("no path named {name:?} (see `trellis-instructions list`)"))?;
    (w.run)()
}
