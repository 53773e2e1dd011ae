//! Folding a table's rules into set lookups.
//!
//! A policy generated per service and port renders as one rule per address range × port
//! range; at 10,000 rules the first packet of every new flow walks them all. A run of
//! consecutive rules with the same verdict means "any of these", whatever their order, so
//! [`fold`] turns each run into one lookup per key shape in a named set with
//! concatenated, interval keys (`ip saddr . meta l4proto . th dport`), as `nft` writes
//! them. The kernel keeps such a set in its pipapo backend: a lookup costs about the same
//! for ten elements as for ten thousand.
//!
//! Rules are only folded inside a run, never across a rule with another verdict, so deny
//! rules still come before allow rules and the guard before the `unknown` allows. The
//! elements of a set are made disjoint first: the kernel refuses an interval element whose
//! start or end falls inside another (ENOTEMPTY), and rules of different zones or ports
//! may well overlap.

use super::{Match, NftRule, NftTable, NftVerdict};
use std::collections::BTreeMap;

/// The most kernel memory one set's lookup tables may need, estimated as the pipapo
/// backend lays them out ([`kernel_bytes`]); a group of rules that would need more stays
/// plain rules. Ranges that are not prefixes cost the most: the kernel expands each field
/// of each element into prefixes (an IPv6 range that carves one address out of a /16 is
/// about 220 of them), and a pod carved out of an IPv6 CIDR zone with thousands of port
/// rules would otherwise take hundreds of MiB.
pub const SET_MAX_KERNEL_BYTES: u64 = 32 << 20;

/// How many prefixes cover `[lo, hi]`.
fn prefix_count(mut lo: u128, hi: u128) -> u64 {
    let mut n = 0u64;
    loop {
        let span = hi - lo;
        // The largest aligned block at `lo` that stays within `hi`.
        let align = if lo == 0 { 128 } else { lo.trailing_zeros() };
        let fit = match span.checked_add(1) {
            None => 128,
            Some(n) => 127 - n.leading_zeros(),
        };
        let k = align.min(fit);
        n += 1;
        if k >= 128 {
            return n;
        }
        match lo.checked_add(1u128 << k) {
            Some(next) if next <= hi && next != 0 => lo = next,
            _ => return n,
        }
    }
}

/// The kernel memory a set of these elements needs in the pipapo backend, roughly: each
/// field of each element expands into its prefixes (that field's "rules"); a field's lookup
/// table holds a bit per rule for each of 16 buckets of each 4-bit group of the key (half a
/// byte per key bit per rule), plus a 16-byte mapping entry per rule; and the backend keeps
/// a working copy. (Measured: 20 IPv6 elements of about 200 x 1 x 30 prefixes took about
/// 4 MiB with their element objects; this counts about 0.7 MiB of lookup tables.)
pub fn kernel_bytes(key: &[KeyField], elements: &[Element]) -> u64 {
    key.iter()
        .enumerate()
        .map(|(i, f)| {
            let rules: u64 = elements
                .iter()
                .filter_map(|e| e.get(i))
                .map(|(lo, hi)| prefix_count(*lo, *hi))
                .fold(0u64, u64::saturating_add);
            rules.saturating_mul(4 * f.width() as u64 + 16)
        })
        .fold(0u64, u64::saturating_add)
        .saturating_mul(2)
}

/// A run needs at least this many elements of one key shape to become a set; shorter
/// runs stay plain rules, which read better in `nft list ruleset`.
pub const SET_MIN_ELEMENTS: usize = 4;

/// An inclusive range of one key field's values.
pub type Span = (u128, u128);

/// One element: a span per key field.
pub type Element = Vec<Span>;

/// One field of a set's key, in the order the key concatenates them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyField {
    /// The source (`src`) or destination address, IPv4 or IPv6 (`v6`).
    Addr {
        /// IPv6.
        v6: bool,
        /// Source rather than destination.
        src: bool,
    },
    /// `meta l4proto`.
    L4Proto,
    /// `th dport` (the transport header's bytes 2..4).
    Dport,
}

impl KeyField {
    /// Bytes of the field.
    pub fn width(self) -> usize {
        match self {
            KeyField::Addr { v6: false, .. } => 4,
            KeyField::Addr { v6: true, .. } => 16,
            KeyField::L4Proto => 1,
            KeyField::Dport => 2,
        }
    }

    /// Bytes the field takes in the key: each field starts a 32-bit register.
    pub fn padded_len(self) -> usize {
        self.width().div_ceil(4) * 4
    }

    /// The largest value.
    pub fn max(self) -> u128 {
        match self.width() {
            16 => u128::MAX,
            n => (1u128 << (8 * n)) - 1,
        }
    }

    /// The value as the key's bytes: big-endian, padded with zeros to the register.
    pub fn encode(self, v: u128, out: &mut Vec<u8>) {
        let be = v.to_be_bytes();
        out.extend_from_slice(&be[16 - self.width()..]);
        out.resize(out.len() + self.padded_len() - self.width(), 0);
    }
}

/// A named set of interval elements over a concatenated key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftSet {
    /// The set's name in the table.
    pub name: String,
    /// Its key fields.
    pub key: Vec<KeyField>,
    /// The elements, disjoint: per key field, an inclusive range of values.
    pub elements: Vec<Element>,
}

impl NftSet {
    /// True when some element holds `values` (one per key field).
    pub fn contains(&self, values: &[u128]) -> bool {
        self.elements.iter().any(|e| {
            e.len() == values.len()
                && e.iter()
                    .zip(values)
                    .all(|((lo, hi), v)| (*lo..=*hi).contains(v))
        })
    }

    /// Bytes of the key.
    pub fn key_len(&self) -> usize {
        self.key.iter().map(|f| f.padded_len()).sum()
    }
}

/// A rule's matches as one element of a key, if the rule can join a set.
fn shape(r: &NftRule) -> Option<(Vec<KeyField>, Element)> {
    if !matches!(r.verdict, NftVerdict::Accept | NftVerdict::Drop) {
        return None;
    }
    let (mut addr, mut proto, mut port) = (None, None, None);
    for m in &r.matches {
        match m {
            Match::Saddr(a) | Match::Daddr(a) if addr.is_none() => {
                let src = matches!(m, Match::Saddr(_));
                addr = Some((KeyField::Addr { v6: a.is_v6(), src }, a.bits()));
            }
            Match::L4Proto(p) if proto.is_none() => proto = Some(*p),
            Match::Dport(d) if port.is_none() => port = Some(*d),
            _ => return None,
        }
    }
    let any_proto = (0, u128::from(u8::MAX));
    let p = |p: u8| (u128::from(p), u128::from(p));
    let d = |d: crate::policy::PortRange| (u128::from(d.lo), u128::from(d.hi));
    Some(match (addr, proto, port) {
        (Some((a, ab)), Some(pr), Some(po)) => (
            vec![a, KeyField::L4Proto, KeyField::Dport],
            vec![ab, p(pr), d(po)],
        ),
        (Some((a, ab)), Some(pr), None) => (vec![a, KeyField::L4Proto], vec![ab, p(pr)]),
        (Some((a, ab)), None, None) => (vec![a, KeyField::L4Proto], vec![ab, any_proto]),
        (None, Some(pr), Some(po)) => {
            (vec![KeyField::L4Proto, KeyField::Dport], vec![p(pr), d(po)])
        }
        _ => return None,
    })
}

/// Folds every run of same-verdict rules that has at least `min` elements of one key
/// shape into a set and one lookup rule.
pub(super) fn fold(mut t: NftTable, min: usize) -> NftTable {
    let mut sets: Vec<NftSet> = Vec::new();
    for chain in &mut t.chains {
        let rules = std::mem::take(&mut chain.rules);
        let mut out = Vec::with_capacity(rules.len());
        let mut i = 0;
        while i < rules.len() {
            if shape(&rules[i]).is_none() {
                out.push(rules[i].clone());
                i += 1;
                continue;
            }
            let verdict = rules[i].verdict.clone();
            let mut groups: BTreeMap<Vec<KeyField>, Vec<(usize, Element)>> = BTreeMap::new();
            let mut j = i;
            while let Some(r) = rules.get(j).filter(|r| r.verdict == verdict) {
                let Some((key, element)) = shape(r) else {
                    break;
                };
                groups.entry(key).or_default().push((j, element));
                j += 1;
            }
            let mut kept: Vec<usize> = Vec::new();
            for (key, members) in groups {
                if members.len() < min {
                    kept.extend(members.iter().map(|(k, _)| *k));
                    continue;
                }
                let boxes: Vec<&[(u128, u128)]> = members.iter().map(|(_, e)| &e[..]).collect();
                let elements = disjoint(&boxes);
                if kernel_bytes(&key, &elements) > SET_MAX_KERNEL_BYTES {
                    kept.extend(members.iter().map(|(k, _)| *k));
                    continue;
                }
                let name = format!("{}_{}", chain.name, sets.len() + 1);
                let comment = summary(members.iter().map(|(k, _)| rules[*k].comment.as_str()));
                out.push(NftRule {
                    matches: vec![Match::InSet {
                        set: name.clone(),
                        key: key.clone(),
                    }],
                    verdict: verdict.clone(),
                    comment: format!("{comment} (set {name})"),
                });
                sets.push(NftSet {
                    name,
                    key,
                    elements,
                });
            }
            kept.sort_unstable();
            out.extend(kept.into_iter().map(|k| rules[k].clone()));
            i = j;
        }
        chain.rules = out;
    }
    t.sets.extend(sets);
    t
}

/// One comment for the rules a set replaces: the first, the count, the last.
fn summary<'a>(comments: impl Iterator<Item = &'a str>) -> String {
    let mut distinct: Vec<&str> = Vec::new();
    for c in comments {
        if distinct.last() != Some(&c) && !distinct.contains(&c) {
            distinct.push(c);
        }
    }
    match distinct.as_slice() {
        [] => String::new(),
        [one] => (*one).to_string(),
        [first, .., last] => format!("{first} .. {last} ({} rules)", distinct.len()),
    }
}

/// The union of `boxes` (each an inclusive range per dimension, all of one dimension
/// count) as disjoint boxes, in order: split along the first dimension at every bound,
/// make each slice's cross-section disjoint the same way, and merge neighbouring slices
/// whose cross-sections are equal. The result depends only on the union.
pub(super) fn disjoint(boxes: &[&[Span]]) -> Vec<Element> {
    let Some(first) = boxes.first() else {
        return Vec::new();
    };
    if first.len() <= 1 {
        let mut spans: Vec<(u128, u128)> =
            boxes.iter().filter_map(|b| b.first().copied()).collect();
        spans.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(spans.len());
        for (lo, hi) in spans {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        return merged.into_iter().map(|s| vec![s]).collect();
    }
    let mut starts: Vec<u128> = boxes
        .iter()
        .flat_map(|b| [Some(b[0].0), b[0].1.checked_add(1)])
        .flatten()
        .collect();
    starts.sort_unstable();
    starts.dedup();
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_unstable_by_key(|&b| boxes[b][0].0);
    let mut out = Vec::new();
    let flush = |out: &mut Vec<Element>, slice: Option<(u128, u128, Vec<Element>)>| {
        if let Some((lo, hi, cross)) = slice {
            for c in cross {
                let mut b = Vec::with_capacity(c.len() + 1);
                b.push((lo, hi));
                b.extend(c);
                out.push(b);
            }
        }
    };
    let (mut next, mut active, mut slice) = (0usize, Vec::<usize>::new(), None);
    for (k, &lo) in starts.iter().enumerate() {
        let hi = starts.get(k + 1).map_or(u128::MAX, |n| n - 1);
        while let Some(&b) = order.get(next).filter(|&&b| boxes[b][0].0 <= lo) {
            active.push(b);
            next += 1;
        }
        active.retain(|&b| boxes[b][0].1 >= lo);
        if active.is_empty() {
            flush(&mut out, slice.take());
            continue;
        }
        let rest: Vec<&[(u128, u128)]> = active.iter().map(|&b| &boxes[b][1..]).collect();
        let cross = disjoint(&rest);
        slice = match slice.take() {
            Some((plo, phi, pc)) if phi.checked_add(1) == Some(lo) && pc == cross => {
                Some((plo, hi, pc))
            }
            other => {
                flush(&mut out, other);
                Some((lo, hi, cross))
            }
        };
    }
    flush(&mut out, slice);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn covers(boxes: &[Vec<(u128, u128)>], p: &[u128]) -> bool {
        boxes
            .iter()
            .any(|b| b.iter().zip(p).all(|((lo, hi), v)| (*lo..=*hi).contains(v)))
    }

    fn overlap(a: &[(u128, u128)], b: &[(u128, u128)]) -> bool {
        a.iter().zip(b).all(|(x, y)| x.0 <= y.1 && y.0 <= x.1)
    }

    #[test]
    fn disjoint_boxes_cover_exactly_the_union_and_never_overlap() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            u128::from(seed % n)
        };
        for _ in 0..300 {
            let count = 1 + rnd(12) as usize;
            let input: Vec<Vec<(u128, u128)>> = (0..count)
                .map(|_| {
                    (0..3)
                        .map(|_| {
                            let lo = rnd(10);
                            (lo, lo + rnd(4))
                        })
                        .collect()
                })
                .collect();
            let refs: Vec<&[(u128, u128)]> = input.iter().map(|b| &b[..]).collect();
            let out = disjoint(&refs);
            for (i, a) in out.iter().enumerate() {
                for b in &out[i + 1..] {
                    assert!(!overlap(a, b), "{a:?} and {b:?} overlap; input {input:?}");
                }
            }
            for x in 0..15 {
                for y in 0..15 {
                    for z in 0..15 {
                        let p = [x, y, z];
                        assert_eq!(covers(&input, &p), covers(&out, &p), "{p:?} in {input:?}");
                    }
                }
            }
            // The same union given in another order folds the same way.
            let mut rev = refs.clone();
            rev.reverse();
            assert_eq!(disjoint(&rev), out);
        }
    }

    #[test]
    fn the_whole_range_of_a_field_is_handled_at_its_maximum() {
        let all = [(0, u128::MAX), (6, 6)];
        let host = [(5, 5), (0, 255)];
        let out = disjoint(&[&all[..], &host[..]]);
        assert!(covers(&out, &[u128::MAX, 6]));
        assert!(covers(&out, &[5, 17]));
        assert!(!covers(&out, &[4, 17]));
        assert_eq!(
            disjoint(&[&[(0, u128::MAX)][..], &[(3, 9)][..]]),
            vec![vec![(0, u128::MAX)]]
        );
    }

    #[test]
    fn prefixes_cover_a_range_exactly() {
        assert_eq!(prefix_count(0, 0), 1);
        assert_eq!(prefix_count(0, 255), 1);
        assert_eq!(prefix_count(1, 65534), 30);
        assert_eq!(prefix_count(0, u128::MAX), 1);
        assert_eq!(prefix_count(1, u128::MAX), 128);
        assert_eq!(prefix_count(u128::MAX, u128::MAX), 1);
        // Brute force on small ranges: the greedy cover is the minimal one.
        for lo in 0u128..64 {
            for hi in lo..64 {
                let mut n = 0;
                let mut a = lo;
                while a <= hi {
                    let mut k = 0;
                    while a % (1 << (k + 1)) == 0 && a + (1 << (k + 1)) - 1 <= hi {
                        k += 1;
                    }
                    a += 1 << k;
                    n += 1;
                }
                assert_eq!(prefix_count(lo, hi), n, "{lo}-{hi}");
            }
        }
    }

    #[test]
    fn a_group_whose_set_would_cost_the_kernel_too_much_stays_plain_rules() {
        use super::super::{AddrRange, NftChain};
        let rule = |k: u128, ports: (u16, u16)| NftRule {
            matches: vec![
                // Odd IPv6 ranges: about 200 prefixes each.
                Match::Saddr(AddrRange::from_bits(
                    (k << 100) + 1,
                    ((k + 1) << 100) - 2,
                    true,
                )),
                Match::L4Proto(6),
                Match::Dport(crate::policy::PortRange {
                    lo: ports.0,
                    hi: ports.1,
                }),
            ],
            verdict: NftVerdict::Accept,
            comment: format!("allow rule r{k}"),
        };
        let table = |rules: Vec<NftRule>| NftTable {
            name: "t".into(),
            sets: vec![],
            name_sets: vec![],
            chains: vec![NftChain {
                name: "c".into(),
                hook: None,
                rules,
            }],
        };
        // 5,000 elements of about 200 address prefixes: about 160 MiB of lookup tables.
        let costly = fold(table((0..5000).map(|k| rule(k, (1, 65534))).collect()), 4);
        assert!(costly.sets.is_empty());
        assert_eq!(costly.rule_count(), 5000);
        // 100 of them: about 3 MiB, inside the budget.
        let cheap = fold(table((0..100).map(|k| rule(k, (1, 65534))).collect()), 4);
        assert_eq!(cheap.sets.len(), 1);
        assert!(kernel_bytes(&cheap.sets[0].key, &cheap.sets[0].elements) < SET_MAX_KERNEL_BYTES);
    }

    #[test]
    fn key_fields_encode_big_endian_in_whole_registers() {
        let mut k = Vec::new();
        KeyField::Addr {
            v6: false,
            src: true,
        }
        .encode(0x0a64_0001, &mut k);
        KeyField::L4Proto.encode(6, &mut k);
        KeyField::Dport.encode(8080, &mut k);
        assert_eq!(k, [10, 100, 0, 1, 6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        assert_eq!(KeyField::Dport.max(), 65535);
        assert_eq!(
            KeyField::Addr {
                v6: true,
                src: false
            }
            .max(),
            u128::MAX
        );
    }
}
