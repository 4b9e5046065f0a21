//! A TCP stream for rustls to read from in large gulps.
//!
//! rustls's `read_tls` asks for at most 4 KiB per read, so a 16 KiB TLS
//! record costs four `recvfrom` calls, and a stream of them four times as many
//! system calls as bytes warrant. [`ReadAhead`] answers small reads from one
//! large read: it receives up to 64 KiB into the worker thread's scratch
//! buffer and hands the caller what it asked for. When bytes are left over,
//! the connection takes the scratch buffer itself (no copy) until they have
//! been read, then gives it back to the thread. An idle connection therefore
//! holds no read-ahead memory, and a busy one neither copies the rest nor
//! allocates per read. Writes pass through.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The most one read from the socket takes.
const READ_AHEAD: usize = 64 * 1024;

thread_local! {
    static SCRATCH: Cell<Option<Box<[u8]>>> = const { Cell::new(None) };
}

/// A [`TcpStream`] whose small reads are served from one large read.
#[derive(Debug)]
pub struct ReadAhead {
    io: TcpStream,
    /// A scratch buffer holding bytes received but not yet read; `None` when
    /// everything received has been read.
    ahead: Option<Box<[u8]>>,
    /// `ahead[pos..len]` is still to be read.
    pos: usize,
    len: usize,
}

fn take_scratch() -> Box<[u8]> {
    SCRATCH.with(Cell::take).unwrap_or_else(|| vec![0u8; READ_AHEAD].into_boxed_slice())
}

/// Gives a drained buffer back to the thread, unless the thread has one again.
fn return_scratch(buf: Box<[u8]>) {
    SCRATCH.with(|slot| {
        let current = slot.take();
        slot.set(Some(current.unwrap_or(buf)));
    });
}

impl ReadAhead {
    pub fn new(io: TcpStream) -> Self {
        Self { io, ahead: None, pos: 0, len: 0 }
    }

    /// The socket.
    pub fn get_ref(&self) -> &TcpStream {
        &self.io
    }

    /// Bytes held for the next reads (for tests and diagnostics).
    pub fn buffered(&self) -> usize {
        self.len - self.pos
    }

    /// Whether this connection holds a read-ahead buffer (for tests).
    pub fn holds_buffer(&self) -> bool {
        self.ahead.is_some()
    }

    fn serve(&mut self, buf: &mut ReadBuf<'_>) {
        let Some(ahead) = &self.ahead else { return };
        let n = buf.remaining().min(self.len - self.pos);
        buf.put_slice(&ahead[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos == self.len
            && let Some(drained) = self.ahead.take()
        {
            return_scratch(drained);
            (self.pos, self.len) = (0, 0);
        }
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ahead.is_some() {
            this.serve(buf);
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= READ_AHEAD {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let mut scratch = take_scratch();
        let mut big = ReadBuf::new(&mut scratch);
        let polled = Pin::new(&mut this.io).poll_read(cx, &mut big);
        let filled = big.filled().len();
        if let Poll::Ready(Ok(())) = polled {
            let n = buf.remaining().min(filled);
            buf.put_slice(&scratch[..n]);
            if n < filled {
                // Keep the rest where it is: the buffer is this connection's until it is read.
                (this.ahead, this.pos, this.len) = (Some(scratch), n, filled);
                return Poll::Ready(Ok(()));
            }
        }
        return_scratch(scratch);
        ready!(polled)?;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, ReadAhead) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(listener.local_addr().unwrap()), listener.accept());
        (a.unwrap(), ReadAhead::new(b.unwrap().0))
    }

    #[tokio::test]
    async fn small_reads_get_every_byte_in_order_and_the_buffer_is_freed_when_drained() {
        let (mut tx, mut rx) = pair().await;
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            tx.write_all(&sent).await.unwrap();
            tx.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut held = false;
        loop {
            let n = rx.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            held |= rx.buffered() > 0;
            if rx.buffered() == 0 {
                assert!(!rx.holds_buffer(), "a drained read-ahead buffer must be given back");
            }
        }
        writer.await.unwrap();
        assert_eq!(got, data);
        assert!(held, "4 KiB reads of a 200 KB stream must be served from read-ahead");
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (mut tx, mut rx) = pair().await;
        rx.write_all(b"pong").await.unwrap();
        let mut got = [0u8; 4];
        tx.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
    }
}
