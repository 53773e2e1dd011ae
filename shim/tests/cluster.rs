//! Zones across a cluster, proven on two nodes on this machine. Each node is its own
//! containerd with CRI and CNI in its own network namespace; the two pod subnets are routed
//! over a veth between them. Pods run in microVMs on both (each behind its own enclave-netd
//! and nftables table), plus an ordinary runc pod. Each node runs enclave-node, unprivileged,
//! against a stand-in for the Kubernetes API server (tests/src/kubeapi.rs: no kube-apiserver
//! is packaged for these machines), into which the test publishes every pod after
//! RunPodSandbox as the kubelet would (IP, labels, nodeName). Zones select pods by labels and
//! by their namespace's labels; no pod carries an `enclave.io/zone` annotation.
//!
//! Scenarios, through real guests and packets:
//! - node A `api` → node B `db` allowed (label-selected zones on both ends), records on both
//!   nodes naming the other end by namespace/pod and zone;
//! - node A `web` → node B `db` denied;
//! - a runc pod on node A: `db`'s netd resolves its zone from its labels;
//! - a workload deleted and its address reused by a pod of another zone: its live flow is
//!   cut and new flows are decided by the new identity;
//! - the API server stopped: enforcement goes on with the last map (marked stale), and a
//!   change made meanwhile takes effect when it returns.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use enclave_netfilter::identity::ClusterMap;
use enclave_tests::cri::{
    container_config, cri_client, exec_sync, pod_ip, reason, records, run_container,
    run_sandbox_on, wait_record, CriNode,
};
use enclave_tests::kubeapi::{FakeApiServer, PodObject};
use enclave_tests::skip_or_fail;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

const POLICY: &str = r#"apiVersion: enclave.io/v1alpha1
kind: ZonePolicy
metadata: {name: cluster-zones, version: "1", description: "Zones by labels, across nodes"}
spec:
  zones:
    - name: cde-db
      selector:
        namespaceSelector: {matchLabels: {pci: cde}}
        matchLabels: {app: db}
    - name: cde-api
      selector:
        namespaces: [payments]
        matchExpressions: [{key: app, operator: In, values: [api]}]
    - name: web
      selector:
        matchLabels: {app: web}
  rules:
    - {name: api-to-db, from: cde-api, to: cde-db, protocol: tcp, ports: [5432]}
"#;

fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-enclave-v2")).with_file_name(name)
}

fn run(cmd: &str) {
    let ok = Command::new("sh")
        .args(["-c", cmd])
        .status()
        .unwrap()
        .success();
    assert!(ok, "{cmd}");
}

/// A network namespace and what lives in it, removed on drop.
struct Ns(String);
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// enclave-node, and the copy of its binary it runs from (kept until it is gone).
struct Daemon(Child, #[allow(dead_code)] enclave_tests::RunnableCopy);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// enclave-node for a node, as nobody, publishing into the node's peer directory.
fn enclave_node(api: &str, node: &CriNode, log: &Path) -> Daemon {
    use std::os::unix::process::CommandExt as _;
    std::fs::create_dir_all(&node.peer_dir).unwrap();
    let c = std::ffi::CString::new(node.peer_dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
    // Run from a copy nobody can reach (the checkout may sit under a 0700 directory).
    let copy = enclave_tests::RunnableCopy::of(&bin("enclave-node")).unwrap();
    let child = Command::new(&copy.path)
        .args([
            "--api-server",
            api,
            "--metrics",
            "off",
            "--coalesce-ms",
            "50",
            "--probe-secs",
            "1",
            "--peer-dir",
        ])
        .arg(&node.peer_dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .uid(65534)
        .gid(65534)
        .spawn()
        .unwrap();
    Daemon(child, copy)
}

struct Pod {
    name: &'static str,
    sandbox: String,
    ip: String,
    c: String,
}

#[allow(clippy::too_many_arguments)]
async fn run_pod(
    cri: &mut RuntimeServiceClient<Channel>,
    node: &CriNode,
    logs: &Path,
    (name, ns, labels): (&'static str, &str, &[(&str, &str)]),
    handler: &str,
    script: &str,
    api: &FakeApiServer,
    node_name: &str,
) -> Pod {
    let sc = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: ns.into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: logs.display().to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        linux: Some(LinuxPodSandboxConfig::default()),
        ..Default::default()
    };
    let sandbox = run_sandbox_on(cri, &node.containerd, &sc, handler).await;
    let config = container_config(name, &["sh", "-c", script], &format!("{name}.log"));
    let c = run_container(cri, &sandbox, &sc, config).await;
    let ip = pod_ip(cri, &sandbox).await;
    assert!(!ip.is_empty(), "{name}: no pod IP");
    // What the kubelet does next: the pod's status, with its IP, reaches the API server.
    api.put_pod(&PodObject {
        namespace: ns,
        name,
        uid: &sandbox,
        labels,
        ip: &ip,
        node: node_name,
    });
    Pod {
        name,
        sandbox,
        ip,
        c,
    }
}

async fn sh(cri: &RuntimeServiceClient<Channel>, p: &Pod, script: &str) -> (i32, String) {
    let mut c = cri.clone();
    let (code, out, _) = exec_sync(&mut c, &p.c, &["sh", "-c", script]).await;
    (code, out)
}

/// Sends `word` from the pod to `ip:5432` (a connection that carries data when allowed).
fn send(word: &str, ip: &str) -> String {
    format!("echo {word} | timeout 8 nc -w 2 {ip} 5432; true")
}

async fn db_got(cri: &RuntimeServiceClient<Channel>, db: &Pod) -> String {
    sh(cri, db, "cat /tmp/got 2>/dev/null; true").await.1
}

async fn wait_db_got(cri: &RuntimeServiceClient<Channel>, db: &Pod, word: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if db_got(cri, db).await.contains(word) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    false
}

async fn wait_until(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn map_has(node: &CriNode, f: impl Fn(&ClusterMap) -> bool) -> bool {
    ClusterMap::load_dir(&node.peer_dir)
        .ok()
        .flatten()
        .is_some_and(|m| f(&m))
}

/// The pod's enclave-netd's metrics (through its control socket).
fn netd_metrics(node: &CriNode, pod: &str) -> String {
    let (entries, _) = enclave_netfilter::node::read_registry(&node.registry);
    let e = entries
        .iter()
        .find(|e| e.name == pod)
        .unwrap_or_else(|| panic!("{pod} not registered"));
    enclave_netfilter::node::control_request(e.control.as_ref().unwrap(), "metrics")
        .unwrap_or_default()
}

fn ep<'a>(r: &'a serde_json::Value, end: &str, key: &str) -> &'a str {
    r[end][key].as_str().unwrap_or("")
}

#[tokio::test(flavor = "current_thread")]
async fn zones_follow_pods_across_two_nodes_through_a_stand_in_api_server() {
    let test = "zones_follow_pods_across_two_nodes_through_a_stand_in_api_server";
    if let Err(e) = enclave_tests::cri::prerequisites(&[
        ("runc", "/usr/sbin/runc"),
        ("busybox", "/usr/bin/busybox"),
        ("nsenter", "/usr/bin/nsenter"),
    ]) {
        return skip_or_fail(test, &e);
    }
    if !bin("enclave-node").exists() || !bin("enclave-netd").exists() {
        return skip_or_fail(
            test,
            "enclave-node / enclave-netd not built (cargo build --workspace --bins)",
        );
    }
    enclave_tests::cri::clean_node();
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("enclave-cluster-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    let api = FakeApiServer::start();
    api.put_namespace("payments", &[("pci", "cde")]);
    api.put_namespace("shop", &[]);

    let t = Instant::now();
    let a = CriNode::start_on(
        &dir.join("a"),
        &bin(""),
        &format!("encl-a-{pid}"),
        POLICY,
        "10.88.77.0/24",
    );
    let b = CriNode::start_on(
        &dir.join("b"),
        &bin(""),
        &format!("encl-b-{pid}"),
        POLICY,
        "10.88.78.0/24",
    );
    a.enable_runc();
    let (na, nb) = (a.netns.name.clone(), b.netns.name.clone());
    // The wire between the nodes, and each node's route to the other's pods.
    let (va, vb) = (
        format!("cla{}", pid % 100000),
        format!("clb{}", pid % 100000),
    );
    run(&format!("ip link add {va} type veth peer name {vb} && ip link set {va} netns {na} && ip link set {vb} netns {nb}"));
    run(&format!("ip -n {na} addr add 10.99.0.1/30 dev {va} && ip -n {na} link set {va} up && ip -n {na} route add 10.88.78.0/24 via 10.99.0.2"));
    run(&format!("ip -n {nb} addr add 10.99.0.2/30 dev {vb} && ip -n {nb} link set {vb} up && ip -n {nb} route add 10.88.77.0/24 via 10.99.0.1"));
    for n in [&na, &nb] {
        run(&format!(
            "ip netns exec {n} sysctl -qw net.ipv4.ip_forward=1"
        ));
    }
    let _node_a = enclave_node(&api.url(), &a, &dir.join("enclave-node-a.log"));
    let _node_b = enclave_node(&api.url(), &b, &dir.join("enclave-node-b.log"));

    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut cri_a = cri_client(&a.containerd.sock()).await;
    let mut cri_b = cri_client(&b.containerd.sock()).await;
    // A server that takes connections side by side (`-ll -e`): a flow cut midway never
    // closes, and must not keep later ones out.
    let serve = "printf '#!/bin/sh\\ncat >> /tmp/got\\n' > /srv.sh && chmod +x /srv.sh && exec nc -ll -p 5432 -e /srv.sh";
    let db = run_pod(
        &mut cri_b,
        &b,
        &logs,
        ("db", "payments", &[("app", "db")]),
        "enclave",
        serve,
        &api,
        "node-b",
    )
    .await;
    let apip = run_pod(
        &mut cri_a,
        &a,
        &logs,
        ("api", "payments", &[("app", "api")]),
        "enclave",
        "exec sleep 100000",
        &api,
        "node-a",
    )
    .await;
    let web = run_pod(
        &mut cri_a,
        &a,
        &logs,
        ("web", "shop", &[("app", "web")]),
        "enclave",
        "exec sleep 100000",
        &api,
        "node-a",
    )
    .await;
    let batch = run_pod(
        &mut cri_a,
        &a,
        &logs,
        ("batch", "payments", &[("app", "api")]),
        "runc",
        "exec sleep 100000",
        &api,
        "node-a",
    )
    .await;
    eprintln!(
        "[{:>5.1}s] pods up: node A api {} web {} batch (runc) {}; node B db {}",
        t.elapsed().as_secs_f64(),
        apip.ip,
        web.ip,
        batch.ip,
        db.ip
    );

    // Both nodes' maps hold every pod, and each pod's netd took its zone from its labels.
    for n in [&a, &b] {
        wait_until("every pod in both cluster maps", 20, || {
            map_has(n, |m| {
                ["payments/db", "payments/api", "shop/web", "payments/batch"]
                    .iter()
                    .all(|p| m.find(p).is_some())
            })
        })
        .await;
    }
    for (n, pod, zone) in [
        (&b, "db", "cde-db"),
        (&a, "api", "cde-api"),
        (&a, "web", "web"),
    ] {
        wait_until(&format!("{pod}'s netd in zone {zone}"), 20, || {
            netd_metrics(n, pod).contains(&format!("zone=\"{zone}\""))
        })
        .await;
    }

    // `node status` shows the zone each pod's netd decides by (from labels, not annotations).
    let st = std::process::Command::new(bin("enclavectl"))
        .args(["node", "status", "--registry"])
        .arg(&b.registry)
        .output()
        .unwrap();
    let st = String::from_utf8_lossy(&st.stdout).to_string();
    assert!(
        st.lines()
            .any(|l| l.starts_with("payments/db\t") && l.contains("\tcde-db\tok tx")),
        "node status on node B:\n{st}"
    );

    // --- node A api -> node B db: allowed.
    eprintln!(
        "[{:>5.1}s] api (node A) -> db (node B) :5432, allowed",
        t.elapsed().as_secs_f64()
    );
    let (_, out) = sh(
        &cri_a,
        &apip,
        &format!("{} 2>&1; ip route; ip addr", send("from-api", &db.ip)),
    )
    .await;
    if !wait_db_got(&cri_b, &db, "from-api").await {
        let m = |n: &CriNode, p: &str| {
            netd_metrics(n, p)
                .lines()
                .filter(|l| !l.starts_with('#') && !l.ends_with(" 0"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        panic!(
            "api -> db carried nothing: {:?}\napi: {out}\napi's netd: {}\ndb's netd: {}",
            db_got(&cri_b, &db).await,
            m(&a, "api"),
            m(&b, "db")
        );
    }
    let r = wait_record(
        &b.audit_log,
        (&apip.ip, &db.ip, 5432),
        "db's netd allowed api",
        |r| r["action"] == "Allowed",
    )
    .await;
    assert_eq!(r["firewall_rule"]["name"], "api-to-db", "{r}");
    assert_eq!(
        (
            ep(&r, "src_endpoint", "zone"),
            ep(&r, "dst_endpoint", "zone")
        ),
        ("cde-api", "cde-db"),
        "{r}"
    );
    assert_eq!(
        r["unmapped"]["enclave"]["src"],
        serde_json::json!({"pod": "api", "namespace": "payments"}),
        "node B names node A's pod: {r}"
    );
    let r = wait_record(
        &a.audit_log,
        (&apip.ip, &db.ip, 5432),
        "api's netd allowed",
        |r| r["action"] == "Allowed",
    )
    .await;
    assert_eq!(
        r["unmapped"]["enclave"]["dst"],
        serde_json::json!({"pod": "db", "namespace": "payments"}),
        "node A names node B's pod: {r}"
    );

    // --- node A web -> node B db: denied (web's own netd, on node A, knows db's zone).
    eprintln!(
        "[{:>5.1}s] web (node A) -> db (node B) :5432, denied",
        t.elapsed().as_secs_f64()
    );
    sh(&cri_a, &web, &send("from-web", &db.ip)).await;
    let r = wait_record(
        &a.audit_log,
        (&web.ip, &db.ip, 5432),
        "web's netd denied",
        |r| r["action"] == "Denied",
    )
    .await;
    assert_eq!(
        (
            ep(&r, "src_endpoint", "zone"),
            ep(&r, "dst_endpoint", "zone")
        ),
        ("web", "cde-db"),
        "{r}"
    );
    assert_eq!(r["unmapped"]["enclave"]["dst"]["pod"], "db", "{r}");
    assert!(
        !db_got(&cri_b, &db).await.contains("from-web"),
        "web reached db"
    );

    // --- an ordinary runc pod on node A: db's netd resolves its zone from its labels.
    eprintln!(
        "[{:>5.1}s] batch (runc, node A, app=api) -> db, allowed by its labels",
        t.elapsed().as_secs_f64()
    );
    sh(&cri_a, &batch, &send("from-batch", &db.ip)).await;
    assert!(
        wait_db_got(&cri_b, &db, "from-batch").await,
        "the runc pod labelled app=api was refused"
    );
    let r = wait_record(
        &b.audit_log,
        (&batch.ip, &db.ip, 5432),
        "db's netd allowed batch",
        |r| r["action"] == "Allowed",
    )
    .await;
    assert_eq!(ep(&r, "src_endpoint", "zone"), "cde-api", "{r}");
    assert_eq!(r["unmapped"]["enclave"]["src"]["pod"], "batch", "{r}");

    // --- an address reused by a pod of another zone. A workload at 10.88.77.200 on node A
    // (a network namespace on A's pod bridge: CNI does not hand out a chosen address), first
    // published as `old-api` (cde-api), holds a connection to db open.
    eprintln!("[{:>5.1}s] 10.88.77.200: old-api (cde-api) holds a flow to db; its address goes to new-web (web)", t.elapsed().as_secs_f64());
    let reuse = Ns(format!("encl-r-{pid}"));
    let (ra, rb) = (
        format!("rua{}", pid % 100000),
        format!("rub{}", pid % 100000),
    );
    run(&format!("ip netns add {} && ip link add {ra} type veth peer name {rb} && ip link set {ra} netns {na} && ip link set {rb} netns {}", reuse.0, reuse.0));
    run(&format!(
        "ip -n {na} link set {ra} master enctest0 && ip -n {na} link set {ra} up"
    ));
    run(&format!("ip -n {0} link set lo up && ip -n {0} addr add 10.88.77.200/24 dev {rb} && ip -n {0} link set {rb} up && ip -n {0} route add default via 10.88.77.1", reuse.0));
    api.put_pod(&PodObject {
        namespace: "payments",
        name: "old-api",
        uid: "uid-old-api",
        labels: &[("app", "api")],
        ip: "10.88.77.200",
        node: "node-a",
    });
    wait_until("old-api in db's node map", 20, || {
        map_has(&b, |m| m.find("payments/old-api").is_some())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut long = std::os::unix::process::CommandExt::process_group(&mut Command::new("ip"), 0)
        .args(["netns", "exec", &reuse.0, "busybox", "sh", "-c"])
        .arg(format!(
            "(echo old-first; sleep 12; echo old-second) | busybox nc -w 20 {} 5432",
            db.ip
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let long_started = Instant::now();
    assert!(
        wait_db_got(&cri_b, &db, "old-first").await,
        "old-api's flow did not start"
    );
    api.delete_pod("payments", "old-api");
    api.put_pod(&PodObject {
        namespace: "shop",
        name: "new-web",
        uid: "uid-new-web",
        labels: &[("app", "web")],
        ip: "10.88.77.200",
        node: "node-a",
    });
    wait_until("new-web in db's node map", 20, || {
        map_has(&b, |m| {
            m.find("shop/new-web").is_some() && m.find("payments/old-api").is_none()
        })
    })
    .await;
    // The live flow is re-decided when the old identity leaves the address: cut, recorded.
    let r = wait_record(
        &b.audit_log,
        ("10.88.77.200", &db.ip, 5432),
        "the reused address's live flow cut",
        |r| r["action"] == "Denied" && reason(r) == "flow_cut",
    )
    .await;
    // Cut under the identity that followed the old one: new-web's (web), or none at all
    // (`unknown`) when enclave-node published the deletion before the new pod; never old-api's.
    let (who, zone) = (
        r["unmapped"]["enclave"]["src"]["pod"]
            .as_str()
            .unwrap_or(""),
        ep(&r, "src_endpoint", "zone"),
    );
    assert!(
        matches!((who, zone), ("new-web", "web") | ("", "unknown")),
        "the cut was decided as {who:?} in {zone:?}: {r}"
    );
    // The sender writes its second line 12 s in; it must not arrive. (A cut flow gets no
    // FIN or RST: the client would wait forever.)
    tokio::time::sleep(Duration::from_secs(14).saturating_sub(long_started.elapsed())).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // SAFETY: kill on the process group of our own child.
    unsafe { libc::kill(-(long.id() as i32), libc::SIGKILL) };
    let _ = long.wait();
    assert!(
        !db_got(&cri_b, &db).await.contains("old-second"),
        "the old identity kept deciding the flow"
    );
    // A new connection from the address is refused as new-web's: by the kernel wall in db's
    // network namespace (its table follows the map too) before netd would see it.
    let before = records(&b.audit_log).len();
    let _ = Command::new("ip")
        .args(["netns", "exec", &reuse.0, "busybox", "sh", "-c"])
        .arg(format!(
            "echo new-web | timeout 6 busybox nc -w 2 {} 5432",
            db.ip
        ))
        .output();
    assert!(
        !db_got(&cri_b, &db).await.contains("new-web"),
        "new-web reached db"
    );
    let allowed_since = records(&b.audit_log)[before..]
        .iter()
        .filter(|r| r["src_endpoint"]["ip"] == "10.88.77.200" && r["action"] == "Allowed")
        .count();
    assert_eq!(allowed_since, 0, "a flow of the reused address was allowed");

    // --- the API server stops: enforcement goes on with the last map, marked stale.
    eprintln!("[{:>5.1}s] API server down: the last map stays in force, stale; a change made meanwhile lands when it returns", t.elapsed().as_secs_f64());
    api.stop();
    for n in [&a, &b] {
        wait_until("maps marked stale", 20, || map_has(n, |m| m.stale)).await;
    }
    wait_until("db's netd sees the map stale", 20, || {
        netd_metrics(&b, "db").contains("enclave_netd_peer_map_stale{pod=\"db\"")
            && netd_metrics(&b, "db")
                .lines()
                .any(|l| l.starts_with("enclave_netd_peer_map_stale{") && l.ends_with(" 1"))
    })
    .await;
    sh(&cri_a, &apip, &send("while-down", &db.ip)).await;
    assert!(
        wait_db_got(&cri_b, &db, "while-down").await,
        "api -> db stopped while the API server was down"
    );
    sh(&cri_a, &web, &send("web-while-down", &db.ip)).await;
    // Meanwhile web is relabelled app=api (a change the nodes cannot see yet).
    api.put_pod(&PodObject {
        namespace: "shop",
        name: "web",
        uid: &web.sandbox,
        labels: &[("app", "api"), ("tier", "front")],
        ip: &web.ip,
        node: "node-a",
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !db_got(&cri_b, &db).await.contains("web-while-down"),
        "web reached db while the API server was down"
    );
    api.resume();
    for n in [&a, &b] {
        wait_until("maps fresh again with web relabelled", 30, || {
            map_has(n, |m| {
                !m.stale
                    && m.find("shop/web")
                        .is_some_and(|p| p.labels.contains_key("tier"))
            })
        })
        .await;
    }
    // web is not in cde-api all the same: that zone selects namespace payments only.
    wait_until("web's netd re-read its labels", 20, || {
        netd_metrics(&a, "web").contains("zone=\"unknown\"")
    })
    .await;
    sh(&cri_a, &web, &send("web-after", &db.ip)).await;
    // web's own netd (node A) now places it in no zone, and refuses it at once.
    let r = wait_record(
        &a.audit_log,
        (&web.ip, &db.ip, 5432),
        "web, now unknown, denied",
        |r| r["action"] == "Denied" && ep(r, "src_endpoint", "zone") == "unknown",
    )
    .await;
    assert_eq!(r["unmapped"]["enclave"]["src"]["pod"], "web", "{r}");

    // --- a garbage map in node B's peer directory (truncated, as a crash mid-write would
    // leave one were it not renamed into place): db's netd keeps its last good map and
    // counts the error; api still reaches db.
    eprintln!(
        "[{:>5.1}s] a truncated cluster map: db's netd keeps its last good one",
        t.elapsed().as_secs_f64()
    );
    let good = std::fs::read(b.peer_dir.join("cluster.json")).unwrap();
    let tmp = b.peer_dir.join(".garbage");
    std::fs::write(&tmp, &good[..good.len() / 2]).unwrap();
    std::fs::rename(&tmp, b.peer_dir.join("cluster.json")).unwrap();
    let errors = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("enclave_netd_peer_map_errors_total{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    wait_until("db's netd counts the broken map", 20, || {
        errors(&netd_metrics(&b, "db")) >= 1
    })
    .await;
    sh(&cri_a, &apip, &send("after-garbage", &db.ip)).await;
    assert!(
        wait_db_got(&cri_b, &db, "after-garbage").await,
        "a broken map cut api off db"
    );
    let r = wait_record(
        &b.audit_log,
        (&apip.ip, &db.ip, 5432),
        "db's netd still knows api",
        |r| r["action"] == "Allowed" && r["unmapped"]["enclave"]["src"]["pod"] == "api",
    )
    .await;
    assert_eq!(ep(&r, "src_endpoint", "zone"), "cde-api", "{r}");
    eprintln!("[{:>5.1}s] done", t.elapsed().as_secs_f64());

    for (cri, p) in [
        (&cri_a, &apip),
        (&cri_a, &web),
        (&cri_a, &batch),
        (&cri_b, &db),
    ] {
        eprintln!("removing {}", p.name);
        let mut cri = cri.clone();
        let id = p.sandbox.clone();
        let _ = cri
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await;
        let _ = cri
            .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
            .await;
    }
    drop(reuse);
    drop(a);
    drop(b);
    enclave_tests::cri::clean_node();
    let _ = std::fs::remove_dir_all(&dir);
}
