#![allow(missing_docs, clippy::expect_used)]
//! What inspection costs, in one run against the same flow without it: the verdict of an
//! established TCP segment carrying an HTTP request (flow cache, no inspection, against
//! the same rule with `inspect: {threats: deny, dlp: deny}`), and the bytes per second one
//! core inspects for SQL injection and card data (1,448-byte segments of form posts, each
//! acknowledged, through the enforcer as netd calls it). Also the detectors alone: the
//! SQL injection check of one query and the DLP scan of one segment.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use enclave_netfilter::identity::{Inventory, PeerDirectory};
use enclave_netfilter::inspect::{dlp, sqli};
use enclave_netfilter::matcher::{Direction, Enforcer, EnforcerConfig, Verdict};
use enclave_netfilter::packet::{build, MacAddr, TcpFlags as F};
use enclave_netfilter::policy;
use std::sync::Arc;

const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
const GW: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xfe]);

const POLICY: &str = r#"
apiVersion: enclave.io/v1alpha1
kind: ZonePolicy
metadata: {name: bench, version: 1}
spec:
  zones:
    - {name: app, selector: {namespaces: [app]}}
    - {name: peer, cidrs: [10.9.0.0/16]}
  rules:
    - {name: plain, from: app, to: peer, protocol: tcp, ports: [80]}
    - {name: inspected, from: app, to: peer, protocol: tcp, ports: [8080], inspect: {threats: deny, dlp: deny}}
"#;

fn enforcer() -> Enforcer {
    let c = Arc::new(
        policy::load_str(POLICY, "bench.yaml")
            .expect("policy")
            .compiled,
    );
    let inv: Inventory = enclave_netfilter::yaml::from_str(
        "workloads:\n  - {name: a, namespace: app, ips: [10.0.0.1]}\n",
    )
    .expect("inv");
    let peers = Arc::new(PeerDirectory::build(c.policy(), &inv.workloads));
    let local = inv.workloads[0].local(MAC);
    Enforcer::new(c, peers, local, EnforcerConfig::default())
}

struct Flow {
    out: build::Ends,
    back: build::Ends,
    seq: u32,
    rseq: u32,
}

fn open(e: &mut Enforcer, dport: u16, now: &mut u64) -> Flow {
    let out = build::Ends {
        src_mac: MAC,
        dst_mac: GW,
        src: "10.0.0.1".parse().expect("ip"),
        dst: "10.9.0.5".parse().expect("ip"),
        sport: 40000,
        dport,
    };
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
        *now += 1;
        assert_eq!(e.decide(dir, &f, *now).verdict, Verdict::Pass);
    }
    Flow {
        out,
        back,
        seq: 2,
        rseq: 1001,
    }
}

/// The two frames of an exchange, built once: the segment and its acknowledgement. Each
/// iteration writes the next sequence numbers into them (the matcher does not check
/// TCP checksums; the guest's kernel does), so what is timed is the verdicts alone.
struct Exchange {
    seg: Vec<u8>,
    ack: Vec<u8>,
    len: u32,
}

impl Exchange {
    fn new(fl: &Flow, payload: &[u8]) -> Self {
        Exchange {
            seg: build::tcp(&fl.out, F::ACK | F::PSH, fl.seq, fl.rseq, payload),
            ack: build::tcp(&fl.back, F::ACK, fl.rseq, fl.seq, b""),
            len: payload.len() as u32,
        }
    }
}

/// Sends the next segment and acknowledges it (two verdicts).
fn exchange(e: &mut Enforcer, fl: &mut Flow, x: &mut Exchange, now: &mut u64) {
    // Ethernet 14 + IPv4 20: the TCP sequence number at 38, the acknowledgement at 42.
    x.seg[38..42].copy_from_slice(&fl.seq.to_be_bytes());
    *now += 1;
    let d = e.decide(Direction::Egress, &x.seg, *now);
    assert_eq!(d.verdict, Verdict::Pass, "{d:?}");
    fl.seq = fl.seq.wrapping_add(x.len);
    x.ack[42..46].copy_from_slice(&fl.seq.to_be_bytes());
    *now += 1;
    black_box(e.decide(Direction::Ingress, &x.ack, *now));
}

fn request() -> Vec<u8> {
    b"GET /v1/payments?id=8812&page=2 HTTP/1.1\r\nHost: api\r\nUser-Agent: bench/1\r\nCookie: sid=abc123\r\n\r\n".to_vec()
}

/// A form post filling one 1,448-byte segment: ordinary fields, no card number.
fn form_segment() -> Vec<u8> {
    let mut body = String::new();
    let mut i = 0;
    while body.len() < 1300 {
        body.push_str(&format!("field{i}=some+ordinary+value+{i}&"));
        i += 1;
    }
    let mut s = format!(
        "POST /v1/orders HTTP/1.1\r\nHost: api\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    s.truncate(1448);
    let cl = s.len() - s.windows(4).position(|w| w == b"\r\n\r\n").expect("head") - 4;
    // Fix the length to what fits in the segment.
    let text = String::from_utf8_lossy(&s).replace(
        &format!("Content-Length: {}", body.len()),
        &format!("Content-Length: {cl:04}"),
    );
    text.into_bytes()
}

fn verdict(c: &mut Criterion) {
    let mut g = c.benchmark_group("inspect/established_segment");
    let req = request();
    for (name, port) in [
        ("no_inspection_flow_cache", 80u16),
        ("threats_and_dlp", 8080),
    ] {
        let mut e = enforcer();
        let mut now = 0;
        let mut fl = open(&mut e, port, &mut now);
        let mut x = Exchange::new(&fl, &req);
        g.bench_function(name, |b| {
            b.iter(|| exchange(&mut e, &mut fl, &mut x, &mut now))
        });
    }
    g.finish();
}

fn throughput(c: &mut Criterion) {
    let seg = form_segment();
    let mut g = c.benchmark_group("inspect/throughput");
    g.throughput(Throughput::Bytes(seg.len() as u64));
    for (name, port) in [
        ("no_inspection_flow_cache", 80u16),
        ("sqli_and_dlp_1448B_segments", 8080),
    ] {
        let mut e = enforcer();
        let mut now = 0;
        let mut fl = open(&mut e, port, &mut now);
        let mut x = Exchange::new(&fl, &seg);
        g.bench_function(name, |b| {
            b.iter(|| exchange(&mut e, &mut fl, &mut x, &mut now))
        });
    }
    g.finish();
}

fn detectors(c: &mut Criterion) {
    let mut g = c.benchmark_group("inspect/detectors");
    let q = b"SELECT o.id, o.total, c.name FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.created_at > now() - interval '7 days' AND c.email = 'ana@example.com'";
    g.bench_function("sqli_query_140B", |b| {
        b.iter(|| sqli::in_query(black_box(q)))
    });
    g.bench_function("sqli_input_O'Brien", |b| {
        b.iter(|| sqli::in_input(black_box(b"O'Brien")))
    });
    let seg = form_segment();
    g.throughput(Throughput::Bytes(seg.len() as u64));
    g.bench_function("dlp_scan_1448B", |b| {
        b.iter(|| dlp::scan(black_box(&seg), true, true))
    });
    g.finish();
}

criterion_group!(benches, verdict, throughput, detectors);
criterion_main!(benches);
