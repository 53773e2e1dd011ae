#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! What docs/cluster.md says enclave-node's DaemonSet asks for, read from the manifest
//! itself: list and watch on pods and namespaces and nothing else; a non-root user with no
//! capability, no privilege escalation, a read-only root filesystem and the runtime's
//! default seccomp profile; one writable host path, the peer directory.

use serde_json::Value;

fn documents() -> Vec<Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../configs/kubernetes/enclave-node-daemonset.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    text.split("\n---\n")
        .map(|d| {
            enclave_netfilter::yaml::from_str::<Value>(d)
                .unwrap_or_else(|e| panic!("{path}: {}: {}", e.field, e.message))
        })
        .collect()
}

fn kind<'a>(docs: &'a [Value], k: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == k)
        .unwrap_or_else(|| panic!("no {k}"))
}

#[test]
fn the_daemonset_asks_for_list_and_watch_and_runs_unprivileged() {
    let docs = documents();
    let role = kind(&docs, "ClusterRole");
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["list", "watch"]}])
    );
    let ds = kind(&docs, "DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["serviceAccountName"], "enclave-node");
    let c = &spec["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert!(sc["runAsUser"].as_u64().unwrap() > 0);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(sc["capabilities"].get("add").is_none());
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(spec.get("hostNetwork").is_none() && spec.get("hostPID").is_none());
    // One host path, the peer directory, and the container's user owns it.
    let vols = spec["volumes"].as_array().unwrap();
    let host: Vec<&str> = vols
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert_eq!(host, ["/run/enclave/peers"]);
    let init = &spec["initContainers"][0];
    assert!(init["command"]
        .to_string()
        .contains(&format!("chown {}:", sc["runAsUser"])));
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w == ["--peer-dir", "/run/enclave/peers"]),
        "{args:?}"
    );
}

#[test]
fn the_segmentation_cronjob_runs_on_change_keeps_a_year_and_needs_no_capability() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../configs/kubernetes/segmentation-cronjob.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let cj: Value = enclave_netfilter::yaml::from_str(&text)
        .unwrap_or_else(|e| panic!("{path}: {}: {}", e.field, e.message));
    assert_eq!(cj["kind"], "CronJob");
    assert_eq!(cj["spec"]["concurrencyPolicy"], "Forbid");
    let job = &cj["spec"]["jobTemplate"]["spec"];
    let pod = &job["template"]["spec"];
    assert_eq!(
        pod["topologySpreadConstraints"][0]["topologyKey"], "kubernetes.io/hostname",
        "one pod per node"
    );
    let c = &pod["containers"][0];
    assert_eq!(
        c["command"],
        serde_json::json!(["enclavectl", "segmentation", "test"])
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    for want in [
        "--if-changed",
        "--keep-days=400",
        "--intent=/intent/policy.yaml",
    ] {
        assert!(args.contains(&want), "{args:?} lacks {want}");
    }
    let keep: u64 = args
        .iter()
        .find_map(|a| a.strip_prefix("--keep-days="))
        .and_then(|d| d.parse().ok())
        .unwrap();
    assert!(keep >= 365, "12 months of reports");
    let sc = &c["securityContext"];
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(sc["capabilities"]["add"].is_null());
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    // (netfilter/tests/cli.rs checks that enclavectl knows every flag it passes.)
}
