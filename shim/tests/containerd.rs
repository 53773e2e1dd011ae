//! containerd-shim-enclave-v2 with the real containerd: a private containerd (own root,
//! state and sockets), a busybox image built here and imported, and `ctr` driving
//! containers in microVMs (QEMU backend; TCG on this host).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use enclave_tests::containerd::{busybox_image, leftovers, pid_of, run_args, Containerd, IMAGE};
use enclave_tests::skip_or_fail;

/// Where this test binary's shim lives (target/debug).
fn shim_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-enclave-v2"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A private containerd with the busybox image imported, or None (skipped) when this
/// machine cannot run it.
fn setup(test: &str, ns: &'static str) -> Option<(Containerd, PathBuf)> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        skip_or_fail(test, "needs root (containerd, mounts)");
        return None;
    }
    if Command::new("containerd")
        .arg("--version")
        .output()
        .is_err()
    {
        skip_or_fail(
            test,
            "containerd not installed (apt-get install containerd runc)",
        );
        return None;
    }
    if let Err(e) = enclave_tests::tools() {
        skip_or_fail(test, &e);
        return None;
    }
    let dir = std::env::temp_dir().join(format!("enclave-ctrd-{ns}-{}", std::process::id()));
    let ctrd = Containerd::start(&dir, ns, &shim_dir());
    let image = busybox_image(&dir);
    ctrd.ctr_ok(&["images", "import", image.to_str().unwrap()]);
    Some((ctrd, dir.join("fifo")))
}

/// A private containerd (namespace `ns`, CRI off) whose shims read `config` (the shim's
/// runtime config, written beside `dir`), with the busybox image imported; and its fifo
/// directory.
fn start_with_config(dir: &Path, ns: &'static str, config: &str) -> (Containerd, PathBuf) {
    // Beside containerd's directory, which Containerd::start empties.
    let path = dir.with_extension("toml");
    std::fs::write(&path, config).unwrap();
    let ctrd = Containerd::start_with_env(
        dir,
        ns,
        &shim_dir(),
        "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        None,
        &[("ENCLAVE_CONFIG", path.into())],
    );
    let image = busybox_image(dir);
    ctrd.ctr_ok(&["images", "import", image.to_str().unwrap()]);
    (ctrd, dir.join("fifo"))
}

/// Asserts nothing of the test's namespace is left: VM processes, shim state, rootfs mounts.
fn assert_nothing_left(ctrd: &Containerd) {
    std::thread::sleep(Duration::from_millis(500));
    let left = leftovers(&format!("/run/enclave/{}/", ctrd.ns));
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let state = Path::new("/run/enclave").join(ctrd.ns);
    let entries: Vec<_> = std::fs::read_dir(&state)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(entries.is_empty(), "state left behind: {entries:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts
            .lines()
            .any(|l| l.contains(ctrd.dir.to_str().unwrap()) && l.contains("rootfs")),
        "rootfs mounts left behind"
    );
}

/// SIGKILLs a running task, waits until it has stopped, and removes it and its container.
fn kill_and_remove(ctrd: &Containerd, id: &str) {
    ctrd.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
    wait_stopped(ctrd, id);
    ctrd.ctr_ok(&["task", "rm", id]);
    ctrd.ctr_ok(&["container", "rm", id]);
}

/// Waits until `ctr task ls` shows `id` stopped (or no longer lists it).
fn wait_stopped(ctrd: &Containerd, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ls = ctrd.ctr_ok(&["task", "ls"]);
        let line = ls.lines().find(|l| l.split_whitespace().next() == Some(id));
        if line.is_none_or(|l| l.contains("STOPPED")) {
            return;
        }
        assert!(Instant::now() < deadline, "{id} not stopped:\n{ls}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn ctr_runs_containers_in_microvms() {
    let Some((ctrd, fifo)) = setup("ctr_runs_containers_in_microvms", "enclave-run") else {
        return;
    };
    let fifo = fifo.to_str().unwrap();
    let host = String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();

    // The container prints the guest's kernel release, not the host's.
    let t = Instant::now();
    let out = ctrd.ctr_ok(&[
        "run",
        "--rm",
        "--fifo-dir",
        fifo,
        "--runtime",
        "io.containerd.enclave.v2",
        IMAGE,
        "uname1",
        "uname",
        "-r",
    ]);
    eprintln!(
        "ctr run uname -r: {:?} in {:?} (host: {})",
        out.trim(),
        t.elapsed(),
        host.trim()
    );
    enclave_tests::assert_guest_kernel(&out);
    assert_ne!(out.trim(), host.trim());

    // The exit code propagates.
    let out = ctrd.ctr(&[
        "run",
        "--rm",
        "--fifo-dir",
        fifo,
        "--runtime",
        "io.containerd.enclave.v2",
        IMAGE,
        "exit7",
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A long-running container: exec, metrics, kill.
    ctrd.run_sleeper(fifo, "sleeper", &[]);
    let out = ctrd.ctr_ok(&[
        "task",
        "exec",
        "--fifo-dir",
        fifo,
        "--exec-id",
        "e1",
        "sleeper",
        "echo",
        "hello from exec",
    ]);
    assert_eq!(out.trim(), "hello from exec");
    let metrics = ctrd.ctr_ok(&["task", "metrics", "sleeper"]);
    assert!(
        metrics.contains("memory.usage_in_bytes") || metrics.contains("memory"),
        "{metrics}"
    );
    ctrd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "sleeper"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ls = ctrd.ctr_ok(&["task", "ls"]);
        if ls
            .lines()
            .any(|l| l.starts_with("sleeper") && l.contains("STOPPED"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sleeper not stopped after SIGKILL:\n{ls}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ctrd.ctr_ok(&["task", "rm", "sleeper"]);
    ctrd.ctr_ok(&["containers", "rm", "sleeper"]);

    // Nothing left behind: no VM processes, no state, no rootfs mounts.
    assert_nothing_left(&ctrd);
}

#[test]
fn killing_the_shim_or_the_vm_ends_the_task_and_leaves_nothing() {
    let Some((ctrd, fifo)) = setup(
        "killing_the_shim_or_the_vm_ends_the_task_and_leaves_nothing",
        "enclave-kill",
    ) else {
        return;
    };
    let fifo = fifo.to_str().unwrap();
    let run = |id: &str| ctrd.run_sleeper(fifo, id, &[]);

    // kill -9 of the shim: containerd sees the task end and runs `shim delete`, which kills
    // the VM the shim left and cleans up.
    run("shimkill");
    let shim =
        pid_of(&["containerd-shim-enclave-v2", "-id shimkill", "serve"]).expect("shim process");
    // SAFETY: SIGKILL to the shim we started through containerd.
    unsafe { libc::kill(shim, libc::SIGKILL) };
    wait_stopped(&ctrd, "shimkill");
    let _ = ctrd.ctr(&["task", "rm", "shimkill"]);
    ctrd.ctr_ok(&["containers", "rm", "shimkill"]);

    // kill -9 of the VM: the agent connection drops, the task exits (137), delete cleans up.
    run("vmkill");
    let qemu = pid_of(&["qemu-system", &format!("/run/enclave/{}/vmkill/", ctrd.ns)])
        .expect("qemu process");
    // SAFETY: SIGKILL to the VM's QEMU.
    unsafe { libc::kill(qemu, libc::SIGKILL) };
    wait_stopped(&ctrd, "vmkill");
    ctrd.ctr_ok(&["task", "rm", "vmkill"]);
    ctrd.ctr_ok(&["containers", "rm", "vmkill"]);
    assert_nothing_left(&ctrd);
}

/// A shim nothing can use any more exits on its own and leaves nothing, and one whose
/// containers still run stays. With containerd crashed (SIGKILL, not restarted):
/// - `running` keeps its VM and its shim past the grace period (a containerd restart would
///   reconnect to it); containerd comes back and it is removed as usual;
/// - `orphan`'s task is deleted behind its shim's back (`containerd-shim-enclave-v2
///   delete`, what containerd runs after losing a shim: it kills the VM and removes the
///   state): its shim, which no one can reach, exits after the grace period, with no VM
///   process, zombie, mount or state left.
#[test]
fn a_shim_that_nothing_can_use_exits_and_one_with_running_containers_stays() {
    let test = "a_shim_that_nothing_can_use_exits_and_one_with_running_containers_stays";
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return skip_or_fail(test, "needs root (containerd, mounts)");
    }
    if Command::new("containerd")
        .arg("--version")
        .output()
        .is_err()
    {
        return skip_or_fail(
            test,
            "containerd not installed (apt-get install containerd runc)",
        );
    }
    if let Err(e) = enclave_tests::tools() {
        return skip_or_fail(test, &e);
    }
    let ns = "enclave-orphan";
    let dir = std::env::temp_dir().join(format!("enclave-ctrd-{ns}-{}", std::process::id()));
    let mut ctrd = Containerd::start_with_env(
        &dir,
        ns,
        &shim_dir(),
        "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        None,
        &[("ENCLAVE_SHIM_ORPHAN_GRACE_SECS", "3".into())],
    );
    let image = busybox_image(&dir);
    ctrd.ctr_ok(&["images", "import", image.to_str().unwrap()]);
    let fifo = dir.join("fifo");
    let fifo = fifo.to_str().unwrap();
    ctrd.run_sleeper(fifo, "running", &[]);
    ctrd.run_sleeper(fifo, "orphan", &[]);
    let shim_of =
        |id: &str| pid_of(&["containerd-shim-enclave-v2", &format!("-id {id} "), "serve"]);
    let (running, orphan) = (
        shim_of("running").expect("shim"),
        shim_of("orphan").expect("shim"),
    );

    ctrd.crash();
    let shim = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-enclave-v2"));
    let out = Command::new(&shim)
        .args([
            "-namespace",
            ns,
            "-address",
            &ctrd.sock(),
            "-id",
            "orphan",
            "delete",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let alive = |pid: i32| Path::new(&format!("/proc/{pid}")).exists();
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(orphan) {
        assert!(
            Instant::now() < deadline,
            "the orphaned shim did not exit; left: {:?}",
            leftovers(&format!("/run/enclave/{ns}/orphan/"))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let left = leftovers(&format!("/run/enclave/{ns}/orphan/"));
    assert!(
        left.is_empty(),
        "the orphan's processes left behind: {left:?}"
    );
    assert!(!Path::new(&format!("/run/enclave/{ns}/orphan")).exists());

    // The other shim's container still runs: it stays, past the grace period.
    assert!(alive(running), "a shim with a running container exited");
    assert!(
        pid_of(&["qemu-system", &format!("/run/enclave/{ns}/running/")]).is_some(),
        "its VM is gone"
    );
    ctrd.restart();
    kill_and_remove(&ctrd, "running");
    assert_nothing_left(&ctrd);
}

/// The shim on our own VMM: containerd (started here) runs containers with
/// `--runtime io.containerd.enclave.v2`, and the shim's `auto` backend picks enclave-vmm,
/// started through enclave-jailer. Output and exit codes come back; every process of the
/// pod is checked from /proc; nothing is left after. On a host whose KVM cannot run a
/// Linux kernel (PVM) the test runs itself inside the nested KVM box.
#[test]
fn ctr_runs_containers_on_enclave_vmm() {
    let test = "ctr_runs_containers_on_enclave_vmm";
    // About a minute in the box on an idle 2-core host; a wedged box is caught by its
    // heartbeat long before this and booted again.
    if !enclave_tests::nestbox::on_hardware_kvm_or_in_box(test, Duration::from_secs(480)) {
        return;
    }
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return skip_or_fail(test, "needs root (containerd, mounts, the jailer)");
    }
    if let Err(e) = enclave_tests::tools() {
        return skip_or_fail(test, &e);
    }
    let vmm = shim_dir().join("enclave-vmm");
    if !vmm.exists() || !shim_dir().join("enclave-jailer").exists() {
        return skip_or_fail(
            test,
            "enclave-vmm or enclave-jailer not built (cargo build --workspace)",
        );
    }
    let dir = std::env::temp_dir().join(format!("enclave-ctrd-ev-{}", std::process::id()));
    let (ctrd, fifo) = start_with_config(
        &dir,
        "enclave-ev",
        &format!(
            "[vm]\nbackend = \"auto\"\n[paths]\nenclave_vmm = \"{}\"\n",
            vmm.display()
        ),
    );
    let fifo = fifo.to_str().unwrap();

    let t = Instant::now();
    let out = ctrd.ctr_ok(&run_args(fifo, "ev-uname", &["--rm"], &["uname", "-r"]));
    let first = t.elapsed();
    enclave_tests::assert_guest_kernel(&out);
    let out = ctrd.ctr(&run_args(
        fifo,
        "ev-exit7",
        &["--rm"],
        &["sh", "-c", "exit 7"],
    ));
    assert_eq!(out.status.code(), Some(7), "{out:?}");

    // A pod that stays up: its processes are enclave-vmm (jailed) and virtiofsd.
    ctrd.run_sleeper(fifo, "ev-sleep", &[]);
    let marker = format!("/run/enclave/{}/ev-sleep/", ctrd.ns);
    let (seen, wrong) =
        enclave_tests::confinement::check(&marker, enclave_tests::confinement::ENCLAVE_VMM_POD);
    for l in &seen {
        println!("BOX-REPORT {l}");
    }
    kill_and_remove(&ctrd, "ev-sleep");
    assert!(wrong.is_empty(), "{wrong:#?}\n{seen:#?}");
    assert_eq!(seen.len(), 2, "enclave-vmm and virtiofsd: {seen:#?}");
    assert_nothing_left(&ctrd);
    let _ = std::fs::remove_file(dir.with_extension("toml"));
    println!(
        "BOX-REPORT ctr run on enclave-vmm: first container's output after {:.2} s, all checks in {:.2} s",
        first.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn containers_of_one_pod_share_its_vm() {
    let Some((ctrd, fifo)) = setup("containers_of_one_pod_share_its_vm", "enclave-pod") else {
        return;
    };
    let fifo = fifo.to_str().unwrap();
    ctrd.run_sleeper(fifo, "pod1", &[]);
    // What CRI sets on a pod's containers (the kubelet's CreateContainer).
    let grouped = [
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod1",
    ];
    ctrd.run_detached(fifo, "app1", &grouped, &["sleep", "1001"]);
    ctrd.run_sleeper(fifo, "other", &[]);

    // Proved from inside: the guest kernel's boot id is the same in the pod's two containers
    // and different in the other one's VM.
    let boot_id = |id: &str| {
        ctrd.ctr_ok(&[
            "task",
            "exec",
            "--fifo-dir",
            fifo,
            "--exec-id",
            &format!("b-{id}"),
            id,
            "cat",
            "/proc/sys/kernel/random/boot_id",
        ])
        .trim()
        .to_string()
    };
    let (p, a, o) = (boot_id("pod1"), boot_id("app1"), boot_id("other"));
    assert_eq!(p.len(), 36, "{p:?}");
    assert_eq!(p, a, "the pod's containers are in one VM");
    // An exec lands in the container it names (its own PID namespace: PID 1 is its init).
    let init = |id: &str| {
        ctrd.ctr_ok(&[
            "task",
            "exec",
            "--fifo-dir",
            fifo,
            "--exec-id",
            &format!("i-{id}"),
            id,
            "cat",
            "/proc/1/cmdline",
        ])
        .replace('\0', " ")
    };
    assert_eq!(init("app1").trim(), "sleep 1001");
    assert_eq!(init("pod1").trim(), "sleep 1000");
    assert_ne!(p, o, "another container has its own VM");
    let vms = leftovers(&format!("/run/enclave/{}/", ctrd.ns))
        .iter()
        .filter(|c| c.contains("qemu-system") || c.contains("enclave-vmm --config"))
        .count();
    assert_eq!(vms, 2, "one VM for the pod, one for the other container");

    for id in ["app1", "pod1", "other"] {
        kill_and_remove(&ctrd, id);
    }
    assert_nothing_left(&ctrd);
}

#[test]
fn a_terminal_container_gets_a_tty() {
    let Some((ctrd, fifo)) = setup("a_terminal_container_gets_a_tty", "enclave-tty") else {
        return;
    };
    // ctr -t needs a terminal of its own: script(1) gives it one.
    let ctr = format!(
        "ctr --address {} --namespace {} run --rm -t --fifo-dir {} --runtime io.containerd.enclave.v2 {IMAGE} tty1 sh -c 'test -t 0 && test -t 1 && echo tty-ok'",
        ctrd.sock(),
        ctrd.ns,
        fifo.display()
    );
    let out = Command::new("script")
        .args(["-qec", &ctr, "/dev/null"])
        .env("COLUMNS", "100")
        .env("LINES", "40")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // isatty on stdin and stdout. (ttyname does not resolve, and so `tty` and `stty` say
    // "not a tty": the agent allocates the pty in the guest's devpts, not in the
    // container's own devpts instance as runc does; docs/shim.md.)
    assert!(text.contains("tty-ok"), "no tty in the container: {text:?}");
    assert_nothing_left(&ctrd);
}

#[test]
fn every_process_of_a_pod_is_unprivileged_in_its_own_namespaces_and_filtered() {
    let test = "every_process_of_a_pod_is_unprivileged_in_its_own_namespaces_and_filtered";
    let Some((ctrd, fifo)) = setup(test, "enclave-priv") else {
        return;
    };
    ctrd.run_sleeper(fifo.to_str().unwrap(), "priv1", &[]);
    let (seen, wrong) = enclave_tests::confinement::check(
        &format!("/run/enclave/{}/priv1/", ctrd.ns),
        enclave_tests::confinement::QEMU_POD,
    );
    for l in &seen {
        eprintln!("  {l}");
    }
    kill_and_remove(&ctrd, "priv1");
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(
        seen.len(),
        3,
        "qemu, the vsock backend, virtiofsd: {seen:#?}"
    );
    assert_nothing_left(&ctrd);
}

#[test]
fn a_start_that_fails_ends_the_task_and_kill_and_delete_never_hang() {
    let test = "a_start_that_fails_ends_the_task_and_kill_and_delete_never_hang";
    let Some((ctrd, fifo)) = setup(test, "enclave-fail") else {
        return;
    };
    let fifo = fifo.to_str().unwrap();
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    // (id, extra ctr flags, command, what the error says)
    let cases: [(&str, &[&str], &[&str], &str); 3] = [
        ("missing", &[], &["/no/such/entrypoint"], "No such file"),
        ("noexec", &[], &["/etc/passwd"], "ermission denied"),
        // Container setup fails in the guest: its working directory does not exist.
        ("badcwd", &["--cwd", "/no/such/dir"], &["true"], ""),
    ];
    for (id, extra, cmd, says) in cases {
        let args = enclave_tests::containerd::run_args(fifo, id, extra, cmd);
        let run = ctrd.ctr_within(120, &args);
        assert!(
            !run.status.success(),
            "{id}: ctr run succeeded: {}",
            text(&run)
        );
        assert!(
            text(&run).contains(says),
            "{id}: the error reaches ctr: {}",
            text(&run)
        );
        // Whatever state the task is in now, kill and delete answer promptly.
        let ls = ctrd.ctr_ok(&["task", "ls"]);
        if let Some(line) = ls.lines().find(|l| l.split_whitespace().next() == Some(id)) {
            assert!(
                line.contains("STOPPED"),
                "{id}: task after a failed start: {line}"
            );
            let kill = ctrd.ctr_within(30, &["task", "kill", "-s", "SIGKILL", id]);
            assert_ne!(kill.status.code(), None, "{id}: ctr task kill hung");
            let rm = ctrd.ctr_within(30, &["task", "rm", "-f", id]);
            assert!(rm.status.success(), "{id}: ctr task rm -f: {}", text(&rm));
        }
        let rm = ctrd.ctr_within(30, &["container", "rm", id]);
        assert!(rm.status.success(), "{id}: ctr container rm: {}", text(&rm));
        assert_nothing_left(&ctrd);
    }
}

/// A container through containerd and the shim on each backend, in the same nested box,
/// one backend after the other: `ctr run --rm uname -r` on enclave-vmm (jailed) and on
/// QEMU microvm with `-accel kvm`, three times each; the time to the container's output. Opt-in (`-- --ignored`):
/// QEMU's KVM guests have wedged the box now and then (docs/nestbox.md).
#[test]
#[ignore = "opt-in: both backends in the nested KVM box (QEMU's KVM guests wedge the box now and then)"]
fn a_container_through_the_shim_on_each_backend() {
    let test = "a_container_through_the_shim_on_each_backend";
    if !enclave_tests::nestbox::on_hardware_kvm_or_in_box(test, Duration::from_secs(1200)) {
        return;
    }
    let vmm = shim_dir().join("enclave-vmm");
    let mut times: Vec<(&str, Vec<f64>)> = vec![("enclave-vmm", vec![]), ("qemu", vec![])];
    for (backend, samples) in &mut times {
        let dir =
            std::env::temp_dir().join(format!("enclave-ctrd-{backend}-{}", std::process::id()));
        let vm = if *backend == "qemu" {
            "[vm]\nbackend = \"qemu\"\naccel = \"kvm\"\n".to_string()
        } else {
            format!(
                "[vm]\nbackend = \"enclave-vmm\"\n[paths]\nenclave_vmm = \"{}\"\n",
                vmm.display()
            )
        };
        let (ctrd, fifo) = start_with_config(&dir, "enclave-each", &vm);
        for i in 0..3 {
            let t = Instant::now();
            let out = ctrd.ctr_ok(&run_args(
                fifo.to_str().unwrap(),
                &format!("each-{i}"),
                &["--rm"],
                &["uname", "-r"],
            ));
            samples.push(t.elapsed().as_secs_f64());
            enclave_tests::assert_guest_kernel(&out);
        }
        assert_nothing_left(&ctrd);
        let _ = std::fs::remove_file(dir.with_extension("toml"));
    }
    for (backend, s) in &mut times {
        s.sort_by(f64::total_cmp);
        println!(
            "BOX-REPORT ctr run --rm uname -r on {backend}: median {:.2} s ({:.2}..{:.2})",
            s[1], s[0], s[2]
        );
    }
}
