//! Pods through CRI, as the kubelet drives a RuntimeClass: a private containerd with the CRI
//! plugin (in a network namespace of its own, so CNI's bridge stays off the host network),
//! the runtime handler `enclave`, and a Rust CRI client (k8s-cri): RunPodSandbox,
//! CreateContainer and StartContainer for two containers in one pod (one VM, proved from
//! inside), ExecSync, ContainerStatus with an exit code, the log file, StopPodSandbox,
//! RemovePodSandbox, and nothing left behind.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use enclave_tests::containerd::leftovers;
use enclave_tests::cri::{
    container_config, cri_client, exec_sync, pod_ip, run_container, run_sandbox, sandbox_config,
    CriNode,
};
use enclave_tests::skip_or_fail;
use k8s_cri::v1::*;

fn shim_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-enclave-v2"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[tokio::test(flavor = "current_thread")]
async fn a_pod_through_cri_runs_in_one_microvm() {
    pod_through_cri("a_pod_through_cri_runs_in_one_microvm").await;
}

/// The same pod flow with the `auto` backend where KVM has hardware virtualization: the pod
/// runs on enclave-vmm (jailed). On this PVM host it runs inside the nested KVM box, which
/// takes about 50 s and where the box's own kernel (KVM under TCG's emulated SVM) crashed
/// in about one run in three: so it is opt-in here (`cargo test -p enclave-shim --test cri
/// -- --ignored a_pod_through_cri_runs_on_enclave_vmm`), and the ctr test on enclave-vmm is
/// the one CI runs in the box.
#[test]
#[ignore = "opt-in: the CRI pod flow inside the nested KVM box (about 50 s; the box crashes under TCG in about one run in three)"]
fn a_pod_through_cri_runs_on_enclave_vmm() {
    let test = "a_pod_through_cri_runs_on_enclave_vmm";
    if !enclave_tests::nestbox::on_hardware_kvm_or_in_box(test, Duration::from_secs(900)) {
        return;
    }
    let t = Instant::now();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(pod_through_cri(test));
    println!(
        "BOX-REPORT CRI pod flow on enclave-vmm: {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

async fn pod_through_cri(test: &str) {
    if let Err(e) = enclave_tests::cri::prerequisites(&[("gcc", "/usr/bin/gcc")]) {
        return skip_or_fail(test, &e);
    }
    // A run that failed may have left its pod running (shims outlive containerd).
    enclave_tests::cri::clean_node();
    let dir = std::env::temp_dir().join(format!("enclave-cri-{}", std::process::id()));
    let node = CriNode::start(
        &dir,
        &shim_dir(),
        &format!("enclave-cri-{}", std::process::id()),
    );
    let (ctrd, ns) = (&node.containerd, &node.netns);
    let mut cri = cri_client(&ctrd.sock()).await;

    // RunPodSandbox with the enclave handler, as the kubelet does for the RuntimeClass.
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let sandbox_config = sandbox_config("payments-api", "payments", "cde", &logs);
    let t = Instant::now();
    let sandbox = run_sandbox(&mut cri, ctrd, &sandbox_config).await;
    eprintln!("RunPodSandbox (enclave, TCG) took {:?}", t.elapsed());

    let mut ids = Vec::new();
    for (name, cmd) in [
        (
            "api",
            vec!["sh", "-c", "echo hello-from-api; exec sleep 1000"],
        ),
        ("sidecar", vec!["sleep", "1000"]),
        ("quitter", vec!["sh", "-c", "exit 3"]),
    ] {
        let config = container_config(name, &cmd, &format!("{name}.log"));
        let c = run_container(&mut cri, &sandbox, &sandbox_config, config).await;
        ids.push(c);
    }

    // One VM for the pod: the guest's boot id is the same in both containers, and the
    // kernel is the guest's.
    let exec = |id: String, cmd: Vec<&'static str>| {
        let mut cri = cri.clone();
        async move {
            let (code, out, err) = exec_sync(&mut cri, &id, &cmd).await;
            assert_eq!(code, 0, "{err}");
            out
        }
    };
    let a = exec(
        ids[0].clone(),
        vec!["cat", "/proc/sys/kernel/random/boot_id"],
    )
    .await;
    let b = exec(
        ids[1].clone(),
        vec!["cat", "/proc/sys/kernel/random/boot_id"],
    )
    .await;
    assert_eq!(a.len(), 36);
    assert_eq!(a, b, "the pod's containers share one VM");
    let kernel = exec(ids[0].clone(), vec!["uname", "-r"]).await;
    // CRI's per-pod files (hostname, hosts, resolv.conf) are carried into the guest.
    assert_eq!(
        exec(ids[0].clone(), vec!["cat", "/etc/hostname"]).await,
        "payments-api"
    );
    assert!(!exec(ids[1].clone(), vec!["cat", "/etc/hosts"])
        .await
        .is_empty());
    enclave_tests::assert_guest_kernel(&kernel);
    // Another kernel than the node's (in the nested box both may be the same release).
    let node_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_ne!(
        a.trim(),
        node_boot.trim(),
        "the container runs on the guest's kernel"
    );
    let vms: Vec<String> = enclave_tests::procfs::processes()
        .into_iter()
        .map(|(_, c)| c)
        // QEMU names the pod's directory; a jailed enclave-vmm sees only its jail, so its
        // enclave-jailer stands for it.
        .filter(|c| {
            c.contains("/run/enclave/k8s.io/")
                && (c.contains("qemu-system") || c.contains("enclave-jailer"))
        })
        .collect();
    assert_eq!(vms.len(), 1, "one VM for the pod: {vms:?}");
    let backend = if vms[0].contains("qemu-system") {
        "QEMU"
    } else {
        "enclave-vmm"
    };
    eprintln!("{test}: the pod's VM is {backend}");
    if enclave_tests::nestbox::inside() {
        assert_eq!(
            backend, "enclave-vmm",
            "auto picks enclave-vmm on hardware KVM"
        );
    }

    // The pod answers on its pod IP, from the node's side of the pod network.
    let ip = pod_ip(&mut cri, &sandbox).await;
    assert!(ip.starts_with("10.88.77."), "pod IP {ip:?}");
    // ARP and ICMP from the node's side of the CNI bridge reach the guest's NIC.
    let ping = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ping", "-c", "3", "-W", "5", &ip])
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&ping.stdout).to_string();
    let got = if ping.status.success() {
        format!("pod-says-hi: {got}")
    } else {
        got
    };
    if !got.contains("pod-says-hi") {
        let vm = PathBuf::from(format!("/run/enclave/k8s.io/{sandbox}/vm"));
        let mut diag = String::new();
        for f in ["console.log", "netd.log"] {
            diag += &format!(
                "--- {f}\n{}\n",
                std::fs::read_to_string(vm.join(f)).unwrap_or_default()
            );
        }
        // The pod's netns file is mounted in containerd's mount namespace (ip netns exec
        // gave it one of its own): look from there.
        let cpid = ctrd.pid();
        let pod_ns =
            std::fs::read_dir(dir.join("containerd/state/io.containerd.grpc.v1.cri/netns"))
                .ok()
                .and_then(|mut d| d.next())
                .and_then(|e| e.ok())
                .map(|e| e.path());
        if let Some(p) = pod_ns {
            for cmd in [
                "ip -s link",
                "ip addr",
                "tc -s filter show dev eth0 ingress",
                "tc -s filter show dev tap0 ingress",
            ] {
                let out = Command::new("nsenter")
                    .args([
                        "-t",
                        &cpid.to_string(),
                        "-m",
                        "nsenter",
                        &format!("--net={}", p.display()),
                    ])
                    .args(cmd.split(' '))
                    .output()
                    .unwrap();
                diag += &format!(
                    "--- pod netns: {cmd}\n{}{}\n",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        for cmd in ["ip neigh", "ip -s link show enctest0"] {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns.name])
                .args(cmd.split(' '))
                .output()
                .unwrap();
            diag += &format!(
                "--- node netns: {cmd}\n{}\n",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        diag += &format!(
            "--- api.log\n{}\n",
            std::fs::read_to_string(logs.join("api.log")).unwrap_or_default()
        );
        for cmd in [vec!["ip", "route"], vec!["ps"], vec!["ip", "addr"]] {
            let (_, out, err) = exec_sync(&mut cri, &ids[0], &cmd).await;
            diag += &format!("--- guest: {}\n{out}\n{err}\n", cmd.join(" "));
        }
        panic!("ping of the pod IP failed: {got}\n{diag}");
    }

    // ContainerStatus carries the exit code; the log file has the output.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = cri
            .container_status(ContainerStatusRequest {
                container_id: ids[2].clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        if st.state == ContainerState::ContainerExited as i32 {
            assert_eq!(st.exit_code, 3);
            break;
        }
        assert!(Instant::now() < deadline, "quitter did not exit: {st:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = std::fs::read_to_string(logs.join("api.log")).unwrap_or_default();
    assert!(
        log.contains("stdout F hello-from-api"),
        "CRI log file: {log:?}"
    );

    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: sandbox.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", ctrd.log_tail()));
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: sandbox.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", ctrd.log_tail()));

    // Nothing left behind (checked): VM processes, shims, state, rootfs mounts.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let left = leftovers("/run/enclave/k8s.io/");
    assert!(left.is_empty(), "left behind: {left:?}");
    let state: Vec<_> = std::fs::read_dir("/run/enclave/k8s.io")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(state.is_empty(), "state left behind: {state:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.lines().any(|l| l.contains("/run/enclave/k8s.io/")),
        "mounts left behind"
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "current_thread")]
async fn a_containerd_restart_keeps_every_container_of_a_pod_reachable() {
    let test = "a_containerd_restart_keeps_every_container_of_a_pod_reachable";
    if let Err(e) = enclave_tests::cri::prerequisites(&[("gcc", "/usr/bin/gcc")]) {
        return skip_or_fail(test, &e);
    }
    enclave_tests::cri::clean_node();
    let dir = std::env::temp_dir().join(format!("enclave-crirs-{}", std::process::id()));
    let mut node = CriNode::start(
        &dir,
        &shim_dir(),
        &format!("enclave-crirs-{}", std::process::id()),
    );
    let mut cri = cri_client(&node.containerd.sock()).await;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let sandbox_config = sandbox_config("restartee", "payments", "cde", &logs);
    let sandbox = run_sandbox(&mut cri, &node.containerd, &sandbox_config).await;
    let mut ids = Vec::new();
    for name in ["one", "two"] {
        let config = container_config(name, &["sleep", "1000"], &format!("{name}.log"));
        let c = run_container(&mut cri, &sandbox, &sandbox_config, config).await;
        ids.push(c);
    }

    // The operator restarts containerd; the pod's shim and VM go on running.
    node.containerd.restart();
    let mut cri = cri_client(&node.containerd.sock()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in &ids {
        // Once containerd has reloaded its state, each container is still running and
        // answers an exec.
        loop {
            let st = cri
                .container_status(ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: false,
                })
                .await
                .ok()
                .and_then(|r| r.into_inner().status);
            match st {
                Some(s) if s.state == ContainerState::ContainerRunning as i32 => break,
                other => {
                    assert!(
                        Instant::now() < deadline,
                        "{id} after the restart: {other:?}\n{}",
                        node.containerd.log_tail()
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let (code, out, err) = exec_sync(&mut cri, id, &["echo", "still-here"]).await;
        assert_eq!(
            (code, out.trim()),
            (0, "still-here"),
            "exec into {id}: {err}"
        );
    }

    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: sandbox.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", node.containerd.log_tail()));
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: sandbox.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", node.containerd.log_tail()));
    // Nothing of the pod is left: no shim, no VM process, no state.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = leftovers(&sandbox);
        let state = std::path::Path::new("/run/enclave/k8s.io").join(&sandbox);
        if left.is_empty() && !state.exists() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left after Stop/RemovePodSandbox: {left:?}, state {} exists: {}",
            state.display(),
            state.exists()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
