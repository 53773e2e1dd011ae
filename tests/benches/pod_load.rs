//! New connections into a pod at a steady rate, through the whole enforcement path (guest
//! virtio-net, QEMU vhost-user, enclave-netd deciding every new flow, the tap, the pod's
//! nftables table), with a policy of 10,000 rules against an allow-all policy (the
//! baseline) in the same run, on the same guest image:
//! - `netd allow-all`: one rule that allows everything;
//! - `netd 10,000 rules`: 100 CIDR zones and 10,000 one-port rules into the pod's zone, and
//!   last the rule that lets the peer (zone `web`) reach the pod's port 8080.
//!
//! The peer opens ENCLAVE_BENCH_RATE connections per second (default 1,000) for
//! ENCLAVE_BENCH_SECONDS (default 10), open loop (connection i starts at i / rate whatever
//! the others do), to a static accept-and-close server in a container; every connection is
//! allowed, so every failure counts. Reported: failures, the rate achieved, and the setup
//! latency (connect() until the handshake completes) percentiles.
//!
//! `cargo bench -p enclave-tests --bench pod_load`. Needs root, the guest image, a C
//! compiler (for the static server) and a release enclave-netd; says SKIPPED otherwise.
//! Under TCG the guest kernel is emulated: read the ratio, not the absolutes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use enclave_netfilter::policy::generate::ManyRules;
use enclave_tests::cri::OPEN_POLICY;
use enclave_tests::netns::POD_IP;

#[path = "support/pod.rs"]
mod pod;
use pod::{BenchPod, Datapath};

/// Accepts and closes, as fast as one thread can: what the handshake rate needs.
const ACCEPTOR: &str = r#"
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(8080);
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4096)) return 1;
    for (;;) {
        int c = accept(s, 0, 0);
        if (c >= 0) close(c);
    }
}
"#;

fn build_acceptor(dir: &Path) -> Result<PathBuf, String> {
    let src = dir.join("acceptor.c");
    let bin = dir.join("acceptor");
    std::fs::write(&src, ACCEPTOR).map_err(|e| e.to_string())?;
    let out = std::process::Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .map_err(|e| format!("cc: {e} (apt-get install build-essential)"))?;
    if !out.status.success() {
        return Err(format!(
            "cc -static failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(bin)
}

struct Load {
    name: &'static str,
    attempted: usize,
    failed: usize,
    rate: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

/// What every run shares.
struct Setup<'a> {
    tools: &'a enclave_shim::vm::Tools,
    acceptor: &'a Path,
    rate: usize,
    seconds: usize,
}

fn run(name: &'static str, tag: &str, policy: &str, zone: &str, setup: &Setup<'_>) -> Load {
    let Setup {
        tools,
        acceptor,
        rate,
        seconds,
    } = *setup;
    let pod = BenchPod::start(tag, Datapath::Netd { policy, zone }, tools);
    pod.container("acceptor", "exec /acceptor", &[("/acceptor", acceptor)]);
    let dst: SocketAddr = format!("{POD_IP}:8080").parse().unwrap();
    let peer = pod.ns.peer_path();
    // Wait for the server.
    let p = peer.clone();
    std::thread::spawn(move || {
        enclave_netd::tap::enter_netns(&p).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect_timeout(&dst, Duration::from_secs(2)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{name}: the server never answered"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .join()
    .unwrap();

    let total = rate * seconds;
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let failed = Arc::new(AtomicUsize::new(0));
    let start = Instant::now() + Duration::from_millis(100);
    let workers: Vec<_> = (0..32)
        .map(|_| {
            let (next, results, failed, peer) =
                (next.clone(), results.clone(), failed.clone(), peer.clone());
            std::thread::spawn(move || {
                enclave_netd::tap::enter_netns(&peer).unwrap();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return;
                    }
                    let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let t = Instant::now();
                    match TcpStream::connect_timeout(&dst, Duration::from_secs(3)) {
                        Ok(s) => {
                            let ms = t.elapsed().as_secs_f64() * 1e3;
                            drop(s);
                            results.lock().unwrap().push(ms);
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut lat = results.lock().unwrap().clone();
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Load {
        name,
        attempted: total,
        failed: failed.load(Ordering::Relaxed),
        rate: lat.len() as f64 / elapsed,
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        max: q(1.0),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some(tools) = pod::ready("pod_load") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let acceptor = match build_acceptor(work.path()) {
        Ok(a) => a,
        Err(e) => {
            println!("SKIPPED pod_load: {e}");
            return;
        }
    };
    let env = enclave_tests::bench_setting::<usize>;
    let (rate, seconds) = (
        env("ENCLAVE_BENCH_RATE", 1000),
        env("ENCLAVE_BENCH_SECONDS", 10),
    );
    let big = ManyRules {
        name: "load",
        version: 1,
        namespace: "payments",
        rules: 10_000,
        inbound: true,
        extra_zones: &["{name: web, selector: {namespaces: [storefront]}}"],
        extra_rules: &["{name: web-to-app, from: web, to: app, protocol: tcp, ports: [8080]}"],
    }
    .yaml();
    let (accel, why) = enclave_shim::vm::accel();
    println!(
        "new connections into a pod, guest under QEMU {accel} ({why}): {rate}/s for {seconds} s, open loop\n"
    );
    let setup = Setup {
        tools: &tools,
        acceptor: &acceptor,
        rate,
        seconds,
    };
    let loads = [
        run("netd allow-all", "lopen", OPEN_POLICY, "anywhere", &setup),
        run("netd 10,000 rules", "lbig", &big, "app", &setup),
    ];
    println!(
        "{:<20}{:>10}{:>8}{:>10}{:>9}{:>9}{:>9}{:>9}{:>12}",
        "policy",
        "attempted",
        "failed",
        "conn/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "p50 vs base"
    );
    for l in &loads {
        println!(
            "{:<20}{:>10}{:>8}{:>10.0}{:>9.2}{:>9.2}{:>9.2}{:>9.1}{:>11.2}x",
            l.name,
            l.attempted,
            l.failed,
            l.rate,
            l.p50,
            l.p90,
            l.p99,
            l.max,
            l.p50 / loads[0].p50
        );
    }
}
