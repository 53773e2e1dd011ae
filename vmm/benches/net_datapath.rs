//! enclave-netd's datapath where the guest runs natively: the probe guest on enclave-vmm
//! pushes IPv4/UDP DNS queries (a flow the PCI CDE template allows) through the vhost-user
//! net device at CPL3, in batches of 8 per kick, and netd puts them on a tap. Side by side in
//! one run, the same guest and VMM with netd:
//! - `forward-only`: no policy, no audit (the plain forwarding backend);
//! - `allow-all`: the matcher with a policy that allows everything;
//! - `pci-cde`: the matcher with configs/policies/pci-cde.yaml (the flow matches rule `dns`,
//!   its app is detected as DNS, then the flow cache decides).
//!
//! Per variant: frames per second of wall time, and frames per second of netd CPU time (per
//! core: netd's datapath is one thread), both from the difference between a long and a short
//! run so boot and connection setup cancel out; ratios against forward-only.
//!
//! `cargo build --release -p enclave-netd && cargo bench -p enclave-vmm --bench net_datapath`
//! (ENCLAVE_BENCH_FRAMES=N, default 400000; ENCLAVE_BENCH_RUNS=R, default 3). Needs root and
//! a usable /dev/kvm; otherwise it says SKIPPED and why.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use enclave_tests::cri::OPEN_POLICY;
use enclave_tests::netns::sh;
use enclave_tests::vmm::{kvm_usable, probe_guest};

const VMM: &str = env!("CARGO_BIN_EXE_enclave-vmm");
const MAC: &str = "52:54:00:12:34:56";

/// Waits for `pid` and returns its user+system CPU time.
fn wait_cpu(pid: u32) -> Duration {
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to locals; pid is our child.
    unsafe { libc::wait4(pid as i32, &mut status, 0, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

struct Variant {
    name: &'static str,
    args: Vec<String>,
}

/// One VM run of `frames` frames through netd: (wall time, netd CPU time, frames sent).
fn run(
    dir: &Path,
    netns: &str,
    probe: &Path,
    v: &Variant,
    frames: u64,
) -> (Duration, Duration, u64) {
    let netd = Path::new(VMM).with_file_name("enclave-netd");
    let sock = dir.join("net.sock");
    let _ = std::fs::remove_file(&sock);
    // Reaped by wait_cpu (wait4, for its CPU time).
    #[allow(clippy::zombie_processes)]
    let child = Command::new(&netd)
        .args([
            "--socket",
            sock.to_str().unwrap(),
            "--tap",
            "tap0",
            "--netns",
        ])
        .arg(format!("/var/run/netns/{netns}"))
        .args(&v.args)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "netd did not start ({})", v.name);
        std::thread::sleep(Duration::from_millis(5));
    }
    let cfg = serde_json::json!({
        "kernel": probe, "device_discovery": "cmdline", "memory_mib": 128,
        "cmdline": format!("console=ttyS0 probe.net_udp=1 probe.net_batch=8 probe.net_frames={frames}"),
        "serial": {"path": dir.join("serial.log")},
        "net": [{"socket": sock, "mac": MAC}],
    });
    let _ = std::fs::remove_file(dir.join("serial.log"));
    let cfg_path = dir.join("vm.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let t = Instant::now();
    let st = Command::new(VMM)
        .arg("--config")
        .arg(&cfg_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let wall = t.elapsed();
    assert!(st.success(), "enclave-vmm: {st}");
    let cpu = wait_cpu(child.id());
    let serial = std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default();
    let sent = serial
        .lines()
        .find_map(|l| l.strip_prefix("INFO net sent="))
        .and_then(|h| u64::from_str_radix(h.trim().trim_start_matches("0x"), 16).ok())
        .unwrap_or(0);
    (wall, cpu, sent)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if let Err(e) = kvm_usable() {
        println!("SKIPPED net_datapath: {e}");
        return;
    }
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        println!("SKIPPED net_datapath: needs root (network namespace, tap)");
        return;
    }
    let netd = Path::new(VMM).with_file_name("enclave-netd");
    if !netd.exists() {
        println!(
            "SKIPPED net_datapath: {} not built (cargo build --release -p enclave-netd)",
            netd.display()
        );
        return;
    }
    let probe = probe_guest().unwrap();
    let frames: u64 = enclave_tests::bench_setting("ENCLAVE_BENCH_FRAMES", 400_000);
    let runs: usize = enclave_tests::bench_setting("ENCLAVE_BENCH_RUNS", 3);
    let short = 2_000;

    let dir = std::env::temp_dir().join(format!("enclave-netbench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let netns = format!("enclave-netbench-{}", std::process::id());
    let _ = Command::new("ip").args(["netns", "del", &netns]).output();
    sh(&["ip", "netns", "add", &netns]);
    // Deleted however the run ends (a failed assertion unwinds through it).
    struct Cleanup(String, PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
    let _cleanup = Cleanup(netns.clone(), dir.clone());
    sh(&["ip", "-n", &netns, "tuntap", "add", "tap0", "mode", "tap"]);
    sh(&["ip", "-n", &netns, "link", "set", "tap0", "up"]);

    // The node's directories: the probe is pod payments/api (zone cde-api) at 10.1.0.5.
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let pod = dir.join("pod.json");
    std::fs::write(
        &pod,
        serde_json::json!({"name": "api", "namespace": "payments",
            "annotations": {"enclave.io/zone": "cde-api"}, "ips": ["10.1.0.5"], "mac": MAC})
        .to_string(),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("registry")).unwrap();
    let mut variants = vec![Variant {
        name: "forward-only",
        args: vec!["--forward-only".into()],
    }];
    for (name, policy) in [
        ("allow-all", OPEN_POLICY.to_string()),
        (
            "pci-cde",
            std::fs::read_to_string(workspace.join("configs/policies/pci-cde.yaml")).unwrap(),
        ),
    ] {
        let pd = dir.join(format!("policies-{name}"));
        std::fs::create_dir_all(&pd).unwrap();
        std::fs::write(pd.join("policy.yaml"), policy).unwrap();
        variants.push(Variant {
            name,
            args: [
                "--pod",
                pod.to_str().unwrap(),
                "--policy-dir",
                pd.to_str().unwrap(),
                "--registry",
                dir.join("registry").to_str().unwrap(),
                "--audit-log",
                dir.join(format!("audit-{name}.log")).to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        });
    }

    println!(
        "probe guest on enclave-vmm (real KVM), IPv4/UDP DNS frames of 71 bytes, batches of 8 per kick;\n{frames} frames per long run, {short} per short run, median of {runs} runs\n"
    );
    println!(
        "{:<14}{:>16}{:>22}{:>14}{:>14}",
        "netd", "frames/s wall", "frames/s netd CPU", "vs forward", "(CPU basis)"
    );
    let mut base: Option<(f64, f64)> = None;
    for v in &variants {
        let mut wall_rates = Vec::new();
        let mut cpu_rates = Vec::new();
        for _ in 0..runs {
            let (w0, c0, s0) = run(&dir, &netns, &probe, v, short);
            let (w1, c1, s1) = run(&dir, &netns, &probe, v, frames);
            assert_eq!(
                (s0, s1),
                (short, frames),
                "{}: frames sent; serial:\n{}",
                v.name,
                std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default()
            );
            let n = (frames - short) as f64;
            wall_rates.push(n / (w1.as_secs_f64() - w0.as_secs_f64()).max(1e-9));
            cpu_rates.push(n / (c1.as_secs_f64() - c0.as_secs_f64()).max(1e-9));
        }
        let (w, c) = (median(wall_rates), median(cpu_rates));
        let (rw, rc) = match base {
            None => {
                base = Some((w, c));
                (1.0, 1.0)
            }
            Some((bw, bc)) => (w / bw, c / bc),
        };
        println!(
            "{:<14}{:>16.0}{:>22.0}{:>13.2}x{:>13.2}x",
            v.name, w, c, rw, rc
        );
    }
    // The CDE run's audit log: the one flow's record, verified by the chain.
    let log = dir.join("audit-pci-cde.log");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let flows = text
        .lines()
        .filter(|l| l.contains("\"class_uid\":4001"))
        .count();
    println!(
        "\npci-cde audit log: {} records ({flows} flow records: one per run, rule `dns`)",
        text.lines().count()
    );
}
