//! enclave-vmm against QEMU's microvm, side by side in one run, on the same guest program
//! (the probe, vmm/probe) with the same memory size:
//! - process start to the guest's first serial byte (the probe writes it with its first
//!   instruction);
//! - VMM memory overhead at steady state: RSS and PSS minus the guest memory touched (the
//!   guest-RAM mapping's own RSS/PSS), against Firecracker's published 5 MiB ceiling;
//! - VMs started and torn down per second, one after another and on every core at once.
//!
//! `cargo bench -p enclave-vmm --bench vmm_boot` (ENCLAVE_BENCH_RUNS=N, default 20).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use enclave_tests::vmm::{kvm_usable, probe_guest};

const VMM: &str = env!("CARGO_BIN_EXE_enclave-vmm");
const MEM_MIB: u32 = 128;

#[derive(Clone, Copy, PartialEq)]
enum Which {
    Enclave,
    Qemu,
}

struct Setup {
    probe: PathBuf,
    qemu: PathBuf,
    dir: PathBuf,
}

impl Setup {
    fn spawn(&self, which: Which, cmdline: &str) -> Child {
        match which {
            Which::Enclave => {
                let cfg = self.dir.join(format!(
                    "vm-{}.json",
                    cmdline.replace(' ', "_").replace('.', "-")
                ));
                if !cfg.exists() {
                    let json = serde_json::json!({"kernel": self.probe, "device_discovery": "cmdline", "memory_mib": MEM_MIB, "cmdline": format!("console=ttyS0 {cmdline}")});
                    std::fs::write(&cfg, json.to_string()).unwrap();
                }
                Command::new(VMM)
                    .arg("--config")
                    .arg(&cfg)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            }
            Which::Qemu => Command::new(&self.qemu)
                .args([
                    "-M",
                    "microvm,pit=off,pic=off,rtc=off,memory-backend=mem",
                    "-accel",
                    "kvm",
                    "-m",
                    &format!("{MEM_MIB}M"),
                ])
                .args([
                    "-object",
                    &format!("memory-backend-memfd,id=mem,size={MEM_MIB}M,share=on"),
                ])
                .args([
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-serial",
                    "stdio",
                    "-no-reboot",
                ])
                .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel"])
                .arg(&self.probe)
                .args(["-append", &format!("console=ttyS0 {cmdline}")])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Process start to the first serial byte, then waits for the VM to end.
fn first_byte(s: &Setup, which: Which) -> f64 {
    let t = Instant::now();
    let mut c = s.spawn(which, "probe.exit");
    let mut b = [0u8; 1];
    c.stdout.as_mut().unwrap().read_exact(&mut b).unwrap();
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(b[0], b'@');
    c.wait().unwrap();
    ms
}

/// (RSS, PSS) in KiB of the whole process and of the guest-RAM mapping.
fn memory(pid: u32, guest_mapping: &str) -> ((u64, u64), (u64, u64)) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut total, mut guest) = ((0, 0), (0, 0));
    let mut in_guest = false;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if first.contains('-') && first.chars().next().is_some_and(|c| c.is_ascii_hexdigit()) {
            in_guest = line.contains(guest_mapping);
            continue;
        }
        let kib: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let slot = match first {
            "Rss:" => 0,
            "Pss:" => 1,
            _ => continue,
        };
        let add = |t: &mut (u64, u64)| if slot == 0 { t.0 += kib } else { t.1 += kib };
        add(&mut total);
        if in_guest {
            add(&mut guest);
        }
    }
    (total, guest)
}

fn steady_state_overhead(s: &Setup, which: Which) -> (f64, f64, f64) {
    let mut c = s.spawn(which, "probe.idle");
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !line.contains("INFO idle") && Instant::now() < deadline {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let mapping = if which == Which::Enclave {
        "memfd:enclave-guest-ram"
    } else {
        "memfd:mem"
    };
    let (total, guest) = memory(c.id(), mapping);
    c.kill().unwrap();
    c.wait().unwrap();
    let mib = |k: u64| k as f64 / 1024.0;
    (mib(total.0 - guest.0), mib(total.1 - guest.1), mib(guest.0))
}

fn vms_per_second(s: &Setup, which: Which, n: usize, streams: usize) -> f64 {
    let t = Instant::now();
    std::thread::scope(|sc| {
        for _ in 0..streams {
            sc.spawn(|| {
                for _ in 0..n {
                    let mut c = s.spawn(which, "probe.exit");
                    let mut sink = Vec::new();
                    c.stdout.take().unwrap().read_to_end(&mut sink).unwrap();
                    assert!(c.wait().unwrap().success() || which == Which::Qemu);
                }
            });
        }
    });
    (n * streams) as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Err(e) = kvm_usable() {
        println!("SKIPPED vmm_boot: {e}");
        return;
    }
    let Ok(tools) = enclave_tests::tools() else {
        println!("SKIPPED vmm_boot: QEMU not found (scripts/setup.sh installs it)");
        return;
    };
    let runs: usize = enclave_tests::bench_setting("ENCLAVE_BENCH_RUNS", 20);
    let dir = std::env::temp_dir().join(format!("enclave-vmm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let s = Setup {
        probe: probe_guest().unwrap(),
        qemu: tools.qemu.clone(),
        dir: dir.clone(),
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("guest: the probe (vmm/probe), {MEM_MIB} MiB, 1 vCPU; {runs} interleaved runs; {cores} cores");
    println!("enclave-vmm: {}", Path::new(VMM).display());

    let (mut e, mut q) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        e.push(first_byte(&s, Which::Enclave));
        q.push(first_byte(&s, Which::Qemu));
    }
    let (me, mq) = (median(&mut e), median(&mut q));
    println!();
    println!(
        "{:<44}{:>12}{:>12}{:>10}",
        "measurement", "enclave-vmm", "qemu", "ratio"
    );
    println!(
        "{:<44}{:>9.2} ms{:>9.2} ms{:>9.1}x   goal <= 5 ms",
        "process start -> first serial byte (median)",
        me,
        mq,
        mq / me
    );
    println!("{:<44}{:>9.2} ms{:>9.2} ms", "  (min)", e[0], q[0]);

    let (er, ep, eg) = steady_state_overhead(&s, Which::Enclave);
    let (qr, qp, qg) = steady_state_overhead(&s, Which::Qemu);
    println!(
        "{:<44}{:>8.2} MiB{:>8.2} MiB{:>9.1}x   goal <= 3 MiB (Firecracker: < 5 MiB)",
        "VMM overhead, RSS minus guest RAM touched",
        er,
        qr,
        qr / er
    );
    println!(
        "{:<44}{:>8.2} MiB{:>8.2} MiB{:>9.1}x",
        "VMM overhead, PSS minus guest RAM touched",
        ep,
        qp,
        qp / ep
    );
    println!(
        "{:<44}{:>8.2} MiB{:>8.2} MiB",
        "  (guest RAM touched, RSS)", eg, qg
    );

    let n = runs.max(10);
    let (e1, q1) = (
        vms_per_second(&s, Which::Enclave, n, 1),
        vms_per_second(&s, Which::Qemu, n, 1),
    );
    let (ea, qa) = (
        vms_per_second(&s, Which::Enclave, n, cores),
        vms_per_second(&s, Which::Qemu, n, cores),
    );
    println!(
        "{:<44}{:>10.1}/s{:>10.1}/s{:>9.1}x   goal >= 55/s (Firecracker here: about 37/s)",
        "VMs started+stopped, one after another",
        e1,
        q1,
        e1 / q1
    );
    println!(
        "{:<44}{:>10.1}/s{:>10.1}/s{:>9.1}x   ({:.1}/s per core)",
        &format!("VMs started+stopped, {cores} at a time"),
        ea,
        qa,
        ea / qa,
        ea / cores as f64
    );
    let _ = std::fs::remove_dir_all(dir);
}
