//! Bounded connection and fragment tracking.
//!
//! Tables are set-associative: a key hashes (with a per-process random key, so a guest
//! cannot aim collisions) to one set of [`WAYS`] slots. Lookup scans one set's tags, so its
//! cost never grows with the table; a full set evicts its expired or least recently seen
//! slot. All memory is allocated when the table is made; the fast path allocates nothing.

use crate::l7::DETECT_BYTES;
use crate::policy::{AppProto, RuleId, ZoneId};
use ahash::RandomState;
use std::hash::Hash;
use std::net::IpAddr;

/// Slots per set.
pub const WAYS: usize = 8;

const SEC: u64 = 1_000_000_000;

/// Idle timeouts per state, in nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP handshake in progress.
    pub tcp_handshake: u64,
    /// TCP established.
    pub tcp_established: u64,
    /// TCP closing (FIN seen) or reset.
    pub tcp_closing: u64,
    /// UDP before a reply.
    pub udp: u64,
    /// UDP after replies.
    pub udp_stream: u64,
    /// ICMP and other protocols.
    pub other: u64,
    /// Fragments of an allowed packet.
    pub fragment: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_handshake: 30 * SEC,
            tcp_established: 12 * 3600 * SEC,
            tcp_closing: 30 * SEC,
            udp: 30 * SEC,
            udp_stream: 180 * SEC,
            other: 30 * SEC,
            fragment: 30 * SEC,
        }
    }
}

/// Counters of a table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TableStats {
    /// Lookups.
    pub lookups: u64,
    /// Lookups that found a live entry.
    pub hits: u64,
    /// Entries inserted.
    pub inserts: u64,
    /// Live entries evicted to make room.
    pub evictions: u64,
    /// Entries found expired.
    pub expirations: u64,
    /// Live entries now.
    pub entries: u64,
}

/// One set's slots.
type Ways<K, V> = [Option<Slot<K, V>>; WAYS];

#[derive(Clone)]
struct Slot<K, V> {
    key: K,
    value: V,
    last_seen: u64,
    expires: u64,
}

/// A fixed-size set-associative table.
pub struct SetAssoc<K, V> {
    tags: Box<[[u32; WAYS]]>,
    slots: Box<[Ways<K, V>]>,
    mask: usize,
    hasher: RandomState,
    stats: TableStats,
}

impl<K: Hash + Eq + Copy, V> SetAssoc<K, V> {
    /// A table of at least `capacity` slots (rounded up to a power of two of sets).
    pub fn new(capacity: usize) -> Self {
        let sets = (capacity.max(WAYS) / WAYS).next_power_of_two();
        SetAssoc {
            tags: vec![[0u32; WAYS]; sets].into_boxed_slice(),
            slots: (0..sets).map(|_| std::array::from_fn(|_| None)).collect(),
            mask: sets - 1,
            hasher: RandomState::new(),
            stats: TableStats::default(),
        }
    }

    /// Total slots.
    pub fn capacity(&self) -> usize {
        self.tags.len() * WAYS
    }

    /// Counters.
    pub fn stats(&self) -> TableStats {
        self.stats
    }

    #[inline]
    fn locate(&self, key: &K) -> (usize, u32) {
        let h = self.hasher.hash_one(key);
        ((h as usize) & self.mask, ((h >> 32) as u32) | 1)
    }

    /// The live entry for `key`, refreshed; an expired one is dropped and `None` returned.
    #[inline]
    pub fn get_mut(&mut self, key: &K, now: u64) -> Option<&mut V> {
        self.get_mut_exp(key, now).map(|(v, _)| v)
    }

    /// Like [`SetAssoc::get_mut`], with the entry's expiry time to update in place.
    #[inline]
    pub fn get_mut_exp(&mut self, key: &K, now: u64) -> Option<(&mut V, &mut u64)> {
        self.probe(key, now, true)
    }

    /// A lookup by a fast path that falls back to a full one on a miss: a miss is not
    /// counted here, since the full path looks again and counts it.
    #[inline]
    pub fn get_mut_exp_fast(&mut self, key: &K, now: u64) -> Option<(&mut V, &mut u64)> {
        self.probe(key, now, false)
    }

    #[inline]
    fn probe(&mut self, key: &K, now: u64, count_miss: bool) -> Option<(&mut V, &mut u64)> {
        if count_miss {
            self.stats.lookups += 1;
        }
        let (set, tag) = self.locate(key);
        let way = (0..WAYS).find(|&w| {
            self.tags[set][w] == tag && self.slots[set][w].as_ref().is_some_and(|s| s.key == *key)
        })?;
        if !count_miss {
            self.stats.lookups += 1;
        }
        if self.slots[set][way]
            .as_ref()
            .is_some_and(|s| s.expires <= now)
        {
            self.tags[set][way] = 0;
            self.slots[set][way] = None;
            self.stats.expirations += 1;
            self.stats.entries -= 1;
            return None;
        }
        let slot = self.slots[set][way].as_mut()?;
        self.stats.hits += 1;
        slot.last_seen = now;
        Some((&mut slot.value, &mut slot.expires))
    }

    /// Inserts (or replaces) `key`, evicting the set's expired or least recently seen slot.
    /// Returns the evicted live entry's key, if one was.
    pub fn insert(&mut self, key: K, value: V, now: u64, expires: u64) -> Option<K> {
        let (set, tag) = self.locate(&key);
        let mut victim = 0;
        let mut best = (3u8, u64::MAX);
        for w in 0..WAYS {
            let rank = match &self.slots[set][w] {
                Some(s) if self.tags[set][w] == tag && s.key == key => (0, 0),
                None => (1, 0),
                Some(s) if s.expires <= now => (2, s.last_seen),
                Some(s) => (3, s.last_seen),
            };
            if rank < best {
                best = rank;
                victim = w;
            }
        }
        let evicted = match (&self.slots[set][victim], best.0) {
            (Some(s), 3) => {
                self.stats.evictions += 1;
                Some(s.key)
            }
            (Some(_), 2) => {
                self.stats.expirations += 1;
                None
            }
            _ => None,
        };
        if best.0 == 1 {
            self.stats.entries += 1;
        }
        self.stats.inserts += u64::from(best.0 != 0);
        self.tags[set][victim] = tag;
        self.slots[set][victim] = Some(Slot {
            key,
            value,
            last_seen: now,
            expires,
        });
        evicted
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: &K) {
        let (set, tag) = self.locate(key);
        for w in 0..WAYS {
            if self.tags[set][w] == tag
                && self.slots[set][w].as_ref().is_some_and(|s| s.key == *key)
            {
                self.tags[set][w] = 0;
                self.slots[set][w] = None;
                self.stats.entries -= 1;
            }
        }
    }

    /// Every live entry (for re-deciding flows after a policy reload).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&K, &mut V)> {
        self.slots
            .iter_mut()
            .flat_map(|s| s.iter_mut())
            .flatten()
            .map(|s| (&s.key, &mut s.value))
    }
}

/// A flow, with its endpoints in canonical order so both directions find one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// IP protocol.
    pub proto: u8,
    /// Lower endpoint address (IPv4 as mapped IPv6), as an integer.
    pub a: u128,
    /// Higher endpoint address.
    pub b: u128,
    /// Port (or ICMP echo id) of `a`.
    pub pa: u16,
    /// Port of `b`.
    pub pb: u16,
}

impl FlowKey {
    /// The key of a packet from `src:sport` to `dst:dport`, and whether the source is `a`.
    #[inline]
    pub fn new(proto: u8, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> (FlowKey, bool) {
        let s = addr128(src);
        let d = addr128(dst);
        if s < d || (s == d && sport <= dport) {
            (
                FlowKey {
                    proto,
                    a: s,
                    b: d,
                    pa: sport,
                    pb: dport,
                },
                true,
            )
        } else {
            (
                FlowKey {
                    proto,
                    a: d,
                    b: s,
                    pa: dport,
                    pb: sport,
                },
                false,
            )
        }
    }
}

/// An address as an integer (IPv4 mapped into IPv6: `::ffff:a.b.c.d`).
#[inline]
pub fn addr128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => 0xffff_0000_0000 | u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address an [`addr128`] value stands for.
pub fn addr_from128(a: u128) -> IpAddr {
    if a >> 32 == 0xffff {
        IpAddr::V4(std::net::Ipv4Addr::from(a as u32))
    } else {
        IpAddr::V6(std::net::Ipv6Addr::from(a))
    }
}

/// TCP connection state (a simplification of the kernel's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    /// SYN seen.
    SynSent,
    /// SYN-ACK seen.
    SynRecv,
    /// Handshake complete.
    Established,
    /// One side sent FIN.
    FinWait,
    /// Both sides sent FIN.
    Closing,
    /// RST seen.
    Reset,
}

impl TcpState {
    /// The next state after a segment with `flags` from the initiator (`orig`) or responder;
    /// `None` when the segment does not fit the state (dropped as invalid).
    pub fn advance(self, orig: bool, flags: crate::packet::TcpFlags) -> Option<TcpState> {
        use crate::packet::TcpFlags as F;
        if flags.has(F::RST) {
            return Some(TcpState::Reset);
        }
        let syn = flags.has(F::SYN);
        let ack = flags.has(F::ACK);
        Some(match self {
            TcpState::SynSent if orig && syn && !ack => TcpState::SynSent,
            TcpState::SynSent if !orig && syn && ack => TcpState::SynRecv,
            TcpState::SynSent => return None,
            TcpState::SynRecv if !orig && syn && ack => TcpState::SynRecv,
            TcpState::SynRecv if orig && ack && !syn => {
                if flags.has(F::FIN) {
                    TcpState::FinWait
                } else {
                    TcpState::Established
                }
            }
            TcpState::SynRecv => return None,
            _ if syn => return None,
            TcpState::Established if flags.has(F::FIN) => TcpState::FinWait,
            TcpState::FinWait if flags.has(F::FIN) => TcpState::Closing,
            TcpState::Reset => return None,
            s => s,
        })
    }
}

/// How a flow was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A rule allowed it.
    Allowed,
    /// Denied, but the zone is in monitor mode.
    Monitored,
    /// Recorded in learn mode.
    Learned,
    /// Cut after an L7 mismatch (or a reload that denies it): every frame is dropped.
    Cut,
}

/// L7 detection progress of a flow whose rule needs an app (or that learn mode watches).
#[derive(Debug, Clone)]
pub struct L7Pending {
    /// Rules per app that would allow the flow.
    pub candidates: [Option<RuleId>; AppProto::COUNT],
    /// The first payload bytes of each side (client, server).
    pub buf: [[u8; DETECT_BYTES]; 2],
    /// Bytes held per side.
    pub len: [u16; 2],
    /// Next expected TCP sequence number per side, once known.
    pub next_seq: [Option<u32>; 2],
}

impl L7Pending {
    /// Pending detection for these candidate rules.
    pub fn new(candidates: [Option<RuleId>; AppProto::COUNT]) -> Self {
        L7Pending {
            candidates,
            buf: [[0; DETECT_BYTES]; 2],
            len: [0; 2],
            next_seq: [None; 2],
        }
    }
}

/// What the matcher remembers of a flow.
#[derive(Debug)]
pub struct FlowEntry {
    /// True when endpoint `a` of the key opened the flow.
    pub a_is_initiator: bool,
    /// True when the initiator is the local workload.
    pub outbound: bool,
    /// TCP state, for TCP flows.
    pub tcp: Option<TcpState>,
    /// A reply has been seen.
    pub replied: bool,
    /// How it was admitted.
    pub admission: Admission,
    /// The rule that allowed it (or would have denied it, in monitor mode).
    pub rule: Option<RuleId>,
    /// The app detected, once known.
    pub app: Option<AppProto>,
    /// Detection under way.
    pub l7: Option<Box<L7Pending>>,
    /// Zone of the initiator and of the responder.
    pub zones: (ZoneId, ZoneId),
    /// Frames and bytes from the initiator and from the responder.
    pub frames: [u64; 2],
    /// Bytes per side.
    pub bytes: [u64; 2],
    /// Inspection of its bytes, when its rule asks for it (boxed: most flows have none).
    pub inspect: Option<Box<crate::inspect::FlowInspector>>,
}

/// A fragment train: (source, destination, id, protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source.
    pub src: u128,
    /// Destination.
    pub dst: u128,
    /// Identification.
    pub id: u32,
    /// Protocol.
    pub proto: u8,
}

/// The flow table of one workload.
pub type FlowTable = SetAssoc<FlowKey, FlowEntry>;
/// Allowed fragment trains of one workload (value: the first fragment was allowed).
pub type FragTable = SetAssoc<FragKey, bool>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_directions_of_a_flow_share_one_key() {
        let a: IpAddr = "10.0.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let b: IpAddr = "10.0.0.2".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let (k1, s1) = FlowKey::new(6, a, 40000, b, 80);
        let (k2, s2) = FlowKey::new(6, b, 80, a, 40000);
        assert_eq!(k1, k2);
        assert_ne!(s1, s2);
    }

    #[test]
    fn full_set_evicts_least_recently_seen_and_counts_it() {
        let mut t: SetAssoc<u32, u32> = SetAssoc::new(WAYS); // one set
        for k in 0..WAYS as u32 {
            assert_eq!(t.insert(k, k, u64::from(k), u64::MAX), None);
        }
        assert!(t.get_mut(&0, 100).is_some()); // 0 is now the most recent
        let evicted = t.insert(99, 99, 101, u64::MAX);
        assert_eq!(evicted, Some(1));
        assert_eq!(t.stats().evictions, 1);
        assert_eq!(t.stats().entries, WAYS as u64);
        assert!(t.get_mut(&1, 102).is_none());
        assert!(t.get_mut(&99, 102).is_some());
    }

    #[test]
    fn expired_entries_are_not_found_and_are_reused_first() {
        let mut t: SetAssoc<u32, u32> = SetAssoc::new(WAYS);
        t.insert(7, 7, 0, 10);
        assert!(t.get_mut(&7, 9).is_some());
        assert!(t.get_mut(&7, 10).is_none());
        assert_eq!(t.stats().expirations, 1);
        assert_eq!(t.stats().entries, 0);
    }

    #[test]
    fn tcp_handshake_and_teardown_follow_the_state_machine() {
        use crate::packet::TcpFlags as F;
        let s = TcpState::SynSent;
        assert_eq!(
            s.advance(false, F(F::SYN | F::ACK)),
            Some(TcpState::SynRecv)
        );
        assert_eq!(
            s.advance(true, F(F::ACK)),
            None,
            "ACK before SYN-ACK is invalid"
        );
        let e = TcpState::SynRecv.advance(true, F(F::ACK));
        assert_eq!(e, Some(TcpState::Established));
        assert_eq!(TcpState::Established.advance(true, F(F::SYN)), None);
        assert_eq!(
            TcpState::Established.advance(false, F(F::FIN | F::ACK)),
            Some(TcpState::FinWait)
        );
        assert_eq!(
            TcpState::FinWait.advance(true, F(F::FIN | F::ACK)),
            Some(TcpState::Closing)
        );
        assert_eq!(
            TcpState::Established.advance(true, F(F::RST)),
            Some(TcpState::Reset)
        );
    }
}
