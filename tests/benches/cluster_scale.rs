//! enclave-node and a netd's view at cluster scale (issue 15): 10,000 pods in 1,000
//! namespaces, served by the stand-in API server (tests/src/kubeapi.rs), against 10 pods
//! as the baseline in the same run. Prints:
//! - enclave-node's memory (peak and resident) once its map is written;
//! - the heap a netd's view takes (the parsed map and the peer directory; counted by this
//!   binary's allocator);
//! - the time from an API event (a pod relabelled out of its zone) to a decision with the
//!   new identity: enclave-node's watch and write, the shim's inotify wake-up (the same
//!   code), the peers swap, and the verdict on a new flow to that pod — in this process
//!   rather than through a pod's netd (no VM here), so the control socket hop and the
//!   nftables apply are not in it.
//!
//! Build enclave-node first (`cargo build --release -p enclave-node`; the debug build is used
//! if there is no release one, and said so). ENCLAVE_BENCH_PODS / _NAMESPACES / _EVENTS
//! change the sizes.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use enclave_netfilter::identity::{
    ClusterMap, ClusterPeers, Inventory, PeerDirectory, CLUSTER_MAP_FILE,
};
use enclave_netfilter::matcher::{Direction, Enforcer, EnforcerConfig, PreparedReload, Verdict};
use enclave_netfilter::packet::{build, MacAddr, TcpFlags as F};
use enclave_netfilter::policy::generate::{cluster, ManyRules, CLUSTER_ZONES};
use enclave_tests::bench_setting;
use enclave_tests::kubeapi::{FakeApiServer, PodObject};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with `l`.
        unsafe { System.dealloc(p, l) }
    }
}
#[global_allocator]
static ALLOC: Counting = Counting;

const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);

fn node_bin() -> PathBuf {
    let root = enclave_tests::workspace_root();
    let rel = root.join("target/release/enclave-node");
    if rel.exists() {
        return rel;
    }
    let dbg = root.join("target/debug/enclave-node");
    assert!(
        dbg.exists(),
        "build enclave-node first: cargo build --release -p enclave-node"
    );
    eprintln!(
        "note: no release enclave-node; measuring the debug build ({})",
        dbg.display()
    );
    dbg
}

struct Node(Child);
impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn publish(api: &FakeApiServer, m: &ClusterMap) {
    let mut nss: Vec<&str> = m.pods.iter().map(|p| p.namespace.as_str()).collect();
    nss.sort();
    nss.dedup();
    for (n, ns) in nss.iter().enumerate() {
        let _ = n;
        let cde = m
            .pods
            .iter()
            .find(|p| p.namespace == *ns)
            .is_some_and(|p| p.namespace_labels.contains_key("pci"));
        api.put_namespace(ns, if cde { &[("pci", "cde")] } else { &[] });
    }
    for p in &m.pods {
        let labels: Vec<(&str, &str)> = p
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        api.put_pod(&PodObject {
            namespace: &p.namespace,
            name: &p.name,
            uid: &p.uid,
            labels: &labels,
            ip: &p.ips[0].to_string(),
            node: &p.node,
        });
    }
}

fn wait_map(dir: &Path, pods: usize) -> ClusterMap {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(m)) = ClusterMap::load_dir(dir) {
            if m.pods.len() == pods {
                return m;
            }
        }
        assert!(Instant::now() < deadline, "no map of {pods} pods");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (peak KiB, resident KiB) of enclave-node once it has published `m`.
fn node_memory(m: &ClusterMap) -> (u64, u64, Node, FakeApiServer, tempfile::TempDir) {
    let api = FakeApiServer::start();
    publish(&api, m);
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(node_bin())
        .args(["--api-server", &api.url(), "--metrics", "off", "--peer-dir"])
        .arg(dir.path())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let node = Node(child);
    wait_map(dir.path(), m.pods.len());
    std::thread::sleep(Duration::from_millis(300));
    let pid = node.0.id();
    (kib(pid, "VmHWM:"), kib(pid, "VmRSS:"), node, api, dir)
}

/// Heap bytes of a netd's view of `m`, as it keeps it: the pods' identities (the map read
/// from its file and turned into [`ClusterPeers`]; the text and layout are dropped) and the
/// peer directory built from them.
fn view_bytes(
    m: &ClusterMap,
    policy: &enclave_netfilter::policy::CompiledPolicy,
) -> (usize, usize) {
    let text = serde_json::to_vec(m).unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    let known = ClusterPeers::from(ClusterMap::parse(&text).unwrap());
    let after_map = LIVE.load(Ordering::Relaxed);
    let dir = PeerDirectory::build_node(policy.policy(), &[], Some(&known));
    let after_dir = LIVE.load(Ordering::Relaxed);
    assert_eq!(dir.len(), m.pods.len());
    drop(dir);
    drop(known);
    (after_map - before, after_dir - after_map)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let pods: usize = bench_setting("ENCLAVE_BENCH_PODS", 10_000);
    let namespaces: usize = bench_setting("ENCLAVE_BENCH_NAMESPACES", 1_000);
    let events: usize = bench_setting("ENCLAVE_BENCH_EVENTS", 15);
    let src = ManyRules {
        name: "bench",
        version: 1,
        namespace: "app",
        rules: 1_000,
        inbound: false,
        extra_zones: &CLUSTER_ZONES,
        extra_rules: &["{name: app-to-db, from: app, to: cde-db, protocol: tcp, ports: [5432]}"],
    }
    .yaml();
    let policy = Arc::new(
        enclave_netfilter::policy::load_str(&src, "bench.yaml")
            .unwrap()
            .compiled,
    );
    let big = cluster(pods, namespaces);
    let small = cluster(10, 1);

    println!(
        "cluster map: {pods} pods in {namespaces} namespaces ({} bytes of JSON); baseline 10 pods",
        serde_json::to_vec(&big).unwrap().len()
    );
    let (hwm0, rss0, n0, a0, d0) = node_memory(&small);
    drop((n0, a0, d0));
    let (hwm, rss, node, api, dir) = node_memory(&big);
    println!("enclave-node memory, peak / resident:    {:>7.1} / {:>7.1} MiB   (10 pods: {:.1} / {:.1} MiB)", hwm as f64 / 1024.0, rss as f64 / 1024.0, hwm0 as f64 / 1024.0, rss0 as f64 / 1024.0);
    let (mb, db) = view_bytes(&big, &policy);
    let (mb0, db0) = view_bytes(&small, &policy);
    println!(
        "a netd's view, identities + directory:   {:>7.1} + {:.1} MiB   (10 pods: {} + {} bytes)",
        mb as f64 / 1048576.0,
        db as f64 / 1048576.0,
        mb0,
        db0
    );

    // Event -> decision: relabel a cde-db pod app=db -> app=worker and back; each time, wait
    // for the map, swap the peers in and decide a new flow to it.
    let inv: Inventory = enclave_netfilter::yaml::from_str(
        "workloads:\n  - {name: a, namespace: app, ips: [10.0.0.1]}\n",
    )
    .unwrap();
    let map = ClusterPeers::from(ClusterMap::load_dir(dir.path()).unwrap().unwrap());
    let peers = Arc::new(PeerDirectory::build_node(
        policy.policy(),
        &inv.workloads,
        Some(&map),
    ));
    let mut e = Enforcer::new(
        policy.clone(),
        peers,
        inv.workloads[0].local(MAC),
        EnforcerConfig::default(),
    );
    let watch = enclave_shim::inotify::DirWatch::new(dir.path()).unwrap();
    let target = big.pods[1].clone(); // app=db in a CDE namespace
    let mut lat = Vec::new();
    let mut now = 1u64;
    for k in 0..events {
        let to_worker = k % 2 == 0;
        let labels: Vec<(&str, &str)> = target
            .labels
            .iter()
            .map(|(a, b)| {
                (
                    a.as_str(),
                    if a == "app" && to_worker {
                        "worker"
                    } else {
                        b.as_str()
                    },
                )
            })
            .collect();
        watch.drain();
        let t0 = Instant::now();
        api.put_pod(&PodObject {
            namespace: &target.namespace,
            name: &target.name,
            uid: &target.uid,
            labels: &labels,
            ip: &target.ips[0].to_string(),
            node: &target.node,
        });
        let want = if to_worker {
            Verdict::Drop
        } else {
            Verdict::Pass
        };
        loop {
            watch.wait_for(CLUSTER_MAP_FILE).unwrap();
            let m = ClusterPeers::from(ClusterMap::load_dir(dir.path()).unwrap().unwrap());
            let peers = Arc::new(PeerDirectory::build_node(
                policy.policy(),
                &inv.workloads,
                Some(&m),
            ));
            e.install(PreparedReload::new(e.policy(), policy.clone(), peers));
            now += 1_000_000_000_000;
            let syn = build::tcp(
                &build::Ends {
                    src_mac: MAC,
                    dst_mac: MacAddr([2, 0, 0, 0, 0, 0xfe]),
                    src: [10, 0, 0, 1].into(),
                    dst: target.ips[0],
                    sport: 20_000 + k as u16,
                    dport: 5432,
                },
                F::SYN,
                1,
                0,
                &[],
            );
            if e.decide(Direction::Egress, &syn, now).verdict == want {
                break;
            }
        }
        lat.push(t0.elapsed());
    }
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "API event -> decision with the new identity: median {:.0} ms, p90 {:.0} ms, max {:.0} ms over {events} events (enclave-node coalesces writes for 100 ms)",
        ms(lat[lat.len() / 2]),
        ms(lat[lat.len() * 9 / 10]),
        ms(lat[lat.len() - 1])
    );
    drop(node);
}
