//! Who is at the other end: peer addresses mapped to workloads and zones.
//!
//! A frame carries addresses, not identities. The directory maps the addresses of
//! workloads the node knows to their identity and zone: the pods of this node (the shims'
//! registry) and, when `enclave-node` runs, every pod of the cluster (the [`ClusterMap`] it
//! publishes in the node's peer directory). Anything else falls to the policy's CIDR zones,
//! and then to `unknown`.

use crate::packet::MacAddr;
use crate::policy::{CompiledPolicy, Policy, WorkloadIdentity, ZoneId};
use ahash::RandomState;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

/// A known workload at some address.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its identity.
    pub identity: Arc<WorkloadIdentity>,
    /// Its zone under the current policy.
    pub zone: ZoneId,
}

/// Address → known workload. Rebuilt when the policy or the registry changes.
#[derive(Debug, Default)]
pub struct PeerDirectory {
    by_ip: HashMap<IpAddr, Peer, RandomState>,
}

impl PeerDirectory {
    /// Builds the directory, assigning zones under `policy`.
    pub fn build<'a>(
        policy: &Policy,
        workloads: impl IntoIterator<Item = &'a InventoryWorkload>,
    ) -> Self {
        let mut dir = PeerDirectory::default();
        for w in workloads {
            dir.insert(policy, &w.ips, Arc::new(w.identity()));
        }
        dir
    }

    /// Puts `identity` at each of `ips`, in the zone `policy` gives it.
    fn insert(&mut self, policy: &Policy, ips: &[IpAddr], identity: Arc<WorkloadIdentity>) {
        let zone = policy.zone_of_workload(&identity);
        for ip in ips {
            self.by_ip.insert(
                *ip,
                Peer {
                    identity: identity.clone(),
                    zone,
                },
            );
        }
    }

    /// The directory of a node: the cluster's pods (`cluster`, when enclave-node publishes
    /// them) and this node's own (`local`, from the registry). For an address both name, the
    /// node's own registry decides: the shim wrote it when the pod started here, while the
    /// cluster map may still lag behind an address's reuse.
    pub fn build_node<'a>(
        policy: &Policy,
        local: impl IntoIterator<Item = &'a InventoryWorkload>,
        cluster: Option<&ClusterPeers>,
    ) -> Self {
        let mut dir = PeerDirectory::default();
        if let Some(c) = cluster {
            dir.by_ip.reserve(c.pods.len());
            for (ips, identity) in &c.pods {
                dir.insert(policy, ips, identity.clone());
            }
        }
        for w in local {
            let mut identity = w.identity();
            // The cluster's view of this same pod adds what the runtime does not know (its
            // labels, its namespace's labels); the runtime's `enclave.io/*` annotations stay.
            if let Some(p) = dir.same_pod(w.ips.iter().copied(), &w.namespace, &w.name) {
                let mut merged = (*p.identity).clone();
                merged.annotations.append(&mut identity.annotations);
                identity = merged;
            }
            dir.insert(policy, &w.ips, Arc::new(identity));
        }
        dir
    }

    /// The entry at one of a pod's own addresses that names that same pod (`namespace`,
    /// `name`): how a pod learns what the cluster knows of it (CRI passes runtimes no labels).
    pub fn same_pod(
        &self,
        ips: impl IntoIterator<Item = IpAddr>,
        namespace: &str,
        name: &str,
    ) -> Option<&Peer> {
        ips.into_iter().find_map(|ip| {
            self.by_ip
                .get(&ip)
                .filter(|p| p.identity.namespace == namespace && p.identity.name == name)
        })
    }

    /// Number of addresses known.
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    /// True when no address is known.
    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    /// The known workload at `ip`.
    #[inline]
    pub fn get(&self, ip: IpAddr) -> Option<&Peer> {
        self.by_ip.get(&ip)
    }

    /// Every known address and its workload.
    pub fn iter(&self) -> impl Iterator<Item = (IpAddr, &Peer)> {
        self.by_ip.iter().map(|(ip, p)| (*ip, p))
    }

    /// Whether `ip` is a workload's (a pod the directory knows).
    pub fn is_workload(&self, ip: IpAddr) -> bool {
        self.by_ip.contains_key(&ip)
    }

    /// The zone of `ip`: a known workload's, else a CIDR zone's, else `unknown`.
    #[inline]
    pub fn zone_of(&self, policy: &CompiledPolicy, ip: IpAddr) -> ZoneId {
        match self.by_ip.get(&ip) {
            Some(p) => p.zone,
            None => policy.zone_of_ip(ip).unwrap_or(ZoneId::UNKNOWN),
        }
    }
}

/// Workloads known on a node: what the shims register (and what the CLI reads from a file).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// The workloads.
    pub workloads: Vec<InventoryWorkload>,
}

/// One workload of an inventory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryWorkload {
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Labels.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Annotations (`enclave.io/zone` among them).
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
    /// Labels of the pod's namespace.
    #[serde(default)]
    pub namespace_labels: std::collections::BTreeMap<String, String>,
    /// Pod IPs.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The pod NIC's MAC.
    #[serde(default, deserialize_with = "de_mac")]
    pub mac: Option<MacAddr>,
}

impl InventoryWorkload {
    /// The identity part.
    pub fn identity(&self) -> WorkloadIdentity {
        WorkloadIdentity {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            labels: self.labels.clone(),
            annotations: self.annotations.clone(),
            namespace_labels: self.namespace_labels.clone(),
        }
    }

    /// The workload as an enforcer sees the pod it sits in front of, with the NIC's MAC
    /// (`mac` when the inventory gives none).
    pub fn local(&self, mac: MacAddr) -> crate::matcher::LocalWorkload {
        let pick4 = |i: &IpAddr| {
            if let IpAddr::V4(v) = i {
                Some(*v)
            } else {
                None
            }
        };
        let pick6 = |i: &IpAddr| {
            if let IpAddr::V6(v) = i {
                Some(*v)
            } else {
                None
            }
        };
        crate::matcher::LocalWorkload {
            identity: Arc::new(self.identity()),
            mac: self.mac.unwrap_or(mac),
            ipv4: self.ips.iter().filter_map(pick4).collect(),
            ipv6: self.ips.iter().filter_map(pick6).collect(),
            dhcp: false,
        }
    }

    /// `namespace/name`.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn de_mac<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<MacAddr>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    s.map(|s| s.parse().map_err(serde::de::Error::custom))
        .transpose()
}

/// Why an inventory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// Reading failed.
    #[error("cannot read inventory {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Parsing failed.
    #[error("{path}:{line}:{col}: error: {message}")]
    Parse {
        /// Path.
        path: String,
        /// Line.
        line: usize,
        /// Column.
        col: usize,
        /// What was wrong.
        message: String,
    },
}

impl Inventory {
    /// Reads an inventory YAML file.
    pub fn load(path: impl AsRef<Path>) -> Result<Inventory, InventoryError> {
        let path = path.as_ref();
        let p = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
            path: p.clone(),
            source,
        })?;
        crate::yaml::from_str(&src).map_err(|e| InventoryError::Parse {
            path: p,
            line: e.pos.line,
            col: e.pos.col,
            message: format!("{}: {}", e.field, e.message),
        })
    }

    /// Finds `namespace/name`.
    pub fn find(&self, reference: &str) -> Option<&InventoryWorkload> {
        self.workloads.iter().find(|w| w.reference() == reference)
    }
}

/// The file enclave-node writes in the node's peer directory.
pub const CLUSTER_MAP_FILE: &str = "cluster.json";
/// The format version of [`ClusterMap`] this build reads and writes.
pub const CLUSTER_MAP_FORMAT: u32 = 1;
/// A cluster map larger than this is refused unread (10,000 pods take about 5 MB).
pub const MAX_CLUSTER_MAP_BYTES: u64 = 256 << 20;

/// Every pod of the cluster with an address, as `enclave-node` saw it through the Kubernetes
/// API. Written whole and renamed into place, so a reader never sees half of one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterMap {
    /// [`CLUSTER_MAP_FORMAT`].
    pub format: u32,
    /// Increases with every write by one enclave-node.
    pub generation: u64,
    /// When it was written (milliseconds since the Unix epoch).
    pub written_unix_ms: u64,
    /// Set while enclave-node cannot reach the API server: this is the last map it knew.
    #[serde(default)]
    pub stale: bool,
    /// The pods. An address appears under one pod at most.
    pub pods: Vec<ClusterPod>,
}

/// One pod of a [`ClusterMap`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterPod {
    /// The pod's uid (a new pod at an old address has a new one).
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// The node it runs on.
    #[serde(default)]
    pub node: String,
    /// Its addresses (status.podIPs).
    pub ips: Vec<IpAddr>,
    /// Pod labels.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Pod annotations (only `enclave.io/*` ones are kept).
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
    /// Labels of its namespace.
    #[serde(default)]
    pub namespace_labels: std::collections::BTreeMap<String, String>,
}

impl ClusterPod {
    /// The identity zones select.
    pub fn identity(&self) -> WorkloadIdentity {
        WorkloadIdentity {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            labels: self.labels.clone(),
            annotations: self.annotations.clone(),
            namespace_labels: self.namespace_labels.clone(),
        }
    }

    /// `namespace/name`.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The cluster's pods as a node's enforcement keeps them between maps: each identity is
/// shared by every directory built from it (a policy reload, a change of the registry), and
/// the map's text and layout are not kept.
#[derive(Debug, Clone, Default)]
pub struct ClusterPeers {
    /// The map's generation.
    pub generation: u64,
    /// The map was marked stale.
    pub stale: bool,
    /// Each pod's addresses and identity.
    pub pods: Vec<(Vec<IpAddr>, Arc<WorkloadIdentity>)>,
}

impl ClusterPeers {
    /// The identity of `namespace/name`.
    pub fn find(&self, reference: &str) -> Option<&Arc<WorkloadIdentity>> {
        let (namespace, name) = reference.split_once('/')?;
        self.pods
            .iter()
            .map(|(_, w)| w)
            .find(|w| w.namespace == namespace && w.name == name)
    }
}

impl From<ClusterMap> for ClusterPeers {
    fn from(m: ClusterMap) -> Self {
        ClusterPeers {
            generation: m.generation,
            stale: m.stale,
            pods: m
                .pods
                .into_iter()
                .map(|p| {
                    let identity = WorkloadIdentity {
                        name: p.name,
                        namespace: p.namespace,
                        labels: p.labels,
                        annotations: p.annotations,
                        namespace_labels: p.namespace_labels,
                    };
                    (p.ips, Arc::new(identity))
                })
                .collect(),
        }
    }
}

impl ClusterMap {
    /// Reads the map of a peer directory: `Ok(None)` when there is none (no enclave-node on
    /// this node), an error naming the file, line and column when it is not a map.
    pub fn load_dir(dir: &Path) -> Result<Option<ClusterMap>, String> {
        let path = dir.join(CLUSTER_MAP_FILE);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len > MAX_CLUSTER_MAP_BYTES {
            return Err(format!(
                "{}: {len} bytes, more than the {MAX_CLUSTER_MAP_BYTES} a cluster map may have",
                path.display()
            ));
        }
        let mut text = Vec::with_capacity(len as usize);
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, MAX_CLUSTER_MAP_BYTES + 1),
            &mut text,
        )
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text)
            .map(Some)
            .map_err(|e| format!("{}:{e}", path.display()))
    }

    /// Parses a map; the error starts with `line:column:`.
    pub fn parse(text: &[u8]) -> Result<ClusterMap, String> {
        let m: ClusterMap = serde_json::from_slice(text)
            .map_err(|e| format!("{}:{}: {e}", e.line(), e.column()))?;
        if m.format != CLUSTER_MAP_FORMAT {
            return Err(format!(
                "1:1: format {} is not the {CLUSTER_MAP_FORMAT} this build reads",
                m.format
            ));
        }
        Ok(m)
    }

    /// Finds `namespace/name`.
    pub fn find(&self, reference: &str) -> Option<&ClusterPod> {
        self.pods.iter().find(|p| p.reference() == reference)
    }

    /// Writes the map into `dir` atomically (a temporary file, fsync, rename).
    pub fn write_dir(&self, dir: &Path) -> Result<(), String> {
        use std::io::Write;
        let path = dir.join(CLUSTER_MAP_FILE);
        let tmp = dir.join(format!(".{CLUSTER_MAP_FILE}.tmp"));
        let body = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        let mut f =
            std::fs::File::create(&tmp).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        f.write_all(&body)
            .and_then(|()| f.sync_data())
            .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("installing {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod cluster_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const POLICY: &str = "apiVersion: enclave.io/v1alpha1\nkind: ZonePolicy\nmetadata: {name: t, version: 1}\nspec:\n  zones:\n    - {name: db, selector: {matchLabels: {app: db}}}\n    - {name: api, selector: {matchLabels: {app: api}}}\n  rules: []\n";

    fn pod(ns: &str, name: &str, app: &str, ip: &str) -> ClusterPod {
        ClusterPod {
            uid: name.into(),
            namespace: ns.into(),
            name: name.into(),
            ips: vec![ip.parse().unwrap()],
            labels: [("app".to_string(), app.to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_node_registry_wins_an_address_and_the_cluster_adds_labels_to_the_same_pod() {
        let c = crate::policy::load_str(POLICY, "p.yaml").unwrap().compiled;
        let map = ClusterMap {
            format: CLUSTER_MAP_FORMAT,
            pods: vec![
                pod("payments", "db-0", "db", "10.0.0.5"),
                // A stale entry: the map still shows an old pod at a local pod's address.
                pod("payments", "old", "db", "10.0.0.6"),
                pod("payments", "api-0", "api", "10.0.0.7"),
            ],
            ..Default::default()
        };
        let local: Inventory = crate::yaml::from_str(
            "workloads:\n  - {name: db-0, namespace: payments, ips: [10.0.0.5], annotations: {enclave.io/extra: x}}\n  - {name: fresh, namespace: payments, ips: [10.0.0.6]}\n",
        )
        .unwrap();
        let known = ClusterPeers::from(map);
        let d = PeerDirectory::build_node(c.policy(), &local.workloads, Some(&known));
        let at = |ip: &str| d.get(ip.parse().unwrap()).unwrap();
        let db = at("10.0.0.5");
        assert_eq!(
            c.policy().zone_name(db.zone),
            "db",
            "labels from the cluster map"
        );
        assert_eq!(
            db.identity
                .annotations
                .get("enclave.io/extra")
                .map(String::as_str),
            Some("x")
        );
        let fresh = at("10.0.0.6");
        assert_eq!(
            fresh.identity.name, "fresh",
            "the node's own registry wins the address"
        );
        assert_eq!(c.policy().zone_name(fresh.zone), "unknown");
        assert_eq!(c.policy().zone_name(at("10.0.0.7").zone), "api");
        assert_eq!(d.len(), 3);
    }

    #[test]
    fn a_broken_map_is_refused_with_its_position() {
        let e =
            ClusterMap::parse(b"{\"format\": 1, \"generation\": 2,\n \"pods\": [{\"uid\": 7}]}")
                .unwrap_err();
        assert!(e.starts_with("2:") && e.contains("invalid type"), "{e}");
        let e = ClusterMap::parse(
            b"{\"format\": 9, \"generation\": 1, \"written_unix_ms\": 0, \"pods\": []}",
        )
        .unwrap_err();
        assert!(e.contains("format 9"), "{e}");
        let e = ClusterMap::parse(b"{\"format\": 1, \"gener").unwrap_err();
        assert!(e.starts_with("1:"), "{e}");
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            ClusterMap::load_dir(d.path()),
            Ok(None),
            "no map is not an error"
        );
        std::fs::write(d.path().join(CLUSTER_MAP_FILE), b"garbage").unwrap();
        let e = ClusterMap::load_dir(d.path()).unwrap_err();
        assert!(e.contains("cluster.json:1:"), "{e}");
    }
}
