//! What a rendered table decides for a packet, evaluated the way the kernel evaluates it
//! (rules in order, a jump returns when its chain ends, base chains accept by policy).
//!
//! For tests: folding rules into sets must not change a single decision, and that is
//! checked by evaluating both forms of a table on the same packets; the kernel test then
//! checks that the kernel agrees on real packets.

use super::{Hook, KeyField, Match, NftTable, NftVerdict};
use crate::packet::proto;
use std::net::IpAddr;

/// A packet as the wall sees it.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The hook it arrives at.
    pub hook: Hook,
    /// Input interface.
    pub iif: String,
    /// Output interface.
    pub oif: String,
    /// Source address.
    pub src: IpAddr,
    /// Destination address (same family).
    pub dst: IpAddr,
    /// Layer 4 protocol.
    pub proto: u8,
    /// The transport header's bytes 2..4 (the destination port for TCP and UDP).
    pub dport: u16,
    /// The transport header's first byte (the ICMP type).
    pub icmp_type: u8,
    /// Conntrack: the flow is established or related.
    pub established: bool,
}

/// What the table decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Accepted (by a rule or a base chain's policy).
    Accept,
    /// Dropped.
    Drop,
}

impl NftTable {
    /// Evaluates `p` through every base chain at its hook.
    pub fn decide(&self, p: &Probe) -> Decision {
        for c in self
            .chains
            .iter()
            .filter(|c| c.hook.map(|h| h.0) == Some(p.hook))
        {
            if let Some(Decision::Drop) = self.run(&c.name, p, 0) {
                return Decision::Drop;
            }
        }
        Decision::Accept
    }

    fn run(&self, chain: &str, p: &Probe, depth: usize) -> Option<Decision> {
        let c = self.chains.iter().find(|c| c.name == chain)?;
        if depth > 16 {
            return Some(Decision::Drop);
        }
        for r in &c.rules {
            if !r.matches.iter().all(|m| self.holds(m, p)) {
                continue;
            }
            match &r.verdict {
                NftVerdict::Accept => return Some(Decision::Accept),
                NftVerdict::Drop => return Some(Decision::Drop),
                NftVerdict::Jump(to) => {
                    if let Some(d) = self.run(to, p, depth + 1) {
                        return Some(d);
                    }
                }
            }
        }
        None
    }

    fn holds(&self, m: &Match, p: &Probe) -> bool {
        match m {
            Match::Iifname(n) => p.iif == *n,
            Match::Oifname(n) => p.oif == *n,
            // `established: false` is the invalid state, which a probe never is.
            Match::CtState { established } => *established && p.established,
            Match::L4Proto(x) => p.proto == *x,
            Match::Saddr(r) => r.contains(p.src),
            Match::Daddr(r) => r.contains(p.dst),
            Match::SaddrNot(a) => a.is_ipv4() == p.src.is_ipv4() && *a != p.src,
            Match::Dport(r) => (r.lo..=r.hi).contains(&p.dport),
            Match::Icmpv6Type(t) => p.proto == proto::ICMPV6 && p.icmp_type == *t,
            Match::InSet { set, key } => {
                let Some(s) = self.sets.iter().find(|s| s.name == *set) else {
                    return false;
                };
                let mut values = Vec::with_capacity(key.len());
                for f in key {
                    values.push(match *f {
                        KeyField::Addr { v6, src } => {
                            let a = if src { p.src } else { p.dst };
                            if a.is_ipv6() != v6 {
                                return false;
                            }
                            super::addrs::bits_of(a)
                        }
                        KeyField::L4Proto => u128::from(p.proto),
                        KeyField::Dport => u128::from(p.dport),
                    });
                }
                s.contains(&values)
            }
        }
    }
}
