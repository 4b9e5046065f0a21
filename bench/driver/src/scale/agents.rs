//! The agents of a run, as real `trellis agent` processes, and what their logs
//! say about configs. An agent logs `applying config version=V` (with the
//! time, to the microsecond) when it takes a new config from the control
//! plane, and a warning when it is sent the version it already has; those two
//! lines are how the benchmark sees that an agent "received a config".

use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::Res;
use crate::proc::Daemon;

/// What one log line says about configs.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A new config was taken; the time is the agent's own, from its log line.
    Applied { version: u64, at: Option<SystemTime> },
    /// The control plane sent the version the agent already had.
    Resent,
}

/// `2026-12-02T00:40:01.123456Z` (what `tracing-subscriber` prints) as a time.
pub fn parse_log_time(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<u64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let digits: String = frac.chars().take(9).collect();
    let nanos: u64 = format!("{digits:0<9}").parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days).ok()? * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(nanos))
}

pub fn parse_event(line: &str) -> Option<Event> {
    if line.contains("applying config") {
        let version = line.split("version=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
        let at = line.split_whitespace().next().and_then(parse_log_time);
        return Some(Event::Applied { version, at });
    }
    line.contains("sent the version it was told the agent has").then_some(Event::Resent)
}

/// Reads the lines appended to a log file since the last call.
pub struct LogTail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl LogTail {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf(), offset: 0, partial: Vec::new() }
    }

    /// Complete lines appended since the last call.
    pub fn lines(&mut self) -> Vec<String> {
        let Ok(mut file) = std::fs::File::open(&self.path) else { return Vec::new() };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        let Ok(n) = file.read_to_end(&mut buf) else { return Vec::new() };
        self.offset += n as u64;
        self.partial.extend_from_slice(&buf);
        let Some(last_newline) = self.partial.iter().rposition(|b| *b == b'\n') else { return Vec::new() };
        let rest = self.partial.split_off(last_newline + 1);
        let complete = std::mem::replace(&mut self.partial, rest);
        String::from_utf8_lossy(&complete).lines().map(str::to_string).collect()
    }
}

/// One running `trellis agent` and the config events seen in its log so far.
pub struct Agent {
    pub name: String,
    pub state_dir: PathBuf,
    daemon: Daemon,
    tail: LogTail,
    /// Every config it applied: (version, the agent's time).
    pub applied: Vec<(u64, Option<SystemTime>)>,
    /// How many times it was sent the version it had.
    pub resent: usize,
}

/// How to start one agent.
pub struct AgentSpec<'a> {
    pub bin: &'a Path,
    pub url: &'a str,
    pub logs: &'a Path,
    pub state_dir: PathBuf,
    pub name: String,
    /// Needed on the first start only.
    pub join_token: Option<String>,
    pub tunnel_listen: SocketAddr,
    pub advertise: Option<SocketAddr>,
}

impl Agent {
    pub fn start(spec: AgentSpec<'_>) -> Res<Agent> {
        let mut cmd = Command::new(spec.bin);
        cmd.arg("agent")
            .args(["--control-plane", spec.url])
            .arg("--state-dir")
            .arg(&spec.state_dir)
            .args(["--tunnel-listen", &spec.tunnel_listen.to_string()]);
        if let Some(token) = &spec.join_token {
            cmd.args(["--join-token", token]);
        }
        if let Some(advertise) = spec.advertise {
            cmd.args(["--advertise", &advertise.to_string()]);
        }
        let daemon = Daemon::spawn(&spec.name, cmd, spec.logs, "TERM")?;
        let tail = LogTail::new(daemon.stderr_path());
        Ok(Agent { name: spec.name, state_dir: spec.state_dir, daemon, tail, applied: Vec::new(), resent: 0 })
    }

    /// Reads the log lines appended since the last call; returns how many configs were applied in them.
    pub fn poll(&mut self) -> usize {
        let mut applied = 0;
        for line in self.tail.lines() {
            match parse_event(&line) {
                Some(Event::Applied { version, at }) => {
                    self.applied.push((version, at));
                    applied += 1;
                }
                Some(Event::Resent) => self.resent += 1,
                None => {}
            }
        }
        applied
    }

    /// Configs received so far: applied ones and resent ones.
    pub fn received(&self) -> usize {
        self.applied.len() + self.resent
    }

    pub fn check_running(&mut self) -> Res<()> {
        self.daemon.check_running()
    }

    pub fn log_tail(&self) -> String {
        self.daemon.log_tail()
    }

    pub fn stop(&mut self) {
        self.daemon.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_times_are_read_to_the_microsecond() {
        let t = parse_log_time("2026-12-02T00:40:01.123456Z").unwrap();
        let d = t.duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(d.as_secs(), 1_796_172_001);
        assert_eq!(d.subsec_micros(), 123_456);
        assert_eq!(parse_log_time("1970-01-01T00:00:00Z").unwrap(), UNIX_EPOCH, "without a fraction, at the epoch");
        assert_eq!(
            parse_log_time("2024-02-29T12:00:00.5Z").unwrap().duration_since(UNIX_EPOCH).unwrap().as_millis(),
            1_709_208_000_500
        );
        for bad in ["2026-13-01T00:00:00Z", "2026-12-02 00:40:01Z", "2026-12-02T00:40:01", "yesterday"] {
            assert_eq!(parse_log_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn config_events_come_from_the_agents_own_lines() {
        let applied = "2026-12-02T00:40:01.000250Z  INFO trellis_agent::config_cache: applying config version=4711";
        assert_eq!(
            parse_event(applied),
            Some(Event::Applied { version: 4711, at: parse_log_time("2026-12-02T00:40:01.000250Z") })
        );
        let resent = "2026-12-02T00:40:01.000250Z  WARN trellis_agent::config_cache: the control plane sent the version it was told the agent has version=3";
        assert_eq!(parse_event(resent), Some(Event::Resent));
        assert_eq!(parse_event("2026-12-02T00:40:01.000250Z  INFO trellis: agent running: agent-1"), None);
    }

    #[test]
    fn a_tail_returns_each_complete_line_once() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("trellis-bench-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        let mut file = std::fs::File::create(&path).unwrap();
        let mut tail = LogTail::new(&path);
        assert!(tail.lines().is_empty());
        file.write_all(b"one\ntw").unwrap();
        assert_eq!(tail.lines(), ["one"]);
        file.write_all(b"o\nthree\n").unwrap();
        assert_eq!(tail.lines(), ["two", "three"]);
        assert!(tail.lines().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
