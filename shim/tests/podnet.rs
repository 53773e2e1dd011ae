//! The pod network into the guest without containerd: a "pod" network namespace with a
//! veth (as CNI leaves it), the shim's tap and tc redirects, enclave-netd in front of the
//! tap, the guest NIC through QEMU's vhost-user-net, and the agent configuring the pod IP.
//! A peer namespace then reaches the guest on the pod IP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use enclave_agent_protocol::messages::*;
use enclave_shim::podnet;
use enclave_shim::vm::{GuestVm, NetBackend, NetOptions, VmOptions};
use enclave_tests::skip_or_fail;

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Ns(Vec<String>);
impl Drop for Ns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

#[test]
fn the_guest_answers_on_the_pod_ip() {
    let test = "the_guest_answers_on_the_pod_ip";
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return skip_or_fail(test, "needs root (network namespaces, taps)");
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
    let id = std::process::id();
    let (pod, peer) = (format!("enc-pod-{id}"), format!("enc-peer-{id}"));
    let _ns = Ns(vec![pod.clone(), peer.clone()]);
    for n in [&pod, &peer] {
        let _ = Command::new("ip").args(["netns", "del", n]).output();
        sh(&["ip", "netns", "add", n]);
    }
    sh(&[
        "ip",
        "link",
        "add",
        "veth-pod",
        "netns",
        &pod,
        "type",
        "veth",
        "peer",
        "name",
        "veth-peer",
        "netns",
        &peer,
    ]);
    sh(&["ip", "-n", &pod, "link", "set", "veth-pod", "name", "eth0"]);
    sh(&[
        "ip",
        "-n",
        &pod,
        "addr",
        "add",
        "10.99.0.2/24",
        "dev",
        "eth0",
    ]);
    sh(&["ip", "-n", &pod, "link", "set", "eth0", "up"]);
    sh(&[
        "ip",
        "-n",
        &peer,
        "addr",
        "add",
        "10.99.0.1/24",
        "dev",
        "veth-peer",
    ]);
    sh(&["ip", "-n", &peer, "link", "set", "veth-peer", "up"]);

    let nspath = PathBuf::from(format!("/var/run/netns/{pod}"));
    let net = podnet::discover(&nspath).unwrap();
    assert_eq!(net.addresses, vec!["10.99.0.2/24".to_string()]);
    podnet::plumb(&net).unwrap();
    let _ = netd;
    let tap = enclave_netd::tap::open_in(&nspath, podnet::TAP).unwrap();
    let opts = VmOptions {
        net: Some(NetOptions {
            backend: NetBackend::Tap(std::sync::Arc::new(tap)),
            mac: net.mac.clone(),
        }),
        ..Default::default()
    };
    let vm = GuestVm::boot(&tools, &opts).unwrap();
    let agent = vm.connect(Duration::from_secs(120)).unwrap();
    agent
        .call::<ConfigureNetwork>(&ConfigureNetworkRequest {
            interfaces: vec![Interface {
                mac: net.mac.clone(),
                name: "eth0".into(),
                mtu: net.mtu,
                addresses: net.addresses.clone(),
            }],
            routes: vec![],
            dns: None,
        })
        .unwrap();
    // ARP and ICMP through tc, the tap, enclave-netd and the guest's virtio-net.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &peer,
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
        "ping the pod IP:\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        diag(&pod),
        vm.logs()
    );
}

fn diag(pod: &str) -> String {
    let mut s = String::new();
    for cmd in [
        "ip -s link",
        "tc -s filter show dev eth0 ingress",
        "tc -s filter show dev tap0 ingress",
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
