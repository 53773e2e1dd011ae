//! Ethernet II header with up to two VLAN tags (802.1Q / 802.1ad).

use super::{array, be16, ParseError};
use std::fmt;

/// Ethertype of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// Ethertype of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Ethertype of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;

/// A 48-bit MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The broadcast address ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// True for group (multicast or broadcast) addresses: the I/G bit is set.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// The IPv6 link-local address the kernel derives from this MAC (EUI-64).
    pub fn ipv6_link_local(&self) -> std::net::Ipv6Addr {
        let m = self.0;
        std::net::Ipv6Addr::from([
            0xfe,
            0x80,
            0,
            0,
            0,
            0,
            0,
            0,
            m[0] ^ 0x02,
            m[1],
            m[2],
            0xff,
            0xfe,
            m[3],
            m[4],
            m[5],
        ])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut n = 0;
        for part in s.split(':') {
            if n == 6 || part.len() != 2 {
                return Err(format!(
                    "`{s}` is not a MAC address (want six hex pairs: aa:bb:cc:dd:ee:ff)"
                ));
            }
            out[n] = u8::from_str_radix(part, 16)
                .map_err(|_| format!("`{s}` is not a MAC address: `{part}` is not hex"))?;
            n += 1;
        }
        if n != 6 {
            return Err(format!("`{s}` is not a MAC address (want six hex pairs)"));
        }
        Ok(MacAddr(out))
    }
}

/// The link header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthernetHeader {
    /// Destination MAC.
    pub dst: MacAddr,
    /// Source MAC.
    pub src: MacAddr,
    /// VLAN IDs of the tags present, outer first (0 = no tag).
    pub vlans: [u16; 2],
    /// Number of VLAN tags (0 to 2).
    pub vlan_count: u8,
    /// The ethertype after any VLAN tags.
    pub ethertype: u16,
}

impl EthernetHeader {
    /// Parses the header; returns it and the bytes after it.
    #[inline]
    pub fn parse(b: &[u8]) -> Result<(Self, &[u8]), ParseError> {
        let dst = array::<6>(b, 0).ok_or(ParseError::TruncatedEthernet)?;
        let src = array::<6>(b, 6).ok_or(ParseError::TruncatedEthernet)?;
        let mut ethertype = be16(b, 12).ok_or(ParseError::TruncatedEthernet)?;
        let mut off = 14;
        let mut vlans = [0u16; 2];
        let mut vlan_count = 0u8;
        while ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ {
            if vlan_count == 2 {
                return Err(ParseError::TooManyVlanTags);
            }
            let tci = be16(b, off).ok_or(ParseError::TruncatedEthernet)?;
            vlans[vlan_count as usize] = tci & 0x0fff;
            vlan_count += 1;
            ethertype = be16(b, off + 2).ok_or(ParseError::TruncatedEthernet)?;
            off += 4;
        }
        let rest = b.get(off..).ok_or(ParseError::TruncatedEthernet)?;
        Ok((
            EthernetHeader {
                dst: MacAddr(dst),
                src: MacAddr(src),
                vlans,
                vlan_count,
                ethertype,
            },
            rest,
        ))
    }
}
