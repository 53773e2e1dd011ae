//! A Pod or Namespace object from the API, reduced to what zones select on. Objects arrive
//! as JSON of any shape (the API server is trusted, but a proxy, a webhook or a bug in
//! between is not): each is read on its own, and a malformed one is refused with the field
//! that is wrong, never taking the rest of the map with it.

use enclave_netfilter::identity::ClusterPod;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// A pod as the map keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodRec {
    /// What the map publishes.
    pub pod: ClusterPod,
    /// `metadata.creationTimestamp` (RFC 3339; sorts in time order).
    pub created: String,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
}

/// Why an object was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// `namespace/name` as far as it could be read.
    pub object: String,
    /// The field and what is wrong with it.
    pub why: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.why)
    }
}

fn name_of(v: &serde_json::Value) -> String {
    let m = &v["metadata"];
    match (m["namespace"].as_str(), m["name"].as_str()) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        (None, Some(n)) => n.to_string(),
        _ => "(object without a name)".into(),
    }
}

fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value, kind: &str) -> Result<T, Refused> {
    let object = format!("{kind} {}", name_of(&v));
    serde_path_to_error::deserialize(v).map_err(|e| Refused {
        object,
        why: format!("{}: {}", e.path(), e.inner()),
    })
}

/// Reads a Pod object. `Ok(None)` for a pod that holds no address of its own: not yet
/// scheduled or given an IP, finished (Succeeded or Failed: its address may already be
/// another pod's), or on the host's network (its address is the node's).
pub fn pod_from_json(v: serde_json::Value) -> Result<Option<PodRec>, Refused> {
    let p: Pod = typed(v, "pod")?;
    let object = format!(
        "pod {}/{}",
        p.metadata.namespace.as_deref().unwrap_or("?"),
        p.metadata.name.as_deref().unwrap_or("?")
    );
    let refuse = |why: String| Refused {
        object: object.clone(),
        why,
    };
    let (Some(name), Some(namespace), Some(uid)) = (
        p.metadata.name.clone(),
        p.metadata.namespace.clone(),
        p.metadata.uid.clone(),
    ) else {
        return Err(refuse(
            "metadata: a pod needs a name, a namespace and a uid".into(),
        ));
    };
    let spec = p.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Ok(None);
    }
    let status = p.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    ) {
        return Ok(None);
    }
    let mut texts: Vec<(String, &str)> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| {
            ips.iter()
                .enumerate()
                .map(|(i, a)| (format!("status.podIPs[{i}].ip"), a.ip.as_str()))
                .collect()
        })
        .unwrap_or_default();
    if texts.is_empty() {
        if let Some(ip) = status.and_then(|s| s.pod_ip.as_deref()) {
            texts.push(("status.podIP".into(), ip));
        }
    }
    if texts.is_empty() {
        return Ok(None);
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    for (field, t) in texts {
        let ip: IpAddr = t
            .parse()
            .map_err(|_| refuse(format!("{field}: `{t}` is not an IP address")))?;
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
            return Err(refuse(format!("{field}: `{t}` cannot be a pod's address")));
        }
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let annotations = p
        .metadata
        .annotations
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k.starts_with("enclave.io/"))
        .collect();
    Ok(Some(PodRec {
        pod: ClusterPod {
            uid,
            namespace,
            name,
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            ips,
            labels: p.metadata.labels.unwrap_or_default(),
            annotations,
            namespace_labels: BTreeMap::new(),
        },
        created: p
            .metadata
            .creation_timestamp
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        terminating: p.metadata.deletion_timestamp.is_some(),
    }))
}

/// Reads a Namespace object: its name and labels.
pub fn namespace_from_json(
    v: serde_json::Value,
) -> Result<(String, BTreeMap<String, String>), Refused> {
    let n: Namespace = typed(v, "namespace")?;
    let name = n.metadata.name.ok_or_else(|| Refused {
        object: "namespace ?".into(),
        why: "metadata.name: missing".into(),
    })?;
    Ok((name, n.metadata.labels.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ip: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "api-0", "namespace": "payments", "uid": "u1",
                "labels": {"app": "api"}, "annotations": {"enclave.io/zone": "api", "other": "x"},
                "creationTimestamp": "2026-11-26T05:00:00Z"},
            "spec": {"nodeName": "node-a", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
    }

    #[test]
    fn a_running_pod_is_read_with_its_addresses_labels_and_enclave_annotations() {
        let r = pod_from_json(pod(json!("10.88.77.5"))).unwrap_or_else(|e| panic!("{e}"));
        let r = r.unwrap_or_else(|| panic!("no record"));
        assert_eq!(
            r.pod.ips,
            vec!["10.88.77.5"
                .parse::<IpAddr>()
                .unwrap_or_else(|e| panic!("{e}"))]
        );
        assert_eq!(r.pod.node, "node-a");
        assert_eq!(r.pod.labels.get("app").map(String::as_str), Some("api"));
        assert_eq!(
            r.pod.annotations.len(),
            1,
            "only enclave.io/* annotations are kept"
        );
        assert!(r.created.starts_with("2026-11-26"));
    }

    #[test]
    fn pods_without_an_address_of_their_own_are_left_out() {
        let mut p = pod(json!("10.88.77.5"));
        p["status"]["phase"] = json!("Succeeded");
        assert_eq!(pod_from_json(p).ok(), Some(None), "finished");
        let mut p = pod(json!("10.0.0.9"));
        p["spec"]["hostNetwork"] = json!(true);
        assert_eq!(pod_from_json(p).ok(), Some(None), "host network");
        let mut p = pod(json!("10.88.77.5"));
        p["status"] = json!({"phase": "Pending"});
        assert_eq!(pod_from_json(p).ok(), Some(None), "no IP yet");
    }

    #[test]
    fn malformed_objects_are_refused_naming_the_field() {
        let e = pod_from_json(pod(json!("10.88.77.999")))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("pod payments/api-0: status.podIPs[0].ip: `10.88.77.999` is not an IP address")
        );
        let mut p = pod(json!("10.88.77.5"));
        p["metadata"]["labels"] = json!({"app": 7});
        let e = pod_from_json(p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.starts_with("pod payments/api-0: metadata.labels.app: invalid type"),
            "{e}"
        );
        let mut p = pod(json!("10.88.77.5"));
        p["metadata"].as_object_mut().map(|m| m.remove("uid"));
        let e = pod_from_json(p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("needs a name, a namespace and a uid"), "{e}");
        assert!(pod_from_json(json!([1, 2])).is_err());
        assert!(namespace_from_json(json!({"metadata": {"labels": {"a": "b"}}})).is_err());
    }
}
