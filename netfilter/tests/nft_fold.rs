#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! Folding a rendered table's rules into sets changes no decision: random policies (zones
//! of CIDRs that nest and overlap, IPv4 and IPv6, pods inside CIDR zones, deny rules, port
//! ranges, `unknown` peers, monitor mode), each rendered for every placement as plain rules
//! and folded, and the same packets decided by both (`nft::model`, which evaluates a table
//! as the kernel does; `nft_netns` checks the kernel on real packets).

use enclave_netfilter::identity::{Inventory, PeerDirectory};
use enclave_netfilter::nft::model::Probe;
use enclave_netfilter::nft::{self, Hook, NftWorkload, Placement};
use enclave_netfilter::policy;
use std::net::IpAddr;

struct Rng(u64);

impl Rng {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.next(v.len())]
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.next(100) < percent
    }
}

const CIDRS: [&str; 10] = [
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.2.3/32",
    "10.1.2.128/25",
    "192.168.0.0/30",
    "fd00::/16",
    "fd00:1::/32",
    "fd00:1::7/128",
    "0.0.0.0/0",
];
const PORTS: [&str; 7] = [
    "80",
    "443",
    "\"1000-1010\"",
    "1005",
    "8080",
    "\"8000-8100\"",
    "53",
];
const PROTOCOLS: [&str; 6] = ["tcp", "tcp", "udp", "icmp", "icmpv6", "any"];

fn random_policy(r: &mut Rng) -> String {
    let mode = if r.chance(15) { "monitor" } else { "enforce" };
    let mut s = format!(
        "apiVersion: enclave.io/v1alpha1\nkind: ZonePolicy\nmetadata: {{name: fold, version: 1}}\nspec:\n  defaultMode: {mode}\n  zones:\n    - {{name: app, selector: {{namespaces: [app]}}}}\n    - {{name: peers, selector: {{namespaces: [peers]}}}}\n"
    );
    let mut zones = vec!["app", "peers", "unknown"];
    for z in ["c1", "c2", "c3"] {
        let n = 1 + r.next(2);
        let cidrs: Vec<&str> = (0..n).map(|_| *r.pick(&CIDRS)).collect();
        s.push_str(&format!(
            "    - {{name: {z}, cidrs: [{}]}}\n",
            cidrs.join(", ")
        ));
        zones.push(z);
    }
    s.push_str("  rules:\n");
    for i in 0..(1 + r.next(24)) {
        let action = if r.chance(25) { "deny" } else { "allow" };
        let other = *r.pick(&zones);
        let (from, to) = if r.chance(50) {
            ("app", other)
        } else {
            (other, "app")
        };
        let proto = *r.pick(&PROTOCOLS);
        let ports = if matches!(proto, "tcp" | "udp") && r.chance(80) {
            let n = 1 + r.next(3);
            let p: Vec<&str> = (0..n).map(|_| *r.pick(&PORTS)).collect();
            format!(", ports: [{}]", p.join(", "))
        } else {
            String::new()
        };
        s.push_str(&format!(
            "    - {{name: r{i}, action: {action}, from: {from}, to: {to}, protocol: {proto}{ports}}}\n"
        ));
    }
    s
}

const INVENTORY: &str = "workloads:
  - {name: web, namespace: app, ips: [10.1.2.5, 'fd00:1::5']}
  - {name: p1, namespace: peers, ips: [10.1.2.3, 'fd00:1::7']}
  - {name: p2, namespace: peers, ips: [10.9.9.9]}
  - {name: stray, namespace: nowhere, ips: [10.1.2.200, 192.168.0.1]}
";

/// Addresses worth probing: every CIDR's bounds and their neighbours, the pods, strangers.
fn addresses() -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = Vec::new();
    for c in CIDRS {
        let c = policy::Cidr::parse(c).unwrap();
        let r = nft::AddrRange::of_cidr(c);
        let (lo, hi) = r.bits();
        for b in [
            lo.wrapping_sub(1),
            lo,
            lo + 1,
            hi.wrapping_sub(1),
            hi,
            hi.wrapping_add(1),
        ] {
            let x = nft::AddrRange::from_bits(b, b, r.is_v6());
            if c.addr.is_ipv6() || b <= u128::from(u32::MAX) {
                v.push(x.lo);
            }
        }
    }
    for a in [
        "10.1.2.3",
        "10.1.2.7",
        "10.9.9.9",
        "10.1.2.200",
        "192.168.0.1",
        "172.16.0.1",
        "fd00:1::7",
        "2001:db8::1",
        "::ffff:10.1.2.3",
    ] {
        v.push(a.parse().unwrap());
    }
    v
}

#[test]
fn folded_tables_decide_every_packet_as_their_plain_rules_do() {
    let inv: Inventory = enclave_netfilter::yaml::from_str(INVENTORY).unwrap();
    let me = &inv.workloads[0];
    let ident = me.identity();
    let addrs = addresses();
    let placements = [
        Placement::Local,
        Placement::Forward {
            interface: "tap0".into(),
        },
        Placement::Bridged,
    ];
    let mut r = Rng(0x2545_f491_4f6c_dd1d);
    let (mut policies, mut probes, mut sets) = (0, 0usize, 0usize);
    while policies < 250 {
        let src = random_policy(&mut r);
        let Ok(loaded) = policy::load_str(&src, "fold.yaml") else {
            continue; // the checker refused it (a shadowed rule, say): another one
        };
        policies += 1;
        let peers = PeerDirectory::build(loaded.compiled.policy(), &inv.workloads);
        for placement in &placements {
            let w = NftWorkload {
                identity: &ident,
                ips: &me.ips,
            };
            let plain = nft::render_rules(&loaded.compiled, &peers, &w, placement);
            let folded = nft::fold_into_sets(plain.clone(), 1);
            sets += folded.sets.len();
            for _ in 0..400 {
                let own = *r.pick(&me.ips);
                let fam: Vec<IpAddr> = addrs
                    .iter()
                    .copied()
                    .filter(|a| a.is_ipv6() == own.is_ipv6())
                    .collect();
                let peer = *r.pick(&fam);
                let inbound = r.chance(50);
                let (src, dst) = if inbound { (peer, own) } else { (own, peer) };
                let (hook, iif, oif) = match placement {
                    Placement::Local if inbound => (Hook::Input, "eth0", ""),
                    Placement::Local => (Hook::Output, "", "eth0"),
                    Placement::Forward { .. } if inbound => (Hook::Forward, "eth0", "tap0"),
                    Placement::Forward { .. } => (Hook::Forward, "tap0", "eth0"),
                    Placement::Bridged => (Hook::Forward, "br0", "br0"),
                };
                let p = Probe {
                    hook,
                    iif: iif.into(),
                    oif: oif.into(),
                    src,
                    dst,
                    proto: *r.pick(&[6u8, 6, 17, 1, 58, 47]),
                    dport: *r.pick(&[
                        0u16, 53, 79, 80, 443, 999, 1000, 1005, 1010, 1011, 8080, 8100, 65535,
                    ]),
                    icmp_type: *r.pick(&[0u8, 8, 128, 133, 134, 135]),
                    established: r.chance(5),
                };
                probes += 1;
                let (a, b) = (plain.decide(&p), folded.decide(&p));
                assert_eq!(
                    a,
                    b,
                    "{p:?}: plain rules say {a:?}, the folded table {b:?}\npolicy:\n{src}\nplain:\n{}\nfolded:\n{}",
                    plain.to_nft_text(),
                    folded.to_nft_text()
                );
            }
        }
    }
    eprintln!("{policies} policies, {probes} packets, {sets} sets: every decision the same");
    assert!(
        sets > 500,
        "too few sets were made to mean anything: {sets}"
    );
}

/// The kernel wall puts each address in the zone netd resolves for it: a pod's zone wins
/// over any CIDR around it, the longest prefix over a shorter one; nothing is in two zones.
#[test]
fn every_address_is_in_the_zone_netd_resolves_and_in_no_other() {
    let inv: Inventory = enclave_netfilter::yaml::from_str(INVENTORY).unwrap();
    let me = &inv.workloads[0];
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let mut checked = 0;
    while checked < 300 {
        let src = random_policy(&mut r);
        let Ok(loaded) = policy::load_str(&src, "zones.yaml") else {
            continue;
        };
        checked += 1;
        let peers = PeerDirectory::build(loaded.compiled.policy(), &inv.workloads);
        let zones = nft::ZoneAddrs::new(&loaded.compiled, &peers, &me.ips);
        let count = loaded.compiled.policy().zones.len();
        for a in addresses() {
            let owners: Vec<policy::ZoneId> = (1..=count)
                .map(|z| policy::ZoneId(z as u16))
                .filter(|z| zones.of(*z).iter().any(|range| range.contains(a)))
                .collect();
            let netd = peers.zone_of(&loaded.compiled, a);
            let mapped = a.is_ipv6() && nft::AddrRange::of_cidr(nft::ipv4_mapped()).contains(a);
            let expect: Vec<policy::ZoneId> =
                if me.ips.contains(&a) || mapped || netd == policy::ZoneId::UNKNOWN {
                    vec![]
                } else {
                    vec![netd]
                };
            assert_eq!(owners, expect, "{a} under\n{src}");
            assert_eq!(
                zones.known().iter().any(|range| range.contains(a)),
                !expect.is_empty(),
                "{a}: known"
            );
        }
    }
}
