//! The helper modes. The agent is multithreaded, and entering namespaces (`setns` into a
//! mount namespace) or becoming PID 1 of a new PID namespace needs a single-threaded
//! process, so the agent re-executes itself as a helper for each container and exec:
//!
//! - `__container-init CONFIG`: started with new mount, UTS, IPC and PID (for children)
//!   namespaces; clones the container process (PID 1 of the new PID namespace) as a child
//!   of the agent, reports its pid and exits. The child builds the root filesystem,
//!   reports `ready`, waits for the start byte, then drops privileges and execs.
//! - `__exec CONFIG`: joins the namespaces and cgroup of a running container, clones the
//!   process as a child of the agent, reports its pid and exits.
//!
//! Fd 3 is the status pipe back to the agent (`pid N`, `ready`, `error: ...`; it closes on
//! a successful exec), fd 4 the start pipe. Both are close-on-exec in the container.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use crate::spec::{self, ExecConfig, InitConfig, Mount, Process};
use crate::sys::{self, cstr, mount, os_err, Result};

/// Status pipe fd in the helpers.
pub const STATUS_FD: libc::c_int = 3;
/// Start pipe fd in `__container-init`.
pub const START_FD: libc::c_int = 4;

fn fail(msg: &str) -> ! {
    sys::write_fd(
        STATUS_FD,
        format!("error: {}\n", msg.replace('\n', " ")).as_bytes(),
    );
    std::process::exit(127)
}

fn parse<T: serde::de::DeserializeOwned>(arg: Option<&String>) -> T {
    let Some(arg) = arg else {
        fail("helper started without a configuration")
    };
    serde_json::from_str(arg).unwrap_or_else(|e| fail(&format!("helper configuration: {e}")))
}

fn unblock_signals() {
    // SAFETY: an empty set is valid input and sigprocmask has no other memory effects.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// `__container-init`.
pub fn container_init_helper(arg: Option<&String>) -> ! {
    sys::set_cloexec(STATUS_FD);
    sys::set_cloexec(START_FD);
    unblock_signals();
    let cfg: InitConfig = parse(arg);
    clone_child(|| match setup_container(&cfg) {
        Ok(()) => finish_process(&cfg.process, cfg.cap_last_cap),
        Err(e) => e,
    })
}

/// `__exec`.
pub fn exec_helper(arg: Option<&String>) -> ! {
    sys::set_cloexec(STATUS_FD);
    unblock_signals();
    let cfg: ExecConfig = parse(arg);
    if let Err(e) = join_container(&cfg) {
        fail(&e)
    }
    clone_child(|| finish_process(&cfg.process, cfg.cap_last_cap))
}

/// Clones the container process as a child of the agent: the child runs `child` (which
/// returns only with why it failed), the helper reports the child's pid and exits.
fn clone_child(child: impl FnOnce() -> String) -> ! {
    match sys::clone_parent() {
        Err(e) => fail(&e),
        Ok(0) => fail(&child()),
        Ok(pid) => {
            sys::write_fd(STATUS_FD, format!("pid {pid}\n").as_bytes());
            std::process::exit(0)
        }
    }
}

fn join_cgroup(dir: &str) -> Result<()> {
    let p = Path::new(dir).join("cgroup.procs");
    std::fs::write(&p, b"0\n").map_err(|e| format!("join cgroup {}: {e}", p.display()))
}

fn join_container(cfg: &ExecConfig) -> Result<()> {
    // Open every namespace first: after joining the mount namespace, /proc is the
    // container's (or absent).
    let mut fds = Vec::new();
    for ns in ["ipc", "uts", "pid", "mnt"] {
        let p = format!("/proc/{}/ns/{ns}", cfg.init_pid);
        let f = std::fs::File::open(&p).map_err(|e| format!("open {p}: {e}"))?;
        fds.push((ns, f));
    }
    join_cgroup(&cfg.cgroup)?;
    for (ns, f) in &fds {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on an open namespace fd; no memory effects.
        if unsafe { libc::setns(f.as_raw_fd(), 0) } != 0 {
            return Err(os_err(format_args!(
                "join {ns} namespace of pid {}",
                cfg.init_pid
            )));
        }
    }
    Ok(())
}

/// Resolves a container path under `root` refusing symlinks on the way, so a hostile
/// image cannot point a mount outside its root.
fn under_root(root: &Path, p: &str) -> Result<PathBuf> {
    spec::check_container_path("mount destination", p)?;
    let mut cur = root.to_path_buf();
    for c in p.split('/').filter(|c| !c.is_empty() && *c != ".") {
        cur.push(c);
        if let Ok(m) = std::fs::symlink_metadata(&cur) {
            if m.file_type().is_symlink() {
                return Err(format!(
                    "{p}: {} is a symlink; refusing to mount through it",
                    cur.display()
                ));
            }
        }
    }
    Ok(cur)
}

fn mount_flags(opts: &[String]) -> (libc::c_ulong, bool, Vec<String>) {
    let (mut flags, mut bind, mut data) = (0, false, Vec::new());
    for o in opts {
        match o.as_str() {
            "ro" => flags |= libc::MS_RDONLY,
            "rw" => {}
            "nosuid" => flags |= libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            "relatime" => flags |= libc::MS_RELATIME,
            "strictatime" => flags |= libc::MS_STRICTATIME,
            "noatime" => flags |= libc::MS_NOATIME,
            "bind" => bind = true,
            "rbind" => {
                bind = true;
                flags |= libc::MS_REC;
            }
            "private" | "rprivate" | "slave" | "rslave" | "shared" | "rshared" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, bind, data)
}

fn do_mount(root: &Path, m: &Mount) -> Result<()> {
    let dest = under_root(root, &m.destination)?;
    let (flags, bind_opt, data) = mount_flags(&m.options);
    let kind = m.kind.as_deref().unwrap_or("none");
    let bind = bind_opt || kind == "bind";
    if bind {
        let src = m
            .source
            .as_deref()
            .ok_or_else(|| format!("mount {}: bind without source", m.destination))?;
        let is_dir = std::fs::metadata(src)
            .map_err(|e| format!("bind source {src}: {e}"))?
            .is_dir();
        if is_dir {
            sys::mkdir_p(&dest)?;
        } else {
            if let Some(parent) = dest.parent() {
                sys::mkdir_p(parent)?;
            }
            if !dest.exists() {
                std::fs::File::create(&dest)
                    .map_err(|e| format!("create {}: {e}", dest.display()))?;
            }
        }
        mount(
            Some(src),
            &dest,
            None,
            libc::MS_BIND | (flags & libc::MS_REC),
            None,
        )?;
        let extra = flags & !libc::MS_REC;
        if extra != 0 {
            mount(
                None,
                &dest,
                None,
                libc::MS_REMOUNT | libc::MS_BIND | extra,
                None,
            )?;
        }
        return Ok(());
    }
    sys::mkdir_p(&dest)?;
    let data = data.join(",");
    let source = m.source.as_deref().unwrap_or(kind);
    let r = mount(
        Some(source),
        &dest,
        Some(kind),
        flags,
        (!data.is_empty()).then_some(&*data),
    );
    match r {
        // An unsupported option on a mount the spec adds by default (mqueue, sysfs in some
        // setups) should not stop a container: log and go on only for those.
        Err(e) if matches!(kind, "mqueue" | "cgroup" | "cgroup2") => {
            sys::write_fd(
                2,
                format!("enclave-agent: skipping {}: {e}\n", m.destination).as_bytes(),
            );
            Ok(())
        }
        r => r,
    }
}

/// The OCI runtime spec's default devices and /dev symlinks in a container whose /dev is a
/// fresh mount (containerd's specs mount a tmpfs there): each device is bound from the
/// guest's devtmpfs, as runc does where it cannot mknod.
fn default_devices(root: &Path) -> Result<()> {
    let dev = under_root(root, "/dev")?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let dest = dev.join(name);
        if dest.exists() {
            continue;
        }
        std::fs::File::create(&dest).map_err(|e| format!("create {}: {e}", dest.display()))?;
        mount(
            Some(&format!("/dev/{name}")),
            &dest,
            None,
            libc::MS_BIND,
            None,
        )?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let p = dev.join(link);
        if std::fs::symlink_metadata(&p).is_err() {
            std::os::unix::fs::symlink(target, &p)
                .map_err(|e| format!("symlink {}: {e}", p.display()))?;
        }
    }
    Ok(())
}

fn setup_container(cfg: &InitConfig) -> Result<()> {
    join_cgroup(&cfg.cgroup)?;
    let root = Path::new(&cfg.rootfs);
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    mount(
        Some(&cfg.rootfs),
        root,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )?;
    for m in &cfg.mounts {
        do_mount(root, m)?;
    }
    if cfg.mounts.iter().any(|m| m.destination == "/dev") {
        default_devices(root)?;
    }
    for p in &cfg.masked_paths {
        let Ok(dest) = under_root(root, p) else {
            continue;
        };
        match std::fs::metadata(&dest) {
            Ok(md) if md.is_dir() => {
                mount(Some("tmpfs"), &dest, Some("tmpfs"), libc::MS_RDONLY, None)?
            }
            Ok(_) => mount(Some("/dev/null"), &dest, None, libc::MS_BIND, None)?,
            Err(_) => {}
        }
    }
    for p in &cfg.readonly_paths {
        let Ok(dest) = under_root(root, p) else {
            continue;
        };
        if dest.exists() {
            mount(
                Some(&dest.to_string_lossy()),
                &dest,
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
            )?;
            let f = libc::MS_REMOUNT
                | libc::MS_BIND
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC;
            mount(None, &dest, None, f, None)?;
        }
    }
    // pivot_root(".", "."): the old root ends up stacked under the new one and is then
    // detached, leaving nothing of the guest visible.
    std::env::set_current_dir(root).map_err(|e| format!("chdir {}: {e}", cfg.rootfs))?;
    let dot = cstr(".", "path")?;
    // SAFETY: both arguments are valid C strings; pivot_root has no other memory effects.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return Err(os_err("pivot_root"));
    }
    sys::umount2(Path::new("."), libc::MNT_DETACH)?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    if cfg.readonly {
        mount(
            None,
            Path::new("/"),
            None,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
            None,
        )?;
    }
    if let Some(h) = &cfg.hostname {
        // SAFETY: the pointer and length describe `h`.
        if unsafe { libc::sethostname(h.as_ptr().cast(), h.len()) } != 0 {
            return Err(os_err("sethostname"));
        }
    }
    sys::write_fd(STATUS_FD, b"ready\n");
    let mut b = [0u8; 1];
    // SAFETY: reading one byte into a one-byte buffer.
    let n = unsafe { libc::read(START_FD, b.as_mut_ptr().cast(), 1) };
    if n != 1 {
        // The agent dropped the container before starting it.
        std::process::exit(0);
    }
    // SAFETY: closing an fd this process owns.
    unsafe { libc::close(START_FD) };
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn cap_mask(names: &[String]) -> u64 {
    names
        .iter()
        .filter_map(|n| spec::cap_number(n))
        .fold(0u64, |m, c| m | (1u64 << c))
}

/// Drops to the process's credentials and capabilities and execs it; returns only on
/// failure, with the reason.
fn finish_process(p: &Process, cap_last_cap: u32) -> String {
    match prepare(p, cap_last_cap) {
        Ok((path, argv, envp)) => {
            let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
            argv_p.push(std::ptr::null());
            let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
            envp_p.push(std::ptr::null());
            // SAFETY: path, argv and envp are NUL-terminated strings in arrays ending with
            // a null pointer, all alive across the call.
            unsafe { libc::execve(path.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr()) };
            os_err(format_args!("exec {:?}", p.args[0]))
        }
        Err(e) => e,
    }
}

type Exec = (CString, Vec<CString>, Vec<CString>);

fn prepare(p: &Process, cap_last_cap: u32) -> Result<Exec> {
    // SAFETY: setsid has no memory effects.
    unsafe { libc::setsid() };
    if p.terminal {
        // SAFETY: TIOCSCTTY takes an int argument; fd 0 is the tty slave.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
            return Err(os_err("set controlling tty"));
        }
    }
    for r in &p.rlimits {
        let res = spec::rlimit_number(&r.kind).ok_or_else(|| format!("rlimit {}", r.kind))?;
        let lim = libc::rlimit {
            rlim_cur: r.soft,
            rlim_max: r.hard,
        };
        // SAFETY: lim is a valid rlimit.
        if unsafe { libc::setrlimit(res, &lim) } != 0 {
            return Err(os_err(format_args!("setrlimit {}", r.kind)));
        }
    }
    let caps = p.capabilities.clone().unwrap_or_default();
    let bounding = cap_mask(&caps.bounding);
    // SAFETY: prctl with integer arguments only.
    unsafe {
        for c in 0..=cap_last_cap.min(63) {
            if bounding & (1 << c) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, c as libc::c_ulong, 0, 0, 0) != 0
            {
                return Err(os_err(format_args!(
                    "drop capability {c} from the bounding set"
                )));
            }
        }
        if libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
            return Err(os_err("PR_SET_KEEPCAPS"));
        }
    }
    let u = &p.user;
    let groups: Vec<libc::gid_t> = u.additional_gids.clone();
    // SAFETY: groups is a valid array of its length; the id calls take integers.
    unsafe {
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
            return Err(os_err("setgroups"));
        }
        if libc::setresgid(u.gid, u.gid, u.gid) != 0 {
            return Err(os_err(format_args!("setgid {}", u.gid)));
        }
        if libc::setresuid(u.uid, u.uid, u.uid) != 0 {
            return Err(os_err(format_args!("setuid {}", u.uid)));
        }
    }
    let (e, pm, i) = (
        cap_mask(&caps.effective),
        cap_mask(&caps.permitted),
        cap_mask(&caps.inheritable),
    );
    let mut data = [CapData::default(); 2];
    for (k, d) in data.iter_mut().enumerate() {
        d.effective = (e >> (32 * k)) as u32;
        d.permitted = (pm >> (32 * k)) as u32;
        d.inheritable = (i >> (32 * k)) as u32;
    }
    let mut hdr = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    // SAFETY: header and two data structs as capset(2) version 3 expects.
    if unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) } != 0 {
        return Err(os_err("capset"));
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        for c in caps.ambient.iter().filter_map(|n| spec::cap_number(n)) {
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE,
                c as libc::c_ulong,
                0,
                0,
            ) != 0
            {
                return Err(os_err(format_args!("raise ambient capability {c}")));
            }
        }
        libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0);
        if p.no_new_privileges && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(os_err("no_new_privs"));
        }
    }
    std::env::set_current_dir(&p.cwd).map_err(|e| format!("chdir {}: {e}", p.cwd))?;
    let path = resolve(&p.args[0], &p.env)?;
    let argv = p
        .args
        .iter()
        .map(|a| cstr(a, "process.args"))
        .collect::<Result<Vec<_>>>()?;
    let envp = p
        .env
        .iter()
        .map(|a| cstr(a, "process.env"))
        .collect::<Result<Vec<_>>>()?;
    Ok((path, argv, envp))
}

/// Finds a program on the container's PATH (as execvp would, but with the container's
/// environment rather than the agent's).
fn resolve(prog: &str, env: &[String]) -> Result<CString> {
    if prog.contains('/') {
        return cstr(prog, "process.args[0]");
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let cand = Path::new(dir).join(prog);
        if let Ok(m) = std::fs::metadata(&cand) {
            use std::os::unix::fs::PermissionsExt;
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return cstr(cand.as_os_str(), "path");
            }
        }
    }
    Err(format!("exec {prog:?}: not found in PATH {path:?}"))
}
