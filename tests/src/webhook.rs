//! A webhook receiver on 127.0.0.1 for connection-notification suites: it
//! records every POST (path, headers, body) and answers the statuses it was
//! given, in order, then 204. Plain HTTP/1.1 on std threads; one request per
//! connection (it answers `Connection: close`). Stops when dropped.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::wait::wait_until;

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub path: String,
    /// Header names in lower case.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Delivery {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(&name.to_ascii_lowercase()).map_or("", String::as_str)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

pub struct WebhookReceiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Delivery>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WebhookReceiver {
    /// Answers `statuses[0]` to the first request, `statuses[1]` to the second, …, then 204.
    pub fn start(statuses: &[u16]) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the webhook receiver");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let got: Arc<Mutex<Vec<Delivery>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s, script) = (got.clone(), stop.clone(), statuses.to_vec());
        let thread = std::thread::spawn(move || {
            let mut script = script.into_iter();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if let Some(delivery) = read_request(&stream) {
                            let status = script.next().unwrap_or(204);
                            g.lock().unwrap().push(delivery);
                            let _ = answer(&stream, status);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self { addr, got, stop, thread: Some(thread) }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request so far.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `n` requests arrived and returns them.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Delivery> {
        wait_until(&format!("{n} webhook requests"), timeout, || {
            let got = self.deliveries();
            (got.len() >= n).then_some(got)
        })
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_request(stream: &TcpStream) -> Option<Delivery> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_string();
    let mut headers = HashMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Delivery { path, headers, body })
}

fn answer(mut stream: &TcpStream, status: u16) -> std::io::Result<()> {
    write!(stream, "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    stream.flush()
}
