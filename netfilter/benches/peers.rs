#![allow(missing_docs, clippy::expect_used)]
//! The cluster's pods in every netd's view (issue 15): a new flow's verdict when the peer
//! directory holds a 10,000-pod cluster map (1,000 namespaces, zones by labels) against
//! the same policy with a 10-pod map (the baseline), both at 10,000 rules; and the work of a
//! peers swap at that size: parsing the map enclave-node wrote, building the directory (both
//! without the datapath lock), and the swap under it.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use enclave_netfilter::identity::{ClusterMap, ClusterPeers, Inventory, PeerDirectory};
use enclave_netfilter::matcher::{Direction, Enforcer, EnforcerConfig, PreparedReload, Verdict};
use enclave_netfilter::packet::{build, MacAddr, TcpFlags as F};
use enclave_netfilter::policy::generate::{cluster, ManyRules, CLUSTER_ZONES};
use enclave_netfilter::policy::{self, CompiledPolicy};
use std::sync::Arc;

const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
const GW: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xfe]);

fn compiled() -> Arc<CompiledPolicy> {
    let src = ManyRules {
        name: "bench",
        version: 1,
        namespace: "app",
        rules: 10_000,
        inbound: false,
        extra_zones: &CLUSTER_ZONES,
        extra_rules: &["{name: app-to-db, from: app, to: cde-db, protocol: tcp, ports: [5432]}"],
    }
    .yaml();
    Arc::new(
        policy::load_str(&src, "bench.yaml")
            .expect("policy")
            .compiled,
    )
}

fn local() -> Inventory {
    enclave_netfilter::yaml::from_str(
        "workloads:\n  - {name: a, namespace: app, ips: [10.0.0.1]}\n",
    )
    .expect("inv")
}

fn enforcer(c: &Arc<CompiledPolicy>, map: &ClusterMap) -> Enforcer {
    let inv = local();
    let peers = Arc::new(PeerDirectory::build_node(
        c.policy(),
        &inv.workloads,
        Some(&ClusterPeers::from(map.clone())),
    ));
    Enforcer::new(
        c.clone(),
        peers,
        inv.workloads[0].local(MAC),
        EnforcerConfig::default(),
    )
}

fn bench(c: &mut Criterion) {
    let policy = compiled();
    // SYNs to the map's cde-db pods (app=db: every fourth pod), each a new flow.
    let mut g = c.benchmark_group("new_flow/decide_by_cluster_peer");
    for pods in [10usize, 10_000] {
        let map = cluster(pods, (pods / 10).max(1));
        let mut e = enforcer(&policy, &map);
        let targets: Vec<_> = map
            .pods
            .iter()
            .skip(1)
            .step_by(4)
            .map(|p| p.ips[0])
            .collect();
        let frames: Vec<Vec<u8>> = (0..4096usize)
            .map(|i| {
                let ends = build::Ends {
                    src_mac: MAC,
                    dst_mac: GW,
                    src: [10, 0, 0, 1].into(),
                    dst: targets[i % targets.len()],
                    sport: 10_000 + (i % 50_000) as u16,
                    dport: 5432,
                };
                build::tcp(&ends, F::SYN, 1, 0, &[])
            })
            .collect();
        assert_eq!(
            e.decide(Direction::Egress, &frames[0], 1).verdict,
            Verdict::Pass,
            "app -> cde-db is allowed"
        );
        let (mut i, mut now) = (1usize, 2u64);
        g.bench_with_input(BenchmarkId::from_parameter(pods), &pods, |b, _| {
            b.iter(|| {
                // A fresh flow each time: past the table's reach, the timestamps move on.
                i = (i + 1) % frames.len();
                now += 1_000_000_000_000;
                black_box(e.decide(Direction::Egress, black_box(&frames[i]), now))
            })
        });
    }
    g.finish();

    // A peers swap at 10,000 pods: what netd does without the lock, then under it.
    let map = cluster(10_000, 1_000);
    let text = serde_json::to_vec(&map).expect("json");
    eprintln!("cluster map of 10,000 pods: {} bytes of JSON", text.len());
    let mut g = c.benchmark_group("peers_swap/10000_pods");
    g.sample_size(20);
    g.bench_function("parse_map", |b| {
        b.iter(|| {
            black_box(ClusterPeers::from(
                ClusterMap::parse(black_box(&text)).expect("map"),
            ))
        })
    });
    let inv = local();
    let known = ClusterPeers::from(map.clone());
    g.bench_function("build_directory", |b| {
        b.iter(|| {
            black_box(PeerDirectory::build_node(
                policy.policy(),
                &inv.workloads,
                Some(&known),
            ))
        })
    });
    let mut e = enforcer(&policy, &map);
    let peers = Arc::new(PeerDirectory::build_node(
        policy.policy(),
        &inv.workloads,
        Some(&known),
    ));
    g.bench_function("swap_under_lock", |b| {
        b.iter_batched(
            || PreparedReload::new(&policy, policy.clone(), peers.clone()),
            |p| black_box(e.install(p)),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
