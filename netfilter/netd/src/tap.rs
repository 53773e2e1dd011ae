//! The pod's tap: opened (or created) in the pod's network namespace, with a virtio-net
//! header on every frame so guest buffers go to and from the tap unchanged.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;

/// `TUNSETOFFLOAD` flag: the reader takes frames with a partial checksum.
pub const TUN_F_CSUM: libc::c_ulong = 0x01;
/// `TUNSETOFFLOAD` flag: the reader takes TCPv4 segmentation offload frames.
pub const TUN_F_TSO4: libc::c_ulong = 0x02;
/// `TUNSETOFFLOAD` flag: the reader takes TCPv6 segmentation offload frames.
pub const TUN_F_TSO6: libc::c_ulong = 0x04;
/// The `TUNSETOFFLOAD` request (seccomp allows `ioctl` with this request only).
pub const TUNSETOFFLOAD_REQ: libc::c_ulong = TUNSETOFFLOAD;

/// Which offloaded frames the tap may hand its reader (frames *to* the guest): `TUN_F_*`.
pub fn set_offload(tap: &File, flags: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes an integer flag set by value.
    if unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETOFFLOAD, flags) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Length of `virtio_net_hdr_v1`, the header on every frame with VIRTIO_F_VERSION_1.
pub const VNET_HDR_LEN: usize = 12;

/// Opens tap `name` inside the network namespace at `netns`, from a thread of its own (the
/// namespace switch is per thread), and returns it; the caller stays where it is.
pub fn open_in(netns: &Path, name: &str) -> std::io::Result<File> {
    let (netns, name) = (netns.to_path_buf(), name.to_string());
    std::thread::spawn(move || {
        enter_netns(&netns)?;
        open(&name)
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("tap thread panicked")))
}

/// Enters the network namespace at `path` (e.g. /var/run/netns/NAME) for this thread.
pub fn enter_netns(path: &Path) -> std::io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: setns on a valid fd with the namespace type it must be.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Opens tap `name` (creating it if it does not exist) with the vnet header and no offloads,
/// non-blocking.
pub fn open(name: &str) -> std::io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("tap name {name:?}: 1 to 15 bytes"),
        ));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    // SAFETY: TUNSETIFF reads and writes an ifreq we own.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let hdr = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads an int we own.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // No offloads: the kernel hands us whole, checksummed frames, the same ones a policy
    // would see on the wire.
    // SAFETY: TUNSETOFFLOAD takes an integer flag set by value.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tun)
}
