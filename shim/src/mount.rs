//! The container's root filesystem: containerd hands over mounts (an overlay of the
//! snapshot) that the shim mounts at `<bundle>/rootfs`, where virtio-fs shares it into the
//! guest; and unmounts at delete.

use std::ffi::CString;
use std::path::Path;

use containerd_shim_protos::api::Mount;

/// Splits mount options into flags and the data string the file system gets.
pub fn parse_options(options: &[String]) -> (libc::c_ulong, String) {
    let mut flags: libc::c_ulong = 0;
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= libc::MS_RDONLY,
            "rw" => {}
            "nosuid" => flags |= libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            "bind" => flags |= libc::MS_BIND,
            "rbind" => flags |= libc::MS_BIND | libc::MS_REC,
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

fn cstr(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"))
}

/// Mounts containerd's rootfs mounts at `target`, in order.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("{}: {e}", target.display()))?;
    let t = cstr(&target.to_string_lossy())?;
    for m in mounts {
        let (flags, data) = parse_options(&m.options);
        let (src, kind, data) = (cstr(&m.source)?, cstr(&m.type_)?, cstr(&data)?);
        // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                t.as_ptr(),
                kind.as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(format!(
                "mounting the container rootfs ({} {} at {}): {}",
                m.type_,
                m.source,
                target.display(),
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Unmounts whatever is mounted at `target` (lazily; nothing there is fine).
pub fn unmount(target: &Path) {
    if let Ok(t) = cstr(&target.to_string_lossy()) {
        // SAFETY: umount2 with a NUL-terminated path.
        while unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) } == 0 {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let (f, d) = parse_options(&["ro".into(), "lowerdir=/a:/b".into(), "upperdir=/u".into()]);
        assert_eq!(f, libc::MS_RDONLY);
        assert_eq!(d, "lowerdir=/a:/b,upperdir=/u");
    }
}
