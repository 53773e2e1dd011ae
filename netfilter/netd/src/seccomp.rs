//! enclave-netd's seccomp filters, default kill, each syscall with the code that needs it.
//!
//! Two filters. The datapath filter is installed by the main thread before the vhost-user
//! connection exists (no guest memory is mapped yet) and is inherited by every thread made
//! after it: the relay, the vhost-user request handler, the vring worker that decides
//! frames. The control thread, which never touches guest memory, installs its own first
//! thing: the datapath list plus what reading the policy directory and the registry takes.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

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
    (libc::SYS_poll, "the vhost-user relay"),
    (
        libc::SYS_recvfrom,
        "the relay's reads of message bodies (std's stream read)",
    ),
    (libc::SYS_sendto, "the relay's writes (std's stream write)"),
    (libc::SYS_ppoll, "the vhost-user relay"),
    (
        libc::SYS_flock,
        "the shared node audit log (one chain, several writers)",
    ),
    (libc::SYS_statx, "the audit log's size before an append"),
    (
        libc::SYS_pread64,
        "the audit log's last record when another writer appended",
    ),
    (
        libc::SYS_fdatasync,
        "audit records with --audit-sync always",
    ),
    (libc::SYS_fsync, "audit log sync"),
];

/// What the control thread adds: reading the policy directory and the registry on reload,
/// answering on its socket.
const CONTROL_EXTRA: &[(i64, &str)] = &[
    (
        libc::SYS_openat,
        "policy and registry files (read-only, as the unprivileged uid)",
    ),
    (
        libc::SYS_getdents64,
        "listing the policy directory and the registry",
    ),
    (libc::SYS_setsockopt, "timeouts on control connections"),
    (
        libc::SYS_sched_yield,
        "lock contention with the vring worker",
    ),
];

fn filter(lists: &[&[(i64, &str)]]) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = lists
        .iter()
        .flat_map(|l| l.iter())
        .map(|(nr, _)| (*nr, vec![]))
        .collect();
    // ioctl: only TUNSETOFFLOAD (the tap's receive offloads follow the guest's features).
    let tunsetoffload = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        u64::from(enclave_netd::tap::TUNSETOFFLOAD_REQ as u32),
    )
    .map_err(|e| e.to_string())?;
    rules.insert(
        libc::SYS_ioctl,
        vec![SeccompRule::new(vec![tunsetoffload]).map_err(|e| e.to_string())?],
    );
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

/// Installs the datapath filter on the calling thread (and so on every thread it makes).
pub fn install_datapath() -> Result<(), String> {
    seccompiler::apply_filter(&filter(&[ALLOWED])?).map_err(|e| format!("seccomp: {e}"))
}

/// Installs the control thread's filter on the calling thread.
pub fn install_control() -> Result<(), String> {
    seccompiler::apply_filter(&filter(&[ALLOWED, CONTROL_EXTRA])?)
        .map_err(|e| format!("seccomp: {e}"))
}
