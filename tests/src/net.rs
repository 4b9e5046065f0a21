//! Small network and host helpers: free ports, unique names, privileges.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A port that was free on `ip` a moment ago: bind port 0, read it, release it.
/// Only for programs that cannot report the port they bound themselves.
pub fn free_port(ip: IpAddr) -> u16 {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).unwrap_or_else(|e| panic!("bind {ip}:0: {e}"));
    listener.local_addr().expect("local address of a bound listener").port()
}

/// A short random-enough lowercase hex string (time, pid and a counter mixed),
/// for names that must not collide between parallel tests and runs.
pub fn unique_suffix(len: usize) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let mut x = nanos ^ (u64::from(std::process::id()) << 32) ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(17);
    // splitmix64 finaliser, so consecutive inputs give unrelated outputs
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^= x >> 31;
    let hex = format!("{x:016x}");
    hex[..len.min(16)].to_string()
}

/// A random byte from the same source as [`unique_suffix`].
pub fn random_byte() -> u8 {
    u8::from_str_radix(&unique_suffix(2), 16).expect("two hex digits")
}

/// A `/24` inside 127.0.0.0/8 that no other test of this run is likely to use,
/// for an endpoint address pool on loopback (Linux answers all of 127/8).
pub fn loopback_pool() -> (String, Ipv4Addr) {
    let b = 16 + random_byte() % 224;
    let c = random_byte();
    (format!("127.{b}.{c}.0/24"), Ipv4Addr::new(127, b, c, 0))
}

/// True when the process runs with effective uid 0 (read from /proc, no libc).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Connects to `addr`, optionally sends `send`, half-closes, and reads the
/// answer until the peer closes or `timeout` passes.
pub fn tcp_exchange(addr: SocketAddr, send: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    if !send.is_empty() {
        stream.write_all(send)?;
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    stream.read_to_end(&mut out)?;
    Ok(out)
}
