//! Per-thread seccomp filters. Each thread installs its own as the first thing it does,
//! before any guest code runs (the vCPUs wait on a barrier until every filter is in). A
//! syscall outside the list kills the whole process (`SECCOMP_RET_KILL_PROCESS`): a VMM
//! thread doing something unexpected is treated as compromised.
//!
//! Each syscall is listed with the code that needs it. The lists were taken from `strace -f`
//! of the integration tests (probe guest with vsock and vhost-user devices, API use) and
//! trimmed to what those call sites need; docs/vmm.md has the table.

use enclave_seccomp::{any, when, BpfProgram, SeccompAction, SeccompError, Syscall};

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
// fcntl: F_DUPFD_CLOEXEC for EventFd/UnixStream::try_clone (virtio activation on a vCPU,
// API connections); F_GETFD is std's check that an fd is open before closing it.
const FCNTL_CMDS: &[u64] = &[libc::F_GETFD as u64, libc::F_DUPFD_CLOEXEC as u64];

/// Syscalls every thread needs, with their callers.
pub const COMMON: &[Syscall] = &[
    any(libc::SYS_read, "eventfd reads, sockets, the serial log"),
    any(
        libc::SYS_write,
        "eventfd writes (irqfd, kicks), serial log, sockets, stderr",
    ),
    any(
        libc::SYS_futex,
        "Mutex/Condvar on device state and run state",
    ),
    any(libc::SYS_mmap, "the allocator (thread arenas)"),
    any(libc::SYS_munmap, "the allocator"),
    any(libc::SYS_madvise, "the allocator returning memory"),
    any(libc::SYS_mprotect, "the allocator growing a thread arena"),
    any(libc::SYS_brk, "the allocator on the main arena"),
    any(libc::SYS_close, "dropping sockets and fds"),
    any(
        libc::SYS_rt_sigprocmask,
        "thread exit and signal handling in std",
    ),
    any(
        libc::SYS_rt_sigreturn,
        "returning from the vCPU kick signal handler",
    ),
    any(
        libc::SYS_sigaltstack,
        "std's stack-overflow guard at thread exit",
    ),
    any(libc::SYS_exit, "thread exit"),
    any(libc::SYS_exit_group, "process exit"),
    any(libc::SYS_sched_yield, "lock contention"),
    any(
        libc::SYS_clock_gettime,
        "Instant::now when the vDSO is unavailable",
    ),
    any(libc::SYS_getrandom, "HashMap seeds"),
    any(libc::SYS_writev, "stderr messages"),
    when(
        libc::SYS_fcntl,
        1,
        FCNTL_CMDS,
        "try_clone (F_DUPFD_CLOEXEC), std's close check (F_GETFD)",
    ),
];

/// What a vCPU thread adds: KVM_RUN and device register emulation (virtio activation).
pub const VCPU: &[Syscall] = &[
    any(
        libc::SYS_sendmsg,
        "vhost-user messages when a driver activates a vhost-user device",
    ),
    any(libc::SYS_recvmsg, "vhost-user replies"),
    when(
        libc::SYS_ioctl,
        1,
        &[KVM_RUN, KVM_GET_REGS],
        "KVM_RUN, KVM_GET_REGS on an exit",
    ),
];

/// What the main thread adds after setup: the event loop, queues, vsock sockets.
pub const VMM: &[Syscall] = &[
    any(libc::SYS_epoll_wait, "the event loop"),
    any(
        libc::SYS_epoll_pwait,
        "the event loop (glibc may use the p-variant)",
    ),
    any(libc::SYS_epoll_ctl, "vsock stream registration"),
    any(libc::SYS_accept4, "vsock host connections on uds_path"),
    any(
        libc::SYS_socket,
        "vsock guest-initiated connections to <uds_path>_PORT",
    ),
    any(libc::SYS_connect, "vsock guest-initiated connections"),
    any(libc::SYS_shutdown, "vsock half-close from the guest"),
    any(libc::SYS_tgkill, "kicking vCPUs out of KVM_RUN at stop"),
    any(
        libc::SYS_getpid,
        "pthread_kill (the vCPU kick) asks for the thread group id",
    ),
    any(libc::SYS_recvfrom, "socket reads"),
    any(libc::SYS_sendto, "socket writes"),
    any(libc::SYS_sendmsg, "vhost-user messages"),
    any(libc::SYS_recvmsg, "vhost-user replies"),
    when(
        libc::SYS_ioctl,
        1,
        &[FIONBIO],
        "set_nonblocking on vsock streams",
    ),
];

/// What the API thread adds.
pub const API: &[Syscall] = &[
    any(libc::SYS_accept4, "API connections"),
    any(libc::SYS_setsockopt, "the API read timeout"),
    any(libc::SYS_tgkill, "kicking vCPUs out of KVM_RUN on pause"),
    any(libc::SYS_getpid, "pthread_kill (the vCPU kick)"),
    any(libc::SYS_clock_nanosleep, "waiting for vCPUs to park"),
    any(libc::SYS_nanosleep, "waiting for vCPUs to park"),
    any(libc::SYS_recvfrom, "socket reads"),
    any(libc::SYS_sendto, "socket writes"),
];

/// The tables a thread's filter is compiled from.
pub fn tables(kind: ThreadKind) -> [&'static [Syscall]; 2] {
    match kind {
        ThreadKind::Vcpu => [COMMON, VCPU],
        ThreadKind::Vmm => [COMMON, VMM],
        ThreadKind::Api => [COMMON, API],
    }
}

/// Compiles the filter for a thread.
pub fn filter(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    };
    enclave_seccomp::compile(&tables(kind), mismatch)
}

/// Installs the filter for `kind` on the calling thread (and sets no_new_privs).
pub fn install(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    enclave_seccomp::install(&filter(kind, mode)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Syscalls no VMM thread makes and an attacker would want.
    const NEVER: &[i64] = &[
        libc::SYS_execve,
        libc::SYS_openat,
        libc::SYS_ptrace,
        libc::SYS_mount,
        libc::SYS_setuid,
        libc::SYS_bpf,
        libc::SYS_process_vm_writev,
        libc::SYS_kill,
    ];

    #[test]
    fn each_thread_filter_allows_its_table_and_refuses_the_rest() {
        for kind in [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Api] {
            let p = filter(kind, SeccompMode::Kill).unwrap();
            let wrong = enclave_seccomp::verify(&p, &tables(kind), NEVER);
            assert!(wrong.is_empty(), "{kind:?}: {wrong:#?}");
        }
    }

    #[test]
    fn a_vcpu_may_not_make_vm_level_ioctls_or_sockets() {
        let p = filter(ThreadKind::Vcpu, SeccompMode::Kill).unwrap();
        // KVM_SET_USER_MEMORY_REGION, KVM_CREATE_VCPU: setup only, never from a vCPU.
        for req in [0x4020_ae46u64, 0xae41] {
            let got = enclave_seccomp::eval(&p, libc::SYS_ioctl, [3, req, 0, 0, 0, 0]);
            assert_eq!(
                got,
                Some(enclave_seccomp::RET_KILL_PROCESS),
                "ioctl {req:#x}"
            );
        }
        let got = enclave_seccomp::eval(&p, libc::SYS_socket, [0; 6]);
        assert_eq!(got, Some(enclave_seccomp::RET_KILL_PROCESS));
    }

    #[test]
    fn log_mode_logs_instead_of_killing() {
        let p = filter(ThreadKind::Api, SeccompMode::Log).unwrap();
        let got = enclave_seccomp::eval(&p, libc::SYS_execve, [0; 6]);
        assert_eq!(got, Some(0x7ffc_0000), "SECCOMP_RET_LOG");
    }
}
