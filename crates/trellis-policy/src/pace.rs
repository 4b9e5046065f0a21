//! Pacing a consumer's bytes to a bandwidth limit: a token bucket in bytes,
//! shared by every flow of that consumer, with `now` passed in.

use std::time::{Duration, Instant};

/// A token bucket of bytes: `rate` bytes a second, at most `burst` banked.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A bucket for `bits_per_second`, full; the burst is a tenth of a second of it (at least 64 KiB).
    pub fn for_bits_per_second(bits_per_second: u64, now: Instant) -> Self {
        let rate = (bits_per_second as f64 / 8.0).max(1.0);
        let burst = (rate / 10.0).max(64.0 * 1024.0);
        Self { rate, burst, tokens: burst, at: now }
    }

    /// Bytes a second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Takes `bytes` (which may overdraw the bucket) and returns how long the
    /// sender must wait before sending more, so that over time the rate holds.
    pub fn take(&mut self, bytes: usize, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now.max(self.at);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - bytes as f64;
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / self.rate) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_that_waits_as_told_moves_the_rate() {
        // 8 Mbit/s = 1 MB/s; a simulated sender of 16 KiB writes over 10 simulated seconds.
        let t0 = Instant::now();
        let mut bucket = TokenBucket::for_bits_per_second(8_000_000, t0);
        let (mut now, mut sent) = (t0, 0usize);
        while now < t0 + Duration::from_secs(10) {
            sent += 16 * 1024;
            now += bucket.take(16 * 1024, now);
        }
        let rate = sent as f64 / now.duration_since(t0).as_secs_f64();
        assert!((rate - 1_000_000.0).abs() / 1_000_000.0 < 0.03, "rate {rate}");
    }

    #[test]
    fn an_idle_sender_banks_at_most_the_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::for_bits_per_second(8_000_000, t0);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(bucket.take(100_000, later), Duration::ZERO);
        assert!(bucket.take(200_000, later) > Duration::from_millis(150), "no minute of credit");
    }
}
