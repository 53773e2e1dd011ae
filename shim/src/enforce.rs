//! The pod network's enforcement, from the shim's side: the pod in the node registry,
//! enclave-netd's arguments, the nftables table in the pod's network namespace (the second
//! wall), the other pods told that their peers changed, and netd watched so that its death
//! stops the VM (fail closed) rather than leaving it without a policy.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use enclave_netfilter::policy::CompiledPolicy;

use enclave_netfilter::node::{self, RegistryEntry};

use crate::config::{Config, NetworkSection};
use crate::podnet::PodNet;
use crate::vm::GuestVm;

/// Annotation CRI sets on a sandbox: the pod's name.
pub const POD_NAME: &str = "io.kubernetes.cri.sandbox-name";
/// Annotation CRI sets on a sandbox: the pod's namespace.
pub const POD_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";

/// The pod as the registry knows it: identity from the sandbox's annotations (`enclave.io/*`
/// ones pass through containerd's `pod_annotations`), addresses from the CNI interface.
pub fn registry_entry(spec: &serde_json::Value, n: &PodNet, control: &Path) -> RegistryEntry {
    let ann = spec["annotations"].as_object();
    let get = |k: &str| ann.and_then(|a| a.get(k)).and_then(|v| v.as_str());
    let fallback = n
        .netns
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_else(|| "pod".into());
    RegistryEntry {
        name: get(POD_NAME).map_or(fallback, String::from),
        namespace: get(POD_NAMESPACE).unwrap_or("default").into(),
        labels: Default::default(),
        annotations: ann
            .map(|a| {
                a.iter()
                    .filter(|(k, _)| k.starts_with("enclave.io/"))
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default(),
        ips: n
            .addresses
            .iter()
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .collect(),
        mac: n.mac.clone(),
        netns: Some(n.netns.clone()),
        control: Some(control.to_path_buf()),
    }
}

/// Before the VM boots: checks the policy loads, registers the pod, installs its nftables
/// table, and returns enclave-netd's arguments. Any failure fails the pod (fail closed).
pub fn prepare(
    cfg: &Config,
    entry: &RegistryEntry,
    vm_dir: &Path,
) -> Result<Vec<OsString>, String> {
    let net = &cfg.network;
    // The view is read before the pod registers (its own entry is never its own peer), so a
    // policy that does not load fails the pod before it touches the registry.
    let view = node::NodeView::load(&net.policy_dir, &net.registry, Some(&net.peer_dir), None)
        .map_err(|e| format!("the pod network needs a zone policy: {e}"))?;
    for p in &view.problems {
        eprintln!("enclave-shim: registry: {p} (entry ignored)");
    }
    node::register(&net.registry, entry)?;
    let rules = match node::apply_nft(&view.policy, &view.peers, entry) {
        Ok(r) => r,
        Err(e) => {
            let _ = node::unregister(&net.registry, entry);
            return Err(e);
        }
    };
    eprintln!(
        "enclave-shim: pod {} registered; policy {} ({}); nftables table with {rules} rules in {}",
        entry.reference(),
        view.policy.policy().name,
        view.policy_file.display(),
        entry.netns.as_deref().unwrap_or(Path::new("?")).display()
    );
    // The pod file goes beside the VM directory (which the VM launcher owns).
    let pod_file = vm_dir.parent().unwrap_or(vm_dir).join("pod.json");
    if let Some(d) = pod_file.parent() {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    std::fs::write(
        &pod_file,
        serde_json::to_vec_pretty(entry).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{}: {e}", pod_file.display()))?;
    // What `delete` needs to take the pod out of the registry if this shim is gone.
    let net_file = pod_file.with_file_name("network.json");
    std::fs::write(
        &net_file,
        serde_json::to_vec_pretty(net).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{}: {e}", net_file.display()))?;
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |k: &str, v: &Path| {
        args.push(k.into());
        args.push(v.as_os_str().to_owned());
    };
    push("--pod", &pod_file);
    push("--policy-dir", &net.policy_dir);
    push("--registry", &net.registry);
    push("--peer-dir", &net.peer_dir);
    push("--audit-log", &net.audit_log);
    if let Some(c) = &entry.control {
        push("--control", c);
    }
    push("--audit-sync", Path::new(&net.audit_sync));
    let captures = net
        .capture_dir()
        .join(format!("{}_{}.pcapng", entry.namespace, entry.name));
    push("--capture-file", &captures);
    push("--capture-max", Path::new(&net.capture_max_mib.to_string()));
    push("--user", Path::new(&net.netd_user));
    // Addresses netd learns for name zones come back here to enter the nftables table.
    if let Some(ns) = &entry.netns {
        let sock = pod_file.with_file_name("names.sock");
        crate::names::serve(
            &sock,
            ns,
            enclave_netfilter::nft::table_name(&entry.workload().identity()),
        )?;
        push("--names-socket", &sock);
    }
    Ok(args)
}

/// Tells every registered pod (nftables tables and netds) that the registry changed: each
/// table is rendered again and each netd re-reads its peers under the policy it already has
/// compiled (no policy reload on every pod start and stop).
pub fn peers_changed(net: &NetworkSection) {
    match node::peers_changed_all(&net.policy_dir, &net.registry, Some(&net.peer_dir)) {
        Ok((_, pods, problems)) => {
            for p in problems {
                eprintln!("enclave-shim: registry: {p}");
            }
            for p in pods {
                if let Err(e) = &p.nft {
                    eprintln!("enclave-shim: peers changed: {}: {e}", p.pod);
                }
                if let Err(e) = &p.netd {
                    eprintln!("enclave-shim: peers changed: {}: enclave-netd: {e}", p.pod);
                }
            }
        }
        Err(e) => eprintln!("enclave-shim: peers changed, but the policy does not load: {e}"),
    }
}

/// The pod is gone: out of the registry, and the others told.
pub fn leave(net: &NetworkSection, entry: &RegistryEntry) {
    if let Err(e) = node::unregister(&net.registry, entry) {
        eprintln!("enclave-shim: {e}");
    }
    peers_changed(net);
}

/// Cleanup after a shim that is gone: the pod recorded in its state directory leaves the
/// registry, and the other pods are told.
pub fn leave_from_state(state: &Path) {
    let entry = std::fs::read(state.join("pod.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<RegistryEntry>(&b).ok());
    let net = std::fs::read(state.join("network.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<NetworkSection>(&b).ok());
    if let (Some(entry), Some(net)) = (entry, net) {
        leave(&net, &entry);
    }
}

/// Follows the cluster map enclave-node publishes in the peer directory: on each new map,
/// this pod's nftables table is rendered again with the peers it names and the pod's
/// enclave-netd is asked to re-read its peers (`peers`: the policy stays compiled; flows
/// whose peer changed zone or left are re-decided). Each shim follows for its own pod only,
/// so one new map costs each pod one table and one peer swap, never a node-wide reload.
/// Returns at once; the thread lives as long as the shim.
pub fn follow_cluster(net: NetworkSection, entry: RegistryEntry) {
    let dir = net.peer_dir.clone();
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!(
            "enclave-shim: peer directory {}: {e}; cluster peers not followed",
            dir.display()
        );
        return;
    }
    let watch = match crate::inotify::DirWatch::new(&dir) {
        Ok(w) => w,
        Err(e) => {
            eprintln!(
                "enclave-shim: watching {}: {e}; cluster peers not followed",
                dir.display()
            );
            return;
        }
    };
    std::thread::spawn(move || {
        let mut policy: Option<(PolicyStamp, Arc<CompiledPolicy>)> = None;
        // A map written between the pod's start and the watch is followed too.
        if dir
            .join(enclave_netfilter::identity::CLUSTER_MAP_FILE)
            .exists()
        {
            cluster_changed(&net, &entry, &mut policy);
        }
        loop {
            match watch.wait_for(enclave_netfilter::identity::CLUSTER_MAP_FILE) {
                Ok(()) => {}
                Err(e) => {
                    eprintln!("enclave-shim: watching {}: {e}; stopped", dir.display());
                    return;
                }
            }
            // A burst of writes (enclave-node coalesces them, but a relist is several) is
            // followed once.
            std::thread::sleep(Duration::from_millis(20));
            watch.drain();
            cluster_changed(&net, &entry, &mut policy);
        }
    });
}

/// What identifies a policy file's version without reading it: its path, mtime and size.
type PolicyStamp = (PathBuf, std::time::SystemTime, u64);

fn cluster_changed(
    net: &NetworkSection,
    entry: &RegistryEntry,
    cache: &mut Option<(PolicyStamp, Arc<CompiledPolicy>)>,
) {
    let stamp = node::policy_file(&net.policy_dir).and_then(|f| {
        let m = std::fs::metadata(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        Ok((f, m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len()))
    });
    let stamp = match stamp {
        Ok(s) => s,
        Err(e) => {
            eprintln!("enclave-shim: peers changed, but {e}");
            return;
        }
    };
    let compiled = match cache {
        Some((s, c)) if *s == stamp => c.clone(),
        _ => match node::load_policy_dir(&net.policy_dir) {
            Ok((_, l)) => {
                let c = Arc::new(l.compiled);
                *cache = Some((stamp.clone(), c.clone()));
                c
            }
            Err(e) => {
                eprintln!("enclave-shim: peers changed, but the policy does not load: {e}");
                return;
            }
        },
    };
    let view =
        node::NodeView::with_policy(stamp.0, compiled, &net.registry, Some(&net.peer_dir), None);
    match &view.cluster_problem {
        // The table in force was built from the last good map: keep it.
        Some(p) => eprintln!("enclave-shim: peers: {p}; the nftables table stays as it was"),
        None => {
            if let Err(e) = node::apply_nft(&view.policy, &view.peers, entry) {
                eprintln!("enclave-shim: peers changed: {e}");
            }
        }
    }
    if let Some(c) = &entry.control {
        if let Err(e) = node::control_request(c, "peers") {
            eprintln!("enclave-shim: peers changed: enclave-netd: {e}");
        }
    }
}

fn alive(pid: u32) -> bool {
    // A dead child stays a zombie until reaped: count that as dead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

/// Stops the VM if enclave-netd dies: the guest's only network path is gone, and the pod
/// must not run on without its policy. The containers then exit (137) and the orchestrator
/// restarts the pod, with a fresh netd.
pub fn watch_netd(vm: &GuestVm) {
    let pids = vm.pids();
    let find = |names: &[&str]| {
        pids.iter()
            .find(|(n, _)| names.contains(n))
            .map(|(_, p)| *p)
    };
    let (Some(netd), Some(vmm)) = (find(&["enclave-netd"]), find(&["qemu", "enclave-vmm"])) else {
        return;
    };
    let dir: PathBuf = vm.dir().to_path_buf();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(200));
        if !alive(vmm) {
            return;
        }
        if !alive(netd) {
            eprintln!(
                "enclave-shim: enclave-netd (pid {netd}) died; stopping the pod's VM (pid {vmm}): no network without its policy ({})",
                dir.display()
            );
            // SAFETY: kill on a pid that is our unreaped child (it cannot have been reused).
            unsafe { libc::kill(vmm as i32, libc::SIGKILL) };
            return;
        }
    });
}
