//! The one client used on every path: request/response latency on one
//! connection, new-connection rate with connect-plus-first-byte latency, and
//! many idle connections held open while the tunnel processes are weighed.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::Res;
use crate::echo::GREETING;
use crate::proc;

/// Connects, waits for the server's greeting byte and returns the stream and the time it took.
pub fn first_byte(addr: SocketAddr, timeout: Duration) -> io::Result<(TcpStream, Duration)> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout.saturating_sub(start.elapsed()).max(Duration::from_millis(1))))?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)?;
    let took = start.elapsed();
    if byte[0] != GREETING {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected first byte {:#04x}", byte[0])));
    }
    Ok((stream, took))
}

/// Percentile `q` (0..=1) of sorted samples, nearest-rank.
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub struct RrResult {
    pub p50_us: f64,
    pub p99_us: f64,
}

/// One connection, 1-byte request and 1-byte answer, back to back for `duration` after a warm-up.
pub fn request_response(addr: SocketAddr, duration: Duration) -> Res<RrResult> {
    let (mut stream, _) = first_byte(addr, Duration::from_secs(10)).map_err(|e| format!("connect to {addr}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let mut byte = [0u8; 1];
    let mut exchange = |stream: &mut TcpStream| -> io::Result<()> {
        stream.write_all(b"x")?;
        stream.read_exact(&mut byte)
    };
    for _ in 0..200 {
        exchange(&mut stream).map_err(|e| format!("warm-up exchange with {addr}: {e}"))?;
    }
    let mut samples = Vec::with_capacity(1 << 16);
    let end = Instant::now() + duration;
    while Instant::now() < end && samples.len() < 5_000_000 {
        let t = Instant::now();
        exchange(&mut stream).map_err(|e| format!("exchange {} with {addr}: {e}", samples.len() + 1))?;
        samples.push(t.elapsed());
    }
    samples.sort_unstable();
    Ok(RrResult { p50_us: micros(percentile(&samples, 0.50)), p99_us: micros(percentile(&samples, 0.99)) })
}

pub struct ConnRateResult {
    pub per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub connections: usize,
    pub errors: usize,
    pub first_error: Option<String>,
}

/// `workers` threads each connect, wait for the greeting and close, over and over, for `duration`.
///
/// Connections leave from the `sources` addresses in turn: the client closes first, so each
/// connection leaves a TIME_WAIT entry behind, and one source address alone would run out of
/// ephemeral ports (about 28,000) within two seconds on the direct path.
pub fn connection_rate(
    addr: SocketAddr,
    duration: Duration,
    workers: usize,
    sources: &[IpAddr],
) -> Res<ConnRateResult> {
    let stop = Arc::new(AtomicBool::new(false));
    let sources: Arc<Vec<IpAddr>> =
        Arc::new(if sources.is_empty() { vec![IpAddr::from([127, 0, 0, 1])] } else { sources.to_vec() });
    let start = Instant::now();
    let handles: Vec<_> = (0..workers.max(1))
        .map(|worker| {
            let (stop, sources) = (stop.clone(), sources.clone());
            thread::spawn(move || -> Res<(Vec<Duration>, usize, Option<String>)> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("runtime: {e}"))?;
                rt.block_on(async move {
                    let mut samples = Vec::new();
                    let mut errors = 0usize;
                    let mut first_error = None;
                    let mut next = worker;
                    while !stop.load(Ordering::Relaxed) {
                        let source = sources[next % sources.len()];
                        next += workers.max(1);
                        match connect_first_byte(source, addr).await {
                            Ok(took) => samples.push(took),
                            Err(e) => {
                                errors += 1;
                                first_error.get_or_insert_with(|| e.to_string());
                                // Do not spin on a path that refuses everything.
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                    Ok((samples, errors, first_error))
                })
            })
        })
        .collect();
    thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for h in handles {
        let (s, e, f) = h.join().map_err(|_| "a connection-rate worker panicked".to_string())??;
        samples.extend(s);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let elapsed = start.elapsed();
    samples.sort_unstable();
    if samples.is_empty() {
        return Err(format!("no connection to {addr} succeeded: {}", first_error.unwrap_or_default()));
    }
    Ok(ConnRateResult {
        per_second: samples.len() as f64 / elapsed.as_secs_f64(),
        p50_us: micros(percentile(&samples, 0.50)),
        p99_us: micros(percentile(&samples, 0.99)),
        connections: samples.len(),
        errors,
        first_error,
    })
}

/// One connection from `source` (any port): connect, read the greeting, close. Returns the time to the greeting.
async fn connect_first_byte(source: IpAddr, addr: SocketAddr) -> io::Result<Duration> {
    let start = Instant::now();
    let socket = if source.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // Ports of this source still in TIME_WAIT may be bound again.
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(source, 0))?;
    let attempt = async {
        let mut stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        if byte[0] != GREETING {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected first byte {:#04x}", byte[0])));
        }
        io::Result::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no greeting within 5 s")),
    }
}

pub struct IdleResult {
    pub connections: usize,
    pub rss_before: u64,
    pub rss_at_n: u64,
}

impl IdleResult {
    /// Growth of the tunnel processes' RSS per 1,000 open connections, in MiB.
    pub fn mib_per_1000(&self) -> f64 {
        let grown = self.rss_at_n.saturating_sub(self.rss_before) as f64;
        grown / self.connections as f64 * 1000.0 / (1024.0 * 1024.0)
    }
}

fn sum_rss(pids: &[u32]) -> Res<u64> {
    pids.iter().map(|p| proc::rss_bytes(*p).ok_or_else(|| format!("process {p} is gone"))).sum()
}

fn sum_fds(pids: &[u32]) -> usize {
    pids.iter().filter_map(|p| proc::open_fds(*p)).sum()
}

/// Opens `n` connections (each waits for its greeting, so it is proxied end to end), lets the
/// tunnel processes settle, reads their RSS, closes everything and waits until they have let go.
pub fn idle_connections(addr: SocketAddr, n: usize, pids: &[u32]) -> Res<IdleResult> {
    let rss_before = sum_rss(pids)?;
    let fds_before = sum_fds(pids);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("runtime: {e}"))?;
    let opened = rt.block_on(open_many(addr, n));
    let result = match opened {
        Ok(streams) => {
            // Settle: wait until two readings 250 ms apart differ by less than 1% (at most 5 s).
            let mut last = sum_rss(pids)?;
            let settle_end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < settle_end {
                thread::sleep(Duration::from_millis(250));
                let now = sum_rss(pids)?;
                let stable = now.abs_diff(last) * 100 < last.max(1);
                last = now;
                if stable {
                    break;
                }
            }
            let result = IdleResult { connections: streams.len(), rss_before, rss_at_n: last };
            rt.block_on(async move { drop(streams) });
            Ok(result)
        }
        Err(e) => Err(e),
    };
    drop(rt);
    // The tunnels close their side asynchronously; the next measurement starts once they have.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pids.is_empty() && sum_fds(pids) > fds_before + 64 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    result
}

async fn open_many(addr: SocketAddr, n: usize) -> Res<Vec<tokio::net::TcpStream>> {
    let permits = Arc::new(Semaphore::new(64));
    let mut set = JoinSet::new();
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        let permit = permits.clone().acquire_owned().await.map_err(|e| e.to_string())?;
        set.spawn(async move {
            let _permit = permit;
            let attempt = async {
                let mut stream = tokio::net::TcpStream::connect(addr).await?;
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).await?;
                io::Result::Ok(stream)
            };
            match tokio::time::timeout(Duration::from_secs(20), attempt).await {
                Ok(Ok(stream)) => Ok(stream),
                Ok(Err(e)) => Err(format!("connection {} of {n} to {addr}: {e}", i + 1)),
                Err(_) => Err(format!("connection {} of {n} to {addr}: no greeting within 20 s", i + 1)),
            }
        });
        // Fail fast: stop opening once one has failed.
        while let Some(done) = set.try_join_next() {
            streams.push(done.map_err(|e| e.to_string())??);
        }
    }
    while let Some(done) = set.join_next().await {
        streams.push(done.map_err(|e| e.to_string())??);
    }
    Ok(streams)
}

/// One connection of a [`ShortConnections`] stream: when it started (since the stream began)
/// and, if it failed, why.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub at: Duration,
    pub error: Option<String>,
}

/// A steady stream of short connections, each: connect, the greeting, one byte echoed, close.
/// Runs in its own threads while the caller does something to the path.
pub struct ShortConnections {
    started: Instant,
    stop: Arc<AtomicBool>,
    workers: Vec<thread::JoinHandle<Vec<Attempt>>>,
}

impl ShortConnections {
    /// Starts `per_second` connections a second to `addr`, spread over `workers` threads
    /// (a worker whose connection hangs falls behind; the others keep their pace).
    pub fn start(addr: SocketAddr, per_second: f64, workers: usize) -> ShortConnections {
        let workers = workers.max(1);
        let gap = Duration::from_secs_f64(workers as f64 / per_second.max(1.0));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let handles = (0..workers)
            .map(|w| {
                let stop = stop.clone();
                let first = started + gap.mul_f64(w as f64 / workers as f64);
                thread::spawn(move || {
                    let mut attempts = Vec::new();
                    let mut next = first;
                    while !stop.load(Ordering::Relaxed) {
                        let now = Instant::now();
                        if next > now {
                            thread::sleep(next - now);
                        }
                        next += gap;
                        let at = Instant::now() - started;
                        attempts.push(Attempt { at, error: short_exchange(addr).err().map(|e| e.to_string()) });
                    }
                    attempts
                })
            })
            .collect();
        ShortConnections { started, stop, workers: handles }
    }

    /// When the stream began: [`Attempt::at`] counts from here.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Stops the stream and returns every attempt, in the order they started.
    pub fn finish(self) -> Res<Vec<Attempt>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for h in self.workers {
            all.extend(h.join().map_err(|_| "a short-connection worker panicked".to_string())?);
        }
        all.sort_by_key(|a| a.at);
        Ok(all)
    }
}

/// Connect, read the greeting, send one byte and read it back, close.
fn short_exchange(addr: SocketAddr) -> io::Result<()> {
    let (mut stream, _) = first_byte(addr, Duration::from_secs(2))?;
    stream.write_all(b"f")?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)?;
    if byte[0] != b'f' {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("echoed {:#04x} for 0x66", byte[0])));
    }
    Ok(())
}
