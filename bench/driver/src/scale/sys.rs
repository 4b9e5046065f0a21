//! What the kernel says about the control plane process: CPU time and memory.
//!
//! Two CPU clocks, for two window lengths:
//! - [`cpu_ticks`]: utime + stime of the whole process from `/proc/PID/stat`,
//!   threads that exited included, in clock ticks (10 ms here). For windows of
//!   seconds or more (the idle minute, a phase of hundreds of calls).
//! - [`ThreadCpu`]: nanoseconds on CPU per thread from
//!   `/proc/PID/task/TID/schedstat`. For windows of milliseconds (one config
//!   compile, one share deletion); a thread that exits inside the window loses
//!   its share of it, which the tokio threads of a server at work do not do
//!   (idle blocking threads exit after 10 s).

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
pub fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// utime + stime of `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name start at field 3 (state); utime is 14, stime 15.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
}

/// CPU time of a process over a window measured with [`cpu_ticks`].
pub struct CpuClock {
    pid: u32,
    hz: u64,
}

impl CpuClock {
    pub fn new(pid: u32) -> Self {
        Self { pid, hz: clock_ticks_per_second() }
    }

    /// CPU time used so far.
    pub fn now(&self) -> Duration {
        let ticks = cpu_ticks(self.pid).unwrap_or(0);
        Duration::from_nanos(ticks * 1_000_000_000 / self.hz)
    }
}

/// Per-thread CPU nanoseconds of a process at one moment.
pub struct ThreadCpu(HashMap<String, u64>);

impl ThreadCpu {
    pub fn read(pid: u32) -> ThreadCpu {
        let mut map = HashMap::new();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for entry in dir.flatten() {
                let tid = entry.file_name().to_string_lossy().to_string();
                let ns = std::fs::read_to_string(entry.path().join("schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
                if let Some(ns) = ns {
                    map.insert(tid, ns);
                }
            }
        }
        ThreadCpu(map)
    }

    /// CPU time the threads alive at `later` used since `self`.
    pub fn used_until(&self, later: &ThreadCpu) -> Duration {
        let ns: u64 = later.0.iter().map(|(tid, ns)| ns.saturating_sub(self.0.get(tid).copied().unwrap_or(0))).sum();
        Duration::from_nanos(ns)
    }
}

/// `VmRSS` and `VmHWM` (peak) of `pid`, in bytes.
pub fn memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |name: &str| -> Option<u64> {
        status.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse::<u64>().ok()
    };
    Some((kib("VmRSS:")? * 1024, kib("VmHWM:")? * 1024))
}

/// Bytes of the files directly in `dir` whose names start with `prefix` (the database and its log).
pub fn files_size(dir: &std::path::Path, prefix: &str) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_uses_cpu_and_memory() {
        let pid = std::process::id();
        let clock = CpuClock::new(pid);
        let before = ThreadCpu::read(pid);
        let start = clock.now();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut x = 0u64;
        // Spin until the per-thread clock has seen 50 ms of CPU, whatever else runs on the machine.
        while before.used_until(&ThreadCpu::read(pid)) < Duration::from_millis(50) {
            assert!(std::time::Instant::now() < deadline, "50 ms of CPU never showed in schedstat");
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        // The tick clock moves too (10 ms ticks: at least a few).
        while clock.now() - start < Duration::from_millis(20) {
            assert!(std::time::Instant::now() < deadline, "/proc/PID/stat never counted the CPU");
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        let (rss, peak) = memory(pid).unwrap();
        assert!(rss > 0 && peak >= rss);
    }
}
