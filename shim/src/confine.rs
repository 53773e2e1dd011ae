//! What the shim does to every process it starts for a pod so that none of them keeps more
//! than it needs: namespaces of its own, an unprivileged uid with no capabilities,
//! `no_new_privs`. Each backend adds its own seccomp filter (QEMU's `-sandbox`, virtiofsd's
//! `--seccomp kill`, enclave-netd's and enclave-vmm's per-thread filters). docs/shim.md
//! has the table of what runs as what; `shim/tests/containerd.rs` reads it back from /proc.

use std::path::Path;
use std::process::Command;

use enclave_seccomp::{any, when, BpfProgram, SeccompAction, Syscall};

/// The uid and gid the pod's helpers drop to (`nobody`/`nogroup` on Debian).
pub const HELPER_ID: (u32, u32) = (65534, 65534);

/// Namespaces a helper that speaks only over Unix sockets and inherited descriptors gets of
/// its own: no network, no System V IPC, no hostname of the node's, its own mount table.
pub const HELPER_NAMESPACES: libc::c_int =
    libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNS;

/// Whether the shim can confine (it runs as root, as containerd starts it). Tests and demos
/// that run a guest as an ordinary user start the helpers unconfined.
pub fn can_confine() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The child enters new namespaces (`flags`: `CLONE_NEW*`) before it execs.
pub fn own_namespaces(cmd: &mut Command, flags: libc::c_int) {
    // SAFETY: unshare is async-signal-safe and touches only the child.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            if libc::unshare(flags) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The child drops to `uid:gid` with no supplementary groups (and so no capabilities) and
/// sets `no_new_privs` before it execs. Registered after [`own_namespaces`], it runs after.
pub fn drop_to(cmd: &mut Command, (uid, gid): (u32, u32)) {
    // SAFETY: async-signal-safe syscalls on integers, in the child only.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
                || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `vhost-device-vsock`'s filter, installed before it execs (so the dynamic loader's
/// start-up is in it too), default kill. Taken from `strace -f` of the guest and containerd
/// tests through the backend, each entry with its caller. What it cannot take away: `execve`
/// (the exec that starts it) and `openat` (the loader); as uid 65534 with no capabilities in
/// its own mount namespace, that opens only world-readable files.
pub const VSOCK_BACKEND: &[Syscall] = &[
    any(libc::SYS_execve, "the exec that starts the backend"),
    any(libc::SYS_openat, "the dynamic loader at start"),
    any(libc::SYS_access, "the dynamic loader (ld.so.preload)"),
    any(libc::SYS_newfstatat, "the dynamic loader, socket paths"),
    any(libc::SYS_fstat, "the dynamic loader"),
    any(libc::SYS_statx, "std's file metadata"),
    any(libc::SYS_read, "sockets, eventfds, the loader"),
    any(libc::SYS_pread64, "the dynamic loader"),
    any(libc::SYS_write, "sockets, eventfds, logging"),
    any(libc::SYS_writev, "logging"),
    any(libc::SYS_lseek, "the dynamic loader"),
    any(libc::SYS_close, "fds"),
    any(libc::SYS_dup, "the vhost-user listener"),
    any(
        libc::SYS_mmap,
        "the loader, guest memory (SET_MEM_TABLE), the allocator",
    ),
    any(libc::SYS_mprotect, "the loader, thread stacks"),
    any(libc::SYS_munmap, "guest memory, the allocator"),
    any(libc::SYS_mremap, "the allocator"),
    any(libc::SYS_madvise, "the allocator"),
    any(libc::SYS_brk, "the allocator"),
    any(libc::SYS_arch_prctl, "thread-local storage at start"),
    any(libc::SYS_set_tid_address, "start"),
    any(libc::SYS_set_robust_list, "thread start"),
    any(libc::SYS_rseq, "thread start"),
    any(libc::SYS_prlimit64, "std's main-thread stack guard"),
    any(libc::SYS_rt_sigaction, "std's signal handlers at start"),
    any(libc::SYS_rt_sigprocmask, "thread creation and exit"),
    any(libc::SYS_rt_sigreturn, "signal return"),
    any(libc::SYS_sigaltstack, "std's stack-overflow guard"),
    any(libc::SYS_sched_getaffinity, "thread start"),
    any(libc::SYS_sched_yield, "lock contention"),
    any(libc::SYS_gettid, "thread start"),
    any(libc::SYS_getpid, "abort on a panic"),
    any(libc::SYS_tgkill, "abort on a panic"),
    any(libc::SYS_clone3, "its worker threads"),
    any(libc::SYS_clone, "its worker threads (older glibc)"),
    any(libc::SYS_futex, "locks"),
    any(libc::SYS_getrandom, "HashMap seeds"),
    any(libc::SYS_clock_gettime, "Instant::now without the vDSO"),
    any(libc::SYS_clock_nanosleep, "sleeps"),
    any(libc::SYS_nanosleep, "sleeps"),
    any(libc::SYS_eventfd2, "vring and exit events"),
    any(libc::SYS_epoll_create1, "its event loops"),
    any(libc::SYS_epoll_ctl, "its event loops"),
    any(libc::SYS_epoll_wait, "its event loops"),
    any(
        libc::SYS_epoll_pwait,
        "its event loops (glibc may use the p-variant)",
    ),
    any(libc::SYS_poll, "socket readiness"),
    when(
        libc::SYS_socket,
        0,
        &[libc::AF_UNIX as u64],
        "Unix sockets only: the vhost-user socket, hybrid vsock",
    ),
    any(libc::SYS_bind, "its listening sockets"),
    any(libc::SYS_listen, "its listening sockets"),
    any(libc::SYS_accept4, "the VMM and host connections"),
    any(
        libc::SYS_connect,
        "guest-initiated connections to <uds-path>_PORT",
    ),
    any(libc::SYS_shutdown, "half-close from the guest"),
    any(libc::SYS_unlink, "replacing stale sockets"),
    any(libc::SYS_recvmsg, "vhost-user messages with fds"),
    any(libc::SYS_sendmsg, "vhost-user replies"),
    any(libc::SYS_recvfrom, "socket reads"),
    any(libc::SYS_sendto, "socket writes"),
    when(
        libc::SYS_ioctl,
        1,
        &[libc::FIONBIO, libc::TCGETS],
        "set_nonblocking; the logger asking whether stderr is a terminal",
    ),
    when(
        libc::SYS_fcntl,
        1,
        &[
            libc::F_DUPFD_CLOEXEC as u64,
            libc::F_GETFD as u64,
            libc::F_SETFD as u64,
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
        ],
        "try_clone, descriptor flags",
    ),
    when(
        libc::SYS_prctl,
        0,
        &[libc::PR_SET_NAME as u64],
        "naming its threads",
    ),
    any(libc::SYS_exit, "thread exit"),
    any(libc::SYS_exit_group, "process exit"),
];

/// The vsock backend's filter, compiled.
pub fn vsock_backend_filter() -> Result<BpfProgram, String> {
    enclave_seccomp::compile(&[VSOCK_BACKEND], SeccompAction::KillProcess)
        .map_err(|e| format!("the vsock backend's seccomp filter: {e}"))
}

/// The child installs `filter` (after [`drop_to`], which set `no_new_privs`) as the last
/// thing before it execs; the program and every thread it makes run under it.
pub fn seccomp_before_exec(cmd: &mut Command, filter: BpfProgram) {
    // SAFETY: in the child, prctl/seccomp on a program compiled in the parent (no
    // allocation: the filter is only borrowed).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            enclave_seccomp::install(&filter)
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EPERM))
        });
    }
}

fn cpath(p: &Path) -> Result<std::ffi::CString, String> {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{} contains a NUL byte", p.display()))
}

/// Gives `path` to `uid:gid` (a directory a helper must create its sockets in).
pub fn chown(path: &Path, (uid, gid): (u32, u32)) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| format!("chown {}: {e}", path.display()))
}

/// Makes `dir` a mount point of its own with shared propagation, so that what is mounted
/// under it later (a container's root filesystem) also appears in the private mount
/// namespace of a process started now (virtiofsd's sandbox, which is a slave of it).
pub fn make_shared_mount(dir: &Path) -> Result<(), String> {
    let p = cpath(dir)?;
    // SAFETY: mount(2) with a NUL-terminated path that outlives the calls.
    unsafe {
        if libc::mount(
            p.as_ptr(),
            p.as_ptr(),
            std::ptr::null(),
            // Recursive: what is already mounted below (the first container's root
            // filesystem, mounted before the VM boots) must stay visible.
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ) != 0
        {
            return Err(format!(
                "bind-mounting {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            ));
        }
        if libc::mount(
            std::ptr::null(),
            p.as_ptr(),
            std::ptr::null(),
            libc::MS_SHARED | libc::MS_REC,
            std::ptr::null(),
        ) != 0
        {
            let e = std::io::Error::last_os_error();
            libc::umount2(p.as_ptr(), libc::MNT_DETACH);
            return Err(format!("making {} a shared mount: {e}", dir.display()));
        }
    }
    Ok(())
}

/// Undoes [`make_shared_mount`] (lazily: whatever is still mounted below goes with it).
pub fn remove_shared_mount(dir: &Path) {
    if let Ok(p) = cpath(dir) {
        // SAFETY: umount2 with a NUL-terminated path; failure (not mounted) is harmless.
        unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Whether any user may execute `file`: it is executable by others and every directory
/// above it is searchable by others (what a helper that drops to [`HELPER_ID`] needs to
/// exec it).
pub fn reachable_by_others(file: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(file) = std::fs::canonicalize(file) else {
        return false;
    };
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode())
            .unwrap_or(0)
    };
    mode(&file) & 0o001 != 0 && file.ancestors().skip(1).all(|d| mode(d) & 0o001 != 0)
}

/// Binds a unix socket at `path` (replacing a stale one) with `bind` and makes it
/// connectable by root only (mode 0600): the shim's name-set and probe sockets.
pub fn bind_root_only<T>(
    path: &std::path::Path,
    bind: impl FnOnce(&std::path::Path) -> std::io::Result<T>,
) -> Result<T, String> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let sock = bind(path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(sock)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_vsock_backend_filter_allows_its_table_and_refuses_the_rest() {
        let p = vsock_backend_filter().unwrap();
        let never = [
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_setuid,
            libc::SYS_kill,
            libc::SYS_bpf,
            libc::SYS_process_vm_writev,
            libc::SYS_unshare,
        ];
        let wrong = enclave_seccomp::verify(&p, &[VSOCK_BACKEND], &never);
        assert!(wrong.is_empty(), "{wrong:#?}");
        // An AF_INET socket: no network for the vsock backend.
        let inet =
            enclave_seccomp::eval(&p, libc::SYS_socket, [libc::AF_INET as u64, 1, 0, 0, 0, 0]);
        assert_eq!(inet, Some(enclave_seccomp::RET_KILL_PROCESS));
    }

    #[test]
    fn a_binary_behind_a_closed_directory_is_not_reachable() {
        let d = tempfile::tempdir().unwrap();
        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        let bin = open.join("tool");
        std::fs::write(&bin, "").unwrap();
        let set = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        set(d.path(), 0o755);
        set(&open, 0o755);
        set(&bin, 0o755);
        assert!(reachable_by_others(&bin));
        set(d.path(), 0o700);
        assert!(!reachable_by_others(&bin));
        set(d.path(), 0o755);
        set(&bin, 0o750);
        assert!(!reachable_by_others(&bin));
    }
}
