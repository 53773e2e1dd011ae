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
    - {name: app-to-peer-8080, from: app, to: peer, protocol: tcp, ports: [8080]}
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

impl Pod {
    /// The pod's NIC served by `netd` on the shim's tap, with the shim's arguments.
    fn netd_net(&self, netd: PathBuf) -> NetOptions {
        NetOptions {
            backend: NetBackend::Netd {
                netd,
                netns: self.net.netns.clone(),
                tap: podnet::TAP.into(),
                args: self.netd_args.clone(),
            },
            mac: self.net.mac.clone(),
        }
    }

    /// The peer namespace pings the pod IP `count` times, waiting up to `wait` s for each.
    fn peer_pings_pod(&self, count: u32, wait: u32) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns.peer, "ping", "-c"])
            .arg(count.to_string())
            .arg("-W")
            .arg(wait.to_string())
            .arg("10.99.0.2")
            .output()
            .unwrap()
    }

    /// Gives the guest's eth0 the pod's MAC, MTU and addresses.
    fn configure_guest(&self, agent: &enclave_agent_protocol::Client) {
        agent
            .call::<ConfigureNetwork>(&ConfigureNetworkRequest {
                interfaces: vec![Interface {
                    mac: self.net.mac.clone(),
                    name: "eth0".into(),
                    mtu: self.net.mtu,
                    addresses: self.net.addresses.clone(),
                }],
                routes: vec![],
                dns: None,
            })
            .unwrap();
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
        net: Some(p.netd_net(netd)),
        dir: Some(dir.join("vm")),
        ..Default::default()
    };
    let vm = GuestVm::boot(&tools, &opts).unwrap();
    let agent = vm.connect(Duration::from_secs(120)).unwrap();
    p.configure_guest(&agent);
    // ARP and ICMP through the bridge, the tap, enclave-netd (policy: peer may ping the
    // pod) and the guest's virtio-net.
    let out = p.peer_pings_pod(3, 5);
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

/// A pod's guest on our own VMM, exactly as the shim runs it there: enclave-vmm through
/// enclave-jailer (nobody, its own namespaces, seccomp on every thread), the shipped image
/// (Debian's kernel, devices through ACPI), a container from the virtio-fs root filesystem
/// whose output comes back, and the guest NIC through enclave-netd (vhost-user) to the tap
/// with the zone policy: an allowed flow passes, a denied one is dropped, both recorded.
/// On a host whose KVM cannot run a Linux kernel (PVM) it runs inside the nested KVM box.
#[test]
fn a_pods_guest_on_enclave_vmm_runs_a_container_and_netd_decides_its_flows() {
    let test = "a_pods_guest_on_enclave_vmm_runs_a_container_and_netd_decides_its_flows";
    if !enclave_tests::nestbox::on_hardware_kvm_or_in_box(test, Duration::from_secs(600)) {
        return;
    }
    if !root(test) {
        return;
    }
    let tools = match enclave_tests::tools() {
        Ok(t) => t,
        Err(e) => return skip_or_fail(test, &e),
    };
    let bin = |name: &str| {
        PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-enclave-v2")).with_file_name(name)
    };
    for b in ["enclave-netd", "enclave-vmm", "enclave-jailer"] {
        if !bin(b).exists() {
            return skip_or_fail(test, &format!("{b} not built (cargo build --workspace)"));
        }
    }
    let started = std::time::Instant::now();
    let dir = std::env::temp_dir().join(format!("enclave-podvmm-{}", std::process::id()));
    let p = pod("ev", &dir);
    let opts = VmOptions {
        net: Some(p.netd_net(bin("enclave-netd"))),
        backend: enclave_shim::vm::Backend::EnclaveVmm {
            binary: bin("enclave-vmm"),
        },
        dir: Some(dir.join("vm")),
        ..Default::default()
    };
    let vm = GuestVm::boot(&tools, &opts).unwrap();
    let agent = vm.connect(Duration::from_secs(120)).unwrap();
    let ready = started.elapsed();

    // Every process the pod runs on the node, read back from /proc.
    let marker = dir.join("vm").display().to_string();
    let mut expect = enclave_tests::confinement::ENCLAVE_VMM_POD.to_vec();
    expect.push(enclave_tests::confinement::NETD);
    let (seen, wrong) = enclave_tests::confinement::check(&marker, &expect);
    for l in &seen {
        println!("BOX-REPORT {l}");
    }
    assert!(wrong.is_empty(), "{wrong:#?}\n{seen:#?}\n{}", vm.logs());

    // The pod network through netd.
    p.configure_guest(&agent);
    // Inbound, allowed (peer-pings-app): the peer pings the pod IP.
    let ping = p.peer_pings_pod(2, 10);
    assert!(
        ping.status.success(),
        "ping the pod IP:\n{}\n{}",
        String::from_utf8_lossy(&ping.stdout),
        vm.logs()
    );
    // The peer listens on the allowed port (app-to-peer-8080) and on one no rule allows.
    let peer_ns = p.ns.peer_path();
    let listener = std::thread::spawn(move || {
        use std::io::Read;
        enclave_netd::tap::enter_netns(&peer_ns).unwrap();
        let ok = std::net::TcpListener::bind("10.99.0.1:8080").unwrap();
        let denied = std::net::TcpListener::bind("10.99.0.1:8081").unwrap();
        let accept = |l: &std::net::TcpListener, secs: u64| {
            l.set_nonblocking(true).unwrap();
            let end = std::time::Instant::now() + Duration::from_secs(secs);
            while std::time::Instant::now() < end {
                if let Ok((mut c, _)) = l.accept() {
                    c.set_nonblocking(false).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut got = Vec::new();
                    let _ = c.read_to_end(&mut got);
                    return Some(got);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        };
        let got_ok = accept(&ok, 30);
        let got_denied = accept(&denied, 5);
        (got_ok, got_denied)
    });
    std::thread::sleep(Duration::from_millis(300));

    // A container from the shared root filesystem connects to both and prints a line,
    // which comes back.
    let rootfs = vm.shared_dir().join("c1/rootfs");
    enclave_tests::busybox_rootfs(&rootfs).unwrap();
    let script = "echo allowed | nc -w 3 10.99.0.1 8080; echo denied | nc -w 3 10.99.0.1 8081; \
                  echo container says $(cat /proc/sys/kernel/ostype) $((6*7))";
    agent
        .call::<CreateContainer>(&CreateContainerRequest {
            container_id: "c1".into(),
            oci_spec: serde_json::to_vec(&enclave_tests::spec(&["sh", "-c", script], false))
                .unwrap(),
            rootfs: "c1/rootfs".into(),
        })
        .unwrap_or_else(|e| panic!("create the container: {e}\n{}", vm.logs()));
    agent
        .call::<StartContainer>(&ContainerRequest {
            container_id: "c1".into(),
        })
        .unwrap();
    let out = enclave_tests::read_to_end(&agent, "c1", "", false).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out),
        "container says Linux 42\n",
        "{}",
        vm.logs()
    );
    let (ok, denied) = listener.join().unwrap();
    assert_eq!(
        ok.as_deref(),
        Some(&b"allowed\n"[..]),
        "the allowed connection\n{}\n{}\n{}",
        std::fs::read_to_string(&p.cfg.network.audit_log).unwrap_or_default(),
        diag(&p.ns.pod) + &diag(&p.ns.peer),
        vm.logs()
    );
    assert_eq!(denied, None, "the denied connection reached the peer");

    // netd decided both and wrote them down.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (allowed, denied) = loop {
        let log = std::fs::read_to_string(&p.cfg.network.audit_log).unwrap_or_default();
        let recs: Vec<serde_json::Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let flow = |port: u16, action: &str| {
            recs.iter()
                .find(|r| r["action"] == action && r["dst_endpoint"]["port"] == port)
                .cloned()
        };
        if let (Some(a), Some(d)) = (flow(8080, "Allowed"), flow(8081, "Denied")) {
            break (a, d);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "audit records missing (allowed tcp/8080, denied tcp/8081):\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        allowed["firewall_rule"]["name"], "app-to-peer-8080",
        "{allowed}"
    );
    for r in [&allowed, &denied] {
        assert_eq!(r["src_endpoint"]["ip"], "10.99.0.2", "{r}");
        assert_eq!(r["dst_endpoint"]["ip"], "10.99.0.1", "{r}");
    }
    let m = enclave_netfilter::node::control_request(&dir.join("vm/netd.ctl"), "metrics").unwrap();
    assert!(
        m.contains("rule=\"app-to-peer-8080\",action=\"allow\"}"),
        "{m}"
    );
    println!(
        "BOX-REPORT pod guest on jailed enclave-vmm: agent ready {:.2} s after the test started; container, allowed ping, allowed tcp/8080 and denied tcp/8081 checked in {:.2} s",
        ready.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `auto` picks enclave-vmm where /dev/kvm has hardware virtualization (in the nested box)
/// and QEMU where it does not (this PVM host): the same configuration, both answers.
#[test]
fn auto_picks_enclave_vmm_on_hardware_kvm_and_qemu_elsewhere() {
    let test = "auto_picks_enclave_vmm_on_hardware_kvm_and_qemu_elsewhere";
    let vmm = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-enclave-v2"))
        .with_file_name("enclave-vmm");
    if !vmm.exists() {
        return skip_or_fail(test, "enclave-vmm not built (cargo build --workspace)");
    }
    let mut cfg = Config::default();
    cfg.vm.backend = "auto".into();
    cfg.paths.enclave_vmm = vmm.clone();
    let (accel, why) = enclave_tests::accel();
    if accel == "kvm" {
        assert_eq!(
            cfg.backend(),
            enclave_shim::vm::Backend::EnclaveVmm { binary: vmm },
            "{why}"
        );
        println!("BOX-REPORT auto chose enclave-vmm: {why}");
        return;
    }
    assert!(
        matches!(cfg.backend(), enclave_shim::vm::Backend::Qemu { .. }),
        "{why}: {:?}",
        cfg.backend()
    );
    println!("auto chose QEMU here: {why}");
    // The same configuration on hardware-virtualization KVM.
    enclave_tests::nestbox::run_test_in_box(test, Duration::from_secs(120));
}
