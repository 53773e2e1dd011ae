//! IPv4 (with options and fragments) and IPv6 (with extension headers).

use super::{array, be16, be32, l4::L4, proto, ParseError};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// At most this many IPv6 extension headers are walked; more is an error (a DoS lever).
pub const MAX_EXTENSION_HEADERS: usize = 8;

/// Fragmentation details of a fragmented packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    /// Identification (16 bits in IPv4, 32 in IPv6).
    pub id: u32,
    /// Fragment offset in 8-byte units.
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
}

/// An IPv4 or IPv6 packet, with the transport layer parsed when this is not a later fragment.
#[derive(Debug, Clone, Copy)]
pub struct IpPacket<'a> {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Upper-layer protocol (after IPv6 extension headers).
    pub proto: u8,
    /// TTL or hop limit.
    pub ttl: u8,
    /// Set when the packet is a fragment (more fragments, or a non-zero offset).
    pub frag: Option<Fragment>,
    /// IPv4 loose/strict source route option, or an IPv6 type 0 routing header with
    /// segments left: both let a sender steer a packet past a filter.
    pub source_routed: bool,
    /// Length of the IP packet (header and payload, without link padding).
    pub len: usize,
    /// The transport layer.
    pub l4: L4<'a>,
}

impl<'a> IpPacket<'a> {
    /// True for IPv6.
    pub fn is_v6(&self) -> bool {
        self.src.is_ipv6()
    }

    /// Parses an IPv4 packet (RFC 791). Trailing link padding past the total length is ignored.
    #[inline]
    pub fn parse_v4(b: &'a [u8]) -> Result<Self, ParseError> {
        let vihl = *b.first().ok_or(ParseError::BadIpHeader)?;
        if vihl >> 4 != 4 {
            return Err(ParseError::BadIpHeader);
        }
        let ihl = usize::from(vihl & 0x0f) * 4;
        if ihl < 20 || b.len() < ihl {
            return Err(ParseError::BadIpHeader);
        }
        let total = usize::from(be16(b, 2).ok_or(ParseError::BadIpHeader)?);
        if total < ihl || total > b.len() {
            return Err(ParseError::BadIpLength);
        }
        let id = u32::from(be16(b, 4).ok_or(ParseError::BadIpHeader)?);
        let ff = be16(b, 6).ok_or(ParseError::BadIpHeader)?;
        let more = ff & 0x2000 != 0;
        let offset = ff & 0x1fff;
        let ttl = b[8];
        let proto = b[9];
        let src = Ipv4Addr::from(array::<4>(b, 12).ok_or(ParseError::BadIpHeader)?);
        let dst = Ipv4Addr::from(array::<4>(b, 16).ok_or(ParseError::BadIpHeader)?);
        let source_routed = v4_options_source_routed(&b[20..ihl])?;
        let frag = (more || offset != 0).then_some(Fragment { id, offset, more });
        let payload = &b[ihl..total];
        let l4 = if offset != 0 {
            L4::Fragment
        } else {
            L4::parse(proto, payload, frag.is_some())?
        };
        Ok(IpPacket {
            src: IpAddr::V4(src),
            dst: IpAddr::V4(dst),
            proto,
            ttl,
            frag,
            source_routed,
            len: total,
            l4,
        })
    }

    /// Parses an IPv6 packet (RFC 8200) and walks its extension headers.
    #[inline]
    pub fn parse_v6(b: &'a [u8]) -> Result<Self, ParseError> {
        let v = *b.first().ok_or(ParseError::BadIpHeader)?;
        if v >> 4 != 6 || b.len() < 40 {
            return Err(ParseError::BadIpHeader);
        }
        let plen = usize::from(be16(b, 4).ok_or(ParseError::BadIpHeader)?);
        // A zero payload length means a jumbogram; not on our links.
        if plen == 0 && b[6] == 0 {
            return Err(ParseError::BadIpLength);
        }
        let total = 40 + plen;
        if total > b.len() {
            return Err(ParseError::BadIpLength);
        }
        let src = Ipv6Addr::from(array::<16>(b, 8).ok_or(ParseError::BadIpHeader)?);
        let dst = Ipv6Addr::from(array::<16>(b, 24).ok_or(ParseError::BadIpHeader)?);
        let ttl = b[7];
        let mut next = b[6];
        let mut rest = &b[40..total];
        let mut frag = None;
        let mut source_routed = false;
        let mut walked = 0;
        loop {
            match next {
                // Hop-by-hop (only first), routing, destination options.
                0 | 43 | 60 => {
                    if next == 0 && walked != 0 {
                        return Err(ParseError::BadExtensionHeaders);
                    }
                    let hdr_len = rest.get(1).map(|l| (usize::from(*l) + 1) * 8);
                    let hdr_len = hdr_len.ok_or(ParseError::BadExtensionHeaders)?;
                    if rest.len() < hdr_len {
                        return Err(ParseError::BadExtensionHeaders);
                    }
                    if next == 43 && rest[2] == 0 && rest[3] != 0 {
                        source_routed = true;
                    }
                    next = rest[0];
                    rest = &rest[hdr_len..];
                }
                44 => {
                    if rest.len() < 8 || frag.is_some() {
                        return Err(ParseError::BadExtensionHeaders);
                    }
                    let of = be16(rest, 2).ok_or(ParseError::BadExtensionHeaders)?;
                    let id = be32(rest, 4).ok_or(ParseError::BadExtensionHeaders)?;
                    let (offset, more) = (of >> 3, of & 1 == 1);
                    // An atomic fragment (offset 0, no more) is treated as a whole packet.
                    if offset != 0 || more {
                        frag = Some(Fragment { id, offset, more });
                    }
                    next = rest[0];
                    rest = &rest[8..];
                }
                // Authentication header: length in 4-octet units, minus 2.
                51 => {
                    let hdr_len = rest.get(1).map(|l| (usize::from(*l) + 2) * 4);
                    let hdr_len = hdr_len.ok_or(ParseError::BadExtensionHeaders)?;
                    if rest.len() < hdr_len {
                        return Err(ParseError::BadExtensionHeaders);
                    }
                    next = rest[0];
                    rest = &rest[hdr_len..];
                }
                _ => break,
            }
            walked += 1;
            if walked > MAX_EXTENSION_HEADERS {
                return Err(ParseError::BadExtensionHeaders);
            }
            if frag.is_some_and(|f| f.offset != 0) {
                break;
            }
        }
        let l4 = match frag {
            Some(f) if f.offset != 0 => L4::Fragment,
            _ => L4::parse(next, rest, frag.is_some())?,
        };
        Ok(IpPacket {
            src: IpAddr::V6(src),
            dst: IpAddr::V6(dst),
            proto: next,
            ttl,
            frag,
            source_routed,
            len: total,
            l4,
        })
    }

    /// The transport protocol name used in policies and audit records.
    pub fn proto_name(&self) -> &'static str {
        proto_name(self.proto)
    }
}

/// Name of an IP protocol number, as written in policies and audit records.
pub fn proto_name(p: u8) -> &'static str {
    match p {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        proto::ICMP => "icmp",
        proto::ICMPV6 => "icmpv6",
        _ => "other",
    }
}

/// Walks IPv4 options (type-length-value) and reports loose or strict source routing.
#[inline]
fn v4_options_source_routed(mut opts: &[u8]) -> Result<bool, ParseError> {
    let mut routed = false;
    while let Some(&kind) = opts.first() {
        match kind {
            0 => break,
            1 => opts = &opts[1..],
            _ => {
                let len = usize::from(*opts.get(1).ok_or(ParseError::BadIpHeader)?);
                if len < 2 || len > opts.len() {
                    return Err(ParseError::BadIpHeader);
                }
                // 131 = loose source route, 137 = strict source route.
                if kind == 131 || kind == 137 {
                    routed = true;
                }
                opts = &opts[len..];
            }
        }
    }
    Ok(routed)
}
