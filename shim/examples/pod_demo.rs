//! Demo: pods in microVMs through CRI, as the kubelet would run them for RuntimeClass
//! `enclave`. A private containerd (CRI plugin, CNI bridge, in its own network namespace),
//! then a PCI CDE pod (`payments-api`, zone cde, two containers) and a non-CDE pod
//! (`storefront`, zone web) started with runtime handler `enclave`. Each pod is shown to be
//! in its own VM (guest kernel, guest boot id, one VM per pod, pod IP answering), with the
//! shim's step timings; then both are torn down and the node checked clean.
//!
//! `cargo run --release -p enclave-shim --example pod_demo` (as root; scripts/demo.sh runs it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use enclave_tests::containerd::{kill_leftovers, leftovers};
use enclave_tests::cri::{
    container_config, cri_client, exec_sync, pod_ip, sandbox_config, CriNode,
};
use k8s_cri::v1::*;

fn step(s: &str) {
    println!("\n--- {s}");
}

/// Whether `od -tx1` output starts with a TLS record header (handshake or alert).
fn is_tls(od: &str) -> bool {
    let t = od.trim();
    t.starts_with("16 03") || t.starts_with("15 03")
}

/// The template's cluster-dns zone.
const CLUSTER_DNS: &str = "10.96.0.10";
/// The acquirer, as the node's dnsmasq answers for api.acquirer.example.
const ACQUIRER: &str = "10.88.77.200";
/// A TLS server the pod never resolves.
const OTHER: &str = "10.88.77.201";

/// dnsmasq (CLUSTER_DNS, answering api.acquirer.example with ACQUIRER) and TLS servers on
/// ACQUIRER and OTHER, on the node's pod bridge.
fn name_servers(node: &CriNode, dir: &std::path::Path) -> Vec<enclave_tests::services::Service> {
    use enclave_tests::services;
    services::add_addresses(node, "10.88.77.1", &[CLUSTER_DNS, ACQUIRER, OTHER])
        .expect("addresses on the pod bridge");
    let mut out = services::tls_servers(node, dir, "api.acquirer.example", &[ACQUIRER, OTHER])
        .expect("TLS servers");
    out.push(
        services::dnsmasq(
            node,
            dir,
            CLUSTER_DNS,
            &[("api.acquirer.example", ACQUIRER)],
        )
        .expect("dnsmasq"),
    );
    std::thread::sleep(std::time::Duration::from_millis(800));
    out
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        println!("SKIPPED: the pod demo needs root (containerd, CNI, mounts)");
        return;
    }
    let shim_dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(
        shim_dir.join("containerd-shim-enclave-v2").exists(),
        "build it first: cargo build --release -p enclave-shim"
    );
    // What an earlier run or test left (processes and state) would be counted as ours.
    kill_leftovers("/run/enclave/k8s.io/");
    enclave_tests::cri::clean_node();
    let (accel, why) = enclave_tests::accel();
    step(&format!("a node: private containerd with CRI, CNI bridge, handler `enclave` (guests under {accel}: {why})"));
    let dir = std::env::temp_dir().join(format!("enclave-pod-demo-{}", std::process::id()));
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let policy = std::fs::read_to_string(workspace.join("configs/policies/pci-cde.yaml")).unwrap();
    let node = CriNode::start_with_policy(
        &dir,
        &shim_dir,
        &format!("enclave-demo-{}", std::process::id()),
        &policy,
    );
    println!(
        "  zone policy: configs/policies/pci-cde.yaml in the node's policy directory; audit log {}",
        node.audit_log.display()
    );
    let mut cri = cri_client(&node.containerd.sock()).await;
    let logs = dir.join("logs");

    let pods = [
        (
            "payments-api",
            "payments",
            "cde-api",
            vec!["api", "audit-sidecar"],
        ),
        ("storefront", "storefront", "web", vec!["web"]),
    ];
    let mut started = Vec::new();
    for (name, ns, zone, containers) in &pods {
        step(&format!(
            "RunPodSandbox {ns}/{name} (zone {zone}) with runtime handler enclave"
        ));
        let config = sandbox_config(name, ns, zone, &logs.join(name));
        std::fs::create_dir_all(logs.join(name)).unwrap();
        let t = Instant::now();
        let sandbox = enclave_tests::cri::run_sandbox(&mut cri, &node.containerd, &config).await;
        println!(
            "  sandbox {} ready in {:.0} ms",
            &sandbox[..12],
            t.elapsed().as_secs_f64() * 1e3
        );
        let mut ids = Vec::new();
        for c in containers {
            let t = Instant::now();
            let cmd: &[&str] = if *c == "api" {
                &[
                    "sh",
                    "-c",
                    "mkdir -p /www && echo payment-api-ok > /www/index.html && echo 'card 4111 1111 1111 1111 exp 12/29' > /www/card.html && exec httpd -f -p 8080 -h /www",
                ]
            } else {
                &["sleep", "1000"]
            };
            let cc = container_config(c, cmd, &format!("{c}.log"));
            let id = enclave_tests::cri::run_container(&mut cri, &sandbox, &config, cc).await;
            println!(
                "  container {c} running in {:.0} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
            ids.push(id);
        }
        let log = std::fs::read_to_string(format!("/run/enclave/k8s.io/{sandbox}/shim.log"))
            .unwrap_or_default();
        for l in log
            .lines()
            .filter(|l| l.contains("VM up") || l.contains("created") || l.contains("started"))
        {
            println!("  shim: {}", l.trim_start_matches("enclave-shim: "));
        }
        started.push((name.to_string(), sandbox, ids));
    }

    step("inside each pod (ExecSync): kernel and boot id of the VM");
    let host = String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    println!("  node kernel: {}", host.trim());
    let mut boot_ids = Vec::new();
    let mut ips = Vec::new();
    for (name, sandbox, ids) in &started {
        for id in ids {
            let run = |cmd: &'static [&'static str]| {
                let mut cri = cri.clone();
                let id = id.clone();
                async move { exec_sync(&mut cri, &id, cmd).await.1 }
            };
            let (kernel, boot) = (
                run(&["uname", "-r"]).await,
                run(&["cat", "/proc/sys/kernel/random/boot_id"]).await,
            );
            println!(
                "  {name:<13} container {}: kernel {kernel}, boot id {boot}",
                &id[..12]
            );
            boot_ids.push((sandbox.clone(), boot));
        }
        let ip = pod_ip(&mut cri, sandbox).await;
        println!("  {name:<13} pod IP {ip}");
        ips.push((name.clone(), ip, ids[0].clone()));
    }
    let vms = leftovers("/run/enclave/k8s.io/")
        .iter()
        .filter(|c| c.contains("qemu-system") || c.contains("enclave-vmm --config"))
        .count();
    let same_pod_same_vm = boot_ids.iter().all(|(s, b)| {
        boot_ids
            .iter()
            .filter(|(s2, _)| s2 == s)
            .all(|(_, b2)| b2 == b)
    });
    let pods_apart = boot_ids
        .first()
        .map(|(s, b)| {
            boot_ids
                .iter()
                .filter(|(s2, _)| s2 != s)
                .all(|(_, b2)| b2 != b)
        })
        .unwrap_or(false);
    println!("  VMs on the node: {vms} (one per pod); containers of a pod share its VM: {same_pod_same_vm}; pods are in different VMs: {pods_apart}");

    step("the zone policy at work: every frame decided by each pod's enclave-netd, and again by nftables");
    let (api_ip, web_ip) = (ips[0].1.clone(), ips[1].1.clone());
    let (api_c, web_c) = (ips[0].2.clone(), ips[1].2.clone());
    let http = |from: String, to_ip: String| {
        let mut cri = cri.clone();
        async move {
            let cmd = format!(
                "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 8 nc -w 4 {to_ip} 8080 | tail -n 1"
            );
            exec_sync(&mut cri, &from, &["sh", "-c", &cmd]).await.1
        }
    };
    let allowed = http(web_c.clone(), api_ip.clone()).await;
    println!(
        "  storefront (zone web) -> payments-api:8080 HTTP: {}",
        if allowed == "payment-api-ok" {
            "answered (rule web-to-api, app http)".to_string()
        } else {
            format!("FAILED ({allowed:?})")
        }
    );
    let denied = http(api_c.clone(), web_ip.clone()).await;
    println!(
        "  payments-api (zone cde-api) -> storefront:8080: {}",
        if denied.is_empty() {
            "no connection (guardrail cde-not-to-non-cde)"
        } else {
            "ANSWERED (should be denied)"
        }
    );
    // The right port but not the app the rule requires: cut, and recorded with the reason.
    exec_sync(
        &mut cri,
        &web_c,
        &[
            "sh",
            "-c",
            &format!("printf 'not http at all' | timeout 8 nc -w 4 {api_ip} 8080; true"),
        ],
    )
    .await;
    println!("  storefront -> payments-api:8080, payload not HTTP: cut by netd (app_mismatch)");

    step("inside the allowed flow: netd inspects what rule web-to-api lets through");
    let get = |path: &'static str| {
        let (mut cri, web_c, api_ip) = (cri.clone(), web_c.clone(), api_ip.clone());
        async move {
            let cmd = format!(
                "printf '%s\\r\\n\\r\\n' 'GET {path} HTTP/1.0' | timeout 6 nc -w 3 {api_ip} 8080 | tail -n 1"
            );
            exec_sync(&mut cri, &web_c, &["sh", "-c", &cmd]).await.1
        }
    };
    let injected = get("/?q=1%27%20OR%20%271%27%3D%271").await;
    println!(
        "  storefront -> payments-api: GET /?q=1' OR '1'='1 -> {}",
        if injected.is_empty() {
            "cut (SQL.Injection)"
        } else {
            "ANSWERED (should be cut)"
        }
    );
    let card = get("/card.html").await;
    println!(
        "  storefront -> payments-api: GET /card.html (a page with a card number) -> {}",
        if card.contains("4111") {
            "ANSWERED (should be cut)"
        } else {
            "cut: a card number leaving the CDE (DLP.CreditCard)"
        }
    );

    step("rules inside protocols, and the acquirer reached by DNS name");
    let deleted = {
        let cmd = format!(
            "printf 'DELETE /payments/42 HTTP/1.0\\r\\n\\r\\n' | timeout 6 nc -w 3 {api_ip} 8080 | tail -n 1"
        );
        exec_sync(&mut cri.clone(), &web_c, &["sh", "-c", &cmd])
            .await
            .1
    };
    println!(
        "  storefront -> payments-api: DELETE /payments/42 -> {}",
        if deleted.is_empty() {
            "refused: rule web-to-api allows GET and POST only (Policy.Request)"
        } else {
            "ANSWERED (should be refused)"
        }
    );
    // The node plays the cluster DNS (dnsmasq on 10.96.0.10, the template's cluster-dns
    // zone) and the acquirer (a TLS server on ACQUIRER); OTHER is a TLS server the pod
    // never resolves.
    let _servers = name_servers(&node, &dir);
    let resolved = {
        let mut cri = cri.clone();
        exec_sync(
            &mut cri,
            &api_c,
            &[
                "sh",
                "-c",
                &format!("nslookup -type=a api.acquirer.example {CLUSTER_DNS}"),
            ],
        )
        .await
        .1
    };
    println!(
        "  payments-api: nslookup api.acquirer.example -> {}",
        resolved
            .lines()
            .rfind(|l| l.starts_with("Address:") && !l.contains(":53"))
            .unwrap_or("(no answer)")
            .trim()
    );
    let hello: String = enclave_netfilter::packet::build::tls_client_hello("api.acquirer.example")
        .iter()
        .map(|b| format!("\\{b:03o}"))
        .collect();
    let tls = |to: &'static str| {
        let (mut cri, api_c, hello) = (cri.clone(), api_c.clone(), hello.clone());
        async move {
            let cmd =
                format!("printf '{hello}' | timeout 6 nc -w 3 {to} 443 | head -c 3 | od -An -tx1");
            exec_sync(&mut cri, &api_c, &["sh", "-c", &cmd]).await.1
        }
    };
    let by_name = tls(ACQUIRER).await;
    println!(
        "  payments-api -> api.acquirer.example ({ACQUIRER}):443 TLS hello -> {}",
        if is_tls(&by_name) {
            "the acquirer answers with a TLS record (its address learned from the pod's own DNS answer)"
        } else {
            "NO ANSWER (should reach it)"
        }
    );
    let unresolved = tls(OTHER).await;
    println!(
        "  payments-api -> {OTHER}:443, an address it never resolved -> {}",
        if unresolved.trim().is_empty() {
            "refused (not in the name zone for this pod)"
        } else {
            "ANSWERED (should be refused)"
        }
    );
    let names_ok = deleted.is_empty()
        && resolved.contains(ACQUIRER)
        && is_tls(&by_name)
        && unresolved.trim().is_empty();

    std::thread::sleep(std::time::Duration::from_millis(500));
    println!("  the node audit log (OCSF, hash-chained), flow records:");
    let log = std::fs::read_to_string(&node.audit_log).unwrap_or_else(|e| {
        println!("  (cannot read {}: {e})", node.audit_log.display());
        String::new()
    });
    let mut seen = std::collections::BTreeSet::new();
    for l in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        if v["class_uid"] != 4001 {
            continue;
        }
        let m = v["message"].as_str().unwrap_or("").to_string();
        // Both pods' netds record a flow between them; show it once, with who recorded it.
        let key = m.split(' ').skip(1).take(3).collect::<Vec<_>>().join(" ")
            + v["action"].as_str().unwrap_or("");
        if seen.insert(key) {
            println!(
                "    #{:<3} [{}] {}",
                v["metadata"]["sequence"],
                v["unmapped"]["enclave"]["workload"]["name"]
                    .as_str()
                    .unwrap_or("?"),
                m
            );
        }
    }
    println!("  findings (OCSF Detection Finding, class 2004), each with a packet capture:");
    let mut findings = 0;
    for l in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        if v["class_uid"] == 2004 {
            findings += 1;
            println!(
                "    #{:<3} [{}] {} (capture {})",
                v["metadata"]["sequence"],
                v["unmapped"]["enclave"]["workload"]["name"]
                    .as_str()
                    .unwrap_or("?"),
                v["message"].as_str().unwrap_or(""),
                v["unmapped"]["enclave"]["capture"]["uid"]
                    .as_str()
                    .unwrap_or("-")
            );
        }
    }
    let inspected_ok = injected.is_empty()
        && !card.contains("4111")
        && findings >= 2
        && !log.contains("4111 1111 1111 1111");
    let verify = Command::new(shim_dir.join("enclavectl"))
        .args(["audit", "verify"])
        .arg(&node.audit_log)
        .output();
    let verified = verify.as_ref().is_ok_and(|o| o.status.success());
    if let Ok(o) = &verify {
        println!(
            "  enclavectl audit verify: {}",
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
        );
    }
    let policy_ok =
        allowed == "payment-api-ok" && denied.is_empty() && verified && inspected_ok && names_ok;

    step("segmentation test (PCI DSS 11.4.5): probes between the zones from inside each pod's VM");
    // Kept after the demo (the node's own directory goes with it).
    let reports = workspace.join("target/demo/segmentation");
    let seg = node
        .segmentation_test(&shim_dir.join("enclavectl"), &reports)
        .args(["--ports", "22,443,5432,6379"])
        .output();
    let segmentation_ok = match &seg {
        Ok(o) => {
            for l in String::from_utf8_lossy(&o.stdout).lines() {
                println!("  {l}");
            }
            o.status.success()
        }
        Err(e) => {
            println!("  enclavectl: {e}");
            false
        }
    };

    let policy_ok = policy_ok && segmentation_ok;
    step("StopPodSandbox, RemovePodSandbox");
    for (name, sandbox, _) in &started {
        cri.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: sandbox.clone(),
        })
        .await
        .unwrap();
        cri.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: sandbox.clone(),
        })
        .await
        .unwrap();
        println!("  {name} removed");
    }
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let left = leftovers("/run/enclave/k8s.io/");
    let state: Vec<PathBuf> = std::fs::read_dir("/run/enclave/k8s.io")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    println!(
        "  left on the node: {} processes, {} state directories",
        left.len(),
        state.len()
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        vms == 2
            && same_pod_same_vm
            && pods_apart
            && policy_ok
            && left.is_empty()
            && state.is_empty(),
        "the demo's checks failed (see above)"
    );
    println!("\npod demo: OK");
}
