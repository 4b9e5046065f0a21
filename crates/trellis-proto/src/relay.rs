//! The relay protocol: how an agent asks a relay (`trellis relay`) to attach
//! it as a gateway or to connect it to one. Spoken inside the mutually
//! authenticated TLS 1.3 session between an agent and the relay, before the
//! relayed pipe starts.
//!
//! Sans-IO: functions take and return bytes; no sockets, no clock.
//!
//! ```text
//! gateway  ──► relay   Attach                       (keep me as an idle attachment)
//! gateway  ◄── relay   Answer {Ok | refusal, message}
//!                      … idle (TCP keepalive) …
//! gateway  ◄── relay   Flow {from agent id}          (a flow takes this attachment)
//! gateway  ──► relay   Accept
//!
//! endpoint ──► relay   Connect {gateway agent id}
//! endpoint ◄── relay   Answer {Ok | refusal, message}
//! ```
//!
//! After `Accept` (gateway side) and `Answer Ok` to a `Connect` (endpoint
//! side) the relay leaves TLS: each side's last relay-protocol record is the
//! last TLS record of the session in that direction, and the bytes after it
//! are the two agents' own end-to-end TLS, which the relay copies without
//! reading. A peer must therefore never send a TLS record after its last
//! message (no close_notify, no key update), and a reader must not read past
//! the record that carries the last message.
//!
//! Every frame is `magic "TRRL" | version u8 | type u8 | body length u16 BE | body`.
//! Bodies are bounded ([`MAX_BODY_LEN`]), so a peer can never make a decoder
//! buffer more than [`MAX_FRAME_LEN`] bytes. Decoders return `Ok(None)` while a
//! frame is incomplete and reject a bad prefix as soon as the bytes that prove
//! it have arrived. Each side has its own decoder that accepts only the frames
//! it may receive: anything else is [`RelayError::ProtocolViolation`].

use std::fmt;

use crate::frame::{self, Framing, HeaderError, Malformed, Reader};

/// First bytes of every frame (distinct from the stream protocol's `TRLS`).
pub const MAGIC: [u8; 4] = *b"TRRL";
/// The relay protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Bytes before the body: magic, version, type, body length.
pub const HEADER_LEN: usize = frame::HEADER_LEN;
/// Largest body any frame of this version may carry.
pub const MAX_BODY_LEN: usize = 512;
/// Largest frame, header included; a decoder never needs more buffered.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_BODY_LEN;
/// Longest agent id, in bytes.
pub const MAX_ID_LEN: usize = 64;
/// Longest message of an [`Answer`], in bytes (UTF-8).
pub const MAX_MESSAGE_LEN: usize = MAX_BODY_LEN - 3;

const TYPE_ATTACH: u8 = 1;
const TYPE_CONNECT: u8 = 2;
const TYPE_ANSWER: u8 = 3;
const TYPE_FLOW: u8 = 4;
const TYPE_ACCEPT: u8 = 5;

/// The first message of an agent on a relay connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Hello {
    /// From an outbound-only gateway agent: keep this connection for a future flow.
    Attach,
    /// From an endpoint agent: pair this connection with an attachment of that gateway agent.
    Connect { gateway_agent_id: String },
}

/// The relay's verdict on a [`Hello`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RelayStatus {
    /// Attached, or connected: for a `Connect`, the relayed pipe starts right after.
    Ok,
    /// The relay does not serve that gateway agent (or, for `Attach`, the peer).
    NotServed,
    /// The gateway agent has no attachment free now (it is down or saturated).
    Unavailable,
    /// A limit of the relay is reached (attachments of this gateway, waiting connects).
    Busy,
    /// The hello was malformed.
    BadRequest,
}

impl RelayStatus {
    fn code(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::NotServed => 1,
            Self::Unavailable => 2,
            Self::Busy => 3,
            Self::BadRequest => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::Ok,
            1 => Self::NotServed,
            2 => Self::Unavailable,
            3 => Self::Busy,
            4 => Self::BadRequest,
            _ => return None,
        })
    }

    /// Lower-case name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NotServed => "not_served",
            Self::Unavailable => "unavailable",
            Self::Busy => "busy",
            Self::BadRequest => "bad_request",
        }
    }
}

impl fmt::Display for RelayStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The relay's answer to a [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Answer {
    pub status: RelayStatus,
    /// Why, for humans; empty on success. At most [`MAX_MESSAGE_LEN`] bytes.
    pub message: String,
}

impl Answer {
    /// An answer with `message` cut to [`MAX_MESSAGE_LEN`] bytes at a character boundary.
    pub fn new(status: RelayStatus, message: impl Into<String>) -> Self {
        Self { status, message: frame::cut_message(message, MAX_MESSAGE_LEN) }
    }
}

/// Any frame of the relay protocol.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Message {
    Hello(Hello),
    Answer(Answer),
    /// Relay → attached gateway: a flow from this endpoint agent takes the attachment.
    Flow {
        from_agent_id: String,
    },
    /// Gateway → relay: the gateway serves the flow; its end-to-end TLS follows.
    Accept,
}

impl Message {
    fn kind(&self) -> &'static str {
        match self {
            Self::Hello(Hello::Attach) => "Attach",
            Self::Hello(Hello::Connect { .. }) => "Connect",
            Self::Answer(_) => "Answer",
            Self::Flow { .. } => "Flow",
            Self::Accept => "Accept",
        }
    }
}

/// Why bytes could not be decoded, or a message could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// The first bytes are not the relay protocol's magic.
    #[error("the peer does not speak the Trellis relay protocol (bad magic bytes)")]
    BadMagic,
    /// A version this build does not know.
    #[error(
        "the peer speaks relay protocol version {got}, this build speaks version {supported}; upgrade the older side"
    )]
    UnsupportedVersion { got: u8, supported: u8 },
    /// A frame type this version does not define.
    #[error("unknown relay frame type {0}")]
    UnknownFrameType(u8),
    /// A frame announces a body larger than [`MAX_BODY_LEN`].
    #[error("relay frame body of {0} bytes exceeds the limit of {MAX_BODY_LEN}")]
    FrameTooLarge(usize),
    /// The body does not match its type's layout.
    #[error("malformed relay frame: {0}")]
    Malformed(&'static str),
    /// A frame this side must never receive.
    #[error("relay protocol violation: {0}")]
    ProtocolViolation(String),
    /// An id given to an encoder is empty, longer than [`MAX_ID_LEN`] or not printable ASCII.
    #[error("invalid agent id {0:?}: ids are 1-{MAX_ID_LEN} printable ASCII characters")]
    InvalidId(String),
}

const FRAMING: Framing =
    Framing { magic: MAGIC, version: VERSION, types: TYPE_ATTACH..=TYPE_ACCEPT, max_body: MAX_BODY_LEN };

impl From<HeaderError> for RelayError {
    fn from(e: HeaderError) -> Self {
        match e {
            HeaderError::BadMagic => Self::BadMagic,
            HeaderError::UnsupportedVersion(got) => Self::UnsupportedVersion { got, supported: VERSION },
            HeaderError::UnknownFrameType(t) => Self::UnknownFrameType(t),
            HeaderError::FrameTooLarge(n) => Self::FrameTooLarge(n),
        }
    }
}

impl From<Malformed> for RelayError {
    fn from(Malformed(what): Malformed) -> Self {
        Self::Malformed(what)
    }
}

fn put_id(out: &mut Vec<u8>, frame_type: u8, id: &str) -> Result<(), RelayError> {
    if !frame::valid_id(id.as_bytes(), MAX_ID_LEN) {
        return Err(RelayError::InvalidId(id.to_string()));
    }
    let mut body = Vec::with_capacity(1 + id.len());
    body.push(id.len() as u8);
    body.extend_from_slice(id.as_bytes());
    FRAMING.put(out, frame_type, &body);
    Ok(())
}

/// Appends a [`Hello`] frame to `out`; nothing is appended on error.
pub fn encode_hello(hello: &Hello, out: &mut Vec<u8>) -> Result<(), RelayError> {
    match hello {
        Hello::Attach => {
            FRAMING.put(out, TYPE_ATTACH, &[]);
            Ok(())
        }
        Hello::Connect { gateway_agent_id } => put_id(out, TYPE_CONNECT, gateway_agent_id),
    }
}

/// Appends an [`Answer`] frame to `out`; a long message is cut at a character boundary.
pub fn encode_answer(answer: &Answer, out: &mut Vec<u8>) {
    let answer = Answer::new(answer.status, answer.message.as_str());
    let mut body = Vec::with_capacity(3 + answer.message.len());
    body.push(answer.status.code());
    body.extend_from_slice(&(answer.message.len() as u16).to_be_bytes());
    body.extend_from_slice(answer.message.as_bytes());
    FRAMING.put(out, TYPE_ANSWER, &body);
}

/// Appends a `Flow` frame (relay → attached gateway) to `out`.
pub fn encode_flow(from_agent_id: &str, out: &mut Vec<u8>) -> Result<(), RelayError> {
    put_id(out, TYPE_FLOW, from_agent_id)
}

/// Appends an `Accept` frame (gateway → relay) to `out`.
pub fn encode_accept(out: &mut Vec<u8>) {
    FRAMING.put(out, TYPE_ACCEPT, &[]);
}

/// Decodes one frame of any type from the start of `buf`.
///
/// `Ok(None)`: more bytes are needed. `Ok(Some((msg, consumed)))`: the frame
/// used `consumed` bytes.
pub fn decode_message(buf: &[u8]) -> Result<Option<(Message, usize)>, RelayError> {
    let Some((frame_type, body)) = FRAMING.split(buf)? else {
        return Ok(None);
    };
    let mut r = Reader::new(body);
    let msg = match frame_type {
        TYPE_ATTACH => Message::Hello(Hello::Attach),
        TYPE_CONNECT => {
            Message::Hello(Hello::Connect { gateway_agent_id: r.id(MAX_ID_LEN, "Connect gateway agent id")? })
        }
        TYPE_ANSWER => {
            let status =
                RelayStatus::from_code(r.u8("Answer status")?).ok_or(RelayError::Malformed("Answer status"))?;
            let len = usize::from(r.u16("Answer message length")?);
            let text = r.take(len, "Answer message")?;
            let message =
                std::str::from_utf8(text).map_err(|_| RelayError::Malformed("Answer message is not UTF-8"))?;
            Message::Answer(Answer { status, message: message.to_string() })
        }
        TYPE_FLOW => Message::Flow { from_agent_id: r.id(MAX_ID_LEN, "Flow agent id")? },
        _ => Message::Accept,
    };
    r.finish()?;
    Ok(Some((msg, HEADER_LEN + body.len())))
}

fn expect<T>(
    buf: &[u8],
    side: &str,
    pick: impl FnOnce(Message) -> Result<T, Message>,
) -> Result<Option<(T, usize)>, RelayError> {
    match decode_message(buf)? {
        None => Ok(None),
        Some((msg, n)) => match pick(msg) {
            Ok(x) => Ok(Some((x, n))),
            Err(other) => Err(RelayError::ProtocolViolation(format!("{side} received {}", other.kind()))),
        },
    }
}

/// What the relay reads first on a connection: a [`Hello`].
pub fn decode_hello(buf: &[u8]) -> Result<Option<(Hello, usize)>, RelayError> {
    expect(buf, "the relay", |m| match m {
        Message::Hello(h) => Ok(h),
        other => Err(other),
    })
}

/// What an agent reads after its hello: the relay's [`Answer`].
pub fn decode_answer(buf: &[u8]) -> Result<Option<(Answer, usize)>, RelayError> {
    expect(buf, "an agent waiting for the relay's answer", |m| match m {
        Message::Answer(a) => Ok(a),
        other => Err(other),
    })
}

/// What an attached gateway reads while idle: a `Flow` (the agent id it comes from).
pub fn decode_flow(buf: &[u8]) -> Result<Option<(String, usize)>, RelayError> {
    expect(buf, "an attached gateway", |m| match m {
        Message::Flow { from_agent_id } => Ok(from_agent_id),
        other => Err(other),
    })
}

/// What the relay reads from an attachment after sending `Flow`: `Accept`.
pub fn decode_accept(buf: &[u8]) -> Result<Option<((), usize)>, RelayError> {
    expect(buf, "the relay waiting for a gateway's Accept", |m| match m {
        Message::Accept => Ok(()),
        other => Err(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GW: &str = "agent-0000000000000000a";

    fn connect() -> Vec<u8> {
        let mut out = Vec::new();
        encode_hello(&Hello::Connect { gateway_agent_id: GW.into() }, &mut out).unwrap();
        out
    }

    #[test]
    fn every_message_round_trips_and_says_how_many_bytes_it_used() {
        let mut out = Vec::new();
        encode_hello(&Hello::Attach, &mut out).unwrap();
        assert_eq!(decode_hello(&out).unwrap(), Some((Hello::Attach, HEADER_LEN)));
        let c = connect();
        let mut with_tail = c.clone();
        with_tail.extend_from_slice(b"\x16\x03\x01 inner TLS");
        assert_eq!(
            decode_hello(&with_tail).unwrap(),
            Some((Hello::Connect { gateway_agent_id: GW.into() }, c.len())),
            "bytes after the frame belong to the pipe"
        );
        let mut out = Vec::new();
        encode_answer(&Answer::new(RelayStatus::NotServed, "not here"), &mut out);
        assert_eq!(
            decode_answer(&out).unwrap(),
            Some((Answer { status: RelayStatus::NotServed, message: "not here".into() }, out.len()))
        );
        let mut out = Vec::new();
        encode_flow("agent-0000000000000000b", &mut out).unwrap();
        assert_eq!(decode_flow(&out).unwrap(), Some(("agent-0000000000000000b".to_string(), out.len())));
        let mut out = Vec::new();
        encode_accept(&mut out);
        assert_eq!(decode_accept(&out).unwrap(), Some(((), HEADER_LEN)));
    }

    #[test]
    fn every_strict_prefix_needs_more_bytes() {
        let c = connect();
        for cut in 0..c.len() {
            assert_eq!(decode_hello(&c[..cut]).unwrap(), None, "prefix of {cut} bytes");
        }
    }

    #[test]
    fn wrong_magic_unknown_version_and_unknown_type_fail_as_soon_as_seen() {
        assert_eq!(decode_hello(b"X"), Err(RelayError::BadMagic));
        assert_eq!(decode_hello(b"TRLS\x01"), Err(RelayError::BadMagic), "the stream protocol is not the relay's");
        assert_eq!(decode_hello(b"\x16\x03\x01"), Err(RelayError::BadMagic), "a TLS record is refused");
        assert_eq!(decode_hello(b"TRRL\x02"), Err(RelayError::UnsupportedVersion { got: 2, supported: 1 }));
        assert_eq!(decode_hello(b"TRRL\x01\x09"), Err(RelayError::UnknownFrameType(9)));
        assert_eq!(decode_hello(b"TRRL\x01\x00"), Err(RelayError::UnknownFrameType(0)));
    }

    #[test]
    fn an_oversized_body_is_refused_before_it_arrives() {
        let header = [b'T', b'R', b'R', b'L', 1, TYPE_CONNECT, 0xff, 0xff];
        assert_eq!(decode_hello(&header), Err(RelayError::FrameTooLarge(0xffff)));
        let header = [b'T', b'R', b'R', b'L', 1, TYPE_CONNECT, 0x02, 0x01];
        assert_eq!(decode_hello(&header), Err(RelayError::FrameTooLarge(513)));
    }

    #[test]
    fn malformed_bodies_are_errors() {
        let frame = |ty: u8, body: &[u8]| {
            let mut out = Vec::new();
            FRAMING.put(&mut out, ty, body);
            out
        };
        let bad = [
            frame(TYPE_CONNECT, &[]),
            frame(TYPE_CONNECT, &[0]),
            frame(TYPE_CONNECT, &[5, b'a', b'b']),
            frame(TYPE_CONNECT, &[2, b'a', b' ']),
            frame(TYPE_CONNECT, &[2, b'a', 0xc3]),
            frame(TYPE_CONNECT, &[1, b'a', b'x']),
            frame(TYPE_ATTACH, &[1]),
        ];
        for b in &bad {
            assert!(matches!(decode_hello(b), Err(RelayError::Malformed(_))), "{b:?}");
        }
        assert!(matches!(decode_answer(&frame(TYPE_ANSWER, &[9, 0, 0])), Err(RelayError::Malformed(_))));
        assert!(matches!(decode_answer(&frame(TYPE_ANSWER, &[0, 0, 4, b'a'])), Err(RelayError::Malformed(_))));
        assert!(matches!(decode_answer(&frame(TYPE_ANSWER, &[0, 0, 1, 0xff])), Err(RelayError::Malformed(_))));
        assert!(matches!(decode_accept(&frame(TYPE_ACCEPT, &[0])), Err(RelayError::Malformed(_))));
    }

    #[test]
    fn each_side_refuses_frames_it_must_never_receive() {
        let mut accept = Vec::new();
        encode_accept(&mut accept);
        assert!(matches!(decode_hello(&accept), Err(RelayError::ProtocolViolation(_))));
        let mut answer = Vec::new();
        encode_answer(&Answer::new(RelayStatus::Ok, ""), &mut answer);
        assert!(matches!(decode_hello(&answer), Err(RelayError::ProtocolViolation(_))));
        assert!(matches!(decode_flow(&connect()), Err(RelayError::ProtocolViolation(_))));
        assert!(matches!(decode_answer(&connect()), Err(RelayError::ProtocolViolation(_))));
        assert!(matches!(decode_accept(&connect()), Err(RelayError::ProtocolViolation(_))));
    }

    #[test]
    fn encoders_refuse_bad_ids_and_cut_long_messages() {
        for bad in ["", "a b", "é", &"a".repeat(65)] {
            let mut out = Vec::new();
            assert!(encode_hello(&Hello::Connect { gateway_agent_id: bad.into() }, &mut out).is_err(), "{bad:?}");
            assert!(encode_flow(bad, &mut out).is_err());
            assert!(out.is_empty(), "nothing appended on error");
        }
        let long = "é".repeat(400);
        let answer = Answer::new(RelayStatus::Busy, long);
        assert!(answer.message.len() <= MAX_MESSAGE_LEN);
        let mut out = Vec::new();
        encode_answer(&answer, &mut out);
        assert!(out.len() <= MAX_FRAME_LEN);
        assert_eq!(decode_answer(&out).unwrap().unwrap().0, answer);
    }

    fn arb_status() -> impl Strategy<Value = RelayStatus> {
        (0u8..5).prop_map(|c| RelayStatus::from_code(c).unwrap())
    }

    proptest! {
        #[test]
        fn any_connect_round_trips(id in "[!-~]{1,64}") {
            let mut out = Vec::new();
            encode_hello(&Hello::Connect { gateway_agent_id: id.clone() }, &mut out).unwrap();
            prop_assert_eq!(decode_hello(&out).unwrap(), Some((Hello::Connect { gateway_agent_id: id }, out.len())));
        }

        #[test]
        fn any_answer_round_trips(status in arb_status(), message in ".{0,200}") {
            let answer = Answer::new(status, message);
            let mut out = Vec::new();
            encode_answer(&answer, &mut out);
            prop_assert_eq!(decode_answer(&out).unwrap(), Some((answer, out.len())));
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_never_over_consume(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            if let Ok(Some((_, n))) = decode_message(&bytes) {
                prop_assert!(n <= bytes.len() && n <= MAX_FRAME_LEN);
            }
        }

        #[test]
        fn valid_header_with_random_body_never_panics(ty in 0u8..7, body in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut buf = MAGIC.to_vec();
            buf.push(VERSION);
            buf.push(ty);
            buf.extend_from_slice(&(body.len() as u16).to_be_bytes());
            buf.extend_from_slice(&body);
            if let Ok(Some((_, n))) = decode_message(&buf) {
                prop_assert!(n <= buf.len());
            }
            let _ = (decode_hello(&buf), decode_answer(&buf), decode_flow(&buf), decode_accept(&buf));
        }
    }
}
