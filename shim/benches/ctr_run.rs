//! `ctr run -d` through containerd-shim-enclave-v2 against runc (io.containerd.runc.v2),
//! side by side in one run on the same image, with the shim's own step timings (VMM and
//! backends started, agent ready, container created, started) and the shim's memory.
//! On this host the guest runs under TCG: those figures are emulation figures.
//!
//! `cargo bench -p enclave-shim --bench ctr_run` (ENCLAVE_BENCH_RUNS=N, default 5; as root).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Instant;

use enclave_tests::containerd::{busybox_image, pid_of, Containerd, IMAGE};
use enclave_tests::procfs::pid_status;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The last number before `unit` on the first log line containing `key`.
fn number_before(line: &str, key: &str, unit: &str) -> Option<f64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split(unit)
        .next()?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0
        || std::process::Command::new("containerd")
            .arg("--version")
            .output()
            .is_err()
    {
        println!("SKIPPED ctr_run: needs root and containerd");
        return;
    }
    if let Err(e) = enclave_tests::tools() {
        println!("SKIPPED ctr_run: {e}");
        return;
    }
    let runs: usize = enclave_tests::bench_setting("ENCLAVE_BENCH_RUNS", 5);
    let shim_dir = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-enclave-v2"))
        .parent()
        .unwrap()
        .to_path_buf();
    let dir = std::env::temp_dir().join(format!("enclave-bench-ctrd-{}", std::process::id()));
    let ctrd = Containerd::start(&dir, "enclave-bench", &shim_dir);
    let image = busybox_image(&dir);
    ctrd.ctr_ok(&["images", "import", image.to_str().unwrap()]);
    let fifo = dir.join("fifo");
    let fifo = fifo.to_str().unwrap();
    let (accel, why) = enclave_tests::accel();
    println!(
        "shim: {}; guest accelerator: {accel} ({why}); {runs} runs each",
        shim_dir.join("containerd-shim-enclave-v2").display()
    );

    let (mut enclave, mut runc) = (Vec::new(), Vec::new());
    let (mut vm_up, mut agent, mut create, mut start, mut rss) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        for (runtime, out) in [
            ("io.containerd.enclave.v2", &mut enclave),
            ("io.containerd.runc.v2", &mut runc),
        ] {
            let id = format!("b{i}-{}", runtime.split('.').nth(2).unwrap_or("x"));
            let t = Instant::now();
            ctrd.ctr_ok(&[
                "run",
                "-d",
                "--fifo-dir",
                fifo,
                "--runtime",
                runtime,
                IMAGE,
                &id,
                "sleep",
                "1000",
            ]);
            out.push(t.elapsed().as_secs_f64() * 1e3);
            if runtime.contains("enclave") {
                let log =
                    std::fs::read_to_string(format!("/run/enclave/enclave-bench/{id}/shim.log"))
                        .unwrap_or_default();
                for line in log.lines() {
                    if let Some(v) =
                        number_before(line, "started in", "ms").filter(|_| line.contains("VM up"))
                    {
                        vm_up.push(v);
                        agent.extend(number_before(line, "agent ready after", "ms"));
                    } else if line.contains(" created ") {
                        create.extend(number_before(line, " in ", "ms"));
                    } else if line.contains(" started ") {
                        start.extend(number_before(line, " in ", "ms"));
                    }
                }
                if let Some(pid) =
                    pid_of(&["containerd-shim-enclave-v2", &format!("-id {id}"), "serve"])
                {
                    let kib = pid_status(pid, "VmRSS:")
                        .first()
                        .and_then(|v| v.parse::<f64>().ok());
                    rss.extend(kib.map(|k| k / 1024.0));
                }
            }
            ctrd.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
            let deadline = Instant::now() + std::time::Duration::from_secs(30);
            while !ctrd
                .ctr_ok(&["task", "ls"])
                .lines()
                .any(|l| l.starts_with(&id) && l.contains("STOPPED"))
                && Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let _ = ctrd.ctr(&["task", "rm", &id]);
            let _ = ctrd.ctr(&["containers", "rm", &id]);
        }
    }
    let (e, r) = (median(&mut enclave), median(&mut runc));
    println!();
    println!("{:<58}{:>12}", "measurement (median)", "value");
    println!("{:<58}{:>9.1} ms", "ctr run -d, enclave shim (microVM)", e);
    println!(
        "{:<58}{:>9.1} ms   ({:.1}x runc)",
        "ctr run -d, runc (baseline, same image)",
        r,
        e / r
    );
    println!(
        "{:<58}{:>9.1} ms",
        "  shim: VMM + virtiofsd + vsock backend started",
        median(&mut vm_up)
    );
    println!(
        "{:<58}{:>9.1} ms",
        "  shim: ... agent ready (guest booted, handshake)",
        median(&mut agent)
    );
    println!(
        "{:<58}{:>9.1} ms",
        "  shim: Create (rootfs mount + VM + agent CreateContainer)",
        median(&mut create)
    );
    println!(
        "{:<58}{:>9.1} ms",
        "  shim: Start (agent StartContainer)",
        median(&mut start)
    );
    if !rss.is_empty() {
        println!(
            "{:<58}{:>8.1} MiB",
            "shim RSS with one running container",
            median(&mut rss)
        );
    }
}
