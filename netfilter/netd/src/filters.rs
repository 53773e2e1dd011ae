//! enclave-netd's seccomp tables, default kill, each syscall with the code that needs it.
//!
//! Two filters. The datapath filter is installed by the main thread once privileges are
//! dropped and before the vhost-user daemon is made, so every thread that touches guest
//! data is born under it: the vring worker that decides frames, the vhost-user request
//! handler, the relay. The control thread, which never touches guest memory, is started
//! just before and installs its own filter first thing: the datapath list plus what
//! reading the policy directory and the registry takes.

use enclave_seccomp::{any, when, BpfProgram, SeccompAction, SeccompError, Syscall};

/// The `TUNSETOFFLOAD` request, the one ioctl netd makes (the tap's receive offloads follow
/// the guest's features).
#[allow(clippy::unnecessary_cast)] // c_ulong is u64 on x86_64 only
const IOCTLS: &[u64] = &[crate::tap::TUNSETOFFLOAD_REQ as u64];

/// Every thread that touches guest data: the vring worker, the vhost-user request handler,
/// the relay, the main thread.
pub const DATAPATH: &[Syscall] = &[
    any(libc::SYS_read, "tap reads, eventfds"),
    any(libc::SYS_write, "tap writes, eventfds (call/irqfd), stderr"),
    any(libc::SYS_readv, "tap reads"),
    any(libc::SYS_writev, "stderr"),
    any(libc::SYS_recvmsg, "vhost-user messages with fds"),
    any(libc::SYS_sendmsg, "vhost-user replies"),
    any(libc::SYS_accept4, "the VMM's vhost-user connection"),
    any(
        libc::SYS_epoll_create1,
        "the vring worker's epoll, made once at start",
    ),
    any(libc::SYS_epoll_wait, "the vring worker"),
    any(libc::SYS_epoll_pwait, "the vring worker"),
    any(libc::SYS_epoll_ctl, "kick and tap registration"),
    any(
        libc::SYS_mmap,
        "mapping guest memory (SET_MEM_TABLE), the allocator",
    ),
    any(
        libc::SYS_mremap,
        "the allocator growing a large buffer in place",
    ),
    any(libc::SYS_munmap, "unmapping guest memory, the allocator"),
    any(libc::SYS_mprotect, "the allocator, thread stacks"),
    any(libc::SYS_madvise, "the allocator"),
    any(libc::SYS_brk, "the allocator"),
    any(libc::SYS_close, "fds from the VMM"),
    any(libc::SYS_fcntl, "fd flags"),
    any(libc::SYS_futex, "locks between the threads"),
    any(libc::SYS_fstat, "sizing the memory fd"),
    any(libc::SYS_newfstatat, "sizing the memory fd"),
    any(libc::SYS_lseek, "file offsets"),
    any(libc::SYS_eventfd2, "the library's events"),
    any(
        libc::SYS_clone3,
        "the vring worker, request handler and relay threads",
    ),
    any(libc::SYS_clone, "the same threads, on older glibc"),
    any(libc::SYS_rt_sigprocmask, "thread creation and exit"),
    any(libc::SYS_rt_sigreturn, "signal return"),
    any(libc::SYS_sigaltstack, "thread start and exit (std's guard)"),
    any(libc::SYS_sched_getaffinity, "thread start"),
    any(libc::SYS_set_robust_list, "thread start"),
    any(libc::SYS_rseq, "thread start"),
    any(libc::SYS_gettid, "thread start (glibc)"),
    any(libc::SYS_prctl, "naming threads (PR_SET_NAME)"),
    any(libc::SYS_shutdown, "closing the vhost-user connection"),
    any(libc::SYS_getrandom, "HashMap seeds"),
    any(libc::SYS_exit, "thread exit"),
    any(libc::SYS_exit_group, "process exit"),
    any(libc::SYS_unlink, "removing the socket at exit"),
    any(libc::SYS_poll, "the vhost-user relay"),
    any(
        libc::SYS_recvfrom,
        "the relay's reads of message bodies (std's stream read)",
    ),
    any(libc::SYS_sendto, "the relay's writes (std's stream write)"),
    any(libc::SYS_ppoll, "the vhost-user relay"),
    any(
        libc::SYS_flock,
        "the shared node audit log (one chain, several writers)",
    ),
    any(libc::SYS_statx, "the audit log's size before an append"),
    any(
        libc::SYS_pread64,
        "the audit log's last record when another writer appended; the sealing key",
    ),
    any(
        libc::SYS_pwrite64,
        "the sealing key, overwritten in place when an epoch closes",
    ),
    any(
        libc::SYS_fdatasync,
        "audit records with --audit-sync always; the sealing key",
    ),
    any(libc::SYS_fsync, "audit log sync"),
    any(libc::SYS_sched_yield, "lock contention"),
    // The vDSO answers these without a syscall only while the clocksource is one it can
    // read (TSC, kvm-clock); a host that marks its TSC unstable (seen in the nested box)
    // makes every Instant::now() a real clock_gettime, and the vring worker was killed.
    any(
        libc::SYS_clock_gettime,
        "Instant::now, timestamps (vDSO fallback)",
    ),
    any(libc::SYS_clock_nanosleep, "sleeps"),
    when(
        libc::SYS_ioctl,
        1,
        IOCTLS,
        "TUNSETOFFLOAD when the guest acks offloads",
    ),
];

/// What the control thread adds: reading the policy directory and the registry on reload,
/// answering on its socket.
pub const CONTROL_EXTRA: &[Syscall] = &[
    any(
        libc::SYS_openat,
        "policy and registry files (read-only, as the unprivileged uid)",
    ),
    any(
        libc::SYS_getdents64,
        "listing the policy directory and the registry",
    ),
    any(libc::SYS_setsockopt, "timeouts on control connections"),
];

/// Syscalls an attacker would want and no netd thread makes; tests check each is refused.
pub const NEVER: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_ptrace,
    libc::SYS_setuid,
    libc::SYS_mount,
    libc::SYS_bpf,
    libc::SYS_process_vm_writev,
    libc::SYS_kill,
];

/// The datapath filter, compiled.
pub fn datapath() -> Result<BpfProgram, SeccompError> {
    enclave_seccomp::compile(&[DATAPATH], SeccompAction::KillProcess)
}

/// The control thread's filter, compiled.
pub fn control() -> Result<BpfProgram, SeccompError> {
    enclave_seccomp::compile(&[DATAPATH, CONTROL_EXTRA], SeccompAction::KillProcess)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_datapath_filter_allows_its_table_and_refuses_the_rest() {
        let p = datapath().unwrap();
        let mut refused = NEVER.to_vec();
        refused.extend([libc::SYS_openat, libc::SYS_getdents64, libc::SYS_setsockopt]);
        let wrong = enclave_seccomp::verify(&p, &[DATAPATH], &refused);
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[test]
    fn the_control_filter_adds_only_file_reads_and_socket_options() {
        let p = control().unwrap();
        let wrong = enclave_seccomp::verify(&p, &[DATAPATH, CONTROL_EXTRA], NEVER);
        assert!(wrong.is_empty(), "{wrong:#?}");
    }
}
