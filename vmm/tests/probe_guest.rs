//! enclave-vmm on real KVM with the probe guest (vmm/probe): the boot layout checked from
//! inside the guest, virtio-mmio and vsock driven from CPL3, the control API, and the
//! seccomp filters on every thread.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Duration;

use enclave_tests::procfs::status_field;
use enclave_tests::skip_or_fail;
use enclave_tests::vmm::{
    checks, fnv1a, hybrid_connect, kvm_usable, probe_guest, test_bytes, VmmRun,
};
use serde_json::json;

const VMM: &str = env!("CARGO_BIN_EXE_enclave-vmm");

fn ready(test: &str) -> Option<PathBuf> {
    if let Err(e) = kvm_usable() {
        skip_or_fail(test, &e);
        return None;
    }
    Some(probe_guest().expect("probe guest"))
}

fn base_config(probe: &PathBuf, dir: &std::path::Path, cmdline: &str) -> serde_json::Value {
    json!({
        "kernel": probe, "device_discovery": "cmdline",
        "memory_mib": 128,
        "cmdline": format!("console=ttyS0 {cmdline}"),
        "serial": {"path": dir.join("serial.log")},
        "vsock": {"cid": 3, "uds_path": dir.join("vsock.sock")},
    })
}

#[test]
fn probe_checks_boot_layout_and_drives_vsock_from_cpl3() {
    let Some(probe) = ready("probe_checks_boot_layout_and_drives_vsock_from_cpl3") else {
        return;
    };
    let dir = VmmRun::dir("layout");
    // An initrd of random bytes: the probe hashes what it finds where boot_params says.
    let initrd = test_bytes(300_000, 2_654_435_761);
    std::fs::write(dir.join("initrd"), &initrd).unwrap();
    // Host side of the guest's connection to host port 6000.
    let listener = UnixListener::bind(dir.join("vsock.sock_6000")).unwrap();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut line = String::new();
        BufReader::new(&c).read_line(&mut line).unwrap();
        c.write_all(b"hello from the host\n").unwrap();
        line
    });
    let mut cfg = base_config(
        &probe,
        &dir,
        &format!(
            "probe.initrd_sum={:#x} probe.vsock_port=6000 probe.vsock_listen=5000",
            fnv1a(&initrd)
        ),
    );
    cfg["initrd"] = json!(dir.join("initrd"));
    let mut vm = VmmRun::start(VMM.as_ref(), &dir, &cfg, &[]).unwrap();

    assert_eq!(server.join().unwrap(), "hello from the probe guest\n");
    vm.wait_serial("INFO vsock listening", Duration::from_secs(20))
        .unwrap();
    let mut s = hybrid_connect(&vm.path("vsock.sock"), 5000);
    s.write_all(b"ping from the host\n").unwrap();
    let mut echo = [0u8; 19];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"PING FROM THE HOST\n");
    drop(s);

    let status = vm.wait(Duration::from_secs(30)).unwrap();
    let serial = vm.serial();
    assert!(
        status.success(),
        "exit {status}; stderr {}; serial:\n{serial}",
        vm.stderr()
    );
    let results = checks(&serial);
    for want in [
        "cpl3",
        "boot_params.magic",
        "boot_params.boot_flag",
        "e820",
        "cmdline",
        "initrd",
        "virtio.magic_version",
        "vsock.features",
        "vsock.driver_ok",
        "vsock.connect",
        "vsock.send",
        "vsock.recv",
        "vsock.close",
        "vsock.accept",
        "vsock.echo",
    ] {
        assert!(
            results.iter().any(|(n, ok, _)| n == want && *ok),
            "check {want} missing or failed; serial:\n{serial}"
        );
    }
    assert!(
        results.iter().all(|(_, ok, _)| *ok),
        "a check failed:\n{serial}"
    );
    assert!(serial.contains("PROBE DONE 0x0"), "{serial}");
    // The serial log starts with the byte the probe writes at its first instruction.
    assert!(serial.starts_with('@'), "{serial}");
}

/// Starts a VM with a control socket and waits until the probe listens on vsock.
fn start_listening_with_api(dir: &std::path::Path, cfg: &serde_json::Value) -> VmmRun {
    let api = dir.join("api.sock");
    let mut vm = VmmRun::start(
        VMM.as_ref(),
        dir,
        cfg,
        &["--api-sock", api.to_str().unwrap()],
    )
    .unwrap();
    vm.wait_serial("INFO vsock listening", Duration::from_secs(20))
        .unwrap();
    vm
}

fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .flatten()
        .map(|t| {
            let field = |k: &str| status_field(&t.path().join("status"), k).join(" ");
            (field("Name:"), field("Seccomp:"))
        })
        .collect()
}

#[test]
fn every_thread_is_filtered_and_the_control_api_works() {
    let Some(probe) = ready("every_thread_is_filtered_and_the_control_api_works") else {
        return;
    };
    let dir = VmmRun::dir("api");
    let mut cfg = base_config(&probe, &dir, "probe.vsock_listen=5000");
    cfg["vcpus"] = json!(2);
    let mut vm = start_listening_with_api(&dir, &cfg);

    let threads = seccomp_modes(vm.child.id());
    let names: Vec<_> = threads.iter().map(|(n, _)| n.as_str()).collect();
    // Main, 2 vCPUs, api, and KVM's own kernel worker ("kvm-nx-lpage-recovery"), which
    // lives in the VMM's thread group and inherits the main thread's filter.
    let ours = names.iter().filter(|n| !n.starts_with("kvm-")).count();
    assert_eq!(ours, 4, "main, 2 vCPUs, api: {threads:?}");
    for want in ["enclave-vmm", "vcpu0", "vcpu1", "api"] {
        assert!(names.contains(&want), "{threads:?}");
    }
    for (name, mode) in &threads {
        assert_eq!(mode, "2", "thread {name} is not under a seccomp filter");
    }

    let info = vm.api(r#"{"action":"info"}"#).unwrap();
    assert_eq!(info["ok"], true, "{info}");
    assert_eq!(info["result"]["state"], "running");
    assert_eq!(info["result"]["vcpus"], 2);
    assert!(info["result"]["cmdline"]
        .as_str()
        .unwrap()
        .contains("virtio_mmio.device=4K@0xd0000000:5"));
    assert_eq!(vm.api(r#"{"action":"pause"}"#).unwrap()["ok"], true);
    assert_eq!(
        vm.api(r#"{"action":"info"}"#).unwrap()["result"]["state"],
        "paused"
    );
    assert_eq!(vm.api(r#"{"action":"resume"}"#).unwrap()["ok"], true);
    let m = vm.api(r#"{"action":"metrics"}"#).unwrap();
    assert!(m["result"]["pio_exits"].as_u64().unwrap() > 100, "{m}");
    assert!(m["result"]["mmio_exits"].as_u64().unwrap() > 10, "{m}");
    let bad = vm.api(r#"{"action":"reboot"}"#).unwrap();
    assert_eq!(bad["ok"], false);
    assert!(
        bad["error"].as_str().unwrap().contains("unknown variant"),
        "{bad}"
    );
    let bad = vm.api("{not json").unwrap();
    assert_eq!(
        bad["ok"], false,
        "the API answered a request that is not JSON"
    );
    // Shut down over the API. The probe powers off by itself when its vsock listen window
    // (10 s of guest time) ends; on a loaded machine (CI failed here once, the API calls
    // above spread over that window) it can be gone first: then it must have ended well.
    match vm.api(r#"{"action":"shutdown"}"#) {
        Ok(r) => assert_eq!(r["ok"], true, "{r}"),
        Err(e) => eprintln!("the probe guest had already powered off: {e}"),
    }
    let st = vm.wait(Duration::from_secs(10)).unwrap();
    assert!(st.success(), "{st}");
}

#[test]
fn a_forbidden_syscall_kills_the_process() {
    use std::os::unix::process::ExitStatusExt;
    // Each thread's real filter, installed in a child process (this test binary run again),
    // which then makes a syscall no VMM thread may make.
    if let Ok(kind) = std::env::var("ENCLAVE_SECCOMP_CHILD") {
        let kind = match kind.as_str() {
            "vcpu" => enclave_vmm::seccomp::ThreadKind::Vcpu,
            "api" => enclave_vmm::seccomp::ThreadKind::Api,
            _ => enclave_vmm::seccomp::ThreadKind::Vmm,
        };
        enclave_vmm::seccomp::install(kind, enclave_vmm::seccomp::SeccompMode::Kill).unwrap();
        // Allowed: write to stdout.
        // SAFETY: writing a static buffer to fd 1.
        unsafe { libc::write(1, b"filtered\n".as_ptr().cast(), 9) };
        // Forbidden everywhere: opening a file.
        // SAFETY: a plain openat of a constant path.
        unsafe { libc::openat(libc::AT_FDCWD, c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
        std::process::exit(0);
    }
    for kind in ["vmm", "vcpu", "api"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_forbidden_syscall_kills_the_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("ENCLAVE_SECCOMP_CHILD", kind)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("filtered"),
            "{kind}: the allowed write did not happen: {stdout}"
        );
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{kind}: {:?}",
            out.status
        );
    }
}

#[test]
fn a_bad_config_names_file_line_and_field() {
    let dir = VmmRun::dir("badcfg");
    let path = dir.join("vm.json");
    std::fs::write(
        &path,
        "{\n  \"kernel\": \"/bin/true\",\n  \"memory_mib\": 3\n}\n",
    )
    .unwrap();
    let out = std::process::Command::new(VMM)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:3:3: field `memory_mib`", path.display())),
        "{err}"
    );
    let out = std::process::Command::new(VMM)
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(dir);
}

/// The shipped guest image (Debian's cloud kernel, which finds its virtio-mmio devices
/// only through ACPI, and the agent as init) on enclave-vmm: the agent announces itself on
/// a host vsock port and answers the version handshake over hybrid vsock. On a host whose
/// KVM cannot run a Linux kernel (PVM) the test runs itself inside the nested KVM box.
#[test]
fn linux_guest_on_enclave_vmm_talks_to_the_agent() {
    let test = "linux_guest_on_enclave_vmm_talks_to_the_agent";
    if !enclave_tests::nestbox::on_hardware_kvm_or_in_box(test, Duration::from_secs(300)) {
        return;
    }
    let root = enclave_tests::workspace_root();
    let image = std::env::var_os("ENCLAVE_GUEST_IMAGE")
        .map_or_else(|| root.join("target/guest"), std::path::PathBuf::from);
    if !image.join("vmlinux").exists() {
        skip_or_fail(
            test,
            &format!(
                "no guest image in {} (run guest/image/build.sh)",
                image.display()
            ),
        );
        return;
    }
    let dir = VmmRun::dir("linux");
    let cmdline = std::fs::read_to_string(image.join("cmdline")).unwrap_or_default();
    let cfg = json!({
        "kernel": image.join("vmlinux"),
        "initrd": image.join("initramfs.cpio"),
        "memory_mib": 512,
        "cmdline": format!("{} enclave.ready_port=1025", cmdline.trim()),
        "serial": {"path": dir.join("serial.log")},
        "vsock": {"cid": 3, "uds_path": dir.join("vsock.sock")},
    });
    let ready = UnixListener::bind(dir.join("vsock.sock_1025")).unwrap();
    let started = std::time::Instant::now();
    let mut vm = VmmRun::start(VMM.as_ref(), &dir, &cfg, &[]).unwrap();
    ready.set_nonblocking(true).unwrap();
    let deadline = started + Duration::from_secs(120);
    let mut c = loop {
        match ready.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Ok(Some(st)) = vm.child.try_wait() {
                    panic!(
                        "enclave-vmm exited ({st}) before the agent announced itself:\n{}",
                        vm.serial()
                    );
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the agent did not announce itself in 120 s:\n{}",
                    vm.serial()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    c.set_nonblocking(false).unwrap();
    let announced = started.elapsed();
    let mut line = String::new();
    BufReader::new(&mut c).read_line(&mut line).unwrap();
    assert!(line.starts_with("READY"), "{line}");
    let stream = enclave_agent_protocol::client::connect_hybrid_vsock(
        &vm.path("vsock.sock"),
        enclave_agent_protocol::AGENT_VSOCK_PORT,
        std::time::Instant::now() + Duration::from_secs(30),
    )
    .unwrap();
    let client = enclave_agent_protocol::client::Client::new(stream).unwrap();
    let version = client.handshake().unwrap();
    assert_eq!(version.protocol, enclave_agent_protocol::PROTOCOL_VERSION);
    let serial = vm.serial();
    let agent_ready_ms = serial
        .lines()
        .find(|l| l.contains("ready: serving the agent protocol"))
        .and_then(|l| {
            l.split('[')
                .nth(1)?
                .split("ms]")
                .next()?
                .trim()
                .parse::<u64>()
                .ok()
        });
    println!(
        "BOX-REPORT linux on enclave-vmm: agent ready at {agent_ready_ms:?} ms of guest uptime, announced {:.2} s after the VMM started",
        announced.as_secs_f64()
    );
    let _ = vm.child.kill();
    let _ = vm.child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_hostile_guest_is_counted_not_fatal() {
    let Some(probe) = ready("a_hostile_guest_is_counted_not_fatal") else {
        return;
    };
    let dir = VmmRun::dir("hostile");
    let cfg = base_config(&probe, &dir, "probe.hostile probe.vsock_listen=5000");
    let mut vm = start_listening_with_api(&dir, &cfg);
    let m = vm.api(r#"{"action":"metrics"}"#).unwrap();
    let m = &m["result"];
    assert!(m["bad_mmio_accesses"].as_u64().unwrap() >= 5, "{m}");
    assert!(m["bad_descriptors"].as_u64().unwrap() >= 3, "{m}");
    // The device still works after all that.
    let mut s = hybrid_connect(&vm.path("vsock.sock"), 5000);
    s.write_all(b"still here\n").unwrap();
    let mut echo = [0u8; 11];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"STILL HERE\n");
    drop(s);
    let st = vm.wait(Duration::from_secs(30)).unwrap();
    let serial = vm.serial();
    assert!(st.success(), "{st}\n{serial}");
    for want in [
        "hostile.mmio_survived",
        "hostile.bad_queue_refused",
        "hostile.bad_descriptors_returned",
        "vsock.accept",
        "vsock.echo",
    ] {
        assert!(
            checks(&serial).iter().any(|(n, ok, _)| n == want && *ok),
            "{want}:\n{serial}"
        );
    }
    assert!(serial.contains("PROBE DONE 0x0"), "{serial}");
}

#[test]
fn pvh_entry_works_and_the_probe_agrees_with_qemu() {
    let Some(probe) = ready("pvh_entry_works_and_the_probe_agrees_with_qemu") else {
        return;
    };
    let dir = VmmRun::dir("pvh");
    let initrd = test_bytes(50_000, 2_246_822_519);
    std::fs::write(dir.join("initrd"), &initrd).unwrap();
    let cmdline = format!("probe.initrd_sum={:#x}", fnv1a(&initrd));
    let mut cfg = base_config(&probe, &dir, &cmdline);
    cfg["boot"] = json!("pvh");
    cfg["initrd"] = json!(dir.join("initrd"));
    cfg.as_object_mut().unwrap().remove("vsock");
    let mut vm = VmmRun::start(VMM.as_ref(), &dir, &cfg, &[]).unwrap();
    let st = vm.wait(Duration::from_secs(30)).unwrap();
    let serial = vm.serial();
    assert!(st.success(), "{st}\n{serial}");
    assert!(serial.contains("(PVH entry)"), "{serial}");
    for want in ["pvh.magic", "cpl3", "e820", "cmdline", "initrd"] {
        assert!(
            checks(&serial).iter().any(|(n, ok, _)| n == want && *ok),
            "{want}:\n{serial}"
        );
    }

    // The same probe under QEMU's microvm (a reference VMM) passes the same checks, so the
    // probe's idea of the boot protocol is not just ours.
    let Ok(tools) = enclave_tests::tools() else {
        return skip_or_fail(
            "pvh_entry_works_and_the_probe_agrees_with_qemu (QEMU half)",
            "QEMU not found",
        );
    };
    let out = std::process::Command::new(&tools.qemu)
        .args([
            "-M",
            "microvm,pit=off,pic=off,rtc=off",
            "-accel",
            "kvm",
            "-m",
            "128",
            "-nodefaults",
            "-no-user-config",
        ])
        .args([
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
        ])
        .arg("-kernel")
        .arg(&probe)
        .arg("-initrd")
        .arg(dir.join("initrd"))
        .args(["-append", &format!("console=ttyS0 {cmdline}")])
        .output()
        .unwrap();
    let qserial = String::from_utf8_lossy(&out.stdout);
    for want in ["pvh.magic", "cpl3", "e820", "cmdline", "initrd"] {
        assert!(
            checks(&qserial).iter().any(|(n, ok, _)| n == want && *ok),
            "QEMU: {want}:\n{qserial}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(qserial.contains("PROBE DONE 0x0"), "{qserial}");
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    let Some(probe) = ready("sigterm_stops_the_vm_cleanly") else {
        return;
    };
    let dir = VmmRun::dir("sigterm");
    let cfg = base_config(&probe, &dir, "probe.idle");
    let mut vm = VmmRun::start(VMM.as_ref(), &dir, &cfg, &[]).unwrap();
    vm.wait_serial("INFO idle", Duration::from_secs(20))
        .unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
    let st = vm.wait(Duration::from_secs(5)).unwrap();
    assert!(st.success(), "{st}");
    assert!(vm.stderr().contains("stopped by signal 15"));
}

#[test]
fn configure_and_start_over_the_api() {
    let Some(probe) = ready("configure_and_start_over_the_api") else {
        return;
    };
    let dir = VmmRun::dir("apistart");
    let api = dir.join("api.sock");
    let mut child = std::process::Command::new(VMM)
        .arg("--api-sock")
        .arg(&api)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !api.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut s = std::os::unix::net::UnixStream::connect(&api).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut ask = |req: &str| {
        writeln!(s, "{req}").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    };
    let early = ask(r#"{"action":"start"}"#);
    assert_eq!(early["ok"], false);
    assert!(
        early["error"].as_str().unwrap().contains("configure"),
        "{early}"
    );
    let bad = ask(r#"{"action":"configure","config":{"kernel":"/nonexistent"}}"#);
    assert!(
        bad["error"].as_str().unwrap().contains("field `kernel`"),
        "{bad}"
    );
    let cfg = json!({"action": "configure", "config": {"kernel": probe, "device_discovery": "cmdline", "memory_mib": 32, "cmdline": "console=ttyS0", "serial": {"path": dir.join("serial.log")}}});
    assert_eq!(ask(&cfg.to_string())["ok"], true);
    assert_eq!(ask(r#"{"action":"start"}"#)["ok"], true);
    drop(s);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the VM started over the API did not finish"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(st.success(), "{st}");
    let serial = std::fs::read_to_string(dir.join("serial.log")).unwrap();
    assert!(serial.contains("PROBE DONE 0x0"), "{serial}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A guest that floods the vsock device: 20,000 connection requests to a host port nobody
/// listens on, from CPL3, with no receive buffer posted, so every refusal (a RST) would have
/// to wait in the VMM. The VMM keeps at most `MAX_RX_CONTROL` of them, drops and counts the
/// rest, its peak RSS stays within 4 MiB of the same guest's without the flood (run side
/// by side), and the device then still serves a host connection.
#[test]
fn a_guest_flooding_vsock_requests_leaves_the_vmm_bounded_and_serving() {
    let Some(probe) = ready("a_guest_flooding_vsock_requests_leaves_the_vmm_bounded_and_serving")
    else {
        return;
    };
    let run = |name: &str, flood: bool| -> (u64, serde_json::Value, String) {
        let dir = VmmRun::dir(name);
        let extra = if flood {
            " probe.vsock_flood=20000"
        } else {
            ""
        };
        let cfg = base_config(&probe, &dir, &format!("probe.vsock_listen=5000{extra}"));
        let mut vm = start_listening_with_api(&dir, &cfg);
        let kib = |k: &str| -> u64 {
            status_field(
                std::path::Path::new(&format!("/proc/{}/status", vm.child.id())),
                k,
            )
            .first()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
        };
        let peak = kib("VmHWM:");
        let metrics = vm.api(r#"{"action":"metrics"}"#).unwrap()["result"].clone();
        // The device still serves: a host connection is accepted and echoed.
        let mut s = hybrid_connect(&vm.path("vsock.sock"), 5000);
        s.write_all(b"still there?\n").unwrap();
        let mut echo = [0u8; 13];
        s.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"STILL THERE?\n", "{name}");
        drop(s);
        let st = vm.wait(Duration::from_secs(30)).unwrap();
        let serial = vm.serial();
        assert!(st.success(), "{name}: exit {st}; serial:\n{serial}");
        (peak, metrics, serial)
    };
    let (base_kib, _, _) = run("flood-base", false);
    let (flood_kib, metrics, serial) = run("flood", true);
    let results = checks(&serial);
    for want in [
        "vsock.flood_sent",
        "vsock.flood_answered",
        "vsock.accept",
        "vsock.echo",
    ] {
        assert!(
            results.iter().any(|(n, ok, _)| n == want && *ok),
            "{want} failed or missing:\n{serial}"
        );
    }
    let dropped = metrics["vsock_control_dropped"].as_u64().unwrap_or(0);
    let drained = serial
        .lines()
        .find_map(|l| l.strip_prefix("INFO vsock flood drained="))
        .and_then(|v| {
            u64::from_str_radix(v.split_whitespace().next()?.trim_start_matches("0x"), 16).ok()
        })
        .unwrap_or(0);
    eprintln!(
        "peak RSS without the flood {base_kib} KiB, with it {flood_kib} KiB; {drained} answers kept and delivered, {dropped} dropped"
    );
    assert!(
        drained <= enclave_vmm::devices::virtio::vsock::MAX_RX_CONTROL as u64 + 16,
        "the device kept {drained} answers"
    );
    assert!(
        dropped + drained >= 20_000,
        "every request answered or counted: {dropped} dropped, {drained} delivered; {metrics}"
    );
    assert!(
        flood_kib < base_kib + 4096,
        "peak RSS {flood_kib} KiB with the flood against {base_kib} KiB without"
    );
}
