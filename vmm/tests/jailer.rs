//! enclave-jailer on this machine: the VMM runs as an unprivileged user, PID 1 of its own
//! PID namespace, in its own mount/IPC/UTS namespaces, inside its jail directory, in its
//! cgroups, with an empty environment and no inherited descriptors, and the VM still works
//! (the probe guest's vsock echo through the jail's socket).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use enclave_tests::procfs::{first_child, pid_status};
use enclave_tests::vmm::{hybrid_connect, kvm_and_root, probe_guest, VmmRun};
use serde_json::json;

const VMM: &str = env!("CARGO_BIN_EXE_enclave-vmm");
const JAILER: &str = env!("CARGO_BIN_EXE_enclave-jailer");

fn ns(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Waits until the jailer's child (the VMM) runs and the probe guest says it listens on
/// vsock (in `serial`); returns the VMM's pid. Fails the test if the jailer exits first.
fn wait_for_jailed_vm(jailer: &mut std::process::Child, serial: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(p) = first_child(jailer.id()) {
            if std::fs::read_to_string(serial)
                .unwrap_or_default()
                .contains("INFO vsock listening")
            {
                return p;
            }
        }
        if let Ok(Some(st)) = jailer.try_wait() {
            let mut e = String::new();
            jailer
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut e)
                .unwrap();
            panic!("jailer exited early ({st}): {e}");
        }
        assert!(Instant::now() < deadline, "the jailed VM did not come up");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_jailed_vmm_is_unprivileged_isolated_and_works() {
    let test = "the_jailed_vmm_is_unprivileged_isolated_and_works";
    if !kvm_and_root(test, "the jailer needs root (namespaces, mknod, cgroups)") {
        return;
    }
    let probe = probe_guest().unwrap();
    let dir = VmmRun::dir("jail");
    let base = dir.join("jails");
    let id = format!("jailtest-{}", std::process::id());
    let cfg = json!({
        "kernel": probe, "device_discovery": "cmdline", "memory_mib": 64,
        "cmdline": "console=ttyS0 probe.vsock_listen=5000",
        "vsock": {"cid": 3, "uds_path": dir.join("ignored.sock")},
    });
    std::fs::write(dir.join("vm.json"), cfg.to_string()).unwrap();
    // A descriptor without close-on-exec, which must not reach the VMM.
    let leak = std::fs::File::open("/etc/hostname").unwrap();
    // SAFETY: dup of a valid fd; the new fd lacks FD_CLOEXEC and is closed below.
    let leaked = unsafe { libc::dup(std::os::fd::AsRawFd::as_raw_fd(&leak)) };
    // pids.max has the same name in cgroup v1 and v2.
    let cgroup_key = "pids.max=32";
    let mut jailer = Command::new(JAILER)
        .args([
            "--id",
            &id,
            "--exec",
            VMM,
            "--config",
            dir.join("vm.json").to_str().unwrap(),
            "--uid",
            "65534",
            "--gid",
            "65534",
        ])
        .args([
            "--base",
            base.to_str().unwrap(),
            "--cgroup",
            cgroup_key,
            "--cleanup",
        ])
        .env("SECRET_TOKEN", "must-not-reach-the-vmm")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // SAFETY: closing our duplicate.
    unsafe { libc::close(leaked) };
    let root = base.join(&id).join("root");
    let pid = wait_for_jailed_vm(&mut jailer, &root.join("run/serial.log")).to_string();

    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| pid_status(&pid, k);
    assert_eq!(field("Uid:"), ["65534"; 4], "{status}");
    assert_eq!(field("Gid:"), ["65534"; 4], "{status}");
    assert_eq!(
        field("Groups:"),
        Vec::<String>::new(),
        "no supplementary groups"
    );
    assert_eq!(
        field("NSpid:").last(),
        Some(&"1".to_string()),
        "PID 1 of its own PID namespace: {status}"
    );
    assert_eq!(field("Seccomp:"), ["2"]);
    assert_eq!(field("CapEff:"), ["0000000000000000"], "no capabilities");
    for kind in ["mnt", "pid_for_children", "ipc", "uts"] {
        assert_ne!(
            ns(&pid, kind),
            ns("self", kind),
            "{kind} namespace is shared with the host"
        );
    }
    assert_eq!(
        ns(&pid, "net"),
        ns("self", "net"),
        "no --netns: the host's (the shim passes the pod's)"
    );
    assert_eq!(
        std::fs::read(format!("/proc/{pid}/environ")).unwrap(),
        b"",
        "environment not empty"
    );
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        assert_ne!(
            target,
            Path::new("/etc/hostname"),
            "an inherited descriptor reached the VMM"
        );
    }
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cg.lines().any(
            |l| l.contains("pids") && l.ends_with(&format!("/enclave/{id}"))
                || l.starts_with("0::") && l.ends_with(&format!("/enclave/{id}"))
        ),
        "{cg}"
    );
    // Its / is the jail: the host's /etc is not there.
    assert!(
        std::fs::metadata(format!("/proc/{pid}/root/etc")).is_err(),
        "the VMM sees the host's /etc"
    );
    assert!(std::fs::metadata(format!("/proc/{pid}/root/enclave-vmm")).is_ok());

    // The VM works through the jail's socket.
    let mut s = hybrid_connect(&root.join("run/vsock.sock"), 5000);
    s.write_all(b"jailed\n").unwrap();
    let mut echo = [0u8; 7];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"JAILED\n");
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(20);
    let st = loop {
        if let Some(st) = jailer.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "jailer did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(st.success(), "jailer exit {st}");
    assert!(
        !base.join(&id).exists(),
        "--cleanup left {}",
        base.join(&id).display()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// With `--share`, the vsock socket and the serial log stay at their host paths (what the
/// shim reads and where it listens), the kernel is not copied into the jail, and a jailer
/// killed with SIGKILL takes its VMM with it.
#[test]
fn a_shared_directory_keeps_host_paths_and_the_vmm_dies_with_its_jailer() {
    let test = "a_shared_directory_keeps_host_paths_and_the_vmm_dies_with_its_jailer";
    if !kvm_and_root(test, "the jailer needs root (namespaces, mknod, cgroups)") {
        return;
    }
    let probe = probe_guest().unwrap();
    let dir = VmmRun::dir("jailshare");
    let share = dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::os::unix::fs::chown(&share, Some(65534), Some(65534)).unwrap();
    let base = dir.join("jails");
    let id = format!("jailshare-{}", std::process::id());
    let cfg = json!({
        "kernel": probe, "device_discovery": "cmdline", "memory_mib": 64,
        "cmdline": "console=ttyS0 probe.vsock_listen=5000",
        "serial": {"path": share.join("console.log")},
        "vsock": {"cid": 3, "uds_path": share.join("vm.vsock")},
    });
    std::fs::write(dir.join("vm.json"), cfg.to_string()).unwrap();
    let mut jailer = Command::new(JAILER)
        .args(["--id", &id, "--exec", VMM, "--config"])
        .arg(dir.join("vm.json"))
        .args(["--uid", "65534", "--gid", "65534", "--base"])
        .arg(&base)
        .arg("--share")
        .arg(&share)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = wait_for_jailed_vm(&mut jailer, &share.join("console.log"));
    // The jail holds no copy of the kernel: a hard link or a bind mount of the original.
    let inside = std::fs::metadata(format!("/proc/{pid}/root/kernel")).unwrap();
    let original = std::fs::metadata(&probe).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (inside.dev(), inside.ino()),
        (original.dev(), original.ino()),
        "the kernel was copied into the jail"
    );
    let mut s = hybrid_connect(&share.join("vm.vsock"), 5000);
    s.write_all(b"shared\n").unwrap();
    let mut echo = [0u8; 7];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"SHARED\n");
    // SIGKILL leaves the jailer no chance to clean up; the VMM must not outlive it.
    jailer.kill().unwrap();
    jailer.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the VMM (pid {pid}) outlived its jailer"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
