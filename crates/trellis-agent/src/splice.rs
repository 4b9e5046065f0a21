//! Copies bytes both ways between two streams, preserving TCP half-close: when
//! one side finishes sending, the other side's write half is shut down and the
//! opposite direction keeps flowing until it finishes too.
//!
//! The agents' proxied connections use [`splice_attached`], which hands a
//! tunnel flow's local socket to the tunnel's driver (see `crate::mux`);
//! [`splice`] copies between any two streams (a rate-limited target, the
//! relay's two sides).
//!
//! Memory is the point of this design: an idle proxied connection owns no
//! copy buffer at all. One future polls both directions on the two streams
//! (no `split`, no lock). A direction reads into a 64 KiB scratch buffer that
//! belongs to the worker thread, borrowed only inside one synchronous poll and
//! never across an `.await`, and writes straight out of it. Only when the
//! writer pushes back are the bytes it did not take moved into a buffer the
//! direction owns, sized to what is left, and that buffer is freed as soon as
//! it has been written out.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::mux::MuxStream;

/// Size of each worker thread's scratch buffer: the most one direction moves per read.
const SCRATCH_SIZE: usize = 64 * 1024;

/// Reads one direction may do in a single poll before it yields to other tasks.
const READS_PER_POLL: usize = 16;

thread_local! {
    static SCRATCH: Cell<Option<Box<[u8]>>> = const { Cell::new(None) };
}

/// Runs `f` with this thread's scratch buffer. The buffer is taken out of the
/// thread-local for the call, so a nested call (which the copy loop never makes)
/// would get a fresh buffer instead of aliasing.
fn with_scratch<T>(f: impl FnOnce(&mut [u8]) -> T) -> T {
    let mut buf = SCRATCH.with(Cell::take).unwrap_or_else(|| vec![0u8; SCRATCH_SIZE].into_boxed_slice());
    let out = f(&mut buf);
    SCRATCH.with(|s| s.set(Some(buf)));
    out
}

/// A reader the copy loop can take whole buffers from instead of copying
/// them into its scratch buffer: a tunnel flow, which holds what it received
/// in chunks of up to 64 KiB. Every other reader keeps the default (it lends
/// nothing and is read).
pub(crate) trait Source: AsyncRead {
    /// `None` when this reader lends no buffers; else its next buffer, empty
    /// at the end of the stream.
    fn poll_lend(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Option<Poll<io::Result<Vec<u8>>>> {
        None
    }
}

impl Source for TcpStream {}
impl Source for tokio::io::DuplexStream {}
impl Source for crate::read_ahead::ReadAhead {}
impl<S: AsyncRead + Unpin> Source for crate::gateway::consumers::Paced<S> {}

impl Source for MuxStream {
    fn poll_lend(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Option<Poll<io::Result<Vec<u8>>>> {
        Some(self.get_mut().poll_take(cx))
    }
}

/// How a splice ended.
#[derive(Debug)]
pub(crate) enum SpliceEnd {
    /// Both directions reached end of stream.
    Closed,
    /// One direction failed; both were torn down.
    Error(io::Error),
    /// `stop` completed first (revocation, listener removed, shutdown).
    Stopped,
}

/// Splices `a` and `b` until both directions end, one fails, or `stop` completes.
/// `a_to_b` and `b_to_a` are called with the number of bytes each write accepted.
pub(crate) async fn splice<A, B>(
    mut a: A,
    mut b: B,
    a_to_b: impl Fn(u64),
    b_to_a: impl Fn(u64),
    stop: impl Future<Output = ()>,
) -> SpliceEnd
where
    A: Source + AsyncWrite + Unpin,
    B: Source + AsyncWrite + Unpin,
{
    let mut stop = pin!(stop);
    let mut up = Direction::default();
    let mut down = Direction::default();
    std::future::poll_fn(|cx| {
        if stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(SpliceEnd::Stopped);
        }
        if let Poll::Ready(Err(e)) = up.poll_copy(cx, Pin::new(&mut a), Pin::new(&mut b), &a_to_b) {
            return Poll::Ready(SpliceEnd::Error(e));
        }
        if let Poll::Ready(Err(e)) = down.poll_copy(cx, Pin::new(&mut b), Pin::new(&mut a), &b_to_a) {
            return Poll::Ready(SpliceEnd::Error(e));
        }
        if up.done && down.done { Poll::Ready(SpliceEnd::Closed) } else { Poll::Pending }
    })
    .await
}

/// Splices a local socket and a tunnel flow by attaching the socket to
/// the flow (see [`MuxStream::attach`], done at once): the tunnel's driver
/// moves the bytes both ways, and the returned future follows until both
/// directions end, one fails, or `stop` completes (ending like [`splice`]). The driver calls `to_flow`
/// and `from_flow` with the bytes each direction moved, as it moves them.
pub(crate) fn splice_attached<S: Future<Output = ()>>(
    local: TcpStream,
    flow: MuxStream,
    to_flow: impl Fn(u64) + Send + Sync + 'static,
    from_flow: impl Fn(u64) + Send + Sync + 'static,
    stop: S,
) -> Attached<S> {
    flow.attach(Arc::new(local), Box::new((to_flow, from_flow)));
    Attached { flow, stop }
}

pin_project_lite::pin_project! {
    /// What [`splice_attached`] returns: a hand-written future rather than an
    /// `async fn`, so an open flow's task holds the stream and `stop` once (an
    /// `async fn` keeps its arguments' storage beside what it moved them into).
    pub(crate) struct Attached<S> {
        flow: MuxStream,
        #[pin]
        stop: S,
    }
}

impl<S: Future<Output = ()>> Future for Attached<S> {
    type Output = SpliceEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SpliceEnd> {
        let this = self.project();
        if this.stop.poll(cx).is_ready() {
            return Poll::Ready(SpliceEnd::Stopped);
        }
        match this.flow.poll_attached(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(SpliceEnd::Closed),
            Poll::Ready(Err(e)) => Poll::Ready(SpliceEnd::Error(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The state of one direction between polls.
#[derive(Default)]
struct Direction {
    /// Bytes read but not yet accepted by the writer. Holds no allocation
    /// unless the writer pushed back, and is freed once written out.
    spill: Vec<u8>,
    /// How much of `spill` has been written.
    spilled_written: usize,
    /// The reader reached end of stream: shut the writer down once `spill` is out.
    read_eof: bool,
    /// The writer accepted bytes it may still hold (a TLS writer's records) until flushed.
    unflushed: bool,
    /// End of stream was read, everything written and the writer shut down.
    done: bool,
}

/// What one read-and-write step did.
enum Step {
    /// Filled the scratch buffer and wrote it all; read again.
    Moved,
    /// The reader has nothing more now (its waker is registered); bytes read before were written.
    Idle,
    /// The writer pushed back; what it did not take is in `spill` (its waker is registered).
    Blocked,
    /// The reader reached end of stream (after any bytes of this step were written).
    Eof,
}

impl Direction {
    /// Drives this direction as far as it can go without waiting.
    /// `Ready(Ok(()))` once it is finished, `Pending` while it waits on either stream.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        on_bytes: &impl Fn(u64),
    ) -> Poll<io::Result<()>>
    where
        R: Source + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        for _ in 0..READS_PER_POLL {
            // What the writer refused last time goes first.
            while self.spilled_written < self.spill.len() {
                match w.as_mut().poll_write(cx, &self.spill[self.spilled_written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(write_zero())),
                    Poll::Ready(Ok(n)) => {
                        self.spilled_written += n;
                        self.unflushed = true;
                        on_bytes(n as u64);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.spill.capacity() > 0 {
                self.spill = Vec::new();
                self.spilled_written = 0;
            }
            if self.read_eof {
                // Flushes (a TLS writer sends close_notify) and shuts down the write half. The peer may
                // already be gone; the direction is finished either way.
                let _ = std::task::ready!(w.as_mut().poll_shutdown(cx));
                self.unflushed = false;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            match self.read_and_write(cx, r.as_mut(), w.as_mut(), on_bytes)? {
                Step::Moved => {}
                Step::Eof => self.read_eof = true,
                Step::Blocked => return Poll::Pending,
                Step::Idle => {
                    if self.unflushed {
                        match w.as_mut().poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.unflushed = false,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            // The writer's waker is registered; it will push the rest when it can.
                            Poll::Pending => {}
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
        // Still busy after a fair share: let other connections run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Reads what the reader has ready into the thread's scratch buffer (up to
    /// its size), or takes the next buffer it lends, and writes it straight
    /// out; spills what the writer refuses.
    fn read_and_write<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        on_bytes: &impl Fn(u64),
    ) -> io::Result<Step>
    where
        R: Source + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if let Some(lent) = r.as_mut().poll_lend(cx) {
            let buf = match lent {
                Poll::Ready(Ok(buf)) => buf,
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Step::Eof),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(Step::Idle),
            };
            if buf.is_empty() {
                return Ok(Step::Eof);
            }
            if let Some(written) = self.write_out(cx, w.as_mut(), &buf, on_bytes)? {
                // The lent buffer is the spill: nothing is copied.
                self.spill = buf;
                self.spilled_written = written;
                return Ok(Step::Blocked);
            }
            return Ok(Step::Moved);
        }
        with_scratch(|scratch| {
            let mut buf = ReadBuf::new(scratch);
            let (mut eof, mut drained) = (false, false);
            // Fill the scratch buffer with whatever is ready, so one write carries it all (a TLS reader
            // yields one record per read; the plaintext side gets them in one write).
            while buf.remaining() > 0 {
                let before = buf.filled().len();
                match r.as_mut().poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) if buf.filled().len() == before => {
                        eof = true;
                        break;
                    }
                    Poll::Ready(Ok(())) => {}
                    // A TLS peer that closed TCP without close_notify: treat as end of stream.
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        eof = true;
                        break;
                    }
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => {
                        drained = true;
                        break;
                    }
                }
            }
            let data = buf.filled();
            if data.is_empty() {
                return Ok(if eof { Step::Eof } else { Step::Idle });
            }
            if let Some(written) = self.write_out(cx, w.as_mut(), data, on_bytes)? {
                self.spill = data[written..].to_vec();
                self.spilled_written = 0;
                self.read_eof = eof;
                return Ok(Step::Blocked);
            }
            Ok(if eof {
                Step::Eof
            } else if drained {
                Step::Idle
            } else {
                Step::Moved
            })
        })
    }
}

impl Direction {
    /// Writes `data` until it is all written (`None`) or the writer pushes
    /// back (`Some(bytes written)`, its waker registered).
    fn write_out<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut w: Pin<&mut W>,
        data: &[u8],
        on_bytes: &impl Fn(u64),
    ) -> io::Result<Option<usize>> {
        let mut written = 0;
        while written < data.len() {
            match w.as_mut().poll_write(cx, &data[written..]) {
                Poll::Ready(Ok(0)) => return Err(write_zero()),
                Poll::Ready(Ok(n)) => {
                    written += n;
                    self.unflushed = true;
                    on_bytes(n as u64);
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(Some(written)),
            }
        }
        Ok(None)
    }
}

fn write_zero() -> io::Error {
    io::Error::new(io::ErrorKind::WriteZero, "the peer stopped accepting bytes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn counter() -> (Arc<AtomicU64>, impl Fn(u64)) {
        let c = Arc::new(AtomicU64::new(0));
        let c2 = c.clone();
        (c, move |n| {
            c2.fetch_add(n, Ordering::Relaxed);
        })
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn half_close_lets_the_other_direction_finish() {
        let (client, a) = tokio::io::duplex(1024);
        let (b, server) = tokio::io::duplex(1024);
        let (up, on_up) = counter();
        let (down, on_down) = counter();
        let splicing = splice(a, b, on_up, on_down, std::future::pending());
        let peers = async move {
            let (mut cr, mut cw) = tokio::io::split(client);
            let (mut sr, mut sw) = tokio::io::split(server);
            cw.write_all(b"request").await.unwrap();
            cw.shutdown().await.unwrap();
            let mut got = Vec::new();
            sr.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"request");
            // The server still answers after the client half-closed.
            sw.write_all(b"response after half-close").await.unwrap();
            sw.shutdown().await.unwrap();
            let mut got = Vec::new();
            cr.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"response after half-close");
        };
        let (end, ()) = tokio::join!(splicing, peers);
        assert!(matches!(end, SpliceEnd::Closed), "{end:?}");
        assert_eq!(up.load(Ordering::Relaxed), 7);
        assert_eq!(down.load(Ordering::Relaxed), 25);
    }

    #[tokio::test]
    async fn server_half_close_lets_the_client_keep_sending() {
        let (client, a) = tokio::io::duplex(1024);
        let (b, server) = tokio::io::duplex(1024);
        let (up, on_up) = counter();
        let (down, on_down) = counter();
        let splicing = splice(a, b, on_up, on_down, std::future::pending());
        let peers = async move {
            let (mut cr, mut cw) = tokio::io::split(client);
            let (mut sr, mut sw) = tokio::io::split(server);
            sw.write_all(b"banner").await.unwrap();
            sw.shutdown().await.unwrap();
            let mut got = Vec::new();
            cr.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"banner");
            // The client still sends after the server half-closed.
            let body = pattern(100_000);
            let send = async {
                cw.write_all(&body).await.unwrap();
                cw.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let (_, read) = tokio::join!(send, sr.read_to_end(&mut got));
            read.unwrap();
            assert!(got == body, "bytes were lost, duplicated or reordered");
        };
        let (end, ()) = tokio::join!(splicing, peers);
        assert!(matches!(end, SpliceEnd::Closed), "{end:?}");
        assert_eq!(up.load(Ordering::Relaxed), 100_000);
        assert_eq!(down.load(Ordering::Relaxed), 6);
    }

    #[tokio::test]
    async fn a_slow_writer_gets_every_byte_in_order_and_counters_are_exact() {
        // Tiny pipes: the writer side pushes back on nearly every write, so bytes spill and drain.
        let (client, a) = tokio::io::duplex(64 * 1024);
        let (b, server) = tokio::io::duplex(100);
        let (up, on_up) = counter();
        let (down, on_down) = counter();
        let splicing = splice(a, b, on_up, on_down, std::future::pending());
        let len = 1_000_003;
        let peers = async move {
            let (mut cr, mut cw) = tokio::io::split(client);
            let (mut sr, mut sw) = tokio::io::split(server);
            let send = async {
                cw.write_all(&pattern(len)).await.unwrap();
                cw.shutdown().await.unwrap();
            };
            let slow_read = async {
                let mut got = Vec::new();
                let mut chunk = [0u8; 7];
                loop {
                    let n = sr.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&chunk[..n]);
                    if got.len() % 10 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                got
            };
            let ((), got) = tokio::join!(send, slow_read);
            assert!(got == pattern(len), "bytes were lost, duplicated or reordered");
            sw.shutdown().await.unwrap();
            let mut rest = Vec::new();
            cr.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        };
        let (end, ()) = tokio::join!(splicing, peers);
        assert!(matches!(end, SpliceEnd::Closed), "{end:?}");
        assert_eq!(up.load(Ordering::Relaxed), len as u64);
        assert_eq!(down.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn stop_ends_the_splice_mid_transfer_with_counters_of_what_was_written() {
        let (mut client, a) = tokio::io::duplex(64 * 1024);
        let (b, mut server) = tokio::io::duplex(64 * 1024);
        let (up, on_up) = counter();
        let (down, on_down) = counter();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let splicing = tokio::spawn(splice(a, b, on_up, on_down, async {
            let _ = stop_rx.await;
        }));
        client.write_all(b"first part").await.unwrap();
        let mut got = [0u8; 10];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"first part");
        stop_tx.send(()).unwrap();
        let end = splicing.await.unwrap();
        assert!(matches!(end, SpliceEnd::Stopped), "{end:?}");
        assert_eq!(up.load(Ordering::Relaxed), 10);
        assert_eq!(down.load(Ordering::Relaxed), 0);
        // Both streams were dropped by the splice: the peers see the end.
        let mut rest = Vec::new();
        assert_eq!(server.read_to_end(&mut rest).await.unwrap(), 0);
        assert!(client.write_all(b"more").await.is_err() || client.read(&mut [0u8; 1]).await.unwrap() == 0);
    }

    /// A writer that fails every write.
    struct Broken;

    impl Source for Broken {}

    impl AsyncRead for Broken {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Broken {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset by peer")))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_write_error_ends_the_splice_with_that_error() {
        let (mut client, a) = tokio::io::duplex(1024);
        let splicing = tokio::spawn(splice(a, Broken, |_| {}, |_| {}, std::future::pending()));
        client.write_all(b"doomed").await.unwrap();
        let end = splicing.await.unwrap();
        assert!(matches!(&end, SpliceEnd::Error(e) if e.kind() == io::ErrorKind::ConnectionReset), "{end:?}");
    }

    #[tokio::test]
    async fn spilled_bytes_are_freed_once_written() {
        let (mut client, mut a) = tokio::io::duplex(64 * 1024);
        let (mut b, mut server): (DuplexStream, DuplexStream) = tokio::io::duplex(16);
        let mut dir = Direction::default();
        client.write_all(&pattern(1000)).await.unwrap();
        // The writer takes 16 bytes; the other 984 must be held by the direction.
        std::future::poll_fn(|cx| {
            assert!(dir.poll_copy(cx, Pin::new(&mut a), Pin::new(&mut b), &|_| {}).is_pending());
            Poll::Ready(())
        })
        .await;
        assert_eq!(dir.spill.len() - dir.spilled_written, 1000 - 16);
        let mut got = Vec::new();
        while got.len() < 1000 {
            let mut chunk = [0u8; 64];
            let n = server.read(&mut chunk).await.unwrap();
            got.extend_from_slice(&chunk[..n]);
            std::future::poll_fn(|cx| {
                assert!(dir.poll_copy(cx, Pin::new(&mut a), Pin::new(&mut b), &|_| {}).is_pending());
                Poll::Ready(())
            })
            .await;
        }
        assert_eq!(got, pattern(1000));
        assert_eq!(dir.spill.capacity(), 0, "the spill buffer must be freed once drained");
    }
}
