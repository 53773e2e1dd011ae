#![allow(missing_docs, clippy::expect_used)]
//! Layer 7 rules and names, each against its baseline in the same run, at 10,000 rules:
//! - a new flow's SYN to a port whose rule lists HTTP requests (an app to detect, an
//!   inspector to set up) against a port with a plain rule;
//! - a request on an established HTTP/1.1 keep-alive connection whose rule lists HTTP
//!   requests (each request framed and checked) against the same request on a plain flow
//!   (the flow cache);
//! - a new flow's SYN to an address the pod learned for a name zone, with 10,000 learned
//!   names, against a SYN to a CIDR zone's address; and the name table's lookup alone.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use enclave_netfilter::identity::{Inventory, PeerDirectory};
use enclave_netfilter::matcher::{Direction, Enforcer, EnforcerConfig, Verdict};
use enclave_netfilter::packet::{build, MacAddr, TcpFlags as F};
use enclave_netfilter::policy::{self, generate::ManyRules};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
const GW: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xfe]);
const NAMES: u32 = 10_000;
const DNS: [u8; 4] = [10, 96, 0, 10];

fn enforcer() -> Enforcer {
    let src = ManyRules {
        name: "l7-bench",
        version: 1,
        namespace: "app",
        rules: 10_000,
        inbound: false,
        extra_zones: &[
            "{name: web, cidrs: [10.50.0.0/24]}",
            "{name: psp, names: [\"*.psp.example\"]}",
            "{name: dns, cidrs: [10.96.0.10/32]}",
        ],
        extra_rules: &[
            "{name: plain, from: app, to: web, protocol: tcp, ports: [8080]}",
            "{name: requests, from: app, to: web, protocol: tcp, ports: [8081], app: http, http: [{methods: [GET], paths: [\"/v1/payments*\"]}]}",
            "{name: psp, from: app, to: psp, protocol: tcp, ports: [443]}",
            "{name: dns, from: app, to: dns, protocol: udp, ports: [53], app: dns}",
        ],
    }
    .yaml();
    let c = Arc::new(policy::load_str(&src, "l7.yaml").expect("policy").compiled);
    let inv: Inventory = enclave_netfilter::yaml::from_str(
        "workloads:\n  - {name: a, namespace: app, ips: [10.0.0.1]}\n",
    )
    .expect("inv");
    let peers = Arc::new(PeerDirectory::build(c.policy(), &inv.workloads));
    Enforcer::new(
        c,
        peers,
        inv.workloads[0].local(MAC),
        EnforcerConfig {
            flows: 65536,
            ..EnforcerConfig::default()
        },
    )
}

fn ends(dst: IpAddr, sport: u16, dport: u16) -> build::Ends {
    build::Ends {
        src_mac: MAC,
        dst_mac: GW,
        src: [10, 0, 0, 1].into(),
        dst,
        sport,
        dport,
    }
}

/// SYNs to `dst:dport` from 4,096 source ports (a new flow each time round).
fn syns(dst: IpAddr, dport: u16) -> Vec<Vec<u8>> {
    (0..4096u16)
        .map(|i| build::tcp(&ends(dst, 20000 + i, dport), F::SYN, 1, 0, &[]))
        .collect()
}

fn bench_syns(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    e: &mut Enforcer,
    frames: &[Vec<u8>],
    now: &mut u64,
) {
    let mut i = 0usize;
    g.bench_function(name, |b| {
        b.iter(|| {
            i = (i + 1) % frames.len();
            *now += 1;
            let d = e.decide(Direction::Egress, black_box(&frames[i]), *now);
            debug_assert_eq!(d.verdict, Verdict::Pass);
            black_box(d)
        })
    });
}

fn new_flow(c: &mut Criterion) {
    let mut g = c.benchmark_group("l7/new_flow_10000_rules");
    let web: IpAddr = [10, 50, 0, 5].into();
    let mut now = 1;
    let mut e = enforcer();
    bench_syns(&mut g, "plain_rule", &mut e, &syns(web, 8080), &mut now);
    let mut e = enforcer();
    bench_syns(
        &mut g,
        "rule_with_http_requests",
        &mut e,
        &syns(web, 8081),
        &mut now,
    );
    g.finish();
}

fn keepalive(c: &mut Criterion) {
    let mut g = c.benchmark_group("l7/keepalive_request");
    let req = b"GET /v1/payments/8812 HTTP/1.1\r\nHost: api\r\nUser-Agent: bench/1\r\n\r\n";
    for (name, port) in [
        ("plain_flow_cache", 8080u16),
        ("http_requests_checked", 8081),
    ] {
        let mut e = enforcer();
        let mut now = 1u64;
        let out = ends([10, 50, 0, 5].into(), 40000, port);
        let back = build::Ends {
            src_mac: GW,
            dst_mac: MAC,
            ..out.reversed()
        };
        for (dir, f) in [
            (Direction::Egress, build::tcp(&out, F::SYN, 1, 0, b"")),
            (
                Direction::Ingress,
                build::tcp(&back, F::SYN | F::ACK, 1000, 2, b""),
            ),
            (Direction::Egress, build::tcp(&out, F::ACK, 2, 1001, b"")),
        ] {
            now += 1;
            assert_eq!(e.decide(dir, &f, now).verdict, Verdict::Pass);
        }
        let mut seq = 2u32;
        let mut seg = build::tcp(&out, F::ACK | F::PSH, seq, 1001, req);
        let mut ack = build::tcp(&back, F::ACK, 1001, seq, b"");
        g.bench_function(name, |b| {
            b.iter(|| {
                seg[38..42].copy_from_slice(&seq.to_be_bytes());
                now += 1;
                let d = e.decide(Direction::Egress, &seg, now);
                assert_eq!(d.verdict, Verdict::Pass, "{d:?}");
                seq = seq.wrapping_add(req.len() as u32);
                ack[42..46].copy_from_slice(&seq.to_be_bytes());
                now += 1;
                black_box(e.decide(Direction::Ingress, &ack, now))
            })
        });
    }
    g.finish();
}

/// The address the pod learned for `n{i}.psp.example`.
fn learned(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0xac10_0000 + i)
}

fn names(c: &mut Criterion) {
    let mut e = enforcer();
    let mut now = 1u64;
    // 10,000 names resolved through the pod's own DNS flow (query, then its answer).
    let q = ends(DNS.into(), 5353, 53);
    let a = build::Ends {
        src_mac: GW,
        dst_mac: MAC,
        ..q.reversed()
    };
    for i in 0..NAMES {
        let name = format!("n{i}.psp.example");
        let id = i as u16;
        now += 1;
        let d = e.decide(
            Direction::Egress,
            &build::udp(&q, &build::dns_query(id, &name)),
            now,
        );
        assert_eq!(d.verdict, Verdict::Pass);
        now += 1;
        let d = e.decide(
            Direction::Ingress,
            &build::udp(&a, &build::dns_answer(id, &name, &[learned(i)], 3600)),
            now,
        );
        assert_eq!(d.verdict, Verdict::Pass);
    }
    assert_eq!(e.names().len(), NAMES as usize);
    let mut g = c.benchmark_group("l7/names_10000_learned");
    bench_syns(
        &mut g,
        "syn_to_cidr_zone",
        &mut e,
        &syns([10, 50, 0, 5].into(), 8080),
        &mut now,
    );
    let to_names: Vec<Vec<u8>> = (0..4096u16)
        .map(|i| {
            build::tcp(
                &ends(learned(u32::from(i) * 2).into(), 20000 + i, 443),
                F::SYN,
                1,
                0,
                &[],
            )
        })
        .collect();
    bench_syns(&mut g, "syn_to_learned_name", &mut e, &to_names, &mut now);
    let ip: IpAddr = learned(4321).into();
    g.bench_function("name_table_lookup", |b| {
        b.iter(|| black_box(e.names().zones_of(black_box(ip), now).next()))
    });
    g.finish();
}

criterion_group!(benches, new_flow, keepalive, names);
criterion_main!(benches);
