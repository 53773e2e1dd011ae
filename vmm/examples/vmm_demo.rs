//! Demo: enclave-vmm on real KVM. Boots the probe guest jailed (unprivileged, own
//! namespaces, seccomp on every thread), shows what the host sees of the VMM process, talks
//! to the guest over vsock, and prints what the guest checked from the inside.
//!
//! `cargo run --release -p enclave-vmm --example vmm_demo` (as root; scripts/demo.sh runs it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use enclave_tests::procfs::{first_child, pid_status, status_field};
use enclave_tests::vmm::{checks, hybrid_connect, kvm_usable, probe_guest};

fn main() {
    let bin = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let (vmm, jailer) = (bin.join("enclave-vmm"), bin.join("enclave-jailer"));
    for b in [&vmm, &jailer] {
        assert!(
            b.exists(),
            "{} missing: cargo build --release -p enclave-vmm",
            b.display()
        );
    }
    if let Err(e) = kvm_usable() {
        println!("SKIPPED: {e}");
        return;
    }
    println!("building the probe guest (vmm/probe)...");
    let probe = probe_guest().unwrap();
    let dir = std::env::temp_dir().join(format!("enclave-vmm-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = serde_json::json!({
        "kernel": probe, "device_discovery": "cmdline", "memory_mib": 64, "vcpus": 2,
        "cmdline": "console=ttyS0 probe.hostile probe.vsock_listen=5000",
        "vsock": {"cid": 3, "uds_path": "/ignored/by/the/jailer"},
    });
    std::fs::write(dir.join("vm.json"), cfg.to_string()).unwrap();
    let id = format!("demo-{}", std::process::id());
    println!("starting: enclave-jailer --id {id} --uid 65534 --gid 65534 --cgroup pids.max=32 (probe guest, 2 vCPUs, 64 MiB)");
    let t = Instant::now();
    let mut j = Command::new(&jailer)
        .args([
            "--id",
            &id,
            "--exec",
            vmm.to_str().unwrap(),
            "--config",
            dir.join("vm.json").to_str().unwrap(),
        ])
        .args([
            "--uid",
            "65534",
            "--gid",
            "65534",
            "--base",
            dir.join("jails").to_str().unwrap(),
            "--cgroup",
            "pids.max=32",
        ])
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let root: PathBuf = dir.join("jails").join(&id).join("root");
    let serial = root.join("run/serial.log");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("INFO vsock listening")
    {
        assert!(
            Instant::now() < deadline && j.try_wait().unwrap().is_none(),
            "the VM did not come up"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "guest up and listening {:.1} ms after the jailer started",
        t.elapsed().as_secs_f64() * 1000.0
    );
    let pid = first_child(j.id()).unwrap();
    let get = |k: &str| pid_status(pid, k).join(" ");
    println!("\nthe VMM as the host sees it (pid {pid}):");
    println!("  uid/gid        {} / {}", get("Uid:"), get("Gid:"));
    println!("  pid in its ns  {}", get("NSpid:"));
    println!("  capabilities   {}", get("CapEff:"));
    println!("  root           {}", root.display());
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let f = |k: &str| status_field(&t.path().join("status"), k).join(" ");
        println!(
            "  thread {:<22} Seccomp: {} (2 = filter)",
            f("Name:"),
            f("Seccomp:")
        );
    }
    let mut s = hybrid_connect(&root.join("run/vsock.sock"), 5000);
    println!("\nhost -> guest vsock port 5000: connected (CONNECT 5000 / OK)");
    s.write_all(b"hello from the node\n").unwrap();
    let mut echo = [0u8; 20];
    s.read_exact(&mut echo).unwrap();
    println!("guest answered: {:?}", String::from_utf8_lossy(&echo));
    drop(s);
    let st = j.wait().unwrap();
    println!(
        "\nVM stopped ({st}); what the guest checked from inside (probe.hostile misbehaved first):"
    );
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    let results = checks(&log);
    for (name, ok, why) in &results {
        println!(
            "  {:<36} {}",
            name,
            if *ok {
                "ok".to_string()
            } else {
                format!("FAIL {why}")
            }
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    for cg in ["/sys/fs/cgroup/pids/enclave", "/sys/fs/cgroup/enclave"] {
        let _ = std::fs::remove_dir(format!("{cg}/{id}"));
    }
    assert!(results.iter().all(|(_, ok, _)| *ok), "a check failed");
}
