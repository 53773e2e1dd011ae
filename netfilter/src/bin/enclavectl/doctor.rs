//! `enclavectl node doctor`: what a node needs for Enclave, checked one by one, each miss
//! with how to fix it.

use enclave_netfilter::node;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How a check came out.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

pub struct Check {
    pub level: Level,
    pub what: &'static str,
    pub found: String,
    pub fix: Option<String>,
}

fn ok(what: &'static str, found: impl Into<String>) -> Check {
    Check {
        level: Level::Ok,
        what,
        found: found.into(),
        fix: None,
    }
}

fn miss(
    level: Level,
    what: &'static str,
    found: impl Into<String>,
    fix: impl Into<String>,
) -> Check {
    Check {
        level,
        what,
        found: found.into(),
        fix: Some(fix.into()),
    }
}

/// Where the doctor looks.
#[derive(clap::Args)]
pub struct Paths {
    #[command(flatten)]
    pub node: super::NodeDirs,
    /// The node's audit log.
    #[arg(long, default_value = node::AUDIT_LOG)]
    pub audit_log: PathBuf,
    /// The guest image directory (the shim's [paths] guest_image).
    #[arg(long, default_value = "/usr/share/enclave/guest")]
    pub guest_image: PathBuf,
    /// containerd's configuration.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    pub containerd_config: PathBuf,
}

/// Directories the runtime's helpers are looked up in, as the shim does.
fn tool_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = vec!["/usr/local/lib/enclave/bin".into()];
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cache/enclave/tools/bin"));
    }
    dirs.extend(
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default(),
    );
    dirs.push("/usr/libexec".into());
    dirs
}

fn find(name: &str) -> Option<PathBuf> {
    tool_dirs()
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn version(bin: &Path, arg: &str) -> String {
    Command::new(bin)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

fn kvm() -> Check {
    let what = "KVM";
    if !Path::new("/dev/kvm").exists() {
        return miss(
            Level::Warn,
            what,
            "no /dev/kvm: pods run under QEMU with TCG (emulation: slow, for tests only)",
            "enable hardware virtualization (VT-x/AMD-V) and load kvm_intel or kvm_amd; on a cloud VM, pick an instance type with nested virtualization",
        );
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return miss(
            Level::Warn,
            what,
            "kvm-pvm (nested, guest kernel mode emulated): pods run under QEMU with TCG; enclave-vmm boots Linux only where KVM has VMX/SVM (docs/nestbox.md)",
            "for production, run on hosts whose KVM has hardware virtualization",
        );
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flag = ["vmx", "svm"].into_iter().find(|f| {
        cpu.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|x| x == *f))
    });
    match flag {
        Some(f) => ok(
            what,
            format!("hardware virtualization ({f}): pods run on enclave-vmm"),
        ),
        None => miss(
            Level::Warn,
            what,
            "/dev/kvm without vmx/svm: pods run under QEMU with TCG",
            "enable VT-x/AMD-V in the firmware or the hypervisor",
        ),
    }
}

fn devices() -> Vec<Check> {
    let mut out = vec![if Path::new("/dev/net/tun").exists() {
        ok("tun", "/dev/net/tun (each pod's tap)")
    } else {
        miss(
            Level::Fail,
            "tun",
            "no /dev/net/tun (each pod's tap)",
            "modprobe tun",
        )
    }];
    // nf_tables may be built in (no /sys/module entry): as root, ask the kernel.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let listed = match (root, find("nft")) {
        (true, Some(nft)) => Some(Command::new(&nft).args(["list", "tables"]).output()),
        _ => None,
    };
    out.push(match listed {
        Some(Ok(o)) if o.status.success() => ok("nftables", "the kernel answers nftables requests (nft list tables)"),
        Some(Ok(o)) => miss(
            Level::Fail,
            "nftables",
            format!("nft list tables: {}", String::from_utf8_lossy(&o.stderr).trim()),
            "modprobe nf_tables; the kernel wall cannot be installed without it",
        ),
        _ if Path::new("/sys/module/nf_tables").exists() => ok("nftables", "nf_tables loaded"),
        _ => miss(
            Level::Warn,
            "nftables",
            "cannot tell whether the kernel has nf_tables (run the doctor as root, with nft installed)",
            "apt-get install nftables; modprobe nf_tables",
        ),
    });
    out
}

fn cgroups() -> Check {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let v2 = mounts
        .lines()
        .any(|l| l.contains(" /sys/fs/cgroup ") && l.contains(" - cgroup2 "));
    let v1 = mounts.lines().any(|l| l.contains(" - cgroup cgroup "));
    match (v2, v1) {
        (true, _) => ok("cgroups", "cgroup v2 at /sys/fs/cgroup"),
        (false, true) => ok(
            "cgroups",
            "cgroup v1 hierarchies (runc pods beside enclave pods work; v2 is preferred)",
        ),
        _ => miss(
            Level::Warn,
            "cgroups",
            "no cgroup hierarchy mounted: runc pods on this node will not start",
            "mount -t cgroup2 none /sys/fs/cgroup (or boot with systemd)",
        ),
    }
}

fn containerd(config: &Path) -> Vec<Check> {
    let mut out = Vec::new();
    match find("containerd") {
        None => out.push(miss(
            Level::Fail,
            "containerd",
            "not installed",
            "apt-get install containerd (1.6 or later)",
        )),
        Some(b) => {
            let v = version(&b, "--version");
            let minor = v.split_whitespace().find_map(|w| {
                let w = w.trim_start_matches('v');
                let mut it = w.split('.');
                Some((
                    it.next()?.parse::<u32>().ok()?,
                    it.next()?.parse::<u32>().ok()?,
                ))
            });
            out.push(match minor {
                Some((1, m)) if m < 6 => miss(
                    Level::Fail,
                    "containerd",
                    v,
                    "upgrade to 1.6 or later (shim v2, CRI pod annotations)",
                ),
                _ => ok("containerd", v),
            });
        }
    }
    let text = std::fs::read_to_string(config).unwrap_or_default();
    out.push(if text.contains("io.containerd.enclave.v2") {
        let annotations = text.contains("enclave.io/*");
        if annotations {
            ok("runtime config", format!("{} has the enclave runtime with pod_annotations enclave.io/*", config.display()))
        } else {
            miss(
                Level::Warn,
                "runtime config",
                format!("{} has the enclave runtime but does not pass enclave.io/* annotations", config.display()),
                "add pod_annotations = [\"enclave.io/*\"] to its runtimes.enclave section (configs/containerd/enclave-runtime.toml)",
            )
        }
    } else {
        miss(
            Level::Fail,
            "runtime config",
            format!("no runtime of type io.containerd.enclave.v2 in {}", config.display()),
            "merge configs/containerd/enclave-runtime.toml into it and restart containerd; then apply configs/kubernetes/runtimeclass.yaml",
        )
    });
    out
}

fn binaries() -> Vec<Check> {
    let mut out = Vec::new();
    for (name, level, why) in [
        (
            "containerd-shim-enclave-v2",
            Level::Fail,
            "the runtime containerd starts per pod",
        ),
        ("enclave-netd", Level::Fail, "every pod's network"),
        (
            "enclave-vmm",
            Level::Warn,
            "the VMM where KVM has hardware virtualization",
        ),
        ("enclave-jailer", Level::Warn, "enclave-vmm's jail"),
        (
            "qemu-system-x86_64",
            Level::Fail,
            "the VMM where enclave-vmm cannot run",
        ),
        ("virtiofsd", Level::Fail, "containers' root filesystems"),
        (
            "vhost-device-vsock",
            Level::Warn,
            "the guest agent's channel on enclave-vmm",
        ),
    ] {
        let fix = match name {
            "qemu-system-x86_64" => "apt-get install qemu-system-x86".to_string(),
            "virtiofsd" | "vhost-device-vsock" => {
                "bash scripts/setup.sh installs it in /usr/local/lib/enclave/bin".to_string()
            }
            _ => "cargo build --release, then install -m 0755 target/release/NAME /usr/local/bin/ (docs/shim.md#install)".replace("NAME", name),
        };
        out.push(match find(name) {
            Some(p) => ok("binary", format!("{name}: {}", p.display())),
            None => miss(level, "binary", format!("{name} not found ({why})"), fix),
        });
    }
    out
}

fn guest(image: &Path) -> Check {
    let missing: Vec<&str> = ["vmlinuz", "initrd.img"]
        .into_iter()
        .filter(|f| !image.join(f).is_file())
        .collect();
    if missing.is_empty() {
        ok("guest image", image.display().to_string())
    } else {
        miss(
            Level::Fail,
            "guest image",
            format!("{}: no {}", image.display(), missing.join(", ")),
            "bash guest/image/build.sh, then copy target/guest there (or set [paths] guest_image)",
        )
    }
}

fn policy(dir: &Path) -> Check {
    match node::load_policy_dir(dir) {
        Ok((file, l)) => {
            let p = l.compiled.policy();
            ok(
                "policy",
                format!("{}: `{}` version {}, {} zones, {} rules", file.display(), p.name, p.version, p.zones.len(), p.rules.len()),
            )
        }
        Err(e) => miss(
            Level::Fail,
            "policy",
            e.lines().next().unwrap_or("").to_string(),
            format!("put one zone policy in {} (enclavectl policy check FILE first); pods do not start without one", dir.display()),
        ),
    }
}

fn registry_and_peers(registry: &Path, peers: &Path) -> Vec<Check> {
    let (entries, problems) = node::read_registry(registry);
    let mut out = vec![if problems.is_empty() {
        ok(
            "registry",
            format!("{}: {} pods", registry.display(), entries.len()),
        )
    } else {
        miss(
            Level::Warn,
            "registry",
            format!(
                "{}: {} pods; {}",
                registry.display(),
                entries.len(),
                problems.join("; ")
            ),
            "remove the broken entries (a shim that died rewrites its own)",
        )
    }];
    out.push(match enclave_netfilter::identity::ClusterMap::load_dir(peers) {
        Ok(None) => miss(
            Level::Warn,
            "cluster map",
            format!("none in {}: peers on other nodes and runc pods are `unknown`", peers.display()),
            "run enclave-node (configs/kubernetes/enclave-node-daemonset.yaml, docs/cluster.md)",
        ),
        Ok(Some(m)) if m.stale => miss(
            Level::Warn,
            "cluster map",
            format!("generation {}, {} pods, stale: enclave-node cannot reach the API server", m.generation, m.pods.len()),
            "check enclave-node's log and its metrics (enclave_node_watch_errors_total)",
        ),
        Ok(Some(m)) => ok("cluster map", format!("generation {}, {} pods", m.generation, m.pods.len())),
        Err(e) => miss(Level::Fail, "cluster map", e, "check enclave-node; every netd keeps its last good map meanwhile"),
    });
    out
}

fn audit(log: &Path) -> Vec<Check> {
    let mut out = Vec::new();
    let dir = log.parent().unwrap_or(Path::new("/"));
    out.push(match std::fs::metadata(log) {
        Ok(m) => ok(
            "audit log",
            format!("{} ({} bytes)", log.display(), m.len()),
        ),
        Err(_) if dir.is_dir() => ok(
            "audit log",
            format!("{} (not written yet; its directory exists)", log.display()),
        ),
        Err(_) => miss(
            Level::Fail,
            "audit log",
            format!("{} does not exist, nor its directory", log.display()),
            format!(
                "mkdir -p {} (enclave-netd opens the log before it drops privileges)",
                dir.display()
            ),
        ),
    });
    let key = enclave_netfilter::audit::seal::key_path(log);
    out.push(if key.exists() {
        ok("audit sealing", format!("{} (records are sealed)", key.display()))
    } else {
        miss(
            Level::Warn,
            "audit sealing",
            "no key: records are hash-chained but not sealed; root on the node could rewrite the chain unseen",
            format!("enclavectl audit keygen --log {} and keep the verification key off the node (docs/audit-log.md)", log.display()),
        )
    });
    if log.exists() {
        out.push(match enclave_netfilter::audit::read_head(&enclave_netfilter::audit::head_path(log)) {
            Ok(Some(h)) => ok("audit heads", format!("last head at record {}", h.seq)),
            Ok(None) => miss(
                Level::Warn,
                "audit heads",
                "no head yet",
                "heads are written as records are; export them off the node (enclavectl audit export)",
            ),
            Err(e) => miss(Level::Fail, "audit heads", e.to_string(), "enclavectl audit verify LOG says where the log and its head part"),
        });
    }
    out
}

/// Every check, in the order an operator would fix them.
pub fn run(p: &Paths) -> Vec<Check> {
    let mut c = vec![kvm()];
    c.extend(devices());
    c.push(cgroups());
    c.extend(containerd(&p.containerd_config));
    c.extend(binaries());
    c.push(guest(&p.guest_image));
    c.push(policy(&p.node.policy_dir));
    c.extend(registry_and_peers(&p.node.registry, &p.node.peer_dir));
    c.extend(audit(&p.audit_log));
    c
}

/// Prints the checks; the exit code is 1 when any failed.
pub fn print(checks: &[Check]) -> u8 {
    for c in checks {
        let tag = match c.level {
            Level::Ok => "ok  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        println!("{tag} {:<15} {}", c.what, c.found);
        if let Some(f) = &c.fix {
            println!("     {:<15} fix: {f}", "");
        }
    }
    let fails = checks.iter().filter(|c| c.level == Level::Fail).count();
    let warns = checks.iter().filter(|c| c.level == Level::Warn).count();
    println!(
        "{}: {} checks, {fails} failed, {warns} warnings",
        if fails == 0 {
            "node ready"
        } else {
            "node NOT ready"
        },
        checks.len()
    );
    u8::from(fails > 0)
}
