//! Child processes owned by a test: output captured to files, stopped by PID
//! (SIGTERM, then SIGKILL) when the handle drops, logs shown when a test fails.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::wait::poll_until;

/// How long a process gets between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(5);
/// Lines of each log printed when a test panics.
const TAIL_LINES: usize = 60;

/// A running child process with its stdout and stderr in files.
pub struct Proc {
    name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout/stderr written to
    /// `<log_dir>/<name>.stdout` and `.stderr`.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Proc {
        std::fs::create_dir_all(log_dir).unwrap_or_else(|e| panic!("create log dir {}: {e}", log_dir.display()));
        let stdout = log_dir.join(format!("{name}.stdout"));
        let stderr = log_dir.join(format!("{name}.stderr"));
        let out = File::create(&stdout).unwrap_or_else(|e| panic!("create {}: {e}", stdout.display()));
        let err = File::create(&stderr).unwrap_or_else(|e| panic!("create {}: {e}", stderr.display()));
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {name} ({cmd:?}): {e}"));
        Proc { name: name.to_string(), child, stdout, stderr, exited: None }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Everything the process wrote so far, stdout then stderr.
    pub fn output(&self) -> String {
        let mut s = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        s.push_str(&std::fs::read_to_string(&self.stderr).unwrap_or_default());
        s
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().unwrap_or_else(|e| panic!("wait for {}: {e}", self.name));
        }
        self.exited
    }

    /// Waits for the process to exit by itself within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match poll_until(timeout, || self.try_wait()) {
            Some(status) => status,
            None => panic!("{} did not exit within {timeout:?}; its output:\n{}", self.name, self.output()),
        }
    }

    /// Panics with the process output if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_wait() {
            panic!("{} exited unexpectedly with {status}; its output:\n{}", self.name, self.output());
        }
    }

    /// Scans the output until `find` returns `Some` for one of its lines;
    /// panics if the process exits first or `timeout` passes.
    pub fn wait_for_line<T>(&mut self, what: &str, timeout: Duration, find: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        let mut interval = Duration::from_millis(20);
        loop {
            if let Some(found) = self.output().lines().find_map(&find) {
                return found;
            }
            if let Some(status) = self.try_wait() {
                // one last look: the line may have been written just before exit
                if let Some(found) = self.output().lines().find_map(&find) {
                    return found;
                }
                panic!("{} exited with {status} before {what}; its output:\n{}", self.name, self.output());
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what} from {}; its output:\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(interval);
            interval = (interval * 2).min(Duration::from_millis(200));
        }
    }

    /// Sends SIGTERM, waits up to the grace period, then SIGKILL; idempotent.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(status) = self.try_wait() {
            return Some(status);
        }
        let pid = self.child.id().to_string();
        // `kill` is the portable way to send SIGTERM without unsafe libc calls.
        let _ = Command::new("kill").args(["-TERM", &pid]).stderr(Stdio::null()).status();
        if let Some(status) = poll_until(GRACE, || self.try_wait()) {
            return Some(status);
        }
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
        self.exited
    }

    /// Kills the process with SIGKILL (no chance to clean up, as in a crash
    /// or an OOM kill) and reaps it; idempotent.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if let Some(status) = self.try_wait() {
            return Some(status);
        }
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
        self.exited
    }

    /// The last lines of both logs, for failure reports.
    pub fn tail(&self) -> String {
        let mut s = String::new();
        for (label, path) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(TAIL_LINES);
            s.push_str(&format!("----- {} {label} ({}) -----\n", self.name, path.display()));
            for line in &lines[start..] {
                s.push_str(line);
                s.push('\n');
            }
        }
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("{}", self.tail());
        }
    }
}
