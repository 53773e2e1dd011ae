//! The cluster's pods and namespaces as the watches last showed them, and the map they make.
//!
//! A relist (the watch expired with 410 Gone, or the API server was unreachable) builds a
//! fresh set beside the old one; the old one stays in force until the relist is complete,
//! so the published map is never a half-listed cluster.

use crate::pod::PodRec;
use enclave_netfilter::identity::{ClusterMap, ClusterPod, CLUSTER_MAP_FORMAT};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

/// Labels by namespace name.
pub type NamespaceLabels = BTreeMap<String, BTreeMap<String, String>>;

/// What the watches have shown.
#[derive(Debug, Default)]
pub struct Store {
    /// Pods by uid.
    pods: BTreeMap<String, PodRec>,
    namespaces: NamespaceLabels,
    /// A relist of pods in progress.
    pods_relist: Option<BTreeMap<String, PodRec>>,
    /// A relist of namespaces in progress.
    ns_relist: Option<NamespaceLabels>,
    /// Changed since the last map was taken.
    pub dirty: bool,
}

impl Store {
    /// A pod was added or changed (`None`: it holds no address now).
    pub fn apply_pod(&mut self, uid: &str, rec: Option<PodRec>) {
        let changed = match rec {
            Some(r) => self.pods.insert(uid.to_string(), r.clone()).as_ref() != Some(&r),
            None => self.pods.remove(uid).is_some(),
        };
        self.dirty |= changed;
    }

    /// A pod was deleted.
    pub fn delete_pod(&mut self, uid: &str) {
        self.apply_pod(uid, None);
    }

    /// A relist of pods begins.
    pub fn pods_relist_begin(&mut self) {
        self.pods_relist = Some(BTreeMap::new());
    }

    /// One pod of the relist.
    pub fn pods_relist_item(&mut self, uid: &str, rec: Option<PodRec>) {
        if let (Some(buf), Some(r)) = (self.pods_relist.as_mut(), rec) {
            buf.insert(uid.to_string(), r);
        }
    }

    /// The relist is complete: it replaces what was known (pods deleted while the watch
    /// was down leave now).
    pub fn pods_relist_done(&mut self) {
        if let Some(buf) = self.pods_relist.take() {
            if buf != self.pods {
                self.pods = buf;
                self.dirty = true;
            }
        }
    }

    /// A namespace was added or changed.
    pub fn apply_namespace(&mut self, name: String, labels: BTreeMap<String, String>) {
        let changed = self.namespaces.insert(name, labels.clone()) != Some(labels);
        self.dirty |= changed;
    }

    /// A namespace was deleted.
    pub fn delete_namespace(&mut self, name: &str) {
        self.dirty |= self.namespaces.remove(name).is_some();
    }

    /// A relist of namespaces begins.
    pub fn ns_relist_begin(&mut self) {
        self.ns_relist = Some(NamespaceLabels::new());
    }

    /// One namespace of the relist.
    pub fn ns_relist_item(&mut self, name: String, labels: BTreeMap<String, String>) {
        if let Some(buf) = self.ns_relist.as_mut() {
            buf.insert(name, labels);
        }
    }

    /// The namespace relist is complete.
    pub fn ns_relist_done(&mut self) {
        if let Some(buf) = self.ns_relist.take() {
            if buf != self.namespaces {
                self.namespaces = buf;
                self.dirty = true;
            }
        }
    }

    /// Pods known.
    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// Namespaces known.
    pub fn namespace_count(&self) -> usize {
        self.namespaces.len()
    }

    /// The map to publish. An address two pods claim (the API can show a pod that is going
    /// away beside the new one that got its address) goes to the one that is not being
    /// deleted, then to the newer, then to the greater uid: the old identity never decides a
    /// flow of the new pod. Pods are in `namespace/name` order.
    pub fn map(&self, generation: u64, written_unix_ms: u64, stale: bool) -> ClusterMap {
        let mut owner: HashMap<IpAddr, &PodRec> = HashMap::new();
        for r in self.pods.values() {
            for ip in &r.pod.ips {
                let better = |cur: &PodRec| {
                    (!r.terminating, &r.created, &r.pod.uid)
                        > (!cur.terminating, &cur.created, &cur.pod.uid)
                };
                match owner.get(ip) {
                    Some(cur) if !better(cur) => {}
                    _ => {
                        owner.insert(*ip, r);
                    }
                }
            }
        }
        let mut pods: Vec<ClusterPod> = self
            .pods
            .values()
            .filter_map(|r| {
                let ips: Vec<IpAddr> = r
                    .pod
                    .ips
                    .iter()
                    .filter(|ip| owner.get(ip).is_some_and(|o| std::ptr::eq(*o, r)))
                    .copied()
                    .collect();
                if ips.is_empty() {
                    return None;
                }
                Some(ClusterPod {
                    ips,
                    namespace_labels: self
                        .namespaces
                        .get(&r.pod.namespace)
                        .cloned()
                        .unwrap_or_default(),
                    ..r.pod.clone()
                })
            })
            .collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        ClusterMap {
            format: CLUSTER_MAP_FORMAT,
            generation,
            written_unix_ms,
            stale,
            pods,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(uid: &str, name: &str, ip: &str, created: &str, app: &str) -> PodRec {
        PodRec {
            pod: ClusterPod {
                uid: uid.into(),
                namespace: "payments".into(),
                name: name.into(),
                node: "a".into(),
                ips: vec![ip.parse().unwrap_or_else(|e| panic!("{e}"))],
                labels: [("app".to_string(), app.to_string())].into(),
                ..Default::default()
            },
            created: created.into(),
            terminating: false,
        }
    }

    fn at<'a>(m: &'a ClusterMap, ip: &str) -> Vec<&'a str> {
        let ip: IpAddr = ip.parse().unwrap_or_else(|e| panic!("{e}"));
        m.pods
            .iter()
            .filter(|p| p.ips.contains(&ip))
            .map(|p| p.name.as_str())
            .collect()
    }

    #[test]
    fn a_reused_address_belongs_to_the_new_pod_only() {
        let mut s = Store::default();
        s.apply_pod(
            "u1",
            Some(rec(
                "u1",
                "old-api",
                "10.0.0.5",
                "2026-11-26T05:00:00Z",
                "api",
            )),
        );
        assert_eq!(at(&s.map(1, 0, false), "10.0.0.5"), ["old-api"]);
        // The new pod shows up before the old one's deletion arrives.
        s.apply_pod(
            "u2",
            Some(rec(
                "u2",
                "new-web",
                "10.0.0.5",
                "2026-11-26T05:01:00Z",
                "web",
            )),
        );
        assert_eq!(at(&s.map(2, 0, false), "10.0.0.5"), ["new-web"]);
        // An old pod still terminating loses even to an older... and to a newer one.
        let mut old = rec("u1", "old-api", "10.0.0.5", "2026-11-26T05:02:00Z", "api");
        old.terminating = true;
        s.apply_pod("u1", Some(old));
        assert_eq!(at(&s.map(3, 0, false), "10.0.0.5"), ["new-web"]);
        s.delete_pod("u1");
        let m = s.map(4, 0, false);
        assert_eq!(m.pods.len(), 1);
        assert_eq!(at(&m, "10.0.0.5"), ["new-web"]);
    }

    #[test]
    fn a_relist_replaces_the_map_only_when_complete() {
        let mut s = Store::default();
        s.apply_pod("u1", Some(rec("u1", "a", "10.0.0.1", "t1", "api")));
        s.apply_pod("u2", Some(rec("u2", "b", "10.0.0.2", "t1", "api")));
        s.dirty = false;
        s.pods_relist_begin();
        s.pods_relist_item("u2", Some(rec("u2", "b", "10.0.0.2", "t1", "api")));
        // Mid-relist the old map is what is published.
        assert_eq!(s.map(1, 0, false).pods.len(), 2);
        assert!(!s.dirty);
        s.pods_relist_done();
        assert!(s.dirty);
        let m = s.map(2, 0, false);
        assert_eq!(
            m.pods.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["b"],
            "u1 was deleted while the watch was down"
        );
    }

    #[test]
    fn namespace_labels_follow_their_namespace() {
        let mut s = Store::default();
        s.apply_pod("u1", Some(rec("u1", "db", "10.0.0.1", "t1", "db")));
        s.apply_namespace(
            "payments".into(),
            [("pci".to_string(), "cde".to_string())].into(),
        );
        let m = s.map(1, 0, false);
        assert_eq!(
            m.pods[0].namespace_labels.get("pci").map(String::as_str),
            Some("cde")
        );
        s.dirty = false;
        s.apply_namespace(
            "payments".into(),
            [("pci".to_string(), "cde".to_string())].into(),
        );
        assert!(!s.dirty, "an unchanged namespace is not a change");
        s.delete_namespace("payments");
        assert!(s.map(2, 0, false).pods[0].namespace_labels.is_empty());
    }
}
