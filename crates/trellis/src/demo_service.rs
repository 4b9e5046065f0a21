//! The built-in service `trellis dev` shares when no `--share` is given: a TCP
//! server that answers every line with a greeting and the line, so `nc` shows
//! the whole path working; a connection that starts with an HTTP/1 request
//! line gets one HTTP answer with the same greeting instead, so `curl` works
//! too (not every machine has `nc`). It binds loopback only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Prefix of every answer.
pub const GREETING: &str = "hello from the trellis demo service, you said: ";
/// Longest line answered; a longer one closes the connection.
const MAX_LINE: u64 = 64 * 1024;
/// Connections served at once; more wait for a slot.
const MAX_CONNECTIONS: usize = 256;
/// A connection with no line for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The running demo service. Dropping it does not stop it; call [`DemoService::stop`].
pub struct DemoService {
    addr: SocketAddr,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl DemoService {
    /// Binds `addr` (use port 0) and starts answering.
    pub async fn start(addr: SocketAddr) -> std::io::Result<Self> {
        Self::start_greeting(addr, GREETING.into()).await
    }

    /// Like [`DemoService::start`], with `name` in its greeting (so a client
    /// of a load-balanced service sees which target answered).
    pub async fn start_named(addr: SocketAddr, name: &str) -> std::io::Result<Self> {
        Self::start_greeting(addr, greeting_of(name).into()).await
    }

    async fn start_greeting(addr: SocketAddr, greeting: Arc<str>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(accept_loop(listener, greeting, cancel.clone(), tasks.clone()));
        Ok(Self { addr, cancel, tasks })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes open connections and waits for their tasks.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// The greeting of a named demo service.
pub fn greeting_of(name: &str) -> String {
    format!("hello from the trellis demo service ({name}), you said: ")
}

async fn accept_loop(listener: TcpListener, greeting: Arc<str>, cancel: CancellationToken, tasks: TaskTracker) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            () = cancel.cancelled() => return,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return, // the semaphore is never closed
            },
        };
        let stream = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::debug!("demo service: accept failed: {e}");
                    continue;
                }
            },
        };
        let (cancel, greeting) = (cancel.clone(), greeting.clone());
        tasks.spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                result = serve(stream, &greeting) => if let Err(e) = result {
                    tracing::debug!("demo service: connection ended: {e}");
                },
            }
            drop(permit);
        });
    }
}

/// Whether `line` is an HTTP/1 request line (`GET / HTTP/1.1`).
fn is_http_request_line(line: &str) -> bool {
    let mut parts = line.trim_end_matches(['\r', '\n']).split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !method.is_empty()
        && method.bytes().all(|b| b.is_ascii_uppercase())
        && target.starts_with('/')
        && (version == "HTTP/1.1" || version == "HTTP/1.0")
}

/// Answers an HTTP request whose request line was `request_line`: skips its
/// header lines, sends one 200 answer with the greeting, and closes.
async fn answer_http(
    lines: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    request_line: &str,
    greeting: &str,
) -> std::io::Result<()> {
    let mut header = Vec::new();
    for _ in 0..100 {
        header.clear();
        let mut limited = (&mut *lines).take(MAX_LINE);
        match tokio::time::timeout(IDLE_TIMEOUT, limited.read_until(b'\n', &mut header)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(_)) if header == b"\r\n" || header == b"\n" => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
    let words: Vec<&str> = request_line.split(' ').take(2).collect();
    let body = format!("{greeting}{}\n", words.join(" "));
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    write.write_all(head.as_bytes()).await?;
    write.write_all(body.as_bytes()).await?;
    write.shutdown().await
}

async fn serve(stream: TcpStream, greeting: &str) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = Vec::new();
    let mut first = true;
    loop {
        line.clear();
        let mut limited = (&mut lines).take(MAX_LINE);
        let n = match tokio::time::timeout(IDLE_TIMEOUT, limited.read_until(b'\n', &mut line)).await {
            Ok(n) => n?,
            Err(_) => break, // idle
        };
        if n == 0 {
            break; // the client closed its side
        }
        if !line.ends_with(b"\n") && n as u64 >= MAX_LINE {
            write.write_all(b"line too long\n").await?;
            break;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        if std::mem::take(&mut first) && is_http_request_line(text) {
            let request_line = text.to_string();
            return answer_http(&mut lines, &mut write, &request_line, greeting).await;
        }
        write.write_all(format!("{greeting}{text}\n").as_bytes()).await?;
    }
    write.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_each_line_and_closes_when_the_client_does() {
        let demo = DemoService::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let mut conn = TcpStream::connect(demo.local_addr()).await.unwrap();
        conn.write_all(b"hi\nthere\r\n").await.unwrap();
        conn.shutdown().await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut answer)).await.unwrap().unwrap();
        assert_eq!(answer, format!("{GREETING}hi\n{GREETING}there\n"));
        demo.stop().await;
    }

    #[tokio::test]
    async fn an_http_request_gets_one_http_answer() {
        let demo = DemoService::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let mut conn = TcpStream::connect(demo.local_addr()).await.unwrap();
        // As curl sends it, without closing its side: the service closes after answering.
        conn.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut answer)).await.unwrap().unwrap();
        let body = format!("{GREETING}GET /hello\n");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains(&format!("content-length: {}\r\n", body.len())), "{answer}");
        assert!(answer.ends_with(&format!("\r\n\r\n{body}")), "{answer}");
        assert!(is_http_request_line("HEAD / HTTP/1.0\r\n"));
        assert!(!is_http_request_line("hi there HTTP/1.1 x"));
        assert!(!is_http_request_line("get / HTTP/1.1"));
        demo.stop().await;
    }

    #[tokio::test]
    async fn stop_closes_open_connections() {
        let demo = DemoService::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let mut conn = TcpStream::connect(demo.local_addr()).await.unwrap();
        conn.write_all(b"x\n").await.unwrap();
        let mut buf = vec![0u8; GREETING.len() + 2];
        conn.read_exact(&mut buf).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), demo.stop()).await.unwrap();
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest)).await.unwrap();
        assert!(n.is_err() || rest.is_empty(), "the connection is closed after stop");
    }
}
