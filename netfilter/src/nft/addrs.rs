//! Which addresses the kernel wall treats as which zone: exactly the zone enclave-netd
//! resolves for each address (a known workload's, else the longest-prefix CIDR zone's, else
//! `unknown`), as disjoint address ranges.
//!
//! Rendering a zone as its CIDRs plus its workloads' addresses is not the same thing: a pod
//! whose address lies inside another zone's CIDR, or a CIDR zone nested in a wider one,
//! would be matched by both zones' rules in the kernel while netd puts it in one. The
//! partition below carves every more specific owner out of the wider ranges.

use crate::identity::PeerDirectory;
use crate::policy::{v4_mask, v6_mask, Cidr, CompiledPolicy, ZoneId};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An inclusive range of addresses of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrRange {
    /// First address.
    pub lo: IpAddr,
    /// Last address (same family as `lo`).
    pub hi: IpAddr,
}

impl AddrRange {
    /// One address.
    pub fn host(ip: IpAddr) -> AddrRange {
        AddrRange { lo: ip, hi: ip }
    }

    /// Every address of a CIDR.
    pub fn of_cidr(c: Cidr) -> AddrRange {
        let (lo, hi, v6) = match c.network() {
            IpAddr::V4(a) => {
                let lo = u128::from(u32::from(a));
                (lo, lo | u128::from(!v4_mask(c.len)), false)
            }
            IpAddr::V6(a) => {
                let lo = u128::from(a);
                (lo, lo | !v6_mask(c.len), true)
            }
        };
        AddrRange::from_bits(lo, hi, v6)
    }

    /// A range from its bounds as integers.
    pub fn from_bits(lo: u128, hi: u128, v6: bool) -> AddrRange {
        AddrRange {
            lo: ip_of(lo, v6),
            hi: ip_of(hi, v6),
        }
    }

    /// True for IPv6.
    pub fn is_v6(&self) -> bool {
        self.lo.is_ipv6()
    }

    /// The bounds as integers.
    pub fn bits(&self) -> (u128, u128) {
        (bits_of(self.lo), bits_of(self.hi))
    }

    /// True when `ip` is inside (a different family never is).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (lo, hi) = self.bits();
        ip.is_ipv6() == self.is_v6() && (lo..=hi).contains(&bits_of(ip))
    }

    /// The CIDR this range is exactly, if it is one.
    pub fn as_cidr(&self) -> Option<Cidr> {
        let (lo, hi) = self.bits();
        let width: u32 = if self.is_v6() { 128 } else { 32 };
        let span = hi.checked_sub(lo)?;
        // A CIDR spans 2^k - 1 and starts on a multiple of 2^k.
        let k = 128 - span.leading_zeros();
        if k > width || span.checked_add(1).is_some_and(|n| !n.is_power_of_two()) {
            return None;
        }
        if k < 128 && lo & ((1u128 << k) - 1) != 0 {
            return None;
        }
        let len = u8::try_from(width - k).ok()?;
        Some(Cidr { addr: self.lo, len })
    }
}

impl fmt::Display for AddrRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_cidr() {
            Some(c) if c.len == if self.is_v6() { 128 } else { 32 } => write!(f, "{}", self.lo),
            Some(c) => write!(f, "{c}"),
            None => write!(f, "{}-{}", self.lo, self.hi),
        }
    }
}

/// An address as an integer (IPv4 in the low 32 bits).
pub fn bits_of(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn ip_of(bits: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(bits))
    } else {
        IpAddr::V4(Ipv4Addr::from(u32::try_from(bits).unwrap_or(u32::MAX)))
    }
}

/// The addresses of every zone, disjoint, as netd resolves them.
#[derive(Debug, Default)]
pub struct ZoneAddrs {
    by_zone: BTreeMap<ZoneId, Vec<AddrRange>>,
}

impl ZoneAddrs {
    /// Partitions the address space for a workload whose own addresses are `own` (they
    /// belong to no zone here: the workload's traffic to itself never crosses the wall).
    pub fn new(policy: &CompiledPolicy, peers: &PeerDirectory, own: &[IpAddr]) -> ZoneAddrs {
        let mut by_zone: BTreeMap<ZoneId, Vec<AddrRange>> = BTreeMap::new();
        for v6 in [false, true] {
            for (lo, hi, zone) in partition(policy, peers, own, v6) {
                let ranges = by_zone.entry(zone).or_default();
                match ranges.last_mut() {
                    Some(last) if last.bits().1.checked_add(1) == Some(lo) => {
                        *last = AddrRange::from_bits(last.bits().0, hi, v6);
                    }
                    _ => ranges.push(AddrRange::from_bits(lo, hi, v6)),
                }
            }
        }
        ZoneAddrs { by_zone }
    }

    /// The addresses netd puts in `zone` (none for `unknown`: it is everything else).
    pub fn of(&self, zone: ZoneId) -> &[AddrRange] {
        if zone == ZoneId::UNKNOWN {
            return &[];
        }
        self.by_zone.get(&zone).map_or(&[], Vec::as_slice)
    }

    /// Every address in some zone other than `unknown`, merged where adjacent.
    pub fn known(&self) -> Vec<AddrRange> {
        let mut all: Vec<AddrRange> = self
            .by_zone
            .iter()
            .filter(|(z, _)| **z != ZoneId::UNKNOWN)
            .flat_map(|(_, r)| r.iter().copied())
            .collect();
        all.sort_by_key(|r| (r.is_v6(), r.bits()));
        let mut merged: Vec<AddrRange> = Vec::with_capacity(all.len());
        for r in all {
            match merged.last_mut() {
                Some(last)
                    if last.is_v6() == r.is_v6()
                        && last.bits().1.checked_add(1) == Some(r.bits().0) =>
                {
                    *last = AddrRange::from_bits(last.bits().0, r.bits().1, r.is_v6());
                }
                _ => merged.push(r),
            }
        }
        merged
    }
}

/// `::ffff:0:0/96`, IPv4-mapped IPv6 addresses: never on the wire from a conforming
/// stack (RFC 4291 2.5.5.2), and a known way past filters written for IPv4 addresses. netd
/// resolves them by the IPv4 CIDRs; the kernel wall drops them before any zone rule.
pub fn ipv4_mapped() -> Cidr {
    Cidr {
        addr: IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0)),
        len: 96,
    }
}

/// The elementary intervals of one family that some zone other than `unknown` owns, in
/// address order: every CIDR bound and every workload address starts an interval, so the
/// zone netd resolves is the same for every address of an interval.
fn partition(
    policy: &CompiledPolicy,
    peers: &PeerDirectory,
    own: &[IpAddr],
    v6: bool,
) -> Vec<(u128, u128, ZoneId)> {
    let max: u128 = if v6 { u128::MAX } else { u128::from(u32::MAX) };
    let mut starts: Vec<u128> = vec![0];
    let mut bound = |lo: u128, hi: u128| {
        starts.push(lo);
        if hi < max {
            starts.push(hi + 1);
        }
    };
    for z in &policy.policy().zones {
        for c in z.cidrs.iter().filter(|c| c.addr.is_ipv6() == v6) {
            let (lo, hi) = AddrRange::of_cidr(*c).bits();
            bound(lo, hi);
        }
    }
    let (mapped_lo, mapped_hi) = AddrRange::of_cidr(ipv4_mapped()).bits();
    if v6 {
        bound(mapped_lo, mapped_hi);
    }
    let hosts = peers.iter().map(|(ip, _)| ip).chain(own.iter().copied());
    for ip in hosts.filter(|ip| ip.is_ipv6() == v6) {
        let b = bits_of(ip);
        bound(b, b);
    }
    starts.sort_unstable();
    starts.dedup();
    let mut out = Vec::new();
    for (k, &lo) in starts.iter().enumerate() {
        let hi = starts.get(k + 1).map_or(max, |next| next - 1);
        let ip = ip_of(lo, v6);
        let zone = if lo == hi && own.contains(&ip) || v6 && lo == mapped_lo {
            // IPv4-mapped IPv6 addresses are in no zone here: the wall drops them first.
            None
        } else if let Some(p) = peers.get(ip).filter(|_| lo == hi) {
            Some(p.zone)
        } else {
            policy.zone_of_ip(ip)
        };
        if let Some(z) = zone.filter(|z| *z != ZoneId::UNKNOWN) {
            out.push((lo, hi, z));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_range_is_shown_as_the_cidr_it_is_or_as_its_bounds() {
        let r = |s: &str| AddrRange::of_cidr(Cidr::parse(s).unwrap());
        assert_eq!(r("10.1.0.0/16").to_string(), "10.1.0.0/16");
        assert_eq!(r("10.1.2.3/32").to_string(), "10.1.2.3");
        assert_eq!(r("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(r("::/0").to_string(), "::/0");
        assert_eq!(r("fd00::/64").to_string(), "fd00::/64");
        let odd = AddrRange::from_bits(10, 12, false);
        assert_eq!(odd.to_string(), "0.0.0.10-0.0.0.12");
        assert!(odd.as_cidr().is_none());
        assert!(AddrRange::from_bits(1, 2, false).as_cidr().is_none());
        assert!(odd.contains("0.0.0.11".parse().unwrap()));
        assert!(!odd.contains("::b".parse().unwrap()));
    }
}
