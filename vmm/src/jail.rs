//! The jailer: starts enclave-vmm with as little as possible around it.
//!
//! - a directory of its own, `<base>/<id>/root`, holding only the VMM binary, the kernel, the
//!   initrd, the config, `/dev/kvm`, and `/run` (owned by the VMM's uid) for its sockets
//!   and serial log; vhost-user backend sockets are bind-mounted into `/run`;
//! - new mount, PID, IPC and UTS namespaces (and the pod's network namespace when given);
//!   the mount namespace is the VMM's alone, so its mounts vanish with it;
//!   the VMM is PID 1 of its PID namespace, and `pivot_root` makes the directory its `/`;
//! - cgroup limits written before the VMM starts (v1 or v2, whichever the node has);
//! - an unprivileged uid/gid with no supplementary groups, an empty environment, and no
//!   file descriptor but 0, 1 and 2.
//!
//! The jailer's own process stays outside, waits for the VMM and exits with its status (so
//! whoever started the jailer sees the VM's exit), and removes the directory with
//! `--cleanup`.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::VmConfig;

/// What to jail and how.
#[derive(Debug, Clone)]
pub struct JailSpec {
    /// VM id: letters, digits and '-', at most 64.
    pub id: String,
    /// The enclave-vmm binary.
    pub exec: PathBuf,
    /// The VM config (paths as on the host).
    pub config: PathBuf,
    /// Unprivileged uid and gid for the VMM.
    pub uid: u32,
    /// gid.
    pub gid: u32,
    /// Where jail directories go.
    pub base: PathBuf,
    /// A network namespace to join (the pod's), or `new` for an empty one of its own.
    pub netns: Option<PathBuf>,
    /// cgroup settings, `controller.file=value` (e.g. `memory.limit_in_bytes=536870912`).
    pub cgroups: Vec<(String, String)>,
    /// Arguments passed on to enclave-vmm.
    pub vmm_args: Vec<String>,
    /// A host directory shared with the jail at [`SHARE_INSIDE`]: the vsock socket and the
    /// serial log, when the config puts them in it, stay there (so the VMM's supervisor
    /// finds them at their host paths, and its listeners for guest-initiated vsock
    /// connections are reachable). It must be writable by `uid`.
    pub share: Option<PathBuf>,
}

/// Where [`JailSpec::share`] appears inside the jail.
pub const SHARE_INSIDE: &str = "/run/share";

/// `path` as the VMM sees it when it lies in the shared directory.
fn in_share(share: Option<&Path>, path: &Path) -> Option<PathBuf> {
    let rel = path.strip_prefix(share?).ok()?;
    Some(Path::new(SHARE_INSIDE).join(rel))
}

fn io<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

/// The jail's root directory.
pub fn root_dir(spec: &JailSpec) -> PathBuf {
    spec.base.join(&spec.id).join("root")
}

fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    ok.then_some(())
        .ok_or_else(|| format!("--id {id:?}: use 1 to 64 letters, digits and '-'"))
}

/// Hard-links `src` (symlinks resolved) to `dst`, or copies it with `mode` when a link is
/// impossible (another file system). A link keeps the original's owner and mode: the files
/// placed are root's and read-only to the VMM's uid either way. Never chmod a link: that
/// would change the host's file.
fn place(src: &Path, dst: &Path, mode: u32) -> Result<(), String> {
    let src = fs::canonicalize(src).map_err(io(src.display()))?;
    if fs::hard_link(&src, dst).is_ok() {
        return Ok(());
    }
    fs::copy(&src, dst).map_err(io(format!("copying {} into the jail", src.display())))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(mode)).map_err(io(dst.display()))
}

/// The shared libraries (and loader) a dynamically linked binary needs, from `ldd`.
fn shared_libs(exec: &Path) -> Result<Vec<PathBuf>, String> {
    let out = std::process::Command::new("ldd")
        .arg(exec)
        .output()
        .map_err(io("running ldd"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    // Lines look like "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
    // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no path.
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .collect())
}

/// Bind mounts the jail needs: (host file or directory, path inside the jail).
type Binds = Vec<(PathBuf, PathBuf)>;

/// Builds the jail directory and the rewritten config; returns the bind mounts to make.
pub fn prepare(spec: &JailSpec) -> Result<Binds, String> {
    check_id(&spec.id)?;
    if spec.uid == 0 || spec.gid == 0 {
        return Err("--uid and --gid must not be 0: the point is an unprivileged VMM".into());
    }
    let mut cfg = VmConfig::from_file(&spec.config).map_err(|e| e.to_string())?;
    let root = root_dir(spec);
    if root.exists() {
        return Err(format!(
            "{} exists: another VM with id {} (or a leftover: remove it)",
            root.display(),
            spec.id
        ));
    }
    fs::create_dir_all(root.join("dev")).map_err(io(root.display()))?;
    fs::create_dir_all(root.join("run")).map_err(io(root.display()))?;
    chown(root.join("run"), Some(spec.uid), Some(spec.gid)).map_err(io("chown run"))?;
    fs::set_permissions(root.join("run"), fs::Permissions::from_mode(0o700))
        .map_err(io("chmod run"))?;
    place(&spec.exec, &root.join("enclave-vmm"), 0o755)?;
    // A static enclave-vmm needs nothing more; a dynamic one needs its loader and libraries
    // (read-only, at the same paths).
    for lib in shared_libs(&spec.exec)? {
        let inside = root.join(lib.strip_prefix("/").unwrap_or(&lib));
        if let Some(parent) = inside.parent() {
            fs::create_dir_all(parent).map_err(io(parent.display()))?;
        }
        place(&lib, &inside, 0o555)?;
    }
    let mut binds = Vec::new();
    // The kernel and initrd: hard links on the same file system, else read-only bind
    // mounts (never a copy of tens of MiB per VM).
    let mut kernel_files = vec![(cfg.kernel.clone(), "/kernel")];
    if let Some(initrd) = &cfg.initrd {
        kernel_files.push((initrd.clone(), "/initrd"));
    }
    for (src, inside) in kernel_files {
        let dst = root.join(&inside[1..]);
        let src = fs::canonicalize(&src).map_err(io(src.display()))?;
        if fs::hard_link(&src, &dst).is_err() {
            binds.push((src, PathBuf::from(inside)));
        }
    }
    cfg.kernel = "/kernel".into();
    if cfg.initrd.is_some() {
        cfg.initrd = Some("/initrd".into());
    }
    // /dev/kvm, usable by the VMM's uid only.
    let kvm = CString::new(root.join("dev/kvm").as_os_str().as_encoded_bytes())
        .map_err(|e| e.to_string())?;
    // SAFETY: mknod with a valid path and the kvm device number (10, 232).
    if unsafe { libc::mknod(kvm.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(10, 232)) } != 0 {
        return Err(format!(
            "mknod /dev/kvm in the jail: {}",
            std::io::Error::last_os_error()
        ));
    }
    chown(root.join("dev/kvm"), Some(spec.uid), Some(spec.gid)).map_err(io("chown /dev/kvm"))?;

    // Everything the VMM writes lives in /run (or the shared directory); backend sockets
    // are bind-mounted there.
    let share = spec.share.as_deref();
    let serial = cfg
        .serial
        .as_ref()
        .and_then(|s| s.path.as_deref())
        .and_then(|p| in_share(share, p))
        .unwrap_or_else(|| "/run/serial.log".into());
    cfg.serial = Some(crate::config::SerialConfig { path: Some(serial) });
    if let Some(v) = &mut cfg.vsock {
        v.uds_path = in_share(share, &v.uds_path).unwrap_or_else(|| "/run/vsock.sock".into());
    }
    if let Some(dir) = share {
        let dir = fs::canonicalize(dir).map_err(io(dir.display()))?;
        fs::create_dir_all(root.join(&SHARE_INSIDE[1..])).map_err(io(root.display()))?;
        binds.push((dir, PathBuf::from(SHARE_INSIDE)));
    }
    for (i, n) in cfg.net.iter_mut().enumerate() {
        let inside = PathBuf::from(format!("/run/net{i}.sock"));
        binds.push((n.socket.clone(), inside.clone()));
        n.socket = inside;
    }
    for (i, f) in cfg.fs.iter_mut().enumerate() {
        let inside = PathBuf::from(format!("/run/fs{i}.sock"));
        binds.push((f.socket.clone(), inside.clone()));
        f.socket = inside;
    }
    let json = serde_json::to_vec_pretty(&cfg).map_err(|e| e.to_string())?;
    fs::write(root.join("vm.json"), json).map_err(io("writing the jail's vm.json"))?;
    fs::set_permissions(root.join("vm.json"), fs::Permissions::from_mode(0o444))
        .map_err(io("chmod vm.json"))?;
    Ok(binds)
}

/// The cgroup directory for a controller: v2 (unified) when the node has it, else v1.
fn cgroup_dir(controller: &str, id: &str) -> PathBuf {
    let top = Path::new("/sys/fs/cgroup");
    if top.join("cgroup.controllers").exists() {
        top.join("enclave").join(id)
    } else {
        top.join(controller).join("enclave").join(id)
    }
}

/// Creates the cgroups and writes the limits; returns the directories to put the VMM in.
pub fn make_cgroups(spec: &JailSpec) -> Result<Vec<PathBuf>, String> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (key, value) in &spec.cgroups {
        let controller = key.split('.').next().unwrap_or_default();
        if controller.is_empty() || !key.contains('.') || key.contains('/') {
            return Err(format!(
                "--cgroup {key}={value}: expected controller.file=value"
            ));
        }
        let dir = cgroup_dir(controller, &spec.id);
        fs::create_dir_all(&dir).map_err(io(dir.display()))?;
        fs::write(dir.join(key), value).map_err(io(format!("{}/{key}", dir.display())))?;
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    Ok(dirs)
}

/// Moves `pid` into the cgroups.
fn enter_cgroups(dirs: &[PathBuf], pid: libc::pid_t) -> Result<(), String> {
    for dir in dirs {
        fs::write(dir.join("cgroup.procs"), pid.to_string())
            .map_err(io(format!("{}/cgroup.procs", dir.display())))?;
    }
    Ok(())
}

fn check(rc: libc::c_int, what: &str) -> Result<(), String> {
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    }
}

fn cstr(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())
}

/// In the child, PID 1 of the new PID namespace: mounts, pivot_root, credentials, exec.
/// Only returns on error.
fn child(
    spec: &JailSpec,
    root: &Path,
    binds: &Binds,
    go: libc::c_int,
    alive: libc::c_int,
) -> String {
    let r = (|| -> Result<(), String> {
        // Wait until the parent has put us in the cgroups.
        let mut b = [0u8; 1];
        // SAFETY: reading one byte from our end of the pipe.
        if unsafe { libc::read(go, b.as_mut_ptr().cast(), 1) } != 1 {
            return Err("the jailer parent went away".into());
        }
        // The mount namespace is the child's alone: the parent stays in the host's, so the
        // jail's mounts vanish with the VMM and --cleanup can remove the directory.
        // SAFETY: unshare with a constant flag.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
        check(rc, "unshare(CLONE_NEWNS)")?;
        let none = std::ptr::null::<libc::c_char>();
        // SAFETY: mount(2) calls with valid NUL-terminated paths (or null where allowed) and
        // constant flags; everything happens in our own new mount namespace.
        unsafe {
            check(
                libc::mount(
                    none,
                    c"/".as_ptr(),
                    none,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ),
                "making / private",
            )?;
            for (host, inside) in binds {
                let target = root.join(inside.strip_prefix("/").unwrap_or(inside));
                if !host.is_dir() {
                    fs::write(&target, b"").map_err(io(target.display()))?;
                }
                let (h, t) = (cstr(host)?, cstr(&target)?);
                check(
                    libc::mount(
                        h.as_ptr(),
                        t.as_ptr(),
                        none,
                        libc::MS_BIND,
                        std::ptr::null(),
                    ),
                    &format!("bind-mounting {}", host.display()),
                )?;
            }
            let r = cstr(root)?;
            check(
                libc::mount(
                    r.as_ptr(),
                    r.as_ptr(),
                    none,
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ),
                "bind-mounting the jail root",
            )?;
            check(libc::chdir(r.as_ptr()), "chdir into the jail")?;
            check(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
                "pivot_root",
            )?;
            check(
                libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
                "detaching the old root",
            )?;
            check(libc::chdir(c"/".as_ptr()), "chdir /")?;
            let host = b"enclave-vmm";
            check(
                libc::sethostname(host.as_ptr().cast(), host.len()),
                "sethostname",
            )?;
            check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
            check(libc::setresgid(spec.gid, spec.gid, spec.gid), "setresgid")?;
            check(libc::setresuid(spec.uid, spec.uid, spec.uid), "setresuid")?;
            check(
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                "no_new_privs",
            )?;
            // If the jailer dies (even by SIGKILL), so does the VMM and with it, as PID 1
            // of its namespace, everything it started. Set after the credential change,
            // which clears it; then make sure the jailer did not die in between.
            check(
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ),
                "parent-death signal",
            )?;
            // (The parent is outside our PID namespace, so getppid() says 0 either way: the
            // parent holds the write end of `alive` open for as long as it lives.)
            let mut pfd = libc::pollfd {
                fd: alive,
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut pfd, 1, 0) != 0 {
                return Err("the jailer went away".into());
            }
            // No descriptor but stdio crosses into the VMM.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        }
        let mut argv: Vec<CString> = vec![
            c"/enclave-vmm".into(),
            c"--config".into(),
            c"/vm.json".into(),
        ];
        for a in &spec.vmm_args {
            argv.push(CString::new(a.as_str()).map_err(|e| e.to_string())?);
        }
        let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        let env: [*const libc::c_char; 1] = [std::ptr::null()];
        // SAFETY: argv and envp are NUL-terminated arrays of valid C strings that outlive
        // the call; execve only returns on failure.
        unsafe { libc::execve(c"/enclave-vmm".as_ptr(), ptrs.as_ptr(), env.as_ptr()) };
        Err(format!(
            "exec /enclave-vmm: {}",
            std::io::Error::last_os_error()
        ))
    })();
    r.err().unwrap_or_default()
}

/// Runs the VMM in its jail; returns its exit code (128 + signal when killed).
pub fn run(spec: &JailSpec, cleanup: bool) -> Result<i32, String> {
    let binds = prepare(spec)?;
    let root = root_dir(spec);
    let dirs = make_cgroups(spec)?;
    match &spec.netns {
        Some(ns) if ns.as_os_str() == "new" => {
            // SAFETY: unshare with a constant flag; the jailer is single-threaded here.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            check(rc, "a new network namespace")?;
        }
        Some(ns) => {
            let f = fs::File::open(ns).map_err(io(ns.display()))?;
            // SAFETY: setns with an fd we own and the namespace type it must be.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            check(rc, "joining the network namespace")?;
        }
        None => {}
    }
    // PID: for the child; IPC and UTS: harmless for the waiting parent. The mount namespace
    // is made in the child.
    // SAFETY: unshare with constant flags; the jailer is single-threaded here.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) };
    check(rc, "unshare")?;
    let mut pipe = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills our array.
    let rc = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) };
    check(rc, "pipe")?;
    let mut alive = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills our array.
    let rc = unsafe { libc::pipe2(alive.as_mut_ptr(), libc::O_CLOEXEC) };
    check(rc, "pipe")?;
    // SAFETY: fork in a single-threaded process; the child only calls async-signal-safe
    // functions and allocation-light code before execve.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: the child's copy of the write end; only the parent keeps one.
        unsafe { libc::close(alive[1]) };
        let e = child(spec, &root, &binds, pipe[0], alive[0]);
        eprintln!("enclave-jailer: {e}");
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(70) };
    }
    // SAFETY: closing our copies of the read ends (the write end of `alive` stays open,
    // close-on-exec, until this process ends).
    unsafe {
        libc::close(pipe[0]);
        libc::close(alive[0]);
    }
    let placed = enter_cgroups(&dirs, pid);
    if placed.is_ok() {
        // SAFETY: one byte to our end of the pipe releases the child.
        unsafe { libc::write(pipe[1], b"g".as_ptr().cast(), 1) };
    }
    // SAFETY: closing our write end (the child sees EOF if we did not release it).
    unsafe { libc::close(pipe[1]) };
    let mut status = 0;
    // SAFETY: waiting for our own child.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(format!("waitpid: {}", std::io::Error::last_os_error()));
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    if cleanup {
        let _ = fs::remove_dir_all(spec.base.join(&spec.id));
        for d in &dirs {
            let _ = fs::remove_dir(d);
        }
    }
    placed?;
    Ok(code)
}
