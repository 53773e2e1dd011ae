//! TCP, UDP, ICMP and ICMPv6 headers.

use super::{be16, be32, proto, ParseError};

/// TCP flag bits (the low byte of the flags field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;

    /// True when every bit of `mask` is set.
    pub fn has(self, mask: u8) -> bool {
        self.0 & mask == mask
    }
}

/// A TCP segment.
#[derive(Debug, Clone, Copy)]
pub struct TcpSegment<'a> {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Flags.
    pub flags: TcpFlags,
    /// Payload after the header and options (may be partial for a first fragment).
    pub payload: &'a [u8],
}

/// A UDP datagram.
#[derive(Debug, Clone, Copy)]
pub struct UdpDatagram<'a> {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Payload (may be partial for a first fragment).
    pub payload: &'a [u8],
}

/// An ICMP or ICMPv6 message: the fixed 8 bytes and what follows.
#[derive(Debug, Clone, Copy)]
pub struct IcmpMessage<'a> {
    /// Type.
    pub ty: u8,
    /// Code.
    pub code: u8,
    /// The second 32-bit word (echo identifier and sequence, or reserved).
    pub rest: u32,
    /// Body after the first 8 bytes.
    pub body: &'a [u8],
}

impl IcmpMessage<'_> {
    /// The echo identifier (meaningful for echo request and reply).
    pub fn echo_id(&self) -> u16 {
        (self.rest >> 16) as u16
    }
}

/// The transport layer of an IP packet.
#[derive(Debug, Clone, Copy)]
pub enum L4<'a> {
    /// TCP.
    Tcp(TcpSegment<'a>),
    /// UDP.
    Udp(UdpDatagram<'a>),
    /// ICMP (IPv4) or ICMPv6.
    Icmp(IcmpMessage<'a>),
    /// A fragment past the first: no transport header.
    Fragment,
    /// Another protocol, not parsed.
    Other,
}

impl<'a> L4<'a> {
    /// Parses the transport header of `proto`. For a first fragment (`fragmented`) the UDP
    /// length may exceed what is present; the header itself must still be whole.
    #[inline]
    pub fn parse(p: u8, b: &'a [u8], fragmented: bool) -> Result<Self, ParseError> {
        let bad = ParseError::BadTransportHeader;
        match p {
            proto::TCP => {
                let sport = be16(b, 0).ok_or(bad)?;
                let dport = be16(b, 2).ok_or(bad)?;
                let seq = be32(b, 4).ok_or(bad)?;
                let ack = be32(b, 8).ok_or(bad)?;
                let doff = usize::from(*b.get(12).ok_or(bad)? >> 4) * 4;
                let flags = TcpFlags(*b.get(13).ok_or(bad)?);
                if doff < 20 || doff > b.len() {
                    return Err(bad);
                }
                Ok(L4::Tcp(TcpSegment {
                    sport,
                    dport,
                    seq,
                    ack,
                    flags,
                    payload: &b[doff..],
                }))
            }
            proto::UDP => {
                let sport = be16(b, 0).ok_or(bad)?;
                let dport = be16(b, 2).ok_or(bad)?;
                let len = usize::from(be16(b, 4).ok_or(bad)?);
                // The header itself must be whole even in a first fragment, whose payload
                // may be shorter than the length field says.
                if len < 8 || b.len() < 8 || (!fragmented && len > b.len()) {
                    return Err(bad);
                }
                let end = len.min(b.len());
                Ok(L4::Udp(UdpDatagram {
                    sport,
                    dport,
                    payload: &b[8..end],
                }))
            }
            proto::ICMP | proto::ICMPV6 => {
                let ty = *b.first().ok_or(bad)?;
                let code = *b.get(1).ok_or(bad)?;
                let rest = be32(b, 4).ok_or(bad)?;
                Ok(L4::Icmp(IcmpMessage {
                    ty,
                    code,
                    rest,
                    body: &b[8..],
                }))
            }
            _ => Ok(L4::Other),
        }
    }

    /// Source and destination ports (0 where the protocol has none).
    pub fn ports(&self) -> (u16, u16) {
        match self {
            L4::Tcp(t) => (t.sport, t.dport),
            L4::Udp(u) => (u.sport, u.dport),
            _ => (0, 0),
        }
    }

    /// The transport payload (empty where there is none).
    pub fn payload(&self) -> &'a [u8] {
        match self {
            L4::Tcp(t) => t.payload,
            L4::Udp(u) => u.payload,
            L4::Icmp(i) => i.body,
            _ => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_udp_header_in_a_first_fragment_is_an_error_not_a_panic() {
        for n in 0..8 {
            let b = [0x30u8, 0x39, 0x00, 0x35, 0x00, 0x40, 0, 0];
            assert_eq!(
                L4::parse(proto::UDP, &b[..n], true).err(),
                Some(ParseError::BadTransportHeader),
                "{n} bytes"
            );
            assert_eq!(
                L4::parse(proto::UDP, &b[..n], false).err(),
                Some(ParseError::BadTransportHeader),
                "{n} bytes"
            );
        }
        assert!(L4::parse(
            proto::UDP,
            &[0x30, 0x39, 0x00, 0x35, 0x00, 0x40, 0, 0],
            true
        )
        .is_ok());
    }
}
