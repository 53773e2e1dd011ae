//! enclave-vmm against QEMU's microvm with `-accel kvm`, in the nested KVM box
//! (docs/nestbox.md), side by side and interleaved in one run: the same Debian kernel (the
//! guest image's), the same minimal initramfs (a busybox `/init` that mounts /proc, prints
//! the kernel's uptime, sleeps 2 s and reboots), 256 MiB, 1 vCPU:
//! - the guest clock when the kernel reaches `/init` (what Linux spends booting);
//! - the wall time from starting the VMM process to the `/init` line on the serial port;
//! - the VMM's memory overhead while the guest sleeps: its RSS minus the guest-RAM
//!   mapping's RSS.
//!
//! Everything in the box is emulated: only the ratios carry over to hardware.
//! `cargo bench -p enclave-tests --bench nested_boot` (ENCLAVE_BENCH_RUNS=N, default 5;
//! ENCLAVE_BENCH_KERNEL=PATH boots another kernel, such as the purpose-built one).
//! On a host with hardware KVM it measures directly, without a box.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use enclave_tests::nestbox::{self, NestBox};

const MEM_MIB: u32 = 256;
const INIT: &str = "#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
read up idle < /proc/uptime
echo \"INIT-UPTIME $up\"
/bin/busybox sleep 2
/bin/busybox reboot -f
";
const CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 quiet";

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let root = enclave_tests::workspace_root();
    let work = root.join("target/nested-bench");
    if nestbox::inside() || enclave_tests::accel().0 == "kvm" {
        return measure(&root, &work);
    }
    let nb = match NestBox::find() {
        Ok(nb) => nb,
        Err(why) => {
            println!("SKIPPED nested_boot: no nested KVM box: {why}");
            return;
        }
    };
    // The VMM and the initramfs are built here (the box's view of the host is read-only).
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "enclave-vmm",
            "--bin",
            "enclave-vmm",
        ])
        .status()
        .unwrap();
    assert!(st.success(), "building enclave-vmm");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("init"), INIT).unwrap();
    let (_, modules) = kernel_modules_dir();
    let out = Command::new("python3")
        .arg(root.join("guest/image/mkimage.py"))
        .args(["initramfs", "--init"])
        .arg(work.join("init"))
        .arg("--file=bin/busybox=/bin/busybox")
        .arg("--modules-dir")
        .arg(modules)
        .arg("--out")
        .arg(work.join("init.cpio"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exe = std::env::current_exe().unwrap();
    let runs = std::env::var("ENCLAVE_BENCH_RUNS").unwrap_or_else(|_| "5".into());
    println!("nested_boot: booting the nested KVM box (QEMU TCG, -cpu max, kvm_amd)...");
    let run = nb
        .run(
            &format!(
                "export ENCLAVE_BENCH_RUNS={runs}\n{}{} --bench",
                std::env::var("ENCLAVE_BENCH_KERNEL")
                    .map(|k| format!("export ENCLAVE_BENCH_KERNEL={}\n", nestbox::shell_quote(&k)))
                    .unwrap_or_default(),
                nestbox::shell_quote(&exe.to_string_lossy())
            ),
            Duration::from_secs(900),
        )
        .unwrap();
    for l in run.console.lines().filter(|l| l.starts_with("BENCH ")) {
        println!("{}", &l[6..]);
    }
    if run.status != Some(0) {
        // Seen once in five runs: the box (TCG emulating SVM, running QEMU's KVM guest)
        // stopped making progress; the per-run lines above are what was measured.
        println!("{}", run.tail(40));
        panic!("the bench failed inside the box (status {:?})", run.status);
    }
    println!("(box: {:.0} s wall)", run.wall.as_secs_f64());
    let _ = std::fs::remove_dir_all(run.out.parent().unwrap());
}

fn kernel_modules_dir() -> (PathBuf, PathBuf) {
    let manifest =
        std::fs::read_to_string(enclave_tests::workspace_root().join("target/guest/manifest"))
            .unwrap();
    let line = manifest
        .lines()
        .find_map(|l| l.strip_prefix("kernel "))
        .unwrap();
    let (pkg, ver) = line.split_once(' ').unwrap();
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or("/root".into());
    let cache = std::env::var_os("ENCLAVE_CACHE")
        .map(PathBuf::from)
        .unwrap_or(home.join(".cache/enclave"));
    let dir = cache.join("kernel").join(format!("{pkg}_{ver}"));
    let release = pkg.trim_start_matches("linux-image-");
    (dir.clone(), dir.join("pkg/lib/modules").join(release))
}

#[derive(Clone, Copy, PartialEq)]
enum Vmm {
    Enclave,
    Qemu,
}

struct Sample {
    init_uptime: f64,
    wall_to_init: f64,
    overhead_mib: f64,
}

/// Sum of `Rss:` over the mappings of `pid` whose name contains `name` (kB), and VmRSS.
fn rss(pid: u32, name: &str) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut in_it = false;
    let mut guest = 0;
    for l in smaps.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().next().is_some_and(|c| c.is_ascii_hexdigit()) {
            in_it = l.contains(name);
        } else if in_it && l.starts_with("Rss:") {
            guest += l
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let vmrss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    (guest, vmrss)
}

fn one(which: Vmm, root: &Path, work: &Path, n: usize) -> Sample {
    // ENCLAVE_BENCH_KERNEL: another kernel (the purpose-built one, target/guest-kernel/vmlinux).
    let kernel = std::env::var_os("ENCLAVE_BENCH_KERNEL")
        .map_or_else(|| root.join("target/guest/vmlinux"), PathBuf::from);
    let initrd = work.join("init.cpio");
    let serial = std::env::temp_dir().join(format!("nested-boot-{n}.log"));
    let _ = std::fs::remove_file(&serial);
    let started = Instant::now();
    let mut child = match which {
        Vmm::Enclave => {
            let cfg = std::env::temp_dir().join(format!("nested-boot-{n}.json"));
            let json = serde_json::json!({
                "kernel": kernel, "initrd": initrd, "memory_mib": MEM_MIB,
                "cmdline": CMDLINE, "serial": {"path": serial},
            });
            std::fs::write(&cfg, json.to_string()).unwrap();
            Command::new(root.join("target/release/enclave-vmm"))
                .arg("--config")
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        }
        Vmm::Qemu => {
            let qemu = enclave_tests::tools().unwrap().qemu;
            Command::new(qemu)
                .args([
                    "-M",
                    "microvm,memory-backend=mem",
                    "-accel",
                    "kvm",
                    "-cpu",
                    "host",
                ])
                .args(["-m", &format!("{MEM_MIB}M"), "-object"])
                .arg(format!(
                    "memory-backend-memfd,id=mem,size={MEM_MIB}M,share=on"
                ))
                .args([
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-no-reboot",
                ])
                .arg("-serial")
                .arg(format!("file:{}", serial.display()))
                .arg("-kernel")
                .arg(&kernel)
                .arg("-initrd")
                .arg(&initrd)
                .args(["-append", CMDLINE])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        }
    };
    let deadline = started + Duration::from_secs(300);
    let line = loop {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.starts_with("INIT-UPTIME ")) {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "no /init within 300 s:\n{text}");
        // Coarse: in the box this process competes with the guest for emulated CPUs.
        std::thread::sleep(Duration::from_millis(100));
    };
    let wall_to_init = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let (guest, vmrss) = rss(child.id(), "memfd:");
    let _ = child.wait();
    Sample {
        init_uptime: line[12..].trim().parse().unwrap(),
        wall_to_init,
        overhead_mib: vmrss.saturating_sub(guest) as f64 / 1024.0,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn measure(root: &Path, work: &Path) {
    let runs: usize = enclave_tests::bench_setting("ENCLAVE_BENCH_RUNS", 5);
    let mut e = Vec::new();
    let mut q = Vec::new();
    for i in 0..runs {
        e.push(one(Vmm::Enclave, root, work, 2 * i));
        q.push(one(Vmm::Qemu, root, work, 2 * i + 1));
        println!(
            "BENCH run {}: /init at {:.2} s (enclave-vmm) and {:.2} s (qemu) of guest clock",
            i + 1,
            e[i].init_uptime,
            q[i].init_uptime
        );
    }
    let why = if nestbox::inside() {
        "nested KVM box: emulated, only ratios carry over"
    } else {
        "hardware KVM"
    };
    let kernel =
        std::env::var("ENCLAVE_BENCH_KERNEL").unwrap_or_else(|_| "Debian cloud kernel".into());
    println!(
        "BENCH {kernel}, busybox /init, {MEM_MIB} MiB, 1 vCPU; {runs} interleaved runs; {why}"
    );
    println!(
        "BENCH {:<44}{:>12}{:>12}{:>9}",
        "measurement (median)", "enclave-vmm", "qemu kvm", "ratio"
    );
    type Row = (&'static str, fn(&Sample) -> f64, &'static str);
    let rows: [Row; 3] = [
        ("kernel reaches /init, guest clock", |s| s.init_uptime, "s"),
        (
            "process start -> /init on the serial port",
            |s| s.wall_to_init,
            "s",
        ),
        (
            "VMM overhead: RSS minus guest RAM touched",
            |s| s.overhead_mib,
            "MiB",
        ),
    ];
    for (name, f, unit) in rows {
        let a = median(e.iter().map(f).collect());
        let b = median(q.iter().map(f).collect());
        println!(
            "BENCH {name:<44}{:>8.2} {unit:<3}{:>8.2} {unit:<3}{:>8.2}x",
            a,
            b,
            b / a
        );
    }
}
