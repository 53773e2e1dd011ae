//! Guest-written frames through the whole matcher (both directions, a stateful sequence),
//! and the bare parser: nothing may panic, the verdict must agree with the reason, and the
//! fast path (flows already decided skip the rule walk) must decide every frame exactly as
//! the full path does on the same sequence.
#![no_main]

use enclave_netfilter::identity::{Inventory, PeerDirectory};
use enclave_netfilter::matcher::{Direction, Enforcer, EnforcerConfig, LocalWorkload};
use enclave_netfilter::packet::{Frame, MacAddr};
use enclave_netfilter::policy;
use libfuzzer_sys::fuzz_target;
use enclave_netfilter::policy::CompiledPolicy;
use std::sync::{Arc, OnceLock};

static SHARED: OnceLock<(Arc<CompiledPolicy>, Arc<PeerDirectory>, Inventory)> = OnceLock::new();

const POLICY: &str = include_str!("../../../configs/policies/pci-cde.yaml");
const INVENTORY: &str = include_str!("../../../configs/inventory/pci-demo.yaml");

fn enforcer(fast_path: bool) -> Enforcer {
    // The policy is compiled once; each input gets fresh flow state.
    let (c, peers, inv) = SHARED.get_or_init(|| {
        let c = Arc::new(policy::load_str(POLICY, "pci-cde.yaml").expect("template loads").compiled);
        let inv: Inventory = enclave_netfilter::yaml::from_str(INVENTORY).expect("inventory");
        let peers = Arc::new(PeerDirectory::build(c.policy(), &inv.workloads));
        (c, peers, inv)
    });
    let (c, peers) = (c.clone(), peers.clone());
    let w = &inv.workloads[1];
    let local = LocalWorkload {
        identity: Arc::new(w.identity()),
        mac: w.mac.unwrap_or(MacAddr([2, 0, 0, 0, 0, 1])),
        ipv4: vec![[10, 244, 2, 10].into()],
        ipv6: vec!["fd00::10".parse().expect("v6")],
        dhcp: true,
    };
    let mut cfg = EnforcerConfig::default();
    cfg.flows = 64;
    cfg.fragments = 16;
    cfg.fast_path = fast_path;
    Enforcer::new(c, peers, local, cfg)
}

fuzz_target!(|data: &[u8]| {
    let _ = Frame::parse(data);
    // The input is a sequence of frames: [dir|len_hi, len_lo, bytes...]*, so conntrack and
    // L7 state are exercised across frames.
    let mut e = enforcer(true);
    let mut full = enforcer(false);
    let mut rest = data;
    let mut now = 1u64;
    while rest.len() >= 2 {
        let dir = if rest[0] & 0x80 == 0 { Direction::Egress } else { Direction::Ingress };
        let len = (usize::from(rest[0] & 0x07) << 8 | usize::from(rest[1])).min(rest.len() - 2);
        let frame = &rest[2..2 + len];
        now += u64::from(rest[0] & 0x78) * 1_000_000_000;
        let d = e.decide(dir, frame, now);
        assert_eq!(d.verdict, d.reason.verdict());
        let f = full.decide(dir, frame, now);
        assert_eq!(
            (d.verdict, d.reason, d.event.is_some()),
            (f.verdict, f.reason, f.event.is_some()),
            "fast path and full path disagree on a frame"
        );
        rest = &rest[2 + len..];
    }
});
