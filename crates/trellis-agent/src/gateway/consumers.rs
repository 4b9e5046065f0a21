//! Per-consumer limits of a resource or endpoint service, enforced by each
//! gateway agent: at most `maxConnections` open connections of one consumer
//! account (the next one is refused, another consumer still connects), and
//! its bytes paced to `maxBitsPerSecond` in each direction, shared by all its
//! connections on this agent. The limits count per gateway agent: a
//! consumer reaching a resource through two gateway agents may use each's.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use trellis_policy::pace::TokenBucket;
use trellis_proto::ConsumerLimits;

use crate::metrics::Metrics;

/// Token buckets of one consumer: bytes toward the target and bytes back.
#[derive(Debug)]
pub struct Pace {
    to_target: Mutex<TokenBucket>,
    from_target: Mutex<TokenBucket>,
}

impl Pace {
    fn new(bits_per_second: u64) -> Self {
        let now = Instant::now();
        Self {
            to_target: Mutex::new(TokenBucket::for_bits_per_second(bits_per_second, now)),
            from_target: Mutex::new(TokenBucket::for_bits_per_second(bits_per_second, now)),
        }
    }
}

#[derive(Debug)]
struct Entry {
    active: u32,
    pace: Option<Arc<Pace>>,
    /// The bandwidth `pace` was made for (a config change makes a new one).
    bits_per_second: Option<u64>,
}

/// Open connections and pacing of every (resource or service, consumer) with limits.
#[derive(Debug, Default)]
pub struct ConsumerLimiter {
    entries: Mutex<HashMap<(String, String), Entry>>,
}

/// A connection counted against its consumer's limit until dropped.
#[derive(Debug)]
pub struct ConsumerSlot {
    limiter: Arc<ConsumerLimiter>,
    key: (String, String),
    pub pace: Option<Arc<Pace>>,
}

impl Drop for ConsumerSlot {
    fn drop(&mut self) {
        let mut entries = self.limiter.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = entries.get_mut(&self.key) {
            entry.active = entry.active.saturating_sub(1);
            if entry.active == 0 {
                entries.remove(&self.key);
            }
        }
    }
}

/// A consumer already holds as many connections as its limit allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "consumer account {consumer} already has {max} connections open to {target} through this gateway, the most its provider allows"
)]
pub struct TooManyConnections {
    pub consumer: String,
    pub target: String,
    pub max: u32,
}

impl ConsumerLimiter {
    /// Counts a new connection of `consumer` to `target` (a resource or service id) under `limits`.
    pub fn enter(
        self: &Arc<Self>,
        target: &str,
        consumer: &str,
        limits: &ConsumerLimits,
    ) -> Result<ConsumerSlot, TooManyConnections> {
        let key = (target.to_string(), consumer.to_string());
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.entry(key.clone()).or_insert(Entry { active: 0, pace: None, bits_per_second: None });
        if let Some(max) = limits.max_connections
            && entry.active >= max
        {
            return Err(TooManyConnections { consumer: consumer.to_string(), target: target.to_string(), max });
        }
        if entry.bits_per_second != limits.max_bits_per_second {
            entry.bits_per_second = limits.max_bits_per_second;
            entry.pace = limits.max_bits_per_second.map(|b| Arc::new(Pace::new(b)));
        }
        entry.active += 1;
        let pace = entry.pace.clone();
        Ok(ConsumerSlot { limiter: self.clone(), key, pace })
    }

    /// Open connections of `consumer` to `target` (for tests).
    pub fn active(&self, target: &str, consumer: &str) -> u32 {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.get(&(target.to_string(), consumer.to_string())).map_or(0, |e| e.active)
    }
}

/// A stream whose reads and writes are paced by a consumer's buckets: after
/// moving n bytes it waits as long as the bucket says before moving more.
pub struct Paced<S> {
    inner: S,
    pace: Arc<Pace>,
    read_wait: Option<Pin<Box<tokio::time::Sleep>>>,
    write_wait: Option<Pin<Box<tokio::time::Sleep>>>,
    metrics: Arc<Metrics>,
    labels: (String, String),
}

impl<S> Paced<S> {
    pub fn new(inner: S, pace: Arc<Pace>, metrics: Arc<Metrics>, target: &str, consumer: &str) -> Self {
        Self {
            inner,
            pace,
            read_wait: None,
            write_wait: None,
            metrics,
            labels: (target.to_string(), consumer.to_string()),
        }
    }
}

/// Waits out `wait` if one is pending.
fn poll_wait(wait: &mut Option<Pin<Box<tokio::time::Sleep>>>, cx: &mut Context<'_>) -> Poll<()> {
    if let Some(sleep) = wait {
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        *wait = None;
    }
    Poll::Ready(())
}

fn charge(bucket: &Mutex<TokenBucket>, n: usize) -> Option<Pin<Box<tokio::time::Sleep>>> {
    let wait = bucket.lock().unwrap_or_else(PoisonError::into_inner).take(n, Instant::now());
    (wait > Duration::ZERO).then(|| Box::pin(tokio::time::sleep(wait)))
}

impl<S: AsyncRead + Unpin> AsyncRead for Paced<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if poll_wait(&mut this.read_wait, cx).is_pending() {
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read_wait = charge(&this.pace.from_target, n);
            if this.read_wait.is_some() {
                this.metrics.count_limited(&this.labels.0, &this.labels.1, "bandwidth");
            }
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Paced<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if poll_wait(&mut this.write_wait, cx).is_pending() {
            return Poll::Pending;
        }
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result
            && *n > 0
        {
            this.write_wait = charge(&this.pace.to_target, *n);
            if this.write_wait.is_some() {
                this.metrics.count_limited(&this.labels.0, &this.labels.1, "bandwidth");
            }
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_connection_over_the_limit_is_refused_and_others_are_not() {
        let limiter = Arc::new(ConsumerLimiter::default());
        let limits = ConsumerLimits { max_connections: Some(2), max_bits_per_second: None };
        let a = limiter.enter("svc", "acct-a", &limits).unwrap();
        let _b = limiter.enter("svc", "acct-a", &limits).unwrap();
        let err = limiter.enter("svc", "acct-a", &limits).unwrap_err();
        assert_eq!(err.max, 2);
        limiter.enter("svc", "acct-b", &limits).expect("another consumer still connects");
        drop(a);
        limiter.enter("svc", "acct-a", &limits).expect("a closed connection frees its place");
    }

    #[tokio::test]
    async fn paced_writes_hold_the_rate() {
        // 4 Mbit/s = 500 kB/s: 1.5 MB takes about 3 s, less the 64 KiB burst.
        let pace = Arc::new(Pace::new(4_000_000));
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut paced = Paced::new(client, pace, Arc::new(Metrics::new()), "svc", "acct-a");
        let reader = tokio::spawn(async move {
            let mut n = 0usize;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match server.read(&mut buf).await.unwrap() {
                    0 => return n,
                    k => n += k,
                }
            }
        });
        let started = std::time::Instant::now();
        let chunk = vec![7u8; 16 * 1024];
        for _ in 0..(1_500_000 / chunk.len()) {
            paced.write_all(&chunk).await.unwrap();
        }
        paced.shutdown().await.unwrap();
        let moved = reader.await.unwrap();
        let rate = moved as f64 / started.elapsed().as_secs_f64();
        assert!((rate - 500_000.0).abs() / 500_000.0 < 0.15, "{rate:.0} B/s for a 500 kB/s limit");
    }
}
