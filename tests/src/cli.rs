//! Running the `trellis` CLI the way a user or a script does:
//! `TRELLIS_URL`, `TRELLIS_API_KEY`, `TRELLIS_CA_CERT` in the environment and
//! `--output json` for machine-readable answers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// The CLI pointed at one control plane with one API key.
#[derive(Clone, Debug)]
pub struct Cli {
    bin: PathBuf,
    url: String,
    key: Option<String>,
    ca: PathBuf,
}

/// What one CLI run printed and how it exited.
#[derive(Debug)]
pub struct CliRun {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Cli {
    pub fn new(bin: &Path, url: &str, key: Option<&str>, ca: &Path) -> Cli {
        Cli { bin: bin.to_path_buf(), url: url.to_string(), key: key.map(str::to_string), ca: ca.to_path_buf() }
    }

    /// The same CLI with another API key.
    pub fn with_key(&self, key: &str) -> Cli {
        Cli { key: Some(key.to_string()), ..self.clone() }
    }

    /// The command with the environment set, not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).env("TRELLIS_URL", &self.url).env("TRELLIS_CA_CERT", &self.ca).env("NO_COLOR", "1");
        match &self.key {
            Some(key) => cmd.env("TRELLIS_API_KEY", key),
            None => cmd.env_remove("TRELLIS_API_KEY"),
        };
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs `trellis <args>` and returns what it printed, success or not.
    pub fn run(&self, args: &[&str]) -> CliRun {
        let Output { status, stdout, stderr } =
            self.command(args).output().unwrap_or_else(|e| panic!("run {} {args:?}: {e}", self.bin.display()));
        CliRun {
            success: status.success(),
            code: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }

    /// Runs `trellis <args> --output json`, asserts success, parses stdout
    /// (`Null` when the command prints nothing, as deletes do).
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--output", "json"]);
        let run = self.run(&all);
        assert!(
            run.success,
            "`trellis {}` failed ({:?}):\nstdout: {}\nstderr: {}",
            all.join(" "),
            run.code,
            run.stdout,
            run.stderr
        );
        if run.stdout.trim().is_empty() {
            return Value::Null;
        }
        serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| {
            panic!("`trellis {}` printed no JSON ({e}):\n{}\nstderr: {}", all.join(" "), run.stdout, run.stderr)
        })
    }
}
