//! enclave-netd's seccomp filter, on every thread (TSYNC), default kill. Each syscall with
//! the code that needs it.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

const ALLOWED: &[(i64, &str)] = &[
    (libc::SYS_read, "tap reads, eventfds"),
    (libc::SYS_write, "tap writes, eventfds (call/irqfd), stderr"),
    (libc::SYS_readv, "tap reads"),
    (libc::SYS_writev, "stderr"),
    (libc::SYS_recvmsg, "vhost-user messages with fds"),
    (libc::SYS_sendmsg, "vhost-user replies"),
    (libc::SYS_accept4, "the VMM's vhost-user connection"),
    (libc::SYS_epoll_wait, "the vring worker"),
    (libc::SYS_epoll_pwait, "the vring worker"),
    (libc::SYS_epoll_ctl, "kick and tap registration"),
    (
        libc::SYS_mmap,
        "mapping guest memory (SET_MEM_TABLE), the allocator",
    ),
    (libc::SYS_munmap, "unmapping guest memory, the allocator"),
    (libc::SYS_mprotect, "the allocator"),
    (libc::SYS_madvise, "the allocator"),
    (libc::SYS_brk, "the allocator"),
    (libc::SYS_close, "fds from the VMM"),
    (libc::SYS_fcntl, "fd flags"),
    (libc::SYS_futex, "locks between the two threads"),
    (libc::SYS_fstat, "sizing the memory fd"),
    (libc::SYS_newfstatat, "sizing the memory fd"),
    (libc::SYS_lseek, "file offsets"),
    (libc::SYS_eventfd2, "the library's events"),
    (libc::SYS_clone3, "the library's worker thread on reconnect"),
    (libc::SYS_clone, "the library's worker thread on reconnect"),
    (libc::SYS_rt_sigprocmask, "thread creation and exit"),
    (libc::SYS_rt_sigreturn, "signal return"),
    (libc::SYS_sigaltstack, "thread exit"),
    (libc::SYS_sched_getaffinity, "thread start"),
    (libc::SYS_set_robust_list, "thread start"),
    (libc::SYS_rseq, "thread start"),
    (libc::SYS_gettid, "thread start (glibc)"),
    (
        libc::SYS_prctl,
        "naming the connection thread (PR_SET_NAME)",
    ),
    (libc::SYS_shutdown, "closing the vhost-user connection"),
    (libc::SYS_getrandom, "HashMap seeds"),
    (libc::SYS_exit, "thread exit"),
    (libc::SYS_exit_group, "process exit"),
    (libc::SYS_unlink, "removing the socket at exit"),
];

fn filter() -> Result<BpfProgram, String> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|(nr, _)| (*nr, vec![])).collect();
    SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| e.to_string())?
    .try_into()
    .map_err(|e: seccompiler::BackendError| e.to_string())
}

/// Installs the filter on every thread of the process.
pub fn install_all_threads() -> Result<(), String> {
    seccompiler::apply_filter_all_threads(&filter()?).map_err(|e| format!("seccomp: {e}"))
}
