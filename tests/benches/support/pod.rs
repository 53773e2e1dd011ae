//! A pod as the shim plumbs it, for the pod benchmarks: a pod and a peer network namespace
//! (CNI's veth), the pod's tap beside it, a guest under QEMU on the shipped image with its
//! NIC on the pod address, and either enclave-netd with a policy (the peer registered as a
//! `web` pod of namespace `storefront`; the pod is `payments/api`) or QEMU's own tap.
#![allow(dead_code)]

use enclave_agent_protocol::messages::*;
use enclave_agent_protocol::Client;
use enclave_netfilter::node::{self, RegistryEntry};
use enclave_shim::config::Config;
use enclave_shim::podnet;
use enclave_shim::vm::{GuestVm, NetBackend, NetOptions, Tools, VmOptions};
use enclave_tests::netns::{mac_of, PodPair, PEER_IP};
use enclave_tests::{busybox_rootfs, spec};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What a pod bench needs: root, the tools and guest image, a release enclave-netd; or it
/// says `SKIPPED <bench>: why` and gives `None`.
pub fn ready(bench: &str) -> Option<Tools> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        println!("SKIPPED {bench}: needs root (network namespaces, taps, nftables)");
        return None;
    }
    let tools = match enclave_tests::tools() {
        Ok(t) => t,
        Err(e) => {
            println!("SKIPPED {bench}: {e}");
            return None;
        }
    };
    let netd = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/enclave-netd");
    if !netd.exists() {
        println!(
            "SKIPPED {bench}: {} not built (cargo build --release -p enclave-netd)",
            netd.display()
        );
        return None;
    }
    Some(tools)
}

/// What carries the pod's frames.
pub enum Datapath<'a> {
    /// enclave-netd (release build) with this policy, and the pod's nftables table; the
    /// pod is annotated into `zone`.
    Netd {
        /// The policy's YAML.
        policy: &'a str,
        /// The pod's `enclave.io/zone`.
        zone: &'a str,
    },
    /// QEMU's virtio-net on the tap, no policy; `offloads` as QEMU offers them or none.
    Tap { offloads: bool },
}

/// A running pod. Dropped: the guest stops, the namespaces and files go.
pub struct BenchPod {
    /// The agent.
    pub client: Client,
    /// The guest.
    pub vm: GuestVm,
    /// The two namespaces.
    pub ns: PodPair,
    /// Last: the files go after the guest.
    _dir: RemoveOnDrop,
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl BenchPod {
    /// Boots the pod; `tag` keeps names apart.
    pub fn start(tag: &str, datapath: Datapath<'_>, tools: &Tools) -> BenchPod {
        let id = std::process::id();
        let ns = PodPair::new(&format!("b{tag}"));
        let (peer, nspath) = (ns.peer.clone(), ns.pod_path());
        let net = podnet::discover(&nspath).unwrap();
        podnet::plumb(&net).unwrap();
        let dir = std::env::temp_dir().join(format!("enclave-podbench-{tag}-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let backend = match datapath {
            Datapath::Netd { policy, zone } => {
                let mut cfg = Config::default();
                cfg.network.policy_dir = dir.join("policies");
                cfg.network.registry = dir.join("registry");
                cfg.network.audit_log = dir.join("audit.log");
                std::fs::create_dir_all(&cfg.network.policy_dir).unwrap();
                std::fs::write(cfg.network.policy_dir.join("policy.yaml"), policy).unwrap();
                node::register(
                    &cfg.network.registry,
                    &RegistryEntry {
                        name: "web".into(),
                        namespace: "storefront".into(),
                        labels: Default::default(),
                        annotations: [("enclave.io/zone".to_string(), "web".to_string())].into(),
                        ips: vec![PEER_IP.parse().unwrap()],
                        mac: mac_of(&peer, "veth-peer"),
                        netns: None,
                        control: None,
                    },
                )
                .unwrap();
                let s = serde_json::json!({"annotations": {
                    "io.kubernetes.cri.sandbox-name": "api", "io.kubernetes.cri.sandbox-namespace": "payments",
                    "enclave.io/zone": zone}});
                let entry =
                    enclave_shim::enforce::registry_entry(&s, &net, &dir.join("vm/netd.ctl"));
                let args = enclave_shim::enforce::prepare(&cfg, &entry, &dir.join("vm")).unwrap();
                NetBackend::Netd {
                    netd: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                        .join("../target/release/enclave-netd"),
                    netns: nspath.clone(),
                    tap: podnet::TAP.into(),
                    args,
                }
            }
            Datapath::Tap { offloads } => NetBackend::UnfilteredTapForBenchmark {
                tap: Arc::new(enclave_netd::tap::open_in(&nspath, podnet::TAP).unwrap()),
                offloads,
            },
        };
        let opts = VmOptions {
            net: Some(NetOptions {
                backend,
                mac: net.mac.clone(),
            }),
            dir: Some(dir.join("vm")),
            ..Default::default()
        };
        let vm = GuestVm::boot(tools, &opts).unwrap();
        let client = vm.connect(Duration::from_secs(120)).unwrap();
        client
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
        BenchPod {
            client,
            vm,
            ns,
            _dir: RemoveOnDrop(dir),
        }
    }

    /// Starts a container `id` from a busybox root, running `script` in `sh -c`; `extra`
    /// files (destination in the root, source on the host) are copied in first.
    pub fn container(&self, id: &str, script: &str, extra: &[(&str, &std::path::Path)]) {
        let root = self.vm.shared_dir().join(id).join("rootfs");
        busybox_rootfs(&root).unwrap();
        for (dest, src) in extra {
            std::fs::copy(src, root.join(dest.trim_start_matches('/'))).unwrap();
        }
        self.client
            .call::<CreateContainer>(&CreateContainerRequest {
                container_id: id.into(),
                oci_spec: serde_json::to_vec(&spec(&["sh", "-c", script], false)).unwrap(),
                rootfs: format!("{id}/rootfs"),
            })
            .unwrap();
        self.client
            .call::<StartContainer>(&ContainerRequest {
                container_id: id.into(),
            })
            .unwrap();
    }
}
