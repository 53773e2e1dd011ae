//! enclave-netd's seccomp filters, checked in the kernel: the compiled filters kill on what
//! their tables do not list (a child process under the real filter), and a running netd has
//! every thread filtered, the frame thread included, so a forbidden syscall made by that
//! thread kills netd.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use enclave_netd::filters;
use enclave_tests::netns::PodPair;
use enclave_tests::procfs::pid_status;
use enclave_tests::seccomp::{child_case, inject_syscall, killed_by_seccomp, run_child, threads};

/// In the child: install the datapath filter, then make the syscall `case` names. Exits 0 if
/// the syscall returned (allowed, whatever its result).
fn child_under_datapath_filter(case: &str) -> ! {
    let prog = filters::datapath().unwrap();
    enclave_seccomp::install(&prog).unwrap();
    // SAFETY: raw syscalls with integer arguments on fds that do not exist or are ours;
    // each either fails harmlessly or is refused by the filter.
    unsafe {
        match case {
            "allowed" => {
                libc::syscall(libc::SYS_read, -1, 0, 0);
                libc::syscall(libc::SYS_epoll_create1, libc::EPOLL_CLOEXEC);
                libc::syscall(libc::SYS_ioctl, -1, enclave_netd::tap::TUNSETOFFLOAD_REQ, 0);
            }
            "socket" => {
                libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0);
            }
            "openat" => {
                libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/etc/passwd".as_ptr(), 0);
            }
            "ioctl" => {
                // TUNSETIFF: creating another interface is not the one ioctl netd makes.
                libc::syscall(libc::SYS_ioctl, -1, 0x4004_54ca, 0);
            }
            other => panic!("unknown case {other}"),
        }
        libc::_exit(0)
    }
}

#[test]
fn the_datapath_filter_kills_on_what_it_does_not_list() {
    if let Some(case) = child_case() {
        child_under_datapath_filter(&case);
    }
    let test = "the_datapath_filter_kills_on_what_it_does_not_list";
    let allowed = run_child(test, "allowed");
    assert!(
        allowed.success(),
        "listed syscalls under the filter: {allowed}"
    );
    for case in ["socket", "openat", "ioctl"] {
        let st = run_child(test, case);
        assert!(killed_by_seccomp(&st), "{case}: {st} (wanted SIGSYS)");
    }
}

/// A running netd (forward-only: the filter is the same) in a namespace of its own.
struct Netd {
    child: std::process::Child,
    _pair: PodPair,
    _dir: tempfile::TempDir,
}

impl Drop for Netd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_netd(test: &str, tag: &str) -> Option<Netd> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        enclave_tests::skip_or_fail_privileged(
            test,
            "needs root for a network namespace and a tap",
        );
        return None;
    }
    let bin = enclave_tests::workspace_root().join("target/debug/enclave-netd");
    if !bin.exists() {
        panic!("{} not built (cargo build -p enclave-netd)", bin.display());
    }
    let pair = PodPair::new(tag);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let child = Command::new(&bin)
        .args([
            "--socket",
            sock.to_str().unwrap(),
            "--tap",
            "tap0",
            "--netns",
        ])
        .arg(pair.pod_path())
        .args(["--forward-only", "--control"])
        .arg(dir.path().join("control.sock"))
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let netd = Netd {
        child,
        _pair: pair,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    // Ready: the socket exists and the vring worker is up.
    while !(Path::new(&sock).exists()
        && threads(netd.child.id())
            .iter()
            .any(|(_, n, _)| n == "vring_worker"))
    {
        assert!(Instant::now() < deadline, "netd did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(netd)
}

#[test]
fn every_netd_thread_is_filtered_and_unprivileged() {
    let Some(netd) = start_netd("every_netd_thread_is_filtered_and_unprivileged", "nsec") else {
        return;
    };
    let pid = netd.child.id();
    // Give the control thread its moment to install its own filter.
    std::thread::sleep(Duration::from_millis(100));
    let ts = threads(pid);
    let names: Vec<&str> = ts.iter().map(|(_, n, _)| n.as_str()).collect();
    for want in ["enclave-netd", "netd-control", "vring_worker"] {
        assert!(names.contains(&want), "thread {want} missing: {ts:?}");
    }
    for (tid, name, mode) in &ts {
        assert_eq!(
            mode, "2",
            "thread {name} ({tid}) is not under a seccomp filter: {ts:?}"
        );
    }
    assert_eq!(pid_status(pid, "Uid:"), ["65534"; 4], "netd's uids");
    assert_eq!(pid_status(pid, "Gid:"), ["65534"; 4], "netd's gids");
    assert_eq!(pid_status(pid, "CapEff:"), ["0000000000000000"]);
    assert_eq!(pid_status(pid, "CapPrm:"), ["0000000000000000"]);
    assert_eq!(pid_status(pid, "NoNewPrivs:"), ["1"]);
}

#[test]
fn a_forbidden_syscall_from_the_frame_thread_kills_netd() {
    let Some(mut netd) = start_netd(
        "a_forbidden_syscall_from_the_frame_thread_kills_netd",
        "nkill",
    ) else {
        return;
    };
    let ts = threads(netd.child.id());
    let worker = ts
        .iter()
        .find(|(_, n, _)| n == "vring_worker")
        .map(|(t, _, _)| *t)
        .unwrap();
    // The worker waits in epoll_wait for frames; wait until it is there.
    std::thread::sleep(Duration::from_millis(100));
    inject_syscall(
        worker,
        libc::SYS_socket,
        [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0],
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = netd.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "netd survived socket() on its frame thread"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        killed_by_seccomp(&status),
        "netd ended with {status}, wanted SIGSYS"
    );
}
