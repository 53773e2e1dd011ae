//! Helpers for tests and benchmarks that run real guests: the QEMU launcher (the shim's
//! QEMU backend, re-exported), busybox root filesystems, OCI specs, the probe guest for
//! enclave-vmm, and skip-or-fail reporting.

pub mod confinement;
pub mod containerd;
pub mod cri;
pub mod kubeapi;
pub mod nestbox;
pub mod netns;
pub mod procfs;
pub mod seccomp;
pub mod services;
pub mod vmm;

use std::path::{Path, PathBuf};
use std::time::Duration;

use enclave_agent_protocol::Client;
pub use enclave_shim::vm::{accel, tsc_khz, GuestVm, Tools, VmOptions, READY_PORT};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Finds QEMU, the vhost-user backends and the guest image built in this workspace
/// (`target/guest`).
pub fn tools() -> Result<Tools, String> {
    Tools::find(workspace_root().join("target/guest"))
}

/// A bench's setting from the environment (`ENCLAVE_BENCH_RUNS=3`, say), or `default`
/// when it is unset or not a `T`.
pub fn bench_setting<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Asserts that `uname -r` output from a container is the guest's kernel: the release of
/// the image's kernel package (Debian's cloud kernel), or for a kernel built here (the
/// purpose-built one, `guest/image/build.sh --kernel`) any release but the host's.
pub fn assert_guest_kernel(uname: &str) {
    let image = std::env::var_os("ENCLAVE_GUEST_IMAGE")
        .map_or_else(|| workspace_root().join("target/guest"), PathBuf::from);
    let manifest = std::fs::read_to_string(image.join("manifest")).unwrap_or_default();
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let got = uname.trim();
    match manifest
        .lines()
        .find_map(|l| l.strip_prefix("kernel linux-image-"))
        .and_then(|l| l.split_whitespace().next())
    {
        Some(release) => assert_eq!(got, release, "the guest's kernel expected"),
        None => assert!(
            !got.is_empty() && got != host.trim(),
            "the guest's kernel expected, got {got:?} (host {})",
            host.trim()
        ),
    }
}

/// Writes a minimal busybox root filesystem (from the host's static busybox) at `dir`.
pub fn busybox_rootfs(dir: &Path) -> Result<(), String> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .ok_or("busybox not found (apt-get install busybox-static)")?;
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(dir.join(d)).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::copy(busybox, dir.join("bin/busybox")).map_err(|e| format!("copy busybox: {e}"))?;
    for applet in [
        "sh", "echo", "cat", "sleep", "ls", "ip", "id", "hostname", "head", "true", "false", "wc",
        "yes", "grep", "uname", "env", "ps", "mount", "cut", "httpd", "wget", "tty", "stty", "nc",
        "printf", "timeout", "ping", "seq", "kill", "tail", "mkdir",
    ] {
        let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// An OCI spec for `args` in a busybox rootfs, with the mounts containerd gives a container.
pub fn spec(args: &[&str], terminal: bool) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "HOME=/root"],
            "cwd": "/",
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "pod",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {"maskedPaths": ["/proc/kcore", "/proc/keys"], "readonlyPaths": ["/proc/sys"]}
    })
}

/// Everything a process writes to stdout (or stderr) until end of stream.
pub fn read_to_end(
    c: &Client,
    id: &str,
    exec: &str,
    stderr: bool,
) -> Result<Vec<u8>, enclave_agent_protocol::ClientError> {
    use enclave_agent_protocol::messages::{ReadStderr, ReadStdout, ReadStreamRequest};
    let mut out = Vec::new();
    loop {
        let r = ReadStreamRequest {
            container_id: id.into(),
            exec_id: exec.into(),
            max_len: 65536,
        };
        let t = Some(Duration::from_secs(60));
        let d = if stderr {
            c.call_timeout::<ReadStderr>(&r, t)?.data
        } else {
            c.call_timeout::<ReadStdout>(&r, t)?.data
        };
        if d.is_empty() {
            return Ok(out);
        }
        out.extend_from_slice(&d);
    }
}

/// Skips a test that needs root with a reason, or fails it when
/// `ENCLAVE_REQUIRE_PRIVILEGED=1` (set by CI and for root runs of scripts/test.sh).
#[allow(clippy::panic)] // failing the calling test is the point
pub fn skip_or_fail_privileged(test: &str, why: &str) {
    if std::env::var("ENCLAVE_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        panic!("{test}: cannot run and ENCLAVE_REQUIRE_PRIVILEGED=1: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// Runs `cmd` to its end: whether it succeeded, and its standard output then error.
#[allow(clippy::panic)] // a command that cannot even start fails the calling test
pub fn outcome(cmd: &mut std::process::Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Skips a test with a reason, or fails it when `ENCLAVE_REQUIRE_VM=1` (set by CI).
#[allow(clippy::panic)] // failing the calling test is the point
pub fn skip_or_fail(test: &str, why: &str) {
    if std::env::var("ENCLAVE_REQUIRE_VM").is_ok_and(|v| v == "1") {
        panic!("{test}: cannot run and ENCLAVE_REQUIRE_VM=1: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// A copy of a binary that an unprivileged uid can execute wherever the checkout lives (a
/// CI clone under a 0700 directory is out of reach of nobody): in a fresh 0755 directory
/// under the system's temporary directory, removed on drop.
pub struct RunnableCopy {
    /// The copy.
    pub path: PathBuf,
    dir: PathBuf,
}

impl RunnableCopy {
    /// Copies `bin`.
    pub fn of(bin: &Path) -> std::io::Result<RunnableCopy> {
        use std::os::unix::fs::PermissionsExt;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "enclave-bin-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let path = dir.join(bin.file_name().unwrap_or_default());
        std::fs::copy(bin, &path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(RunnableCopy { path, dir })
    }
}

impl Drop for RunnableCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
