//! Compiles a [`Policy`] into lookup structures whose cost does not grow with the rules.
//!
//! Rules are expanded per (source zone, destination zone, protocol class) into sorted,
//! non-overlapping destination-port intervals, each carrying the rules that decide it: a
//! lookup is one hash probe and one binary search. Addresses map to zones by longest
//! prefix, one hash probe per distinct prefix length. The same sweep that builds the
//! intervals finds rules that can never take effect.

use super::model::*;
use ahash::RandomState;
use std::collections::HashMap;
use std::net::IpAddr;

/// Protocol classes the rule index is split by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum ProtoClass {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP.
    Icmp,
    /// ICMPv6.
    Icmpv6,
    /// Any other IP protocol.
    Other,
}

impl ProtoClass {
    /// The class of an IP protocol number.
    #[inline]
    pub fn of(ip_proto: u8) -> ProtoClass {
        match ip_proto {
            6 => ProtoClass::Tcp,
            17 => ProtoClass::Udp,
            1 => ProtoClass::Icmp,
            58 => ProtoClass::Icmpv6,
            _ => ProtoClass::Other,
        }
    }

    fn of_rule(p: Protocol) -> &'static [ProtoClass] {
        match p {
            Protocol::Tcp => &[ProtoClass::Tcp],
            Protocol::Udp => &[ProtoClass::Udp],
            Protocol::Icmp => &[ProtoClass::Icmp],
            Protocol::Icmpv6 => &[ProtoClass::Icmpv6],
            Protocol::Any => &[
                ProtoClass::Tcp,
                ProtoClass::Udp,
                ProtoClass::Icmp,
                ProtoClass::Icmpv6,
                ProtoClass::Other,
            ],
        }
    }
}

/// Key of one rule index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClassKey {
    /// Source zone.
    pub from: ZoneId,
    /// Destination zone.
    pub to: ZoneId,
    /// Protocol class.
    pub proto: ProtoClass,
}

/// The rules that decide one port interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Verdicts {
    /// First deny rule covering it (wins over any allow).
    pub deny: Option<RuleId>,
    /// First allow rule without an app.
    pub allow_any: Option<RuleId>,
    /// First allow rule per app.
    pub allow_app: [Option<RuleId>; AppProto::COUNT],
}

impl Verdicts {
    fn is_empty(&self) -> bool {
        self.deny.is_none()
            && self.allow_any.is_none()
            && self.allow_app.iter().all(Option::is_none)
    }
}

#[derive(Debug, Clone, Copy)]
struct Interval {
    lo: u16,
    hi: u16,
    v: Verdicts,
}

/// The result of a rule lookup for a new flow.
// `NeedsApp` holds a slot per app (26 × 8 bytes): copied by value once per new flow, a
// few nanoseconds (the new-flow bench in docs/benchmarks.md), cheaper than an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A deny rule matches.
    Denied(RuleId),
    /// An allow rule without an app matches.
    Allowed(RuleId),
    /// Allowed only if the payload is one of these apps (the rules per app).
    NeedsApp([Option<RuleId>; AppProto::COUNT]),
    /// No rule matches: default deny.
    NoRule,
}

/// A finding from compilation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finding {
    /// An allow rule every flow of which a deny rule refuses.
    Contradiction {
        /// The allow rule.
        rule: RuleId,
        /// A deny rule that overrides it.
        by: RuleId,
    },
    /// A rule every flow of which an earlier (or broader) rule already decides.
    Shadowed {
        /// The rule that never decides.
        rule: RuleId,
        /// A rule that decides instead.
        by: RuleId,
    },
}

/// Longest-prefix match from addresses to zones.
#[derive(Debug, Default)]
struct Lpm {
    /// (prefix length, masked network → zone), longest first.
    by_len: Vec<(u8, HashMap<u128, ZoneId, RandomState>)>,
}

impl Lpm {
    fn insert(&mut self, net: u128, len: u8, zone: ZoneId) {
        match self.by_len.iter_mut().find(|(l, _)| *l == len) {
            Some((_, m)) => {
                m.insert(net, zone);
            }
            None => {
                let mut m = HashMap::with_hasher(RandomState::new());
                m.insert(net, zone);
                self.by_len.push((len, m));
                self.by_len.sort_by_key(|e| std::cmp::Reverse(e.0));
            }
        }
    }

    #[inline]
    fn lookup(&self, addr: u128, mask: fn(u8) -> u128) -> Option<ZoneId> {
        self.by_len
            .iter()
            .find_map(|(len, m)| m.get(&(addr & mask(*len))).copied())
    }
}

fn mask4(len: u8) -> u128 {
    u128::from(v4_mask(len))
}

/// A policy compiled for lookups. Immutable; reloads build a new one.
#[derive(Debug)]
pub struct CompiledPolicy {
    policy: Policy,
    classes: HashMap<ClassKey, Box<[Interval]>, RandomState>,
    v4: Lpm,
    v6: Lpm,
}

impl CompiledPolicy {
    /// Compiles a validated policy, reporting rules that can never take effect.
    pub fn compile(policy: Policy) -> (CompiledPolicy, Vec<Finding>) {
        let mut v4 = Lpm::default();
        let mut v6 = Lpm::default();
        for (i, z) in policy.zones.iter().enumerate() {
            let id = ZoneId((i + 1) as u16);
            for c in &z.cidrs {
                match c.addr {
                    IpAddr::V4(a) => v4.insert(u128::from(u32::from(a)), c.len, id),
                    IpAddr::V6(a) => v6.insert(u128::from(a), c.len, id),
                }
            }
        }

        // Expand rules into per-class port ranges.
        let mut per_class: HashMap<ClassKey, Vec<(PortRange, RuleId)>> = HashMap::new();
        for (i, r) in policy.rules.iter().enumerate() {
            let id = RuleId(i as u32);
            for &from in &r.from {
                for &to in &r.to {
                    for &proto in ProtoClass::of_rule(r.protocol) {
                        let ports: &[PortRange] =
                            if matches!(proto, ProtoClass::Tcp | ProtoClass::Udp) {
                                &r.ports
                            } else {
                                &[PortRange::ALL]
                            };
                        let e = per_class.entry(ClassKey { from, to, proto }).or_default();
                        e.extend(ports.iter().map(|p| (*p, id)));
                    }
                }
            }
        }

        let mut track = Tracker::new(policy.rules.len());
        let mut classes = HashMap::with_hasher(RandomState::new());
        for (key, entries) in per_class {
            classes.insert(key, sweep(&policy, entries, &mut track).into_boxed_slice());
        }
        let findings = track.findings();
        (
            CompiledPolicy {
                policy,
                classes,
                v4,
                v6,
            },
            findings,
        )
    }

    /// The validated policy this was compiled from.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The zone a CIDR of the policy puts `ip` in, if any (longest prefix wins).
    #[inline]
    pub fn zone_of_ip(&self, ip: IpAddr) -> Option<ZoneId> {
        match ip {
            IpAddr::V4(a) => self.v4.lookup(u128::from(u32::from(a)), mask4),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(a4) => self.v4.lookup(u128::from(u32::from(a4)), mask4),
                None => self.v6.lookup(u128::from(a), v6_mask),
            },
        }
    }

    /// Decides a new flow from zone `from` to zone `to`.
    #[inline]
    pub fn lookup(&self, from: ZoneId, to: ZoneId, ip_proto: u8, dport: u16) -> Lookup {
        let key = ClassKey {
            from,
            to,
            proto: ProtoClass::of(ip_proto),
        };
        let Some(iv) = self.classes.get(&key) else {
            return Lookup::NoRule;
        };
        let port = if matches!(key.proto, ProtoClass::Tcp | ProtoClass::Udp) {
            dport
        } else {
            0
        };
        let idx = iv.partition_point(|i| i.hi < port);
        match iv.get(idx) {
            Some(i) if i.lo <= port => {
                if let Some(d) = i.v.deny {
                    Lookup::Denied(d)
                } else if let Some(a) = i.v.allow_any {
                    Lookup::Allowed(a)
                } else {
                    Lookup::NeedsApp(i.v.allow_app)
                }
            }
            _ => Lookup::NoRule,
        }
    }

    /// Number of port intervals across all rule indexes (a size figure for operators).
    pub fn interval_count(&self) -> usize {
        self.classes.values().map(|v| v.len()).sum()
    }
}

/// Records, per rule, whether it ever decides and what overrides it where it does not.
struct Tracker {
    effective: Vec<bool>,
    denied_by: Vec<Option<RuleId>>,
    shadowed_by: Vec<Option<RuleId>>,
}

impl Tracker {
    fn new(n: usize) -> Self {
        Tracker {
            effective: vec![false; n],
            denied_by: vec![None; n],
            shadowed_by: vec![None; n],
        }
    }

    fn findings(&self) -> Vec<Finding> {
        let mut out = Vec::new();
        for (i, eff) in self.effective.iter().enumerate() {
            if *eff {
                continue;
            }
            let rule = RuleId(i as u32);
            if let Some(by) = self.denied_by[i] {
                out.push(Finding::Contradiction { rule, by });
            } else if let Some(by) = self.shadowed_by[i] {
                out.push(Finding::Shadowed { rule, by });
            }
        }
        out
    }
}

/// Builds the sorted, merged intervals of one class.
fn sweep(policy: &Policy, mut entries: Vec<(PortRange, RuleId)>, t: &mut Tracker) -> Vec<Interval> {
    entries.sort_by_key(|(p, id)| (p.lo, *id));
    let mut bounds: Vec<u32> = entries
        .iter()
        .flat_map(|(p, _)| [u32::from(p.lo), u32::from(p.hi) + 1])
        .collect();
    bounds.sort_unstable();
    bounds.dedup();

    let mut out: Vec<Interval> = Vec::new();
    let mut active: Vec<(PortRange, RuleId)> = Vec::new();
    let mut next = 0;
    for w in bounds.windows(2) {
        let (start, end) = (w[0], w[1] - 1);
        active.retain(|(p, _)| u32::from(p.hi) >= start);
        while next < entries.len() && u32::from(entries[next].0.lo) <= start {
            active.push(entries[next]);
            next += 1;
        }
        if active.is_empty() {
            continue;
        }
        let v = decide(policy, &active, t);
        let (lo, hi) = (start as u16, end as u16);
        match out.last_mut() {
            Some(last) if last.v == v && u32::from(last.hi) + 1 == start => last.hi = hi,
            _ if v.is_empty() => {}
            _ => out.push(Interval { lo, hi, v }),
        }
    }
    out
}

/// The verdicts of one elementary interval, with reachability bookkeeping.
fn decide(policy: &Policy, active: &[(PortRange, RuleId)], t: &mut Tracker) -> Verdicts {
    let rule = |id: RuleId| &policy.rules[id.0 as usize];
    let mut v = Verdicts::default();
    for &(_, id) in active {
        let r = rule(id);
        match (r.action, r.app) {
            (Action::Deny, _) => v.deny = Some(v.deny.map_or(id, |d| d.min(id))),
            (Action::Allow, None) => v.allow_any = Some(v.allow_any.map_or(id, |d| d.min(id))),
            (Action::Allow, Some(app)) => {
                let slot = &mut v.allow_app[app.index()];
                *slot = Some(slot.map_or(id, |d| d.min(id)));
            }
        }
    }
    // Who decides here, and who is overridden.
    for &(_, id) in active {
        let r = rule(id);
        let i = id.0 as usize;
        let winner = match (v.deny, r.action) {
            (Some(d), Action::Allow) => {
                t.denied_by[i].get_or_insert(d);
                continue;
            }
            (Some(d), Action::Deny) => d,
            (None, _) => match (v.allow_any, r.app) {
                (Some(a), _) => a,
                (None, Some(app)) => v.allow_app[app.index()].unwrap_or(id),
                (None, None) => id,
            },
        };
        if winner == id {
            t.effective[i] = true;
        } else {
            t.shadowed_by[i].get_or_insert(winner);
        }
    }
    // Only the deciding rules are kept: an allow under a deny never decides.
    if v.deny.is_some() {
        v.allow_any = None;
        v.allow_app = [None; AppProto::COUNT];
    } else if v.allow_any.is_some() {
        v.allow_app = [None; AppProto::COUNT];
    }
    v
}
