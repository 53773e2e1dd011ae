//! The Task service containerd drives: one microVM per shim (per container, or per pod
//! sandbox), containers created in it through the agent, their stdio carried between
//! containerd's FIFOs and the agent, exits recorded and reported.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use containerd_shim_protos::api::{self, Status};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::ttrpc::{self, TtrpcContext};
use containerd_shim_protos::Task;
use enclave_agent_protocol::messages::*;
use enclave_agent_protocol::Client;

use crate::config::{resources, Config};
use crate::events::Publisher;
use crate::vm::{GuestVm, NetBackend, NetOptions, Tools, VmOptions};
use enclave_netfilter::node::RegistryEntry;

/// Where per-VM state lives on the host (sockets, logs, VM files).
pub const STATE_ROOT: &str = "/run/enclave";

/// How long a guest gets to boot and answer (TCG boots take seconds).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an exited process's output may take to reach containerd before the exit is
/// reported anyway.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// Waiting for a process: long, it ends when the process does.
const WAIT_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// One process: a container's init (exec id "") or an exec.
struct Proc {
    pid: u32,
    status: Status,
    exit: Option<(u32, Timestamp)>,
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    /// An exec's OCI process JSON, until it is started.
    exec_spec: Option<Vec<u8>>,
}

struct Container {
    bundle: PathBuf,
    procs: HashMap<String, Proc>,
}

/// The VM and the agent connection.
struct Sandbox {
    vm: GuestVm,
    agent: Arc<Client>,
}

/// The service state.
pub struct Service {
    namespace: String,
    id: String,
    sandbox: Mutex<Option<Sandbox>>,
    /// Whether the shared directory is a shared mount yet (see `prepare_shared`).
    shared_mounted: std::sync::atomic::AtomicBool,
    /// The pod in the node registry, and where enforcement is configured.
    registered: Mutex<Option<(RegistryEntry, crate::config::NetworkSection)>>,
    containers: Mutex<HashMap<String, Container>>,
    exited: Condvar,
    publisher: Publisher,
    /// Asked to exit (Shutdown).
    pub shutdown: Arc<(Mutex<bool>, Condvar)>,
    /// Create calls running.
    creating: std::sync::atomic::AtomicUsize,
}

/// Counts a call in flight for as long as it lives.
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(n: &'a std::sync::atomic::AtomicUsize) -> InFlight<'a> {
        n.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        InFlight(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

fn err(code: ttrpc::Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn no_process(id: &str, exec: &str) -> ttrpc::Error {
    err(
        ttrpc::Code::NOT_FOUND,
        format!("no process {id}/{exec} in this shim"),
    )
}

/// Process `exec` of container `id`.
fn process<'a>(
    cs: &'a HashMap<String, Container>,
    id: &str,
    exec: &str,
) -> ttrpc::Result<&'a Proc> {
    cs.get(id)
        .and_then(|c| c.procs.get(exec))
        .ok_or_else(|| no_process(id, exec))
}

fn no_container(id: &str) -> ttrpc::Error {
    err(
        ttrpc::Code::NOT_FOUND,
        format!("no container {id} in this shim"),
    )
}

fn now() -> Timestamp {
    Timestamp::now()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The state directory of shim `id` in `namespace`.
pub fn state_dir(namespace: &str, id: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(namespace).join(id)
}

/// Where the guest mounts the shared directory.
pub const GUEST_SHARED: &str = "/run/enclave/shared";

fn is_bind(m: &serde_json::Value) -> bool {
    m["type"].as_str() == Some("bind")
        || m["options"]
            .as_array()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// Carries the host files a container's spec bind-mounts (CRI's `/etc/hosts`,
/// `/etc/resolv.conf`, `/etc/hostname`, a ConfigMap file...) into the guest: each is copied
/// into `host_dir` (the container's part of the shared directory) and the mount's source
/// becomes its guest path under `guest_dir`. The sandbox's `/dev/shm` becomes a tmpfs of the
/// guest. Host directories are not carried (they would expose the node's file system).
/// A copy is a snapshot taken when the container is created.
pub fn carry_binds(
    spec: &mut serde_json::Value,
    host_dir: &Path,
    guest_dir: &str,
) -> Result<(), String> {
    let Some(mounts) = spec.get_mut("mounts").and_then(|m| m.as_array_mut()) else {
        return Ok(());
    };
    for (i, m) in mounts.iter_mut().enumerate() {
        if !is_bind(m) {
            continue;
        }
        let (Some(src), Some(dest)) = (
            m["source"].as_str().map(PathBuf::from),
            m["destination"].as_str().map(String::from),
        ) else {
            continue;
        };
        if dest == "/dev/shm" {
            *m = serde_json::json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]});
            continue;
        }
        if !src.is_file() {
            continue; // a directory or nothing: dropped by guest_spec
        }
        let name = format!(
            "{i}-{}",
            src.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let files = host_dir.join("files");
        std::fs::create_dir_all(&files).map_err(|e| format!("{}: {e}", files.display()))?;
        std::fs::copy(&src, files.join(&name))
            .map_err(|e| format!("carrying {} into the guest: {e}", src.display()))?;
        m["source"] = serde_json::Value::String(format!("{guest_dir}/files/{name}"));
    }
    Ok(())
}

/// Container ids the shim accepts (they name directories): `[A-Za-z0-9_.-]`, 1 to 64.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Keeps the parts of containerd's OCI spec the guest agent applies, pointing the root at
/// the shared `rootfs` directory.
pub fn guest_spec(spec: &mut serde_json::Value) {
    spec["root"] = serde_json::json!({"path": "rootfs", "readonly": spec["root"]["readonly"].as_bool().unwrap_or(false)});
    // Bind mounts whose source is a host path cannot be followed by the guest; binds the
    // shim carried into the shared directory (see `carry_binds`) have guest sources and stay.
    if let Some(mounts) = spec.get_mut("mounts").and_then(|m| m.as_array_mut()) {
        mounts.retain(|m| {
            !is_bind(m)
                || m["source"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(GUEST_SHARED))
        });
    }
    if let Some(linux) = spec.get_mut("linux").and_then(|l| l.as_object_mut()) {
        // Host-side settings with no meaning in the guest: the VM is the boundary.
        for k in [
            "cgroupsPath",
            "seccomp",
            "namespaces",
            "devices",
            "resources",
        ] {
            linux.remove(k);
        }
    }
}

impl Service {
    /// A service for shim `id`.
    pub fn new(namespace: &str, id: &str, publisher: Publisher) -> Service {
        Service {
            namespace: namespace.into(),
            id: id.into(),
            sandbox: Mutex::new(None),
            shared_mounted: Default::default(),
            registered: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
            exited: Condvar::new(),
            publisher,
            shutdown: Arc::new((Mutex::new(false), Condvar::new())),
            creating: Default::default(),
        }
    }

    /// True when the shim serves no container and none is being created.
    pub fn is_empty(&self) -> bool {
        self.creating.load(std::sync::atomic::Ordering::Acquire) == 0
            && lock(&self.containers).is_empty()
    }

    /// True when a Create is running.
    pub fn creating(&self) -> bool {
        self.creating.load(std::sync::atomic::Ordering::Acquire) > 0
    }

    /// True when no process of any container runs (each has exited or never started).
    pub fn nothing_running(&self) -> bool {
        lock(&self.containers).values().all(|c| {
            c.procs
                .values()
                .all(|p| p.exit.is_some() || p.status != Status::RUNNING)
        })
    }

    /// Tears down what an orphaned shim still holds, as the last Delete would: the VM and
    /// every process of it, the pod's registration, the containers' root filesystems.
    pub fn abandon(&self) {
        let ids: Vec<String> = lock(&self.containers).drain().map(|(id, _)| id).collect();
        if let Some(sb) = lock(&self.sandbox).take() {
            drop(sb.vm);
        }
        if let Some((entry, net)) = lock(&self.registered).take() {
            crate::enforce::leave(&net, &entry);
        }
        for id in ids {
            let dir = self.shared_dir().join(&id);
            crate::mount::unmount(&dir.join("rootfs"));
            let _ = std::fs::remove_dir(dir.join("rootfs"));
            let _ = std::fs::remove_dir_all(dir.join("files"));
            let _ = std::fs::remove_dir(&dir);
        }
    }

    /// The directory shared with the guest: one `<id>/rootfs` per container.
    fn shared_dir(&self) -> PathBuf {
        state_dir(&self.namespace, &self.id).join("shared")
    }

    /// Makes the shared directory a shared mount before the first root filesystem is
    /// mounted into it (virtiofsd, in a mount namespace of its own, sees what is mounted
    /// there through it; see `confine::make_shared_mount`). Removed at shutdown or by
    /// `delete`.
    fn prepare_shared(&self) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        if !crate::confine::can_confine() || self.shared_mounted.load(Ordering::Acquire) {
            return Ok(());
        }
        let dir = self.shared_dir();
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        crate::confine::make_shared_mount(&dir)?;
        self.shared_mounted.store(true, Ordering::Release);
        Ok(())
    }

    fn agent(&self) -> ttrpc::Result<Arc<Client>> {
        lock(&self.sandbox)
            .as_ref()
            .map(|s| s.agent.clone())
            .ok_or_else(|| {
                err(
                    ttrpc::Code::FAILED_PRECONDITION,
                    "the microVM is not running",
                )
            })
    }

    /// Boots the VM with `bundle` shared into the guest, sized for `spec`, and connects to
    /// the agent.
    fn boot(&self, spec: &serde_json::Value, config_path: Option<PathBuf>) -> Result<(), String> {
        let cfg = Config::load_from(config_path)?;
        let tools = Tools::find(cfg.paths.guest_image.clone())?;
        let (vcpus, memory_mib) = resources(&cfg, spec);
        // A pod sandbox (CRI) names the network namespace CNI made: carry it into the guest.
        let podnet = match crate::podnet::netns_of(spec) {
            Some(ns) => {
                let net = crate::podnet::discover(&ns)?;
                crate::podnet::plumb(&net)?;
                Some(net)
            }
            None => None,
        };
        let backend = cfg.backend();
        let vm_dir = state_dir(&self.namespace, &self.id).join("vm");
        let net = match &podnet {
            Some(n) => {
                let entry = crate::enforce::registry_entry(spec, n, &vm_dir.join("netd.ctl"));
                let args = crate::enforce::prepare(&cfg, &entry, &vm_dir)?;
                *lock(&self.registered) = Some((entry, cfg.network.clone()));
                Some(NetOptions {
                    backend: NetBackend::Netd {
                        netd: cfg.netd(),
                        netns: n.netns.clone(),
                        tap: crate::podnet::TAP.into(),
                        args,
                    },
                    mac: n.mac.clone(),
                })
            }
            None => None,
        };
        let opts = VmOptions {
            net,
            backend,
            vcpus,
            memory_mib,
            dir: Some(vm_dir),
            shared: Some(self.shared_dir()),
            shared_mount_ready: self
                .shared_mounted
                .load(std::sync::atomic::Ordering::Acquire),
            ..VmOptions::default()
        };
        let t0 = std::time::Instant::now();
        let vm = GuestVm::boot(&tools, &opts).map_err(|e| format!("starting the microVM: {e}"))?;
        let t_vm = t0.elapsed();
        let agent = vm
            .connect(BOOT_TIMEOUT)
            .map_err(|e| format!("the guest agent did not answer: {e}"))?;
        if let Some(n) = &podnet {
            let req = ConfigureNetworkRequest {
                interfaces: vec![Interface {
                    mac: n.mac.clone(),
                    name: "eth0".into(),
                    mtu: n.mtu,
                    addresses: n.addresses.clone(),
                }],
                routes: n
                    .gateway
                    .iter()
                    .map(|g| Route {
                        destination: "default".into(),
                        gateway: g.clone(),
                        device_mac: n.mac.clone(),
                    })
                    .collect(),
                dns: None,
            };
            agent.call::<ConfigureNetwork>(&req).map_err(|e| {
                format!(
                    "configuring the pod network in the guest ({} {:?}): {e}",
                    n.mac, n.addresses
                )
            })?;
        }
        // Step timings go to the shim log (docs/shim.md, docs/benchmarks.md read them).
        eprintln!(
            "enclave-shim: {} VM up: backend {:?}, {} vCPU, {} MiB; VMM and backends started in {:.1} ms, agent ready after {:.1} ms",
            self.id,
            opts.backend,
            opts.vcpus,
            opts.memory_mib,
            t_vm.as_secs_f64() * 1e3,
            t0.elapsed().as_secs_f64() * 1e3
        );
        // Record the VM's processes so `delete` can clean up after a crash of the shim.
        let pids: Vec<String> = vm.pids().iter().map(|(_, p)| p.to_string()).collect();
        let _ = std::fs::write(
            state_dir(&self.namespace, &self.id).join("pids"),
            pids.join("\n"),
        );
        if podnet.is_some() {
            crate::enforce::watch_netd(&vm);
            // Every pod, this one included: a pod that registered while this pod's netd was
            // starting could not reach its control socket yet.
            crate::enforce::peers_changed(&cfg.network);
            if let Some((entry, net)) = lock(&self.registered).clone() {
                crate::enforce::follow_cluster(net, entry);
            }
        }
        let agent = Arc::new(agent);
        if podnet.is_some() {
            // `enclavectl segmentation test` probes from inside the VM through this.
            let sock = state_dir(&self.namespace, &self.id)
                .join("vm")
                .join(enclave_netfilter::node::PROBE_SOCKET);
            if let Err(e) = crate::probe::serve(&sock, agent.clone()) {
                eprintln!("enclave-shim: segmentation probes unavailable: {e}");
            }
        }
        *lock(&self.sandbox) = Some(Sandbox { vm, agent });
        Ok(())
    }

    /// Watches a started process: waits for its end through the agent, then for its output
    /// to be drained into containerd's FIFOs (containerd expects every byte before the
    /// exit; bounded, in case a daemonized child keeps the streams open), then records the
    /// exit and publishes it.
    fn watch(
        self: &Arc<Self>,
        agent: Arc<Client>,
        cid: String,
        exec: String,
        pid: u32,
        pumps: Vec<Receiver<()>>,
    ) {
        let me = self.clone();
        std::thread::spawn(move || {
            let r = agent.call_timeout::<WaitProcess>(
                &ProcessRequest {
                    container_id: cid.clone(),
                    exec_id: exec.clone(),
                },
                Some(WAIT_TIMEOUT),
            );
            // A lost agent (the VM died) counts as killed.
            let status = r.map(|w| w.exit_status as u32).unwrap_or(137);
            for done in pumps {
                let _ = done.recv_timeout(OUTPUT_DRAIN);
            }
            me.exited_with(&cid, &exec, pid, status);
        });
    }

    /// Records that process `exec` of container `cid` ended with `status`: it is STOPPED,
    /// waiters wake, containerd gets its TaskExit.
    fn exited_with(&self, cid: &str, exec: &str, pid: u32, status: u32) {
        let at = now();
        {
            let mut cs = lock(&self.containers);
            if let Some(p) = cs.get_mut(cid).and_then(|c| c.procs.get_mut(exec)) {
                p.status = Status::STOPPED;
                p.exit = Some((status, at.clone()));
            }
        }
        self.exited.notify_all();
        self.publisher.task_exit(cid, exec, pid, status, at);
    }
}

/// The exit status a process that could not be started gets, as a shell gives it: 127 when
/// the program is not there, 126 when it cannot be executed, 128 for anything else.
fn start_failure_status(error: &str) -> u32 {
    if error.contains("No such file") || error.contains("not found") {
        127
    } else if error.contains("Permission denied") || error.contains("Exec format error") {
        126
    } else {
        128
    }
}

/// Copies the agent's stdout or stderr of a process into containerd's FIFO until EOF.
/// Returns a receiver that hangs up when the copy ends.
fn pump_out(
    agent: Arc<Client>,
    cid: String,
    exec: String,
    fifo: String,
    stderr: bool,
) -> Option<Receiver<()>> {
    if fifo.is_empty() {
        return None;
    }
    let (done, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let _done = done; // dropped when the copy ends, however it ends
                          // Read-write: opening a FIFO write-only blocks until a reader comes, and a detached
                          // client (`ctr run -d`) may never come.
        let Ok(mut out) = OpenOptions::new().read(true).write(true).open(&fifo) else {
            return;
        };
        loop {
            let req = ReadStreamRequest {
                container_id: cid.clone(),
                exec_id: exec.clone(),
                max_len: 65536,
            };
            let data = if stderr {
                agent
                    .call_timeout::<ReadStderr>(&req, Some(WAIT_TIMEOUT))
                    .map(|r| r.data)
            } else {
                agent
                    .call_timeout::<ReadStdout>(&req, Some(WAIT_TIMEOUT))
                    .map(|r| r.data)
            };
            match data {
                Ok(d) if !d.is_empty() => {
                    if out.write_all(&d).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    });
    Some(rx)
}

/// Copies containerd's stdin FIFO to the process, then closes its stdin.
fn pump_in(agent: Arc<Client>, cid: String, exec: String, fifo: String) {
    if fifo.is_empty() {
        return;
    }
    std::thread::spawn(move || {
        let Ok(mut input) = OpenOptions::new().read(true).open(&fifo) else {
            return;
        };
        let mut buf = vec![0u8; 65536];
        loop {
            match input.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let req = WriteStdinRequest {
                        container_id: cid.clone(),
                        exec_id: exec.clone(),
                        data: buf[..n].to_vec(),
                    };
                    if agent.call::<WriteStdin>(&req).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = agent.call::<CloseStdin>(&ProcessRequest {
            container_id: cid,
            exec_id: exec,
        });
    });
}

/// The service behind an `Arc`, as the ttrpc handlers need it.
pub struct TaskService(pub Arc<Service>);

impl Task for TaskService {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        let s = &self.0;
        // While a Create runs (a VM boot can take tens of seconds) the shim is in use.
        let _busy = InFlight::enter(&s.creating);
        let t0 = std::time::Instant::now();
        let bundle = PathBuf::from(&req.bundle);
        // Every container of the VM under one shared directory: <shared>/<id>/rootfs.
        if !valid_id(&req.id) {
            return Err(err(
                ttrpc::Code::INVALID_ARGUMENT,
                format!(
                    "container id {:?}: use letters, digits, '_', '.', '-'",
                    req.id
                ),
            ));
        }
        let rootfs = s.shared_dir().join(&req.id).join("rootfs");
        let mounts = if req.rootfs.is_empty() {
            // The bundle already has a root filesystem (no snapshot mounts): bind it.
            let bind = api::Mount {
                type_: "bind".into(),
                source: bundle.join("rootfs").to_string_lossy().into(),
                options: vec!["rbind".into()],
                ..Default::default()
            };
            vec![bind]
        } else {
            req.rootfs.to_vec()
        };
        if lock(&s.sandbox).is_none() {
            s.prepare_shared()
                .map_err(|e| err(ttrpc::Code::INTERNAL, e))?;
        }
        crate::mount::mount_all(&mounts, &rootfs).map_err(|e| err(ttrpc::Code::INTERNAL, e))?;
        let spec_path = bundle.join("config.json");
        let mut spec: serde_json::Value = std::fs::read(&spec_path)
            .map_err(|e| format!("{}: {e}", spec_path.display()))
            .and_then(|b| {
                serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", spec_path.display()))
            })
            .map_err(|e| err(ttrpc::Code::INVALID_ARGUMENT, e))?;
        if lock(&s.sandbox).is_none() {
            if let Err(e) = s.boot(
                &spec,
                crate::config::options_config_path(req.options.as_ref()),
            ) {
                crate::mount::unmount(&rootfs);
                return Err(err(ttrpc::Code::INTERNAL, e));
            }
        }
        carry_binds(
            &mut spec,
            &s.shared_dir().join(&req.id),
            &format!("{GUEST_SHARED}/{}", req.id),
        )
        .map_err(|e| err(ttrpc::Code::INTERNAL, e))?;
        guest_spec(&mut spec);
        let agent = s.agent()?;
        let r = agent
            .call::<CreateContainer>(&CreateContainerRequest {
                container_id: req.id.clone(),
                oci_spec: spec.to_string().into_bytes(),
                rootfs: format!("{}/rootfs", req.id),
            })
            .map_err(|e| {
                err(
                    ttrpc::Code::INTERNAL,
                    format!("creating the container in the guest: {e}"),
                )
            })?;
        let init = Proc {
            pid: r.pid,
            status: Status::CREATED,
            exit: None,
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            exec_spec: None,
        };
        lock(&s.containers).insert(
            req.id.clone(),
            Container {
                bundle,
                procs: HashMap::from([(String::new(), init)]),
            },
        );
        s.publisher.task_create(&req.id, &req.bundle, r.pid);
        eprintln!(
            "enclave-shim: {} created (guest pid {}) in {:.1} ms",
            req.id,
            r.pid,
            t0.elapsed().as_secs_f64() * 1e3
        );
        Ok(api::CreateTaskResponse {
            pid: r.pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> ttrpc::Result<api::StartResponse> {
        let s = &self.0;
        let t0 = std::time::Instant::now();
        let agent = s.agent()?;
        let (stdin, stdout, stderr, exec_spec) = {
            let cs = lock(&s.containers);
            let p = process(&cs, &req.id, &req.exec_id)?;
            (
                p.stdin.clone(),
                p.stdout.clone(),
                p.stderr.clone(),
                p.exec_spec.clone(),
            )
        };
        let pid = match exec_spec {
            None => agent
                .call::<StartContainer>(&ContainerRequest {
                    container_id: req.id.clone(),
                })
                .map(|r| r.pid),
            Some(process) => agent
                .call::<ExecProcess>(&ExecProcessRequest {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    process,
                })
                .map(|r| r.pid),
        }
        .map_err(|e| {
            // A process that never started has ended: STOPPED with an exit status, so that
            // kill, wait and delete (and with the last container, the VM's teardown) go on
            // as for any process that exited.
            let message = e.to_string();
            s.exited_with(&req.id, &req.exec_id, 0, start_failure_status(&message));
            err(
                ttrpc::Code::INTERNAL,
                format!("starting the process in the guest: {message}"),
            )
        })?;
        if let Some(p) = lock(&s.containers)
            .get_mut(&req.id)
            .and_then(|c| c.procs.get_mut(&req.exec_id))
        {
            p.pid = pid;
            p.status = Status::RUNNING;
        }
        let pumps = [(stdout, false), (stderr, true)]
            .into_iter()
            .filter_map(|(fifo, err)| {
                pump_out(
                    agent.clone(),
                    req.id.clone(),
                    req.exec_id.clone(),
                    fifo,
                    err,
                )
            })
            .collect();
        pump_in(agent.clone(), req.id.clone(), req.exec_id.clone(), stdin);
        s.watch(agent, req.id.clone(), req.exec_id.clone(), pid, pumps);
        s.publisher.task_start(&req.id, &req.exec_id, pid);
        eprintln!(
            "enclave-shim: {}/{} started (guest pid {pid}) in {:.1} ms",
            req.id,
            req.exec_id,
            t0.elapsed().as_secs_f64() * 1e3
        );
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> ttrpc::Result<api::StateResponse> {
        let cs = lock(&self.0.containers);
        let c = cs.get(&req.id).ok_or_else(|| no_container(&req.id))?;
        let p = c
            .procs
            .get(&req.exec_id)
            .ok_or_else(|| no_process(&req.id, &req.exec_id))?;
        let (exit_status, exited_at) = p
            .exit
            .clone()
            .map(|(s, t)| (s, MessageField::some(t)))
            .unwrap_or((0, MessageField::none()));
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.to_string_lossy().into(),
            pid: p.pid,
            status: p.status.into(),
            stdin: p.stdin.clone(),
            stdout: p.stdout.clone(),
            stderr: p.stderr.clone(),
            terminal: p.terminal,
            exit_status,
            exited_at,
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> ttrpc::Result<api::WaitResponse> {
        let s = &self.0;
        let mut cs = lock(&s.containers);
        loop {
            let p = process(&cs, &req.id, &req.exec_id)?;
            if let Some((status, at)) = &p.exit {
                return Ok(api::WaitResponse {
                    exit_status: *status,
                    exited_at: MessageField::some(at.clone()),
                    ..Default::default()
                });
            }
            cs = s.exited.wait(cs).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<api::Empty> {
        let s = &self.0;
        let running = process(&lock(&s.containers), &req.id, &req.exec_id)?
            .exit
            .is_none();
        if !running {
            return Ok(api::Empty::new()); // already gone: nothing to signal
        }
        s.agent()?
            .call::<SignalProcess>(&SignalProcessRequest {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                signal: req.signal,
                all: req.all,
            })
            .map_err(|e| {
                err(
                    ttrpc::Code::INTERNAL,
                    format!("signalling the process in the guest: {e}"),
                )
            })?;
        Ok(api::Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> ttrpc::Result<api::Empty> {
        let mut cs = lock(&self.0.containers);
        let c = cs.get_mut(&req.id).ok_or_else(|| no_container(&req.id))?;
        if c.procs.contains_key(&req.exec_id) {
            return Err(err(
                ttrpc::Code::ALREADY_EXISTS,
                format!("exec {} exists", req.exec_id),
            ));
        }
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        let p = Proc {
            pid: 0,
            status: Status::CREATED,
            exit: None,
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            exec_spec: Some(spec),
        };
        c.procs.insert(req.exec_id.clone(), p);
        self.0.publisher.exec_added(&req.id, &req.exec_id);
        Ok(api::Empty::new())
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> ttrpc::Result<api::PidsResponse> {
        let cs = lock(&self.0.containers);
        let c = cs.get(&req.id).ok_or_else(|| no_container(&req.id))?;
        let processes = c
            .procs
            .values()
            .filter(|p| p.exit.is_none() && p.pid != 0)
            .map(|p| api::ProcessInfo {
                pid: p.pid,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> ttrpc::Result<api::Empty> {
        if req.stdin {
            let _ = self.0.agent()?.call::<CloseStdin>(&ProcessRequest {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
            });
        }
        Ok(api::Empty::new())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> ttrpc::Result<api::Empty> {
        self.0
            .agent()?
            .call::<ResizeTty>(&ResizeTtyRequest {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                rows: req.height,
                cols: req.width,
            })
            .map_err(|e| err(ttrpc::Code::INTERNAL, format!("resizing the tty: {e}")))?;
        Ok(api::Empty::new())
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        let s = &self.0;
        let mut cs = lock(&s.containers);
        let c = cs.get_mut(&req.id).ok_or_else(|| no_container(&req.id))?;
        if !req.exec_id.is_empty() {
            let p = c
                .procs
                .remove(&req.exec_id)
                .ok_or_else(|| err(ttrpc::Code::NOT_FOUND, format!("no exec {}", req.exec_id)))?;
            let (status, at) = p.exit.unwrap_or((0, now()));
            return Ok(api::DeleteResponse {
                pid: p.pid,
                exit_status: status,
                exited_at: MessageField::some(at),
                ..Default::default()
            });
        }
        let init = c.procs.get(&String::new());
        let (pid, (status, at)) = (
            init.map(|p| p.pid).unwrap_or(0),
            init.and_then(|p| p.exit.clone()).unwrap_or((0, now())),
        );
        cs.remove(&req.id);
        let last = cs.is_empty();
        drop(cs);
        if let Ok(agent) = s.agent() {
            let _ = agent.call::<RemoveContainer>(&ContainerRequest {
                container_id: req.id.clone(),
            });
        }
        if last {
            // The VM goes with its last container: QEMU, virtiofsd and the vsock backend.
            if let Some(sb) = lock(&s.sandbox).take() {
                let _ = sb
                    .agent
                    .call_timeout::<Shutdown>(&Empty {}, Some(Duration::from_secs(2)));
                drop(sb.vm);
            }
            let _ = std::fs::remove_file(state_dir(&s.namespace, &s.id).join("pids"));
            if let Some((entry, net)) = lock(&s.registered).take() {
                crate::enforce::leave(&net, &entry);
            }
        }
        let dir = s.shared_dir().join(&req.id);
        crate::mount::unmount(&dir.join("rootfs"));
        let _ = std::fs::remove_dir(dir.join("rootfs"));
        let _ = std::fs::remove_dir_all(dir.join("files"));
        let _ = std::fs::remove_dir(&dir);
        s.publisher.task_delete(&req.id, pid, status, at.clone());
        Ok(api::DeleteResponse {
            pid,
            exit_status: status,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        let st = self
            .0
            .agent()?
            .call::<StatsContainer>(&ContainerRequest {
                container_id: req.id.clone(),
            })
            .map_err(|e| {
                err(
                    ttrpc::Code::INTERNAL,
                    format!("reading container stats in the guest: {e}"),
                )
            })?;
        Ok(api::StatsResponse {
            stats: MessageField::some(crate::events::metrics_any(&st)),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        let pid = lock(&self.0.containers)
            .get(&req.id)
            .and_then(|c| c.procs.get(""))
            .map(|p| p.pid)
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pid,
            ..Default::default()
        })
    }

    fn update(
        &self,
        _ctx: &TtrpcContext,
        _req: api::UpdateTaskRequest,
    ) -> ttrpc::Result<api::Empty> {
        // A pod's VM is sized at boot (vCPUs and memory from its annotations and limits);
        // resizing a running guest (CPU and memory hotplug) is not supported.
        Err(err(ttrpc::Code::UNIMPLEMENTED, "enclave: resources of a running microVM cannot change; they are set when the pod's VM boots (enclave.io/vcpus, enclave.io/memory-mib, or the pod's limits)"))
    }

    fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> ttrpc::Result<api::Empty> {
        if !lock(&self.0.containers).is_empty() {
            return Ok(api::Empty::new()); // containers remain: containerd asks again later
        }
        let (m, cv) = &*self.0.shutdown;
        *lock(m) = true;
        cv.notify_all();
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn host_files_are_carried_and_host_dirs_are_not() {
        let tmp = std::env::temp_dir().join(format!("enclave-carry-{}", std::process::id()));
        std::fs::create_dir_all(tmp.join("host")).unwrap();
        std::fs::write(tmp.join("host/hostname"), "payments-api\n").unwrap();
        let mut spec = serde_json::json!({"mounts": [
            {"destination": "/etc/hostname", "type": "bind", "source": tmp.join("host/hostname"), "options": ["rbind", "ro"]},
            {"destination": "/dev/shm", "type": "bind", "source": tmp.join("host"), "options": ["rbind"]},
            {"destination": "/data", "type": "bind", "source": "/var/lib", "options": ["rbind"]},
            {"destination": "/proc", "type": "proc", "source": "proc"},
        ]});
        carry_binds(&mut spec, &tmp.join("shared/c1"), "/run/enclave/shared/c1").unwrap();
        guest_spec(&mut spec);
        let m = spec["mounts"].as_array().unwrap();
        assert_eq!(m.len(), 3, "{m:?}");
        assert_eq!(m[0]["source"], "/run/enclave/shared/c1/files/0-hostname");
        assert_eq!(
            std::fs::read_to_string(tmp.join("shared/c1/files/0-hostname")).unwrap(),
            "payments-api\n"
        );
        assert_eq!(m[1]["type"], "tmpfs");
        assert_eq!(m[2]["type"], "proc");
        assert!(
            !spec.to_string().contains("/var/lib"),
            "a host directory must not reach the guest"
        );
        let _ = std::fs::remove_dir_all(tmp);
    }

    #[test]
    fn container_ids_that_name_directories_safely() {
        assert!(valid_id("abc-1.2_3"));
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
