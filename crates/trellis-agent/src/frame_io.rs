//! Reads one stream-protocol frame from an async stream, keeping any bytes
//! that arrived after it (payload the peer sent right behind the frame).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};
use trellis_proto::stream::{MAX_FRAME_LEN, StreamError};

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    /// The peer closed before a whole frame arrived.
    #[error("the peer closed the connection before a whole frame arrived")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Protocol(#[from] StreamError),
}

/// The most one read takes while looking for a frame.
const READ_CHUNK: usize = 4096;

/// Reads until `decode` yields a frame; returns it and the bytes read past it.
pub async fn read_frame<S, T>(
    stream: &mut S,
    decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, StreamError>,
) -> Result<(T, Vec<u8>), ReadFrameError>
where
    S: AsyncRead + Unpin,
{
    // Read straight into `buf` (no buffer on the stack: this future's state lives in the
    // connection's task for as long as a pooled connection waits for its request).
    let mut buf = Vec::with_capacity(256);
    loop {
        if let Some((msg, used)) = decode(&buf)? {
            return Ok((msg, buf.split_off(used)));
        }
        // The decoder rejects frames longer than MAX_FRAME_LEN, so this bound is never hit by a valid peer.
        let room = (MAX_FRAME_LEN + READ_CHUNK).saturating_sub(buf.len()).min(READ_CHUNK);
        buf.reserve(room);
        let n = match (&mut *stream).take(room as u64).read_buf(&mut buf).await {
            Ok(0) => return Err(ReadFrameError::Closed),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ReadFrameError::Closed),
            r => r?,
        };
        debug_assert!(n > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use trellis_proto::stream::{OpenRequest, decode_open_request, encode_open_request};

    #[tokio::test]
    async fn frame_split_across_writes_is_read_with_trailing_payload() {
        let req = OpenRequest {
            vpc_endpoint_id: "vpce-1".into(),
            resource_configuration_id: "rcfg-1".into(),
            port: 80,
            client_addr: "[::1]:9".parse().unwrap(),
        };
        let mut bytes = Vec::new();
        encode_open_request(&req, &mut bytes).unwrap();
        bytes.extend_from_slice(b"GET /");
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for byte in bytes {
                a.write_all(&[byte]).await.unwrap();
            }
        });
        let (got, rest) = read_frame(&mut b, decode_open_request).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, req);
        // Bytes may or may not have arrived with the frame; what did must be the payload's prefix.
        assert!(b"GET /".starts_with(&rest));
    }

    #[tokio::test]
    async fn garbage_is_a_protocol_error() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"SSH-2.0-OpenSSH\r\n").await.unwrap();
        let err = read_frame(&mut b, decode_open_request).await.unwrap_err();
        assert!(matches!(err, ReadFrameError::Protocol(StreamError::BadMagic)));
    }
}
