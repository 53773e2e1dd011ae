//! Launches real guests for tests and benchmarks: QEMU (`-M microvm`) with the Enclave
//! guest image, `vhost-device-vsock` for the agent channel (hybrid vsock over a Unix
//! socket, the same scheme `enclave-vmm` and Firecracker use) and `virtiofsd` for the
//! shared filesystem. Everything runs under a private temporary directory and is killed
//! when the [`GuestVm`] is dropped.

pub mod vmm;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use enclave_agent_protocol::{connect_hybrid_vsock, Client, AGENT_VSOCK_PORT};

/// Host vsock port the agent announces its readiness on.
pub const READY_PORT: u32 = 1025;

/// The tools and image a guest needs, found on this machine.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `vhost-device-vsock`.
    pub vsock: PathBuf,
    /// `virtiofsd`.
    pub virtiofsd: PathBuf,
    /// The image directory (`target/guest`).
    pub image: PathBuf,
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let cache = std::env::var_os("ENCLAVE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/enclave")));
    if let Some(c) = cache {
        dirs.insert(0, c.join("tools/bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.push("/usr/libexec".into());
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

impl Tools {
    /// Finds everything, or says what is missing and how to get it.
    pub fn find() -> Result<Tools, String> {
        let need = |name: &str, how: &str| {
            find_tool(name)
                .ok_or_else(|| format!("{name} not found ({how}; scripts/setup.sh does it)"))
        };
        let image = std::env::var_os("ENCLAVE_GUEST_IMAGE")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target/guest"));
        for f in ["vmlinux", "initramfs.cpio", "cmdline"] {
            if !image.join(f).is_file() {
                return Err(format!(
                    "{} missing: build the image with guest/image/build.sh",
                    image.join(f).display()
                ));
            }
        }
        Ok(Tools {
            qemu: need("qemu-system-x86_64", "apt-get install qemu-system-x86")?,
            vsock: need(
                "vhost-device-vsock",
                "cargo install --locked vhost-device-vsock",
            )?,
            virtiofsd: need("virtiofsd", "cargo install --locked virtiofsd")?,
            image,
        })
    }
}

/// `kvm` when this host can run a Linux guest at full speed, else `tcg`, with the reason.
/// KVM through PVM (nested, kernel mode emulated) cannot boot a stock kernel, so it counts
/// as no KVM.
pub fn accel() -> (&'static str, String) {
    if !Path::new("/dev/kvm").exists() {
        return ("tcg", "no /dev/kvm".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return (
            "tcg",
            "/dev/kvm is kvm-pvm (nested; guest kernel code is emulated)".into(),
        );
    }
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hw {
        ("kvm", "/dev/kvm with hardware virtualization".into())
    } else {
        ("tcg", "/dev/kvm without vmx/svm".into())
    }
}

fn tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

/// A running guest.
pub struct GuestVm {
    dir: PathBuf,
    ready: Option<std::os::unix::net::UnixListener>,
    announced: std::sync::atomic::AtomicBool,
    children: Vec<(&'static str, Child)>,
    /// When QEMU was started.
    pub started: Instant,
    /// The accelerator in use.
    pub accel: &'static str,
}

/// How to boot.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Add a virtio-net device with this MAC (user-mode backend, `restrict=on`: no traffic
    /// leaves the VM).
    pub net_mac: Option<String>,
    /// Extra kernel command line.
    pub cmdline: String,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            memory_mib: 256,
            net_mac: None,
            cmdline: String::new(),
        }
    }
}

fn spawn(
    name: &'static str,
    cmd: &mut Command,
    log: &Path,
) -> Result<(&'static str, Child), String> {
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("start {name}: {e}"))?;
    Ok((name, child))
}

fn wait_for_socket(p: &Path, t: Duration) -> Result<(), String> {
    let deadline = Instant::now() + t;
    while !p.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} did not appear", p.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

impl GuestVm {
    /// Starts the backends and QEMU. The agent is not ready yet: see [`GuestVm::connect`].
    pub fn boot(tools: &Tools, opts: &VmOptions) -> Result<GuestVm, String> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("enclave-vm-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("shared"))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let (accel, _) = accel();
        let mut vm = GuestVm {
            dir: dir.clone(),
            children: Vec::new(),
            started: Instant::now(),
            accel,
            ready: None,
            announced: Default::default(),
        };
        let d = |f: &str| dir.join(f);
        vm.children.push(spawn(
            "vhost-device-vsock",
            Command::new(&tools.vsock)
                .arg("--guest-cid=3")
                .arg("--socket")
                .arg(d("vsock.sock"))
                .arg("--uds-path")
                .arg(d("vm.vsock")),
            &d("vsock.log"),
        )?);
        vm.children.push(spawn(
            "virtiofsd",
            Command::new(&tools.virtiofsd)
                .arg("--socket-path")
                .arg(d("fs.sock"))
                .arg("--shared-dir")
                .arg(d("shared"))
                .args(["--cache", "never", "--sandbox", "none"]),
            &d("virtiofsd.log"),
        )?);
        wait_for_socket(&d("vsock.sock"), Duration::from_secs(10))?;
        wait_for_socket(&d("fs.sock"), Duration::from_secs(10))?;
        let base =
            std::fs::read_to_string(tools.image.join("cmdline")).map_err(|e| e.to_string())?;
        // The agent announces itself on this host port (guest -> host vsock arrives on
        // `<uds-path>_<port>`); connecting only then avoids queueing connection requests
        // before the guest's vsock driver is up, which can wedge vhost-device-vsock.
        let ready = std::os::unix::net::UnixListener::bind(d(&format!("vm.vsock_{READY_PORT}")))
            .map_err(|e| format!("ready listener: {e}"))?;
        vm.ready = Some(ready);
        let mut cmdline = format!(
            "{} enclave.shared=shared enclave.ready_port={READY_PORT} {}",
            base.trim(),
            opts.cmdline
        );
        if accel == "tcg" {
            // PIT calibration of the TSC fails at random under TCG and the boot hangs.
            if let Some(khz) = tsc_khz() {
                cmdline += &format!(" tsc_early_khz={khz}");
            }
        }
        let mem = opts.memory_mib;
        let mut q = Command::new(&tools.qemu);
        q.args(["-M", "microvm,memory-backend=mem", "-accel", accel, "-cpu"])
            .arg(if accel == "kvm" { "host" } else { "max" })
            .args([
                "-m",
                &format!("{mem}M"),
                "-smp",
                "1",
                "-nodefaults",
                "-no-user-config",
            ])
            .args(["-display", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", d("console.log").display()))
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            ])
            .arg("-kernel")
            .arg(tools.image.join("vmlinux"))
            .arg("-initrd")
            .arg(tools.image.join("initramfs.cpio"))
            .args(["-append", &cmdline])
            .args([
                "-chardev",
                &format!("socket,id=vsock,path={}", d("vsock.sock").display()),
            ])
            .args(["-device", "vhost-user-vsock-device,chardev=vsock"])
            .args([
                "-chardev",
                &format!("socket,id=fs,path={}", d("fs.sock").display()),
            ])
            .args(["-device", "vhost-user-fs-device,chardev=fs,tag=shared"]);
        if let Some(mac) = &opts.net_mac {
            q.args(["-netdev", "user,id=n0,restrict=on"])
                .args(["-device", &format!("virtio-net-device,netdev=n0,mac={mac}")]);
        }
        vm.started = Instant::now();
        vm.children.push(spawn("qemu", &mut q, &d("qemu.log"))?);
        Ok(vm)
    }

    /// Connects to the agent, retrying until it listens or `timeout` passes, and does the
    /// version handshake.
    pub fn connect(&self, timeout: Duration) -> Result<Client, String> {
        let deadline = Instant::now() + timeout;
        self.wait_ready(deadline)?;
        let stream = connect_hybrid_vsock(&self.dir.join("vm.vsock"), AGENT_VSOCK_PORT, deadline)
            .map_err(|e| format!("{e}\n{}", self.logs()))?;
        let client = Client::new(stream).map_err(|e| e.to_string())?;
        client
            .handshake()
            .map_err(|e| format!("handshake: {e}\n{}", self.logs()))?;
        Ok(client)
    }

    /// Waits for the agent's readiness announcement (once; later calls return at once).
    fn wait_ready(&self, deadline: Instant) -> Result<(), String> {
        let Some(l) = &self.ready else { return Ok(()) };
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        // Checked on every turn: another thread may take the one announcement.
        while !self.announced.load(std::sync::atomic::Ordering::Acquire) {
            match l.accept() {
                Ok(_) => {
                    self.announced
                        .store(true, std::sync::atomic::Ordering::Release);
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("ready listener: {e}")),
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the agent did not announce itself\n{}",
                    self.logs()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// A raw connection to the agent's port (for sending garbage).
    pub fn connect_raw(&self, timeout: Duration) -> Result<std::os::unix::net::UnixStream, String> {
        connect_hybrid_vsock(
            &self.dir.join("vm.vsock"),
            AGENT_VSOCK_PORT,
            Instant::now() + timeout,
        )
        .map_err(|e| e.to_string())
    }

    /// The host directory the guest sees at /run/enclave/shared.
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }

    /// Waits for QEMU to exit.
    pub fn wait_qemu(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let q = self.children.iter_mut().find(|(n, _)| *n == "qemu")?;
            if let Ok(Some(st)) = q.1.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The guest console and backend logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for f in ["console.log", "qemu.log", "vsock.log", "virtiofsd.log"] {
            let text = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            s += &format!("--- {f} (last lines)\n");
            for l in tail.into_iter().rev() {
                s += l;
                s.push('\n');
            }
        }
        s
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        for (_, c) in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::env::var_os("ENCLAVE_KEEP_VM_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
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
        "yes", "grep",
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

/// Skips a test with a reason, or fails it when `ENCLAVE_REQUIRE_VM=1` (set by CI).
#[allow(clippy::panic)] // failing the calling test is the point
pub fn skip_or_fail(test: &str, why: &str) {
    if std::env::var("ENCLAVE_REQUIRE_VM").is_ok_and(|v| v == "1") {
        panic!("{test}: cannot run and ENCLAVE_REQUIRE_VM=1: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
}
