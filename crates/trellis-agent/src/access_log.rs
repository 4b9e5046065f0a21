//! One JSON line per proxied (or refused) connection, written to stdout by
//! default or appended to a file (`trellis agent --access-log FILE`): times,
//! role, endpoint, consumer account, client address, resource, target, bytes
//! each way, duration and outcome. Never logs payload.
//!
//! A file is opened for appending (`O_APPEND`), so lines are never interleaved
//! with another writer's, and [`AccessLog::reopen`] (on SIGHUP at the CLI)
//! starts writing to a fresh file at the same path after log rotation.
//!
//! Lines are written by a thread of their own, never by the data plane: a
//! connection's line is appended to a buffer in memory, and the writer
//! thread writes what gathered in one `write` at most every
//! [`BATCH_WINDOW`] (so a busy agent writes one batch of lines, not one
//! syscall per connection, and a stdout pipe that stops draining stalls the
//! log, not the flows). [`AccessLog::flush`] waits until every line so far is
//! written (the agent calls it when it stops). Over [`MAX_PENDING`] bytes
//! waiting (the sink stopped taking them), further lines are dropped and
//! counted in a warning rather than held without bound.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// One access-log line. Borrows what the flow already holds: writing a line
/// copies nothing but the serialized bytes.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessRecord<'a> {
    /// RFC 3339, when the connection was accepted.
    pub start: String,
    /// RFC 3339, when it ended.
    pub end: String,
    pub role: &'static str,
    pub vpc_endpoint_id: &'a str,
    pub consumer_account_id: &'a str,
    pub client_addr: &'a str,
    pub resource_configuration_id: &'a str,
    /// What was dialed: `ip:port`/`name:port` on a gateway, the gateway agent on an endpoint.
    pub target: &'a str,
    /// Bytes from the consumer toward the resource.
    pub bytes_in: u64,
    /// Bytes from the resource toward the consumer.
    pub bytes_out: u64,
    pub duration_ms: u64,
    /// `closed`, `denied`, `unreachable`, `timeout`, `bad_request`, `revoked`, `shutdown` or `error`.
    pub outcome: &'a str,
    /// Detail for failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'a str>,
    /// Endpoint side: gateway agents tried before this one that failed,
    /// each as `tried agent-… (host:port): what happened`; absent when the first one answered.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub tried: &'a [String],
}

/// Formats a time as RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Milliseconds in a duration, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// How long the writer thread gathers lines after writing a batch.
pub const BATCH_WINDOW: Duration = Duration::from_millis(10);

/// Bytes of lines that may wait for the writer thread; beyond, lines are dropped.
pub const MAX_PENDING: usize = 16 << 20;

/// Lines waiting for the writer thread, and its state.
#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    /// The writer waits for lines (a new line must wake it).
    idle: bool,
    /// Lines written so far are numbered; the writer has written up to `written`.
    queued: u64,
    written: u64,
    dropped: u64,
}

/// Shared by every clone of an [`AccessLog`] and its writer thread.
struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the writer (lines arrived) and [`AccessLog::flush`] callers (a batch was written).
    wake: Condvar,
    written: Condvar,
    out: Mutex<Box<dyn Write + Send>>,
    /// Counts dropped lines for the process's metrics ([`AccessLog::count_drops_in`]).
    drops: std::sync::OnceLock<prometheus_client::metrics::counter::Counter>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The writer thread: writes what gathered, then waits [`BATCH_WINDOW`] before the
/// next batch. Ends (after writing everything) once every [`AccessLog`] is gone.
fn write_batches(shared: Arc<Shared>) {
    let mut batch = Vec::new();
    loop {
        let upto = {
            let mut p = shared.pending();
            while p.buf.is_empty() {
                if Arc::strong_count(&shared) == 1 {
                    return;
                }
                p.idle = true;
                p = shared.wake.wait_timeout(p, Duration::from_millis(200)).unwrap_or_else(|e| e.into_inner()).0;
            }
            p.idle = false;
            std::mem::swap(&mut p.buf, &mut batch);
            p.queued
        };
        {
            let mut out = shared.out.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = out.write_all(&batch).and_then(|()| out.flush()) {
                tracing::warn!(error = %e, "could not write the access log");
            }
        }
        batch.clear();
        // A burst's buffer is not kept: an agent idle after one holds no megabytes for it.
        batch.shrink_to(64 << 10);
        shared.pending().written = upto;
        shared.written.notify_all();
        std::thread::sleep(BATCH_WINDOW);
    }
}

/// Where access-log lines go; cheap to clone.
#[derive(Clone, Default)]
pub struct AccessLog {
    sink: Option<Arc<Shared>>,
    /// The file being appended to, when it is one.
    path: Option<Arc<PathBuf>>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog").field("enabled", &self.sink.is_some()).field("path", &self.path).finish()
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
    options.open(path)
}

impl AccessLog {
    /// Lines go to the process's stdout.
    pub fn stdout() -> Self {
        Self::to_writer(Box::new(std::io::stdout()))
    }

    /// Lines go to `w`, written by a thread of their own.
    pub fn to_writer(w: Box<dyn Write + Send>) -> Self {
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            wake: Condvar::new(),
            written: Condvar::new(),
            out: Mutex::new(w),
            drops: std::sync::OnceLock::new(),
        });
        let for_writer = shared.clone();
        // Without its thread the log would only fill memory: a process that cannot start one cannot run.
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_batches(for_writer))
            .expect("starting the access-log writer thread");
        Self { sink: Some(shared), path: None }
    }

    /// Lines are appended to the file at `path` (created, mode 0640, when missing).
    pub fn append_to(path: &Path) -> io::Result<Self> {
        let file = open_append(path)?;
        Ok(Self { path: Some(Arc::new(path.to_path_buf())), ..Self::to_writer(Box::new(file)) })
    }

    /// Counts the lines this log drops in `counter` (the process's
    /// `access_log_dropped_lines` metric); the first counter given stays.
    pub fn count_drops_in(&self, counter: prometheus_client::metrics::counter::Counter) {
        if let Some(shared) = &self.sink {
            let _ = shared.drops.set(counter);
        }
    }

    /// Waits until every line written so far has been handed to the sink, at
    /// most `within`: false when the sink did not take them in time (a stdout
    /// pipe nobody drains must not keep a stopping agent from exiting).
    pub fn flush(&self, within: Duration) -> bool {
        let Some(shared) = &self.sink else { return true };
        let deadline = std::time::Instant::now() + within;
        let mut p = shared.pending();
        let target = p.queued;
        while p.written < target {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            if p.idle {
                p.idle = false;
                shared.wake.notify_one();
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            p = shared.written.wait_timeout(p, wait).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }

    /// After log rotation: opens the file at the same path again (a new one
    /// if it was moved away). A no-op for stdout; on failure the old file is kept.
    pub fn reopen(&self) -> io::Result<()> {
        let (Some(sink), Some(path)) = (&self.sink, &self.path) else { return Ok(()) };
        let file = open_append(path)?;
        // Lines written before the rotation go to the old file (if it takes them within a second).
        self.flush(Duration::from_secs(1));
        *sink.out.lock().unwrap_or_else(|e| e.into_inner()) = Box::new(file);
        Ok(())
    }

    /// The file lines are appended to, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref().map(PathBuf::as_path)
    }

    /// No access log.
    pub fn disabled() -> Self {
        Self { sink: None, path: None }
    }

    pub fn write(&self, record: &AccessRecord<'_>) {
        // A record of strings and numbers always serializes.
        self.write_line(serde_json::to_vec(record).expect("access record serializes"));
    }

    /// Writes any serializable record as one line (the relay's flows).
    pub fn write_json<T: Serialize>(&self, record: &T) {
        match serde_json::to_vec(record) {
            Ok(line) => self.write_line(line),
            Err(e) => tracing::warn!(error = %e, "could not serialize an access-log record"),
        }
    }

    /// Writes an event that is not a connection (a service target's health
    /// changing): one JSON object with an `event` field and the time.
    pub fn write_event(&self, event: &serde_json::Value) {
        let mut event = event.clone();
        if let Some(map) = event.as_object_mut() {
            map.insert("time".into(), rfc3339(std::time::SystemTime::now()).into());
        }
        // A JSON value always serializes.
        self.write_line(serde_json::to_vec(&event).expect("event serializes"));
    }

    fn write_line(&self, line: Vec<u8>) {
        let Some(sink) = &self.sink else { return };
        let mut p = sink.pending();
        if p.buf.len() + line.len() >= MAX_PENDING {
            p.dropped += 1;
            let dropped = p.dropped;
            drop(p);
            if let Some(counter) = sink.drops.get() {
                counter.inc();
            }
            if dropped == 1 || dropped.is_multiple_of(10_000) {
                tracing::warn!(dropped, "the access log's sink is not taking lines; dropping them");
            }
            return;
        }
        p.buf.extend_from_slice(&line);
        p.buf.push(b'\n');
        p.queued += 1;
        if p.idle {
            p.idle = false;
            sink.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn each_record_is_one_json_line() {
        let buf = Buf::default();
        let log = AccessLog::to_writer(Box::new(buf.clone()));
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(86400);
        let rec = AccessRecord {
            start: rfc3339(now),
            end: rfc3339(now),
            role: "gateway",
            vpc_endpoint_id: "vpce-1",
            consumer_account_id: "acct-1",
            client_addr: "10.0.0.1:5000",
            resource_configuration_id: "rcfg-1",
            target: "10.0.0.5:5432",
            bytes_in: 3,
            bytes_out: 4,
            duration_ms: 0,
            outcome: "closed",
            message: None,
            tried: &[],
        };
        log.write(&rec);
        log.write(&rec);
        assert!(log.flush(Duration::from_secs(10)));
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["start"], "1970-01-02T00:00:00.000Z");
        assert_eq!(v["bytesOut"], 4);
        assert_eq!(v["outcome"], "closed");
    }

    #[test]
    fn a_file_is_appended_to_and_reopened_after_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        std::fs::write(&path, "earlier line\n").unwrap();
        let log = AccessLog::append_to(&path).unwrap();
        let now = SystemTime::UNIX_EPOCH;
        let rec = |outcome: &'static str| AccessRecord {
            start: rfc3339(now),
            end: rfc3339(now),
            role: "endpoint",
            vpc_endpoint_id: "vpce-1",
            consumer_account_id: "acct-1",
            client_addr: "10.0.0.1:5000",
            resource_configuration_id: "rcfg-1",
            target: "",
            bytes_in: 0,
            bytes_out: 0,
            duration_ms: 0,
            outcome,
            message: None,
            tried: &[],
        };
        log.clone().write(&rec("first"));
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.write(&rec("still-old"));
        log.reopen().unwrap();
        log.write(&rec("second"));
        assert!(log.flush(Duration::from_secs(10)));
        let old = std::fs::read_to_string(&rotated).unwrap();
        assert!(old.starts_with("earlier line\n"), "{old}");
        assert!(old.contains("\"first\"") && old.contains("\"still-old\""), "{old}");
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!(new.lines().count(), 1, "{new}");
        assert!(new.contains("\"second\""), "{new}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
        }
    }

    /// A sink that takes nothing until it is let go.
    struct Stuck(std::sync::mpsc::Receiver<()>, Arc<Mutex<Vec<u8>>>);
    impl Write for Stuck {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            self.1.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_sink_that_stops_taking_lines_never_blocks_the_connections_that_log() {
        let (release, stuck) = std::sync::mpsc::channel();
        let written = Arc::new(Mutex::new(Vec::new()));
        let log = AccessLog::to_writer(Box::new(Stuck(stuck, written.clone())));
        let counted = prometheus_client::metrics::counter::Counter::<u64>::default();
        log.count_drops_in(counted.clone());
        let event = serde_json::json!({"event": "x", "pad": "p".repeat(1000)});
        let started = std::time::Instant::now();
        // Well over MAX_PENDING bytes, while the sink takes nothing.
        let lines = MAX_PENDING / 1000 + 5_000;
        for _ in 0..lines {
            log.write_event(&event);
        }
        assert!(started.elapsed() < Duration::from_secs(10), "writing lines waited for the sink");
        let p = log.sink.as_ref().unwrap().pending();
        assert!(p.dropped > 0 && p.buf.len() < MAX_PENDING, "{} dropped, {} bytes held", p.dropped, p.buf.len());
        assert_eq!(counted.get(), p.dropped, "every dropped line is counted in the metric");
        drop(p);
        // A stopping agent gives up on a sink that takes nothing, by the deadline.
        let waited = std::time::Instant::now();
        assert!(!log.flush(Duration::from_millis(300)), "flushed into a sink that takes nothing");
        assert!(waited.elapsed() < Duration::from_secs(5), "flush waited past its deadline");
        drop(release);
        assert!(log.flush(Duration::from_secs(30)), "the released sink took every waiting line");
        let written = written.lock().unwrap().len();
        // What waited, and the batch the writer held when the sink stopped.
        assert!(written > MAX_PENDING / 2 && written <= 2 * MAX_PENDING, "{written}");
    }
}
