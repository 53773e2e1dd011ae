//! Thin wrappers over the system calls the agent needs, each turning failure into an
//! error that names what was attempted.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// An error with the operation that failed.
pub type Result<T> = std::result::Result<T, String>;

/// `what: <errno text>` for the last OS error.
pub fn os_err(what: impl std::fmt::Display) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

/// A C string, or an error naming the field that held a NUL byte.
pub fn cstr(s: impl AsRef<OsStr>, field: &str) -> Result<CString> {
    CString::new(s.as_ref().as_bytes()).map_err(|_| format!("{field}: contains a NUL byte"))
}

/// `mount(2)`.
pub fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<()> {
    let src = source.map(|s| cstr(s, "mount source")).transpose()?;
    let tgt = cstr(target.as_os_str(), "mount target")?;
    let fst = fstype.map(|s| cstr(s, "mount type")).transpose()?;
    let dat = data.map(|s| cstr(s, "mount data")).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives the
    // call; mount(2) does not keep them.
    let rc = unsafe {
        libc::mount(
            ptr(&src),
            tgt.as_ptr(),
            ptr(&fst),
            flags,
            ptr(&dat).cast::<libc::c_void>(),
        )
    };
    if rc != 0 {
        return Err(os_err(format_args!(
            "mount {} on {} (type {})",
            source.unwrap_or("none"),
            target.display(),
            fstype.unwrap_or("none")
        )));
    }
    Ok(())
}

/// `umount2(2)`.
pub fn umount2(target: &Path, flags: libc::c_int) -> Result<()> {
    let tgt = cstr(target.as_os_str(), "umount target")?;
    // SAFETY: tgt is a valid C string for the duration of the call.
    if unsafe { libc::umount2(tgt.as_ptr(), flags) } != 0 {
        return Err(os_err(format_args!("umount {}", target.display())));
    }
    Ok(())
}

/// `clone(CLONE_PARENT | SIGCHLD)` with no new stack: a fork whose child is a child of our
/// parent. Returns 0 in the child and the child's pid in the parent. Only for
/// single-threaded callers (the helper modes).
pub fn clone_parent() -> Result<libc::pid_t> {
    // SAFETY: with a null stack the raw clone syscall behaves like fork; the caller is
    // single-threaded, so the child has a consistent copy of the whole process.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(os_err("clone"));
    }
    Ok(pid as libc::pid_t)
}

/// Writes a whole buffer to a raw fd (used on the status pipe, where std types are not
/// wanted because the fd must stay open across the helper's life).
pub fn write_fd(fd: libc::c_int, buf: &[u8]) {
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: the pointer and length describe the unwritten tail of `buf`.
        let n = unsafe { libc::write(fd, buf[off..].as_ptr().cast(), buf.len() - off) };
        if n <= 0 {
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        off += n as usize;
    }
}

/// Sets `FD_CLOEXEC` on an fd.
pub fn set_cloexec(fd: libc::c_int) {
    // SAFETY: fcntl on an fd number has no memory effects; a bad fd just fails.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
}

/// A pipe, both ends close-on-exec: (read, write).
pub fn pipe() -> io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

/// Sends a signal.
pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) has no memory effects.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel command line as `key=value` words (`key` alone gives an empty value).
pub fn cmdline() -> Vec<(String, String)> {
    let text = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    text.split_whitespace()
        .map(|w| match w.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (w.to_string(), String::new()),
        })
        .collect()
}

/// Milliseconds since boot (CLOCK_BOOTTIME).
pub fn uptime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Creates a directory and its parents, mode 0755.
pub fn mkdir_p(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| format!("mkdir {}: {e}", p.display()))
}

/// Logs a line on the console (the agent's stderr is /dev/console).
#[macro_export]
macro_rules! log {
    ($($t:tt)*) => {{
        // Never `eprintln!`: it panics when the write fails, and a PID 1 that cannot write
        // its console (an 8250 without its IRQ gives EIO) must keep serving, not abort.
        let _ = std::io::Write::write_fmt(
            &mut std::io::stderr(),
            format_args!("enclave-agent[{:>6}ms]: {}\n", $crate::sys::uptime_ms(), format_args!($($t)*)),
        );
    }};
}
