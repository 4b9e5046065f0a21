//! Child processes of a run. Every child is registered by PID while it lives,
//! so that a failure, Ctrl-C or SIGTERM stops it: no process started by the
//! harness outlives the run. Children get their own process group, so the
//! terminal's Ctrl-C reaches only the driver, which then stops them in order.

use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::Res;

static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// True once Ctrl-C or SIGTERM arrived: nothing new is started from then on.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn refuse_if_interrupted() -> Res<()> {
    if interrupted() { Err("interrupted".into()) } else { Ok(()) }
}

fn live() -> std::sync::MutexGuard<'static, Vec<u32>> {
    // A poisoned lock only means another thread panicked while holding it; the list is still valid.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

fn register(pid: u32) {
    live().push(pid);
}

fn unregister(pid: u32) {
    live().retain(|p| *p != pid);
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => {
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|s| s != "Z")
        }
        Err(_) => false,
    }
}

fn send_signal(pids: &[u32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .args(pids.iter().map(u32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Stops every registered child: SIGTERM, then SIGKILL for those still alive after `grace`.
/// Called from the signal handler while the main thread may be anywhere.
pub fn stop_all(grace: Duration) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let pids: Vec<u32> = live().clone();
    send_signal(&pids, "TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && pids.iter().any(|p| alive(*p)) {
        thread::sleep(Duration::from_millis(50));
    }
    let rest: Vec<u32> = pids.into_iter().filter(|p| alive(*p)).collect();
    send_signal(&rest, "KILL");
}

/// A long-running child (a server, a proxy, an agent) with its output in log files.
pub struct Daemon {
    name: String,
    child: Option<Child>,
    pid: u32,
    stdout: PathBuf,
    stderr: PathBuf,
    /// The signal that asks this program to shut down gracefully.
    stop_signal: &'static str,
}

impl Daemon {
    /// Starts `cmd` with stdout and stderr in `logs/<name>.{out,err}`.
    pub fn spawn(name: &str, mut cmd: Command, logs: &Path, stop_signal: &'static str) -> Res<Daemon> {
        refuse_if_interrupted()?;
        std::fs::create_dir_all(logs).map_err(|e| format!("create log dir {}: {e}", logs.display()))?;
        let stdout = logs.join(format!("{name}.out"));
        let stderr = logs.join(format!("{name}.err"));
        let out = File::create(&stdout).map_err(|e| format!("create {}: {e}", stdout.display()))?;
        let err = File::create(&stderr).map_err(|e| format!("create {}: {e}", stderr.display()))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
        let child = cmd.spawn().map_err(|e| format!("start {name} ({:?}): {e}", cmd.get_program()))?;
        let pid = child.id();
        register(pid);
        Ok(Daemon { name: name.to_string(), child: Some(child), pid, stdout, stderr, stop_signal })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The file the process's stderr goes to (where `trellis` logs).
    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    /// Both log files, stdout first.
    pub fn log_text(&self) -> String {
        let mut s = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        s.push_str(&std::fs::read_to_string(&self.stderr).unwrap_or_default());
        s
    }

    /// The last lines of the logs, for error messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(15);
        format!(
            "last lines of {} ({}, {}):\n{}",
            self.name,
            self.stdout.display(),
            self.stderr.display(),
            lines[start..].join("\n")
        )
    }

    /// Err with the log tail when the process has exited.
    pub fn check_running(&mut self) -> Res<()> {
        let Some(child) = self.child.as_mut() else {
            return Err(format!("{} was stopped", self.name));
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                unregister(self.pid);
                self.child = None;
                Err(format!("{} exited ({status}); {}", self.name, self.log_tail()))
            }
            Err(e) => Err(format!("cannot query {}: {e}", self.name)),
        }
    }

    /// Waits until `find` returns Some for one line of the logs.
    pub fn wait_for_log<T>(&mut self, what: &str, timeout: Duration, find: impl Fn(&str) -> Option<T>) -> Res<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.log_text().lines().find_map(&find) {
                return Ok(found);
            }
            self.check_running().map_err(|e| format!("waiting for {what}: {e}"))?;
            if Instant::now() >= deadline {
                return Err(format!("timed out after {timeout:?} waiting for {what}; {}", self.log_tail()));
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// Asks the process to stop, then kills it if it has not exited after a grace period.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            send_signal(&[self.pid], self.stop_signal);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
        unregister(self.pid);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a short-lived command to completion, killing it after `timeout`.
pub fn run(mut cmd: Command, timeout: Duration) -> Res<Output> {
    refuse_if_interrupted()?;
    let program = format!("{:?}", cmd.get_program());
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let mut child = cmd.spawn().map_err(|e| format!("start {program}: {e}"))?;
    let pid = child.id();
    register(pid);
    let mut out_pipe = child.stdout.take().expect("stdout was piped above");
    let mut err_pipe = child.stderr.take().expect("stderr was piped above");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("{program} did not finish within {timeout:?} and was killed"));
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => break Err(format!("wait for {program}: {e}")),
        }
    };
    unregister(pid);
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output { status: status?, stdout, stderr })
}

/// Resident set size of `pid` in bytes (VmRSS), None when the process is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Number of open file descriptors of `pid`.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// CPU time (user + system, every thread) `pid` has used, in seconds, from `/proc/PID/stat`;
/// None when the process is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count fields after its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks_per_second() as f64)
}

/// `getconf CLK_TCK`, read once (100 on Linux unless configured otherwise).
fn clock_ticks_per_second() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|t| *t > 0)
            .unwrap_or(100)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_of_this_process_grow_with_work() {
        let before = cpu_seconds(std::process::id()).unwrap();
        // Spin until a clock tick of CPU time shows, however loaded the machine is.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut x = 0u64;
        while cpu_seconds(std::process::id()).unwrap() <= before {
            assert!(Instant::now() < deadline, "20 s of spinning used no CPU time");
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        assert_eq!(cpu_seconds(u32::MAX), None);
    }
}
