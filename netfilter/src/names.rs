//! Egress by DNS name: zones written as names (`names: [api.acquirer.example,
//! "*.psp.example"]`) whose addresses each pod learns from its own DNS answers.
//!
//! netd sees every DNS query the pod sends and every answer it gets back (on flows the
//! policy already allows). A query is remembered by (resolver, client port, transaction
//! id, name); an answer that matches one — and only such an answer, so a datagram forged
//! from outside does not teach anything — is read: the A and AAAA records of the asked
//! name and of the CNAME chain from it. When any name of the chain matches a name zone,
//! each address joins that zone *for this pod*, for the record's TTL held between the
//! policy's floor and cap (`spec.names`). A new flow from the pod to such an address is
//! decided as a flow to the name zone; an address the pod never resolved stays what it
//! was (a CIDR zone or `unknown`). netd runs no resolver and sends nothing.
//!
//! The table is bounded ([`MAX_ADDRESSES`], [`MAX_QUERIES`]); when full, expired entries
//! go first and what still does not fit is counted, not kept.

use crate::inspect::proto::read_name;
use crate::policy::{name_matches, NamesTtl, Policy, ZoneId};
use std::collections::HashMap;
use std::net::IpAddr;

/// Addresses a pod may have learned at once.
pub const MAX_ADDRESSES: usize = 16_384;
/// Queries awaiting their answer.
pub const MAX_QUERIES: usize = 4_096;
/// How long a query waits for its answer.
const QUERY_WAIT_NS: u64 = 10 * SEC;
const SEC: u64 = 1_000_000_000;

/// An address a pod learned for a name zone (for the nftables set and the counters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    /// The address.
    pub ip: IpAddr,
    /// The name zone.
    pub zone: ZoneId,
    /// The name the pod asked for.
    pub name: String,
    /// Seconds it stays (the answer's TTL within the policy's bounds).
    pub ttl: u32,
}

#[derive(Debug, Clone)]
struct Entry {
    zone: ZoneId,
    /// The name that matched (kept so a reload can place it again).
    name: String,
    expires: u64,
}

/// What a DNS answer says, read from hostile bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Transaction id.
    pub id: u16,
    /// The question name (lower case, no final dot).
    pub qname: String,
    /// Every name of the CNAME chain from the question, the question first.
    pub chain: Vec<String>,
    /// Addresses of names in the chain, with their TTLs.
    pub addrs: Vec<(IpAddr, u32)>,
}

/// Reads a DNS response: header, one question, the answer section. `None` for anything
/// else (a query, no question, a truncated or malformed record).
pub fn parse_answer(msg: &[u8]) -> Option<Answer> {
    if msg.len() < 12 || msg[2] & 0x80 == 0 {
        return None;
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let rcode = msg[3] & 0x0f;
    let qd = u16::from_be_bytes([msg[4], msg[5]]);
    let an = usize::from(u16::from_be_bytes([msg[6], msg[7]]));
    if qd != 1 || rcode != 0 {
        return None;
    }
    let (qname, mut i) = read_name(msg, 12)?;
    i = i.checked_add(4).filter(|n| *n <= msg.len())?;
    let mut records = Vec::new();
    for _ in 0..an.min(64) {
        let (owner, at) = read_name(msg, i)?;
        let h = msg.get(at..at + 10)?;
        let ty = u16::from_be_bytes([h[0], h[1]]);
        let class = u16::from_be_bytes([h[2], h[3]]);
        let ttl = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let len = usize::from(u16::from_be_bytes([h[8], h[9]]));
        let data_at = at + 10;
        let data = msg.get(data_at..data_at + len)?;
        i = data_at + len;
        if class != 1 {
            continue;
        }
        match (ty, len) {
            (1, 4) => records.push((
                owner,
                Rr::Addr(IpAddr::from([data[0], data[1], data[2], data[3]])),
                ttl,
            )),
            (28, 16) => {
                let mut b = [0u8; 16];
                b.copy_from_slice(data);
                records.push((owner, Rr::Addr(IpAddr::from(b)), ttl));
            }
            (5, _) => {
                let (target, _) = read_name(msg, data_at)?;
                records.push((owner, Rr::Cname(target), ttl));
            }
            _ => {}
        }
    }
    // Follow the CNAME chain from the question (records may come in any order).
    let mut chain = vec![qname.clone()];
    for _ in 0..8 {
        let before = chain.len();
        for (owner, rr, _) in &records {
            if let Rr::Cname(t) = rr {
                if chain.contains(owner) && !chain.contains(t) {
                    chain.push(t.clone());
                }
            }
        }
        if chain.len() == before {
            break;
        }
    }
    let addrs = records
        .iter()
        .filter_map(|(owner, rr, ttl)| match rr {
            Rr::Addr(a) if chain.contains(owner) => Some((*a, *ttl)),
            _ => None,
        })
        .collect();
    Some(Answer {
        id,
        qname,
        chain,
        addrs,
    })
}

enum Rr {
    Addr(IpAddr),
    Cname(String),
}

/// One pod's learned addresses.
#[derive(Debug, Default)]
pub struct NameTable {
    /// Name zones and their patterns.
    zones: Vec<(ZoneId, Vec<String>)>,
    ttl: NamesTtl,
    /// Learn mode: every name the pod resolves is kept (zone `unknown` when no name zone
    /// lists it), so records can name destinations and `policy suggest` propose zones.
    learn_all: bool,
    by_ip: HashMap<IpAddr, Vec<Entry>>,
    queries: HashMap<(IpAddr, u16, u16), (String, u64)>,
    outbox: Vec<Learned>,
    /// Answers that matched no query the pod sent (forged or late), ignored.
    pub unsolicited: u64,
    /// Addresses not kept because the table was full.
    pub dropped: u64,
}

impl NameTable {
    /// The name zones of `policy`.
    pub fn new(policy: &Policy) -> Self {
        let mut t = NameTable::default();
        t.set_policy(policy);
        t
    }

    /// A new policy: its name zones; learned addresses are placed again by their names
    /// (zone ids may have moved), and those whose names no zone matches any more go.
    pub fn set_policy(&mut self, policy: &Policy) {
        self.zones = policy
            .zones
            .iter()
            .enumerate()
            .filter(|(_, z)| !z.names.is_empty())
            .map(|(i, z)| (ZoneId((i + 1) as u16), z.names.clone()))
            .collect();
        self.ttl = policy.names_ttl;
        let zones = &self.zones;
        let learn_all = self.learn_all;
        self.by_ip.retain(|_, es| {
            es.retain_mut(|e| match zone_of_name(zones, &e.name) {
                Some(z) => {
                    e.zone = z;
                    true
                }
                None => {
                    e.zone = ZoneId::UNKNOWN;
                    learn_all
                }
            });
            !es.is_empty()
        });
    }

    /// Whether the policy has name zones, or learn mode watches names (nothing to do
    /// otherwise).
    pub fn active(&self) -> bool {
        !self.zones.is_empty() || self.learn_all
    }

    /// Learn mode on or off for this pod (see `learn_all`).
    pub fn set_learn_all(&mut self, on: bool) {
        self.learn_all = on;
        if !on {
            self.by_ip.retain(|_, es| {
                es.retain(|e| e.zone != ZoneId::UNKNOWN);
                !es.is_empty()
            });
        }
    }

    /// The name the pod resolved `ip` from (the most recent one still valid).
    pub fn name_of(&self, ip: IpAddr, now: u64) -> Option<&str> {
        self.by_ip
            .get(&ip)?
            .iter()
            .filter(|e| e.expires > now)
            .max_by_key(|e| e.expires)
            .map(|e| e.name.as_str())
    }

    /// Addresses held.
    pub fn len(&self) -> usize {
        self.by_ip.values().map(Vec::len).sum()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    /// A query the pod sent to `server` from `port`.
    pub fn query(&mut self, server: IpAddr, port: u16, msg: &[u8], now: u64) {
        let Some(name) = crate::inspect::proto::dns_query_name(msg) else {
            return;
        };
        if zone_of_name(&self.zones, &name).is_none() && !self.learn_all {
            return; // Answers about other names teach nothing.
        }
        if self.queries.len() >= MAX_QUERIES {
            self.queries.retain(|_, (_, exp)| *exp > now);
            if self.queries.len() >= MAX_QUERIES {
                return;
            }
        }
        let id = u16::from_be_bytes([msg[0], msg[1]]);
        self.queries
            .insert((server, port, id), (name, now + QUERY_WAIT_NS));
    }

    /// An answer from `server` to the pod's `port`: learns its addresses when it answers
    /// a query the pod sent. Returns how many addresses it learned.
    pub fn answer(&mut self, server: IpAddr, port: u16, msg: &[u8], now: u64) -> usize {
        let Some(a) = parse_answer(msg) else {
            return 0;
        };
        let key = (server, port, a.id);
        match self.queries.get(&key) {
            Some((name, exp)) if *exp > now && *name == a.qname => {
                self.queries.remove(&key);
            }
            _ => {
                self.unsolicited += 1;
                return 0;
            }
        }
        let zone = match a.chain.iter().find_map(|n| zone_of_name(&self.zones, n)) {
            Some(z) => z,
            None if self.learn_all => ZoneId::UNKNOWN,
            None => return 0,
        };
        let mut n = 0;
        for (ip, ttl) in a.addrs {
            let ttl = ttl.clamp(self.ttl.min, self.ttl.max);
            let expires = now + u64::from(ttl) * SEC;
            if self.len() >= MAX_ADDRESSES && !self.by_ip.contains_key(&ip) {
                self.by_ip.retain(|_, es| {
                    es.retain(|e| e.expires > now);
                    !es.is_empty()
                });
                if self.len() >= MAX_ADDRESSES {
                    self.dropped += 1;
                    continue;
                }
            }
            let es = self.by_ip.entry(ip).or_default();
            match es.iter_mut().find(|e| e.zone == zone) {
                Some(e) => {
                    e.expires = e.expires.max(expires);
                    e.name.clone_from(&a.qname);
                }
                None => es.push(Entry {
                    zone,
                    name: a.qname.clone(),
                    expires,
                }),
            }
            if zone != ZoneId::UNKNOWN {
                self.outbox.push(Learned {
                    ip,
                    zone,
                    name: a.qname.clone(),
                    ttl,
                });
            }
            n += 1;
        }
        n
    }

    /// The name zones `ip` is in for this pod now, with the name and seconds left.
    pub fn zones_of(&self, ip: IpAddr, now: u64) -> impl Iterator<Item = (ZoneId, &str, u32)> {
        self.by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .filter(move |e| e.expires > now)
            .map(move |e| {
                let left = (e.expires - now).div_ceil(SEC);
                (
                    e.zone,
                    e.name.as_str(),
                    u32::try_from(left).unwrap_or(u32::MAX),
                )
            })
    }

    /// Addresses learned (or used for a new flow) since the last call: what the nftables
    /// set must hold.
    pub fn take_learned(&mut self) -> Vec<Learned> {
        std::mem::take(&mut self.outbox)
    }

    /// Every address still held, again (after the nftables table was replaced).
    pub fn replay(&mut self, now: u64) {
        let all: Vec<Learned> = self
            .by_ip
            .iter()
            .flat_map(|(ip, es)| {
                es.iter()
                    .filter(move |e| e.expires > now && e.zone != ZoneId::UNKNOWN)
                    .map(move |e| Learned {
                        ip: *ip,
                        zone: e.zone,
                        name: e.name.clone(),
                        ttl: u32::try_from((e.expires - now).div_ceil(SEC)).unwrap_or(u32::MAX),
                    })
            })
            .collect();
        self.outbox.extend(all);
    }

    /// Tells the nftables set again about an address a new flow uses (the table may have
    /// been replaced since it was learned).
    pub fn touch(&mut self, ip: IpAddr, zone: ZoneId, now: u64) {
        let found = self
            .zones_of(ip, now)
            .find(|(z, _, _)| *z == zone)
            .map(|(_, name, ttl)| (name.to_string(), ttl));
        if let Some((name, ttl)) = found {
            self.outbox.push(Learned {
                ip,
                zone,
                name,
                ttl,
            });
        }
    }
}

/// The first name zone a name belongs to.
fn zone_of_name(zones: &[(ZoneId, Vec<String>)], name: &str) -> Option<ZoneId> {
    zones
        .iter()
        .find(|(_, ps)| ps.iter().any(|p| name_matches(p, name)))
        .map(|(z, _)| *z)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A DNS message: `qname`, then answers (owner, type, ttl, data).
    pub(crate) fn message(
        id: u16,
        response: bool,
        qname: &str,
        answers: &[(&str, u16, u32, Vec<u8>)],
    ) -> Vec<u8> {
        let name = |n: &str| {
            let mut b = Vec::new();
            for l in n.split('.') {
                b.push(l.len() as u8);
                b.extend_from_slice(l.as_bytes());
            }
            b.push(0);
            b
        };
        let mut m = id.to_be_bytes().to_vec();
        m.extend_from_slice(&[
            if response { 0x81 } else { 0x01 },
            if response { 0x80 } else { 0 },
        ]);
        m.extend_from_slice(&[0, 1, 0, answers.len() as u8, 0, 0, 0, 0]);
        m.extend(name(qname));
        m.extend_from_slice(&[0, 1, 0, 1]);
        for (owner, ty, ttl, data) in answers {
            m.extend(name(owner));
            m.extend_from_slice(&ty.to_be_bytes());
            m.extend_from_slice(&[0, 1]);
            m.extend_from_slice(&ttl.to_be_bytes());
            let data = if *ty == 5 {
                name(std::str::from_utf8(data).unwrap_or("x"))
            } else {
                data.clone()
            };
            m.extend_from_slice(&(data.len() as u16).to_be_bytes());
            m.extend(data);
        }
        m
    }

    fn policy() -> Policy {
        crate::policy::load_str(
            r#"
apiVersion: enclave.io/v1alpha1
kind: ZonePolicy
metadata: {name: n, version: 1}
spec:
  names: {minTtlSeconds: 30, maxTtlSeconds: 3600}
  zones:
    - {name: api, selector: {namespaces: [api]}}
    - {name: psp, names: ["*.psp.example", api.acquirer.example]}
  rules: []
"#,
            "n.yaml",
        )
        .map(|l| l.compiled.policy().clone())
        .unwrap_or_else(|e| panic!("{e}"))
    }

    const DNS: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 10));

    #[test]
    fn an_answer_to_the_pods_own_query_teaches_its_addresses_with_bounded_ttl() {
        let mut t = NameTable::new(&policy());
        let q = message(7, false, "eu.psp.example", &[]);
        t.query(DNS, 40000, &q, 0);
        let a = message(
            7,
            true,
            "eu.psp.example",
            &[
                ("eu.psp.example", 5, 300, b"edge.cdn.example".to_vec()),
                ("edge.cdn.example", 1, 5, vec![192, 0, 2, 10]),
                ("other.example", 1, 300, vec![192, 0, 2, 66]),
            ],
        );
        assert_eq!(t.answer(DNS, 40000, &a, 1), 1);
        let ip: IpAddr = "192.0.2.10".parse().unwrap_or(DNS);
        let z: Vec<_> = t.zones_of(ip, 2).collect();
        assert_eq!(z.len(), 1);
        assert_eq!((z[0].0, z[0].1), (ZoneId(2), "eu.psp.example"));
        assert_eq!(z[0].2, 30, "a 5 s TTL is held to the 30 s floor");
        assert_eq!(t.zones_of(ip, 31 * SEC).count(), 0, "expired");
        // The record outside the chain taught nothing.
        assert_eq!(
            t.zones_of("192.0.2.66".parse().unwrap_or(DNS), 2).count(),
            0
        );
        assert_eq!(t.take_learned().len(), 1);
    }

    #[test]
    fn answers_nobody_asked_for_teach_nothing() {
        let mut t = NameTable::new(&policy());
        let a = message(
            9,
            true,
            "api.acquirer.example",
            &[("api.acquirer.example", 1, 60, vec![192, 0, 2, 7])],
        );
        assert_eq!(t.answer(DNS, 40000, &a, 1), 0, "no query");
        t.query(
            DNS,
            40000,
            &message(9, false, "api.acquirer.example", &[]),
            0,
        );
        assert_eq!(
            t.answer("10.0.0.99".parse().unwrap_or(DNS), 40000, &a, 1),
            0,
            "other server"
        );
        assert_eq!(t.answer(DNS, 40001, &a, 1), 0, "other port");
        let other = message(
            9,
            true,
            "x.acquirer.example",
            &[("x.acquirer.example", 1, 60, vec![192, 0, 2, 7])],
        );
        assert_eq!(t.answer(DNS, 40000, &other, 1), 0, "other name");
        assert_eq!(t.unsolicited, 4);
        // A name no zone lists is not even remembered as a query.
        t.query(DNS, 40000, &message(10, false, "www.example.com", &[]), 0);
        assert_eq!(t.queries.len(), 1);
    }

    #[test]
    fn hostile_answers_are_refused_without_a_panic() {
        let a = message(
            1,
            true,
            "a.psp.example",
            &[("a.psp.example", 1, 60, vec![1, 2, 3, 4])],
        );
        for n in 0..a.len() {
            let _ = parse_answer(&a[..n]);
        }
        let mut looped = a.clone();
        // A compression pointer to itself in the answer's owner name.
        let at = looped.len() - 4 - 10 - 15;
        looped[at] = 0xc0;
        looped[at + 1] = at as u8;
        assert_eq!(parse_answer(&looped).map(|x| x.addrs.len()), None);
        assert!(parse_answer(&message(1, false, "a.psp.example", &[])).is_none());
    }

    #[test]
    fn learn_mode_keeps_every_name_for_records_but_opens_nothing() {
        let mut t = NameTable::new(&policy());
        t.set_learn_all(true);
        t.query(DNS, 40000, &message(5, false, "shop.lab.example", &[]), 0);
        let a = message(
            5,
            true,
            "shop.lab.example",
            &[("shop.lab.example", 1, 60, vec![203, 0, 113, 9])],
        );
        assert_eq!(t.answer(DNS, 40000, &a, 1), 1);
        let ip: IpAddr = "203.0.113.9".parse().unwrap_or(DNS);
        assert_eq!(t.name_of(ip, 2), Some("shop.lab.example"));
        assert_eq!(
            t.zones_of(ip, 2).map(|z| z.0).collect::<Vec<_>>(),
            vec![ZoneId::UNKNOWN]
        );
        assert!(
            t.take_learned().is_empty(),
            "no name set holds an address of no zone"
        );
        t.set_learn_all(false);
        assert_eq!(t.name_of(ip, 2), None);
    }
}
