//! Per-thread seccomp filters. Each thread installs its own as the first thing it does,
//! before any guest code runs (the vCPUs wait on a barrier until every filter is in). A
//! syscall outside the list kills the whole process (`SECCOMP_RET_KILL_PROCESS`): a VMM
//! thread doing something unexpected is treated as compromised.
//!
//! Each syscall is listed with the code that needs it. The lists were taken from `strace -f`
//! of the integration tests (probe guest with vsock and vhost-user devices, API use) and
//! trimmed to what those call sites need; docs/vmm.md has the table.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Which thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread after setup: event loop, virtio queue processing, vsock sockets.
    Vmm,
    /// A vCPU: KVM_RUN and device register emulation (including virtio activation).
    Vcpu,
    /// The control API.
    Api,
}

/// What happens on a syscall outside the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompMode {
    /// Kill the process (the default).
    Kill,
    /// Allow and log to the kernel audit log (for finding a missing syscall; never in
    /// production).
    Log,
    /// No filter (debugging only).
    Off,
}

// KVM ioctl request numbers the vCPU threads may use.
const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;
// FIONBIO: std's set_nonblocking.
const FIONBIO: u64 = 0x5421;

fn ioctl_rule(reqs: &[u64]) -> Vec<SeccompRule> {
    arg_rule(1, reqs)
}

/// Allows the syscall when argument `arg` equals one of `values`.
fn arg_rule(arg: u8, values: &[u64]) -> Vec<SeccompRule> {
    values
        .iter()
        .filter_map(|&r| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, r).ok()
        })
        .filter_map(|c| SeccompRule::new(vec![c]).ok())
        .collect()
}

/// Syscalls every thread needs, with their callers.
const COMMON: &[(i64, &str)] = &[
    (libc::SYS_read, "eventfd reads, sockets, the serial log"),
    (
        libc::SYS_write,
        "eventfd writes (irqfd, kicks), serial log, sockets, stderr",
    ),
    (
        libc::SYS_futex,
        "Mutex/Condvar on device state and run state",
    ),
    (libc::SYS_mmap, "the allocator (thread arenas)"),
    (libc::SYS_munmap, "the allocator"),
    (libc::SYS_madvise, "the allocator returning memory"),
    (libc::SYS_mprotect, "the allocator growing a thread arena"),
    (libc::SYS_brk, "the allocator on the main arena"),
    (libc::SYS_close, "dropping sockets and fds"),
    (
        libc::SYS_rt_sigprocmask,
        "thread exit and signal handling in std",
    ),
    (
        libc::SYS_rt_sigreturn,
        "returning from the vCPU kick signal handler",
    ),
    (
        libc::SYS_sigaltstack,
        "std's stack-overflow guard at thread exit",
    ),
    (libc::SYS_exit, "thread exit"),
    (libc::SYS_exit_group, "process exit"),
    (libc::SYS_sched_yield, "lock contention"),
    (
        libc::SYS_clock_gettime,
        "Instant::now when the vDSO is unavailable",
    ),
    (libc::SYS_getrandom, "HashMap seeds"),
    (libc::SYS_writev, "stderr messages"),
];

fn rules_for(kind: ThreadKind) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut m: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, _why) in COMMON {
        m.insert(*nr, vec![]);
    }
    let extra: &[(i64, &str)] = match kind {
        ThreadKind::Vcpu => &[
            (
                libc::SYS_sendmsg,
                "vhost-user messages when a driver activates a vhost-user device",
            ),
            (libc::SYS_recvmsg, "vhost-user replies"),
            (
                libc::SYS_fcntl,
                "EventFd::try_clone (F_DUPFD_CLOEXEC) on activation",
            ),
        ],
        ThreadKind::Vmm => &[
            (libc::SYS_epoll_wait, "the event loop"),
            (
                libc::SYS_epoll_pwait,
                "the event loop (glibc may use the p-variant)",
            ),
            (libc::SYS_epoll_ctl, "vsock stream registration"),
            (libc::SYS_accept4, "vsock host connections on uds_path"),
            (
                libc::SYS_socket,
                "vsock guest-initiated connections to <uds_path>_PORT",
            ),
            (libc::SYS_connect, "vsock guest-initiated connections"),
            (libc::SYS_shutdown, "vsock half-close from the guest"),
            (libc::SYS_tgkill, "kicking vCPUs out of KVM_RUN at stop"),
            (
                libc::SYS_getpid,
                "pthread_kill (the vCPU kick) asks for the thread group id",
            ),
            (libc::SYS_recvfrom, "socket reads"),
            (libc::SYS_sendto, "socket writes"),
            (libc::SYS_sendmsg, "vhost-user messages"),
            (libc::SYS_recvmsg, "vhost-user replies"),
        ],
        ThreadKind::Api => &[
            (libc::SYS_accept4, "API connections"),
            (libc::SYS_setsockopt, "the API read timeout"),
            (libc::SYS_tgkill, "kicking vCPUs out of KVM_RUN on pause"),
            (libc::SYS_getpid, "pthread_kill (the vCPU kick)"),
            (libc::SYS_clock_nanosleep, "waiting for vCPUs to park"),
            (libc::SYS_nanosleep, "waiting for vCPUs to park"),
            (libc::SYS_recvfrom, "socket reads"),
            (libc::SYS_sendto, "socket writes"),
        ],
    };
    for (nr, _why) in extra {
        m.insert(*nr, vec![]);
    }
    match kind {
        ThreadKind::Vcpu => {
            m.insert(libc::SYS_ioctl, ioctl_rule(&[KVM_RUN, KVM_GET_REGS]));
        }
        ThreadKind::Vmm => {
            m.insert(libc::SYS_ioctl, ioctl_rule(&[FIONBIO]));
        }
        ThreadKind::Api => {}
    }
    // fcntl: F_DUPFD_CLOEXEC for EventFd/UnixStream::try_clone (virtio activation on a vCPU,
    // API connections); F_GETFD is std's check that an fd is open before closing it.
    m.insert(
        libc::SYS_fcntl,
        arg_rule(1, &[libc::F_GETFD as u64, libc::F_DUPFD_CLOEXEC as u64]),
    );
    m
}

/// Compiles the filter for a thread.
pub fn filter(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, String> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    };
    let f = SeccompFilter::new(
        rules_for(kind),
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| e.to_string())?;
    f.try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

/// Installs the filter for `kind` on the calling thread (and sets no_new_privs).
pub fn install(kind: ThreadKind, mode: SeccompMode) -> Result<(), String> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    let prog = filter(kind, mode)?;
    seccompiler::apply_filter(&prog).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_filter_compiles() {
        for k in [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Api] {
            assert!(filter(k, SeccompMode::Kill).unwrap().len() > 10);
        }
    }
}
