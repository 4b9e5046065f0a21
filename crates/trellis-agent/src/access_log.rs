//! One JSON line per proxied (or refused) connection, written to stdout by
//! default: times, role, endpoint, consumer account, client address, resource,
//! target, bytes each way, duration and outcome. Never logs payload.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// One access-log line.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessRecord {
    /// RFC 3339, when the connection was accepted.
    pub start: String,
    /// RFC 3339, when it ended.
    pub end: String,
    pub role: &'static str,
    pub vpc_endpoint_id: String,
    pub consumer_account_id: String,
    pub client_addr: String,
    pub resource_configuration_id: String,
    /// What was dialed: `ip:port`/`name:port` on a gateway, the gateway agent on an endpoint.
    pub target: String,
    /// Bytes from the consumer toward the resource.
    pub bytes_in: u64,
    /// Bytes from the resource toward the consumer.
    pub bytes_out: u64,
    pub duration_ms: u64,
    /// `closed`, `denied`, `unreachable`, `timeout`, `bad_request`, `revoked`, `shutdown` or `error`.
    pub outcome: String,
    /// Detail for failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
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
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog").field("enabled", &self.sink.is_some()).finish()
    }
}

impl AccessLog {
    /// Lines go to the process's stdout.
    pub fn stdout() -> Self {
        Self::to_writer(Box::new(std::io::stdout()))
    }

    /// Lines go to `w` (tests, files).
    pub fn to_writer(w: Box<dyn Write + Send>) -> Self {
        Self { sink: Some(Arc::new(Mutex::new(w))) }
    }

    /// No access log.
    pub fn disabled() -> Self {
        Self { sink: None }
    }

    pub fn write(&self, record: &AccessRecord) {
        let Some(sink) = &self.sink else { return };
        // A record of strings and numbers always serializes.
        let mut line = serde_json::to_vec(record).expect("access record serializes");
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
            vpc_endpoint_id: "vpce-1".into(),
            consumer_account_id: "acct-1".into(),
            client_addr: "10.0.0.1:5000".into(),
            resource_configuration_id: "rcfg-1".into(),
            target: "10.0.0.5:5432".into(),
            bytes_in: 3,
            bytes_out: 4,
            duration_ms: 0,
            outcome: "closed".into(),
            message: None,
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
}
