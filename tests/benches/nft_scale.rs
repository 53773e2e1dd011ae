//! The kernel wall at a policy's scale, folded into sets (what `nft::render` installs)
//! against the same table as plain rules (`nft::render_rules`, the baseline), side by side
//! in one run, for generated policies of 1,000 and 10,000 rules (100 CIDR zones, one port
//! per rule, the shape per-service generators produce):
//! - the apply through netlink (one atomic batch; median of 3);
//! - the kernel memory the table holds (Slab + Percpu + VmallocUsed in /proc/meminfo,
//!   before the apply and after it; median of 3; an estimate, other activity on the node
//!   counts too);
//! - new TCP connections per second through the table from the peer to the pod, whose
//!   allow rule is the policy's last (each SYN is a new flow the table decides; the
//!   connections run in a network namespace pair, so loopback speed is the ceiling).
//!
//! `cargo bench -p enclave-tests --bench nft_scale` (ENCLAVE_BENCH_CONNECTIONS, default
//! 2000). Needs root; says SKIPPED otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use enclave_netfilter::identity::{Inventory, PeerDirectory};
use enclave_netfilter::nft::{self, NftTable, NftWorkload, Placement};
use enclave_netfilter::policy::{self, generate::ManyRules};
use enclave_tests::netns::{PodPair, POD_IP};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

fn in_netns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(ns).unwrap();
    std::thread::spawn(move || {
        // SAFETY: joins the namespace for this thread only, from a file we own.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

/// Slab + Percpu + VmallocUsed, in KiB.
fn kernel_kib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("Slab:") || l.starts_with("Percpu:") || l.starts_with("VmallocUsed:")
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn tables(rules: usize) -> (NftTable, NftTable) {
    let src = ManyRules {
        name: "scale",
        version: 1,
        namespace: "shop",
        rules,
        inbound: true,
        extra_zones: &["{name: peer, cidrs: [10.99.0.1/32]}"],
        extra_rules: &["{name: peer-to-app, from: peer, to: app, protocol: tcp, ports: [8080]}"],
    }
    .yaml();
    let loaded = policy::load_str(&src, "scale.yaml").unwrap();
    let inv: Inventory = enclave_netfilter::yaml::from_str(&format!(
        "workloads:\n  - {{name: web, namespace: shop, ips: [{POD_IP}]}}\n"
    ))
    .unwrap();
    let peers = PeerDirectory::build(loaded.compiled.policy(), &inv.workloads);
    let ident = inv.workloads[0].identity();
    let w = NftWorkload {
        identity: &ident,
        ips: &inv.workloads[0].ips,
    };
    (
        nft::render(&loaded.compiled, &peers, &w, &Placement::Local),
        nft::render_rules(&loaded.compiled, &peers, &w, &Placement::Local),
    )
}

struct Figures {
    apply_ms: f64,
    kernel_kib: f64,
    conn_per_s: f64,
}

fn measure(table: &NftTable, connections: usize) -> Figures {
    let pair = PodPair::new("nfts");
    let (mut applies, mut kib) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        nft::remove(&table.name, Some(&pair.pod_path())).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let before = kernel_kib();
        let t0 = Instant::now();
        nft::apply(table, Some(&pair.pod_path())).unwrap();
        applies.push(t0.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(300));
        kib.push(kernel_kib().saturating_sub(before) as f64);
    }
    let listener = in_netns(&pair.pod_path(), || {
        TcpListener::bind(format!("{POD_IP}:8080")).unwrap()
    });
    let server = std::thread::spawn(move || {
        for s in listener.incoming().take(connections) {
            drop(s);
        }
    });
    let dst: SocketAddr = format!("{POD_IP}:8080").parse().unwrap();
    let secs = in_netns(&pair.peer_path(), move || {
        let t0 = Instant::now();
        for _ in 0..connections {
            let s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))
                .expect("an allowed connection");
            drop(s);
        }
        t0.elapsed().as_secs_f64()
    });
    server.join().unwrap();
    Figures {
        apply_ms: median(applies),
        kernel_kib: median(kib),
        conn_per_s: connections as f64 / secs,
    }
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED nft_scale: not root (network namespaces and nftables)");
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let connections: usize = enclave_tests::bench_setting("ENCLAVE_BENCH_CONNECTIONS", 2000);
    println!(
        "{:>7} {:<7} {:>6} {:>9} {:>10} {:>12} {:>10}",
        "rules", "form", "nft", "set elts", "apply ms", "kernel KiB", "conn/s"
    );
    for rules in [1_000, 10_000] {
        let (folded, plain) = tables(rules);
        let mut rows = Vec::new();
        for (form, t) in [("sets", &folded), ("plain", &plain)] {
            let f = measure(t, connections);
            println!(
                "{rules:>7} {form:<7} {:>6} {:>9} {:>10.1} {:>12.0} {:>10.0}",
                t.rule_count(),
                t.element_count(),
                f.apply_ms,
                f.kernel_kib,
                f.conn_per_s
            );
            rows.push(f);
        }
        println!(
            "{rules:>7} ratio   sets/plain: apply {:.2}x, kernel memory {:.2}x, connections {:.2}x",
            rows[0].apply_ms / rows[1].apply_ms,
            rows[0].kernel_kib / rows[1].kernel_kib.max(1.0),
            rows[0].conn_per_s / rows[1].conn_per_s
        );
    }
}
