//! Time bounds of one HTTP connection of the control plane's listener.
//!
//! A connection is always in one phase, and every phase but one has a
//! deadline that each read and write of the connection obeys:
//!
//! | phase | from | deadline |
//! |---|---|---|
//! | idle | the last response was flushed (or the handshake finished) | `idle_timeout` later |
//! | reading | the first byte of a request | `request_read_timeout` later, for the headers and the whole body |
//! | handling | the whole request was read | none: handlers bound their own time (a config long-poll waits here) |
//! | responding | the handler answered | `response_write_timeout` later, until the response is flushed |
//!
//! Past the deadline, I/O fails with [`std::io::ErrorKind::TimedOut`]: a
//! handler reading the body sees a body error (answered 408), otherwise
//! hyper closes the connection. So a body dripped one byte at a time, a
//! client that sends nothing, and a client that never reads its answer each
//! hold a connection for a bounded time.
//!
//! This module only watches: it never buffers data.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::body::{Body, Bytes, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The deadlines of [`ConnClock`]'s phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub idle: Duration,
    pub request_read: Duration,
    pub response_write: Duration,
}

/// A phase that has a deadline, as reported when it expired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for the next request.
    Idle,
    /// Reading a request's headers and body.
    Reading,
    /// Writing a response.
    Responding,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle { since: Instant },
    Reading { since: Instant },
    Handling,
    Responding { since: Instant, body_done: bool },
}

/// The phase of one connection, shared by its I/O ([`TimedIo`]) and its
/// request and response bodies ([`RequestBody`], [`ResponseBody`]). Pure:
/// every transition takes `now`.
#[derive(Debug)]
pub struct ConnClock {
    timeouts: Timeouts,
    phase: Mutex<Phase>,
    expired: Mutex<Option<Stage>>,
}

impl ConnClock {
    /// A connection that just finished its handshake at `now`: idle.
    pub fn new(timeouts: Timeouts, now: Instant) -> Arc<Self> {
        Arc::new(Self { timeouts, phase: Mutex::new(Phase::Idle { since: now }), expired: Mutex::new(None) })
    }

    fn with_phase<R>(&self, f: impl FnOnce(&mut Phase) -> R) -> R {
        f(&mut self.phase.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// When the current phase ends, and which phase that is; `None` while handling.
    pub fn deadline(&self) -> Option<(Instant, Stage)> {
        self.with_phase(|phase| match *phase {
            Phase::Idle { since } => Some((since + self.timeouts.idle, Stage::Idle)),
            Phase::Reading { since } => Some((since + self.timeouts.request_read, Stage::Reading)),
            Phase::Handling => None,
            Phase::Responding { since, .. } => Some((since + self.timeouts.response_write, Stage::Responding)),
        })
    }

    /// Bytes of a request arrived: an idle connection starts reading one.
    pub fn bytes_arrived(&self, now: Instant) {
        self.with_phase(|phase| {
            if matches!(phase, Phase::Idle { .. }) {
                *phase = Phase::Reading { since: now };
            }
        });
    }

    /// A request's headers were parsed (perhaps from bytes that arrived
    /// while the previous request was handled): it is being read from now
    /// on unless it already was.
    pub fn request_started(&self, now: Instant) {
        self.with_phase(|phase| {
            if !matches!(phase, Phase::Reading { .. }) {
                *phase = Phase::Reading { since: now };
            }
        });
    }

    /// The whole request was read: the handler's time is not bounded here.
    pub fn request_read(&self) {
        self.with_phase(|phase| {
            if matches!(phase, Phase::Reading { .. }) {
                *phase = Phase::Handling;
            }
        });
    }

    /// The handler answered at `now`; the response is being written.
    pub fn responding(&self, now: Instant) {
        self.with_phase(|phase| *phase = Phase::Responding { since: now, body_done: false });
    }

    /// The whole response body was handed to the connection.
    pub fn response_body_done(&self) {
        self.with_phase(|phase| {
            if let Phase::Responding { body_done, .. } = phase {
                *body_done = true;
            }
        });
    }

    /// The connection flushed at `now`: after a whole response, it is idle.
    pub fn flushed(&self, now: Instant) {
        self.with_phase(|phase| {
            if matches!(phase, Phase::Responding { body_done: true, .. }) {
                *phase = Phase::Idle { since: now };
            }
        });
    }

    /// The phase whose deadline cut the connection off, if one did.
    pub fn expired(&self) -> Option<Stage> {
        *self.expired.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn expire(&self, stage: Stage) -> io::Error {
        *self.expired.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(stage);
        let message = match stage {
            Stage::Idle => format!("the connection was idle for {}", humantime::format_duration(self.timeouts.idle)),
            Stage::Reading => format!(
                "the request did not arrive within {} of its first byte; send the headers and the whole body at once",
                humantime::format_duration(self.timeouts.request_read)
            ),
            Stage::Responding => {
                format!("the response was not read within {}", humantime::format_duration(self.timeouts.response_write))
            }
        };
        io::Error::new(io::ErrorKind::TimedOut, message)
    }
}

/// A connection's I/O held to its [`ConnClock`]'s deadlines. Sits above TLS,
/// so it sees the HTTP bytes.
#[derive(Debug)]
pub struct TimedIo<T> {
    inner: T,
    clock: Arc<ConnClock>,
    timer: Pin<Box<Sleep>>,
    armed: Option<Instant>,
}

impl<T> TimedIo<T> {
    pub fn new(inner: T, clock: Arc<ConnClock>) -> Self {
        Self { inner, clock, timer: Box::pin(tokio::time::sleep(Duration::ZERO)), armed: None }
    }

    /// Fails once the current phase's deadline passed; otherwise makes sure
    /// this task wakes at that deadline, so a client that sends or reads
    /// nothing at all is cut off too.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some((deadline, stage)) = self.clock.deadline() else {
            return Ok(());
        };
        if self.armed != Some(deadline) {
            self.timer.as_mut().reset(deadline);
            self.armed = Some(deadline);
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Err(self.clock.expire(stage)),
            Poll::Pending => Ok(()),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            self.clock.bytes_arrived(Instant::now());
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.clock.flushed(Instant::now());
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A request body that tells the clock when it was read to the end.
#[derive(Debug)]
pub struct RequestBody<B> {
    inner: B,
    clock: Arc<ConnClock>,
}

impl<B: Body> RequestBody<B> {
    /// Wraps the body of a request whose headers were just parsed.
    pub fn new(inner: B, clock: Arc<ConnClock>) -> Self {
        clock.request_started(Instant::now());
        if inner.is_end_stream() {
            clock.request_read();
        }
        Self { inner, clock }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for RequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if frame.is_none() || self.inner.is_end_stream() {
            self.clock.request_read();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that tells the clock when it was handed over whole.
#[derive(Debug)]
pub struct ResponseBody<B> {
    inner: B,
    clock: Arc<ConnClock>,
}

impl<B> ResponseBody<B> {
    /// Wraps the body of a response the handler just returned.
    pub fn new(inner: B, clock: Arc<ConnClock>) -> Self {
        clock.responding(Instant::now());
        Self { inner, clock }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for ResponseBody<B> {
    fn drop(&mut self) {
        self.clock.response_body_done();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const TIMEOUTS: Timeouts = Timeouts {
        idle: Duration::from_secs(60),
        request_read: Duration::from_secs(30),
        response_write: Duration::from_secs(20),
    };

    #[test]
    fn each_phase_has_its_deadline_and_handling_has_none() {
        let t0 = Instant::now();
        let clock = ConnClock::new(TIMEOUTS, t0);
        assert_eq!(clock.deadline(), Some((t0 + TIMEOUTS.idle, Stage::Idle)));
        let t1 = t0 + Duration::from_secs(5);
        clock.bytes_arrived(t1);
        clock.bytes_arrived(t1 + Duration::from_secs(1));
        assert_eq!(clock.deadline(), Some((t1 + TIMEOUTS.request_read, Stage::Reading)), "from the first byte");
        clock.request_started(t1 + Duration::from_secs(2));
        assert_eq!(clock.deadline(), Some((t1 + TIMEOUTS.request_read, Stage::Reading)), "headers do not reset it");
        clock.request_read();
        assert_eq!(clock.deadline(), None);
        clock.bytes_arrived(t1 + Duration::from_secs(3));
        assert_eq!(clock.deadline(), None, "bytes during handling (a pipelined request) start nothing");
        let t2 = t1 + Duration::from_secs(90);
        clock.responding(t2);
        clock.flushed(t2);
        assert_eq!(clock.deadline(), Some((t2 + TIMEOUTS.response_write, Stage::Responding)), "body not done yet");
        clock.response_body_done();
        let t3 = t2 + Duration::from_secs(1);
        clock.flushed(t3);
        assert_eq!(clock.deadline(), Some((t3 + TIMEOUTS.idle, Stage::Idle)));
        // A pipelined request whose headers were already buffered starts when they are parsed.
        let t4 = t3 + Duration::from_secs(1);
        clock.request_started(t4);
        assert_eq!(clock.deadline(), Some((t4 + TIMEOUTS.request_read, Stage::Reading)));
    }

    /// Short deadlines for tests on the real clock.
    const SHORT: Timeouts = Timeouts {
        idle: Duration::from_millis(300),
        request_read: Duration::from_millis(400),
        response_write: Duration::from_millis(300),
    };

    /// `elapsed` is `expected`, give or take the scheduling of a busy machine.
    fn about(elapsed: Duration, expected: Duration) -> bool {
        elapsed >= expected && elapsed < expected + Duration::from_secs(2)
    }

    #[tokio::test]
    async fn a_dripped_request_is_cut_off_at_the_deadline_from_its_first_byte() {
        let (client, server) = tokio::io::duplex(1024);
        let clock = ConnClock::new(SHORT, Instant::now());
        let mut server = TimedIo::new(server, clock.clone());
        let drip = tokio::spawn(async move {
            let mut client = client;
            while client.write_all(b"x").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            client
        });
        let mut buf = [0u8; 16];
        server.read_exact(&mut buf[..1]).await.unwrap();
        let first_byte = Instant::now();
        let err = loop {
            if let Err(e) = server.read(&mut buf).await {
                break e;
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("400ms of its first byte"), "{err}");
        assert!(
            about(first_byte.elapsed(), SHORT.request_read - Duration::from_millis(10)),
            "{:?}",
            first_byte.elapsed()
        );
        assert_eq!(clock.expired(), Some(Stage::Reading));
        drip.abort();
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_after_the_idle_timeout() {
        let (_client, server) = tokio::io::duplex(1024);
        let start = Instant::now();
        let mut server = TimedIo::new(server, ConnClock::new(SHORT, start));
        let err = server.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(about(start.elapsed(), SHORT.idle), "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn a_handler_may_take_longer_than_any_deadline() {
        let (mut client, server) = tokio::io::duplex(1024);
        let clock = ConnClock::new(SHORT, Instant::now());
        let mut server = TimedIo::new(server, clock.clone());
        client.write_all(b"GET").await.unwrap();
        server.read_exact(&mut [0u8; 3]).await.unwrap();
        clock.request_read();
        // The client closes after every deadline passed; the read waits for it instead of timing out.
        let close = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            drop(client);
        });
        assert_eq!(server.read(&mut [0u8; 3]).await.unwrap(), 0);
        close.await.unwrap();
    }

    #[tokio::test]
    async fn a_response_nobody_reads_is_cut_off() {
        let (_client, server) = tokio::io::duplex(64);
        let clock = ConnClock::new(SHORT, Instant::now());
        let mut server = TimedIo::new(server, clock.clone());
        clock.request_started(Instant::now());
        clock.request_read();
        let start = Instant::now();
        clock.responding(start);
        let err = server.write_all(&[0u8; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(about(start.elapsed(), SHORT.response_write), "{:?}", start.elapsed());
        assert_eq!(clock.expired(), Some(Stage::Responding));
    }
}
