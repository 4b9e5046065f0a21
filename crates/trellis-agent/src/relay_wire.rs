//! The relay protocol on a live connection: the outer TLS session with the
//! relay carries one exchange of `trellis_proto::relay` frames, then both
//! sides *leave* TLS and the same TCP connection carries the two agents' own
//! end-to-end TLS, which the relay copies without decrypting or re-encrypting
//! (the relay sees ciphertext only, and a relayed byte costs one copy there).
//!
//! Leaving TLS is safe only if no byte after the last TLS record was read
//! into the TLS session. [`RecordBounded`] guarantees it: it hands the TLS
//! reader at most the rest of the current TLS record per read, so the session
//! never holds bytes past the record that carried the last relay message.
//! [`RelaySession::leave`] and [`leave_server_tls`] then check that the session holds no unread plaintext and
//! return the stream underneath, with any read-ahead bytes intact.
//!
//! Used by all three parties: the relay (`crate::relay`), an outbound-only
//! gateway's attachments (`crate::gateway::attach`) and an endpoint dialing
//! through a relay (`crate::endpoint::relayed`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use trellis_proto::relay::{MAX_FRAME_LEN, RelayError};

/// ALPN of a relay connection's outer TLS, so a relay port and a tunnel port are never confused.
pub const RELAY_ALPN: &[u8] = b"trellis-relay/1";

/// TLS record header: content type, legacy version, length.
const RECORD_HEADER: usize = 5;

/// A stream whose reads never cross a TLS record boundary (see the module docs).
#[derive(Debug)]
pub struct RecordBounded<S> {
    io: S,
    header: [u8; RECORD_HEADER],
    /// Header bytes seen of the record being read.
    have: usize,
    /// Body bytes of the current record still to be read.
    body_left: usize,
}

impl<S> RecordBounded<S> {
    pub fn new(io: S) -> Self {
        Self { io, header: [0; RECORD_HEADER], have: 0, body_left: 0 }
    }

    /// Whether the reads so far ended exactly at a record boundary.
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.body_left == 0
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RecordBounded<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let limit = if this.body_left > 0 { this.body_left } else { RECORD_HEADER - this.have };
        let n = limit.min(buf.remaining());
        if n == 0 {
            return Poll::Ready(Ok(()));
        }
        let got = {
            let dst = buf.initialize_unfilled_to(n);
            let mut sub = ReadBuf::new(dst);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut sub))?;
            let filled = sub.filled();
            if this.body_left > 0 {
                this.body_left -= filled.len();
            } else {
                this.header[this.have..this.have + filled.len()].copy_from_slice(filled);
                this.have += filled.len();
                if this.have == RECORD_HEADER {
                    this.body_left = usize::from(u16::from_be_bytes([this.header[3], this.header[4]]));
                    this.have = 0;
                }
            }
            filled.len()
        };
        buf.advance(got);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RecordBounded<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Why a relay exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed before a whole frame arrived.
    #[error("the peer closed the connection before a whole relay frame arrived")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Protocol(#[from] RelayError),
    /// Bytes or records followed the last relay message inside TLS.
    #[error("relay protocol violation: {0}")]
    Trailing(&'static str),
}

/// Writes `frame` and flushes it out as TLS records.
pub async fn send<S: AsyncWrite + Unpin>(stream: &mut S, frame: &[u8]) -> io::Result<()> {
    stream.write_all(frame).await?;
    stream.flush().await
}

/// Reads one relay frame, and not a byte more (at most [`MAX_FRAME_LEN`]
/// bytes are ever buffered). Plaintext the peer sent after it stays in the TLS
/// session, where leaving TLS finds it and refuses.
pub async fn receive<S, T>(
    stream: &mut S,
    decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, RelayError>,
) -> Result<T, WireError>
where
    S: AsyncRead + Unpin,
{
    let mut carry = Vec::new();
    let msg = receive_carrying(stream, &mut carry, decode).await?;
    debug_assert!(carry.is_empty(), "frame-exact reads leave nothing over");
    Ok(msg)
}

/// Reads one relay frame, starting with the bytes in `carry` (read before
/// but not used); leaves any bytes after the frame in `carry`.
///
/// Reads ask for exactly the bytes the frame still lacks (its header, then
/// its body): a TLS reader fills whatever buffer it is given, reading more
/// records to do so, and must never be handed room for bytes past the frame.
async fn receive_carrying<S, T>(
    stream: &mut S,
    carry: &mut Vec<u8>,
    decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, RelayError>,
) -> Result<T, WireError>
where
    S: AsyncRead + Unpin,
{
    use trellis_proto::relay::HEADER_LEN;
    loop {
        if let Some((msg, used)) = decode(carry)? {
            carry.drain(..used);
            return Ok(msg);
        }
        // The decoder has refused a header announcing more than MAX_BODY_LEN, so `need` is bounded.
        let need = if carry.len() < HEADER_LEN {
            HEADER_LEN - carry.len()
        } else {
            let body = usize::from(u16::from_be_bytes([carry[6], carry[7]]));
            (HEADER_LEN + body).saturating_sub(carry.len()).clamp(1, MAX_FRAME_LEN)
        };
        carry.reserve(need);
        let n = match (&mut *stream).take(need as u64).read_buf(carry).await {
            Ok(0) => return Err(WireError::Closed),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
            r => r?,
        };
        debug_assert!(n > 0);
    }
}

/// The stream underneath, once the reads ended on a record boundary.
fn leave<S>(io: RecordBounded<S>) -> Result<S, WireError> {
    if !io.at_boundary() {
        return Err(WireError::Trailing("a TLS record after the last relay message"));
    }
    Ok(io.io)
}

/// Leaves the server side of the outer session (the relay); as [`RelaySession::leave`].
pub fn leave_server_tls<S>(tls: tokio_rustls::server::TlsStream<RecordBounded<S>>) -> Result<S, WireError> {
    let (io, mut conn) = tls.into_inner();
    if has_plaintext(&mut conn.reader()) {
        return Err(WireError::Trailing("data after the agent's last relay message"));
    }
    leave(io)
}

fn has_plaintext(reader: &mut rustls::Reader<'_>) -> bool {
    let mut probe = [0u8; 1];
    matches!(std::io::Read::read(reader, &mut probe), Ok(n) if n > 0)
}

/// An agent's outer TLS session with a relay, after the relay answered `ok`.
pub struct RelaySession {
    tls: tokio_rustls::client::TlsStream<RecordBounded<crate::read_ahead::ReadAhead>>,
    /// Plaintext received after the relay's answer and not read yet.
    carry: Vec<u8>,
}

impl RelaySession {
    /// Lower-case hex SHA-256 of the relay's certificate.
    pub fn relay_cert_sha256(&self) -> Option<String> {
        self.tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(crate::tls::cert_sha256)
    }

    /// Reads the relay's next message (an attached gateway's `Flow`).
    pub async fn receive<T>(
        &mut self,
        decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, RelayError>,
    ) -> Result<T, WireError> {
        receive_carrying(&mut self.tls, &mut self.carry, decode).await
    }

    /// Sends a message (an attached gateway's `Accept`).
    pub async fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        send(&mut self.tls, frame).await
    }

    /// Leaves the outer TLS: the stream underneath, once every relay message
    /// was read, the session holds no unread plaintext and the reads ended on
    /// a record boundary.
    pub fn leave(self) -> Result<crate::read_ahead::ReadAhead, WireError> {
        if !self.carry.is_empty() {
            return Err(WireError::Trailing("data after the relay's last message"));
        }
        let (io, mut conn) = self.tls.into_inner();
        if has_plaintext(&mut conn.reader()) {
            return Err(WireError::Trailing("data after the relay's last message"));
        }
        leave(io)
    }
}

/// Why an agent's hello to a relay did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum DialRelayError {
    /// The relay could not be reached or did not complete the handshake: it is down for this agent.
    #[error("relay {relay} ({address}): {reason}")]
    Unreachable { relay: String, address: String, reason: String },
    /// The relay answered, with a refusal.
    #[error("relay {relay} answered {}: {}", .answer.status, .answer.message)]
    Refused { relay: String, answer: trellis_proto::relay::Answer },
    /// The relay presented a certificate the control plane revoked (the relay
    /// was deleted); nothing was sent to it.
    #[error("relay {relay} ({address}) presented a revoked certificate (the relay was deleted); not using it")]
    Revoked { relay: String, address: String },
}

/// Connects to `relay` (TCP, outer TLS verifying the relay's server name),
/// sends `hello` and waits for the answer, all within `timeout`.
pub async fn dial_relay(
    connector: &tokio_rustls::TlsConnector,
    relay: &trellis_proto::RelayTarget,
    hello: &trellis_proto::relay::Hello,
    timeout: std::time::Duration,
) -> Result<RelaySession, DialRelayError> {
    dial_relay_unless_revoked(connector, relay, hello, timeout, |_| false).await
}

/// [`dial_relay`], refusing the relay right after the TLS handshake (before
/// the hello is sent) when `revoked` says its certificate (lower-case hex
/// SHA-256) was revoked.
pub async fn dial_relay_unless_revoked(
    connector: &tokio_rustls::TlsConnector,
    relay: &trellis_proto::RelayTarget,
    hello: &trellis_proto::relay::Hello,
    timeout: std::time::Duration,
    revoked: impl Fn(&str) -> bool,
) -> Result<RelaySession, DialRelayError> {
    use trellis_proto::relay::{RelayStatus, decode_answer, encode_hello};
    let unreachable = |reason: String| DialRelayError::Unreachable {
        relay: relay.relay_id.clone(),
        address: relay.address.clone(),
        reason,
    };
    let name = rustls::pki_types::ServerName::try_from(relay.server_name.clone())
        .map_err(|e| unreachable(format!("bad relay server name: {e}")))?;
    let mut frame = Vec::new();
    encode_hello(hello, &mut frame).map_err(|e| unreachable(e.to_string()))?;
    let attempt = async {
        let tcp =
            tokio::net::TcpStream::connect(relay.address.as_str()).await.map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        crate::relay::server::set_attachment_keepalive(&tcp);
        let io = RecordBounded::new(crate::read_ahead::ReadAhead::new(tcp));
        let mut tls = connector.connect(name, io).await.map_err(|e| unreachable(format!("TLS: {e}")))?;
        let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(crate::tls::cert_sha256);
        if cert.as_deref().is_some_and(&revoked) {
            return Err(DialRelayError::Revoked { relay: relay.relay_id.clone(), address: relay.address.clone() });
        }
        send(&mut tls, &frame).await.map_err(|e| unreachable(e.to_string()))?;
        let mut carry = Vec::new();
        let answer =
            receive_carrying(&mut tls, &mut carry, decode_answer).await.map_err(|e| unreachable(e.to_string()))?;
        if answer.status == RelayStatus::Ok {
            Ok(RelaySession { tls, carry })
        } else {
            Err(DialRelayError::Refused { relay: relay.relay_id.clone(), answer })
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(unreachable(format!("no answer within {timeout:?}"))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn record(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut r = vec![kind, 3, 3];
        r.extend_from_slice(&(body.len() as u16).to_be_bytes());
        r.extend_from_slice(body);
        r
    }

    #[tokio::test]
    async fn reads_stop_at_each_record_boundary_and_leave_the_rest_underneath() {
        let mut wire = record(23, b"first");
        wire.extend(record(23, b""));
        wire.extend(record(23, &[7u8; 300]));
        let tail = b"raw bytes after TLS".to_vec();
        wire.extend_from_slice(&tail);
        let (mut tx, rx) = tokio::io::duplex(4096);
        tx.write_all(&wire).await.unwrap();
        drop(tx);
        let mut bounded = RecordBounded::new(rx);
        let mut got = Vec::new();
        let records_len = wire.len() - tail.len();
        while got.len() < records_len {
            let mut chunk = [0u8; 1024];
            let n = bounded.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
            assert!(got.len() <= records_len, "a read crossed into the bytes after the last record");
        }
        assert!(bounded.at_boundary());
        let mut rest = Vec::new();
        leave(bounded).unwrap().read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, tail);
    }

    /// Two messages written one after the other reach the reader as two
    /// reads, and leaving TLS after them hands over exactly the bytes that follow.
    #[tokio::test]
    async fn messages_in_separate_records_are_read_one_at_a_time_and_raw_bytes_after_them_are_kept() {
        use crate::testing::TestCa;
        use trellis_proto::relay::{Answer, RelayStatus, decode_answer, decode_flow, encode_answer, encode_flow};
        let ca = TestCa::new();
        let relay = ca.issue_relay("relay-1", "z1");
        let agent = ca.issue("agent-1", "acct-1", "vpc-1");
        let server =
            crate::tls::relay_server_config(&relay.ca, &relay.cert, &relay.key, Arc::new(crate::tls::AnyAgent))
                .unwrap();
        let client = crate::tls::relay_client_config(&crate::tls::tunnel_client_config(&agent).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let io = RecordBounded::new(crate::read_ahead::ReadAhead::new(tcp));
            let mut tls = tokio_rustls::TlsAcceptor::from(server).accept(io).await.unwrap();
            let mut hello = [0u8; 5];
            tls.read_exact(&mut hello).await.unwrap();
            let mut frame = Vec::new();
            encode_answer(&Answer::new(RelayStatus::Ok, ""), &mut frame);
            send(&mut tls, &frame).await.unwrap();
            let mut frame = Vec::new();
            encode_flow("agent-2", &mut frame).unwrap();
            send(&mut tls, &frame).await.unwrap();
            let mut raw = leave_server_tls(tls).unwrap();
            raw.write_all(b"raw after TLS").await.unwrap();
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let io = RecordBounded::new(crate::read_ahead::ReadAhead::new(tcp));
        let name = rustls::pki_types::ServerName::try_from(trellis_proto::relay_server_name("relay-1")).unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(client).connect(name, io).await.unwrap();
        send(&mut tls, b"hello").await.unwrap();
        serving.await.unwrap();
        let mut carry = Vec::new();
        let answer = receive_carrying(&mut tls, &mut carry, decode_answer).await.unwrap();
        assert_eq!(answer.status, RelayStatus::Ok);
        assert!(carry.is_empty(), "the answer is read alone");
        let from = receive_carrying(&mut tls, &mut carry, decode_flow).await.unwrap();
        assert_eq!(from, "agent-2");
        let mut raw = RelaySession { tls, carry }.leave().unwrap();
        let mut rest = Vec::new();
        raw.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"raw after TLS");
    }

    #[tokio::test]
    async fn leaving_in_the_middle_of_a_record_is_an_error() {
        let (mut tx, rx) = tokio::io::duplex(4096);
        tx.write_all(&record(23, b"abcdef")).await.unwrap();
        let mut bounded = RecordBounded::new(rx);
        let mut chunk = [0u8; 7];
        bounded.read_exact(&mut chunk).await.unwrap();
        assert!(!bounded.at_boundary());
        assert!(matches!(leave(bounded), Err(WireError::Trailing(_))));
    }

    #[tokio::test]
    async fn receive_takes_one_frame_and_no_more_and_refuses_oversized_frames() {
        use trellis_proto::relay::{Hello, decode_hello, encode_hello};
        let mut frame = Vec::new();
        encode_hello(&Hello::Attach, &mut frame).unwrap();
        let (mut tx, mut rx) = tokio::io::duplex(4096);
        tx.write_all(&frame).await.unwrap();
        assert_eq!(receive(&mut rx, decode_hello).await.unwrap(), Hello::Attach);
        let mut with_tail = frame.clone();
        with_tail.push(0);
        tx.write_all(&with_tail).await.unwrap();
        assert_eq!(receive(&mut rx, decode_hello).await.unwrap(), Hello::Attach);
        assert_eq!(rx.read_u8().await.unwrap(), 0, "the byte after the frame is not read");
        let (mut tx, mut rx) = tokio::io::duplex(4096);
        tx.write_all(b"TRRL\x01\x02\xff\xff").await.unwrap();
        assert!(matches!(receive(&mut rx, decode_hello).await, Err(WireError::Protocol(RelayError::FrameTooLarge(_)))));
        drop(tx);
        assert!(matches!(receive(&mut rx, decode_hello).await, Err(WireError::Closed | WireError::Protocol(_))));
    }
}
