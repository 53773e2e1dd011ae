//! What the processes a pod runs on the node may hold, read back from /proc: uid and gid,
//! capabilities, `no_new_privs`, `Seccomp:` on every thread, namespaces of their own, and
//! their root directory. Used by the containerd and CRI tests for every process of a pod.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test support

use crate::procfs::{pid_status, processes};
use crate::seccomp::threads;

/// What one kind of process must look like.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// A word of its command line that names it (the binary).
    pub name: &'static str,
    /// Its real, effective, saved and filesystem uid (and gid).
    pub uid: u32,
    /// Capabilities it may keep (a mask of `CapEff`); 0 for none.
    pub caps: u64,
    /// Namespaces (`/proc/PID/ns/<kind>`) that must differ from the node's.
    pub own_ns: &'static [&'static str],
    /// Its root directory ends with this (a chroot), if any.
    pub root_ends_with: Option<&'static str>,
    /// Its root is an enclave-jailer jail: these entries are there and the host's `/etc`
    /// is not. (Checked by content: a root in another mount namespace has no path the
    /// reader could compare.)
    pub jail_holds: &'static [&'static str],
}

/// What each process of a pod on the QEMU backend must look like (docs/shim.md, "What runs
/// as what").
pub const QEMU_POD: &[Expect] = &[
    Expect {
        name: "qemu-system-x86_64",
        uid: 65534,
        caps: 0,
        own_ns: &["net", "ipc", "uts", "mnt"],
        root_ends_with: Some("/vm/jail"),
        jail_holds: &[],
    },
    Expect {
        name: "vhost-device-vsock",
        uid: 65534,
        caps: 0,
        own_ns: &["net", "ipc", "uts", "mnt"],
        root_ends_with: None,
        jail_holds: &[],
    },
    VIRTIOFSD,
];

/// The virtiofsd of a pod (either backend): uid 0 with virtiofsd's own reduced set less
/// DAC_READ_SEARCH (it creates files as the guest's uids): CHOWN, DAC_OVERRIDE, FOWNER,
/// FSETID, SETGID, SETUID, MKNOD, SETFCAP; chrooted into the shared directory.
pub const VIRTIOFSD: Expect = Expect {
    name: "virtiofsd",
    uid: 0,
    caps: (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 6) | (1 << 7) | (1 << 27) | (1 << 31),
    own_ns: &["net", "ipc", "uts", "mnt"],
    root_ends_with: Some("/shared"),
    jail_holds: &[],
};

/// What each process of a pod on the enclave-vmm backend must look like: the VMM as
/// enclave-jailer leaves it (nobody, no capabilities, PID 1 of its own PID namespace, its
/// own mount/IPC/UTS/network namespaces, `/` its jail), and virtiofsd as for QEMU.
/// (enclave-jailer itself, like the shim, is a supervisor that handles no guest data.)
pub const ENCLAVE_VMM_POD: &[Expect] = &[
    Expect {
        name: "enclave-vmm",
        uid: 65534,
        caps: 0,
        own_ns: &["net", "ipc", "uts", "mnt", "pid"],
        root_ends_with: None,
        jail_holds: &["enclave-vmm", "vm.json", "kernel", "dev/kvm"],
    },
    VIRTIOFSD,
];

/// enclave-netd, in a pod with a network: unprivileged, in the pod's network namespace
/// (not the node's); its own seccomp filters on every thread.
pub const NETD: Expect = Expect {
    name: "enclave-netd",
    uid: 65534,
    caps: 0,
    own_ns: &["net"],
    root_ends_with: None,
    jail_holds: &[],
};

/// Capability bits a pod's process must never hold, whatever else it keeps.
pub const FORBIDDEN_CAPS: &[(u32, &str)] = &[
    (12, "CAP_NET_ADMIN"),
    (13, "CAP_NET_RAW"),
    (16, "CAP_SYS_MODULE"),
    (17, "CAP_SYS_RAWIO"),
    (19, "CAP_SYS_PTRACE"),
    (21, "CAP_SYS_ADMIN"),
    (39, "CAP_BPF"),
];

/// One line per process checked, and one per thing that does not hold.
pub fn check(marker: &str, expect: &[Expect]) -> (Vec<String>, Vec<String>) {
    let node_ns = |kind: &str| std::fs::read_link(format!("/proc/self/ns/{kind}")).ok();
    let mut seen = Vec::new();
    let mut wrong = Vec::new();
    // The pod's processes: those whose command line names the marker, and the children of
    // its enclave-jailer (a jailed VMM's command line names only paths inside its jail). The supervisors,
    // the shim and enclave-jailer, are not checked here.
    let all = processes();
    let prog = |cmd: &str| {
        cmd.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    // The pod's vsock home (a short directory outside the VM's, for socket paths) names
    // the pod as well.
    let home = enclave_shim::vm::vsock_home(&std::path::Path::new(marker).join("vm"));
    let home = home.to_string_lossy().to_string();
    let ours = |cmd: &str| cmd.contains(marker) || cmd.contains(&home);
    let jailers: Vec<i32> = all
        .iter()
        .filter(|(_, cmd)| ours(cmd) && prog(cmd).ends_with("enclave-jailer"))
        .map(|(pid, _)| *pid)
        .collect();
    let procs: Vec<(i32, String)> = all
        .into_iter()
        .filter(|(pid, cmd)| {
            ours(cmd)
                || pid_status(pid, "PPid:")
                    .first()
                    .and_then(|p| p.parse::<i32>().ok())
                    .is_some_and(|pp| jailers.contains(&pp))
        })
        .filter(|(_, cmd)| {
            !cmd.contains("containerd-shim") && !prog(cmd).ends_with("enclave-jailer")
        })
        .collect();
    for e in expect {
        let mine: Vec<&(i32, String)> = procs
            .iter()
            .filter(|(_, cmd)| {
                cmd.split_whitespace()
                    .next()
                    .is_some_and(|p| p.ends_with(e.name))
            })
            .collect();
        if mine.is_empty() {
            wrong.push(format!("{}: no such process of the pod", e.name));
        }
        for (pid, _) in mine {
            let field = |k: &str| pid_status(pid, k);
            let uid = e.uid.to_string();
            if field("Uid:") != [uid.as_str(); 4] || field("Gid:") != [uid.as_str(); 4] {
                wrong.push(format!(
                    "{} ({pid}): uid {:?} gid {:?}, wanted {uid}",
                    e.name,
                    field("Uid:"),
                    field("Gid:")
                ));
            }
            let cap = u64::from_str_radix(&field("CapEff:").join(""), 16).unwrap_or(u64::MAX);
            if cap & !e.caps != 0 {
                wrong.push(format!(
                    "{} ({pid}): CapEff {cap:#x} beyond {:#x}",
                    e.name, e.caps
                ));
            }
            for (bit, name) in FORBIDDEN_CAPS {
                if cap & (1 << bit) != 0 {
                    wrong.push(format!("{} ({pid}): holds {name}", e.name));
                }
            }
            if field("NoNewPrivs:") != ["1"] {
                wrong.push(format!("{} ({pid}): no_new_privs not set", e.name));
            }
            let ts = threads(*pid as u32);
            for (tid, name, mode) in &ts {
                if mode != "2" {
                    wrong.push(format!(
                        "{} ({pid}): thread {name} ({tid}) Seccomp: {mode}",
                        e.name
                    ));
                }
            }
            for kind in e.own_ns {
                let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok();
                if theirs.is_none() || theirs == node_ns(kind) {
                    wrong.push(format!(
                        "{} ({pid}): shares the node's {kind} namespace",
                        e.name
                    ));
                }
            }
            let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap_or_default();
            if let Some(end) = e.root_ends_with {
                if !root.to_string_lossy().ends_with(end) {
                    wrong.push(format!(
                        "{} ({pid}): root {} (wanted …{end})",
                        e.name,
                        root.display()
                    ));
                }
            }
            if !e.jail_holds.is_empty() {
                let inside = |p: &str| std::fs::symlink_metadata(format!("/proc/{pid}/root/{p}"));
                for p in e.jail_holds {
                    if inside(p).is_err() {
                        wrong.push(format!(
                            "{} ({pid}): its root has no {p}: not its jail",
                            e.name
                        ));
                    }
                }
                if inside("etc").is_ok() {
                    wrong.push(format!("{} ({pid}): sees an /etc: not in its jail", e.name));
                }
            }
            seen.push(format!(
                "{:<20} pid {pid:<7} uid {:<5} CapEff {cap:016x} threads {} all Seccomp 2: {} ns own: {} root {}",
                e.name,
                field("Uid:").first().cloned().unwrap_or_default(),
                ts.len(),
                ts.iter().all(|t| t.2 == "2"),
                e.own_ns.join(","),
                root.display()
            ));
        }
    }
    // Anything of the pod's that the list does not name is a process nobody checked.
    for (pid, cmd) in &procs {
        let prog = cmd.split_whitespace().next().unwrap_or_default();
        if !expect.iter().any(|e| prog.ends_with(e.name)) {
            wrong.push(format!("unexpected process of the pod ({pid}): {cmd}"));
        }
    }
    (seen, wrong)
}
