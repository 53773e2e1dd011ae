//! Who is at the other end: peer addresses mapped to workloads and zones.
//!
//! A frame carries addresses, not identities. The directory maps the addresses of
//! workloads the node knows (the shims' registry) to their identity and zone; anything
//! else falls to the policy's CIDR zones, and then to `unknown`.

use crate::packet::MacAddr;
use crate::policy::{CompiledPolicy, Policy, WorkloadIdentity, ZoneId};
use ahash::RandomState;
use serde::Deserialize;
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
        let mut by_ip = HashMap::with_hasher(RandomState::new());
        for w in workloads {
            let identity = Arc::new(w.identity());
            let zone = policy.zone_of_workload(&identity);
            for ip in &w.ips {
                by_ip.insert(
                    *ip,
                    Peer {
                        identity: identity.clone(),
                        zone,
                    },
                );
            }
        }
        PeerDirectory { by_ip }
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
