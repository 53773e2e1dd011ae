//! The pod network without containerd: a "pod" network namespace with a veth (as CNI
//! leaves it) to a peer namespace, the shim's plumbing (tap, bridge), its enforcement (the
//! pod registered, the nftables table applied, enclave-netd's arguments), and then:
//! - the guest through QEMU's vhost-user-net and enclave-netd answers on the pod IP;
//! - frames injected straight onto the tap (bypassing netd) meet the nftables wall: the
//!   allowed one reaches the peer, the denied one is dropped and counted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use enclave_agent_protocol::messages::*;
use enclave_shim::config::Config;
use enclave_shim::podnet::{self, PodNet};
use enclave_shim::vm::{GuestVm, NetBackend, NetOptions, VmOptions};
use enclave_tests::netns::{mac_of, PodPair};
use enclave_tests::skip_or_fail;

const POLICY: &str = r#"
apiVersion: enclave.io/v1alpha1
kind: ZonePolicy
metadata: {name: podnet-test, version: "1"}
spec:
  zones:
    - name: app
      selector: {namespaces: [podnet]}
    - name: peer
      cidrs: [10.99.0.1/32]
  rules:
    - {name: peer-pings-app, from: peer, to: app, protocol: icmp}
    - {name: app-to-peer-9000, from: app, to: peer, protocol: udp, ports: [9000]}
"#;

/// A pod namespace (`eth0` 10.99.0.2/24) and a peer namespace (`veth-peer` 10.99.0.1/24),
/// plumbed and enforced as the shim does it, with the node's directories under `dir`.
struct Pod {
    ns: PodPair,
    net: PodNet,
    cfg: Config,
    netd_args: Vec<std::ffi::OsString>,
}

fn pod(tag: &str, dir: &Path) -> Pod {
    let ns = PodPair::new(tag);
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("policies/policy.yaml"), POLICY).unwrap();
    let mut cfg = Config::default();
    cfg.network.policy_dir = dir.join("policies");
    cfg.network.registry = dir.join("registry");
    cfg.network.audit_log = dir.join("audit.log");

    let net = podnet::discover(&ns.pod_path()).unwrap();
    assert_eq!(net.addresses, vec!["10.99.0.2/24".to_string()]);
    podnet::plumb(&net).unwrap();
    let spec = serde_json::json!({"annotations": {
        "io.kubernetes.cri.sandbox-name": tag, "io.kubernetes.cri.sandbox-namespace": "podnet"}});
    let entry = enclave_shim::enforce::registry_entry(&spec, &net, &dir.join("vm/netd.ctl"));
    let netd_args = enclave_shim::enforce::prepare(&cfg, &entry, &dir.join("vm")).unwrap();
    Pod {
        ns,
        net,
        cfg,
        netd_args,
    }
}

fn root(test: &str) -> bool {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        skip_or_fail(test, "needs root (network namespaces, taps, nftables)");
        return false;
    }
    true
}

#[test]
fn the_guest_answers_on_the_pod_ip_through_netd() {
    let test = "the_guest_answers_on_the_pod_ip_through_netd";
    if !root(test) {
        return;
    }
    let tools = match enclave_tests::tools() {
        Ok(t) => t,
        Err(e) => return skip_or_fail(test, &e),
    };
    let netd = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-enclave-v2"))
        .with_file_name("enclave-netd");
    if !netd.exists() {
        return skip_or_fail(test, "enclave-netd not built (cargo build -p enclave-netd)");
    }
    let dir = std::env::temp_dir().join(format!("enclave-podnet-{}", std::process::id()));
    let p = pod("pn", &dir);
    let opts = VmOptions {
        net: Some(NetOptions {
            backend: NetBackend::Netd {
                netd,
                netns: p.net.netns.clone(),
                tap: podnet::TAP.into(),
                args: p.netd_args.clone(),
            },
            mac: p.net.mac.clone(),
        }),
        dir: Some(dir.join("vm")),
        ..Default::default()
    };
    let vm = GuestVm::boot(&tools, &opts).unwrap();
    let agent = vm.connect(Duration::from_secs(120)).unwrap();
    agent
        .call::<ConfigureNetwork>(&ConfigureNetworkRequest {
            interfaces: vec![Interface {
                mac: p.net.mac.clone(),
                name: "eth0".into(),
                mtu: p.net.mtu,
                addresses: p.net.addresses.clone(),
            }],
            routes: vec![],
            dns: None,
        })
        .unwrap();
    // ARP and ICMP through the bridge, the tap, enclave-netd (policy: peer may ping the
    // pod) and the guest's virtio-net.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &p.ns.peer,
            "ping",
            "-c",
            "3",
            "-W",
            "5",
            "10.99.0.2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ping the pod IP:\n{}\n{}\n{}\n{:?}",
        String::from_utf8_lossy(&out.stdout),
        diag(&p.ns.pod) + &diag(&p.ns.peer),
        vm.logs(),
        enclave_netfilter::node::control_request(&dir.join("vm/netd.ctl"), "metrics")
    );
    // netd allowed the flow and wrote it down, in the node's audit log, with the pod's name.
    let log = std::fs::read_to_string(&p.cfg.network.audit_log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("peer-pings-app") && l.contains("\"pod\":\"pn\"")),
        "no audit record of the allowed ping:\n{log}"
    );
    let m = enclave_netfilter::node::control_request(&dir.join("vm/netd.ctl"), "metrics").unwrap();
    assert!(
        m.contains("enclave_netd_rule_flows_total{pod=\"pn\",namespace=\"podnet\",zone=\"app\",rule=\"peer-pings-app\",action=\"allow\"} 1"),
        "{m}"
    );
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
}

fn mac_bytes(s: &str) -> [u8; 6] {
    let b: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).unwrap())
        .collect();
    b.try_into().unwrap()
}

/// An Ethernet + IPv4 + UDP frame from the pod to the peer, with the virtio-net header the
/// tap expects in front.
fn udp_frame(src_mac: [u8; 6], dst_mac: [u8; 6], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 99, 0, 2, 10, 99, 0, 1,
    ];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
    f.extend_from_slice(payload);
    f
}

#[test]
fn the_nftables_wall_drops_a_denied_frame_injected_on_the_tap() {
    let test = "the_nftables_wall_drops_a_denied_frame_injected_on_the_tap";
    if !root(test) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("enclave-nftwall-{}", std::process::id()));
    let p = pod("nw", &dir);
    // The peer listens on the allowed port and on a denied one.
    let peer_ns = p.ns.peer_path();
    let listener = std::thread::spawn(move || {
        enclave_netd::tap::enter_netns(&peer_ns).unwrap();
        let ok = UdpSocket::bind("10.99.0.1:9000").unwrap();
        let denied = UdpSocket::bind("10.99.0.1:9001").unwrap();
        for s in [&ok, &denied] {
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        }
        let mut buf = [0u8; 64];
        let got_ok = ok.recv(&mut buf).ok().map(|n| buf[..n].to_vec());
        let got_denied = denied.recv(&mut buf).ok().map(|n| buf[..n].to_vec());
        (got_ok, got_denied)
    });
    std::thread::sleep(Duration::from_millis(200));
    // No netd: the test holds the tap, as something that bypassed netd would.
    let mut tap = enclave_netd::tap::open_in(&p.net.netns, podnet::TAP).unwrap();
    let src = mac_bytes(&p.net.mac);
    let dst = mac_bytes(&mac_of(&p.ns.peer, "veth-peer"));
    tap.write_all(&udp_frame(src, dst, 9000, b"allowed"))
        .unwrap();
    tap.write_all(&udp_frame(src, dst, 9001, b"denied"))
        .unwrap();
    let (ok, denied) = listener.join().unwrap();
    let table = Command::new("ip")
        .args(["netns", "exec", &p.ns.pod, "nft", "list", "ruleset"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert_eq!(
        ok.as_deref(),
        Some(&b"allowed"[..]),
        "allowed frame\n{table}"
    );
    assert_eq!(denied, None, "the denied frame reached the peer\n{table}");
    // The kernel counted the drop on the default-deny rule of the pod's outbound chain.
    let chain = table
        .split("chain from_workload")
        .nth(1)
        .expect("from_workload chain");
    let deny = chain
        .lines()
        .find(|l| l.contains("drop") && l.contains("default deny"))
        .expect("default deny rule");
    assert!(
        deny.contains("counter packets 1 "),
        "default deny counter: {deny}\n{table}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn diag(pod: &str) -> String {
    let mut s = String::new();
    for cmd in [
        "ip -s link",
        "ip neigh",
        "bridge fdb show",
        "nft list ruleset",
    ] {
        let out = Command::new("ip")
            .args(["netns", "exec", pod])
            .args(cmd.split(' '))
            .output()
            .unwrap();
        s += &format!("--- {cmd}\n{}\n", String::from_utf8_lossy(&out.stdout));
    }
    s
}
