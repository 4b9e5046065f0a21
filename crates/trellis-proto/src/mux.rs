//! Version 2 of the stream protocol: many flows over one tunnel connection.
//!
//! Sans-IO. A tunnel connection (TLS between two agents, direct or through a
//! relay, which only copies bytes) starts with a 5-byte preface from each
//! side, `"TRLS" 2`, then carries frames:
//!
//! ```text
//! frame   = type u8 | flow u32 BE | body length u32 BE | body
//! OPEN          endpoint → gateway   body: an OpenRequest body (see `stream`)
//! OPEN_RESPONSE gateway → endpoint   body: an OpenResponse body
//! DATA          both ways            body: payload, 1..=MAX_DATA_LEN bytes
//! FIN           both ways            empty: the sender sends no more on this flow (TCP half-close)
//! RESET         both ways            empty: the flow is aborted, both ways
//! WINDOW        both ways            body: u32 BE, more bytes the sender of WINDOW may receive
//! ```
//!
//! Only the endpoint side opens flows, with increasing flow ids; a gateway
//! that sends OPEN is answered with RESET of that flow. Each side may send at
//! most [`INITIAL_WINDOW`] bytes of DATA on a flow beyond what the receiver
//! granted with WINDOW (a receiver may grant more than it read, which grows
//! the window, up to [`MAX_WINDOW`] of credit), so one flow's slow reader
//! never stalls another flow, and a flow's buffered bytes are bounded. Every error a frame can
//! carry is confined to its flow: lengths are always known, so an oversized,
//! unknown or malformed frame (an empty DATA frame is malformed too) is
//! skipped and only its flow is reset; the other flows of the connection go on.
//!
//! A version-1 peer (one flow per connection, [`crate::stream`]) sends
//! `"TRLS" 1` first: [`check_preface`] reports it, and a version-2 gateway
//! answers it with a version-1 `OpenResponse` (`BadRequest`, saying which
//! agent to upgrade), which a version-1 endpoint understands. A version-1
//! gateway answers a version-2 preface the same way, and a version-2 endpoint
//! reads that answer ([`check_preface`] then [`crate::stream::decode_open_response`]).

use crate::stream::{MAGIC, MAX_BODY_LEN, StreamError};

/// The protocol version of this module.
pub const VERSION: u8 = 2;
/// What each side sends first on a tunnel connection.
pub const PREFACE: [u8; 5] = [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], VERSION];
/// Bytes before a frame's body.
pub const FRAME_HEADER_LEN: usize = 9;
/// Largest DATA body.
pub const MAX_DATA_LEN: usize = 64 * 1024;
/// Largest body of any other frame.
pub const MAX_CONTROL_LEN: usize = MAX_BODY_LEN;
/// Bytes a side may send on a new flow before the receiver grants more.
/// Small enough that every flow of a connection together
/// ([`MAX_FLOWS_PER_CONNECTION`] × this = 16 MiB) fits the receiver's
/// per-connection buffer: slow readers never stop a connection from reading.
/// A receiver may grow a flow's window by granting more than was read.
pub const INITIAL_WINDOW: u32 = 256 * 1024;
/// The most a sender's window may grow to: WINDOW frames beyond it are capped.
pub const MAX_WINDOW: u64 = 16 * 1024 * 1024;
/// Flows one tunnel connection carries at once; an OPEN beyond it is refused
/// (an endpoint agent opens another connection).
pub const MAX_FLOWS_PER_CONNECTION: usize = 64;

/// Frame types.
pub const OPEN: u8 = 1;
pub const OPEN_RESPONSE: u8 = 2;
pub const DATA: u8 = 3;
pub const FIN: u8 = 4;
pub const RESET: u8 = 5;
pub const WINDOW: u8 = 6;

/// What the first bytes of a tunnel connection say about the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preface {
    /// Fewer than 5 bytes so far, all consistent with a preface.
    Incomplete,
    /// The peer speaks this version: frames follow.
    Version2,
    /// The peer speaks version 1: its bytes are a version-1 frame (not consumed).
    Version1,
}

/// Checks the first bytes of a tunnel connection.
pub fn check_preface(buf: &[u8]) -> Result<Preface, StreamError> {
    let seen = buf.len().min(MAGIC.len());
    if buf[..seen] != MAGIC[..seen] {
        return Err(StreamError::BadMagic);
    }
    match buf.get(4) {
        None => Ok(Preface::Incomplete),
        Some(&VERSION) => Ok(Preface::Version2),
        Some(&crate::stream::VERSION) => Ok(Preface::Version1),
        Some(&got) => Err(StreamError::UnsupportedVersion { got, supported: VERSION }),
    }
}

/// A frame's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub flow: u32,
    /// Body length as announced (not yet checked against the limits).
    pub len: u32,
}

impl Header {
    /// Whether the announced body exceeds what its type allows; such a
    /// frame's body is skipped and its flow reset.
    pub fn oversized(&self) -> bool {
        let max = if self.kind == DATA { MAX_DATA_LEN } else { MAX_CONTROL_LEN };
        self.len as usize > max
    }
}

/// Decodes a frame header from the start of `buf`, if complete.
pub fn decode_header(buf: &[u8]) -> Option<Header> {
    let b = buf.get(..FRAME_HEADER_LEN)?;
    Some(Header {
        kind: b[0],
        flow: u32::from_be_bytes([b[1], b[2], b[3], b[4]]),
        len: u32::from_be_bytes([b[5], b[6], b[7], b[8]]),
    })
}

/// Appends a frame header to `out`.
pub fn encode_header(kind: u8, flow: u32, len: usize, out: &mut Vec<u8>) {
    debug_assert!(len <= MAX_DATA_LEN);
    out.push(kind);
    out.extend_from_slice(&flow.to_be_bytes());
    // Bodies are bounded by MAX_DATA_LEN (< u32::MAX) by every encoder.
    out.extend_from_slice(&(len as u32).to_be_bytes());
}

/// Sets the body length of the frame whose header starts `frame` (a DATA
/// frame whose body was read after its header was written).
pub fn set_body_len(frame: &mut [u8], len: usize) {
    debug_assert!(len <= MAX_DATA_LEN);
    frame[5..FRAME_HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
}

/// Appends a whole control frame to `out`.
fn put(kind: u8, flow: u32, body: &[u8], out: &mut Vec<u8>) {
    encode_header(kind, flow, body.len(), out);
    out.extend_from_slice(body);
}

/// Appends an OPEN frame; nothing is appended on error.
pub fn encode_open(flow: u32, req: &crate::stream::OpenRequest, out: &mut Vec<u8>) -> Result<(), StreamError> {
    let mut body = Vec::with_capacity(160);
    crate::stream::encode_open_request_body(req, &mut body)?;
    put(OPEN, flow, &body, out);
    Ok(())
}

/// Appends an OPEN_RESPONSE frame.
pub fn encode_open_response(flow: u32, resp: &crate::stream::OpenResponse, out: &mut Vec<u8>) {
    let mut body = Vec::with_capacity(3 + resp.message.len());
    crate::stream::encode_open_response_body(resp, &mut body);
    put(OPEN_RESPONSE, flow, &body, out);
}

/// Appends a FIN frame.
pub fn encode_fin(flow: u32, out: &mut Vec<u8>) {
    put(FIN, flow, &[], out);
}

/// Appends a RESET frame.
pub fn encode_reset(flow: u32, out: &mut Vec<u8>) {
    put(RESET, flow, &[], out);
}

/// Appends a WINDOW frame granting `more` bytes.
pub fn encode_window(flow: u32, more: u32, out: &mut Vec<u8>) {
    put(WINDOW, flow, &more.to_be_bytes(), out);
}

/// A control frame's meaning (every type but DATA).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    Open(crate::stream::OpenRequest),
    OpenResponse(crate::stream::OpenResponse),
    Fin,
    Reset,
    Window(u32),
}

/// Parses a control frame's body (`header.kind != DATA`, body complete and
/// within [`MAX_CONTROL_LEN`]).
pub fn parse_control(kind: u8, body: &[u8]) -> Result<Control, StreamError> {
    match kind {
        OPEN => crate::stream::parse_open_request(body).map(Control::Open),
        OPEN_RESPONSE => crate::stream::parse_open_response(body).map(Control::OpenResponse),
        FIN | RESET if !body.is_empty() => Err(StreamError::Malformed("FIN and RESET frames have no body")),
        FIN => Ok(Control::Fin),
        RESET => Ok(Control::Reset),
        WINDOW => match <[u8; 4]>::try_from(body) {
            Ok(b) if u32::from_be_bytes(b) > 0 => Ok(Control::Window(u32::from_be_bytes(b))),
            _ => Err(StreamError::Malformed("a WINDOW body is a non-zero u32")),
        },
        other => Err(StreamError::UnknownFrameType(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{OpenRequest, OpenResponse, OpenStatus};
    use proptest::prelude::*;

    fn request() -> OpenRequest {
        OpenRequest {
            vpc_endpoint_id: "vpce-0123456789abcdef0".into(),
            resource_configuration_id: "rcfg-0123456789abcdef0".into(),
            port: 5432,
            client_addr: "10.1.2.3:40000".parse().unwrap(),
        }
    }

    fn control(buf: &[u8]) -> (Header, Control) {
        let h = decode_header(buf).unwrap();
        (h, parse_control(h.kind, &buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + h.len as usize]).unwrap())
    }

    #[test]
    fn control_frames_round_trip() {
        let mut buf = Vec::new();
        encode_open(7, &request(), &mut buf).unwrap();
        assert_eq!(
            control(&buf),
            (Header { kind: OPEN, flow: 7, len: (buf.len() - 9) as u32 }, Control::Open(request()))
        );
        let resp = OpenResponse::new(OpenStatus::Denied, "no");
        for (frame, want) in [
            (
                {
                    let mut b = Vec::new();
                    encode_open_response(3, &resp, &mut b);
                    b
                },
                Control::OpenResponse(resp.clone()),
            ),
            (
                {
                    let mut b = Vec::new();
                    encode_fin(3, &mut b);
                    b
                },
                Control::Fin,
            ),
            (
                {
                    let mut b = Vec::new();
                    encode_reset(3, &mut b);
                    b
                },
                Control::Reset,
            ),
            (
                {
                    let mut b = Vec::new();
                    encode_window(3, 77, &mut b);
                    b
                },
                Control::Window(77),
            ),
        ] {
            let (h, c) = control(&frame);
            assert_eq!((h.flow, c), (3, want));
        }
    }

    #[test]
    fn preface_tells_the_versions_apart() {
        assert_eq!(check_preface(b""), Ok(Preface::Incomplete));
        assert_eq!(check_preface(b"TRL"), Ok(Preface::Incomplete));
        assert_eq!(check_preface(&PREFACE), Ok(Preface::Version2));
        let mut v1 = Vec::new();
        crate::stream::encode_open_request(&request(), &mut v1).unwrap();
        assert_eq!(check_preface(&v1), Ok(Preface::Version1));
        assert_eq!(check_preface(b"GET /"), Err(StreamError::BadMagic));
        assert_eq!(check_preface(b"TRLS\x09"), Err(StreamError::UnsupportedVersion { got: 9, supported: VERSION }));
    }

    #[test]
    fn a_version_1_gateway_refuses_the_preface_with_a_clear_message() {
        // What a version-1 gateway's decoder makes of a version-2 preface.
        let err = crate::stream::decode_message(&PREFACE).unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn oversized_frames_are_recognised_from_the_header() {
        assert!(Header { kind: DATA, flow: 1, len: MAX_DATA_LEN as u32 + 1 }.oversized());
        assert!(!Header { kind: DATA, flow: 1, len: MAX_DATA_LEN as u32 }.oversized());
        assert!(Header { kind: OPEN, flow: 1, len: MAX_CONTROL_LEN as u32 + 1 }.oversized());
        assert!(Header { kind: 99, flow: 1, len: u32::MAX }.oversized());
    }

    #[test]
    fn malformed_control_bodies_are_errors_not_panics() {
        assert!(parse_control(WINDOW, &[0, 0, 0, 0]).is_err());
        assert!(parse_control(WINDOW, &[1]).is_err());
        assert!(parse_control(FIN, &[1]).is_err());
        assert_eq!(parse_control(42, &[]), Err(StreamError::UnknownFrameType(42)));
    }

    proptest! {
        #[test]
        fn arbitrary_control_bodies_never_panic(kind in 0u8..10, body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_control(kind, &body);
        }

        #[test]
        fn headers_round_trip(kind in any::<u8>(), flow in any::<u32>(), len in 0usize..=MAX_DATA_LEN) {
            let mut buf = Vec::new();
            encode_header(kind, flow, len, &mut buf);
            prop_assert_eq!(decode_header(&buf), Some(Header { kind, flow, len: len as u32 }));
            prop_assert_eq!(decode_header(&buf[..FRAME_HEADER_LEN - 1]), None);
        }
    }
}
