#![allow(missing_docs, clippy::expect_used)]
//! Matcher cost: an established flow's frame, a new flow's first frame at 10, 1,000 and
//! 10,000 rules, the compiled rule lookup against a naive linear scan (the baseline) in the
//! same run, and a policy reload at 10,000 rules: what netd's control thread does without
//! the datapath lock (load and compile) against what it does under it (the swap, which
//! re-decides every live flow) — the longest a frame waits during a reload.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use enclave_netfilter::identity::{Inventory, PeerDirectory};
use enclave_netfilter::matcher::{Direction, Enforcer, EnforcerConfig, PreparedReload, Verdict};
use enclave_netfilter::packet::{build, MacAddr, TcpFlags as F};
use enclave_netfilter::policy::generate::{ManyRules, PEER_ZONES};
use enclave_netfilter::policy::{self, Action, CompiledPolicy, Policy, Protocol, RuleId, ZoneId};
use std::net::IpAddr;
use std::sync::Arc;

const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
const GW: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xfe]);

/// A policy of `n` allow rules from zone `app` to 100 CIDR zones, one port each.
fn policy_src(n: usize) -> String {
    ManyRules {
        name: "bench",
        version: 1,
        namespace: "app",
        rules: n,
        inbound: false,
        extra_zones: &[],
        extra_rules: &[],
    }
    .yaml()
}

fn compiled(n: usize) -> Arc<CompiledPolicy> {
    Arc::new(
        policy::load_str(&policy_src(n), "bench.yaml")
            .expect("bench policy")
            .compiled,
    )
}

/// An enforcer for workload `app/a` (10.0.0.1); `fast_path: false` is the full-path
/// baseline.
fn enforcer(c: Arc<CompiledPolicy>, fast_path: bool) -> Enforcer {
    enforcer_with(c, fast_path, 65536)
}

/// As [`enforcer`], with a connection table of `flows` slots.
fn enforcer_with(c: Arc<CompiledPolicy>, fast_path: bool, flows: usize) -> Enforcer {
    let inv: Inventory = enclave_netfilter::yaml::from_str(
        "workloads:\n  - {name: a, namespace: app, ips: [10.0.0.1]}\n",
    )
    .expect("inv");
    let peers = Arc::new(PeerDirectory::build(c.policy(), &inv.workloads));
    let local = inv.workloads[0].local(MAC);
    Enforcer::new(
        c,
        peers,
        local,
        EnforcerConfig {
            flows,
            fast_path,
            ..EnforcerConfig::default()
        },
    )
}

/// The destination of the last rule: the linear scan's worst case.
fn last_rule_target(n: usize) -> (IpAddr, u16) {
    let z = (n - 1) % PEER_ZONES;
    (
        format!("10.{}.{}.9", 100 + z / 256, z % 256)
            .parse()
            .expect("ip"),
        (1000 + n - 1) as u16,
    )
}

/// The baseline: rules checked one by one, as a naive firewall does (zones already
/// resolved, deny wins, first allow decides).
fn linear(p: &Policy, from: ZoneId, to: ZoneId, proto: u8, port: u16) -> Option<(RuleId, Action)> {
    let mut allow = None;
    for (i, r) in p.rules.iter().enumerate() {
        let proto_ok = match r.protocol {
            Protocol::Tcp => proto == 6,
            Protocol::Udp => proto == 17,
            Protocol::Icmp => proto == 1,
            Protocol::Icmpv6 => proto == 58,
            Protocol::Any => true,
        };
        if proto_ok
            && r.from.contains(&from)
            && r.to.contains(&to)
            && r.ports.iter().any(|pr| pr.lo <= port && port <= pr.hi)
        {
            if r.action == Action::Deny {
                return Some((RuleId(i as u32), Action::Deny));
            }
            allow = allow.or(Some((RuleId(i as u32), Action::Allow)));
        }
    }
    allow
}

fn bench(c: &mut Criterion) {
    // An established flow: handshake once, then time a data segment (flow cache on, and
    // the full path alone for comparison).
    for fast_path in [true, false] {
        let mut e = enforcer(compiled(1000), fast_path);
        let (dst, port) = last_rule_target(1000);
        let ends = build::Ends {
            src_mac: MAC,
            dst_mac: GW,
            src: [10, 0, 0, 1].into(),
            dst,
            sport: 40000,
            dport: port,
        };
        let back = build::Ends {
            src_mac: GW,
            dst_mac: MAC,
            ..ends.reversed()
        };
        let mut now = 1u64;
        for (dir, f) in [
            (Direction::Egress, build::tcp(&ends, F::SYN, 1, 0, &[])),
            (
                Direction::Ingress,
                build::tcp(&back, F::SYN | F::ACK, 9, 2, &[]),
            ),
            (Direction::Egress, build::tcp(&ends, F::ACK, 2, 10, &[])),
        ] {
            assert_eq!(e.decide(dir, &f, now).verdict, Verdict::Pass);
            now += 1;
        }
        let data = build::tcp(&ends, F::ACK | F::PSH, 2, 10, &[0x42; 1400]);
        let name = if fast_path {
            "established_flow/decide"
        } else {
            "established_flow/decide_full_path"
        };
        c.bench_function(name, |b| {
            b.iter(|| {
                now += 1;
                black_box(e.decide(Direction::Egress, black_box(&data), now))
            })
        });
    }

    // A new flow's SYN through the whole matcher, each with a fresh source port.
    let mut g = c.benchmark_group("new_flow/decide");
    for n in [10, 1000, 10000] {
        let mut e = enforcer(compiled(n), true);
        let (dst, port) = last_rule_target(n);
        let frames: Vec<Vec<u8>> = (0..4096u16)
            .map(|i| {
                build::tcp(
                    &build::Ends {
                        src_mac: MAC,
                        dst_mac: GW,
                        src: [10, 0, 0, 1].into(),
                        dst,
                        sport: 10000 + i,
                        dport: port,
                    },
                    F::SYN,
                    1,
                    0,
                    &[],
                )
            })
            .collect();
        let mut i = 0usize;
        let mut now = 1u64;
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % frames.len();
                now += 1;
                let d = e.decide(Direction::Egress, black_box(&frames[i]), now);
                debug_assert_eq!(d.verdict, Verdict::Pass);
                black_box(d)
            })
        });
    }
    g.finish();

    // The rule lookup alone: compiled index vs linear scan, same policy, same flow.
    let mut g = c.benchmark_group("rule_lookup");
    for n in [10, 1000, 10000] {
        let cp = compiled(n);
        let (dst, port) = last_rule_target(n);
        let from = ZoneId(1);
        let to = cp.zone_of_ip(dst).expect("zone");
        assert!(matches!(
            cp.lookup(from, to, 6, port),
            policy::Lookup::Allowed(_)
        ));
        assert_eq!(
            linear(cp.policy(), from, to, 6, port).map(|x| x.1),
            Some(Action::Allow)
        );
        g.bench_with_input(BenchmarkId::new("compiled", n), &n, |b, _| {
            b.iter(|| black_box(cp.lookup(black_box(from), black_box(to), 6, black_box(port))))
        });
        g.bench_with_input(BenchmarkId::new("linear_baseline", n), &n, |b, _| {
            b.iter(|| {
                black_box(linear(
                    cp.policy(),
                    black_box(from),
                    black_box(to),
                    6,
                    black_box(port),
                ))
            })
        });
    }
    g.finish();

    // A reload at 10,000 rules with 1,000 live flows.
    let mut g = c.benchmark_group("reload_10000_rules");
    let src = policy_src(10_000);
    let cp = compiled(10_000);
    let inv: Inventory = enclave_netfilter::yaml::from_str(
        "workloads:\n  - {name: a, namespace: app, ips: [10.0.0.1]}\n",
    )
    .expect("inv");
    let peers = Arc::new(PeerDirectory::build(cp.policy(), &inv.workloads));
    // netd's table: EnforcerConfig's default size (a reload walks every slot).
    let mut e = enforcer_with(cp.clone(), true, EnforcerConfig::default().flows);
    let mut now = 1u64;
    for i in 0..1000usize {
        let (dst, port) = last_rule_target(1 + i * 10);
        let syn = build::tcp(
            &build::Ends {
                src_mac: MAC,
                dst_mac: GW,
                src: [10, 0, 0, 1].into(),
                dst,
                sport: 10000 + i as u16,
                dport: port,
            },
            F::SYN,
            1,
            0,
            &[],
        );
        now += 1;
        assert_eq!(
            e.decide(Direction::Egress, &syn, now).verdict,
            Verdict::Pass
        );
    }
    g.sample_size(10);
    g.bench_function("load_and_compile_outside_the_lock", |b| {
        b.iter(|| black_box(policy::load_str(black_box(&src), "bench.yaml").expect("policy")))
    });
    g.bench_function("prepare_outside_the_lock", |b| {
        b.iter(|| black_box(PreparedReload::new(e.policy(), cp.clone(), peers.clone())))
    });
    let prepared = PreparedReload::new(e.policy(), cp.clone(), peers.clone());
    g.bench_function("swap_under_the_lock_1000_flows", |b| {
        b.iter_batched(
            || prepared.clone(),
            |p| {
                let cut = e.install(p);
                debug_assert!(cut.is_empty());
                black_box(cut)
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
