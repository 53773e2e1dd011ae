//! Checking seccomp filters in the kernel, not just on paper: run a test body in a child
//! process under a real filter and see how the child ends; list a process's threads with
//! their `Seccomp:` mode; make a thread of a running process issue a syscall (ptrace), to
//! show that its filter kills the process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test support

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus};

use crate::procfs::status_field;

/// The environment variable a re-executed test reads to know it is the child.
const CHILD: &str = "ENCLAVE_SECCOMP_CHILD";

/// In a test: `Some(case)` when this process is the child [`run_child`] started.
pub fn child_case() -> Option<String> {
    std::env::var(CHILD).ok()
}

/// Runs test `test` of the current test binary again in a child process with
/// `ENCLAVE_SECCOMP_CHILD=case`, and returns how the child ended.
pub fn run_child(test: &str, case: &str) -> ExitStatus {
    let exe = std::env::current_exe().unwrap();
    Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, case)
        .output()
        .unwrap()
        .status
}

/// Whether `status` is death by SIGSYS, which is how `SECCOMP_RET_KILL_PROCESS` ends a
/// process.
pub fn killed_by_seccomp(status: &ExitStatus) -> bool {
    status.signal() == Some(libc::SIGSYS)
}

/// Every thread of `pid` as (tid, name, `Seccomp:` mode).
pub fn threads(pid: u32) -> Vec<(i32, String, String)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_string_lossy().parse().ok()?;
            let field = |k: &str| status_field(&t.path().join("status"), k).join(" ");
            Some((tid, field("Name:"), field("Seccomp:")))
        })
        .collect()
}

/// Makes thread `tid` (blocked in a syscall) issue syscall `nr` with `args` on its next
/// instruction, through ptrace: it is stopped, its registers point back at the `syscall`
/// instruction it is blocked in, with `nr` and `args`, and it is let go. The thread runs
/// the syscall as its own, under its own filter.
pub fn inject_syscall(tid: i32, nr: i64, args: [u64; 3]) -> Result<(), String> {
    let os = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: ptrace on a thread of another process; every pointer is to a local.
    unsafe {
        if libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) != 0 {
            return Err(os("PTRACE_SEIZE"));
        }
        if libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) != 0 {
            return Err(os("PTRACE_INTERRUPT"));
        }
        let mut st = 0;
        if libc::waitpid(tid, &mut st, libc::__WALL) != tid {
            return Err(os("waitpid"));
        }
        let mut regs: libc::user_regs_struct = std::mem::zeroed();
        if libc::ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut _) != 0 {
            return Err(os("PTRACE_GETREGS"));
        }
        // Blocked in a syscall: rip is just past its `syscall` instruction (0f 05).
        let at = regs.rip - 2;
        *libc::__errno_location() = 0;
        let word = libc::ptrace(libc::PTRACE_PEEKTEXT, tid, at, 0);
        if word & 0xffff != 0x050f {
            let _ = libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0);
            return Err(format!(
                "thread {tid} is not blocked in a syscall (at {at:#x}: {word:#x})"
            ));
        }
        regs.rip = at;
        regs.rax = nr as u64;
        // No syscall restart on the way out of the stop: the registers are ours.
        regs.orig_rax = u64::MAX;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        if libc::ptrace(libc::PTRACE_SETREGS, tid, 0, &regs as *const _) != 0 {
            return Err(os("PTRACE_SETREGS"));
        }
        if libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0) != 0 {
            return Err(os("PTRACE_DETACH"));
        }
    }
    Ok(())
}
