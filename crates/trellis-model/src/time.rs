//! Timestamps as the API shows them: RFC 3339, UTC, whole seconds.
//!
//! The model never reads the clock: callers pass `now`.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A point in time, serialized as RFC 3339 (`2025-01-31T12:00:00Z`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(SystemTime);

/// A string that is not an RFC 3339 timestamp.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an RFC 3339 timestamp such as 2025-01-31T12:00:00Z")]
pub struct TimestampError(pub String);

impl Timestamp {
    /// Truncates to whole seconds so a stored value equals what the API shows.
    pub fn new(t: SystemTime) -> Self {
        let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Self(UNIX_EPOCH + Duration::from_secs(secs))
    }

    pub fn from_unix_seconds(secs: u64) -> Self {
        Self(UNIX_EPOCH + Duration::from_secs(secs))
    }

    pub fn unix_seconds(&self) -> u64 {
        self.0.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }

    pub fn system_time(&self) -> SystemTime {
        self.0
    }

    /// This time plus `d` (saturating at the far future).
    pub fn plus(&self, d: Duration) -> Self {
        Self::new(self.0.checked_add(d).unwrap_or(self.0))
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        Self::new(t)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_seconds(self.0))
    }
}

impl FromStr for Timestamp {
    type Err = TimestampError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_rfc3339_weak(s).map(Self::new).map_err(|_| TimestampError(s.to_string()))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_and_parses_back() {
        let t = Timestamp::from_unix_seconds(1_700_000_000);
        assert_eq!(t.to_string(), "2023-11-14T22:13:20Z");
        assert_eq!("2023-11-14T22:13:20Z".parse::<Timestamp>().unwrap(), t);
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"2023-11-14T22:13:20Z\"");
        assert!("yesterday".parse::<Timestamp>().is_err());
    }

    #[test]
    fn sub_second_precision_is_dropped() {
        let t = Timestamp::new(UNIX_EPOCH + Duration::from_millis(1_500));
        assert_eq!(t.unix_seconds(), 1);
    }
}
