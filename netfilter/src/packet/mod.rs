//! Zero-copy, allocation-free views of Ethernet frames, total over arbitrary bytes.
//!
//! Every parser here takes untrusted bytes (a frame a guest wrote) and either returns a
//! view whose fields were bounds-checked once, or a [`ParseError`] naming what was wrong.
//! None of them panics or reads out of bounds; `fuzz/` drives them with arbitrary input.

mod arp;
pub mod build;
mod ether;
mod ip;
mod l4;

pub use arp::{ArpPacket, ARP_REPLY, ARP_REQUEST};
pub use ether::{EthernetHeader, MacAddr, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6};
pub use ip::{proto_name, Fragment, IpPacket};
pub use l4::{IcmpMessage, TcpFlags, TcpSegment, UdpDatagram, L4};

/// IP protocol numbers the matcher knows by name.
pub mod proto {
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// Why a frame could not be parsed. Each variant is a reason a frame is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than an Ethernet header (or a VLAN tag was cut off).
    #[error("frame shorter than its Ethernet header")]
    TruncatedEthernet,
    /// More than two stacked VLAN tags.
    #[error("more than two stacked VLAN tags")]
    TooManyVlanTags,
    /// ARP packet shorter than 28 bytes or not Ethernet/IPv4.
    #[error("malformed ARP packet")]
    BadArp,
    /// IP header shorter than its minimum, or version field wrong.
    #[error("truncated or malformed IP header")]
    BadIpHeader,
    /// IPv4 total length or IPv6 payload length disagrees with the frame.
    #[error("IP length field disagrees with the frame length")]
    BadIpLength,
    /// IPv6 extension header chain too long or truncated.
    #[error("IPv6 extension header chain too long or truncated")]
    BadExtensionHeaders,
    /// Transport header truncated or with an impossible header length.
    #[error("truncated or malformed transport header")]
    BadTransportHeader,
}

/// A parsed Ethernet frame: the link header and what it carries.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// The Ethernet header (with VLAN tags, if any).
    pub eth: EthernetHeader,
    /// The network-layer payload.
    pub net: Net<'a>,
}

/// The network layer of a frame.
#[derive(Debug, Clone, Copy)]
pub enum Net<'a> {
    /// An ARP packet (Ethernet/IPv4 only).
    Arp(ArpPacket),
    /// An IPv4 or IPv6 packet.
    Ip(IpPacket<'a>),
    /// Any other ethertype; carried for the verdict, not parsed.
    Other(u16),
}

impl<'a> Frame<'a> {
    /// Parses a whole Ethernet frame. Total: any byte slice gives `Ok` or `Err`.
    #[inline]
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ParseError> {
        let (eth, payload) = EthernetHeader::parse(bytes)?;
        let net = match eth.ethertype {
            ETHERTYPE_ARP => Net::Arp(ArpPacket::parse(payload)?),
            ETHERTYPE_IPV4 => Net::Ip(IpPacket::parse_v4(payload)?),
            ETHERTYPE_IPV6 => Net::Ip(IpPacket::parse_v6(payload)?),
            other => Net::Other(other),
        };
        Ok(Frame { eth, net })
    }
}

/// Reads a big-endian u16 at `off`, or `None` past the end.
#[inline]
pub(crate) fn be16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

/// Reads a big-endian u32 at `off`, or `None` past the end.
#[inline]
pub(crate) fn be32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Copies `N` bytes at `off`, or `None` past the end.
#[inline]
pub(crate) fn array<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    let s = b.get(off..off.checked_add(N)?)?;
    let mut out = [0u8; N];
    out.copy_from_slice(s);
    Some(out)
}
