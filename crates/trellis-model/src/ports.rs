//! TCP port ranges as written in the API: `"5432"` or `"8000-8100"`, 1–65535.
//!
//! `trellis-proto` re-exports [`PortRange`] so the API and the agent config share one type.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An inclusive range of TCP ports, `start <= end`, both in 1..=65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    start: u16,
    end: u16,
}

/// Why a port range string was rejected; the message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    /// Not of the form `N` or `N-M`.
    #[error("port range {0:?} is not of the form \"N\" or \"N-M\" (for example \"5432\" or \"8000-8100\")")]
    Syntax(String),
    /// A port outside 1–65535.
    #[error("port range {0:?} has a port outside 1-65535")]
    OutOfRange(String),
    /// `N-M` with `N > M`.
    #[error("port range {0:?} starts after it ends; write the smaller port first")]
    Reversed(String),
}

impl PortRange {
    /// A range from `start` to `end` inclusive.
    pub fn new(start: u16, end: u16) -> Result<Self, PortRangeError> {
        let text = format!("{start}-{end}");
        if start == 0 || end == 0 {
            return Err(PortRangeError::OutOfRange(text));
        }
        if start > end {
            return Err(PortRangeError::Reversed(text));
        }
        Ok(Self { start, end })
    }

    /// A range holding one port.
    pub fn single(port: u16) -> Result<Self, PortRangeError> {
        Self::new(port, port)
    }

    pub fn start(&self) -> u16 {
        self.start
    }

    pub fn end(&self) -> u16 {
        self.end
    }

    pub fn contains(&self, port: u16) -> bool {
        self.start <= port && port <= self.end
    }

    /// Number of ports in the range.
    pub fn len(&self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }

    /// Always false: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn ports(&self) -> impl Iterator<Item = u16> {
        self.start..=self.end
    }
}

fn parse_port(part: &str, whole: &str) -> Result<u16, PortRangeError> {
    if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PortRangeError::Syntax(whole.to_string()));
    }
    match part.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(PortRangeError::OutOfRange(whole.to_string())),
    }
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, b) = match s.split_once('-') {
            Some((a, b)) => (a, b),
            None => (s, s),
        };
        let start = parse_port(a, s)?;
        let end = parse_port(b, s)?;
        if start > end {
            return Err(PortRangeError::Reversed(s.to_string()));
        }
        Ok(Self { start, end })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end { write!(f, "{}", self.start) } else { write!(f, "{}-{}", self.start, self.end) }
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a list of port ranges was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRangesError {
    #[error(transparent)]
    Range(#[from] PortRangeError),
    /// The list is empty where ports are required.
    #[error("portRanges is empty: give at least one port or range, for example [\"5432\"]")]
    Empty,
    /// More ranges than a configuration may hold.
    #[error("portRanges has {0} entries; at most {MAX_PORT_RANGES} are allowed")]
    TooMany(usize),
    /// Two ranges share a port.
    #[error("port ranges {0} and {1} overlap; list each port once")]
    Overlap(PortRange, PortRange),
}

/// The most port ranges one configuration may list.
pub const MAX_PORT_RANGES: usize = 64;

/// Parses a non-empty list of non-overlapping port ranges, keeping the caller's order.
pub fn parse_port_ranges<S: AsRef<str>>(items: &[S]) -> Result<Vec<PortRange>, PortRangesError> {
    if items.is_empty() {
        return Err(PortRangesError::Empty);
    }
    if items.len() > MAX_PORT_RANGES {
        return Err(PortRangesError::TooMany(items.len()));
    }
    let ranges = items.iter().map(|s| s.as_ref().parse()).collect::<Result<Vec<PortRange>, _>>()?;
    let mut sorted = ranges.clone();
    sorted.sort();
    for pair in sorted.windows(2) {
        if pair[1].start() <= pair[0].end() {
            return Err(PortRangesError::Overlap(pair[0], pair[1]));
        }
    }
    Ok(ranges)
}

/// Whether every port of `inner` lies in some range of `outer`.
pub fn ranges_cover(outer: &[PortRange], inner: &[PortRange]) -> bool {
    inner.iter().all(|r| {
        // Walk the range through the (possibly adjacent) outer ranges.
        let mut next = u32::from(r.start());
        let mut sorted: Vec<&PortRange> = outer.iter().collect();
        sorted.sort();
        for o in sorted {
            if u32::from(o.start()) <= next && next <= u32::from(o.end()) {
                next = u32::from(o.end()) + 1;
            }
        }
        next > u32::from(r.end())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_ports_and_ranges() {
        assert_eq!("5432".parse::<PortRange>().unwrap(), PortRange::single(5432).unwrap());
        let r: PortRange = "8000-8100".parse().unwrap();
        assert_eq!((r.start(), r.end(), r.len()), (8000, 8100, 101));
        assert!(r.contains(8050) && !r.contains(8101));
        assert_eq!(r.to_string(), "8000-8100");
    }

    #[test]
    fn rejects_malformed_ranges_with_a_reason() {
        for bad in ["", "0", "65536", "-1", "1-", "a", "10-5", " 80", "80 ", "1-2-3", "+80"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad:?} accepted");
        }
        assert!(matches!("10-5".parse::<PortRange>(), Err(PortRangeError::Reversed(_))));
        assert!(matches!("0".parse::<PortRange>(), Err(PortRangeError::OutOfRange(_))));
    }

    #[test]
    fn port_range_lists_must_be_non_empty_and_disjoint() {
        assert_eq!(parse_port_ranges(&["5432", "8000-8100"]).unwrap().len(), 2);
        assert_eq!(parse_port_ranges::<&str>(&[]), Err(PortRangesError::Empty));
        assert!(matches!(parse_port_ranges(&["80-90", "85"]), Err(PortRangesError::Overlap(..))));
        assert!(matches!(parse_port_ranges(&["80", "x"]), Err(PortRangesError::Range(_))));
        let many: Vec<String> = (1..=65).map(|p| p.to_string()).collect();
        assert!(matches!(parse_port_ranges(&many), Err(PortRangesError::TooMany(65))));
    }

    #[test]
    fn coverage_allows_adjacent_outer_ranges() {
        let outer = parse_port_ranges(&["8000-8050", "8051-8100", "5432"]).unwrap();
        assert!(ranges_cover(&outer, &parse_port_ranges(&["8040-8060", "5432"]).unwrap()));
        assert!(!ranges_cover(&outer, &parse_port_ranges(&["8090-8101"]).unwrap()));
        assert!(!ranges_cover(&outer, &parse_port_ranges(&["5433"]).unwrap()));
    }

    proptest::proptest! {
        #[test]
        fn valid_ranges_print_and_parse_back(a in 1u16.., b in 1u16..) {
            let r = PortRange::new(a.min(b), a.max(b)).unwrap();
            proptest::prop_assert_eq!(r.to_string().parse::<PortRange>().unwrap(), r);
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(s in ".{0,12}") {
            let _ = s.parse::<PortRange>();
        }
    }
}
