#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! The per-frame path allocates nothing: a counting allocator watches `decide` over frames
//! of every kind (new flows allowed and denied, established, L7 detection and mismatch,
//! spoofing, fragments, malformed bytes).

use enclave_netfilter::identity::{Inventory, PeerDirectory};
use enclave_netfilter::matcher::{Direction, Enforcer, EnforcerConfig, LocalWorkload};
use enclave_netfilter::packet::{build, MacAddr, TcpFlags as F};
use enclave_netfilter::policy;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Whether this thread's allocations are being counted. Per thread: the test harness's
    /// own threads (output capture, the "running for over 60 seconds" timer) allocate too,
    /// and once made CI fail with 4 allocations that were not the matcher's.
    static WATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn watching() -> bool {
    WATCH.try_with(std::cell::Cell::get).unwrap_or(false)
}

// SAFETY: forwards to the system allocator unchanged; only counts calls while watching.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if watching() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if watching() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn deciding_frames_allocates_nothing() {
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/policies/pci-cde.yaml"
    ))
    .unwrap();
    let inv_src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/inventory/pci-demo.yaml"
    ))
    .unwrap();
    let c = Arc::new(policy::load_str(&src, "pci-cde.yaml").unwrap().compiled);
    let inv: Inventory = enclave_netfilter::yaml::from_str(&inv_src).unwrap();
    let peers = Arc::new(PeerDirectory::build(c.policy(), &inv.workloads));
    let w = &inv.workloads[1]; // payments-api-0
    let mac = w.mac.unwrap();
    let local = LocalWorkload {
        identity: Arc::new(w.identity()),
        mac,
        ipv4: vec![[10, 244, 2, 10].into()],
        ipv6: vec![],
        dhcp: false,
    };
    let mut e = Enforcer::new(
        c,
        peers,
        local,
        EnforcerConfig {
            flows: 256,
            ..Default::default()
        },
    );

    let gw = MacAddr([2, 0, 0, 0, 0, 0xfe]);
    let to = |dst: [u8; 4], sport: u16, dport: u16| build::Ends {
        src_mac: mac,
        dst_mac: gw,
        src: [10, 244, 2, 10].into(),
        dst: dst.into(),
        sport,
        dport,
    };
    let mut frames: Vec<(Direction, Vec<u8>)> = Vec::new();
    for (i, (dst, port, payload)) in [
        (
            [10, 244, 2, 20],
            5432u16,
            b"\0\0\0\x10\0\x03\0\0user\0x\0\0\0".as_slice(),
        ),
        ([10, 244, 2, 30], 6379, b"*1\r\n$4\r\nPING\r\n".as_slice()),
        ([10, 244, 2, 30], 6379, b"GET / HTTP/1.1\r\n\r\n".as_slice()),
        ([198, 51, 100, 7], 443, b"".as_slice()),
        ([10, 244, 1, 10], 8080, b"".as_slice()),
    ]
    .into_iter()
    .enumerate()
    {
        let out = to(dst, 41000 + i as u16, port);
        let back = build::Ends {
            src_mac: gw,
            dst_mac: mac,
            ..out.reversed()
        };
        frames.push((Direction::Egress, build::tcp(&out, F::SYN, 1, 0, &[])));
        frames.push((
            Direction::Ingress,
            build::tcp(&back, F::SYN | F::ACK, 9, 2, &[]),
        ));
        frames.push((Direction::Egress, build::tcp(&out, F::ACK, 2, 10, &[])));
        frames.push((
            Direction::Egress,
            build::tcp(&out, F::ACK | F::PSH, 2, 10, payload),
        ));
        frames.push((
            Direction::Egress,
            build::tcp(&out, F::ACK | F::PSH, 2 + payload.len() as u32, 10, b"more"),
        ));
        frames.push((
            Direction::Ingress,
            build::tcp(&back, F::ACK, 10, 6 + payload.len() as u32, b"reply"),
        ));
    }
    let mut spoof = to([10, 244, 2, 20], 1, 5432);
    spoof.src = [10, 244, 2, 99].into();
    frames.push((Direction::Egress, build::tcp(&spoof, F::SYN, 1, 0, &[])));
    frames.push((
        Direction::Egress,
        build::ip(
            &to([10, 96, 0, 10], 5, 53),
            17,
            vec![0, 5, 0, 53, 0, 40, 0, 0],
            build::IpOpts {
                id: 7,
                frag: Some((0, true)),
                vlan: None,
            },
        ),
    ));
    frames.push((
        Direction::Egress,
        build::ip(
            &to([10, 96, 0, 10], 5, 53),
            17,
            vec![0; 16],
            build::IpOpts {
                id: 7,
                frag: Some((4, false)),
                vlan: None,
            },
        ),
    ));
    frames.push((Direction::Egress, vec![1, 2, 3]));

    // Warm up once (first-touch effects), then watch a second pass over new flows.
    for (d, f) in &frames {
        e.decide(*d, f, 1);
    }
    ALLOCS.store(0, Ordering::SeqCst);
    WATCH.with(|w| w.set(true));
    let mut decided = 0;
    for round in 0..50u64 {
        for (d, f) in &frames {
            std::hint::black_box(e.decide(*d, f, 1_000_000_000 * (round + 2)));
            decided += 1;
        }
    }
    WATCH.with(|w| w.set(false));
    assert_eq!(
        ALLOCS.load(Ordering::SeqCst),
        0,
        "allocations while deciding {decided} frames"
    );
}
