//! A node for CRI tests and demos: a private containerd with the CRI plugin, inside a
//! network namespace of its own (CNI's bridge stays off the host network), with the
//! `enclave` runtime handler, a CNI bridge network, and the busybox and pause images
//! imported; and a CRI client (k8s-cri, v1) over its socket.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test support

use std::path::Path;
use std::process::Command;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containerd::{busybox_image, pause_image, Containerd};

/// The pause image CRI runs as each pod's sandbox container.
pub const PAUSE: &str = "enclave.local/pause:latest";
/// The pod network CNI hands out addresses from.
pub const POD_SUBNET: &str = "10.88.77.0/24";

/// A network namespace, deleted on drop.
pub struct Netns {
    /// Its name (`ip netns`).
    pub name: String,
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The policy of nodes whose tests are not about policy: every flow allowed (and recorded).
pub const OPEN_POLICY: &str = r#"apiVersion: enclave.io/v1alpha1
kind: ZonePolicy
metadata: {name: test-open, version: "1", description: "Tests that are not about policy: everything allowed, and logged"}
spec:
  zones:
    - name: anywhere
      cidrs: [0.0.0.0/0]
  rules:
    - {name: open, from: [unknown, anywhere], to: [unknown, anywhere]}
"#;

/// containerd with CRI in its own network namespace. Drop order: containerd, then the
/// namespace.
pub struct CriNode {
    /// containerd (namespace `k8s.io`).
    pub containerd: Containerd,
    /// The namespace it runs in.
    pub netns: Netns,
    /// The node's policy directory (`policy.yaml` in it).
    pub policy_dir: std::path::PathBuf,
    /// The node's pod registry.
    pub registry: std::path::PathBuf,
    /// The node's audit log.
    pub audit_log: std::path::PathBuf,
    /// The shim's runtime config (ENCLAVE_CONFIG).
    pub config: std::path::PathBuf,
    /// The node's peer directory (where enclave-node would publish the cluster map).
    pub peer_dir: std::path::PathBuf,
}

impl CriNode {
    /// Sets the node up under `dir`, with the shims of `shim_dir`, in namespace `netns`,
    /// under [`OPEN_POLICY`].
    pub fn start(dir: &Path, shim_dir: &Path, netns: &str) -> CriNode {
        Self::start_with_policy(dir, shim_dir, netns, OPEN_POLICY)
    }

    /// As [`CriNode::start`], with `policy` in the node's policy directory.
    pub fn start_with_policy(dir: &Path, shim_dir: &Path, netns: &str, policy: &str) -> CriNode {
        Self::start_on(dir, shim_dir, netns, policy, POD_SUBNET)
    }

    /// As [`CriNode::start_with_policy`], with pods in `subnet` (an IPv4 /24; CNI hands out
    /// .2 to .199, leaving the rest for workloads a test places itself).
    pub fn start_on(
        dir: &Path,
        shim_dir: &Path,
        netns: &str,
        policy: &str,
        subnet: &str,
    ) -> CriNode {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("cni")).unwrap();
        let ns = Netns {
            name: netns.to_string(),
        };
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        assert!(Command::new("ip")
            .args(["netns", "add", &ns.name])
            .status()
            .unwrap()
            .success());
        let _ = Command::new("ip")
            .args(["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"])
            .status();
        let range_end = format!(
            "{}.199",
            subnet.rsplit_once('.').map_or(subnet, |(net, _)| net)
        );
        let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "enclave-test", "plugins": [
            {"type": "bridge", "bridge": "enctest0", "isGateway": true, "isDefaultGateway": true, "ipMasq": false,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet, "rangeEnd": range_end}]], "dataDir": dir.join("cni-ipam")}},
            {"type": "loopback"}]});
        std::fs::write(dir.join("cni/10-enclave-test.conflist"), conf.to_string()).unwrap();
        let extra = format!(
            r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.enclave]
      runtime_type = "io.containerd.enclave.v2"
      pod_annotations = ["enclave.io/*"]
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
            cni = dir.join("cni").display()
        );
        let (policy_dir, registry, audit_log, config, peer_dir) = (
            dir.join("policies"),
            dir.join("registry"),
            dir.join("audit.log"),
            dir.join("enclave.toml"),
            dir.join("peers"),
        );
        std::fs::create_dir_all(&policy_dir).unwrap();
        std::fs::write(policy_dir.join("policy.yaml"), policy).unwrap();
        // `auto` picks the workspace's enclave-vmm where KVM has hardware virtualization
        // (QEMU on a PVM host like this one's).
        let vmm = shim_dir.join("enclave-vmm");
        let paths = if vmm.exists() {
            format!("[paths]\nenclave_vmm = {:?}\n", vmm)
        } else {
            String::new()
        };
        std::fs::write(
            &config,
            format!(
                "[network]\npolicy_dir = {:?}\nregistry = {:?}\naudit_log = {:?}\npeer_dir = {:?}\n{paths}",
                policy_dir, registry, audit_log, peer_dir
            ),
        )
        .unwrap();
        let containerd = Containerd::start_with_env(
            &dir.join("containerd"),
            "k8s.io",
            shim_dir,
            &extra,
            Some(&ns.name),
            &[
                ("ENCLAVE_CONFIG", config.clone().into_os_string()),
                // Set ENCLAVE_KEEP_VM_DIR=1 to keep the VMs' logs (netd.log, console.log).
                (
                    "ENCLAVE_KEEP_VM_DIR",
                    std::env::var_os("ENCLAVE_KEEP_VM_DIR").unwrap_or_default(),
                ),
            ],
        );
        let images = dir.join("images");
        std::fs::create_dir_all(&images).unwrap();
        containerd.ctr_ok(&["images", "import", busybox_image(&images).to_str().unwrap()]);
        containerd.ctr_ok(&[
            "images",
            "import",
            pause_image(&images, PAUSE).unwrap().to_str().unwrap(),
        ]);
        CriNode {
            containerd,
            netns: ns,
            policy_dir,
            registry,
            audit_log,
            config,
            peer_dir,
        }
    }
}

impl CriNode {
    /// `enclavectl segmentation test` on this node's directories and audit log, writing
    /// its report to `out` (more arguments after); the command, to run.
    pub fn segmentation_test(&self, enclavectl: &Path, out: &Path) -> Command {
        let mut c = Command::new(enclavectl);
        c.args(["segmentation", "test", "--policy-dir"])
            .arg(&self.policy_dir)
            .arg("--registry")
            .arg(&self.registry)
            .arg("--peer-dir")
            .arg(&self.peer_dir)
            .arg("--audit-log")
            .arg(&self.audit_log)
            .arg("--out")
            .arg(out);
        c
    }

    /// `enclavectl node reload` (the binary at `enclavectl`) from containerd's mount
    /// namespace, where the pods' network namespace files are mounted; its output. Fails
    /// the test if the reload fails.
    pub fn reload(&self, enclavectl: &Path) -> String {
        let (ok, text) = crate::outcome(
            Command::new("nsenter")
                .args(["-t", &self.containerd.pid().to_string(), "-m"])
                .arg(enclavectl)
                .args(["node", "reload", "--policy-dir"])
                .arg(&self.policy_dir)
                .arg("--registry")
                .arg(&self.registry),
        );
        assert!(ok, "enclavectl node reload:\n{text}");
        text
    }

    /// Imports an OCI image layout tarball into this node's containerd (CRI's namespace).
    pub fn import_image(&self, tarball: &Path) {
        self.containerd
            .ctr_ok(&["images", "import", &tarball.to_string_lossy()]);
    }

    /// Lets this node run ordinary runc pods too: `ip netns exec` gave containerd a fresh
    /// /sys without the host's cgroup hierarchies, which runc needs; they are mounted again
    /// in containerd's mount namespace (the same hierarchies, so the host sees the pods'
    /// cgroups as usual). Enclave pods do not need this.
    pub fn enable_runc(&self) {
        let script = r#"set -e
grep -q ' /sys/fs/cgroup ' /proc/self/mountinfo && exit 0
mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
awk '$8 == "cgroup" { o = $NF; sub(/^rw,/, "", o); print $5, o }' /proc/1/mountinfo | while read -r mp o; do
  mkdir -p "$mp"; mount -t cgroup -o "$o" cgroup "$mp"
done
awk '$8 == "cgroup2" { print $5 }' /proc/1/mountinfo | while read -r mp; do
  mkdir -p "$mp"; mount -t cgroup2 cgroup2 "$mp"
done"#;
        let out = Command::new("nsenter")
            .args([
                "-t",
                &self.containerd.pid().to_string(),
                "-m",
                "sh",
                "-c",
                script,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting cgroups for runc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// What a CRI test needs of the machine: root, containerd, the CNI plugins, the guest image
/// and QEMU, and the files in `extra` (what, path). `Err` says what is missing.
pub fn prerequisites(extra: &[(&str, &str)]) -> Result<(), String> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return Err("needs root (containerd, CNI, taps, mounts, nftables)".into());
    }
    let base = [
        ("containerd", "/usr/bin/containerd"),
        (
            "CNI plugins (apt-get install containernetworking-plugins)",
            "/usr/lib/cni/bridge",
        ),
    ];
    for (what, path) in base.iter().chain(extra) {
        if !Path::new(path).exists() {
            return Err(format!("{what} not installed"));
        }
    }
    crate::tools().map(|_| ())
}

/// Kills what a failed run left (shims outlive containerd) and removes its state.
pub fn clean_node() {
    crate::containerd::kill_leftovers("/run/enclave/k8s.io/");
    crate::containerd::kill_leftovers("-namespace k8s.io");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = std::fs::remove_dir_all("/run/enclave/k8s.io");
}

/// A pod sandbox config as the kubelet sends it: pod `name` in `namespace`, hostname `name`,
/// the `enclave.io/zone` annotation, container logs under `log_dir`.
pub fn sandbox_config(
    name: &str,
    namespace: &str,
    zone: &str,
    log_dir: &Path,
) -> k8s_cri::v1::PodSandboxConfig {
    use k8s_cri::v1::*;
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: namespace.into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.display().to_string(),
        annotations: [("enclave.io/zone".to_string(), zone.to_string())].into(),
        linux: Some(LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

/// A container of the test busybox image running `cmd`, logging to `log` (relative to the
/// pod's log directory).
pub fn container_config(name: &str, cmd: &[&str], log: &str) -> k8s_cri::v1::ContainerConfig {
    container_config_of(crate::containerd::IMAGE, name, cmd, log)
}

/// As [`container_config`], of `image`.
pub fn container_config_of(
    image: &str,
    name: &str,
    cmd: &[&str],
    log: &str,
) -> k8s_cri::v1::ContainerConfig {
    use k8s_cri::v1::*;
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: log.into(),
        ..Default::default()
    }
}

/// RunPodSandbox of `config` with runtime handler `enclave`, as the kubelet does for the
/// RuntimeClass; panics with containerd's log if it fails. Returns the sandbox id.
pub async fn run_sandbox(
    cri: &mut RuntimeServiceClient<Channel>,
    ctrd: &Containerd,
    config: &k8s_cri::v1::PodSandboxConfig,
) -> String {
    run_sandbox_on(cri, ctrd, config, "enclave").await
}

/// [`run_sandbox`] with another runtime handler (`runc` for an ordinary pod).
pub async fn run_sandbox_on(
    cri: &mut RuntimeServiceClient<Channel>,
    ctrd: &Containerd,
    config: &k8s_cri::v1::PodSandboxConfig,
    handler: &str,
) -> String {
    let name = config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    cri.run_pod_sandbox(k8s_cri::v1::RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: handler.into(),
    })
    .await
    .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}\n{}", ctrd.log_tail()))
    .into_inner()
    .pod_sandbox_id
}

/// CreateContainer of `config` in `sandbox`, then StartContainer; panics naming the
/// container if either fails. Returns the container id.
pub async fn run_container(
    cri: &mut RuntimeServiceClient<Channel>,
    sandbox: &str,
    sandbox_config: &k8s_cri::v1::PodSandboxConfig,
    config: k8s_cri::v1::ContainerConfig,
) -> String {
    let name = config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let id = cri
        .create_container(k8s_cri::v1::CreateContainerRequest {
            pod_sandbox_id: sandbox.into(),
            config: Some(config),
            sandbox_config: Some(sandbox_config.clone()),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"))
        .into_inner()
        .container_id;
    cri.start_container(k8s_cri::v1::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StartContainer {name}: {e}"));
    id
}

/// The pod IP CRI reports for `sandbox` ("" when it has none).
pub async fn pod_ip(cri: &mut RuntimeServiceClient<Channel>, sandbox: &str) -> String {
    cri.pod_sandbox_status(k8s_cri::v1::PodSandboxStatusRequest {
        pod_sandbox_id: sandbox.into(),
        verbose: false,
    })
    .await
    .unwrap_or_else(|e| panic!("PodSandboxStatus {sandbox}: {e}"))
    .into_inner()
    .status
    .and_then(|s| s.network)
    .map(|n| n.ip)
    .unwrap_or_default()
}

/// A CRI runtime-service client over containerd's socket.
pub async fn cri_client(sock: &str) -> RuntimeServiceClient<Channel> {
    let path = sock.to_string();
    let channel = Endpoint::try_from("http://[::]")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .unwrap();
    RuntimeServiceClient::new(channel)
}

/// Runs `cmd` in container `id` through ExecSync (60 s timeout): (exit code, stdout trimmed,
/// stderr).
pub async fn exec_sync(
    cri: &mut RuntimeServiceClient<Channel>,
    id: &str,
    cmd: &[&str],
) -> (i32, String, String) {
    let req = k8s_cri::v1::ExecSyncRequest {
        container_id: id.to_string(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout: 60,
    };
    let r = cri
        .exec_sync(req)
        .await
        .unwrap_or_else(|e| panic!("ExecSync {cmd:?} in {id}: {e}"))
        .into_inner();
    (
        r.exit_code,
        String::from_utf8_lossy(&r.stdout).trim().to_string(),
        String::from_utf8_lossy(&r.stderr).to_string(),
    )
}

// ---------------------------------------------------------------------------------------
// Reading a node's audit log.

/// The audit records (JSON lines) of the node log.
pub fn records(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Records about a flow from `src` to `dst:port`.
pub fn about<'a>(
    recs: &'a [serde_json::Value],
    src: &str,
    dst: &str,
    port: u16,
) -> Vec<&'a serde_json::Value> {
    recs.iter()
        .filter(|r| {
            r["src_endpoint"]["ip"] == src
                && r["dst_endpoint"]["ip"] == dst
                && r["dst_endpoint"]["port"] == port
        })
        .collect()
}

/// Waits (bounded: 10 s) until a record about the flow satisfies `ok`, then returns it;
/// panics with the flow's records and the last ones of the log.
pub async fn wait_record(
    log: &Path,
    (src, dst, port): (&str, &str, u16),
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let recs = records(log);
        if let Some(r) = about(&recs, src, dst, port).into_iter().find(|r| ok(r)) {
            return r.clone();
        }
        if std::time::Instant::now() > deadline {
            let near: Vec<String> = about(&recs, src, dst, port)
                .iter()
                .map(|r| r.to_string())
                .collect();
            let last: Vec<String> = recs
                .iter()
                .rev()
                .take(8)
                .map(|r| r["message"].to_string())
                .collect();
            panic!("no audit record: {what} ({src} -> {dst}:{port}); records of that flow:\n{near:#?}\nlast records (newest first):\n{last:#?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// enclave-netd's reason for a decision in a record.
pub fn reason(r: &serde_json::Value) -> &str {
    r["unmapped"]["enclave"]["reason"].as_str().unwrap_or("")
}

/// A pod of one container, as the tests start it.
pub struct PodSpec<'a> {
    /// Name, namespace and zone (the `enclave.io/zone` annotation).
    pub who: (&'a str, &'a str, &'a str),
    /// The container's image (the test busybox image when `None`).
    pub image: Option<&'a str>,
    /// What the container runs (with sh).
    pub script: &'a str,
    /// Give the container NET_ADMIN and NET_RAW (to forge frames).
    pub net_admin: bool,
}

/// A pod the tests started.
#[derive(Debug, Clone)]
pub struct PodRun {
    /// Sandbox id.
    pub sandbox: String,
    /// Pod IP.
    pub ip: String,
    /// Container id of the pod's one container.
    pub c: String,
}

/// RunPodSandbox (handler `enclave`) and one container running `spec.script`, logging
/// under `logs`; the pod's IP must be in the test subnet.
pub async fn run_pod(
    cri: &mut RuntimeServiceClient<Channel>,
    node: &CriNode,
    logs: &Path,
    spec: PodSpec<'_>,
) -> PodRun {
    use k8s_cri::v1::*;
    let (name, ns, zone) = spec.who;
    let sc = sandbox_config(name, ns, zone, logs);
    let sandbox = run_sandbox(cri, &node.containerd, &sc).await;
    let mut config = container_config_of(
        spec.image.unwrap_or(crate::containerd::IMAGE),
        name,
        &["sh", "-c", spec.script],
        &format!("{name}.log"),
    );
    if spec.net_admin {
        config.linux = Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                capabilities: Some(Capability {
                    add_capabilities: vec!["NET_ADMIN".into(), "NET_RAW".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let c = run_container(cri, &sandbox, &sc, config).await;
    let ip = pod_ip(cri, &sandbox).await;
    assert!(ip.starts_with("10.88.77."), "{name}: pod IP {ip:?}");
    PodRun { sandbox, ip, c }
}

/// StopPodSandbox and RemovePodSandbox for each pod (errors ignored: teardown), then a
/// moment for the shims to exit.
pub async fn remove_pods(cri: &mut RuntimeServiceClient<Channel>, pods: &[&PodRun]) {
    use k8s_cri::v1::*;
    for p in pods {
        let _ = cri
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: p.sandbox.clone(),
            })
            .await;
        let _ = cri
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: p.sandbox.clone(),
            })
            .await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
}
