//! enclave-node against a stand-in API server (tests/src/kubeapi.rs; no kube-apiserver is
//! packaged here): the real enclave-node binary, its real kube watchers, the real list/watch
//! JSON. What it publishes in the peer directory follows pods and namespaces, gives a reused
//! address to the new pod only, survives malformed objects, relists after 410 Gone, keeps
//! the last map (marked stale) while the API server is down and catches up when it returns.
//! As root it runs as nobody, and the test reads from /proc that it holds no capability.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use enclave_netfilter::identity::{ClusterMap, CLUSTER_MAP_FILE};
use enclave_tests::kubeapi::{FakeApiServer, PodObject};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// enclave-node, and the copy of its binary it runs from (kept until it is gone).
struct Node(
    Child,
    #[allow(dead_code)] Option<enclave_tests::RunnableCopy>,
);
impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts enclave-node on `peer_dir`; as root, as uid/gid 65534 (the peer directory is
/// handed to that user, as the DaemonSet's init container does, and the binary runs from a
/// copy that user can reach: the checkout may sit under a 0700 directory).
fn start_node(api: &str, peer_dir: &Path, metrics_port: u16) -> Node {
    use std::os::unix::fs::PermissionsExt;
    let bin = enclave_tests::workspace_root().join("target/debug/enclave-node");
    assert!(
        bin.exists(),
        "{} not built (cargo build -p enclave-node)",
        bin.display()
    );
    std::fs::create_dir_all(peer_dir).unwrap();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let copy = root.then(|| enclave_tests::RunnableCopy::of(&bin).unwrap());
    let mut cmd = Command::new(copy.as_ref().map_or(bin.clone(), |c| c.path.clone()));
    cmd.args(["--api-server", api, "--peer-dir"])
        .arg(peer_dir)
        .args([
            "--metrics",
            &format!("127.0.0.1:{metrics_port}"),
            "--coalesce-ms",
            "50",
            "--probe-secs",
            "1",
        ])
        .stdout(Stdio::null());
    if root {
        // The directories above it must be reachable by that user too (a tempdir is 0700).
        let tmp = std::env::temp_dir();
        for d in peer_dir.ancestors().skip(1) {
            if d == tmp || !d.starts_with(&tmp) {
                break;
            }
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let c = std::ffi::CString::new(peer_dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
        // std drops the supplementary groups when root sets a uid.
        cmd.uid(65534).gid(65534);
    }
    Node(cmd.spawn().unwrap(), copy)
}

fn map(dir: &Path) -> Option<ClusterMap> {
    ClusterMap::load_dir(dir).ok().flatten()
}

fn wait_map(dir: &Path, what: &str, ok: impl Fn(&ClusterMap) -> bool) -> ClusterMap {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(m) = map(dir) {
            if ok(&m) {
                return m;
            }
        }
        if Instant::now() > deadline {
            panic!(
                "the cluster map never showed: {what}\nlast map: {:#?}",
                map(dir)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn metric(port: u16, name: &str) -> u64 {
    metrics(port)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

fn at(m: &ClusterMap, ip: &str) -> Vec<String> {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    m.pods
        .iter()
        .filter(|p| p.ips.contains(&ip))
        .map(|p| p.reference())
        .collect()
}

fn pod<'a>(ns: &'a str, name: &'a str, uid: &'a str, app: &'a str, ip: &'a str) -> PodObject<'a> {
    PodObject {
        namespace: ns,
        name,
        uid,
        labels: match app {
            "api" => &[("app", "api")],
            "web" => &[("app", "web")],
            _ => &[("app", "db")],
        },
        ip,
        node: "node-b",
    }
}

#[test]
fn enclave_node_publishes_the_cluster_as_a_stand_in_api_server_shows_it() {
    let api = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let peers = dir.path().join("peers");
    api.put_namespace("payments", &[("pci", "cde")]);
    api.put_namespace("shop", &[]);
    api.put_pod(&pod("payments", "api-0", "u-api", "api", "10.88.77.10"));
    api.put_pod(&pod("payments", "db-0", "u-db", "db", "10.88.78.10"));
    let port = free_port();
    let node = start_node(&api.url(), &peers, port);
    let pid = node.0.id();

    // The first map: both pods, with their labels and their namespace's labels.
    let m = wait_map(&peers, "two pods", |m| m.pods.len() == 2);
    assert!(!m.stale);
    let db = m.find("payments/db-0").unwrap();
    assert_eq!(db.labels.get("app").map(String::as_str), Some("db"));
    assert_eq!(
        db.namespace_labels.get("pci").map(String::as_str),
        Some("cde")
    );
    assert_eq!(db.node, "node-b");

    // Unprivileged: as root the test started it as nobody; it holds no capability.
    let uid = enclave_tests::procfs::pid_status(pid, "Uid:");
    let cap = enclave_tests::procfs::pid_status(pid, "CapEff:");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!(
            uid,
            ["65534", "65534", "65534", "65534"],
            "enclave-node's uids"
        );
        assert_eq!(
            cap,
            ["0000000000000000"],
            "enclave-node's effective capabilities"
        );
        let st = std::fs::metadata(peers.join(CLUSTER_MAP_FILE)).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&st),
            65534,
            "written by enclave-node itself"
        );
    } else {
        eprintln!(
            "(not root: enclave-node ran as this user; the uid and capability checks need root)"
        );
    }

    // A namespace's labels change: its pods' entries follow.
    api.put_namespace("payments", &[("pci", "out-of-scope")]);
    wait_map(&peers, "new namespace labels", |m| {
        m.find("payments/db-0").is_some_and(|p| {
            p.namespace_labels.get("pci").map(String::as_str) == Some("out-of-scope")
        })
    });

    // A malformed pod is refused, named and counted; the rest of the map goes on.
    api.put_raw_pod(serde_json::json!({"metadata": {"name": "broken", "namespace": "shop", "uid": "u-broken"},
        "spec": {"containers": [{"name": "c"}]}, "status": {"phase": "Running", "podIP": "10.88.77.999"}}));
    api.put_pod(&pod("shop", "web-0", "u-web", "web", "10.88.77.11"));
    let m = wait_map(&peers, "web-0 after a malformed pod", |m| {
        m.find("shop/web-0").is_some()
    });
    assert!(m.find("shop/broken").is_none());
    assert_eq!(metric(port, "enclave_node_objects_refused_total"), 1);

    // An address reused: the old pod goes, a new pod of another zone gets its address.
    api.delete_pod("payments", "api-0");
    api.put_pod(&pod("shop", "web-1", "u-web-1", "web", "10.88.77.10"));
    let m = wait_map(&peers, "10.88.77.10 is web-1", |m| {
        at(m, "10.88.77.10") == ["shop/web-1"]
    });
    assert!(m.find("payments/api-0").is_none());
    // Order reversed (the new pod's ADDED before the old one's DELETED): the new one has it.
    api.put_pod(&pod("shop", "web-2", "u-web-2", "web", "10.88.77.12"));
    wait_map(&peers, "web-2", |m| m.find("shop/web-2").is_some());
    std::thread::sleep(Duration::from_millis(1100)); // creationTimestamp has 1 s resolution
    api.put_pod(&pod("payments", "api-1", "u-api-1", "api", "10.88.77.12"));
    wait_map(&peers, "10.88.77.12 is the newer api-1", |m| {
        at(m, "10.88.77.12") == ["payments/api-1"]
    });

    // 410 Gone: history compacted, watches cut; the client relists and sees a deletion it
    // never got as an event. (web-2 left the map when api-1 took its only address.)
    assert!(map(&peers).unwrap().find("shop/web-2").is_none());
    let relists = metric(port, "enclave_node_relists_total");
    api.delete_pod_silently("payments", "db-0");
    api.compact();
    api.cut_watches();
    let m = wait_map(&peers, "db-0 gone after the relist", |m| {
        m.find("payments/db-0").is_none() && !m.stale
    });
    assert!(
        metric(port, "enclave_node_relists_total") > relists,
        "relists before {relists}:\n{}",
        metrics(port)
    );
    let gone = api
        .requests()
        .iter()
        .filter(|r| r.contains("watch=true"))
        .count();
    assert!(
        gone >= 3,
        "the watches came back after 410 Gone: {:?}",
        api.requests()
    );
    assert_eq!(at(&m, "10.88.77.12"), ["payments/api-1"]);

    // The API server down: the last map stays, marked stale (file and metric).
    api.stop();
    let stale = wait_map(&peers, "stale", |m| m.stale);
    assert_eq!(
        stale.pods.len(),
        m.pods.len(),
        "the last map stays in force"
    );
    assert_eq!(metric(port, "enclave_node_map_stale"), 1);
    // Changes while it is down, then it returns: the map catches up and is fresh again.
    api.put_pod(&pod("payments", "db-1", "u-db-1", "db", "10.88.78.11"));
    api.delete_pod("shop", "web-0");
    api.resume();
    let m = wait_map(&peers, "caught up", |m| {
        !m.stale && m.find("payments/db-1").is_some() && m.find("shop/web-0").is_none()
    });
    assert!(m.generation > stale.generation);
    assert_eq!(metric(port, "enclave_node_map_stale"), 0);
    assert!(metric(port, "enclave_node_watch_errors_total") > 0);
    // It watched (and listed) nothing but pods and namespaces.
    for r in api.requests() {
        assert!(
            r.starts_with("/api/v1/pods?") || r.starts_with("/api/v1/namespaces?"),
            "enclave-node asked for {r}"
        );
    }
    drop(node);
}
