//! `enclave-netd`: the vhost-user net backend in front of a pod's tap, and the place the
//! zone policy decides every frame. See docs/netd.md.

mod backend;
mod control;
mod gate;

use enclave_netd::{filters, proxy, tap};
use enclave_netfilter::audit::{AuditLog, AuditLogConfig, SyncPolicy};
use enclave_netfilter::node::{self, RegistryEntry};

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, RwLock};

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

const HELP: &str = "\
enclave-netd: the vhost-user net backend in front of a pod's tap; every frame is decided
by the node's zone policy, and every decision worth keeping goes to the node's audit log

USAGE:
    enclave-netd --socket PATH --tap NAME [--netns PATH] --pod FILE [OPTIONS]
    enclave-netd --socket PATH --tap NAME [--netns PATH] --forward-only

OPTIONS:
    --socket PATH      vhost-user socket to listen on (the VMM connects to it)
    --tap NAME         the tap to own (created if missing), in --netns if given
    --netns PATH       network namespace file to open the tap in (e.g. /var/run/netns/pod)
    --pod FILE         this pod's registry entry (JSON: name, namespace, annotations, ips,
                       mac), as the shim writes it
    --policy-dir DIR   the node's policy directory [/etc/enclave/policies]
    --registry DIR     the node's pod registry, for peers' zones [/run/enclave/workloads]
    --peer-dir DIR     the node's peer directory: the cluster's pods, as enclave-node
                       publishes them (cluster.json; none is fine) [/run/enclave/peers]
    --audit-log PATH   the node's audit log, shared by every netd [/var/log/enclave/audit.log]
    --audit-sync MODE  never (default): records survive netd being killed; always:
                       fdatasync each record, survives power loss
    --capture-file PATH  append a pcapng section of the flow's recent frames here for every
                       denial and inspection finding recorded (card numbers masked); the
                       record names the section [none: no captures]
    --capture-max MIB  stop capturing once the file holds this much [256]
    --names-socket PATH  send each address the pod learns for a name zone (DNS answers)
                       to this datagram socket as `SET ADDRESS TTL`: the shim adds it to
                       the pod's nftables name set [none: the wall never opens to names]
    --control PATH     control socket: `reload`, `peers` (re-read who the peers are, keep
                       the policy), `metrics` (Prometheus text), `status`
    --user UID:GID     drop to this uid/gid once the tap and sockets are open
                       [65534:65534 when started as root]
    --node NAME        node name in audit records [the hostname]
    --forward-only     no policy, no audit: every frame passes (benchmark baseline only)
    --seccomp MODE     kill (default): a syscall outside the list kills netd; off: debugging
    -h, --help         this text

SIGHUP or `reload` on the control socket re-reads the policy directory and the registry:
flows still allowed go on, flows now denied are cut and recorded. A policy that does not
load leaves the old one in force. netd serves one VM and exits 0 when the VMM disconnects;
if it dies the pod has no network (nothing else holds the tap).
";

struct Args {
    socket: PathBuf,
    tap: String,
    netns: Option<PathBuf>,
    pod: Option<PathBuf>,
    policy_dir: PathBuf,
    registry: PathBuf,
    peer_dir: PathBuf,
    audit_log: PathBuf,
    audit_sync: SyncPolicy,
    capture_file: Option<PathBuf>,
    capture_max_mib: u64,
    names_socket: Option<PathBuf>,
    control: Option<PathBuf>,
    user: Option<(u32, u32)>,
    node: Option<String>,
    forward_only: bool,
    filter: bool,
}

fn parse() -> Result<Option<Args>, String> {
    let mut socket = None;
    let mut tap_name = None;
    let mut a = Args {
        socket: PathBuf::new(),
        tap: String::new(),
        netns: None,
        pod: None,
        policy_dir: node::POLICY_DIR.into(),
        registry: node::REGISTRY_DIR.into(),
        peer_dir: node::PEER_DIR.into(),
        audit_log: node::AUDIT_LOG.into(),
        audit_sync: SyncPolicy::Never,
        capture_file: None,
        capture_max_mib: 256,
        names_socket: None,
        control: None,
        user: None,
        node: None,
        forward_only: false,
        filter: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--socket" => socket = Some(PathBuf::from(val()?)),
            "--tap" => tap_name = Some(val()?),
            "--netns" => a.netns = Some(val()?.into()),
            "--pod" => a.pod = Some(val()?.into()),
            "--policy-dir" => a.policy_dir = val()?.into(),
            "--registry" => a.registry = val()?.into(),
            "--peer-dir" => a.peer_dir = val()?.into(),
            "--audit-log" => a.audit_log = val()?.into(),
            "--audit-sync" => {
                a.audit_sync = match val()?.as_str() {
                    "always" => SyncPolicy::Always,
                    "never" => SyncPolicy::Never,
                    o => return Err(format!("--audit-sync {o:?}: always or never")),
                }
            }
            "--capture-file" => a.capture_file = Some(val()?.into()),
            "--capture-max" => {
                let v = val()?;
                a.capture_max_mib = v
                    .parse()
                    .map_err(|_| format!("--capture-max {v:?}: a whole number of MiB"))?;
            }
            "--names-socket" => a.names_socket = Some(val()?.into()),
            "--control" => a.control = Some(val()?.into()),
            "--user" => {
                let v = val()?;
                let (u, g) = v
                    .split_once(':')
                    .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
                    .ok_or_else(|| format!("--user {v:?}: UID:GID, numeric"))?;
                a.user = Some((u, g));
            }
            "--node" => a.node = Some(val()?),
            "--forward-only" => a.forward_only = true,
            "--seccomp" => {
                a.filter = match val()?.as_str() {
                    "kill" => true,
                    "off" => false,
                    o => return Err(format!("--seccomp {o:?}: kill or off")),
                }
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    a.socket = socket.ok_or("--socket is required")?;
    a.tap = tap_name.ok_or("--tap is required")?;
    if a.pod.is_none() && !a.forward_only {
        return Err("--pod FILE is required (or --forward-only for a baseline)".into());
    }
    Ok(Some(a))
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("enclave-netd: {e}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("enclave-netd: {e}");
            ExitCode::from(1)
        }
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Drops to `uid:gid` with no supplementary groups (and so every capability).
fn drop_privileges(uid: u32, gid: u32) -> Result<(), String> {
    // SAFETY: plain syscalls on integers; called while this is the only thread.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(gid, gid, gid) != 0
            || libc::setresuid(uid, uid, uid) != 0
        {
            return Err(format!(
                "dropping to {uid}:{gid}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn bind_fresh(path: &Path) -> Result<UnixListener, String> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|e| format!("listening on {}: {e}", path.display()))
}

fn run(a: Args) -> Result<(), String> {
    // Everything that needs privilege or the filesystem, first: the gate (policy, registry,
    // audit log), the tap, the sockets.
    let node_name = a.node.clone().unwrap_or_else(hostname);
    let gate = match &a.pod {
        Some(pod_file) if !a.forward_only => {
            let pod = RegistryEntry::load(pod_file)?;
            // Sealed when the node has a key (`enclavectl audit keygen`): the key file is
            // opened here, before the filter, and rewritten in place from then on.
            let log =
                AuditLog::open_shared(AuditLogConfig::node(a.audit_log.clone(), a.audit_sync))
                    .map_err(|e| format!("audit log: {e}"))?;
            let mut g = gate::Gate::new_enforcing(
                gate::Sources {
                    policy_dir: a.policy_dir.clone(),
                    registry: a.registry.clone(),
                    peer_dir: Some(a.peer_dir.clone()),
                    pod,
                    node: node_name,
                },
                log,
            )?;
            // The capture file, like the audit log, is opened now and only appended to.
            if let (Some(path), Some(e)) = (&a.capture_file, g.enforcing_mut()) {
                e.captures = Some(gate::Captures::open(
                    path.clone(),
                    a.capture_max_mib.saturating_mul(1 << 20),
                    &a.tap,
                )?);
            }
            // Connected now (the socket belongs to root) and written without blocking.
            if let (Some(path), Some(e)) = (&a.names_socket, g.enforcing_mut()) {
                let s = std::os::unix::net::UnixDatagram::unbound()
                    .and_then(|s| s.connect(path).map(|()| s))
                    .and_then(|s| s.set_nonblocking(true).map(|()| s))
                    .map_err(|e| format!("names socket {}: {e}", path.display()))?;
                e.names_out = Some(s);
            }
            g
        }
        _ => gate::Gate::forward_only(),
    };
    if let Some(ns) = &a.netns {
        tap::enter_netns(ns)
            .map_err(|e| format!("entering network namespace {}: {e}", ns.display()))?;
    }
    let tap = tap::open(&a.tap).map_err(|e| format!("opening tap {}: {e}", a.tap))?;
    let tap_fd = std::os::fd::AsRawFd::as_raw_fd(&tap);
    // The VMM talks to the relay on --socket; the relay talks to the vhost-user handler on
    // a private socket, connected now and unlinked at once.
    let public = bind_fresh(&a.socket)?;
    let mut private_path = a.socket.clone().into_os_string();
    private_path.push(".backend");
    let private_path = PathBuf::from(private_path);
    let private = bind_fresh(&private_path)?;
    let to_handler =
        UnixStream::connect(&private_path).map_err(|e| format!("connecting the relay: {e}"))?;
    let _ = std::fs::remove_file(&private_path);
    let control = a.control.as_deref().map(bind_fresh).transpose()?;
    let hup = control::hup_signalfd().map_err(|e| format!("signalfd: {e}"))?;

    let backend = Arc::new(RwLock::new(backend::NetBackend::new(tap, gate)));

    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    match a.user {
        Some((u, g)) => drop_privileges(u, g)?,
        None if root => drop_privileges(65534, 65534)?,
        None => {}
    }

    let filter = a.filter;
    let ctl_backend = backend.clone();
    std::thread::Builder::new()
        .name("netd-control".into())
        .spawn(move || control::run(control, hup, ctl_backend, filter))
        .map_err(|e| format!("control thread: {e}"))?;
    if filter {
        // Before the vhost-user daemon exists: `VhostUserDaemon::new` spawns the vring
        // worker, the thread that copies guest frames and decides them, and a filter
        // applies only to the thread that installs it and the threads that thread makes
        // afterwards. So every thread from here on (vring worker, request handler, relay)
        // is born filtered; the control thread above installs its own.
        filters::datapath()
            .and_then(|p| enclave_seccomp::install(&p))
            .map_err(|e| format!("seccomp: {e}"))?;
    }
    let mut daemon = VhostUserDaemon::new(
        "enclave-netd".into(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| format!("vhost-user daemon: {e}"))?;
    let handlers = daemon.get_epoll_handlers();
    let handler = handlers.first().ok_or("vhost-user daemon has no worker")?;
    handler
        .register_listener(
            tap_fd,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
            backend::TAP_TOKEN,
        )
        .map_err(|e| format!("watching the tap: {e}"))?;
    std::thread::Builder::new()
        .name("netd-relay".into())
        .spawn(move || {
            let r = public
                .accept()
                .and_then(|(vmm, _)| proxy::relay(vmm, to_handler));
            if let Err(e) = r {
                eprintln!("enclave-netd: vhost-user relay: {e}");
            }
        })
        .map_err(|e| format!("relay thread: {e}"))?;
    daemon
        .start(&mut Listener::from(private))
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
