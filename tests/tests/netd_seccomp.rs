//! enclave-netd's seccomp filters, checked in the kernel: the compiled filters kill on what
//! their tables do not list (a child process under the real filter), and a running netd has
//! every thread filtered, the frame thread included, so a forbidden syscall made by that
//! thread kills netd.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use enclave_netd::filters;
use enclave_tests::netns::PodPair;
use enclave_tests::procfs::pid_status;
use enclave_tests::seccomp::{child_case, inject_syscall, killed_by_seccomp, run_child, threads};

/// In the child: install the datapath filter, then make the syscall `case` names. Exits 0 if
/// the syscall returned (allowed, whatever its result).
fn child_under_datapath_filter(case: &str) -> ! {
    let prog = filters::datapath().unwrap();
    enclave_seccomp::install(&prog).unwrap();
    // SAFETY: raw syscalls with integer arguments on fds that do not exist or are ours;
    // each either fails harmlessly or is refused by the filter.
    unsafe {
        match case {
            "allowed" => {
                libc::syscall(libc::SYS_read, -1, 0, 0);
                libc::syscall(libc::SYS_epoll_create1, libc::EPOLL_CLOEXEC);
                libc::syscall(libc::SYS_ioctl, -1, enclave_netd::tap::TUNSETOFFLOAD_REQ, 0);
            }
            "socket" => {
                libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0);
            }
            "openat" => {
                libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/etc/passwd".as_ptr(), 0);
            }
            "ioctl" => {
                // TUNSETIFF: creating another interface is not the one ioctl netd makes.
                libc::syscall(libc::SYS_ioctl, -1, 0x4004_54ca, 0);
            }
            other => panic!("unknown case {other}"),
        }
        libc::_exit(0)
    }
}

#[test]
fn the_datapath_filter_kills_on_what_it_does_not_list() {
    if let Some(case) = child_case() {
        child_under_datapath_filter(&case);
    }
    let test = "the_datapath_filter_kills_on_what_it_does_not_list";
    let allowed = run_child(test, "allowed");
    assert!(
        allowed.success(),
        "listed syscalls under the filter: {allowed}"
    );
    for case in ["socket", "openat", "ioctl"] {
        let st = run_child(test, case);
        assert!(killed_by_seccomp(&st), "{case}: {st} (wanted SIGSYS)");
    }
}

/// A running netd (forward-only: the filter is the same) in a namespace of its own.
struct Netd {
    child: std::process::Child,
    _pair: PodPair,
    _dir: tempfile::TempDir,
}

impl Drop for Netd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_netd(test: &str, tag: &str) -> Option<Netd> {
    start_netd_with(test, tag, |dir| {
        vec![
            "--forward-only".into(),
            "--control".into(),
            dir.join("control.sock").into_os_string(),
        ]
    })
}

fn start_netd_with(
    test: &str,
    tag: &str,
    extra: impl FnOnce(&Path) -> Vec<std::ffi::OsString>,
) -> Option<Netd> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        enclave_tests::skip_or_fail_privileged(
            test,
            "needs root for a network namespace and a tap",
        );
        return None;
    }
    let bin = enclave_tests::workspace_root().join("target/debug/enclave-netd");
    if !bin.exists() {
        panic!("{} not built (cargo build -p enclave-netd)", bin.display());
    }
    let pair = PodPair::new(tag);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let child = Command::new(&bin)
        .args([
            "--socket",
            sock.to_str().unwrap(),
            "--tap",
            "tap0",
            "--netns",
        ])
        .arg(pair.pod_path())
        .args(extra(dir.path()))
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let netd = Netd {
        child,
        _pair: pair,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    // Ready: the socket exists and the vring worker is up.
    while !(Path::new(&sock).exists()
        && threads(netd.child.id())
            .iter()
            .any(|(_, n, _)| n == "vring_worker"))
    {
        assert!(Instant::now() < deadline, "netd did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(netd)
}

#[test]
fn every_netd_thread_is_filtered_and_unprivileged() {
    let Some(netd) = start_netd("every_netd_thread_is_filtered_and_unprivileged", "nsec") else {
        return;
    };
    let pid = netd.child.id();
    // Give the control thread its moment to install its own filter.
    std::thread::sleep(Duration::from_millis(100));
    let ts = threads(pid);
    let names: Vec<&str> = ts.iter().map(|(_, n, _)| n.as_str()).collect();
    for want in ["enclave-netd", "netd-control", "vring_worker"] {
        assert!(names.contains(&want), "thread {want} missing: {ts:?}");
    }
    for (tid, name, mode) in &ts {
        assert_eq!(
            mode, "2",
            "thread {name} ({tid}) is not under a seccomp filter: {ts:?}"
        );
    }
    assert_eq!(pid_status(pid, "Uid:"), ["65534"; 4], "netd's uids");
    assert_eq!(pid_status(pid, "Gid:"), ["65534"; 4], "netd's gids");
    assert_eq!(pid_status(pid, "CapEff:"), ["0000000000000000"]);
    assert_eq!(pid_status(pid, "CapPrm:"), ["0000000000000000"]);
    assert_eq!(pid_status(pid, "NoNewPrivs:"), ["1"]);
}

#[test]
fn a_forbidden_syscall_from_the_frame_thread_kills_netd() {
    let Some(mut netd) = start_netd(
        "a_forbidden_syscall_from_the_frame_thread_kills_netd",
        "nkill",
    ) else {
        return;
    };
    let ts = threads(netd.child.id());
    let worker = ts
        .iter()
        .find(|(_, n, _)| n == "vring_worker")
        .map(|(t, _, _)| *t)
        .unwrap();
    // The worker waits in epoll_wait for frames; wait until it is there.
    std::thread::sleep(Duration::from_millis(100));
    inject_syscall(
        worker,
        libc::SYS_socket,
        [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0],
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = netd.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "netd survived socket() on its frame thread"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        killed_by_seccomp(&status),
        "netd ended with {status}, wanted SIGSYS"
    );
}

/// The node's policy directory (holding `policy`) and registry under `dir`, readable by
/// netd after it drops to 65534, like /etc/enclave.
fn node_dirs(dir: &Path, policy: &str) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let (policies, registry) = (dir.join("policies"), dir.join("registry"));
    for d in [dir, &policies, &registry] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(policies.join("policy.yaml"), policy).unwrap();
    (policies, registry)
}

/// A policy for pod `shop/web` (zone `app`) of `n` rules into it, version `version`.
fn policy(n: usize, version: u32) -> String {
    enclave_netfilter::policy::generate::ManyRules {
        name: "reload-test",
        version,
        namespace: "shop",
        rules: n,
        inbound: true,
        extra_zones: &[],
        extra_rules: &["{name: base, from: p0, to: app, protocol: tcp, ports: [80]}"],
    }
    .yaml()
}

#[test]
fn reloads_of_large_broken_and_hostile_policies_under_the_real_filter_keep_netd_serving() {
    use enclave_netfilter::node::control_request;
    let test =
        "reloads_of_large_broken_and_hostile_policies_under_the_real_filter_keep_netd_serving";
    let mut files = None;
    let key = std::cell::RefCell::new(None);
    let Some(mut netd) = start_netd_with(test, "nrel", |dir| {
        // netd reads these after dropping to 65534: world-readable, like /etc/enclave.
        let (policies, registry) = node_dirs(dir, &policy(0, 1));
        // A sealed node log with one-second epochs: netd closes epochs (rewriting the key
        // file in place) under its real filter.
        let vk = enclave_netfilter::audit::seal::SealState::create(
            &enclave_netfilter::audit::seal::key_path(&dir.join("audit.log")),
            enclave_netfilter::audit::now_ms(),
            1000,
        )
        .unwrap();
        *key.borrow_mut() = Some(vk);
        let pod = dir.join("pod.json");
        std::fs::write(
            &pod,
            r#"{"name":"web","namespace":"shop","ips":["10.78.0.1"],"mac":"02:00:00:00:00:01"}"#,
        )
        .unwrap();
        files = Some((
            policies.join("policy.yaml"),
            dir.join("control.sock"),
            dir.join("audit.log"),
        ));
        [
            "--pod",
            pod.to_str().unwrap(),
            "--policy-dir",
            policies.to_str().unwrap(),
        ]
        .into_iter()
        .map(Into::into)
        .chain([
            "--registry".into(),
            registry.into_os_string(),
            "--audit-log".into(),
            dir.join("audit.log").into_os_string(),
            "--control".into(),
            dir.join("control.sock").into_os_string(),
        ])
        .collect()
    }) else {
        return;
    };
    let (policy_file, control, audit) = files.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !control.exists() {
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let alive = |netd: &mut Netd, after: &str| {
        assert!(
            netd.child.try_wait().unwrap().is_none(),
            "netd died after {after}"
        );
    };
    let reload = |content: &[u8]| {
        std::fs::write(&policy_file, content).unwrap();
        // An answer `error ...` comes back as Err: either way, the text.
        control_request(&control, "reload").unwrap_or_else(|e| e)
    };

    let big = policy(10_000, 2);
    let t0 = Instant::now();
    let answer = reload(big.as_bytes());
    eprintln!("reload of 10,000 rules: {:?}", t0.elapsed());
    assert!(
        answer.starts_with("ok") && answer.contains("version 2"),
        "{answer}"
    );
    alive(&mut netd, "a 10,000-rule reload");

    // An epoch passes before the next record: netd closes it.
    std::thread::sleep(Duration::from_millis(1100));
    let broken = reload(b"apiVersion: enclave.io/v1alpha1\nkind: ZonePolicy\nspec: [unclosed\n");
    assert!(broken.starts_with("error"), "{broken}");
    alive(&mut netd, "a broken policy");

    let mut hostile = vec![b'['; 256 * 1024];
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for bad in [&hostile[..], &garbage[..]] {
        let answer = reload(bad);
        assert!(
            answer.starts_with("error"),
            "{}",
            &answer[..answer.len().min(200)]
        );
        alive(&mut netd, "a hostile policy");
    }
    hostile.clear();

    let metrics = control_request(&control, "metrics").unwrap();
    let info = metrics
        .lines()
        .find(|l| l.starts_with("enclave_netd_policy_info"))
        .unwrap_or_default();
    assert!(
        info.contains("version=\"2\""),
        "the 10,000-rule policy stays in force: {info:?}"
    );
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(
        log.matches("policy reload refused").count() >= 3,
        "each refusal recorded in the audit log"
    );
    alive(&mut netd, "closing a seal epoch");
    let rep = enclave_netfilter::audit::verify(
        std::slice::from_ref(&audit),
        &enclave_netfilter::audit::VerifyOptions {
            key: key.borrow().clone(),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(rep.ok(), "{:?}", rep.problems);
    assert_eq!(
        rep.seals_checked, rep.records,
        "every record netd wrote is sealed"
    );
    assert!(rep.epochs_closed >= 1, "netd closed an epoch");
}

/// `enclavectl node reload` where the kernel refuses the pod's new nftables table (here:
/// the reload runs without CAP_NET_ADMIN, as a DaemonSet missing that capability would, and
/// the kernel answers the netlink batch with EPERM): netd is not asked to reload, so both
/// walls keep the old policy; netd records the refusal in the pod's audit log; the command
/// fails and says why. A privileged reload then puts the new policy on both walls.
#[test]
fn a_reload_the_nftables_wall_refuses_leaves_both_walls_on_the_old_policy_and_is_recorded() {
    use enclave_netfilter::node::{self, control_request, RegistryEntry};
    let test =
        "a_reload_the_nftables_wall_refuses_leaves_both_walls_on_the_old_policy_and_is_recorded";
    if Command::new("setpriv").arg("--version").output().is_err() {
        return enclave_tests::skip_or_fail_privileged(test, "setpriv (util-linux) missing");
    }
    let tag = "nnft";
    let netns = PathBuf::from(format!("/var/run/netns/enc-{tag}-{}", std::process::id()));
    let mut files = None;
    let Some(mut netd) = start_netd_with(test, tag, |dir| {
        let (policies, registry) = node_dirs(dir, &policy(3, 1));
        let entry = RegistryEntry {
            name: "web".into(),
            namespace: "shop".into(),
            labels: Default::default(),
            annotations: Default::default(),
            ips: vec!["10.78.0.1".parse().unwrap()],
            mac: "02:00:00:00:00:01".into(),
            netns: Some(netns.clone()),
            control: Some(dir.join("control.sock")),
        };
        let pod = node::register(&registry, &entry).unwrap();
        files = Some((policies.clone(), registry.clone(), dir.join("audit.log")));
        vec![
            "--pod".into(),
            pod.into_os_string(),
            "--policy-dir".into(),
            policies.into_os_string(),
            "--registry".into(),
            registry.into_os_string(),
            "--audit-log".into(),
            dir.join("audit.log").into_os_string(),
            "--control".into(),
            dir.join("control.sock").into_os_string(),
        ]
    }) else {
        return;
    };
    let (policies, registry, audit) = files.unwrap();
    let control = policies.parent().unwrap().join("control.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !control.exists() {
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let enclavectl = enclave_tests::workspace_root().join("target/debug/enclavectl");
    let reload = |unprivileged: bool| {
        let mut c = if unprivileged {
            let mut c = Command::new("setpriv");
            c.args(["--bounding-set=-net_admin", "--inh-caps=-net_admin", "--"]);
            c.arg(&enclavectl);
            c
        } else {
            Command::new(&enclavectl)
        };
        let out = c
            .args(["node", "reload", "--policy-dir"])
            .arg(&policies)
            .arg("--registry")
            .arg(&registry)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let version = || {
        let m = control_request(&control, "metrics").unwrap();
        m.lines()
            .find(|l| l.starts_with("enclave_netd_policy_info"))
            .unwrap_or_default()
            .to_string()
    };
    let table = || {
        let out = Command::new("ip")
            .args(["netns", "exec"])
            .arg(netns.file_name().unwrap())
            .args(["nft", "list", "table", "inet", "enclave_shop_web"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };

    let (ok, text) = reload(false);
    assert!(ok, "{text}");
    assert!(version().contains("version=\"1\""), "{}", version());
    // Rule r{i} allows zone p{i} (10.100.{i}.0/24) to port 1000 + i: a set element each.
    let r2 = "10.100.2.0/24 . tcp . 1002";
    let r3 = "10.100.3.0/24 . tcp . 1003";
    assert!(table().contains(r2), "{}", table());

    // Version 2: one more rule. The kernel refuses the unprivileged apply.
    std::fs::write(policies.join("policy.yaml"), policy(4, 2)).unwrap();
    let (ok, text) = reload(true);
    assert!(
        !ok,
        "an apply the kernel refused must fail the reload:\n{text}"
    );
    assert!(
        text.contains("nftables FAILED") && text.contains("Operation not permitted"),
        "{text}"
    );
    assert!(
        text.contains("not reloaded") && text.contains("refusal recorded"),
        "{text}"
    );
    assert!(netd.child.try_wait().unwrap().is_none(), "netd died");
    assert!(
        version().contains("version=\"1\""),
        "netd left the old policy: {}",
        version()
    );
    assert!(
        table().contains(r2) && !table().contains(r3),
        "the kernel wall left the old table:\n{}",
        table()
    );
    let log = std::fs::read_to_string(&audit).unwrap();
    let refusal = log
        .lines()
        .find(|l| l.contains("policy reload refused") && l.contains("nftables wall"))
        .unwrap_or_else(|| panic!("no refusal in the audit log:\n{log}"));
    assert!(refusal.contains("Operation not permitted"), "{refusal}");

    // The same policy, privileged: both walls take it.
    let (ok, text) = reload(false);
    assert!(ok, "{text}");
    assert!(version().contains("version=\"2\""), "{}", version());
    assert!(table().contains(r3), "{}", table());
}
