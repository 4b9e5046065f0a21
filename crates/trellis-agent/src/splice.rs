//! Copies bytes both ways between two streams, preserving TCP half-close: when
//! one side finishes sending, the other side's write half is shut down and the
//! opposite direction keeps flowing until it finishes too.

use std::future::Future;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const BUF_SIZE: usize = 64 * 1024;

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
/// `a_to_b` and `b_to_a` are called with every chunk's size as it is written.
pub(crate) async fn splice<A, B>(
    a: A,
    b: B,
    a_to_b: impl Fn(u64),
    b_to_a: impl Fn(u64),
    stop: impl Future<Output = ()>,
) -> SpliceEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let up = copy_half(&mut ar, &mut bw, &a_to_b);
    let down = copy_half(&mut br, &mut aw, &b_to_a);
    tokio::pin!(up, down, stop);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(e) => return SpliceEnd::Error(e),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(e) => return SpliceEnd::Error(e),
            },
            () = &mut stop => return SpliceEnd::Stopped,
        }
        if up_done && down_done {
            return SpliceEnd::Closed;
        }
    }
}

async fn copy_half<R, W>(r: &mut R, w: &mut W, on_bytes: &impl Fn(u64)) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(n) => n,
            // A TLS peer that closed TCP without close_notify: treat as end of stream.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            // The peer may already be gone; the direction is finished either way.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        on_bytes(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test]
    async fn half_close_lets_the_other_direction_finish() {
        let (client, a) = tokio::io::duplex(1024);
        let (b, server) = tokio::io::duplex(1024);
        let up = AtomicU64::new(0);
        let down = AtomicU64::new(0);
        let splicing = splice(
            a,
            b,
            |n| {
                up.fetch_add(n, Ordering::Relaxed);
            },
            |n| {
                down.fetch_add(n, Ordering::Relaxed);
            },
            std::future::pending(),
        );
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
}
