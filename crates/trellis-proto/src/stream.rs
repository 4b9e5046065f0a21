//! The stream protocol spoken on every tunnel connection between an endpoint
//! agent (the consumer side, which always opens) and a gateway agent (which
//! only accepts).
//!
//! This module is version 1 of the protocol and the bodies every version
//! shares. Agents now speak version 2 ([`crate::mux`]: many flows over one
//! tunnel connection, the same open request and response bodies); version 1's
//! framing stays here so that a version-2 agent can recognise a version-1
//! peer and answer it with a refusal it understands.
//!
//! Sans-IO: functions take and return bytes; no sockets, no clock. The exchange
//! is one frame each way, then raw bytes:
//!
//! ```text
//! endpoint ──► gateway   OpenRequest  {vpc_endpoint_id, resource_configuration_id, port, client_addr}
//! endpoint ◄── gateway   OpenResponse {status, message}
//! endpoint ◄─► gateway   raw TCP payload, both ways, with half-close
//! ```
//!
//! Every frame is `magic "TRLS" | version u8 | type u8 | body length u16 BE | body`.
//! Bodies are bounded ([`MAX_BODY_LEN`]), so a peer can never make a decoder
//! buffer more than [`MAX_FRAME_LEN`] bytes. Decoders return `Ok(None)` while a
//! frame is incomplete and reject a bad prefix (wrong magic, unknown version)
//! as soon as the bytes that prove it have arrived.
//!
//! Direction is part of the protocol: a gateway that receives anything but an
//! `OpenRequest`, or an endpoint that receives an `OpenRequest` (a gateway
//! trying to open a stream toward the consumer), gets
//! [`StreamError::ProtocolViolation`] and must close the connection.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::frame::{self, Framing, HeaderError, Malformed, Reader};

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"TRLS";
/// The version of this module's framing (one flow per connection).
pub const VERSION: u8 = 1;
/// Bytes before the body: magic, version, type, body length.
pub const HEADER_LEN: usize = frame::HEADER_LEN;
/// Largest body any frame of this version may carry.
pub const MAX_BODY_LEN: usize = 1024;
/// Largest frame, header included; a decoder never needs more buffered.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_BODY_LEN;
/// Longest endpoint or resource configuration id, in bytes.
pub const MAX_ID_LEN: usize = 64;
/// Longest human-readable message in an [`OpenResponse`], in bytes (UTF-8).
pub const MAX_MESSAGE_LEN: usize = 512;

const TYPE_OPEN_REQUEST: u8 = 1;
const TYPE_OPEN_RESPONSE: u8 = 2;
const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

/// Sent by the endpoint agent as the first bytes of a tunnel connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OpenRequest {
    /// The consumer's VPC endpoint (`vpce-…`) the client connected to.
    pub vpc_endpoint_id: String,
    /// The resource configuration (`rcfg-…`) the client wants.
    pub resource_configuration_id: String,
    /// Destination port on the resource; the endpoint listens on the same one.
    pub port: u16,
    /// The client's address as the endpoint agent saw it (for logs and PROXY protocol).
    pub client_addr: SocketAddr,
}

/// Outcome of an open request, decided by the gateway agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpenStatus {
    /// The target accepted the connection; raw bytes follow.
    Ok,
    /// The endpoint may not reach this resource or port (not shared, revoked, unknown peer).
    Denied,
    /// The target refused the connection or could not be resolved.
    Unreachable,
    /// The target did not answer in time.
    Timeout,
    /// The request could not be understood (malformed, unsupported version).
    BadRequest,
}

impl OpenStatus {
    fn code(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::Denied => 1,
            Self::Unreachable => 2,
            Self::Timeout => 3,
            Self::BadRequest => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::Ok,
            1 => Self::Denied,
            2 => Self::Unreachable,
            3 => Self::Timeout,
            4 => Self::BadRequest,
            _ => return None,
        })
    }

    /// Lower-case name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Denied => "denied",
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
            Self::BadRequest => "bad_request",
        }
    }
}

impl fmt::Display for OpenStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The gateway's answer to an [`OpenRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OpenResponse {
    pub status: OpenStatus,
    /// Why, for humans; empty on success. At most [`MAX_MESSAGE_LEN`] bytes.
    pub message: String,
}

impl OpenResponse {
    /// A response with `message` cut to [`MAX_MESSAGE_LEN`] bytes at a character boundary.
    pub fn new(status: OpenStatus, message: impl Into<String>) -> Self {
        Self { status, message: frame::cut_message(message, MAX_MESSAGE_LEN) }
    }
}

/// Any frame of the protocol.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Message {
    OpenRequest(OpenRequest),
    OpenResponse(OpenResponse),
}

impl Message {
    fn kind(&self) -> &'static str {
        match self {
            Self::OpenRequest(_) => "OpenRequest",
            Self::OpenResponse(_) => "OpenResponse",
        }
    }
}

/// Why bytes could not be decoded, or a message could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The first bytes are not the protocol magic: the peer does not speak Trellis.
    #[error("the peer does not speak the Trellis stream protocol (bad magic bytes)")]
    BadMagic,
    /// The peer speaks a protocol version this build does not know.
    #[error(
        "the peer speaks stream protocol version {got}, this agent speaks version {supported}; upgrade the older agent"
    )]
    UnsupportedVersion { got: u8, supported: u8 },
    /// A frame type this version does not define.
    #[error("unknown stream frame type {0}")]
    UnknownFrameType(u8),
    /// A frame announces a body larger than [`MAX_BODY_LEN`].
    #[error("stream frame body of {0} bytes exceeds the limit of {MAX_BODY_LEN}")]
    FrameTooLarge(usize),
    /// The body does not match its type's layout.
    #[error("malformed stream frame: {0}")]
    Malformed(&'static str),
    /// A frame that this side must never receive (only the consumer side opens).
    #[error("protocol violation: {0}")]
    ProtocolViolation(String),
    /// An id given to an encoder is empty, longer than [`MAX_ID_LEN`] or not printable ASCII.
    #[error("invalid id {0:?}: ids are 1-{MAX_ID_LEN} printable ASCII characters")]
    InvalidId(String),
}

const FRAMING: Framing =
    Framing { magic: MAGIC, version: VERSION, types: TYPE_OPEN_REQUEST..=TYPE_OPEN_RESPONSE, max_body: MAX_BODY_LEN };

impl From<HeaderError> for StreamError {
    fn from(e: HeaderError) -> Self {
        match e {
            HeaderError::BadMagic => Self::BadMagic,
            HeaderError::UnsupportedVersion(got) => Self::UnsupportedVersion { got, supported: VERSION },
            HeaderError::UnknownFrameType(t) => Self::UnknownFrameType(t),
            HeaderError::FrameTooLarge(n) => Self::FrameTooLarge(n),
        }
    }
}

impl From<Malformed> for StreamError {
    fn from(Malformed(what): Malformed) -> Self {
        Self::Malformed(what)
    }
}

/// Appends an [`OpenRequest`] frame to `out`; nothing is appended on error.
pub fn encode_open_request(req: &OpenRequest, out: &mut Vec<u8>) -> Result<(), StreamError> {
    let mut body = Vec::with_capacity(2 + 2 * MAX_ID_LEN + 2 + 19);
    encode_open_request_body(req, &mut body)?;
    FRAMING.put(out, TYPE_OPEN_REQUEST, &body);
    Ok(())
}

/// Appends the body of an [`OpenRequest`] (the same in every protocol
/// version) to `out`; nothing is appended on error.
pub fn encode_open_request_body(req: &OpenRequest, body: &mut Vec<u8>) -> Result<(), StreamError> {
    for id in [&req.vpc_endpoint_id, &req.resource_configuration_id] {
        if !frame::valid_id(id.as_bytes(), MAX_ID_LEN) {
            return Err(StreamError::InvalidId(id.clone()));
        }
    }
    for id in [&req.vpc_endpoint_id, &req.resource_configuration_id] {
        body.push(id.len() as u8);
        body.extend_from_slice(id.as_bytes());
    }
    body.extend_from_slice(&req.port.to_be_bytes());
    match req.client_addr.ip() {
        IpAddr::V4(ip) => {
            body.push(FAMILY_V4);
            body.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            body.push(FAMILY_V6);
            body.extend_from_slice(&ip.octets());
        }
    }
    body.extend_from_slice(&req.client_addr.port().to_be_bytes());
    Ok(())
}

/// Appends an [`OpenResponse`] frame to `out`. A message longer than
/// [`MAX_MESSAGE_LEN`] is cut at a character boundary.
pub fn encode_open_response(resp: &OpenResponse, out: &mut Vec<u8>) {
    let mut body = Vec::with_capacity(3 + resp.message.len().min(MAX_MESSAGE_LEN));
    encode_open_response_body(resp, &mut body);
    FRAMING.put(out, TYPE_OPEN_RESPONSE, &body);
}

/// Appends the body of an [`OpenResponse`] (the same in every protocol
/// version) to `out`, its message cut to [`MAX_MESSAGE_LEN`] bytes.
pub fn encode_open_response_body(resp: &OpenResponse, body: &mut Vec<u8>) {
    let resp = OpenResponse::new(resp.status, resp.message.as_str());
    body.push(resp.status.code());
    body.extend_from_slice(&(resp.message.len() as u16).to_be_bytes());
    body.extend_from_slice(resp.message.as_bytes());
}

/// Decodes one frame of any type from the start of `buf`.
///
/// `Ok(None)`: more bytes are needed. `Ok(Some((msg, consumed)))`: the frame
/// used `consumed` bytes; anything after them is stream payload.
pub fn decode_message(buf: &[u8]) -> Result<Option<(Message, usize)>, StreamError> {
    let Some((frame_type, body)) = FRAMING.split(buf)? else {
        return Ok(None);
    };
    let msg = match frame_type {
        TYPE_OPEN_REQUEST => Message::OpenRequest(parse_open_request(body)?),
        _ => Message::OpenResponse(parse_open_response(body)?),
    };
    Ok(Some((msg, HEADER_LEN + body.len())))
}

/// Decodes the first frame a gateway receives, which must be an [`OpenRequest`].
pub fn decode_open_request(buf: &[u8]) -> Result<Option<(OpenRequest, usize)>, StreamError> {
    match decode_message(buf)? {
        None => Ok(None),
        Some((Message::OpenRequest(req), n)) => Ok(Some((req, n))),
        Some((other, _)) => Err(StreamError::ProtocolViolation(format!(
            "the gateway side received {} where only an OpenRequest is allowed",
            other.kind()
        ))),
    }
}

/// Decodes the frame an endpoint receives after its request, which must be an
/// [`OpenResponse`]; an [`OpenRequest`] means the gateway tried to open a stream.
pub fn decode_open_response(buf: &[u8]) -> Result<Option<(OpenResponse, usize)>, StreamError> {
    match decode_message(buf)? {
        None => Ok(None),
        Some((Message::OpenResponse(resp), n)) => Ok(Some((resp, n))),
        Some((other, _)) => Err(StreamError::ProtocolViolation(format!(
            "the endpoint side received {}: a gateway may never open a stream toward the consumer",
            other.kind()
        ))),
    }
}

/// Parses the body of an [`OpenRequest`].
pub fn parse_open_request(body: &[u8]) -> Result<OpenRequest, StreamError> {
    let mut r = Reader::new(body);
    let vpc_endpoint_id = r.id(MAX_ID_LEN, "vpc endpoint id")?;
    let resource_configuration_id = r.id(MAX_ID_LEN, "resource configuration id")?;
    let port = r.u16("port")?;
    if port == 0 {
        return Err(StreamError::Malformed("port 0"));
    }
    let ip = match r.u8("client address family")? {
        FAMILY_V4 => {
            let b = r.take(4, "client IPv4 address")?;
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        }
        FAMILY_V6 => {
            let b = r.take(16, "client IPv6 address")?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(b);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return Err(StreamError::Malformed("client address family")),
    };
    let client_port = r.u16("client port")?;
    r.finish()?;
    Ok(OpenRequest { vpc_endpoint_id, resource_configuration_id, port, client_addr: SocketAddr::new(ip, client_port) })
}

/// Parses the body of an [`OpenResponse`].
pub fn parse_open_response(body: &[u8]) -> Result<OpenResponse, StreamError> {
    let mut r = Reader::new(body);
    let status = OpenStatus::from_code(r.u8("status")?).ok_or(StreamError::Malformed("unknown status code"))?;
    let len = usize::from(r.u16("message length")?);
    if len > MAX_MESSAGE_LEN {
        return Err(StreamError::Malformed("message longer than the limit"));
    }
    let bytes = r.take(len, "message")?;
    let message = std::str::from_utf8(bytes).map_err(|_| StreamError::Malformed("message is not UTF-8"))?.to_string();
    r.finish()?;
    Ok(OpenResponse { status, message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request() -> OpenRequest {
        OpenRequest {
            vpc_endpoint_id: "vpce-0123456789abcdef0".into(),
            resource_configuration_id: "rcfg-0123456789abcdef0".into(),
            port: 5432,
            client_addr: "10.1.2.3:40000".parse().unwrap(),
        }
    }

    fn encoded_request() -> Vec<u8> {
        let mut out = Vec::new();
        encode_open_request(&request(), &mut out).unwrap();
        out
    }

    #[test]
    fn request_round_trips_and_leaves_payload_alone() {
        let mut buf = encoded_request();
        let frame_len = buf.len();
        buf.extend_from_slice(b"payload");
        let (req, used) = decode_open_request(&buf).unwrap().unwrap();
        assert_eq!(req, request());
        assert_eq!(used, frame_len);
        assert_eq!(&buf[used..], b"payload");
    }

    #[test]
    fn every_strict_prefix_needs_more_bytes() {
        let buf = encoded_request();
        for cut in 0..buf.len() {
            assert_eq!(decode_open_request(&buf[..cut]), Ok(None), "prefix of {cut} bytes");
        }
    }

    #[test]
    fn unknown_version_is_reported_as_such() {
        let mut buf = encoded_request();
        buf[4] = 9;
        assert_eq!(decode_message(&buf[..5]), Err(StreamError::UnsupportedVersion { got: 9, supported: VERSION }));
    }

    #[test]
    fn wrong_magic_fails_on_the_first_byte() {
        assert_eq!(decode_message(b"G"), Err(StreamError::BadMagic));
        assert_eq!(decode_message(b"GET / HTTP/1.1\r\n"), Err(StreamError::BadMagic));
    }

    #[test]
    fn oversized_body_is_refused_before_it_arrives() {
        let mut buf = MAGIC.to_vec();
        buf.extend_from_slice(&[VERSION, TYPE_OPEN_REQUEST, 0xff, 0xff]);
        assert_eq!(decode_message(&buf), Err(StreamError::FrameTooLarge(0xffff)));
    }

    #[test]
    fn gateway_rejects_a_response_frame() {
        let mut buf = Vec::new();
        encode_open_response(&OpenResponse::new(OpenStatus::Ok, ""), &mut buf);
        assert!(matches!(decode_open_request(&buf), Err(StreamError::ProtocolViolation(_))));
    }

    #[test]
    fn endpoint_rejects_a_gateway_trying_to_open() {
        assert!(matches!(decode_open_response(&encoded_request()), Err(StreamError::ProtocolViolation(_))));
    }

    #[test]
    fn encoder_refuses_bad_ids() {
        let mut out = Vec::new();
        for bad in [String::new(), "x".repeat(MAX_ID_LEN + 1), "vpce-é".into(), "vpce 1".into()] {
            let req = OpenRequest { vpc_endpoint_id: bad, ..request() };
            assert!(matches!(encode_open_request(&req, &mut out), Err(StreamError::InvalidId(_))));
        }
        assert!(out.is_empty());
    }

    #[test]
    fn decoder_refuses_ids_that_are_not_ascii() {
        let mut buf = encoded_request();
        buf[HEADER_LEN + 1] = 0xc3;
        assert_eq!(decode_message(&buf), Err(StreamError::Malformed("vpc endpoint id")));
    }

    #[test]
    fn long_messages_are_cut_at_a_char_boundary() {
        let resp = OpenResponse::new(OpenStatus::Denied, "é".repeat(MAX_MESSAGE_LEN));
        assert!(resp.message.len() <= MAX_MESSAGE_LEN);
        let mut buf = Vec::new();
        encode_open_response(&resp, &mut buf);
        assert_eq!(decode_open_response(&buf).unwrap().unwrap().0, resp);
    }

    fn arb_id() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[!-~]{1,64}").unwrap()
    }

    fn arb_request() -> impl Strategy<Value = OpenRequest> {
        (arb_id(), arb_id(), 1u16.., any::<IpAddr>(), any::<u16>()).prop_map(|(e, r, port, ip, client_port)| {
            OpenRequest {
                vpc_endpoint_id: e,
                resource_configuration_id: r,
                port,
                client_addr: SocketAddr::new(ip, client_port),
            }
        })
    }

    fn arb_status() -> impl Strategy<Value = OpenStatus> {
        prop_oneof![
            Just(OpenStatus::Ok),
            Just(OpenStatus::Denied),
            Just(OpenStatus::Unreachable),
            Just(OpenStatus::Timeout),
            Just(OpenStatus::BadRequest),
        ]
    }

    proptest! {
        #[test]
        fn any_request_round_trips(req in arb_request(), tail in proptest::collection::vec(any::<u8>(), 0..32)) {
            let mut buf = Vec::new();
            encode_open_request(&req, &mut buf).unwrap();
            let len = buf.len();
            buf.extend_from_slice(&tail);
            prop_assert_eq!(decode_open_request(&buf).unwrap(), Some((req, len)));
        }

        #[test]
        fn any_response_round_trips(status in arb_status(), message in ".{0,200}") {
            let resp = OpenResponse::new(status, message);
            let mut buf = Vec::new();
            encode_open_response(&resp, &mut buf);
            prop_assert_eq!(decode_open_response(&buf).unwrap(), Some((resp, buf.len())));
        }

        #[test]
        fn any_split_point_decodes_the_same(req in arb_request(), cut in any::<prop::sample::Index>()) {
            let mut buf = Vec::new();
            encode_open_request(&req, &mut buf).unwrap();
            let cut = cut.index(buf.len() + 1);
            // Feeding a prefix then the whole buffer, as a reader does, yields the same frame.
            if cut < buf.len() {
                prop_assert_eq!(decode_open_request(&buf[..cut]).unwrap(), None);
            }
            prop_assert_eq!(decode_open_request(&buf).unwrap(), Some((req, buf.len())));
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_never_over_consume(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            if let Ok(Some((_, n))) = decode_message(&bytes) {
                prop_assert!(n <= bytes.len() && n <= MAX_FRAME_LEN);
            }
            let _ = decode_open_request(&bytes);
            let _ = decode_open_response(&bytes);
        }

        #[test]
        fn valid_header_with_random_body_never_panics(ty in 0u8..4, body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = MAGIC.to_vec();
            buf.push(VERSION);
            buf.push(ty);
            buf.extend_from_slice(&(body.len() as u16).to_be_bytes());
            buf.extend_from_slice(&body);
            if let Ok(Some((msg, n))) = decode_message(&buf) {
                prop_assert_eq!(n, buf.len());
                // Whatever decodes re-encodes to the same bytes: the format has one spelling.
                let mut again = Vec::new();
                match &msg {
                    Message::OpenRequest(r) => encode_open_request(r, &mut again).unwrap(),
                    Message::OpenResponse(r) => encode_open_response(r, &mut again),
                }
                prop_assert_eq!(again, buf);
            }
        }
    }
}
