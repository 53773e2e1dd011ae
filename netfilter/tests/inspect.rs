#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! Inspection inside allowed flows, through the matcher with real frames: what a rule's
//! `inspect:` does to a flow, the records it leaves, and that flows without it keep the
//! flow cache.

use enclave_netfilter::audit::{AuditContext, RecordBuilder};
use enclave_netfilter::identity::{Inventory, PeerDirectory};
use enclave_netfilter::inspect::Threat;
use enclave_netfilter::matcher::{
    Decision, Direction, Enforcer, EnforcerConfig, Finding, Reason, Verdict,
};
use enclave_netfilter::packet::{build, proto, MacAddr, TcpFlags as F};
use enclave_netfilter::policy::{self, OnFinding};
use std::net::IpAddr;
use std::sync::Arc;

const POLICY: &str = r#"
apiVersion: enclave.io/v1alpha1
kind: ZonePolicy
metadata: {name: inspect-test, version: 1}
spec:
  zones:
    - {name: api, scope: cde, selector: {namespaces: [api]}}
    - {name: db, selector: {namespaces: [db]}}
    - {name: corp, selector: {namespaces: [corp]}}
  rules:
    - name: api-db
      from: api
      to: db
      protocol: tcp
      ports: [5432]
      app: postgres
      inspect: {threats: deny, dlp: alert}
    - name: api-db-alert
      from: api
      to: db
      protocol: tcp
      ports: [5433]
      inspect: {threats: alert}
    - name: api-corp-http
      from: api
      to: corp
      protocol: tcp
      ports: [8080]
      inspect: {threats: deny, dlp: deny}
    - name: api-api
      from: api
      to: api
      protocol: tcp
      ports: [8080]
      inspect: {dlp: deny}
    - {name: api-corp-plain, from: api, to: corp, protocol: tcp, ports: [9000]}
    - {name: api-corp-leaving, from: api, to: corp, protocol: tcp, ports: [8081], inspect: {dlp: deny, dlpFlows: leaving-cde}}
    - {name: api-corp-udp, from: api, to: corp, protocol: udp, ports: [53], app: dns, inspect: {threats: deny}}
    - {name: api-corp-frag, from: api, to: corp, protocol: udp, ports: [7000]}
"#;

const INVENTORY: &str = r#"
workloads:
  - {name: api-0, namespace: api, ips: [10.0.0.1], mac: "02:00:00:00:00:01"}
  - {name: db-0, namespace: db, ips: [10.0.0.2], mac: "02:00:00:00:00:02"}
  - {name: corp-0, namespace: corp, ips: [10.0.0.3], mac: "02:00:00:00:00:03"}
  - {name: api-1, namespace: api, ips: [10.0.0.4], mac: "02:00:00:00:00:04"}
"#;

const GW: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xfe]);

struct Fx {
    e: Enforcer,
    b: RecordBuilder,
    mac: MacAddr,
    ip: IpAddr,
    now: u64,
}

fn fixture() -> Fx {
    fixture_of(POLICY)
}

/// The api-0 pod's enforcer under the policy `src`.
fn fixture_of(src: &str) -> Fx {
    let c = Arc::new(
        policy::load_str(src, "inspect.yaml")
            .expect("loads")
            .compiled,
    );
    let inv: Inventory = enclave_netfilter::yaml::from_str(INVENTORY).expect("inventory");
    let peers = Arc::new(PeerDirectory::build(c.policy(), &inv.workloads));
    let w = &inv.workloads[0];
    let mac = w.mac.expect("mac");
    let local = w.local(mac);
    let b = RecordBuilder::new(AuditContext {
        policy: c.clone(),
        peers: peers.clone(),
        local: local.identity.clone(),
        local_ips: w.ips.clone(),
        node: "node-a".into(),
        component: "test".into(),
    });
    Fx {
        e: Enforcer::new(c, peers, local, EnforcerConfig::default()),
        b,
        mac,
        ip: w.ips[0],
        now: 1,
    }
}

/// A TCP connection from the workload, with both sides' next sequence numbers.
struct Conn {
    out: build::Ends,
    back: build::Ends,
    seq: u32,
    rseq: u32,
}

impl Fx {
    fn decide(&mut self, dir: Direction, f: &[u8]) -> Decision {
        self.now += 1000;
        self.e.decide(dir, f, self.now)
    }

    fn connect(&mut self, dst: &str, dport: u16) -> Conn {
        let out = build::Ends {
            src_mac: self.mac,
            dst_mac: GW,
            src: self.ip,
            dst: dst.parse().unwrap(),
            sport: 40000 + dport % 1000,
            dport,
        };
        let back = build::Ends {
            src_mac: GW,
            dst_mac: self.mac,
            ..out.reversed()
        };
        let d = self.decide(Direction::Egress, &build::tcp(&out, F::SYN, 100, 0, b""));
        assert_eq!(d.verdict, Verdict::Pass, "{d:?}");
        let d = self.decide(
            Direction::Ingress,
            &build::tcp(&back, F::SYN | F::ACK, 5000, 101, b""),
        );
        assert_eq!(d.verdict, Verdict::Pass, "{d:?}");
        let d = self.decide(Direction::Egress, &build::tcp(&out, F::ACK, 101, 5001, b""));
        assert_eq!(d.verdict, Verdict::Pass, "{d:?}");
        Conn {
            out,
            back,
            seq: 101,
            rseq: 5001,
        }
    }

    fn send(&mut self, c: &mut Conn, data: &[u8]) -> Decision {
        let f = build::tcp(&c.out, F::ACK | F::PSH, c.seq, c.rseq, data);
        let d = self.decide(Direction::Egress, &f);
        if d.verdict == Verdict::Pass {
            c.seq = c.seq.wrapping_add(data.len() as u32);
        }
        d
    }

    fn reply(&mut self, c: &mut Conn, data: &[u8]) -> Decision {
        let f = build::tcp(&c.back, F::ACK | F::PSH, c.rseq, c.seq, data);
        let d = self.decide(Direction::Ingress, &f);
        if d.verdict == Verdict::Pass {
            c.rseq = c.rseq.wrapping_add(data.len() as u32);
        }
        d
    }

    fn findings(&mut self) -> Vec<Finding> {
        self.e.take_findings()
    }
}

fn pg_startup() -> Vec<u8> {
    let params = b"user\0shop\0database\0cards\0\0";
    let mut m = ((params.len() + 8) as u32).to_be_bytes().to_vec();
    m.extend_from_slice(&196608u32.to_be_bytes());
    m.extend_from_slice(params);
    m
}

fn pg_query(q: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&((q.len() + 5) as u32).to_be_bytes());
    m.extend_from_slice(q.as_bytes());
    m.push(0);
    m
}

#[test]
fn sql_injection_in_an_allowed_postgres_flow_cuts_it_with_a_finding() {
    let mut fx = fixture();
    let mut c = fx.connect("10.0.0.2", 5432);
    assert_eq!(fx.send(&mut c, &pg_startup()).verdict, Verdict::Pass);
    assert_eq!(
        fx.reply(&mut c, b"R\0\0\0\x08\0\0\0\0").verdict,
        Verdict::Pass
    );
    let ok = pg_query("SELECT pan_token FROM cards WHERE id = 42");
    assert_eq!(fx.send(&mut c, &ok).verdict, Verdict::Pass);
    assert!(fx.findings().is_empty());

    let bad = pg_query("SELECT * FROM cards WHERE owner = '' OR '1'='1'");
    let d = fx.send(&mut c, &bad);
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Drop, Reason::ThreatDetected)
    );
    let ev = d.event.expect("the cut is recorded");
    assert_eq!(ev.src, fx.ip);
    let f = fx.findings();
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(
        (f[0].threat, f[0].action),
        (Threat::SqlInjection, OnFinding::Deny)
    );
    assert!(f[0].detail.contains("tautology"), "{}", f[0].detail);
    // Everything after is dropped as part of a cut flow.
    let d = fx.send(&mut c, &ok);
    assert_eq!(d.reason, Reason::FlowCut);

    // The OCSF record.
    let r = fx.b.finding(&f[0], 1_700_000_000_000);
    assert_eq!(r["class_uid"], 2004);
    assert_eq!(r["finding_info"]["types"][0], "SQL.Injection");
    assert_eq!(r["disposition"], "Blocked");
    assert_eq!(r["evidences"][0]["dst_endpoint"]["zone"], "db");
    assert_eq!(r["firewall_rule"]["name"], "api-db");
    assert_eq!(r["unmapped"]["enclave"]["dst"]["pod"], "db-0");
}

#[test]
fn alert_mode_records_and_lets_the_flow_go_on() {
    let mut fx = fixture();
    let mut c = fx.connect("10.0.0.2", 5433);
    let d = fx.send(&mut c, &pg_startup());
    assert_eq!(d.verdict, Verdict::Pass);
    let d = fx.send(&mut c, &pg_query("SELECT 1 WHERE 1=1; DROP TABLE cards"));
    assert_eq!(d.verdict, Verdict::Pass);
    let f = fx.findings();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].action, OnFinding::Alert);
    assert_eq!(fx.b.finding(&f[0], 1)["disposition"], "Alert");
    assert_eq!(
        fx.send(&mut c, &pg_query("SELECT 2")).verdict,
        Verdict::Pass
    );
}

#[test]
fn a_card_number_leaving_for_another_zone_is_denied_and_masked_everywhere() {
    let mut fx = fixture();
    let mut c = fx.connect("10.0.0.3", 8080);
    let body = "card=4111+1111+1111+1111&amount=10";
    let req = format!(
        "POST /pay HTTP/1.1\r\nHost: corp\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let d = fx.send(&mut c, req.as_bytes());
    // `+` is not a separator a card number is written with: no finding.
    assert_eq!(d.verdict, Verdict::Pass, "{:?}", fx.findings());
    let req2 = "POST /pay HTTP/1.1\r\nContent-Length: 24\r\n\r\ncard=4111-1111-1111-1111";
    let d = fx.send(&mut c, req2.as_bytes());
    assert_eq!((d.verdict, d.reason), (Verdict::Drop, Reason::DataLeak));
    let f = fx.findings();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].threat, Threat::CreditCard);
    let rec = fx.b.finding(&f[0], 1).to_string();
    assert!(rec.contains("411111******1111"), "{rec}");
    for full in ["4111111111111111", "4111-1111-1111-1111"] {
        assert!(!rec.contains(full), "a full PAN in the record: {rec}");
        assert!(!format!("{f:?}").contains(full));
    }
    // Within one zone, DLP does not look (the rule api-api asks only for dlp).
    let mut fy = fixture();
    let mut c = fy.connect("10.0.0.4", 8080);
    assert_eq!(fy.send(&mut c, req2.as_bytes()).verdict, Verdict::Pass);
    assert!(fy.findings().is_empty());
}

#[test]
fn leaving_cde_reads_only_what_the_cde_sends_out() {
    // Into the CDE: the non-CDE side answers with a card number; not a leak.
    let mut fx = fixture();
    let mut c = fx.connect("10.0.0.3", 8081);
    assert_eq!(
        fx.send(&mut c, b"GET /card HTTP/1.1\r\n\r\n").verdict,
        Verdict::Pass
    );
    let d = fx.reply(
        &mut c,
        b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n4111111111111111",
    );
    assert_eq!(d.verdict, Verdict::Pass);
    assert!(fx.findings().is_empty());
    // Out of the CDE: the same number sent by the CDE side is cut.
    let d = fx.send(
        &mut c,
        b"POST /r HTTP/1.1\r\nContent-Length: 16\r\n\r\n4111111111111111",
    );
    assert_eq!((d.verdict, d.reason), (Verdict::Drop, Reason::DataLeak));
    let f = fx.findings();
    assert_eq!((f[0].threat, f[0].from_client), (Threat::CreditCard, true));
}

#[test]
fn a_pattern_split_and_sent_out_of_order_is_still_found() {
    let mut fx = fixture();
    let mut c = fx.connect("10.0.0.3", 8080);
    let req =
        b"GET /search?q=1%20UNION%20SELECT%20pan%20FROM%20cards HTTP/1.1\r\nHost: corp\r\n\r\n";
    let (a, b) = req.split_at(30);
    // The second part first: held (it passes; the receiver cannot use it before the gap).
    let f2 = build::tcp(&c.out, F::ACK | F::PSH, c.seq + a.len() as u32, c.rseq, b);
    assert_eq!(fx.decide(Direction::Egress, &f2).verdict, Verdict::Pass);
    assert!(fx.findings().is_empty());
    // The gap: now the whole line is read, and the gap's segment is dropped.
    let d = fx.send(&mut c, a);
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Drop, Reason::ThreatDetected)
    );
    assert_eq!(fx.findings()[0].threat, Threat::SqlInjection);
}

#[test]
fn different_bytes_resent_for_the_same_sequence_numbers_are_an_evasion() {
    let mut fx = fixture();
    let mut c = fx.connect("10.0.0.3", 8080);
    let seq = c.seq;
    assert_eq!(
        fx.send(&mut c, b"GET /a HTTP/1.1\r\n").verdict,
        Verdict::Pass
    );
    let f = build::tcp(&c.out, F::ACK | F::PSH, seq, c.rseq, b"GET /b HTTP/1.1\r\n");
    let d = fx.decide(Direction::Egress, &f);
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Drop, Reason::ThreatDetected)
    );
    assert_eq!(fx.findings()[0].threat, Threat::TcpOverlap);
}

#[test]
fn flows_without_inspection_keep_the_flow_cache_and_inspected_ones_leave_it() {
    let mut fx = fixture();
    let mut plain = fx.connect("10.0.0.3", 9000);
    let before = fx.e.counters().fast_path_frames;
    for _ in 0..10 {
        assert_eq!(
            fx.send(&mut plain, b"4111111111111111 ' OR 1=1").verdict,
            Verdict::Pass
        );
    }
    assert_eq!(fx.e.counters().fast_path_frames - before, 10);
    assert!(fx.findings().is_empty());
    assert_eq!(fx.e.counters().inspected_bytes, 0);

    let mut insp = fx.connect("10.0.0.3", 8080);
    let before = fx.e.counters().fast_path_frames;
    for i in 0..10 {
        let req = format!("GET /{i} HTTP/1.1\r\n\r\n");
        assert_eq!(fx.send(&mut insp, req.as_bytes()).verdict, Verdict::Pass);
    }
    assert_eq!(fx.e.counters().fast_path_frames, before);
    assert!(fx.e.counters().inspected_bytes > 0);
    // Acknowledged bytes are let go: nothing held once the peer has everything.
    let ack = build::tcp(&insp.back, F::ACK, insp.rseq, insp.seq, b"");
    assert_eq!(fx.decide(Direction::Ingress, &ack).verdict, Verdict::Pass);
    assert_eq!(fx.e.inspect_held().0, 0);
}

#[test]
fn syn_with_data_split_handshake_dns_tunnel_and_ping_of_death() {
    let mut fx = fixture();
    let out = build::Ends {
        src_mac: fx.mac,
        dst_mac: GW,
        src: fx.ip,
        dst: "10.0.0.3".parse().unwrap(),
        sport: 41000,
        dport: 8080,
    };
    let d = fx.decide(Direction::Egress, &build::tcp(&out, F::SYN, 1, 0, b"early"));
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Drop, Reason::ThreatDetected)
    );
    assert_eq!(fx.findings()[0].threat, Threat::TcpSynData);

    // Split handshake: the responder answers the SYN with a SYN.
    let out2 = build::Ends {
        sport: 41001,
        ..out
    };
    let back = build::Ends {
        src_mac: GW,
        dst_mac: fx.mac,
        ..out2.reversed()
    };
    assert_eq!(
        fx.decide(Direction::Egress, &build::tcp(&out2, F::SYN, 1, 0, b""))
            .verdict,
        Verdict::Pass
    );
    let d = fx.decide(Direction::Ingress, &build::tcp(&back, F::SYN, 9, 0, b""));
    assert_eq!(d.verdict, Verdict::Drop);
    assert_eq!(fx.findings()[0].threat, Threat::TcpSplitHandshake);

    // A DNS query carrying data in its labels.
    let dns = build::Ends {
        sport: 5353,
        dport: 53,
        ..out
    };
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 60];
    q.extend_from_slice(&[b'q'; 60]);
    q.extend_from_slice(b"\x01t\x07example\x00\x00\x10\x00\x01");
    let d = fx.decide(Direction::Egress, &build::udp(&dns, &q));
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Drop, Reason::ThreatDetected)
    );
    assert_eq!(fx.findings()[0].threat, Threat::DnsTunneling);

    // Ping of death: a fragment that ends past 65,535 bytes (no rule needed to refuse it).
    let frag = build::Ends {
        sport: 0,
        dport: 0,
        ..out
    };
    let f = build::ip(
        &frag,
        proto::ICMP,
        vec![0u8; 1480],
        build::IpOpts {
            id: 7,
            frag: Some((8100, false)),
            vlan: None,
        },
    );
    let d = fx.decide(Direction::Egress, &f);
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Drop, Reason::ThreatDetected)
    );
    let f = fx.findings();
    assert_eq!(f[0].threat, Threat::PingDeath);
    assert!(f[0].detail.contains("past 65,535"), "{}", f[0].detail);
    // An ordinary last fragment is not one.
    let ok = build::ip(
        &frag,
        proto::UDP,
        vec![0u8; 1480],
        build::IpOpts {
            id: 8,
            frag: Some((185, false)),
            vlan: None,
        },
    );
    let d = fx.decide(Direction::Egress, &ok);
    assert_ne!(d.reason, Reason::ThreatDetected);
    assert!(fx.findings().is_empty());
}

#[test]
fn a_deny_rule_cannot_inspect_and_a_bad_action_is_located() {
    let bad = POLICY.replace(
        "    - {name: api-corp-plain, from: api, to: corp, protocol: tcp, ports: [9000]}
    - {name: api-corp-leaving, from: api, to: corp, protocol: tcp, ports: [8081], inspect: {dlp: deny, dlpFlows: leaving-cde}}",
        "    - {name: api-corp-plain, action: deny, from: api, to: corp, protocol: tcp, ports: [9000], inspect: {threats: deny}}",
    );
    let e = policy::load_str(&bad, "p.yaml").expect_err("refused");
    let s = format!("{e:?}");
    assert!(
        s.contains("inspect") && s.contains("deny rule cannot inspect"),
        "{s}"
    );
    let bad2 = POLICY.replace("inspect: {threats: alert}", "inspect: {threats: block}");
    let e = policy::load_str(&bad2, "p.yaml").expect_err("refused");
    let s = format!("{e:?}");
    assert!(s.contains("unknown variant `block`"), "{s}");
}

#[test]
fn a_response_rule_quarantines_the_pod_that_sent_the_attack_and_release_ends_it() {
    let src = format!(
        "{POLICY}  responses:\n    - name: isolate-api\n      zones: [api]\n      threats: [SQL.Injection]\n      minSeverity: high\n      actions: [quarantine, webhook]\n      keep: [api-corp-udp]\n"
    );
    let mut fx = fixture_of(&src);

    let mut plain = fx.connect("10.0.0.3", 9000);
    assert_eq!(fx.send(&mut plain, b"hello").verdict, Verdict::Pass);
    // The api pod sends an injection: the finding, the response, and the quarantine.
    let mut c = fx.connect("10.0.0.3", 8080);
    let d = fx.send(&mut c, b"GET /?q=1%20UNION%20SELECT%20pan HTTP/1.1\r\n\r\n");
    assert_eq!(d.reason, Reason::ThreatDetected);
    let r = fx.e.take_responses();
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].response, "isolate-api");
    assert!(r[0].acted);
    let q = fx.e.quarantine().expect("quarantined").clone();
    assert_eq!(
        (q.threat, q.keep.as_slice()),
        (Threat::SqlInjection, &["api-corp-udp".to_string()][..])
    );
    // The live flow it does not keep is cut, and recorded.
    let cuts = fx.e.take_cuts();
    assert!(
        cuts.iter()
            .any(|ev| ev.dport == 9000 && ev.reason == Reason::Quarantined),
        "{cuts:?}"
    );
    assert_eq!(fx.send(&mut plain, b"more").reason, Reason::FlowCut);
    // New flows: only the kept rule.
    let out = build::Ends {
        src_mac: fx.mac,
        dst_mac: GW,
        src: fx.ip,
        dst: "10.0.0.3".parse().unwrap(),
        sport: 42000,
        dport: 9000,
    };
    let d = fx.decide(Direction::Egress, &build::tcp(&out, F::SYN, 1, 0, b""));
    assert_eq!((d.verdict, d.reason), (Verdict::Drop, Reason::Quarantined));
    let dns = build::Ends { dport: 53, ..out };
    let d = fx.decide(
        Direction::Egress,
        &build::udp(
            &dns,
            &[
                0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 1, 0, 1,
            ],
        ),
    );
    assert_eq!(d.verdict, Verdict::Pass, "{d:?}");
    // Released: the policy decides again.
    assert_eq!(
        fx.e.release().map(|q| q.response),
        Some("isolate-api".into())
    );
    let out2 = build::Ends {
        sport: 42001,
        ..out
    };
    let d = fx.decide(Direction::Egress, &build::tcp(&out2, F::SYN, 1, 0, b""));
    assert_eq!(d.verdict, Verdict::Pass);
}

#[test]
fn no_response_for_bytes_the_peer_sent_and_bad_response_rules_are_located() {
    let src =
        format!("{POLICY}  responses:\n    - name: isolate-any\n      actions: [quarantine]\n");
    let mut fx = fixture_of(&src);
    // corp answers the api pod with a card number: corp sent it, so the api pod is not
    // quarantined (corp's own netd answers for corp).
    let mut c = fx.connect("10.0.0.3", 8080);
    assert_eq!(
        fx.send(&mut c, b"GET / HTTP/1.1\r\n\r\n").verdict,
        Verdict::Pass
    );
    let d = fx.reply(&mut c, b"HTTP/1.1 200 OK\r\n\r\n4111-1111-1111-1111\r\n");
    assert_eq!(d.reason, Reason::DataLeak);
    assert!(fx.e.take_responses().is_empty());
    assert!(fx.e.quarantine().is_none());

    for (bad, want) in [
        (
            "    - {name: r1, threats: [SQL.Injektion], actions: [quarantine]}",
            "unknown threat `SQL.Injektion`",
        ),
        (
            "    - {name: r1, zones: [nowhere], actions: [webhook]}",
            "no zone named `nowhere`",
        ),
        (
            "    - {name: r1, actions: [webhook], keep: [api-db]}",
            "keep applies to quarantine",
        ),
        (
            "    - {name: r1, actions: [reboot]}",
            "unknown variant `reboot`",
        ),
        (
            "    - {name: r1, minSeverity: extreme, actions: [restart]}",
            "low, medium or high",
        ),
    ] {
        let src = format!("{POLICY}  responses:\n{bad}\n");
        let e = policy::load_str(&src, "r.yaml").expect_err("refused");
        let s = e.to_string();
        assert!(s.contains(want) && s.contains("r.yaml:"), "{bad}: {s}");
    }
}

#[test]
fn a_zones_inspect_applies_to_every_allowed_flow_into_or_out_of_it() {
    // api-corp-plain asks for nothing; the corp zone asks for threats: deny.
    let src = POLICY.replace(
        "    - {name: corp, selector: {namespaces: [corp]}}",
        "    - {name: corp, selector: {namespaces: [corp]}, inspect: {threats: deny}}",
    );
    assert_ne!(src, POLICY);
    let mut fx = fixture_of(&src);
    let mut c = fx.connect("10.0.0.3", 9000);
    let d = fx.send(
        &mut c,
        b"GET /?id=1%20UNION%20SELECT%20pan HTTP/1.1\r\n\r\n",
    );
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Drop, Reason::ThreatDetected)
    );
    // Under the original policy the same flow is not inspected.
    let mut fy = fixture();
    let mut c = fy.connect("10.0.0.3", 9000);
    let d = fy.send(
        &mut c,
        b"GET /?id=1%20UNION%20SELECT%20pan HTTP/1.1\r\n\r\n",
    );
    assert_eq!(d.verdict, Verdict::Pass);
}

#[test]
fn a_dns_query_with_a_long_name_is_still_dns() {
    // Found through busybox's nslookup: the app detector saw only the first 64 bytes of a
    // datagram, so a query whose name ran past them was cut as not DNS.
    let mut fx = fixture();
    let out = build::Ends {
        src_mac: fx.mac,
        dst_mac: GW,
        src: fx.ip,
        dst: "10.0.0.3".parse().unwrap(),
        sport: 5300,
        dport: 53,
    };
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in [
        "payments-api-7f9c",
        "payments",
        "svc",
        "cluster",
        "local",
        "example",
    ] {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    assert!(q.len() > 64);
    let d = fx.decide(Direction::Egress, &build::udp(&out, &q));
    assert_eq!(d.verdict, Verdict::Pass, "{d:?}");
    assert!(fx.findings().is_empty());
}

const REQUESTS: &str = r#"
apiVersion: enclave.io/v1alpha1
kind: ZonePolicy
metadata: {name: requests, version: 1}
spec:
  zones:
    - {name: api, selector: {namespaces: [api]}}
    - {name: db, selector: {namespaces: [db]}}
    - {name: corp, selector: {namespaces: [corp]}}
  rules:
    - name: payments
      from: api
      to: corp
      protocol: tcp
      ports: [8080]
      app: http
      http:
        - {methods: [GET], paths: ["/v1/payments", "/v1/payments/*"]}
        - {methods: [POST], paths: ["/v1/payments"], hosts: ["*.psp.example"]}
    - name: cache
      from: api
      to: db
      protocol: tcp
      ports: [6379]
      app: redis
      redis: {commands: [GET, SET, PING]}
    - name: database
      from: api
      to: db
      protocol: tcp
      ports: [5432]
      app: postgres
      postgres: {databases: [cards], users: [shop]}
    - name: payments-grpc
      from: api
      to: corp
      protocol: tcp
      ports: [50051]
      app: grpc
      grpc: [{service: payments.v1.Payments, methods: [Authorize, Capture]}]
    - {name: names, from: api, to: corp, protocol: udp, ports: [53], app: dns, dns: {names: ["*.psp.example", api.acquirer.example]}}
    - {name: psp-tls, from: api, to: corp, protocol: tcp, ports: [443], app: tls, tls: {sni: ["*.psp.example"]}}
"#;

fn resp(args: &[&str]) -> Vec<u8> {
    let mut m = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        m.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    m
}

#[test]
fn http_requests_outside_the_rule_are_refused_one_by_one() {
    let mut fx = fixture_of(REQUESTS);
    let mut c = fx.connect("10.0.0.3", 8080);
    // Allowed requests on one keep-alive connection, then one the rule does not allow.
    for req in [
        "GET /v1/payments HTTP/1.1\r\nHost: api\r\n\r\n",
        "GET /v1/payments/42 HTTP/1.1\r\nHost: api\r\n\r\n",
        "POST /v1/payments HTTP/1.1\r\nHost: eu.psp.example\r\nContent-Length: 2\r\n\r\n{}",
    ] {
        assert_eq!(
            fx.send(&mut c, req.as_bytes()).verdict,
            Verdict::Pass,
            "{req}"
        );
    }
    assert!(fx.findings().is_empty());
    let d = fx.send(
        &mut c,
        b"DELETE /v1/payments/42 HTTP/1.1\r\nHost: api\r\n\r\n",
    );
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Drop, Reason::RequestDenied)
    );
    let f = fx.findings();
    assert_eq!(f[0].threat, Threat::RequestDenied);
    assert!(
        f[0].detail.contains("`DELETE /v1/payments/42`"),
        "{}",
        f[0].detail
    );
    // A POST to a host the rule does not name, and a path outside the prefix.
    for bad in [
        "POST /v1/payments HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 0\r\n\r\n",
        "GET /v1/paymentsX HTTP/1.1\r\n\r\n",
        "GET /admin HTTP/1.1\r\n\r\n",
    ] {
        let mut fy = fixture_of(REQUESTS);
        let mut c = fy.connect("10.0.0.3", 8080);
        let d = fy.send(&mut c, bad.as_bytes());
        assert_eq!(d.reason, Reason::RequestDenied, "{bad}");
    }
}

#[test]
fn redis_commands_and_postgres_sessions_outside_the_rule_are_refused() {
    let mut fx = fixture_of(REQUESTS);
    let mut c = fx.connect("10.0.0.2", 6379);
    assert_eq!(fx.send(&mut c, &resp(&["PING"])).verdict, Verdict::Pass);
    // A binary argument with CRLF inside does not shift the framing.
    assert_eq!(
        fx.send(&mut c, &resp(&["SET", "k", "a\r\n*1\r\n$8\r\nFLUSHALL"]))
            .verdict,
        Verdict::Pass
    );
    assert!(fx.findings().is_empty());
    let d = fx.send(&mut c, &resp(&["FLUSHALL"]));
    assert_eq!(d.reason, Reason::RequestDenied);
    assert!(fx.findings()[0].detail.contains("`FLUSHALL`"));
    // Inline commands too.
    let mut fy = fixture_of(REQUESTS);
    let mut c = fy.connect("10.0.0.2", 6379);
    assert_eq!(fy.send(&mut c, b"PING\r\n").verdict, Verdict::Pass);
    assert_eq!(
        fy.send(&mut c, b"config set dir /tmp\r\n").reason,
        Reason::RequestDenied
    );

    let startup = |user: &str, db: &str| {
        let params = format!("user\0{user}\0database\0{db}\0\0");
        let mut m = ((params.len() + 8) as u32).to_be_bytes().to_vec();
        m.extend_from_slice(&196608u32.to_be_bytes());
        m.extend_from_slice(params.as_bytes());
        m
    };
    let mut fz = fixture_of(REQUESTS);
    let mut c = fz.connect("10.0.0.2", 5432);
    assert_eq!(
        fz.send(&mut c, &startup("shop", "cards")).verdict,
        Verdict::Pass
    );
    let mut fz = fixture_of(REQUESTS);
    let mut c = fz.connect("10.0.0.2", 5432);
    let d = fz.send(&mut c, &startup("postgres", "cards"));
    assert_eq!(d.reason, Reason::RequestDenied);
    assert!(fz.findings()[0].detail.contains("user `postgres`"));
}

#[test]
fn request_rules_are_checked_against_their_app_and_located() {
    for (from, to, want) in [
        (
            "app: redis\n      redis: {commands: [GET, SET, PING]}",
            "redis: {commands: [GET, SET, PING]}",
            "`redis` rules need `app: redis`",
        ),
        (
            "paths: [\"/v1/payments\", \"/v1/payments/*\"]",
            "paths: [\"v1/*/x\"]",
            "a path starts with `/`",
        ),
        (
            "methods: [GET]",
            "methods: [FETCH]",
            "`FETCH` is not an HTTP method",
        ),
    ] {
        let src = REQUESTS.replacen(from, to, 1);
        assert_ne!(src, REQUESTS, "{from}");
        let e = policy::load_str(&src, "q.yaml")
            .expect_err("refused")
            .to_string();
        assert!(e.contains(want) && e.contains("q.yaml:"), "{e}");
    }
}

fn capture(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/corpus/l7")
            .join(name),
    )
    .expect(name)
}

/// A HEADERS frame on `stream` for a gRPC call to `path` (literals, no Huffman).
fn grpc_headers(stream: u8, path: &str) -> Vec<u8> {
    let mut blk = vec![0x83, 0x86, 0x04, path.len() as u8];
    blk.extend_from_slice(path.as_bytes());
    blk.extend_from_slice(&[0x0f, 0x10, 16]);
    blk.extend_from_slice(b"application/grpc");
    let mut f = vec![0, 0, blk.len() as u8, 1, 4, 0, 0, 0, stream];
    f.extend_from_slice(&blk);
    f
}

#[test]
fn grpc_calls_outside_the_rule_are_refused_on_a_connection_it_allowed() {
    let mut fx = fixture_of(REQUESTS);
    let mut c = fx.connect("10.0.0.3", 50051);
    // grpcio's own opening (preface, SETTINGS, HEADERS with Huffman and indexing, DATA)
    // calling /payments.v1.Payments/Authorize.
    let real = capture("grpc-grpcio.bin");
    let d = fx.send(&mut c, &real);
    assert_eq!(d.verdict, Verdict::Pass, "{d:?}");
    assert!(fx.findings().is_empty());
    assert_eq!(
        fx.send(&mut c, &grpc_headers(3, "/payments.v1.Payments/Capture"))
            .verdict,
        Verdict::Pass
    );
    let d = fx.send(&mut c, &grpc_headers(5, "/payments.v1.Payments/Refund"));
    assert_eq!(d.reason, Reason::RequestDenied);
    let f = fx.findings();
    assert!(
        f[0].detail.contains("`payments.v1.Payments/Refund`"),
        "{}",
        f[0].detail
    );
    // Plain HTTP/2 (curl's opening) is not gRPC: the rule's app refuses it.
    let mut fy = fixture_of(REQUESTS);
    let mut c = fy.connect("10.0.0.3", 50051);
    let d = fy.send(&mut c, &capture("http2-curl.bin"));
    assert_eq!(d.reason, Reason::AppMismatch, "{d:?}");
}

#[test]
fn dns_names_outside_the_rule_are_dropped_query_by_query() {
    let mut fx = fixture_of(REQUESTS);
    let out = build::Ends {
        src_mac: fx.mac,
        dst_mac: GW,
        src: fx.ip,
        dst: "10.0.0.3".parse().unwrap(),
        sport: 5300,
        dport: 53,
    };
    let query = |name: &str| {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    };
    // busybox nslookup's real query for api.acquirer.example.
    let real = capture("dns-busybox-nslookup.bin");
    assert_eq!(
        fx.decide(Direction::Egress, &build::udp(&out, &real))
            .verdict,
        Verdict::Pass
    );
    let d = fx.decide(
        Direction::Egress,
        &build::udp(&out, &query("exfil.attacker.example")),
    );
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Drop, Reason::RequestDenied)
    );
    let f = fx.findings();
    assert!(
        f[0].detail.contains("`exfil.attacker.example`"),
        "{}",
        f[0].detail
    );
    // The same socket goes on asking for names the rule allows, and a second refused name
    // is reported again.
    for name in ["eu.psp.example", "API.Acquirer.Example"] {
        let d = fx.decide(Direction::Egress, &build::udp(&out, &query(name)));
        assert_eq!(d.verdict, Verdict::Pass, "{name}: {d:?}");
    }
    for name in ["psp.example", "acquirer.example"] {
        let d = fx.decide(Direction::Egress, &build::udp(&out, &query(name)));
        assert_eq!(d.reason, Reason::RequestDenied, "{name}");
    }
    assert_eq!(fx.findings().len(), 2);
    // A refused name as the flow's very first datagram.
    let mut fy = fixture_of(REQUESTS);
    let d = fy.decide(
        Direction::Egress,
        &build::udp(&out, &query("exfil.attacker.example")),
    );
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Drop, Reason::RequestDenied)
    );
    let d = fy.decide(
        Direction::Egress,
        &build::udp(&out, &query("eu.psp.example")),
    );
    assert_eq!(d.verdict, Verdict::Pass, "{d:?}");
}

#[test]
fn tls_hellos_for_server_names_outside_the_rule_are_refused() {
    // openssl s_client -servername api.psp.example: a real ClientHello.
    let real = capture("tls-openssl.bin");
    let mut fx = fixture_of(REQUESTS);
    let mut c = fx.connect("10.0.0.3", 443);
    assert_eq!(fx.send(&mut c, &real).verdict, Verdict::Pass);
    assert!(fx.findings().is_empty());
    // The same hello naming another server (same length, so every length stays right).
    let at = real
        .windows(15)
        .position(|w| w == b"api.psp.example")
        .expect("the SNI is in the hello");
    let mut other = real.clone();
    other[at..at + 15].copy_from_slice(b"api.evil.exampl");
    let mut fy = fixture_of(REQUESTS);
    let mut c = fy.connect("10.0.0.3", 443);
    let d = fy.send(&mut c, &other);
    assert_eq!(d.reason, Reason::RequestDenied, "{d:?}");
    assert!(fy.findings()[0].detail.contains("`api.evil.exampl`"));
}

#[test]
fn grpc_dns_and_sni_rules_are_checked_as_written() {
    for (from, to, want) in [
        (
            "service: payments.v1.Payments",
            "service: \"payments v1\"",
            "is not a gRPC service name",
        ),
        (
            "api.acquirer.example]",
            "\"api.*.example\"]",
            "is not a DNS name or pattern",
        ),
        (
            "app: tls, tls:",
            "app: http, tls:",
            "`tls` rules need `app: tls`",
        ),
        (
            "names: [\"*.psp.example\", api.acquirer.example]",
            "names: []",
            "no name",
        ),
    ] {
        let src = REQUESTS.replacen(from, to, 1);
        assert_ne!(src, REQUESTS, "{from}");
        let e = policy::load_str(&src, "q.yaml")
            .expect_err("refused")
            .to_string();
        assert!(e.contains(want) && e.contains("q.yaml:"), "{e}");
    }
}

#[test]
fn a_resp_length_near_u64_max_is_refused_not_overflowed() {
    // Found by the inspect_stream fuzz target: `$` with a length near u64::MAX overflowed
    // the framer's sum (a panic with overflow checks; a desynchronised framer without).
    let mut fx = fixture_of(REQUESTS);
    let mut c = fx.connect("10.0.0.2", 6379);
    assert_eq!(fx.send(&mut c, &resp(&["PING"])).verdict, Verdict::Pass);
    let d = fx.send(&mut c, b"*2\r\n$3\r\nGET\r\n$18446744073709551615\r\nx\r\n");
    assert_eq!(d.verdict, Verdict::Drop, "{d:?}");
    let f = fx.findings();
    assert!(
        f.iter().any(|f| f.detail.contains("can no longer read")),
        "{f:?}"
    );
}
