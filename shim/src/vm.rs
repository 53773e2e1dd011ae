//! The QEMU backend: QEMU (`-M microvm`) with the Enclave guest image,
//! `vhost-device-vsock` for the agent channel (hybrid vsock over a Unix socket, the same
//! scheme `enclave-vmm` and Firecracker use) and `virtiofsd` for the shared filesystem.
//! Everything runs under the VM's own directory and is killed when the [`GuestVm`] is
//! dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use enclave_agent_protocol::{connect_hybrid_vsock, Client, AGENT_VSOCK_PORT};

/// Host vsock port the agent announces its readiness on.
pub const READY_PORT: u32 = 1025;

/// `<vm dir>/vsock`: a link to the VM's vsock home ([`vsock_home`]), owned by the vsock
/// backend's unprivileged uid.
const VSOCK_DIR: &str = "vsock";
/// The hybrid vsock socket (host side of the guest's vsock), in the vsock home.
const VSOCK_UDS: &str = "vm.vsock";
/// vhost-device-vsock's vhost-user socket, which QEMU connects to, in the vsock home.
const VSOCK_BACKEND: &str = "backend.sock";
/// Where vsock homes live.
pub const VSOCK_ROOT: &str = "/run/enclave/vsock";

/// The directory of a VM's vsock sockets (and enclave-vmm's console log): short, because a
/// Unix socket path holds at most 107 bytes and the guest's connections to host port P
/// arrive on `<vm.vsock>_P`, while a CRI sandbox's VM directory alone is 90 bytes
/// (`/run/enclave/k8s.io/<64 hex digits>/vm`). `<vm dir>/vsock` links to it.
/// A shim's VM (`/run/enclave/<ns>/<id>/vm`) gets `/run/enclave/<ns>/vsock-<16 hex>`, beside
/// the pods of its namespace (so what a pod leaves behind shows in its namespace's
/// directory); any other VM directory `/run/enclave/vsock/<16 hex>`.
pub fn vsock_home(vm_dir: &Path) -> PathBuf {
    use sha2::Digest;
    let h = sha2::Sha256::digest(vm_dir.as_os_str().as_encoded_bytes());
    let hex: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
    let root = Path::new(crate::task::STATE_ROOT);
    match vm_dir
        .strip_prefix(root)
        .ok()
        .and_then(|rest| rest.components().next())
    {
        Some(ns) if vm_dir.ends_with("vm") => root.join(ns).join(format!("vsock-{hex}")),
        _ => Path::new(VSOCK_ROOT).join(hex),
    }
}
/// The empty directory QEMU chroots into once the guest is set up.
const QEMU_JAIL: &str = "jail";
/// enclave-vmm's console log, in the directory shared into its jail.
const VMM_CONSOLE: &str = "console.log";
/// Where enclave-jailer builds enclave-vmm's jail (`<dir>/vmm-jail/<id>/root`).
const VMM_JAIL_BASE: &str = "vmm-jail";

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

/// Where the pod's helper binaries live on a node (scripts/setup.sh installs them there).
pub const TOOLS_DIR: &str = "/usr/local/lib/enclave/bin";

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
    // Where scripts/setup.sh installs the helpers on a node: reachable by the unprivileged
    // uid they run as (a build cache under /root is not).
    dirs.insert(0, TOOLS_DIR.into());
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.push("/usr/libexec".into());
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

impl Tools {
    /// Finds the tools, with the guest image in `image` (`ENCLAVE_GUEST_IMAGE` overrides
    /// it), or says what is missing and how to get it.
    pub fn find(image: PathBuf) -> Result<Tools, String> {
        let need = |name: &str, how: &str| {
            find_tool(name)
                .ok_or_else(|| format!("{name} not found ({how}; scripts/setup.sh does it)"))
        };
        let image = std::env::var_os("ENCLAVE_GUEST_IMAGE")
            .map(PathBuf::from)
            .unwrap_or(image);
        for f in ["vmlinux", "initramfs.cpio", "cmdline"] {
            if !image.join(f).is_file() {
                return Err(format!(
                    "{} missing: build the image with guest/image/build.sh",
                    image.join(f).display()
                ));
            }
        }
        let vsock = need(
            "vhost-device-vsock",
            "cargo install --locked vhost-device-vsock",
        )?;
        if crate::confine::can_confine() && !crate::confine::reachable_by_others(&vsock) {
            return Err(format!(
                "{} cannot be run by the unprivileged uid the vsock backend drops to (a directory on its path is closed to others): install it in {TOOLS_DIR} (scripts/setup.sh does)",
                vsock.display()
            ));
        }
        Ok(Tools {
            qemu: need("qemu-system-x86_64", "apt-get install qemu-system-x86")?,
            vsock,
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

/// The host TSC frequency in kHz, from /proc/cpuinfo, for `tsc_early_khz=` under TCG.
pub fn tsc_khz() -> Option<u64> {
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

/// Makes `fd` the child's fd 3, without close-on-exec, and with `new_session` also puts the
/// child in a session of its own. (dup2 clears close-on-exec, but does nothing when `fd`
/// already is 3; then fcntl does.)
pub fn pass_as_fd3(cmd: &mut Command, fd: std::os::fd::RawFd, new_session: bool) {
    // SAFETY: between fork and exec only async-signal-safe calls (dup2/fcntl, setsid) on
    // descriptors the parent keeps open until the child has execed.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 || (new_session && libc::setsid() < 0) {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// QEMU's command line for the guest image.
fn qemu_command(
    tools: &Tools,
    opts: &VmOptions,
    accel: &str,
    cmdline: &str,
    dir: &Path,
) -> Command {
    let d = |f: &str| dir.join(f);
    let mem = opts.memory_mib;
    let mut q = Command::new(&tools.qemu);
    q.args(["-M", "microvm,memory-backend=mem", "-accel", accel, "-cpu"])
        .arg(if accel == "kvm" { "host" } else { "max" })
        .args([
            "-m",
            &format!("{mem}M"),
            "-smp",
            &opts.vcpus.max(1).to_string(),
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-no-reboot"])
        // seccomp on every thread (QEMU installs it with TSYNC): no obsolete syscalls, no
        // fork/exec, no scheduler or resource changes. set*id stays allowed: QEMU 7.2
        // installs the filter before `-runas` drops (with `deny` it kills itself at its
        // own setgid); once dropped to nobody with no capabilities and no_new_privs, set*id
        // cannot raise anything.
        .args([
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
        ])
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
        .args(["-append", cmdline])
        .args([
            "-chardev",
            &format!(
                "socket,id=vsock,path={}",
                vsock_home(dir).join(VSOCK_BACKEND).display()
            ),
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
    if crate::confine::can_confine() {
        // Everything QEMU opens (kernel, initrd, memfd, sockets, console) is opened before
        // the guest runs; then it chroots into an empty directory and drops to nobody. Its
        // own network, IPC, UTS and mount namespaces: it speaks only through Unix sockets
        // and inherited descriptors.
        let (uid, gid) = crate::confine::HELPER_ID;
        q.arg("-chroot")
            .arg(d(QEMU_JAIL))
            .args(["-runas", &format!("{uid}:{gid}")]);
        crate::confine::own_namespaces(&mut q, crate::confine::HELPER_NAMESPACES);
    }
    match opts.net.as_ref().map(|n| (&n.backend, &n.mac)) {
        Some((NetBackend::Netd { .. }, mac)) => {
            q.args([
                "-chardev",
                &format!("socket,id=net0,path={}", d("net.sock").display()),
            ])
            .args(["-netdev", "vhost-user,id=pod0,chardev=net0"])
            .args([
                "-device",
                &format!("virtio-net-device,netdev=pod0,mac={mac}"),
            ]);
        }
        Some((NetBackend::UnfilteredTapForBenchmark { tap, offloads }, mac)) => {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&**tap);
            let features = if *offloads {
                ""
            } else {
                ",csum=off,guest_csum=off,host_tso4=off,host_tso6=off,host_ufo=off,guest_tso4=off,guest_tso6=off,guest_ufo=off,mrg_rxbuf=off"
            };
            q.args(["-netdev", "tap,id=pod0,fd=3,vhost=off"]).args([
                "-device",
                &format!("virtio-net-device,netdev=pod0,mac={mac}{features}"),
            ]);
            pass_as_fd3(&mut q, fd, false);
        }
        None => {}
    }
    q
}

/// enclave-vmm's config for the guest image: the same devices (vsock on `vm.vsock`, the
/// shared directory through virtiofsd), described in ACPI.
pub fn enclave_vmm_config(
    tools: &Tools,
    opts: &VmOptions,
    cmdline: &str,
    dir: &Path,
) -> serde_json::Value {
    let d = |f: &str| dir.join(f);
    serde_json::json!({
        "kernel": tools.image.join("vmlinux"),
        "initrd": tools.image.join("initramfs.cpio"),
        "vcpus": opts.vcpus.max(1),
        "memory_mib": opts.memory_mib,
        "cmdline": cmdline,
        // Always ACPI: on the hardware-reduced platform enclave-vmm declares, Linux maps an
        // interrupt only for a device the DSDT describes, so a device declared on the
        // command line alone gets none (seen with the purpose-built kernel).
        "device_discovery": "acpi",
        "serial": {"path": vsock_home(dir).join(VMM_CONSOLE)},
        "vsock": {"cid": 3, "uds_path": vsock_home(dir).join(VSOCK_UDS)},
        "fs": [{"socket": d("fs.sock"), "tag": "shared"}],
        "net": opts.net.iter().filter(|n| matches!(n.backend, NetBackend::Netd { .. })).map(|n| serde_json::json!({"socket": d("net.sock"), "mac": n.mac})).collect::<Vec<_>>(),
    })
}

/// enclave-vmm through enclave-jailer (found next to it): as nobody, PID 1 of its own PID
/// namespace, in its own mount, IPC, UTS and (empty) network namespaces, `pivot_root`ed
/// into `<dir>/vmm-jail/<id>/root` holding only itself, the kernel and initrd (linked or
/// bind-mounted read-only), `/dev/kvm` and the backend sockets; the vsock socket and the
/// console log stay in `<dir>/vsock`, shared into the jail. The jailer waits for the VMM
/// (which dies with it) and removes the jail.
fn jailed_vmm(binary: &Path, dir: &Path, n: u32) -> Result<Command, String> {
    let jailer = binary.with_file_name("enclave-jailer");
    if !jailer.exists() {
        return Err(format!(
            "{} not found: enclave-vmm runs only through its jailer when the shim can confine",
            jailer.display()
        ));
    }
    let (uid, gid) = crate::confine::HELPER_ID;
    let mut c = Command::new(jailer);
    c.arg("--id")
        .arg(format!("vm-{}-{n}", std::process::id()))
        .arg("--exec")
        .arg(binary)
        .arg("--config")
        .arg(dir.join("vm.json"))
        .args(["--uid", &uid.to_string(), "--gid", &gid.to_string()])
        .arg("--base")
        .arg(dir.join(VMM_JAIL_BASE))
        .arg("--share")
        .arg(vsock_home(dir))
        .args(["--netns", "new", "--cleanup"]);
    Ok(c)
}

/// A running guest.
pub struct GuestVm {
    dir: PathBuf,
    shared: PathBuf,
    ready: Option<std::os::unix::net::UnixListener>,
    announced: std::sync::atomic::AtomicBool,
    /// Whether the shared directory was made a shared mount (undone on drop).
    shared_mount: bool,
    children: Vec<(&'static str, Child)>,
    /// When QEMU was started.
    pub started: Instant,
    /// The accelerator in use.
    pub accel: &'static str,
}

/// Which VMM runs the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// QEMU `-M microvm` with vhost-device-vsock for the agent channel; `accel` is `kvm` or
    /// `tcg` (None: [`accel`] decides).
    Qemu {
        /// The accelerator.
        accel: Option<&'static str>,
    },
    /// enclave-vmm (its own vsock device), this binary. Needs a host that runs Linux guests on
    /// KVM and a guest kernel that takes virtio-mmio devices from the command line.
    EnclaveVmm {
        /// Path of enclave-vmm.
        binary: PathBuf,
    },
}

/// What serves the guest's NIC: always enclave-netd, the vhost-user net backend that owns
/// a tap in the pod's network namespace and decides every frame (for QEMU and enclave-vmm
/// alike; there is no other path for the guest's traffic).
#[derive(Debug, Clone)]
pub enum NetBackend {
    /// enclave-netd.
    Netd {
        /// The enclave-netd binary.
        netd: PathBuf,
        /// The pod's network namespace file.
        netns: PathBuf,
        /// The tap in it.
        tap: String,
        /// Further arguments: the pod, policy, registry, audit log, control socket, user.
        args: Vec<std::ffi::OsString>,
    },
    /// QEMU's own virtio-net on a tap, with no policy and no netd: the baseline of the pod
    /// network benchmark (tests/benches/pod_net.rs). The shim never builds this variant.
    UnfilteredTapForBenchmark {
        /// The tap.
        tap: std::sync::Arc<std::fs::File>,
        /// Offer QEMU's offloads (checksum, TSO, mergeable buffers) to the guest; off gives
        /// the feature set enclave-netd offers.
        offloads: bool,
    },
}

/// The pod network device.
#[derive(Debug, Clone)]
pub struct NetOptions {
    /// Its backend.
    pub backend: NetBackend,
    /// The guest NIC's MAC.
    pub mac: String,
}

/// How to boot.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// The pod network device (vhost-user, served by enclave-netd).
    pub net: Option<NetOptions>,
    /// The VMM.
    pub backend: Backend,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Add a virtio-net device with this MAC (user-mode backend, `restrict=on`: no traffic
    /// leaves the VM).
    pub net_mac: Option<String>,
    /// Extra kernel command line.
    pub cmdline: String,
    /// The VM's own directory (sockets, logs); default: a fresh one under the temp dir,
    /// removed when the VM is dropped.
    pub dir: Option<PathBuf>,
    /// The host directory shared with the guest (at /run/enclave/shared); default
    /// `<dir>/shared`.
    pub shared: Option<PathBuf>,
    /// The caller has already made `shared` a shared mount and removes it itself (the
    /// shim, which mounts the first container's root filesystem there before the VM
    /// boots); otherwise a confined boot makes it one and the drop removes it.
    pub shared_mount_ready: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            net: None,
            backend: Backend::Qemu { accel: None },
            vcpus: 1,
            memory_mib: 256,
            net_mac: None,
            cmdline: String::new(),
            dir: None,
            shared: None,
            shared_mount_ready: false,
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
        let dir = opts.dir.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("enclave-vm-{}-{n}", std::process::id()))
        });
        let _ = std::fs::remove_dir_all(&dir);
        let shared = opts.shared.clone().unwrap_or_else(|| dir.join("shared"));
        for d in [&dir, &shared] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let accel = match &opts.backend {
            Backend::Qemu { accel: Some(a) } => *a,
            Backend::Qemu { accel: None } => accel().0,
            Backend::EnclaveVmm { .. } => "kvm",
        };
        let mut vm = GuestVm {
            dir: dir.clone(),
            shared: shared.clone(),
            children: Vec::new(),
            started: Instant::now(),
            accel,
            ready: None,
            announced: Default::default(),
            shared_mount: false,
        };
        let d = |f: &str| dir.join(f);
        let qemu = matches!(opts.backend, Backend::Qemu { .. });
        let confine = crate::confine::can_confine();
        std::fs::create_dir_all(d(QEMU_JAIL))
            .map_err(|e| format!("{}: {e}", d(QEMU_JAIL).display()))?;
        let home = vsock_home(&dir);
        let _ = std::fs::remove_dir_all(&home);
        std::fs::create_dir_all(&home).map_err(|e| format!("{}: {e}", home.display()))?;
        let _ = std::fs::remove_file(d(VSOCK_DIR));
        std::os::unix::fs::symlink(&home, d(VSOCK_DIR))
            .map_err(|e| format!("{}: {e}", d(VSOCK_DIR).display()))?;
        if confine && !qemu {
            // The jailed enclave-vmm (nobody) creates its vsock socket and console log in
            // the directory shared into its jail.
            crate::confine::chown(&home, crate::confine::HELPER_ID)?;
        }
        if qemu {
            // enclave-vmm has its own vsock device; QEMU gets it from a vhost-user backend,
            // which runs as nobody, in namespaces of its own, in a directory it owns.
            let mut c = Command::new(&tools.vsock);
            c.arg("--guest-cid=3")
                .arg("--socket")
                .arg(home.join(VSOCK_BACKEND))
                .arg("--uds-path")
                .arg(home.join(VSOCK_UDS));
            if confine {
                crate::confine::chown(&home, crate::confine::HELPER_ID)?;
                crate::confine::own_namespaces(&mut c, crate::confine::HELPER_NAMESPACES);
                crate::confine::drop_to(&mut c, crate::confine::HELPER_ID);
                crate::confine::seccomp_before_exec(
                    &mut c,
                    crate::confine::vsock_backend_filter()?,
                );
            }
            vm.children
                .push(spawn("vhost-device-vsock", &mut c, &d("vsock.log"))?);
        }
        // virtiofsd serves the containers' root filesystems, owned by many uids, and must
        // create files as the guest asks: it stays uid 0 with its own reduced capability
        // set and seccomp filter (kill), chrooted into the shared directory, in mount,
        // network, IPC and UTS namespaces of its own. Its mount namespace is a copy in which
        // the shared directory (a shared mount) is a peer of the shim's, so root filesystems
        // mounted there later reach it. (Its `namespace` sandbox would add a PID namespace,
        // but pivots into a clone of the directory that receives no later mounts.)
        let mut fs = Command::new(&tools.virtiofsd);
        fs.arg("--socket-path")
            .arg(d("fs.sock"))
            .arg("--shared-dir")
            .arg(&shared)
            .args(["--cache", "never"]);
        if confine {
            if !opts.shared_mount_ready {
                crate::confine::make_shared_mount(&shared)?;
                vm.shared_mount = true;
            }
            crate::confine::own_namespaces(&mut fs, crate::confine::HELPER_NAMESPACES);
            // DAC_READ_SEARCH serves only file handles (open_by_handle_at, which reads any
            // file of the host's file system by handle); inodes are held as O_PATH
            // descriptors instead.
            fs.args([
                "--sandbox",
                "chroot",
                "--seccomp",
                "kill",
                "--inode-file-handles=never",
                "--modcaps=-dac_read_search",
            ]);
        } else {
            fs.args(["--sandbox", "none"]);
        }
        vm.children
            .push(spawn("virtiofsd", &mut fs, &d("virtiofsd.log"))?);
        if let Some(NetOptions {
            backend:
                NetBackend::Netd {
                    netd,
                    netns,
                    tap,
                    args,
                },
            ..
        }) = &opts.net
        {
            vm.children.push(spawn(
                "enclave-netd",
                Command::new(netd)
                    .arg("--socket")
                    .arg(d("net.sock"))
                    .args(["--tap", tap])
                    .arg("--netns")
                    .arg(netns)
                    .args(args),
                &d("netd.log"),
            )?);
            wait_for_socket(&d("net.sock"), Duration::from_secs(10))?;
        }
        if qemu {
            wait_for_socket(&home.join(VSOCK_BACKEND), Duration::from_secs(10))?;
        }
        wait_for_socket(&d("fs.sock"), Duration::from_secs(10))?;
        if confine && !qemu {
            // The jailed VMM connects to its backends as nobody (QEMU connects before it
            // drops to nobody).
            crate::confine::chown(&d("fs.sock"), crate::confine::HELPER_ID)?;
            if opts.net.is_some() {
                crate::confine::chown(&d("net.sock"), crate::confine::HELPER_ID)?;
            }
        }
        let base =
            std::fs::read_to_string(tools.image.join("cmdline")).map_err(|e| e.to_string())?;
        // The agent announces itself on this host port (guest -> host vsock arrives on
        // `<uds-path>_<port>`); connecting only then avoids queueing connection requests
        // before the guest's vsock driver is up, which can wedge vhost-device-vsock.
        let ready_path = home.join(format!("{VSOCK_UDS}_{READY_PORT}"));
        let ready = std::os::unix::net::UnixListener::bind(&ready_path)
            .map_err(|e| format!("ready listener: {e}"))?;
        if confine {
            // The vsock backend (QEMU's vhost-device-vsock, or the jailed enclave-vmm), both
            // nobody, connects here when the agent announces itself.
            crate::confine::chown(&ready_path, crate::confine::HELPER_ID)?;
        }
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
        vm.started = Instant::now();
        match &opts.backend {
            Backend::Qemu { .. } => {
                let mut q = qemu_command(tools, opts, accel, &cmdline, &dir);
                vm.children.push(spawn("qemu", &mut q, &d("qemu.log"))?);
            }
            Backend::EnclaveVmm { binary } => {
                let cfg = enclave_vmm_config(tools, opts, &cmdline, &dir);
                std::fs::write(d("vm.json"), cfg.to_string())
                    .map_err(|e| format!("{}: {e}", d("vm.json").display()))?;
                let mut c = if confine {
                    jailed_vmm(binary, &dir, n)?
                } else {
                    let mut c = Command::new(binary);
                    c.arg("--config").arg(d("vm.json"));
                    c
                };
                vm.children
                    .push(spawn("enclave-vmm", &mut c, &d("vmm.log"))?);
            }
        }
        Ok(vm)
    }

    /// Connects to the agent, retrying until it listens or `timeout` passes, and does the
    /// version handshake.
    pub fn connect(&self, timeout: Duration) -> Result<Client, String> {
        let deadline = Instant::now() + timeout;
        self.wait_ready(deadline)?;
        let stream = connect_hybrid_vsock(
            &vsock_home(&self.dir).join(VSOCK_UDS),
            AGENT_VSOCK_PORT,
            deadline,
        )
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
            &vsock_home(&self.dir).join(VSOCK_UDS),
            AGENT_VSOCK_PORT,
            Instant::now() + timeout,
        )
        .map_err(|e| e.to_string())
    }

    /// The host directory the guest sees at /run/enclave/shared.
    pub fn shared_dir(&self) -> PathBuf {
        self.shared.clone()
    }

    /// The VM's directory (sockets and logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Process ids of QEMU and its backends.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.children.iter().map(|(n, c)| (*n, c.id())).collect()
    }

    /// Waits for QEMU to exit.
    pub fn wait_qemu(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let q = self
                .children
                .iter_mut()
                .find(|(n, _)| *n == "qemu" || *n == "enclave-vmm")?;
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
        for f in [
            "console.log",
            "vsock/console.log",
            "qemu.log",
            "vmm.log",
            "vsock.log",
            "virtiofsd.log",
            "netd.log",
        ] {
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
        if self.shared_mount {
            crate::confine::remove_shared_mount(&self.shared);
        }
        if std::env::var_os("ENCLAVE_KEEP_VM_DIR")
            .filter(|v| !v.is_empty())
            .is_none()
        {
            let _ = std::fs::remove_dir_all(vsock_home(&self.dir));
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
