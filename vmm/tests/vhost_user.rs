//! The VMM's vhost-user frontend with real backends, driven by the probe guest at CPL3:
//! - virtio-fs served by virtiofsd: FUSE INIT, LOOKUP, OPEN, READ of a host file;
//! - virtio-net served by enclave-netd, which owns a tap in a network namespace made for the
//!   test: the guest's frames are seen on the tap, and frames sent on the tap reach the guest.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use enclave_tests::skip_or_fail;
use enclave_tests::vmm::{
    assert_checks, kvm_and_root, kvm_usable, probe_guest, run_to_end, VmmRun,
};
use serde_json::json;

const VMM: &str = env!("CARGO_BIN_EXE_enclave-vmm");

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_path(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn virtio_fs_through_virtiofsd() {
    let test = "virtio_fs_through_virtiofsd";
    if let Err(e) = kvm_usable() {
        return skip_or_fail(test, &e);
    }
    let tools = match enclave_tests::tools() {
        Ok(t) => t,
        Err(e) => return skip_or_fail(test, &e),
    };
    let probe = probe_guest().unwrap();
    let dir = VmmRun::dir("fs");
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let content = format!(
        "host file for the probe, written by {test} at {:?}\n",
        Instant::now()
    );
    std::fs::write(shared.join("probe.txt"), &content).unwrap();
    let sock = dir.join("fs.sock");
    let _fsd = KillOnDrop(
        Command::new(&tools.virtiofsd)
            .args([
                "--socket-path",
                sock.to_str().unwrap(),
                "--shared-dir",
                shared.to_str().unwrap(),
                "--cache",
                "never",
                "--sandbox",
                "none",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_path(&sock);
    let cfg = json!({
        "kernel": probe, "device_discovery": "cmdline", "memory_mib": 128,
        "cmdline": "console=ttyS0 probe.fs_file=probe.txt",
        "serial": {"path": dir.join("serial.log")},
        "fs": [{"socket": sock, "tag": "shared"}],
    });
    let serial = run_to_end(VMM.as_ref(), &dir, &cfg);
    assert_checks(
        &serial,
        &[
            "fs.features",
            "fs.driver_ok",
            "fs.init",
            "fs.lookup",
            "fs.read",
        ],
    );
    assert!(serial.contains("INFO fs tag=shared"), "{serial}");
    assert!(
        serial.contains(&format!("INFO fs read: {}", content.trim_end())),
        "{serial}"
    );
}

/// A network namespace for the test, removed on drop.
struct Netns(String);
impl Netns {
    fn new(name: &str) -> Result<Netns, String> {
        let name = format!("{name}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ok = |args: &[&str]| -> Result<(), String> {
            let out = Command::new(args[0])
                .args(&args[1..])
                .output()
                .map_err(|e| format!("{}: {e}", args.join(" ")))?;
            out.status.success().then_some(()).ok_or_else(|| {
                format!(
                    "{}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        };
        ok(&["ip", "netns", "add", &name])?;
        let ns = Netns(name.clone());
        ok(&[
            "ip", "netns", "exec", &name, "ip", "tuntap", "add", "tap0", "mode", "tap",
        ])?;
        ok(&[
            "ip", "netns", "exec", &name, "ip", "link", "set", "tap0", "up",
        ])?;
        Ok(ns)
    }
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.0))
    }
}
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// In a thread inside the namespace: captures the probe's frames on tap0 and answers each
/// with a frame to the sender's MAC. Returns the payloads seen.
fn tap_peer(ns: PathBuf, frames: usize) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).unwrap();
        // SAFETY: setns on this thread only, with a namespace fd we own.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let proto = (0x88b5u16).to_be();
        // SAFETY: plain socket call; the fd is closed below.
        let s = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
        assert!(
            s >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let name = std::ffi::CString::new("tap0").unwrap();
        // SAFETY: NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        // SAFETY: sockaddr_ll is plain data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: binding a socket we own to a valid sockaddr_ll.
        let rc = unsafe {
            libc::bind(
                s,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0);
        let tv = libc::timeval {
            tv_sec: 20,
            tv_usec: 0,
        };
        // SAFETY: setting a receive timeout on our socket.
        unsafe {
            libc::setsockopt(
                s,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        let mut seen = Vec::new();
        let mut buf = [0u8; 2048];
        while seen.len() < frames {
            // SAFETY: reading into our buffer.
            let n = unsafe { libc::recv(s, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                break;
            }
            let f = &buf[..n as usize];
            if f.len() < 14 || f[12..14] != [0x88, 0xb5] {
                continue;
            }
            seen.push(f[14..].iter().copied().take_while(|&b| b != 0).collect());
            let mut reply = Vec::new();
            reply.extend_from_slice(&f[6..12]);
            reply.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
            reply.extend_from_slice(&[0x88, 0xb5]);
            reply.extend_from_slice(b"reply from the tap side");
            reply.resize(60, 0);
            // SAFETY: sending our buffer on our bound socket.
            unsafe { libc::send(s, reply.as_ptr().cast(), reply.len(), 0) };
        }
        // SAFETY: closing our fd.
        unsafe { libc::close(s) };
        seen
    })
}

#[test]
fn virtio_net_through_enclave_netd_to_a_tap() {
    let test = "virtio_net_through_enclave_netd_to_a_tap";
    if !kvm_and_root(test, "needs root for a network namespace and a tap") {
        return;
    }
    let netd = Path::new(VMM).with_file_name("enclave-netd");
    if !netd.exists() {
        return skip_or_fail(
            test,
            &format!("{} not built (cargo build -p enclave-netd)", netd.display()),
        );
    }
    let probe = probe_guest().unwrap();
    let ns = Netns::new("enclave-vmmnet").unwrap();
    let dir = VmmRun::dir("net");
    let sock = dir.join("net.sock");
    let mut netd = KillOnDrop(
        Command::new(&netd)
            .args([
                "--socket",
                sock.to_str().unwrap(),
                "--tap",
                "tap0",
                "--netns",
                ns.path().to_str().unwrap(),
                // The probe's frames are not IP: this test is about the vhost-user path.
                "--forward-only",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_for_path(&sock);
    let peer = tap_peer(ns.path(), 4);
    std::thread::sleep(Duration::from_millis(100)); // the capture socket is bound
    let cfg = json!({
        "kernel": probe, "device_discovery": "cmdline", "memory_mib": 128,
        "cmdline": "console=ttyS0 probe.net_frames=4 probe.net_expect=4",
        "serial": {"path": dir.join("serial.log")},
        "net": [{"socket": sock, "mac": "52:54:00:12:34:56"}],
    });
    let serial = run_to_end(VMM.as_ref(), &dir, &cfg);
    let seen = peer.join().unwrap();
    let want: Vec<Vec<u8>> = (0..4)
        .map(|i| format!("enclave-probe frame {i}").into_bytes())
        .collect();
    assert_eq!(seen, want, "frames on the tap");
    assert_checks(
        &serial,
        &["net.features", "net.driver_ok", "net.tx", "net.rx"],
    );
    // netd serves one VM and exits cleanly when the VMM goes.
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = netd.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "enclave-netd did not exit after the VM stopped"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "enclave-netd exit {status}");
}
