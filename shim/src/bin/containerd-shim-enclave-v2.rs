//! `containerd-shim-enclave-v2`: containerd runs it as `-namespace NS -address SOCK
//! -publish-binary BIN -id ID start` in the bundle directory (print the shim's ttrpc
//! address), then talks the Task API to it; and as `... -bundle DIR delete` to clean up
//! after a shim that died.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::{create_task, ttrpc};
use enclave_shim::events::Publisher;
use enclave_shim::task::{state_dir, Service, TaskService};
use sha2::{Digest, Sha256};

const HELP: &str = "\
containerd-shim-enclave-v2: containerd shim v2 running containers in Enclave microVMs

containerd starts it; it is not meant to be run by hand. Runtime type:
io.containerd.enclave.v2 (see configs/ and docs/shim.md).

USAGE:
    containerd-shim-enclave-v2 -namespace NS -address SOCK -publish-binary BIN -id ID start
    containerd-shim-enclave-v2 -namespace NS -address SOCK -id ID -bundle DIR delete

ENVIRONMENT:
    ENCLAVE_GUEST_IMAGE   guest image directory (default /usr/share/enclave/guest)
    ENCLAVE_CACHE         where QEMU's vhost-user backends were installed (~/.cache/enclave)
    TTRPC_ADDRESS         containerd's ttrpc socket for events (set by containerd)
";

/// Command-line flags, Go style (`-flag value`, `--flag value`, `-flag=value`).
#[derive(Default, Debug)]
struct Flags {
    namespace: String,
    address: String,
    publish_binary: String,
    id: String,
    bundle: Option<PathBuf>,
    action: Option<String>,
}

fn parse(args: &[String]) -> Result<Flags, String> {
    let mut f = Flags::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if !a.starts_with('-') {
            f.action = Some(a.clone());
            i += 1;
            continue;
        }
        let name = a.trim_start_matches('-');
        let (name, inline) = match name.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (name, None),
        };
        if matches!(name, "debug" | "v" | "version" | "h" | "help") {
            if matches!(name, "h" | "help") {
                print!("{HELP}");
                std::process::exit(0);
            }
            if matches!(name, "v" | "version") {
                println!("containerd-shim-enclave-v2 {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            i += 1;
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => {
                i += 1;
                args.get(i)
                    .cloned()
                    .ok_or_else(|| format!("-{name} needs a value"))?
            }
        };
        match name {
            "namespace" => f.namespace = value,
            "address" => f.address = value,
            "publish-binary" => f.publish_binary = value,
            "id" => f.id = value,
            "bundle" => f.bundle = Some(value.into()),
            _ => {} // flags of newer containerd versions we do not need
        }
        i += 1;
    }
    if f.namespace.is_empty() || f.id.is_empty() {
        return Err("-namespace and -id are required".into());
    }
    Ok(f)
}

/// The shim's socket: as containerd's own shims name theirs, a hash of the containerd
/// address, namespace and id under /run/containerd/s.
fn socket_path(f: &Flags) -> PathBuf {
    let digest = Sha256::digest(format!("{}/{}/{}", f.address, f.namespace, f.id).as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    PathBuf::from("/run/containerd/s").join(hex)
}

/// The shim a container belongs to: its pod sandbox's for a CRI container
/// (`io.kubernetes.cri.sandbox-id`), its own otherwise.
fn grouping(bundle: &std::path::Path, id: &str) -> String {
    let spec: serde_json::Value = std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let ann = &spec["annotations"];
    let is_container = ann["io.kubernetes.cri.container-type"].as_str() == Some("container");
    match ann["io.kubernetes.cri.sandbox-id"].as_str() {
        Some(sandbox) if is_container && enclave_shim::task::valid_id(sandbox) => {
            sandbox.to_string()
        }
        _ => id.to_string(),
    }
}

fn start(f: &Flags) -> Result<String, String> {
    let bundle = std::env::current_dir().map_err(|e| e.to_string())?;
    // Containers of one pod share the pod's shim (and VM): containerd gets its address.
    let group = grouping(&bundle, &f.id);
    let f = &Flags {
        id: group,
        namespace: f.namespace.clone(),
        address: f.address.clone(),
        publish_binary: f.publish_binary.clone(),
        bundle: None,
        action: None,
    };
    let sock = socket_path(f);
    let address = format!("unix://{}", sock.display());
    // containerd 1.6 reconnects to a running shim after a restart through the bundle's
    // `address` file: every container writes it, a pod's joining containers too (without
    // it containerd takes a joined container for lost and runs `delete` on it).
    let write_address = || {
        std::fs::write(bundle.join("address"), &address)
            .map_err(|e| format!("writing the bundle's address file: {e}"))
    };
    if UnixStream::connect(&sock).is_ok() {
        // A shim for this id already serves: reuse it.
        write_address()?;
        return Ok(address);
    }
    let _ = std::fs::remove_file(&sock);
    if let Some(dir) = sock.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let listener =
        UnixListener::bind(&sock).map_err(|e| format!("shim socket {}: {e}", sock.display()))?;
    let state = state_dir(&f.namespace, &f.id);
    std::fs::create_dir_all(&state).map_err(|e| format!("{}: {e}", state.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.join("shim.log"))
        .map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args([
        "-namespace",
        &f.namespace,
        "-id",
        &f.id,
        "-address",
        &f.address,
        "-publish-binary",
        &f.publish_binary,
    ])
    .arg("-bundle")
    .arg(&bundle)
    .arg("serve")
    .current_dir(&bundle)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(log);
    // The listener becomes the daemon's fd 3; a session of its own so the shim outlives
    // containerd's call.
    enclave_shim::vm::pass_as_fd3(&mut cmd, fd, true);
    cmd.spawn()
        .map_err(|e| format!("starting the shim daemon: {e}"))?;
    write_address()?;
    Ok(address)
}

fn serve(f: &Flags) -> Result<(), String> {
    let publisher = Publisher::new(f.namespace.clone(), std::env::var("TTRPC_ADDRESS").ok());
    let service = Arc::new(Service::new(&f.namespace, &f.id, publisher));
    let handlers = Arc::new(TaskService(service.clone()));
    // containerd 2.x calls containerd.task.v3.Task, containerd 1.6 containerd.task.v2.Task;
    // the messages are the same, so the same handlers serve both names.
    let v3 = create_task(handlers.clone());
    let v2 = create_task(handlers)
        .into_iter()
        .map(|(k, v)| {
            (
                k.replace("containerd.task.v3.Task", "containerd.task.v2.Task"),
                v,
            )
        })
        .collect();
    let mut server = ttrpc::Server::new()
        .add_listener(3)
        .map_err(|e| format!("ttrpc listener: {e}"))?
        .register_service(v3)
        .register_service(v2);
    server.start().map_err(|e| format!("ttrpc server: {e}"))?;
    let grace = std::env::var("ENCLAVE_SHIM_ORPHAN_GRACE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(ORPHAN_GRACE, Duration::from_secs);
    let (m, cv) = &*service.shutdown;
    let mut done = m.lock().unwrap_or_else(|p| p.into_inner());
    let mut orphaned_since: Option<Instant> = None;
    while !*done {
        done = cv
            .wait_timeout(done, Duration::from_secs(1))
            .unwrap_or_else(|p| p.into_inner())
            .0;
        if *done {
            break;
        }
        match orphan_reason(f, &service) {
            None => orphaned_since = None,
            Some(why) => {
                let since = *orphaned_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= grace {
                    eprintln!(
                        "containerd-shim-enclave-v2: exiting: {why} for {} s",
                        grace.as_secs()
                    );
                    drop(done);
                    service.abandon();
                    break;
                }
            }
        }
    }
    let state = state_dir(&f.namespace, &f.id);
    // The shared directory's own mount (made when the VM booted), before its removal.
    enclave_shim::confine::remove_shared_mount(&state.join("shared"));
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_file(socket_path(f));
    reap_children();
    // Exit without waiting for ttrpc's connection threads: containerd closes its side.
    std::process::exit(0);
}

/// How long a shim waits, once nothing can use it any more, before it exits on its own.
const ORPHAN_GRACE: Duration = Duration::from_secs(30);

/// Why nothing can use this shim any more, if that is so: it holds no container (and
/// containerd did not ask it to shut down); or none of its processes runs and containerd
/// is gone or its socket was removed (its tasks were deleted behind its back, as
/// `containerd-shim-enclave-v2 delete` does after a crash). A shim whose containers still
/// run stays, containerd or not: a containerd restart reconnects to it.
fn orphan_reason(f: &Flags, service: &Service) -> Option<&'static str> {
    if service.is_empty() {
        return Some("no container left");
    }
    if service.creating() || !service.nothing_running() {
        return None;
    }
    if !socket_path(f).exists() {
        return Some("no process running and this shim's socket was removed");
    }
    let containerd = f.address.trim_start_matches("unix://");
    if std::os::unix::net::UnixStream::connect(containerd).is_err() {
        return Some("no process running and containerd is gone");
    }
    None
}

/// Collects every child that has ended (the VM's helpers), so none stays a zombie.
fn reap_children() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid on any child of ours, without blocking.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
    }
}

/// Cleans up after a shim that is gone: kills what it left running, unmounts the rootfs,
/// removes its state, and tells containerd the task was killed.
fn delete(f: &Flags) -> Result<Vec<u8>, String> {
    let state = state_dir(&f.namespace, &f.id);
    for pid in std::fs::read_to_string(state.join("pids"))
        .unwrap_or_default()
        .lines()
    {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            // SAFETY: SIGKILL to a pid the shim recorded for its VM processes.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    // The VM's vsock home, outside the state directory (a short path for its sockets).
    let _ = std::fs::remove_dir_all(enclave_shim::vm::vsock_home(&state.join("vm")));
    // The container's rootfs in whichever shim's shared directory it was.
    if let Ok(shims) =
        std::fs::read_dir(std::path::Path::new(enclave_shim::task::STATE_ROOT).join(&f.namespace))
    {
        for shim in shims.flatten() {
            let dir = shim.path().join("shared").join(&f.id);
            enclave_shim::mount::unmount(&dir.join("rootfs"));
            let _ = std::fs::remove_dir(dir.join("rootfs"));
            let _ = std::fs::remove_dir_all(dir.join("files"));
            let _ = std::fs::remove_dir(dir);
        }
    }
    enclave_shim::enforce::leave_from_state(&state);
    // If this was the VM's shim: the shared directory's own mount, made at boot.
    enclave_shim::confine::remove_shared_mount(&state.join("shared"));
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_file(socket_path(f));
    let resp = DeleteResponse {
        exit_status: 137,
        exited_at: MessageField::some(Timestamp::now()),
        ..Default::default()
    };
    resp.write_to_bytes().map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flags = match parse(&args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("containerd-shim-enclave-v2: {e}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    let r = match flags.action.as_deref() {
        Some("start") => start(&flags).map(|a| {
            print!("{a}");
        }),
        Some("delete") => delete(&flags).map(|b| {
            let _ = std::io::stdout().write_all(&b);
        }),
        Some("serve") => serve(&flags),
        other => Err(format!(
            "unknown action {other:?}: containerd runs this shim with start or delete"
        )),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("containerd-shim-enclave-v2: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_style_flags() {
        let a: Vec<String> = [
            "-namespace",
            "k8s.io",
            "--address=/run/c.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            "abc",
            "-debug",
            "start",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let f = parse(&a).unwrap_or_default();
        assert_eq!(
            (
                f.namespace.as_str(),
                f.address.as_str(),
                f.id.as_str(),
                f.action.as_deref()
            ),
            ("k8s.io", "/run/c.sock", "abc", Some("start"))
        );
        assert!(parse(&["start".to_string()]).is_err());
        assert!(socket_path(&f).starts_with("/run/containerd/s"));
    }
}
