//! The framing the stream protocol's version 1 ([`crate::stream`]) and the
//! relay protocol ([`crate::relay`]) share: `magic [4] | version u8 | type u8 |
//! body length u16 BE | body`, bodies bounded per protocol, and the body
//! cursor their decoders read ids, numbers and messages with.
//!
//! Each protocol keeps its own magic, version, frame types, bound and error
//! type; this module reports in its own small errors, which each protocol
//! turns into its own (so a peer's bad bytes read the same as before).

use std::ops::RangeInclusive;

/// Bytes before the body: magic, version, type, body length.
pub(crate) const HEADER_LEN: usize = 8;

/// One protocol's framing.
pub(crate) struct Framing {
    pub magic: [u8; 4],
    pub version: u8,
    /// The frame types this version defines.
    pub types: RangeInclusive<u8>,
    /// Largest body (below `u16::MAX`).
    pub max_body: usize,
}

/// Why a frame's header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeaderError {
    BadMagic,
    UnsupportedVersion(u8),
    UnknownFrameType(u8),
    FrameTooLarge(usize),
}

impl Framing {
    /// Appends a frame; `body` is at most `max_body` bytes (every encoder bounds it).
    pub fn put(&self, out: &mut Vec<u8>, frame_type: u8, body: &[u8]) {
        debug_assert!(body.len() <= self.max_body);
        out.extend_from_slice(&self.magic);
        out.push(self.version);
        out.push(frame_type);
        // Bodies are bounded by max_body (< u16::MAX) by every encoder.
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
    }

    /// The type and body of the frame at the start of `buf`; `Ok(None)` while
    /// it is incomplete. A bad prefix is refused as soon as the bytes that
    /// prove it have arrived, so a decoder never buffers more than
    /// `HEADER_LEN + max_body` bytes.
    pub fn split<'a>(&self, buf: &'a [u8]) -> Result<Option<(u8, &'a [u8])>, HeaderError> {
        let magic_seen = buf.len().min(self.magic.len());
        if buf[..magic_seen] != self.magic[..magic_seen] {
            return Err(HeaderError::BadMagic);
        }
        let Some(&version) = buf.get(4) else { return Ok(None) };
        if version != self.version {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        let Some(&frame_type) = buf.get(5) else { return Ok(None) };
        if !self.types.contains(&frame_type) {
            return Err(HeaderError::UnknownFrameType(frame_type));
        }
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let body_len = usize::from(u16::from_be_bytes([buf[6], buf[7]]));
        if body_len > self.max_body {
            return Err(HeaderError::FrameTooLarge(body_len));
        }
        Ok(buf.get(HEADER_LEN..HEADER_LEN + body_len).map(|body| (frame_type, body)))
    }
}

/// Whether `id` is 1 to `max_len` printable ASCII characters.
pub(crate) fn valid_id(id: &[u8], max_len: usize) -> bool {
    !id.is_empty() && id.len() <= max_len && id.iter().all(|b| b.is_ascii_graphic())
}

/// `message` cut to at most `max_len` bytes at a character boundary.
pub(crate) fn cut_message(message: impl Into<String>, max_len: usize) -> String {
    let mut message = message.into();
    if message.len() > max_len {
        let mut cut = max_len;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    message
}

/// A body that does not match its frame type's layout: what was expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Malformed(pub &'static str);

/// A cursor over a frame body that fails with [`Malformed`] on underrun.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(Malformed(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, Malformed> {
        Ok(self.take(1, what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, Malformed> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A length-prefixed id (see [`valid_id`]).
    pub fn id(&mut self, max_len: usize, what: &'static str) -> Result<String, Malformed> {
        let len = usize::from(self.u8(what)?);
        let bytes = self.take(len, what)?;
        if !valid_id(bytes, max_len) {
            return Err(Malformed(what));
        }
        // valid_id admits only ASCII, which is UTF-8.
        Ok(bytes.iter().map(|&b| char::from(b)).collect())
    }

    /// Fails unless the whole body was read.
    pub fn finish(&self) -> Result<(), Malformed> {
        if self.buf.is_empty() { Ok(()) } else { Err(Malformed("trailing bytes in the frame body")) }
    }
}
