//! PID 1: bring the guest up, then serve the agent protocol on vsock.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::Arc;

use enclave_agent_protocol::server::{self, Ended};
use enclave_agent_protocol::AGENT_VSOCK_PORT;

use crate::container::CGROUP_ROOT;
use crate::reaper::{self, Reaper};
use crate::service::{Agent, SHARED_DIR};
use crate::sys::{self, mount, Result};
use crate::{log, net};

/// The file listing the modules to load, in order, one path per line.
pub const MODULE_LIST: &str = "/etc/enclave/modules";

/// Runs PID 1. Never returns: the guest ends by powering off.
pub fn run() -> ! {
    if std::env::var_os("ENCLAVE_STAGE2").is_none() {
        // Only returns on failure; containers then cannot pivot_root, so say so loudly.
        let e = move_root_to_tmpfs();
        log!("cannot move the root to tmpfs, containers will fail to start: {e:?}");
    }
    reaper::block_sigchld();
    mount_basics();
    let cmd = sys::cmdline();
    let param = |k: &str| cmd.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let hostname = param("enclave.hostname").unwrap_or_else(|| "enclave".into());
    // SAFETY: the pointer and length describe `hostname`.
    unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) };
    load_modules(&cmd);
    if let Some(tag) = param("enclave.shared") {
        let _ = sys::mkdir_p(Path::new(SHARED_DIR));
        match mount(
            Some(&tag),
            Path::new(SHARED_DIR),
            Some("virtiofs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            None,
        ) {
            Ok(()) => log!("shared filesystem {tag:?} mounted on {SHARED_DIR}"),
            Err(e) => log!("{e}"),
        }
    }
    setup_cgroups();
    if let Err(e) = net::link_up("lo") {
        log!("loopback: {e}");
    }
    let reaper = Arc::new(Reaper::default());
    let r = reaper.clone();
    if let Err(e) = std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || r.run())
    {
        log!("cannot start the reaper: {e}");
    }
    let agent = Arc::new(Agent::new(
        reaper,
        param("enclave.debug").is_some_and(|v| v == "1"),
    ));
    match listen_vsock(AGENT_VSOCK_PORT) {
        Ok(fd) => {
            log!("ready: serving the agent protocol on vsock port {AGENT_VSOCK_PORT}");
            if let Some(port) = param("enclave.ready_port").and_then(|p| p.parse().ok()) {
                let _ = std::thread::Builder::new()
                    .name("ready".into())
                    .spawn(move || announce_ready(port));
            }
            accept_loop(fd, agent)
        }
        Err(e) => {
            log!("{e}; powering off");
            power_off()
        }
    }
}

fn move_root_to_tmpfs() -> Result<std::convert::Infallible> {
    let new = Path::new("/.root");
    sys::mkdir_p(new)?;
    mount(Some("rootfs"), new, Some("tmpfs"), 0, Some("mode=0755"))?;
    for entry in std::fs::read_dir("/").map_err(|e| format!("read /: {e}"))? {
        let entry = entry.map_err(|e| format!("read /: {e}"))?;
        let name = entry.file_name();
        if name == ".root" {
            continue;
        }
        copy_tree(&entry.path(), &new.join(&name))?;
        // Free the initramfs copy as we go (as switch_root does).
        let _ = if entry.path().is_dir() && !entry.path().is_symlink() {
            std::fs::remove_dir_all(entry.path())
        } else {
            std::fs::remove_file(entry.path())
        };
    }
    std::env::set_current_dir(new).map_err(|e| format!("chdir: {e}"))?;
    mount(Some("."), Path::new("/"), None, libc::MS_MOVE, None)?;
    let dot = sys::cstr(".", "path")?;
    // SAFETY: chroot on a valid C string.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(sys::os_err("chroot"));
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir: {e}"))?;
    let init = sys::cstr("/init", "path")?;
    let argv = [init.as_ptr(), std::ptr::null()];
    let env = sys::cstr("ENCLAVE_STAGE2=1", "env")?;
    let envp = [env.as_ptr(), std::ptr::null()];
    // SAFETY: null-terminated arrays of valid C strings that outlive the call.
    unsafe { libc::execve(init.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Err(sys::os_err("exec /init"))
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md =
        std::fs::symlink_metadata(from).map_err(|e| format!("stat {}: {e}", from.display()))?;
    let ft = md.file_type();
    if ft.is_dir() {
        std::fs::create_dir_all(to).map_err(|e| format!("mkdir {}: {e}", to.display()))?;
        for e in std::fs::read_dir(from).map_err(|e| format!("read {}: {e}", from.display()))? {
            let e = e.map_err(|e| format!("read {}: {e}", from.display()))?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
    } else if ft.is_symlink() {
        let t =
            std::fs::read_link(from).map_err(|e| format!("readlink {}: {e}", from.display()))?;
        std::os::unix::fs::symlink(t, to).map_err(|e| format!("symlink {}: {e}", to.display()))?;
    } else if ft.is_char_device() || ft.is_block_device() {
        let p = sys::cstr(to.as_os_str(), "path")?;
        // SAFETY: mknod on a valid C string with the source's mode and device number.
        if unsafe { libc::mknod(p.as_ptr(), md.mode(), md.rdev()) } != 0 {
            return Err(sys::os_err(format_args!("mknod {}", to.display())));
        }
    } else {
        std::fs::copy(from, to).map_err(|e| format!("copy {}: {e}", from.display()))?;
    }
    Ok(())
}

fn mount_basics() {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mounts: &[(&str, &str, &str, libc::c_ulong, Option<&str>)] = &[
        ("proc", "/proc", "proc", nosuid, None),
        ("sysfs", "/sys", "sysfs", nosuid, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            libc::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("mode=0620,ptmxmode=0666"),
        ),
        (
            "shm",
            "/dev/shm",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "run",
            "/run",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmp",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        ),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, None),
    ];
    for (src, dst, kind, flags, data) in mounts {
        let _ = sys::mkdir_p(Path::new(dst));
        if let Err(e) = mount(Some(src), Path::new(dst), Some(kind), *flags, *data) {
            log!("{e}");
        }
    }
    let _ = sys::mkdir_p(Path::new("/etc"));
    let _ = std::fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
}

fn load_modules(cmd: &[(String, String)]) {
    let Ok(list) = std::fs::read_to_string(MODULE_LIST) else {
        log!("no {MODULE_LIST}; loading no modules");
        return;
    };
    for path in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let name = Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
            .unwrap_or(path)
            .replace('-', "_");
        let params: Vec<String> = cmd
            .iter()
            .filter_map(|(k, v)| {
                let (m, p) = k.split_once('.')?;
                (m.replace('-', "_") == name).then(|| format!("{p}={v}"))
            })
            .collect();
        match finit_module(path, &params.join(" ")) {
            Ok(()) => {}
            Err(e) => log!("module {name}: {e}"),
        }
    }
}

fn finit_module(path: &str, params: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = File::open(path).map_err(|e| format!("open {path}: {e}"))?;
    let p = sys::cstr(params, "module parameters")?;
    // SAFETY: finit_module reads the open module fd and a valid C string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), p.as_ptr(), 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
        return Err(sys::os_err(format_args!("load {path}")));
    }
    Ok(())
}

fn setup_cgroups() {
    for dir in ["/sys/fs/cgroup", CGROUP_ROOT] {
        let _ = sys::mkdir_p(Path::new(dir));
        for c in ["+cpu", "+memory", "+pids"] {
            if let Err(e) = std::fs::write(Path::new(dir).join("cgroup.subtree_control"), c) {
                log!("enable {c} in {dir}: {e}");
            }
        }
    }
}

/// A vsock stream socket and the address `cid:port`.
fn vsock(cid: u32, port: u32) -> Result<(File, libc::sockaddr_vm)> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(sys::os_err("vsock socket"));
    }
    // SAFETY: fd was just created and is owned here.
    let sock = unsafe { File::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    Ok((sock, addr))
}

const SOCKADDR_VM_LEN: libc::socklen_t =
    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn listen_vsock(port: u32) -> Result<File> {
    use std::os::fd::AsRawFd;
    let (sock, addr) = vsock(libc::VMADDR_CID_ANY, port)?;
    let fd = sock.as_raw_fd();
    // SAFETY: addr is a valid sockaddr_vm of the length given.
    if unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            SOCKADDR_VM_LEN,
        )
    } != 0
    {
        return Err(sys::os_err(format_args!("bind vsock port {port}")));
    }
    // SAFETY: listen on our socket.
    if unsafe { libc::listen(fd, 64) } != 0 {
        return Err(sys::os_err("listen on vsock"));
    }
    Ok(sock)
}

/// Tells the host the agent listens: connects to host (CID 2) port `port` and sends
/// `READY <version>\n`. A host that connects only after this never queues connection
/// requests before the guest's vsock driver is up (which some vsock backends handle badly).
fn announce_ready(port: u32) {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    for _ in 0..50 {
        let Ok((mut sock, addr)) = vsock(libc::VMADDR_CID_HOST, port) else {
            break;
        };
        let fd = sock.as_raw_fd();
        // SAFETY: addr is a valid sockaddr_vm of the length given.
        if unsafe {
            libc::connect(
                fd,
                (&addr as *const libc::sockaddr_vm).cast(),
                SOCKADDR_VM_LEN,
            )
        } == 0
        {
            let _ = writeln!(sock, "READY {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    log!("could not announce readiness on host vsock port {port}");
}

fn accept_loop(listener: File, agent: Arc<Agent>) -> ! {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: accept4 with null address pointers on our listening socket.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            std::thread::sleep(std::time::Duration::from_millis(10));
            continue;
        }
        // SAFETY: accept4 returned a new fd that nobody else owns.
        let conn = unsafe { File::from_raw_fd(fd) };
        let Ok(writer) = conn.try_clone() else {
            continue;
        };
        let agent = agent.clone();
        let _ = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || match server::serve(conn, writer, agent) {
                Ended::Garbage(why) => log!("dropped a connection: {why}"),
                Ended::Closed(_) => {}
            });
    }
}

/// Syncs and powers the VM off (falls back to a reboot, which microVM monitors treat as
/// the end of the VM).
pub fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        let _ = sys::umount2(Path::new(SHARED_DIR), libc::MNT_DETACH);
        libc::reboot(libc::RB_POWER_OFF);
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
