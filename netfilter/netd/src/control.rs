//! The control thread: policy reloads on SIGHUP or a `reload` request on the control
//! socket, and the counters (`metrics`, Prometheus text; `status`, one line). It never
//! touches guest memory; it takes the backend's lock to swap the policy between frames.

use enclave_netfilter::node::NodeView;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::backend::NetBackend;

/// Blocks SIGHUP in the calling thread (and the threads it makes) and returns a signalfd
/// that reads it. Call before any thread exists.
pub fn hup_signalfd() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; the calls initialise it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: -1 asks for a new descriptor; `set` is initialised.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; we are its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads and compiles the node's policy and registry, and prepares the swap, without the
/// datapath lock (a policy of 10,000 rules takes hundreds of milliseconds to compile; frames
/// must not wait for it), then takes the lock only to swap it in and re-decide live flows.
/// `peers_only` keeps the compiled policy in force and re-reads only who the peers are (the
/// registry and the cluster map), which is what the shim asks for when enclave-node
/// publishes a new map.
fn reload(backend: &RwLock<NetBackend>, why: &str, peers_only: bool) -> String {
    let sources = {
        let b = match backend.read() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        b.gate
            .enforcing()
            .map(|e| (e.sources(), e.current_policy()))
    };
    let Some((src, current)) = sources else {
        return "error forward-only mode has no policy\n".into();
    };
    let view = if peers_only {
        Ok(NodeView::with_policy(
            src.policy_file.clone(),
            current.clone(),
            &src.registry,
            src.peer_dir.as_deref(),
            src.cluster.as_ref(),
        ))
    } else {
        NodeView::load(
            &src.policy_dir,
            &src.registry,
            src.peer_dir.as_deref(),
            src.cluster.as_ref(),
        )
    };
    let view = view.map(|v| {
        let prepared = enclave_netfilter::matcher::PreparedReload::new(
            &current,
            v.policy.clone(),
            v.peers.clone(),
        );
        (v, prepared)
    });
    let mut b = match backend.write() {
        Ok(b) => b,
        Err(p) => p.into_inner(),
    };
    let Some(e) = b.gate.enforcing_mut() else {
        return "error forward-only mode has no policy\n".into();
    };
    let result = match view {
        Ok(v) if peers_only => e.swap_in_peers(v),
        v => e.swap_in(v),
    };
    match result {
        Ok(s) => {
            eprintln!("enclave-netd: reload ({why}): {s}");
            format!("ok {s}\n")
        }
        Err(err) => {
            eprintln!("enclave-netd: reload ({why}) refused: {err}");
            format!("error {err}\n")
        }
    }
}

fn metrics(backend: &RwLock<NetBackend>) -> String {
    let b = match backend.read() {
        Ok(b) => b,
        Err(p) => p.into_inner(),
    };
    let mut out = String::new();
    let s = &b.stats;
    let labels = b
        .gate
        .enforcing()
        .map_or(String::new(), |e| format!("{{{}}}", e.labels()));
    for (name, help, v) in [
        (
            "enclave_netd_tx_frames_total",
            "Frames from the guest written to the tap.",
            &s.tx_frames,
        ),
        (
            "enclave_netd_rx_frames_total",
            "Frames from the tap written to the guest.",
            &s.rx_frames,
        ),
        (
            "enclave_netd_tx_denied_total",
            "Frames from the guest the policy dropped.",
            &s.tx_denied,
        ),
        (
            "enclave_netd_rx_denied_total",
            "Frames to the guest the policy dropped.",
            &s.rx_denied,
        ),
        (
            "enclave_netd_bad_chains_total",
            "Descriptor chains refused as malformed.",
            &s.bad_chains,
        ),
        (
            "enclave_netd_rx_no_buffer_total",
            "Frames to the guest dropped for lack of a guest buffer.",
            &s.rx_dropped,
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name}{labels} {}\n",
            v.load(Ordering::Relaxed)
        ));
    }
    if let Some(e) = b.gate.enforcing() {
        e.metrics(&mut out);
    }
    out
}

fn status(backend: &RwLock<NetBackend>) -> String {
    let b = match backend.read() {
        Ok(b) => b,
        Err(p) => p.into_inner(),
    };
    let s = &b.stats;
    let zone = b
        .gate
        .enforcing()
        .map_or(String::new(), |e| format!(" zone {}", e.zone_name()));
    format!(
        "ok tx {} rx {} tx_denied {} rx_denied {} bad_chains {}{zone}\n",
        s.tx_frames.load(Ordering::Relaxed),
        s.rx_frames.load(Ordering::Relaxed),
        s.tx_denied.load(Ordering::Relaxed),
        s.rx_denied.load(Ordering::Relaxed),
        s.bad_chains.load(Ordering::Relaxed)
    )
}

/// Records that the node refused a policy before asking this netd (the nftables wall did
/// not take it), so the refusal is in the pod's audit trail and counters although netd's
/// own policy never changed.
fn refused(backend: &RwLock<NetBackend>, why: &str) -> String {
    let why: String = why.chars().filter(|c| !c.is_control()).take(200).collect();
    let mut b = match backend.write() {
        Ok(b) => b,
        Err(p) => p.into_inner(),
    };
    match b.gate.enforcing_mut() {
        Some(e) => {
            let _ = e.swap_in(Err(why.clone()));
            eprintln!("enclave-netd: reload refused by the node: {why}");
            "ok refusal recorded\n".into()
        }
        None => "error forward-only mode has no policy\n".into(),
    }
}

/// Runs `f` on the enforcing gate under the datapath lock: its answer, or `error ...`.
fn with_enforcing(
    backend: &RwLock<NetBackend>,
    f: impl FnOnce(&mut crate::gate::Enforcing) -> Result<String, String>,
) -> String {
    let mut b = match backend.write() {
        Ok(b) => b,
        Err(p) => p.into_inner(),
    };
    match b.gate.enforcing_mut() {
        Some(e) => f(e).unwrap_or_else(|e| format!("error {e}\n")),
        None => "error forward-only mode has no policy\n".into(),
    }
}

fn serve_one(conn: UnixStream, backend: &RwLock<NetBackend>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let mut r = BufReader::new((&conn).take(256));
    if r.read_line(&mut line).is_err() {
        return;
    }
    let answer = match line.trim() {
        "reload" => reload(backend, "control socket", false),
        "peers" => reload(backend, "peers changed", true),
        l if l.starts_with("refused ") => refused(backend, &l["refused ".len()..]),
        "metrics" => metrics(backend),
        "status" => status(backend),
        "quarantine" => with_enforcing(backend, |e| Ok(e.quarantine_line())),
        "release" => with_enforcing(backend, |e| {
            e.release("the control socket").map(|w| format!("ok {w}\n"))
        }),
        other => format!(
            "error unknown request {:?} (reload, peers, refused WHY, metrics, status, quarantine, release)\n",
            other.chars().take(40).collect::<String>()
        ),
    };
    let _ = (&conn).write_all(answer.as_bytes());
}

/// Runs the control loop on this thread: installs its seccomp filter (unless `filter` is
/// false), then serves SIGHUP and the socket until the process ends.
pub fn run(
    listener: Option<UnixListener>,
    hup: OwnedFd,
    backend: Arc<RwLock<NetBackend>>,
    filter: bool,
) {
    if filter {
        if let Err(e) = enclave_netd::filters::control().and_then(|p| enclave_seccomp::install(&p))
        {
            eprintln!("enclave-netd: control thread: {e}; exiting (fail closed)");
            std::process::exit(1);
        }
    }
    let mut fds = vec![libc::pollfd {
        fd: hup.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    if let Some(l) = &listener {
        fds.push(libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
    }
    loop {
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd for the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
            // SAFETY: reads at most `info.len()` bytes into `info`.
            let n = unsafe { libc::read(hup.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
            if n > 0 {
                reload(&backend, "SIGHUP", false);
            }
        }
        if let (Some(l), Some(p)) = (&listener, fds.get(1)) {
            if p.revents != 0 {
                if let Ok((conn, _)) = l.accept() {
                    serve_one(conn, &backend);
                }
            }
        }
    }
}
