//! A node's view of enforcement: the policy directory, the registry of pods the shims keep,
//! and the reload that makes every pod's two walls (its enclave-netd and its nftables
//! table) follow them.
//!
//! - The policy is the one `*.yaml` / `*.yml` file in the policy directory
//!   (`/etc/enclave/policies` by default; a ConfigMap mounted there works, its `..data`
//!   entries are skipped).
//! - Each shim registers its pod in the registry directory (`/run/enclave/workloads`):
//!   one JSON file per pod with its identity, addresses, network namespace and the control
//!   socket of its enclave-netd. Peers' zones come from there.
//! - [`reload_all`] re-reads both and, for every registered pod, re-applies its nftables
//!   table in its network namespace and asks its enclave-netd to reload.

use crate::identity::{ClusterMap, ClusterPeers, InventoryWorkload, PeerDirectory};
use crate::nft::{self, NftWorkload, Placement};
use crate::packet::MacAddr;
use crate::policy::{self, CompiledPolicy, LoadedPolicy};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Default policy directory.
pub const POLICY_DIR: &str = "/etc/enclave/policies";
/// Default registry directory.
pub const REGISTRY_DIR: &str = "/run/enclave/workloads";
/// Default peer directory: where enclave-node publishes the cluster's pods.
pub const PEER_DIR: &str = "/run/enclave/peers";
/// Default node audit log.
pub const AUDIT_LOG: &str = "/var/log/enclave/audit.log";
/// Default directory of the pods' packet captures (beside the audit log).
pub const CAPTURE_DIR: &str = "/var/log/enclave/captures";

/// One pod in the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Pod labels (CRI does not pass them to runtimes; usually empty).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Pod annotations passed to the runtime (`enclave.io/zone` among them).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Pod IPs.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The pod NIC's MAC (the guest's).
    pub mac: String,
    /// The pod's network namespace file.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// The control socket of the pod's enclave-netd.
    #[serde(default)]
    pub control: Option<PathBuf>,
}

/// The file name of the shim's segmentation-probe socket, beside netd's control socket
/// (`enclavectl segmentation test` talks to it; shim/src/probe.rs serves it).
pub const PROBE_SOCKET: &str = "probe.sock";

impl RegistryEntry {
    /// The shim's probe socket for this pod, if the pod has a control socket.
    pub fn probe_socket(&self) -> Option<PathBuf> {
        self.control
            .as_ref()
            .and_then(|c| c.parent())
            .map(|d| d.join(PROBE_SOCKET))
    }

    /// The entry as an inventory workload (what peer directories are built from).
    pub fn workload(&self) -> InventoryWorkload {
        InventoryWorkload {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            labels: self.labels.clone(),
            annotations: self.annotations.clone(),
            namespace_labels: Default::default(),
            ips: self.ips.clone(),
            mac: self.mac.parse::<MacAddr>().ok(),
        }
    }

    /// `namespace/name`.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The entry's file name in the registry.
    pub fn file_name(&self) -> String {
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        format!("{}_{}.json", clean(&self.namespace), clean(&self.name))
    }

    /// Reads one entry; errors name the file, line and column.
    pub fn load(path: &Path) -> Result<RegistryEntry, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let e: RegistryEntry = serde_json::from_str(&text)
            .map_err(|e| format!("{}:{}:{}: {e}", path.display(), e.line(), e.column()))?;
        e.mac
            .parse::<MacAddr>()
            .map_err(|err| format!("{}: field `mac`: {err}", path.display()))?;
        Ok(e)
    }
}

/// Writes `entry` into the registry at `dir` (atomically: a reader never sees half a file).
pub fn register(dir: &Path, entry: &RegistryEntry) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let path = dir.join(entry.file_name());
    let tmp = dir.join(format!(".{}.tmp", entry.file_name()));
    let body = serde_json::to_vec_pretty(entry).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, body).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("installing {}: {e}", path.display()))?;
    Ok(path)
}

/// Removes a pod's entry; a missing one is not an error.
pub fn unregister(dir: &Path, entry: &RegistryEntry) -> Result<(), String> {
    let path = dir.join(entry.file_name());
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing {}: {e}", path.display())),
    }
}

/// Every readable entry of the registry, and a message for each file that is not one (a
/// broken entry must not take every other pod's enforcement down with it).
pub fn read_registry(dir: &Path) -> (Vec<RegistryEntry>, Vec<String>) {
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (entries, problems),
        Err(e) => {
            problems.push(format!("cannot list {}: {e}", dir.display()));
            return (entries, problems);
        }
    };
    let mut paths: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    for p in paths {
        match RegistryEntry::load(&p) {
            Ok(e) => entries.push(e),
            Err(e) => problems.push(e),
        }
    }
    (entries, problems)
}

/// The policy file of a policy directory: its one `*.yaml` / `*.yml` file.
pub fn policy_file(dir: &Path) -> Result<PathBuf, String> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list the policy directory {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            !name.starts_with('.')
                && (name.ends_with(".yaml") || name.ends_with(".yml"))
                && p.is_file()
        })
        .collect();
    files.sort();
    match files.len() {
        1 => Ok(files.remove(0)),
        0 => Err(format!(
            "the policy directory {} has no *.yaml policy (put one zone policy there)",
            dir.display()
        )),
        _ => Err(format!(
            "the policy directory {} has {} policies ({}); a node enforces one: merge them",
            dir.display(),
            files.len(),
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Loads the policy of a policy directory.
pub fn load_policy_dir(dir: &Path) -> Result<(PathBuf, LoadedPolicy), String> {
    let file = policy_file(dir)?;
    let loaded = policy::load_file(&file).map_err(|e| e.to_string())?;
    Ok((file, loaded))
}

/// The peer directory for `entries` under `policy`.
pub fn peers(policy: &crate::policy::Policy, entries: &[RegistryEntry]) -> PeerDirectory {
    let workloads: Vec<InventoryWorkload> = entries.iter().map(|e| e.workload()).collect();
    PeerDirectory::build(policy, workloads.iter())
}

/// Renders and installs the nftables table of `entry` in its network namespace.
pub fn apply_nft(
    policy: &crate::policy::CompiledPolicy,
    peers: &PeerDirectory,
    entry: &RegistryEntry,
) -> Result<usize, String> {
    // The cluster map knows the pod's labels (CRI does not pass them to the runtime).
    let identity = peers
        .same_pod(entry.ips.iter().copied(), &entry.namespace, &entry.name)
        .map_or_else(|| entry.workload().identity(), |p| (*p.identity).clone());
    let table = nft::render(
        policy,
        peers,
        &NftWorkload {
            identity: &identity,
            ips: &entry.ips,
        },
        &Placement::Bridged,
    );
    nft::apply(&table, entry.netns.as_deref())
        .map_err(|e| format!("nftables for {}: {e}", entry.reference()))?;
    Ok(table.rule_count())
}

/// Sends one request line to an enclave-netd control socket and returns its answer.
/// Answers start with `ok` or `error`; `metrics` answers with Prometheus text.
pub fn control_request(socket: &Path, request: &str) -> Result<String, String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    s.write_all(format!("{request}\n").as_bytes())
        .map_err(|e| format!("writing to {}: {e}", socket.display()))?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = String::new();
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => out.push_str(&line),
            Err(e) => return Err(format!("reading from {}: {e}", socket.display())),
        }
    }
    if out.starts_with("error") {
        return Err(out.trim_end().to_string());
    }
    Ok(out)
}

/// The node as enforcement sees it at one moment: its policy, the pods registered on it and
/// the cluster's pods enclave-node publishes. The shim (at pod start), every enclave-netd (at
/// start, reload and when the peers change) and [`reload_all`] read it the same way.
pub struct NodeView {
    /// The policy file read.
    pub policy_file: PathBuf,
    /// The compiled policy.
    pub policy: Arc<CompiledPolicy>,
    /// The registered pods (broken entries left out).
    pub entries: Vec<RegistryEntry>,
    /// Their addresses, identities and zones under `policy`.
    pub peers: Arc<PeerDirectory>,
    /// A message per registry file that is not an entry.
    pub problems: Vec<String>,
    /// The cluster map in use: the one on disk, or the last good one when that is broken.
    pub cluster: Option<Arc<ClusterPeers>>,
    /// Why the cluster map on disk is not the one in use.
    pub cluster_problem: Option<String>,
}

impl NodeView {
    /// Reads the policy directory, the registry and the peer directory (`peer_dir`); a
    /// policy that does not load is an error. A cluster map that does not read leaves
    /// `last_cluster` (the caller's last good one) in use, with the reason in
    /// `cluster_problem`.
    pub fn load(
        policy_dir: &Path,
        registry: &Path,
        peer_dir: Option<&Path>,
        last_cluster: Option<&Arc<ClusterPeers>>,
    ) -> Result<NodeView, String> {
        let (policy_file, loaded) = load_policy_dir(policy_dir)?;
        Ok(Self::with_policy(
            policy_file,
            Arc::new(loaded.compiled),
            registry,
            peer_dir,
            last_cluster,
        ))
    }

    /// As [`NodeView::load`] with a policy already compiled (a change of peers alone does not
    /// recompile it).
    pub fn with_policy(
        policy_file: PathBuf,
        policy: Arc<CompiledPolicy>,
        registry: &Path,
        peer_dir: Option<&Path>,
        last_cluster: Option<&Arc<ClusterPeers>>,
    ) -> NodeView {
        let (entries, problems) = read_registry(registry);
        let (cluster, cluster_problem) = match peer_dir.map(ClusterMap::load_dir) {
            None | Some(Ok(None)) => (None, None),
            Some(Ok(Some(m))) => (Some(Arc::new(ClusterPeers::from(m))), None),
            Some(Err(e)) => (
                last_cluster.cloned(),
                Some(format!(
                    "{e} ({})",
                    if last_cluster.is_some() {
                        "the last good cluster map stays in use"
                    } else {
                        "no cluster map in use"
                    }
                )),
            ),
        };
        let workloads: Vec<InventoryWorkload> = entries.iter().map(|e| e.workload()).collect();
        let peers = Arc::new(PeerDirectory::build_node(
            policy.policy(),
            &workloads,
            cluster.as_deref(),
        ));
        NodeView {
            policy_file,
            policy,
            entries,
            peers,
            problems,
            cluster,
            cluster_problem,
        }
    }
}

/// What [`reload_all`] did for one pod.
#[derive(Debug)]
pub struct PodReload {
    /// `namespace/name`.
    pub pod: String,
    /// nftables: rules installed, or why not.
    pub nft: Result<usize, String>,
    /// enclave-netd's answer, or why there is none.
    pub netd: Result<String, String>,
}

/// Re-reads the policy directory and the registry, then re-applies every registered pod's
/// nftables table and asks its enclave-netd to reload. A policy that does not load changes
/// nothing (the error is returned); a pod that fails does not stop the others.
pub fn reload_all(
    policy_dir: &Path,
    registry: &Path,
    peer_dir: Option<&Path>,
) -> Result<(PathBuf, Vec<PodReload>, Vec<String>), String> {
    update_all(policy_dir, registry, peer_dir, "reload")
}

/// After a pod joined or left the node: every registered pod's nftables table is rendered
/// again and its enclave-netd asked to re-read its peers (`peers`), which keeps its
/// compiled policy — the policy is compiled once here, not once per pod.
pub fn peers_changed_all(
    policy_dir: &Path,
    registry: &Path,
    peer_dir: Option<&Path>,
) -> Result<(PathBuf, Vec<PodReload>, Vec<String>), String> {
    update_all(policy_dir, registry, peer_dir, "peers")
}

fn update_all(
    policy_dir: &Path,
    registry: &Path,
    peer_dir: Option<&Path>,
    request: &str,
) -> Result<(PathBuf, Vec<PodReload>, Vec<String>), String> {
    let view = NodeView::load(policy_dir, registry, peer_dir, None)?;
    let mut out = Vec::new();
    for e in &view.entries {
        let nft = if e.netns.is_some() {
            apply_nft(&view.policy, &view.peers, e)
        } else {
            Err("no network namespace registered".into())
        };
        // Both walls hold the same policy: where the kernel refused it, netd keeps the old
        // one too (the old table is still in force: an apply is one transaction).
        let netd = match (&e.control, &nft) {
            (control, Err(why)) if e.netns.is_some() => {
                // netd records the refusal in the pod's audit trail.
                let line: String = format!("refused nftables wall: {why}")
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(240)
                    .collect();
                let recorded = control
                    .as_ref()
                    .is_some_and(|c| control_request(c, &line).is_ok());
                Err(format!(
                    "not reloaded: the nftables wall refused the policy ({why}), so both walls keep the previous one{}",
                    if recorded { "; refusal recorded in the pod's audit log" } else { "" }
                ))
            }
            (Some(c), _) => control_request(c, request),
            (None, _) => Err("no enclave-netd control socket registered".into()),
        };
        out.push(PodReload {
            pod: e.reference(),
            nft,
            netd,
        });
    }
    let mut problems = view.problems;
    problems.extend(view.cluster_problem);
    Ok((view.policy_file, out, problems))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(name: &str) -> RegistryEntry {
        RegistryEntry {
            name: name.into(),
            namespace: "payments".into(),
            labels: BTreeMap::new(),
            annotations: [("enclave.io/zone".to_string(), "cde-api".to_string())].into(),
            ips: vec!["10.1.0.5".parse().unwrap()],
            mac: "02:00:00:00:00:05".into(),
            netns: None,
            control: None,
        }
    }

    #[test]
    fn registry_round_trip_and_removal() {
        let d = tempfile::tempdir().unwrap();
        let e = entry("api-0");
        let p = register(d.path(), &e).unwrap();
        assert!(p.ends_with("payments_api-0.json"));
        std::fs::write(d.path().join("broken.json"), "{\"name\": 1}").unwrap();
        let (got, problems) = read_registry(d.path());
        assert_eq!(got, vec![e.clone()]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("broken.json:1:"), "{problems:?}");
        unregister(d.path(), &e).unwrap();
        unregister(d.path(), &e).unwrap();
        assert!(read_registry(d.path()).0.is_empty());
    }

    #[test]
    fn a_bad_mac_is_named() {
        let d = tempfile::tempdir().unwrap();
        let mut e = entry("x");
        e.mac = "zz".into();
        let p = register(d.path(), &e).unwrap();
        let err = RegistryEntry::load(&p).unwrap_err();
        assert!(err.contains("field `mac`"), "{err}");
    }

    #[test]
    fn the_policy_directory_holds_exactly_one_policy() {
        let d = tempfile::tempdir().unwrap();
        assert!(policy_file(d.path()).unwrap_err().contains("no *.yaml"));
        std::fs::create_dir(d.path().join("..data")).unwrap();
        std::fs::write(d.path().join("a.yaml"), "x").unwrap();
        assert!(policy_file(d.path()).unwrap().ends_with("a.yaml"));
        std::fs::write(d.path().join("b.yml"), "x").unwrap();
        assert!(policy_file(d.path()).unwrap_err().contains("2 policies"));
    }

    #[test]
    fn peers_take_their_zone_from_the_annotation() {
        let src = include_str!("../../configs/policies/pci-cde.yaml");
        let loaded = crate::policy::load_str(src, "pci-cde.yaml").unwrap();
        let p = peers(loaded.compiled.policy(), &[entry("api-0")]);
        let z = p.zone_of(&loaded.compiled, "10.1.0.5".parse().unwrap());
        assert_eq!(loaded.compiled.policy().zone_name(z), "cde-api");
    }
}
