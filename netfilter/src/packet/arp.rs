//! ARP for Ethernet/IPv4 (RFC 826); other hardware or protocol types are refused.

use super::{array, be16, MacAddr, ParseError};
use std::net::Ipv4Addr;

/// ARP opcode of a request.
pub const ARP_REQUEST: u16 = 1;
/// ARP opcode of a reply.
pub const ARP_REPLY: u16 = 2;

/// An Ethernet/IPv4 ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpPacket {
    /// Operation (1 request, 2 reply; others are kept to be refused).
    pub op: u16,
    /// Sender hardware address.
    pub sha: MacAddr,
    /// Sender protocol address.
    pub spa: Ipv4Addr,
    /// Target hardware address.
    pub tha: MacAddr,
    /// Target protocol address.
    pub tpa: Ipv4Addr,
}

impl ArpPacket {
    /// Parses an ARP packet; anything but Ethernet (1) / IPv4 (0x0800) / 6 / 4 is an error.
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        let htype = be16(b, 0).ok_or(ParseError::BadArp)?;
        let ptype = be16(b, 2).ok_or(ParseError::BadArp)?;
        let (hlen, plen) = (b.get(4).copied(), b.get(5).copied());
        if htype != 1 || ptype != 0x0800 || hlen != Some(6) || plen != Some(4) {
            return Err(ParseError::BadArp);
        }
        let op = be16(b, 6).ok_or(ParseError::BadArp)?;
        let sha = array::<6>(b, 8).ok_or(ParseError::BadArp)?;
        let spa = array::<4>(b, 14).ok_or(ParseError::BadArp)?;
        let tha = array::<6>(b, 18).ok_or(ParseError::BadArp)?;
        let tpa = array::<4>(b, 24).ok_or(ParseError::BadArp)?;
        Ok(ArpPacket {
            op,
            sha: MacAddr(sha),
            spa: Ipv4Addr::from(spa),
            tha: MacAddr(tha),
            tpa: Ipv4Addr::from(tpa),
        })
    }
}
