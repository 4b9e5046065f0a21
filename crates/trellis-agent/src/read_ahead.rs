//! A TCP stream for rustls to read from in large gulps.
//!
//! rustls's `read_tls` asks for at most 4 KiB per read, so a 16 KiB TLS
//! record costs four `recvfrom` calls, and a stream of them four times as many
//! system calls as bytes warrant. [`ReadAhead`] answers small reads from one
//! large read: it receives up to 64 KiB into the worker thread's scratch
//! buffer, hands the caller what it asked for, and keeps only the rest in a
//! buffer of its own, sized to the rest and freed as soon as it has been read.
//! An idle connection therefore holds no read-ahead memory. Writes pass through.

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
    /// Bytes received but not yet read; no allocation when empty.
    ahead: Vec<u8>,
    /// How much of `ahead` has been read.
    pos: usize,
}

impl ReadAhead {
    pub fn new(io: TcpStream) -> Self {
        Self { io, ahead: Vec::new(), pos: 0 }
    }

    /// The socket.
    pub fn get_ref(&self) -> &TcpStream {
        &self.io
    }

    /// Bytes held for the next reads (for tests and diagnostics).
    pub fn buffered(&self) -> usize {
        self.ahead.len() - self.pos
    }

    fn serve(&mut self, buf: &mut ReadBuf<'_>) {
        let n = buf.remaining().min(self.ahead.len() - self.pos);
        buf.put_slice(&self.ahead[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos == self.ahead.len() {
            self.ahead = Vec::new();
            self.pos = 0;
        }
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.ahead.len() {
            this.serve(buf);
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= READ_AHEAD {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let mut scratch = SCRATCH.with(Cell::take).unwrap_or_else(|| vec![0u8; READ_AHEAD].into_boxed_slice());
        let mut big = ReadBuf::new(&mut scratch);
        let polled = Pin::new(&mut this.io).poll_read(cx, &mut big);
        if let Poll::Ready(Ok(())) = polled {
            let got = big.filled();
            let n = buf.remaining().min(got.len());
            buf.put_slice(&got[..n]);
            if n < got.len() {
                this.ahead = got[n..].to_vec();
                this.pos = 0;
            }
        }
        SCRATCH.with(|s| s.set(Some(scratch)));
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
        loop {
            let n = rx.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            if rx.buffered() == 0 {
                assert_eq!(rx.ahead.capacity(), 0, "a drained read-ahead buffer must be freed");
            }
        }
        writer.await.unwrap();
        assert_eq!(got, data);
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
