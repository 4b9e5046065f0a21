//! One JSON line per proxied (or refused) connection, written to stdout by
//! default or appended to a file (`trellis agent --access-log FILE`): times,
//! role, endpoint, consumer account, client address, resource, target, bytes
//! each way, duration and outcome. Never logs payload.
//!
//! A file is opened for appending (`O_APPEND`), so lines are never interleaved
//! with another writer's, and [`AccessLog::reopen`] (on SIGHUP at the CLI)
//! starts writing to a fresh file at the same path after log rotation.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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

type Sink = Arc<Mutex<Box<dyn Write + Send>>>;

/// Where access-log lines go; cheap to clone.
#[derive(Clone, Default)]
pub struct AccessLog {
    sink: Option<Sink>,
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

    /// Lines go to `w` (tests).
    pub fn to_writer(w: Box<dyn Write + Send>) -> Self {
        Self { sink: Some(Arc::new(Mutex::new(w))), path: None }
    }

    /// Lines are appended to the file at `path` (created, mode 0640, when missing).
    pub fn append_to(path: &Path) -> io::Result<Self> {
        let file = open_append(path)?;
        Ok(Self { sink: Some(Arc::new(Mutex::new(Box::new(file)))), path: Some(Arc::new(path.to_path_buf())) })
    }

    /// After log rotation: opens the file at the same path again (a new one
    /// if it was moved away). A no-op for stdout; on failure the old file is kept.
    pub fn reopen(&self) -> io::Result<()> {
        let (Some(sink), Some(path)) = (&self.sink, &self.path) else { return Ok(()) };
        let file = open_append(path)?;
        *sink.lock().unwrap_or_else(|e| e.into_inner()) = Box::new(file);
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

    fn write_line(&self, mut line: Vec<u8>) {
        let Some(sink) = &self.sink else { return };
        line.push(b'\n');
        let mut w = sink.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = w.write_all(&line).and_then(|()| w.flush()) {
            tracing::warn!(error = %e, "could not write the access log");
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
}
