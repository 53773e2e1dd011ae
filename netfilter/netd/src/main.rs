//! `enclave-netd`: the vhost-user net backend in front of a pod's tap.
//!
//! Today it forwards every frame (the plain backend the VMM's vhost-user frontend is tested
//! and measured with); the zone-policy decision per frame is enclave-netd's next step and
//! has its place marked in backend.rs.

mod backend;
mod seccomp;

use enclave_netd::tap;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

const HELP: &str = "\
enclave-netd: vhost-user net backend in front of a pod's tap

USAGE:
    enclave-netd --socket PATH --tap NAME [--netns PATH] [--seccomp kill|off]

OPTIONS:
    --socket PATH   vhost-user socket to listen on (the VMM connects to it)
    --tap NAME      the tap to own (created if missing), in --netns if given
    --netns PATH    network namespace file to open the tap in (e.g. /var/run/netns/pod)
    --seccomp MODE  kill (default): a syscall outside the list kills netd; off: debugging
    -h, --help      this text

It serves one VM: it exits 0 when the VMM disconnects.
";

fn main() -> ExitCode {
    let mut socket: Option<PathBuf> = None;
    let mut tap_name: Option<String> = None;
    let mut netns: Option<PathBuf> = None;
    let mut filter = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                return ExitCode::SUCCESS;
            }
            "--socket" => socket = args.next().map(PathBuf::from),
            "--tap" => tap_name = args.next(),
            "--netns" => netns = args.next().map(PathBuf::from),
            "--seccomp" => filter = args.next().as_deref() != Some("off"),
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    let (Some(socket), Some(tap_name)) = (socket, tap_name) else {
        return usage("--socket and --tap are required");
    };
    match run(&socket, &tap_name, netns.as_deref(), filter) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("enclave-netd: {e}");
            ExitCode::from(1)
        }
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("enclave-netd: {msg}\n\n{HELP}");
    ExitCode::from(2)
}

fn run(
    socket: &std::path::Path,
    tap_name: &str,
    netns: Option<&std::path::Path>,
    filter: bool,
) -> Result<(), String> {
    if let Some(ns) = netns {
        tap::enter_netns(ns)
            .map_err(|e| format!("entering network namespace {}: {e}", ns.display()))?;
    }
    let tap = tap::open(tap_name).map_err(|e| format!("opening tap {tap_name}: {e}"))?;
    let tap_fd = std::os::fd::AsRawFd::as_raw_fd(&tap);
    let backend = Arc::new(RwLock::new(backend::NetBackend::new(tap)));
    let mut daemon = VhostUserDaemon::new(
        "enclave-netd".into(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| format!("vhost-user daemon: {e}"))?;
    let mut listener = Listener::new(socket, true)
        .map_err(|e| format!("listening on {}: {e}", socket.display()))?;
    let handlers = daemon.get_epoll_handlers();
    let handler = handlers.first().ok_or("vhost-user daemon has no worker")?;
    handler
        .register_listener(
            tap_fd,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
            backend::TAP_TOKEN,
        )
        .map_err(|e| format!("watching the tap: {e}"))?;
    if filter {
        // Every thread (this one and the library's vring worker) before any guest memory is
        // mapped: the memory table arrives only after start().
        seccomp::install_all_threads()?;
    }
    daemon
        .start(&mut listener)
        .map_err(|e| format!("vhost-user: {e}"))?;
    let result = daemon.wait();
    // The vring worker waits for an exit event only `serve` can send; netd serves one VM, so
    // leave the workers to die with the process instead of joining them.
    std::mem::forget(daemon);
    match result {
        Ok(()) => Ok(()),
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(format!("vhost-user: {e}")),
    }
}
