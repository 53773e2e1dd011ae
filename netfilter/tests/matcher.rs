#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! The per-frame matcher, driven with real frames built byte by byte.

use enclave_netfilter::identity::{Inventory, PeerDirectory};
use enclave_netfilter::matcher::{Direction, Enforcer, EnforcerConfig, EventKind, Reason, Verdict};
use enclave_netfilter::packet::{build, MacAddr, TcpFlags as F};
use enclave_netfilter::policy::{self, AppProto, CompiledPolicy};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

const POLICY: &str = r#"
apiVersion: enclave.io/v1alpha1
kind: ZonePolicy
metadata: {name: test, version: 7}
spec:
  zones:
    - name: a
      selector: {namespaces: [a]}
    - name: b
      selector: {namespaces: [b]}
    - name: mon
      mode: monitor
      selector: {namespaces: [mon]}
    - name: lrn
      mode: learn
      selector: {namespaces: [lrn]}
    - name: ext
      cidrs: [192.0.2.0/24, "2001:db8::/32"]
  rules:
    - {name: a-b-ssh, from: a, to: b, protocol: tcp, ports: [22]}
    - {name: a-b-redis, from: a, to: b, protocol: tcp, ports: [6379], app: redis}
    - {name: a-ext-icmp, from: a, to: ext, protocol: icmp}
    - {name: a-ext-https, from: a, to: ext, protocol: tcp, ports: [443]}
    - {name: a-ext-v6, from: a, to: ext, protocol: udp, ports: [53], app: dns}
    - {name: no-b-to-a, action: deny, from: b, to: a}
"#;

const INVENTORY: &str = r#"
workloads:
  - {name: pa, namespace: a, ips: [10.0.0.1, "fd00::1"], mac: "02:00:00:00:00:01"}
  - {name: pb, namespace: b, ips: [10.0.0.2], mac: "02:00:00:00:00:02"}
  - {name: pm, namespace: mon, ips: [10.0.0.3], mac: "02:00:00:00:00:03"}
  - {name: pl, namespace: lrn, ips: [10.0.0.4], mac: "02:00:00:00:00:04"}
"#;

const GW: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xfe]);

struct Fx {
    e: Enforcer,
    mac: MacAddr,
    ip: IpAddr,
    now: u64,
}

fn compiled(src: &str) -> Arc<CompiledPolicy> {
    Arc::new(
        policy::load_str(src, "test.yaml")
            .expect("policy loads")
            .compiled,
    )
}

fn fixture(ns: &str) -> Fx {
    fixture_with(ns, POLICY, EnforcerConfig::default())
}

fn fixture_with(ns: &str, src: &str, cfg: EnforcerConfig) -> Fx {
    let c = compiled(src);
    let inv: Inventory = enclave_netfilter::yaml::from_str(INVENTORY).expect("inventory");
    let peers = Arc::new(PeerDirectory::build(c.policy(), &inv.workloads));
    let w = inv
        .workloads
        .iter()
        .find(|w| w.namespace == ns)
        .expect("workload");
    let mac = w.mac.expect("mac");
    let local = w.local(mac);
    Fx {
        e: Enforcer::new(c, peers, local, cfg),
        mac,
        ip: w.ips[0],
        now: 1,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

impl Fx {
    fn out(&mut self, frame: &[u8]) -> enclave_netfilter::matcher::Decision {
        self.now += 1000;
        self.e.decide(Direction::Egress, frame, self.now)
    }
    fn inn(&mut self, frame: &[u8]) -> enclave_netfilter::matcher::Decision {
        self.now += 1000;
        self.e.decide(Direction::Ingress, frame, self.now)
    }
    fn to(&self, dst: &str, sport: u16, dport: u16) -> build::Ends {
        build::Ends {
            src_mac: self.mac,
            dst_mac: GW,
            src: self.ip,
            dst: ip(dst),
            sport,
            dport,
        }
    }
    fn back(&self, e: &build::Ends) -> build::Ends {
        build::Ends {
            src_mac: GW,
            dst_mac: self.mac,
            ..e.reversed()
        }
    }
    /// Handshake from the workload to `dst`, returning the ends.
    fn connect(&mut self, dst: &str, dport: u16) -> build::Ends {
        let e = self.to(dst, 40000, dport);
        let r = self.back(&e);
        assert_eq!(
            self.out(&build::tcp(&e, F::SYN, 100, 0, &[])).verdict,
            Verdict::Pass
        );
        assert_eq!(
            self.inn(&build::tcp(&r, F::SYN | F::ACK, 900, 101, &[]))
                .verdict,
            Verdict::Pass
        );
        assert_eq!(
            self.out(&build::tcp(&e, F::ACK, 101, 901, &[])).verdict,
            Verdict::Pass
        );
        e
    }
}

#[test]
fn allowed_flow_passes_both_ways_and_is_audited_once() {
    let mut f = fixture("a");
    let e = f.to("10.0.0.2", 40000, 22);
    let syn = f.out(&build::tcp(&e, F::SYN, 100, 0, &[]));
    assert_eq!(
        (syn.verdict, syn.reason),
        (Verdict::Pass, Reason::NewFlowAllowed)
    );
    let ev = syn.event.expect("new flow is audited");
    assert_eq!(ev.kind, EventKind::Allowed);
    assert_eq!(ev.rule, Some(policy::RuleId(0)));
    let r = f.back(&e);
    let synack = f.inn(&build::tcp(&r, F::SYN | F::ACK, 900, 101, &[]));
    assert_eq!(
        (synack.verdict, synack.reason, synack.event),
        (Verdict::Pass, Reason::Established, None)
    );
    let data = f.out(&build::tcp(&e, F::ACK | F::PSH, 101, 901, b"SSH-2.0-x\r\n"));
    assert_eq!(
        (data.reason, data.event.is_none()),
        (Reason::Established, true)
    );
}

#[test]
fn unsolicited_reply_and_mid_stream_packets_are_dropped() {
    let mut f = fixture("a");
    let e = f.to("10.0.0.2", 40000, 22);
    let d = f.inn(&build::tcp(&f.back(&e), F::SYN | F::ACK, 900, 101, &[]));
    assert_eq!((d.verdict, d.reason), (Verdict::Drop, Reason::TcpInvalid));
    let d = f.out(&build::tcp(&e, F::ACK, 1, 1, b"hello"));
    assert_eq!((d.verdict, d.reason), (Verdict::Drop, Reason::TcpInvalid));
}

#[test]
fn flow_no_rule_allows_is_denied_by_default_and_audited() {
    let mut f = fixture("a");
    let d = f.out(&build::tcp(&f.to("10.0.0.2", 40000, 23), F::SYN, 1, 0, &[]));
    assert_eq!((d.verdict, d.reason), (Verdict::Drop, Reason::NoRule));
    let ev = d.event.expect("denials are audited");
    assert_eq!((ev.kind, ev.rule), (EventKind::Denied, None));
    assert_eq!(f.e.policy().policy().zone_name(ev.dst_zone), "b");
    assert_eq!(f.e.counters().default_deny_flows, 1);
}

#[test]
fn deny_rule_names_itself_in_the_event() {
    let mut f = fixture("b");
    let d = f.out(&build::tcp(&f.to("10.0.0.1", 40000, 22), F::SYN, 1, 0, &[]));
    assert_eq!((d.verdict, d.reason), (Verdict::Drop, Reason::DenyRule));
    assert_eq!(d.event.and_then(|e| e.rule), Some(policy::RuleId(5)));
}

#[test]
fn redis_only_rule_refuses_http_on_the_same_port_and_cuts_the_flow() {
    let mut f = fixture("a");
    let e = f.connect("10.0.0.2", 6379);
    let d = f.out(&build::tcp(
        &e,
        F::ACK | F::PSH,
        101,
        901,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ));
    assert_eq!((d.verdict, d.reason), (Verdict::Drop, Reason::AppMismatch));
    let ev = d.event.expect("mismatch is audited");
    assert_eq!(ev.kind, EventKind::Denied);
    assert_eq!(ev.app_detected, Some(AppProto::Http));
    assert_eq!(ev.app_required, 1 << AppProto::Redis.index());
    assert_eq!(ev.rule, Some(policy::RuleId(1)));
    // Everything after is dropped quietly, both ways.
    let again = f.out(&build::tcp(
        &e,
        F::ACK | F::PSH,
        101,
        901,
        b"*1\r\n$4\r\nPING\r\n",
    ));
    assert_eq!(
        (again.reason, again.event.is_none()),
        (Reason::FlowCut, true)
    );
    let reply = f.inn(&build::tcp(&f.back(&e), F::ACK, 901, 140, b"+PONG\r\n"));
    assert_eq!(reply.reason, Reason::FlowCut);
}

#[test]
fn redis_payload_is_allowed_and_recorded_with_its_app() {
    let mut f = fixture("a");
    let e = f.connect("10.0.0.2", 6379);
    let d = f.out(&build::tcp(
        &e,
        F::ACK | F::PSH,
        101,
        901,
        b"*1\r\n$4\r\nPING\r\n",
    ));
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Pass, Reason::NewFlowAllowed)
    );
    let ev = d
        .event
        .expect("allowed L7 flow is audited when its app is confirmed");
    assert_eq!(
        (ev.kind, ev.app_detected),
        (EventKind::Allowed, Some(AppProto::Redis))
    );
    let reply = f.inn(&build::tcp(
        &f.back(&e),
        F::ACK | F::PSH,
        901,
        115,
        b"+PONG\r\n",
    ));
    assert_eq!((reply.reason, reply.event), (Reason::Established, None));
}

#[test]
fn payload_split_across_segments_is_detected_and_reordering_is_refused() {
    let mut f = fixture("a");
    let e = f.connect("10.0.0.2", 6379);
    let msg = b"*1\r\n$4\r\nPING\r\n";
    // Out of order while detecting: dropped (the sender retransmits in order).
    let ooo = f.out(&build::tcp(&e, F::ACK, 101 + 4, 901, &msg[4..]));
    assert_eq!(
        (ooo.verdict, ooo.reason),
        (Verdict::Drop, Reason::AppReorder)
    );
    let first = f.out(&build::tcp(&e, F::ACK, 101, 901, &msg[..4]));
    assert_eq!(
        (first.verdict, first.reason),
        (Verdict::Pass, Reason::Established),
        "a valid prefix passes"
    );
    // A retransmission of held bytes with different content is refused.
    let forged = f.out(&build::tcp(&e, F::ACK, 101, 901, b"GET "));
    assert_eq!(forged.reason, Reason::AppReorder);
    let rest = f.out(&build::tcp(&e, F::ACK, 105, 901, &msg[4..]));
    assert_eq!(
        (rest.verdict, rest.event.map(|e| e.app_detected)),
        (Verdict::Pass, Some(Some(AppProto::Redis)))
    );
}

#[test]
fn monitor_mode_passes_would_be_denied_flows_and_logs_them() {
    let mut f = fixture("mon");
    let e = f.to("10.0.0.2", 40000, 80);
    let d = f.out(&build::tcp(&e, F::SYN, 1, 0, &[]));
    assert_eq!((d.verdict, d.reason), (Verdict::Pass, Reason::Monitored));
    assert_eq!(
        d.event.map(|e| (e.kind, e.reason)),
        Some((EventKind::WouldDeny, Reason::NoRule))
    );
    let r = f.back(&e);
    assert_eq!(
        f.inn(&build::tcp(&r, F::SYN | F::ACK, 5, 2, &[])).event,
        None,
        "logged once per flow"
    );
}

/// The workload sends a PostgreSQL startup message on `e`: it passes, recorded as learned
/// with its app.
fn sends_postgres_and_is_learned(f: &mut Fx, e: &build::Ends) {
    let mut startup = vec![0, 0, 0, 30, 0, 3, 0, 0];
    startup.extend_from_slice(b"user\0app\0\0");
    let d = f.out(&build::tcp(e, F::ACK | F::PSH, 101, 901, &startup));
    assert_eq!(d.verdict, Verdict::Pass);
    let ev = d.event.expect("learn record");
    assert_eq!(
        (ev.kind, ev.app_detected),
        (EventKind::Learned, Some(AppProto::Postgres))
    );
}

#[test]
fn learn_mode_records_flows_with_their_detected_app() {
    let mut f = fixture("lrn");
    let e = f.connect("10.0.0.2", 5432);
    sends_postgres_and_is_learned(&mut f, &e);
}

#[test]
fn forged_source_ip_and_mac_are_refused_and_logged() {
    let mut f = fixture("a");
    let mut e = f.to("10.0.0.2", 40000, 22);
    e.src = ip("10.0.0.9");
    let d = f.out(&build::tcp(&e, F::SYN, 1, 0, &[]));
    assert_eq!((d.verdict, d.reason), (Verdict::Drop, Reason::SpoofedIp));
    assert!(d.event.is_some());
    let mut e = f.to("10.0.0.2", 40000, 22);
    e.src_mac = MacAddr([2, 9, 9, 9, 9, 9]);
    let d = f.out(&build::tcp(&e, F::SYN, 1, 0, &[]));
    assert_eq!(
        (d.reason, d.event.map(|e| e.src_mac)),
        (Reason::SpoofedMac, Some(MacAddr([2, 9, 9, 9, 9, 9])))
    );
}

#[test]
fn arp_must_claim_the_workloads_own_address() {
    let mut f = fixture("a");
    let own = Ipv4Addr::new(10, 0, 0, 1);
    let target = Ipv4Addr::new(10, 0, 0, 2);
    let ok = build::arp(
        f.mac,
        MacAddr::BROADCAST,
        1,
        own,
        MacAddr::default(),
        target,
    );
    assert_eq!(f.out(&ok).reason, Reason::Arp);
    let poison = build::arp(
        f.mac,
        MacAddr::BROADCAST,
        2,
        Ipv4Addr::new(10, 0, 0, 254),
        MacAddr::default(),
        target,
    );
    assert_eq!(f.out(&poison).reason, Reason::BadArp);
    let to_us = build::arp(GW, MacAddr::BROADCAST, 1, target, MacAddr::default(), own);
    assert_eq!(f.inn(&to_us).reason, Reason::Arp);
    let not_us = build::arp(
        GW,
        MacAddr::BROADCAST,
        1,
        target,
        MacAddr::default(),
        Ipv4Addr::new(10, 0, 0, 7),
    );
    assert_eq!(f.inn(&not_us).verdict, Verdict::Drop);
}

#[test]
fn vlan_tags_router_advertisements_and_dhcp_servers_from_a_pod_are_refused() {
    let mut f = fixture("a");
    let e = f.to("10.0.0.2", 40000, 22);
    let mut tcp = vec![0u8; 20];
    tcp[12] = 5 << 4;
    tcp[13] = F::SYN;
    let tagged = build::ip(
        &e,
        6,
        tcp,
        build::IpOpts {
            vlan: Some(5),
            ..Default::default()
        },
    );
    assert_eq!(f.out(&tagged).reason, Reason::VlanTagged);
    let ll = f.mac.ipv6_link_local();
    let ra = build::Ends {
        src: IpAddr::V6(ll),
        dst: ip("ff02::1"),
        ..e
    };
    let mut ra_frame = build::icmp(&ra, 134, 0, &[0; 8]);
    // Hop limit 255, as NDP requires.
    ra_frame[14 + 7] = 255;
    assert_eq!(f.out(&ra_frame).reason, Reason::RogueRouter);
    let dhcp = build::Ends {
        dst: ip("255.255.255.255"),
        sport: 67,
        dport: 68,
        ..e
    };
    assert_eq!(
        f.out(&build::udp(&dhcp, &[0; 240])).reason,
        Reason::RogueDhcp
    );
}

#[test]
fn neighbour_solicitation_from_own_link_local_passes() {
    let mut f = fixture("a");
    let e = build::Ends {
        src_mac: f.mac,
        dst_mac: MacAddr([0x33, 0x33, 0xff, 0, 0, 2]),
        src: IpAddr::V6(f.mac.ipv6_link_local()),
        dst: ip("ff02::1:ff00:2"),
        sport: 0,
        dport: 0,
    };
    let mut ns = build::icmp(
        &e,
        135,
        0,
        &[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
    );
    ns[14 + 7] = 255;
    assert_eq!(f.out(&ns).reason, Reason::Ndp);
}

#[test]
fn frames_for_another_mac_or_address_do_not_reach_the_workload() {
    let mut f = fixture("a");
    let e = build::Ends {
        src_mac: GW,
        dst_mac: MacAddr([2, 7, 7, 7, 7, 7]),
        src: ip("10.0.0.2"),
        dst: f.ip,
        sport: 22,
        dport: 40000,
    };
    assert_eq!(
        f.inn(&build::tcp(&e, F::SYN, 1, 0, &[])).reason,
        Reason::NotForWorkload
    );
    let e = build::Ends {
        dst_mac: f.mac,
        dst: ip("10.0.0.77"),
        ..e
    };
    assert_eq!(
        f.inn(&build::tcp(&e, F::SYN, 1, 0, &[])).reason,
        Reason::NotForWorkload
    );
}

#[test]
fn fragments_follow_their_allowed_first_fragment_only() {
    let mut f = fixture("a");
    let e = f.to("192.0.2.9", 40000, 443);
    let mut tcp = vec![0u8; 40];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&443u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = F::SYN;
    let first = frag(&e, 77, 0, true, tcp);
    assert_eq!(f.out(&first).verdict, Verdict::Pass);
    let second = frag(&e, 77, 5, false, vec![0; 16]);
    assert_eq!(f.out(&second).reason, Reason::Fragment);
    let orphan = frag(&e, 78, 5, false, vec![0; 16]);
    assert_eq!(f.out(&orphan).reason, Reason::FragmentUnknown);
    let overlap = frag(&e, 77, 1, false, vec![0; 16]);
    assert_eq!(f.out(&overlap).reason, Reason::FragmentOverlap);
    // A first fragment too short to hold the TCP header is not decidable: dropped.
    let tiny = frag(&e, 79, 0, true, vec![0; 8]);
    assert_eq!(f.out(&tiny).reason, Reason::Malformed);
}

#[test]
fn icmp_echo_and_errors_about_tracked_flows_pass() {
    let mut f = fixture("a");
    let e = f.to("192.0.2.9", 7, 0);
    assert_eq!(
        f.out(&build::icmp(&e, 8, 0, b"ping")).reason,
        Reason::NewFlowAllowed
    );
    let r = build::Ends {
        src_mac: GW,
        dst_mac: f.mac,
        src: ip("192.0.2.9"),
        dst: f.ip,
        sport: 7,
        dport: 0,
    };
    assert_eq!(
        f.inn(&build::icmp(&r, 0, 0, b"ping")).reason,
        Reason::Established
    );
    // A port-unreachable about an HTTPS flow we opened.
    let https = f.to("192.0.2.9", 40000, 443);
    assert_eq!(
        f.out(&build::tcp(&https, F::SYN, 1, 0, &[])).verdict,
        Verdict::Pass
    );
    let quoted = &build::tcp(&https, F::SYN, 1, 0, &[])[14..14 + 28];
    let err = build::icmp(&r, 3, 3, quoted);
    assert_eq!(f.inn(&err).reason, Reason::Related);
    let stray = build::icmp(
        &r,
        3,
        3,
        &build::tcp(&f.to("192.0.2.9", 1, 2), F::SYN, 1, 0, &[])[14..42],
    );
    assert_eq!(f.inn(&stray).reason, Reason::UnrelatedIcmpError);
}

#[test]
fn ipv6_flows_with_extension_headers_are_decided_by_zone() {
    let mut f = fixture("a");
    let e = build::Ends {
        src_mac: f.mac,
        dst_mac: GW,
        src: ip("fd00::1"),
        dst: ip("2001:db8::53"),
        sport: 5300,
        dport: 53,
    };
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(b"\x03www\x07example\x00\x00\x01\x00\x01");
    let d = f.out(&build::udp(&e, &q));
    assert_eq!(
        (d.verdict, d.event.and_then(|e| e.app_detected)),
        (Verdict::Pass, Some(AppProto::Dns))
    );
    let not_dns = build::Ends { sport: 5301, ..e };
    assert_eq!(
        f.out(&build::udp(&not_dns, b"not a dns message at all"))
            .reason,
        Reason::AppMismatch
    );
    // Hop-by-hop header in front of UDP: same decision.
    let mut frame = build::udp(&build::Ends { sport: 5302, ..e }, &q);
    let l4 = frame.split_off(54);
    frame[20] = 0; // next header: hop-by-hop
    let plen = u16::from_be_bytes([frame[18], frame[19]]) + 8;
    frame[18..20].copy_from_slice(&plen.to_be_bytes());
    frame.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
    frame.extend_from_slice(&l4);
    assert_eq!(f.out(&frame).verdict, Verdict::Pass);
}

#[test]
fn full_flow_table_evicts_and_counts_instead_of_growing() {
    let cfg = EnforcerConfig {
        flows: 64,
        ..Default::default()
    };
    let mut f = fixture_with("a", POLICY, cfg);
    for port in 0..1000u16 {
        let d = f.out(&build::tcp(
            &f.to("10.0.0.2", 10000 + port, 22),
            F::SYN,
            1,
            0,
            &[],
        ));
        assert_eq!(d.verdict, Verdict::Pass);
    }
    let s = f.e.flow_stats();
    assert!(s.entries <= 64, "{s:?}");
    assert!(s.evictions >= 1000 - 64, "{s:?}");
}

#[test]
fn reload_cuts_flows_the_new_policy_denies_and_keeps_the_others() {
    let mut f = fixture("a");
    let ssh = f.connect("10.0.0.2", 22);
    let https = f.to("192.0.2.9", 40001, 443);
    assert_eq!(
        f.out(&build::tcp(&https, F::SYN, 1, 0, &[])).verdict,
        Verdict::Pass
    );
    let newer = compiled(&POLICY.replace(
        "    - {name: a-b-ssh, from: a, to: b, protocol: tcp, ports: [22]}\n",
        "",
    ));
    let inv: Inventory = enclave_netfilter::yaml::from_str(INVENTORY).expect("inventory");
    let peers = Arc::new(PeerDirectory::build(newer.policy(), &inv.workloads));
    let events = f.e.reload(newer, peers);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!((events[0].reason, events[0].dport), (Reason::FlowCut, 22));
    assert_eq!(
        f.out(&build::tcp(&ssh, F::ACK, 101, 901, b"x")).reason,
        Reason::FlowCut
    );
    assert_eq!(
        f.out(&build::tcp(&https, F::ACK, 2, 1, b"x")).verdict,
        Verdict::Drop,
        "handshake not done: invalid"
    );
    let r = f.back(&https);
    assert_eq!(
        f.inn(&build::tcp(&r, F::SYN | F::ACK, 9, 2, &[])).reason,
        Reason::Established,
        "still-allowed flow kept"
    );
}

#[test]
fn arbitrary_bytes_never_panic_and_are_dropped_as_malformed() {
    let mut f = fixture("a");
    let base = build::tcp(&f.to("10.0.0.2", 40000, 22), F::SYN, 1, 0, &[1, 2, 3]);
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for i in 0..20000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut frame = base.clone();
        frame.truncate((x as usize) % (base.len() + 1));
        if !frame.is_empty() {
            let at = (x >> 20) as usize % frame.len();
            frame[at] ^= (x >> 40) as u8 | 1;
        }
        let dir = if i % 2 == 0 {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        let _ = f.e.decide(dir, &frame, i);
    }
    assert!(f.e.counters().frames[Reason::Malformed as usize] > 0);
}

#[test]
fn flow_cache_fast_path_decides_exactly_as_the_full_path() {
    let slow_cfg = EnforcerConfig {
        fast_path: false,
        ..Default::default()
    };
    let mut fast = fixture("a");
    let mut slow = fixture_with("a", POLICY, slow_cfg);
    let peers = ["10.0.0.2", "192.0.2.9", "10.0.0.9"];
    let mut x: u64 = 0x2545f4914f6cdd1d;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let flag_sets = [
        F::SYN,
        F::SYN | F::ACK,
        F::ACK,
        F::ACK | F::PSH,
        F::FIN | F::ACK,
        F::RST,
        F::ACK | 0x20,
    ];
    for i in 0..50_000u64 {
        let peer = ip(peers[rnd(3) as usize]);
        let port = [22u16, 443, 6379, 53, 80][rnd(5) as usize];
        let sport = 40000 + rnd(4) as u16;
        let mut e = build::Ends {
            src_mac: fast.mac,
            dst_mac: GW,
            src: fast.ip,
            dst: peer,
            sport,
            dport: port,
        };
        // Now and then a forged address or MAC.
        match rnd(20) {
            0 => e.src = ip("10.0.0.5"),
            1 => e.src_mac = MacAddr([2, 1, 1, 1, 1, 1]),
            _ => {}
        }
        let ingress = rnd(2) == 1;
        if ingress {
            e = build::Ends {
                src_mac: GW,
                dst_mac: fast.mac,
                ..e.reversed()
            };
            if rnd(20) == 0 {
                e.dst_mac = MacAddr([2, 3, 3, 3, 3, 3]);
            }
        }
        let payload: &[u8] = match rnd(4) {
            0 => b"",
            1 => b"*1\r\n$4\r\nPING\r\n",
            2 => b"GET / HTTP/1.1\r\n\r\n",
            _ => b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
        };
        let frame = if rnd(3) == 0 {
            build::udp(&e, payload)
        } else {
            build::tcp(
                &e,
                flag_sets[rnd(flag_sets.len() as u64) as usize],
                rnd(3) as u32,
                0,
                payload,
            )
        };
        let dir = if ingress {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        let now = i * 1_000_000;
        // Every eighth step, a complete handshake, so that flows get established.
        let mut frames = vec![(dir, frame)];
        if i % 8 == 0 {
            let out = build::Ends {
                src_mac: fast.mac,
                dst_mac: GW,
                src: fast.ip,
                dst: peer,
                sport,
                dport: port,
            };
            let back = build::Ends {
                src_mac: GW,
                dst_mac: fast.mac,
                ..out.reversed()
            };
            frames = vec![
                (Direction::Egress, build::tcp(&out, F::SYN, 1, 0, &[])),
                (
                    Direction::Ingress,
                    build::tcp(&back, F::SYN | F::ACK, 1, 2, &[]),
                ),
                (Direction::Egress, build::tcp(&out, F::ACK, 2, 2, &[])),
                (
                    Direction::Egress,
                    build::tcp(&out, F::ACK | F::PSH, 2, 2, payload),
                ),
            ];
        }
        for (dir, frame) in frames {
            let (a, b) = (
                fast.e.decide(dir, &frame, now),
                slow.e.decide(dir, &frame, now),
            );
            assert_eq!(a, b, "frame {i} ({dir:?}) decided differently");
        }
    }
    assert_eq!(fast.e.counters().frames, slow.e.counters().frames);
    assert!(
        fast.e.counters().fast_path_frames > 1000,
        "fast path hits: {}",
        fast.e.counters().fast_path_frames
    );
    assert_eq!(slow.e.counters().fast_path_frames, 0);
    let (fs, ss) = (fast.e.flow_stats(), slow.e.flow_stats());
    assert_eq!(
        (fs.entries, fs.inserts, fs.evictions),
        (ss.entries, ss.inserts, ss.evictions)
    );
}

#[test]
fn audit_record_of_an_app_mismatch_carries_what_an_auditor_needs() {
    use enclave_netfilter::audit::{AuditContext, RecordBuilder};
    let mut f = fixture("a");
    let e = f.connect("10.0.0.2", 6379);
    let d = f.out(&build::tcp(
        &e,
        F::ACK | F::PSH,
        101,
        901,
        b"GET / HTTP/1.1\r\n\r\n",
    ));
    let inv: Inventory = enclave_netfilter::yaml::from_str(INVENTORY).expect("inventory");
    let rb = RecordBuilder::new(AuditContext {
        policy: f.e.policy().clone(),
        peers: f.e.peers().clone(),
        local: f.e.local().identity.clone(),
        local_ips: inv.workloads[0].ips.clone(),
        node: "node-1".into(),
        component: "enclave-netd".into(),
    });
    let r = rb.record(&d.event.expect("event"), 1_700_000_000_000);
    // OCSF Network Activity with the security-control fields.
    assert_eq!(
        (r["class_uid"].as_u64(), r["type_uid"].as_u64()),
        (Some(4001), Some(400103))
    );
    assert_eq!(
        (r["action"].as_str(), r["disposition"].as_str()),
        (Some("Denied"), Some("Blocked"))
    );
    assert_eq!(r["time"].as_u64(), Some(1_700_000_000_000));
    // Who, where from, which resource, which rule and policy version.
    assert_eq!(r["src_endpoint"]["ip"], "10.0.0.1");
    assert_eq!(r["src_endpoint"]["zone"], "a");
    assert_eq!(r["dst_endpoint"]["port"], 6379);
    assert_eq!(r["dst_endpoint"]["name"], "pb");
    assert_eq!(r["unmapped"]["enclave"]["dst"]["namespace"], "b");
    assert_eq!(r["connection_info"]["protocol_name"], "tcp");
    assert_eq!(r["firewall_rule"]["name"], "a-b-redis");
    assert_eq!(
        (
            r["policy"]["name"].as_str(),
            r["policy"]["version"].as_str()
        ),
        (Some("test"), Some("7"))
    );
    assert_eq!(r["unmapped"]["enclave"]["reason"], "app_mismatch");
    assert_eq!(r["unmapped"]["enclave"]["app_protocol_detected"], "http");
    assert_eq!(
        r["unmapped"]["enclave"]["app_protocol_required"][0],
        "redis"
    );
    assert!(
        r["message"]
            .as_str()
            .is_some_and(|m| m.contains("payload is http, not the required app")),
        "{}",
        r["message"]
    );
}

/// Inputs the fuzzers once crashed on (fuzz/regressions/), replayed the way the fuzz target
/// reads them: a sequence of [direction|length, length, frame bytes].
#[test]
fn fuzz_regressions_replay_without_panicking() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/frame");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("regressions dir") {
        let data = std::fs::read(entry.expect("entry").path()).expect("read");
        let mut f = fixture("a");
        let mut rest = &data[..];
        let mut now = 1u64;
        while rest.len() >= 2 {
            let dir = if rest[0] & 0x80 == 0 {
                Direction::Egress
            } else {
                Direction::Ingress
            };
            let len = (usize::from(rest[0] & 0x07) << 8 | usize::from(rest[1])).min(rest.len() - 2);
            now += 1;
            let d = f.e.decide(dir, &rest[2..2 + len], now);
            assert_eq!(d.verdict, d.reason.verdict());
            rest = &rest[2 + len..];
        }
        n += 1;
    }
    assert!(n >= 1);
}

#[test]
fn icmp_error_quoting_a_truncated_header_is_dropped_not_a_crash() {
    let mut f = fixture("a");
    let r = build::Ends {
        src_mac: GW,
        dst_mac: f.mac,
        src: ip("192.0.2.9"),
        dst: f.ip,
        sport: 0,
        dport: 0,
    };
    for cut in 0..28 {
        let quoted = &build::tcp(&f.to("192.0.2.9", 1, 2), F::SYN, 1, 0, &[])[14..14 + cut];
        assert_eq!(
            f.inn(&build::icmp(&r, 3, 3, quoted)).reason,
            Reason::UnrelatedIcmpError,
            "quote of {cut} bytes"
        );
    }
}

/// A fragment of a TCP datagram: IP id, offset (8-byte units), more-fragments flag.
fn frag(e: &build::Ends, id: u32, offset: u16, more: bool, payload: Vec<u8>) -> Vec<u8> {
    build::ip(
        e,
        6,
        payload,
        build::IpOpts {
            id,
            frag: Some((offset, more)),
            vlan: None,
        },
    )
}

#[test]
fn a_zone_switched_to_learn_by_a_reload_records_new_flows() {
    let mut f = fixture("a");
    let learning = POLICY.replace("  zones:\n", "  defaultMode: learn\n  zones:\n");
    let c = compiled(&learning);
    let inv: Inventory = enclave_netfilter::yaml::from_str(INVENTORY).expect("inventory");
    let peers = Arc::new(PeerDirectory::build(c.policy(), &inv.workloads));
    assert!(f.e.reload(c, peers).is_empty());
    // a -> b on 2222: no rule; learn mode passes it and records it with its app.
    let e = f.connect("10.0.0.2", 2222);
    sends_postgres_and_is_learned(&mut f, &e);
}

fn rule_index(f: &Fx, name: &str) -> usize {
    f.e.policy()
        .policy()
        .rules
        .iter()
        .position(|r| r.name == name)
        .unwrap()
}

#[test]
fn rule_counters_survive_a_reload_by_rule_name() {
    let mut f = fixture("a");
    f.connect("10.0.0.2", 22);
    let idx = rule_index(&f, "a-b-ssh");
    assert_eq!(f.e.counters().rule_flows[idx], 1);
    // The same rules in another order, plus one: the count follows the name.
    let src = POLICY.replace(
        "  rules:\n",
        "  rules:\n    - {name: new-first, from: b, to: ext, protocol: tcp, ports: [1]}\n",
    );
    let c = compiled(&src);
    let inv: Inventory = enclave_netfilter::yaml::from_str(INVENTORY).expect("inventory");
    let peers = Arc::new(PeerDirectory::build(c.policy(), &inv.workloads));
    f.e.reload(c, peers);
    let idx = rule_index(&f, "a-b-ssh");
    assert_eq!(f.e.counters().rule_flows[idx], 1);
    assert_eq!(f.e.counters().rule_flows[0], 0, "new-first starts at 0");
}

#[test]
fn a_reload_prepared_against_a_policy_no_longer_in_force_still_carries_counters_by_name() {
    use enclave_netfilter::matcher::PreparedReload;
    let mut f = fixture("a");
    f.connect("10.0.0.2", 22);
    let inv: Inventory = enclave_netfilter::yaml::from_str(INVENTORY).expect("inventory");
    let with_first = |name: &str| {
        let c = compiled(&POLICY.replace(
            "  rules:\n",
            &format!(
                "  rules:\n    - {{name: {name}, from: b, to: ext, protocol: tcp, ports: [1]}}\n"
            ),
        ));
        let peers = Arc::new(PeerDirectory::build(c.policy(), &inv.workloads));
        (c, peers)
    };
    // Prepared against the policy in force now...
    let (c1, p1) = with_first("one-first");
    let stale = PreparedReload::new(f.e.policy(), c1, p1);
    // ...but another reload lands first (its rule indices differ).
    let (c2, p2) = with_first("two-first");
    f.e.reload(c2, p2);
    assert_eq!(f.e.counters().rule_flows[rule_index(&f, "a-b-ssh")], 1);
    // Installing the stale preparation maps the counters again instead of misplacing them.
    f.e.install(stale);
    assert_eq!(f.e.counters().rule_flows[rule_index(&f, "a-b-ssh")], 1);
    assert_eq!(f.e.counters().rule_flows[0], 0, "one-first starts at 0");
}
