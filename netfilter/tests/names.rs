#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! Egress by DNS name through the matcher with real frames: a pod reaches a name zone's
//! address only after its own DNS answer named it, for the answer's TTL (within the
//! policy's floor and cap); an address it never resolved, a forged answer or an expired
//! one leaves the flow denied.

use enclave_netfilter::identity::{Inventory, PeerDirectory};
use enclave_netfilter::matcher::{Decision, Direction, Enforcer, EnforcerConfig, Verdict};
use enclave_netfilter::packet::{build, MacAddr, TcpFlags as F};
use enclave_netfilter::policy::{self, ZoneId};
use std::net::IpAddr;
use std::sync::Arc;

const POLICY: &str = r#"
apiVersion: enclave.io/v1alpha1
kind: ZonePolicy
metadata: {name: names-test, version: 1}
spec:
  names: {minTtlSeconds: 30, maxTtlSeconds: 600}
  zones:
    - {name: api, selector: {namespaces: [api]}}
    - {name: cluster-dns, cidrs: [10.96.0.10/32]}
    - {name: psp, names: ["*.psp.example", api.acquirer.example]}
    - {name: internet, cidrs: [0.0.0.0/0]}
  rules:
    - {name: dns, from: api, to: cluster-dns, protocol: udp, ports: [53], app: dns}
    - {name: api-to-psp, from: api, to: psp, protocol: tcp, ports: [443]}
    - {name: no-internet, action: deny, from: api, to: internet}
"#;

const INVENTORY: &str = r#"
workloads:
  - {name: api-0, namespace: api, ips: [10.0.0.1], mac: "02:00:00:00:00:01"}
"#;

const GW: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xfe]);
const SEC: u64 = 1_000_000_000;

struct Fx {
    e: Enforcer,
    mac: MacAddr,
    ip: IpAddr,
    now: u64,
}

fn fixture() -> Fx {
    let c = Arc::new(
        policy::load_str(POLICY, "names.yaml")
            .expect("loads")
            .compiled,
    );
    let inv: Inventory = enclave_netfilter::yaml::from_str(INVENTORY).expect("inventory");
    let peers = Arc::new(PeerDirectory::build(c.policy(), &inv.workloads));
    let w = &inv.workloads[0];
    let mac = w.mac.expect("mac");
    Fx {
        e: Enforcer::new(c, peers, w.local(mac), EnforcerConfig::default()),
        mac,
        ip: w.ips[0],
        now: 1,
    }
}

fn name_bytes(n: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for l in n.split('.') {
        b.push(l.len() as u8);
        b.extend_from_slice(l.as_bytes());
    }
    b.push(0);
    b
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    m.extend(name_bytes(name));
    m.extend_from_slice(&[0, 1, 0, 1]);
    m
}

/// An answer to `query(id, name)`: A records with `ttl`.
fn answer(id: u16, name: &str, addrs: &[[u8; 4]], ttl: u32) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x81, 0x80, 0, 1, 0, addrs.len() as u8, 0, 0, 0, 0]);
    m.extend(name_bytes(name));
    m.extend_from_slice(&[0, 1, 0, 1]);
    for a in addrs {
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        m.extend_from_slice(&ttl.to_be_bytes());
        m.extend_from_slice(&[0, 4]);
        m.extend_from_slice(a);
    }
    m
}

impl Fx {
    fn at(&mut self, dt: u64) -> u64 {
        self.now += dt;
        self.now
    }

    fn ends(&self, dst: &str, sport: u16, dport: u16) -> (build::Ends, build::Ends) {
        let out = build::Ends {
            src_mac: self.mac,
            dst_mac: GW,
            src: self.ip,
            dst: dst.parse().unwrap(),
            sport,
            dport,
        };
        let back = build::Ends {
            src_mac: GW,
            dst_mac: self.mac,
            ..out.reversed()
        };
        (out, back)
    }

    /// The pod asks the cluster DNS for `name` and gets `reply`.
    fn resolve(&mut self, id: u16, name: &str, reply: &[u8]) {
        let (out, back) = self.ends("10.96.0.10", 33000 + id, 53);
        let t = self.at(1000);
        let d = self
            .e
            .decide(Direction::Egress, &build::udp(&out, &query(id, name)), t);
        assert_eq!(d.verdict, Verdict::Pass, "query: {d:?}");
        let t = self.at(1000);
        let d = self
            .e
            .decide(Direction::Ingress, &build::udp(&back, reply), t);
        assert_eq!(d.verdict, Verdict::Pass, "answer: {d:?}");
    }

    fn syn(&mut self, dst: &str, sport: u16) -> Decision {
        let (out, _) = self.ends(dst, sport, 443);
        let t = self.at(1000);
        self.e
            .decide(Direction::Egress, &build::tcp(&out, F::SYN, 1, 0, b""), t)
    }
}

#[test]
fn a_pod_reaches_a_name_zone_only_at_addresses_its_own_answers_named() {
    let mut fx = fixture();
    // Before any answer: the address is `internet`, and denied.
    assert_eq!(fx.syn("192.0.2.10", 50001).verdict, Verdict::Drop);

    fx.resolve(
        1,
        "eu.psp.example",
        &answer(
            1,
            "eu.psp.example",
            &[[192, 0, 2, 10], [192, 0, 2, 11]],
            120,
        ),
    );
    let d = fx.syn("192.0.2.10", 50002);
    assert_eq!(d.verdict, Verdict::Pass, "{d:?}");
    let ev = d.event.expect("a new flow is recorded");
    assert_eq!(ev.dst_zone, ZoneId(3), "the flow is to the name zone psp");
    assert_eq!(fx.syn("192.0.2.11", 50003).verdict, Verdict::Pass);
    // An address no answer named stays denied.
    assert_eq!(fx.syn("192.0.2.12", 50004).verdict, Verdict::Drop);
    let learned = fx.e.take_learned_names();
    assert!(
        learned.iter().any(|l| l.ip.to_string() == "192.0.2.10"
            && l.zone == ZoneId(3)
            && l.name == "eu.psp.example"
            && l.ttl <= 120),
        "{learned:?}"
    );
    // After the TTL (120 s, within the 30..600 bounds) a new connection is denied.
    fx.at(121 * SEC);
    assert_eq!(fx.syn("192.0.2.10", 50005).verdict, Verdict::Drop);
}

#[test]
fn forged_and_unasked_answers_teach_nothing_and_ttls_are_bounded() {
    let mut fx = fixture();
    // An answer with no query before it (sent to the pod by someone else).
    let (_, back) = fx.ends("10.96.0.10", 33999, 53);
    let t = fx.at(1000);
    let _ = fx.e.decide(
        Direction::Ingress,
        &build::udp(
            &back,
            &answer(77, "api.acquirer.example", &[[198, 51, 100, 1]], 300),
        ),
        t,
    );
    assert_eq!(fx.syn("198.51.100.1", 50010).verdict, Verdict::Drop);
    // A name outside every name zone teaches nothing either.
    fx.resolve(
        2,
        "www.example.com",
        &answer(2, "www.example.com", &[[203, 0, 113, 5]], 300),
    );
    assert_eq!(fx.syn("203.0.113.5", 50011).verdict, Verdict::Drop);
    // A 1-second TTL counts as the 30-second floor.
    fx.resolve(
        3,
        "api.acquirer.example",
        &answer(3, "api.acquirer.example", &[[198, 51, 100, 2]], 1),
    );
    fx.at(20 * SEC);
    assert_eq!(fx.syn("198.51.100.2", 50012).verdict, Verdict::Pass);
    fx.at(11 * SEC);
    assert_eq!(fx.syn("198.51.100.2", 50013).verdict, Verdict::Drop);
    // A day-long TTL counts as the 600-second cap.
    fx.resolve(
        4,
        "api.acquirer.example",
        &answer(4, "api.acquirer.example", &[[198, 51, 100, 3]], 86_400),
    );
    fx.at(601 * SEC);
    assert_eq!(fx.syn("198.51.100.3", 50014).verdict, Verdict::Drop);
}

#[test]
fn name_zones_are_checked_as_written() {
    for (from, to, want) in [
        (
            "names: [\"*.psp.example\", api.acquirer.example]",
            "names: [\"psp.*.example\"]",
            "is not a DNS name or pattern",
        ),
        (
            "{name: psp, names:",
            "{name: psp, selector: {namespaces: [x]}, names:",
            "cannot also be DNS names",
        ),
        (
            "minTtlSeconds: 30",
            "minTtlSeconds: 3000",
            "the floor 3000 is above the cap 600",
        ),
    ] {
        let src = POLICY.replacen(from, to, 1);
        assert_ne!(src, POLICY, "{from}");
        let e = policy::load_str(&src, "n.yaml")
            .expect_err("refused")
            .to_string();
        assert!(e.contains(want) && e.contains("n.yaml:"), "{e}");
    }
}
