//! PROXY protocol version 2 (haproxy's proxy-protocol.txt, §2.2): the header a
//! gateway sends to a target before any byte of the client's, so the target
//! learns the consumer's client address and who is calling.
//!
//! TLVs: AWS's `0xEA` with subtype `0x01` = the VPC endpoint id (what
//! AWS-aware backends already parse), and Trellis's `0xE0` built the same way
//! (one subtype byte, then text): `0x01` consumer account id, `0x02` consumer
//! VPC id, `0x03` the endpoint service or resource configuration id.

use std::net::{IpAddr, SocketAddr};

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
/// Version 2, command PROXY.
const VERSION_PROXY: u8 = 0x21;
const TCP_OVER_IPV4: u8 = 0x11;
const TCP_OVER_IPV6: u8 = 0x21;
/// AWS's TLV type; its subtype 0x01 carries the VPC endpoint id.
pub const TLV_AWS: u8 = 0xEA;
pub const AWS_VPCE_ID: u8 = 0x01;
/// Trellis's TLV type and subtypes.
pub const TLV_TRELLIS: u8 = 0xE0;
pub const TRELLIS_ACCOUNT_ID: u8 = 0x01;
pub const TRELLIS_VPC_ID: u8 = 0x02;
pub const TRELLIS_TARGET_ID: u8 = 0x03;
/// The standard `PP2_TYPE_UNIQUE_ID` (at most 128 bytes, no subtype): what
/// proxies without custom-TLV support (haproxy's `fc_pp_unique_id`) can log.
pub const TLV_UNIQUE_ID: u8 = 0x05;

/// Who is calling, as the target is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller<'a> {
    /// The consumer's client (source of the connection).
    pub client: SocketAddr,
    /// The address the gateway dialed (destination of the connection).
    pub target: SocketAddr,
    pub vpc_endpoint_id: &'a str,
    pub consumer_account_id: &'a str,
    pub consumer_vpc_id: &'a str,
    /// The endpoint service or resource configuration reached.
    pub target_id: &'a str,
    /// This gateway's number for the connection (unique while it runs).
    pub connection: u64,
}

fn mapped(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn tlv(out: &mut Vec<u8>, kind: u8, subtype: u8, text: &str) {
    // Ids are short ASCII; anything longer than a TLV can hold is cut, never wrapped.
    let bytes = &text.as_bytes()[..text.len().min(u16::MAX as usize - 1)];
    out.push(kind);
    out.extend_from_slice(&((bytes.len() + 1) as u16).to_be_bytes());
    out.push(subtype);
    out.extend_from_slice(bytes);
}

/// The v2 header for `caller`. Both addresses are sent as IPv4 when both are
/// IPv4, else both as IPv6 (IPv4 ones mapped), as the format requires one family.
pub fn encode(caller: &Caller<'_>) -> Vec<u8> {
    let mut body = Vec::with_capacity(128);
    let family = match (caller.client.ip(), caller.target.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            body.extend_from_slice(&src.octets());
            body.extend_from_slice(&dst.octets());
            TCP_OVER_IPV4
        }
        (src, dst) => {
            body.extend_from_slice(&mapped(src).octets());
            body.extend_from_slice(&mapped(dst).octets());
            TCP_OVER_IPV6
        }
    };
    body.extend_from_slice(&caller.client.port().to_be_bytes());
    body.extend_from_slice(&caller.target.port().to_be_bytes());
    tlv(&mut body, TLV_AWS, AWS_VPCE_ID, caller.vpc_endpoint_id);
    tlv(&mut body, TLV_TRELLIS, TRELLIS_ACCOUNT_ID, caller.consumer_account_id);
    tlv(&mut body, TLV_TRELLIS, TRELLIS_VPC_ID, caller.consumer_vpc_id);
    tlv(&mut body, TLV_TRELLIS, TRELLIS_TARGET_ID, caller.target_id);
    // `<account> <endpoint> <connection>`: ids are short ASCII, so it fits the 128 bytes the spec allows.
    let unique = format!("{} {} {:x}", caller.consumer_account_id, caller.vpc_endpoint_id, caller.connection);
    let unique = &unique.as_bytes()[..unique.len().min(128)];
    body.push(TLV_UNIQUE_ID);
    body.extend_from_slice(&(unique.len() as u16).to_be_bytes());
    body.extend_from_slice(unique);
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_PROXY);
    out.push(family);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// A header as a target reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// (type, value) of every TLV, in order.
    pub tlvs: Vec<(u8, Vec<u8>)>,
    /// Bytes the header took.
    pub len: usize,
}

impl Decoded {
    /// The text of the TLV `kind` whose first value byte is `subtype`.
    pub fn text(&self, kind: u8, subtype: u8) -> Option<&str> {
        self.tlvs
            .iter()
            .find(|(k, v)| *k == kind && v.first() == Some(&subtype))
            .and_then(|(_, v)| std::str::from_utf8(&v[1..]).ok())
    }
}

/// Why bytes are not a v2 PROXY header.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("more bytes are needed")]
    Incomplete,
    #[error("not a PROXY protocol v2 header: {0}")]
    Invalid(&'static str),
}

/// Reads a v2 PROXY/TCP header from the start of `bytes` (for tests and
/// tools; a target implements its own).
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    if bytes.len() < 16 {
        return Err(if SIGNATURE.starts_with(&bytes[..bytes.len().min(12)]) {
            DecodeError::Incomplete
        } else {
            DecodeError::Invalid("bad signature")
        });
    }
    if bytes[..12] != SIGNATURE {
        return Err(DecodeError::Invalid("bad signature"));
    }
    if bytes[12] != VERSION_PROXY {
        return Err(DecodeError::Invalid("not version 2 PROXY"));
    }
    let len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    let body = bytes.get(16..16 + len).ok_or(DecodeError::Incomplete)?;
    let (source, destination, mut rest) = match bytes[13] {
        TCP_OVER_IPV4 if body.len() >= 12 => {
            let ip = |b: &[u8]| IpAddr::from([b[0], b[1], b[2], b[3]]);
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            (
                SocketAddr::new(ip(&body[0..4]), port(&body[8..10])),
                SocketAddr::new(ip(&body[4..8]), port(&body[10..12])),
                &body[12..],
            )
        }
        TCP_OVER_IPV6 if body.len() >= 36 => {
            let ip = |b: &[u8]| {
                let octets: [u8; 16] = b.try_into().expect("16 bytes sliced");
                IpAddr::from(octets)
            };
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            (
                SocketAddr::new(ip(&body[0..16]), port(&body[32..34])),
                SocketAddr::new(ip(&body[16..32]), port(&body[34..36])),
                &body[36..],
            )
        }
        _ => return Err(DecodeError::Invalid("not TCP over IPv4 or IPv6, or too short")),
    };
    let mut tlvs = Vec::new();
    while !rest.is_empty() {
        if rest.len() < 3 {
            return Err(DecodeError::Invalid("truncated TLV"));
        }
        let n = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        let value = rest.get(3..3 + n).ok_or(DecodeError::Invalid("TLV longer than the header"))?;
        tlvs.push((rest[0], value.to_vec()));
        rest = &rest[3 + n..];
    }
    Ok(Decoded { source, destination, tlvs, len: 16 + len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn caller(client: &str, target: &str) -> Caller<'static> {
        Caller {
            client: client.parse().unwrap(),
            target: target.parse().unwrap(),
            vpc_endpoint_id: "vpce-0123456789abcdef0",
            consumer_account_id: "acct-905337148260",
            consumer_vpc_id: "vpc-0d4c3b2a1f0e9d8c7",
            target_id: "vpce-svc-0a1b2c3d4e5f60718",
            connection: 0x2a,
        }
    }

    #[test]
    fn an_ipv4_header_is_laid_out_as_the_spec_says() {
        let bytes = encode(&caller("192.0.2.7:40000", "10.0.1.5:8443"));
        assert_eq!(&bytes[..12], &SIGNATURE);
        assert_eq!(bytes[12], 0x21, "version 2, PROXY");
        assert_eq!(bytes[13], 0x11, "TCP over IPv4");
        assert_eq!(usize::from(u16::from_be_bytes([bytes[14], bytes[15]])), bytes.len() - 16);
        assert_eq!(&bytes[16..28], &[192, 0, 2, 7, 10, 0, 1, 5, 0x9c, 0x40, 0x20, 0xfb]);
        // The AWS TLV first: type 0xEA, length 1 + 22, subtype 0x01, the endpoint id.
        assert_eq!(&bytes[28..32], &[0xEA, 0x00, 23, 0x01]);
        assert_eq!(&bytes[32..54], b"vpce-0123456789abcdef0");
        let d = decode(&bytes).unwrap();
        assert_eq!(d.len, bytes.len());
        assert_eq!(d.source, "192.0.2.7:40000".parse().unwrap());
        assert_eq!(d.text(TLV_AWS, AWS_VPCE_ID), Some("vpce-0123456789abcdef0"));
        assert_eq!(d.text(TLV_TRELLIS, TRELLIS_ACCOUNT_ID), Some("acct-905337148260"));
        assert_eq!(d.text(TLV_TRELLIS, TRELLIS_VPC_ID), Some("vpc-0d4c3b2a1f0e9d8c7"));
        assert_eq!(d.text(TLV_TRELLIS, TRELLIS_TARGET_ID), Some("vpce-svc-0a1b2c3d4e5f60718"));
        let unique = d.tlvs.iter().find(|(k, _)| *k == TLV_UNIQUE_ID).map(|(_, v)| v.as_slice());
        assert_eq!(unique, Some(&b"acct-905337148260 vpce-0123456789abcdef0 2a"[..]));
    }

    #[test]
    fn mixed_families_are_sent_as_ipv6() {
        let d = decode(&encode(&caller("[2001:db8::7]:40000", "10.0.1.5:8443"))).unwrap();
        assert_eq!(d.source, "[2001:db8::7]:40000".parse().unwrap());
        assert_eq!(d.destination, "[::ffff:10.0.1.5]:8443".parse().unwrap());
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn every_header_decodes_to_what_was_encoded(
            a in any::<[u8; 4]>(), b in any::<[u8; 16]>(), p in any::<u16>(), q in any::<u16>(), six in any::<bool>(),
        ) {
            let client = if six { SocketAddr::new(IpAddr::from(b), p) } else { SocketAddr::new(IpAddr::from(a), p) };
            let target = SocketAddr::new(IpAddr::from(a), q);
            let c = Caller { client, target, ..caller("1.2.3.4:1", "5.6.7.8:2") };
            let d = decode(&encode(&c)).unwrap();
            prop_assert_eq!(d.source.port(), p);
            prop_assert_eq!(d.destination.port(), q);
            prop_assert_eq!(d.text(TLV_TRELLIS, TRELLIS_TARGET_ID), Some(c.target_id));
        }
    }
}
