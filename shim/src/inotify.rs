//! Waiting for a file to be (re)placed in a directory, through inotify: what the shim uses to
//! follow the cluster map enclave-node renames into the peer directory.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// An inotify watch on one directory for files written and closed, or renamed in.
pub struct DirWatch {
    fd: OwnedFd,
}

impl DirWatch {
    /// Watches `dir`.
    pub fn new(dir: &Path) -> std::io::Result<DirWatch> {
        // SAFETY: no pointers; the kernel returns a new descriptor or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor; we are its only owner.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: `path` is a NUL-terminated string that outlives the call.
        let wd = unsafe {
            libc::inotify_add_watch(
                fd.as_raw_fd(),
                path.as_ptr(),
                libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE,
            )
        };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DirWatch { fd })
    }

    /// Blocks until `name` in the directory is renamed in or written and closed.
    pub fn wait_for(&self, name: &str) -> std::io::Result<()> {
        loop {
            if self.read_names(true)?.iter().any(|n| n == name) {
                return Ok(());
            }
        }
    }

    /// Discards the events already queued.
    pub fn drain(&self) {
        let _ = self.read_names(false);
    }

    fn read_names(&self, block: bool) -> std::io::Result<Vec<String>> {
        if !block {
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the call.
            if unsafe { libc::poll(&mut p, 1, 0) } <= 0 {
                return Ok(Vec::new());
            }
        }
        let mut buf = [0u8; 4096];
        // SAFETY: reads at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(Vec::new());
            }
            return Err(e);
        }
        Ok(parse_events(&buf[..n as usize]))
    }
}

/// The names in a buffer of inotify events (what the kernel wrote; a short tail is ignored).
fn parse_events(mut b: &[u8]) -> Vec<String> {
    const HEAD: usize = std::mem::size_of::<libc::inotify_event>();
    let mut names = Vec::new();
    while b.len() >= HEAD {
        // The header's last field is `len`, the length of the NUL-padded name that follows.
        let len = u32::from_ne_bytes([b[12], b[13], b[14], b[15]]) as usize;
        let Some(name) = b.get(HEAD..HEAD + len) else {
            break;
        };
        let end = name.iter().position(|c| *c == 0).unwrap_or(name.len());
        names.push(String::from_utf8_lossy(&name[..end]).into_owned());
        b = &b[HEAD + len..];
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rename_into_the_directory_wakes_the_waiter() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let w = DirWatch::new(d.path()).unwrap_or_else(|e| panic!("{e}"));
        let dir = d.path().to_path_buf();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            std::fs::write(dir.join("other.json"), b"x").ok();
            std::fs::write(dir.join(".m.tmp"), b"{}").ok();
            std::fs::rename(dir.join(".m.tmp"), dir.join("cluster.json")).ok();
        });
        w.wait_for("cluster.json").unwrap_or_else(|e| panic!("{e}"));
        t.join().ok();
        assert!(d.path().join("cluster.json").exists());
    }
}
