//! `enclave-agent`: PID 1 of an Enclave guest.
//!
//! Run by the kernel from the initramfs, it moves the root to a tmpfs (so containers can
//! `pivot_root`), mounts the kernel filesystems, loads the modules the image carries, mounts
//! the shared filesystem, sets up cgroups, reaps every exited process and serves the agent
//! protocol on vsock port 1024. Containers are started through two helper modes of the
//! same binary (`__container-init`, `__exec`), each a fresh single-threaded process that
//! enters namespaces and clones the container process as a child of the agent.

mod container;
mod init;
mod net;
mod probe;
mod reaper;
mod service;
mod spawn;
mod spec;
mod sys;

const HELP: &str = "\
enclave-agent: PID 1 of an Enclave microVM guest.

It is started by the guest kernel (as /init in the initramfs) and serves the Enclave agent
protocol (ttrpc) on vsock port 1024. It is not meant to be run by hand.

Kernel command line parameters it reads:
  enclave.hostname=NAME     guest hostname (default: enclave)
  enclave.shared=TAG        virtio-fs tag mounted at /run/enclave/shared (container rootfs)
  enclave.debug=1           log every request on the console
  MODULE.PARAM=VALUE        passed to MODULE when the agent loads it (virtio_mmio.device=...)

Usage: enclave-agent [--help | --version]";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("__container-init") => spawn::container_init_helper(args.get(2)),
        Some("__exec") => spawn::exec_helper(args.get(2)),
        Some("-h" | "--help") => println!("{HELP}"),
        Some("-V" | "--version") => println!("enclave-agent {}", env!("CARGO_PKG_VERSION")),
        _ if std::process::id() == 1 => init::run(),
        _ => {
            eprintln!("enclave-agent: must run as PID 1 in an Enclave guest (see --help)");
            std::process::exit(2);
        }
    }
}
