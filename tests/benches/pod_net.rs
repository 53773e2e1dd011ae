//! The pod network end to end, as the shim plumbs it, in one run, on the same guest image and
//! VMM (QEMU), between the pod and a peer namespace on its veth:
//! - `netd pci-cde`: enclave-netd with configs/policies/pci-cde.yaml (the pod is
//!   payments/api in zone cde-api, the peer is in zone web: rule `web-to-api`, tcp 8080,
//!   app http), plus the pod's nftables table;
//! - `netd allow-all`: enclave-netd with a policy that allows everything;
//! - `QEMU tap`: QEMU's built-in virtio-net on the tap, no netd, no policy (the baseline);
//! - `tap no offloads`: the same without checksum/TSO offloads and mergeable buffers, the
//!   feature set netd offers: what separates the offloads from the vhost-user hop and policy.
//!
//! Measured: TCP throughput (an HTTP POST of 16 MiB to `nc -l` in a container) and
//! request/response latency (sequential HTTP/1.0 GETs to busybox httpd in a container, each
//! a new connection, so each one is a new flow the policy decides).
//!
//! `cargo bench -p enclave-tests --bench pod_net` (ENCLAVE_BENCH_MIB, default 16;
//! ENCLAVE_BENCH_REQUESTS, default 50; ENCLAVE_BENCH_ROUNDS, default 3: every variant once
//! per round, medians reported). Needs root and the guest image; says SKIPPED
//! otherwise. Under TCG the guest is the bottleneck: read the ratios, not the absolutes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use enclave_agent_protocol::messages::*;
use enclave_tests::cri::OPEN_POLICY;
use enclave_tests::netns::POD_IP;

#[path = "support/pod.rs"]
mod pod;
use pod::{BenchPod, Datapath};

/// Connects to the pod's port 8080 from the peer, retrying while the server starts.
fn connect() -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match TcpStream::connect_timeout(
            &format!("{POD_IP}:8080").parse().unwrap(),
            Duration::from_secs(5),
        ) {
            Ok(s) => return s,
            Err(e) => {
                assert!(Instant::now() < deadline, "connect to the pod: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

struct Result_ {
    name: &'static str,
    mib_s: f64,
    p50_ms: f64,
    p90_ms: f64,
}

fn measure(
    name: &'static str,
    policy: Option<&str>,
    tools: &enclave_shim::vm::Tools,
    mib: usize,
    requests: usize,
) -> Result_ {
    let tag = name
        .split_whitespace()
        .last()
        .unwrap_or("x")
        .replace(['-', ' '], "");
    let datapath = match policy {
        Some(p) => Datapath::Netd {
            policy: p,
            zone: "cde-api",
        },
        None => Datapath::Tap {
            offloads: !name.contains("no offloads"),
        },
    };
    let pod = BenchPod::start(&tag, datapath, tools);
    let (c, ns) = (&pod.client, &pod.ns);

    // Throughput: a 16 MiB HTTP POST into `nc -l`.
    pod.container("sink", "nc -l -p 8080 > /dev/null", &[]);
    let peer_ns = ns.peer_path();
    let pn = peer_ns.clone();
    let mib_s = std::thread::spawn(move || {
        enclave_netd::tap::enter_netns(&pn).unwrap();
        let body = vec![b'x'; 64 * 1024];
        let total = mib * 1024 * 1024;
        let mut s = connect();
        let t = Instant::now();
        s.write_all(
            format!("POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: {total}\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        for _ in 0..total / body.len() {
            s.write_all(&body).unwrap();
        }
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        total as f64 / (1024.0 * 1024.0) / t.elapsed().as_secs_f64()
    })
    .join()
    .unwrap();
    let _ = c.call_timeout::<WaitProcess>(
        &ProcessRequest {
            container_id: "sink".into(),
            exec_id: String::new(),
        },
        Some(Duration::from_secs(30)),
    );

    // Latency: sequential HTTP/1.0 GETs, one connection each.
    pod.container(
        "web",
        "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 8080 -h /www",
        &[],
    );
    let mut lat = std::thread::spawn(move || {
        enclave_netd::tap::enter_netns(&peer_ns).unwrap();
        let get = || {
            let t = Instant::now();
            let mut s = connect();
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            let mut r = Vec::new();
            s.read_to_end(&mut r).unwrap();
            assert!(
                r.starts_with(b"HTTP/1.0 200") || r.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&r)
            );
            t.elapsed().as_secs_f64() * 1e3
        };
        for _ in 0..5 {
            get();
        }
        (0..requests).map(|_| get()).collect::<Vec<f64>>()
    })
    .join()
    .unwrap();
    lat.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    drop(pod);
    Result_ {
        name,
        mib_s,
        p50_ms: q(0.5),
        p90_ms: q(0.9),
    }
}

fn main() {
    let Some(tools) = pod::ready("pod_net") else {
        return;
    };
    let env = enclave_tests::bench_setting::<usize>;
    let (mib, requests) = (
        env("ENCLAVE_BENCH_MIB", 16),
        env("ENCLAVE_BENCH_REQUESTS", 50),
    );
    let cde = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/policies/pci-cde.yaml"),
    )
    .unwrap();
    let (accel, why) = enclave_shim::vm::accel();
    println!("pod network, guest under QEMU {accel} ({why}); {mib} MiB POST, {requests} GETs (new connection each)\n");
    // Rounds of all variants in turn, medians per variant: under TCG single runs move by
    // tens of percent.
    let rounds = env("ENCLAVE_BENCH_ROUNDS", 3);
    let variants: [(&'static str, Option<&str>); 4] = [
        ("QEMU tap", None),
        ("tap no offloads", None),
        ("netd allow-all", Some(OPEN_POLICY)),
        ("netd pci-cde", Some(&cde)),
    ];
    let mut all: Vec<Vec<Result_>> = variants.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, (name, policy)) in variants.iter().enumerate() {
            let r = measure(name, *policy, &tools, mib, requests);
            eprintln!(
                "  round {}: {:<16} {:6.1} MiB/s  GET p50 {:6.2} ms",
                round + 1,
                name,
                r.mib_s,
                r.p50_ms
            );
            all[i].push(r);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let results: Vec<Result_> = all
        .iter()
        .map(|rs| Result_ {
            name: rs[0].name,
            mib_s: med(&mut rs.iter().map(|r| r.mib_s).collect()),
            p50_ms: med(&mut rs.iter().map(|r| r.p50_ms).collect()),
            p90_ms: med(&mut rs.iter().map(|r| r.p90_ms).collect()),
        })
        .collect();
    println!("medians of {rounds} rounds:");
    let base = &results[0];
    println!(
        "{:<18}{:>12}{:>10}{:>12}{:>12}{:>14}",
        "datapath", "MiB/s", "vs tap", "GET p50 ms", "GET p90 ms", "p50 vs tap"
    );
    for r in &results {
        println!(
            "{:<18}{:>12.1}{:>9.0}%{:>12.2}{:>12.2}{:>13.0}%",
            r.name,
            r.mib_s,
            100.0 * r.mib_s / base.mib_s,
            r.p50_ms,
            r.p90_ms,
            100.0 * (r.p50_ms / base.p50_ms - 1.0)
        );
    }
}
