//! The guest, for real: QEMU boots the Enclave image (Debian's cloud kernel, enclave-agent
//! as PID 1), and these tests drive the agent over vsock the way the shim does. Containers
//! run from a busybox root filesystem shared from the host through virtio-fs.
//!
//! Needs QEMU, vhost-device-vsock, virtiofsd and the image (`guest/image/build.sh`);
//! without them each test says SKIPPED and why, and fails instead when
//! `ENCLAVE_REQUIRE_VM=1` (CI sets it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use enclave_agent_protocol::messages::*;
use enclave_agent_protocol::{Client, Code};
use enclave_tests::{busybox_rootfs, spec, GuestVm, VmOptions};

const BOOT: Duration = Duration::from_secs(120);

fn boot(test: &str, opts: VmOptions) -> Option<(GuestVm, Client)> {
    let tools = match enclave_tests::tools() {
        Ok(t) => t,
        Err(why) => {
            enclave_tests::skip_or_fail(test, &why);
            return None;
        }
    };
    let vm = GuestVm::boot(&tools, &opts).unwrap_or_else(|e| panic!("{test}: boot: {e}"));
    let client = vm.connect(BOOT).unwrap_or_else(|e| panic!("{test}: {e}"));
    eprintln!(
        "{test}: agent ready {:?} after QEMU start ({})",
        vm.started.elapsed(),
        vm.accel
    );
    Some((vm, client))
}

fn req(c: &str, e: &str) -> ProcessRequest {
    ProcessRequest {
        container_id: c.into(),
        exec_id: e.into(),
    }
}

/// Creates a container running `args` in a fresh busybox rootfs.
fn create(
    vm: &GuestVm,
    c: &Client,
    id: &str,
    spec: serde_json::Value,
) -> Result<u32, enclave_agent_protocol::ClientError> {
    let dir = vm.shared_dir().join(id).join("rootfs");
    busybox_rootfs(&dir).unwrap();
    let r = c.call::<CreateContainer>(&CreateContainerRequest {
        container_id: id.into(),
        oci_spec: serde_json::to_vec(&spec).unwrap(),
        rootfs: format!("{id}/rootfs"),
    })?;
    Ok(r.pid)
}

/// Everything a stream carries until end of stream.
fn drain(c: &Client, id: &str, exec: &str, stderr: bool) -> Vec<u8> {
    enclave_tests::read_to_end(c, id, exec, stderr).unwrap()
}

fn wait(c: &Client, id: &str, exec: &str) -> WaitProcessResponse {
    c.call_timeout::<WaitProcess>(&req(id, exec), Some(Duration::from_secs(60)))
        .unwrap()
}

fn run(vm: &GuestVm, c: &Client, id: &str, args: &[&str]) -> (WaitProcessResponse, String, String) {
    create(vm, c, id, spec(args, false)).unwrap();
    c.call::<StartContainer>(&ContainerRequest {
        container_id: id.into(),
    })
    .unwrap();
    let out = String::from_utf8(drain(c, id, "", false)).unwrap();
    let err = String::from_utf8(drain(c, id, "", true)).unwrap();
    let w = wait(c, id, "");
    c.call::<RemoveContainer>(&ContainerRequest {
        container_id: id.into(),
    })
    .unwrap();
    (w, out, err)
}

/// Runs named checks, reporting each, and fails at the end if any failed.
struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, name: &str, f: impl FnOnce() + std::panic::UnwindSafe) {
        let t = Instant::now();
        match std::panic::catch_unwind(f) {
            Ok(()) => eprintln!("  ok   {name} ({:?})", t.elapsed()),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                eprintln!("  FAIL {name}: {msg}");
                self.0.push(format!("{name}: {msg}"));
            }
        }
    }
}

#[test]
fn guest_agent_runs_containers() {
    let mac = "52:54:00:12:34:56";
    let Some((vm, client)) = boot(
        "guest_agent_runs_containers",
        VmOptions {
            net_mac: Some(mac.into()),
            ..Default::default()
        },
    ) else {
        return;
    };
    let vm = Arc::new(vm);
    let c = Arc::new(client);
    let mut checks = Checks(Vec::new());

    checks.check("version handshake", {
        let c = c.clone();
        move || {
            let v = c.handshake().unwrap();
            assert_eq!(v.protocol, enclave_agent_protocol::PROTOCOL_VERSION);
            assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
            enclave_tests::assert_guest_kernel(&v.kernel);
        }
    });

    checks.check("echo: stdout arrives", {
        let (vm, c) = (vm.clone(), c.clone());
        move || {
            let (w, out, err) = run(&vm, &c, "echo", &["echo", "hello from the guest"]);
            assert_eq!(out, "hello from the guest\n");
            assert_eq!(err, "");
            assert_eq!((w.exit_status, w.signal), (0, 0));
        }
    });

    checks.check("exit code and stderr arrive intact", {
        let (vm, c) = (vm.clone(), c.clone());
        move || {
            let (w, out, err) = run(
                &vm,
                &c,
                "exit7",
                &["sh", "-c", "echo out; echo err >&2; exit 7"],
            );
            assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));
            assert_eq!((w.exit_status, w.signal), (7, 0));
        }
    });

    checks.check("container sees its own namespaces and hostname", {
        let (vm, c) = (vm.clone(), c.clone());
        move || {
            let (w, out, _) = run(
                &vm,
                &c,
                "ns",
                &["sh", "-c", "echo $$; hostname; ls /run 2>&1; id -u"],
            );
            assert_eq!(w.exit_status, 0);
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(
                lines[0], "1",
                "the container init is PID 1 in its namespace: {out}"
            );
            assert_eq!(lines[1], "pod");
            assert!(
                lines[2].contains("No such file"),
                "guest /run is not visible: {out}"
            );
            assert_eq!(lines[3], "0");
        }
    });

    checks.check("credentials, capabilities, rlimits, no_new_privs, read-only root", {
        let (vm, c) = (vm.clone(), c.clone());
        move || {
            let mut sp = spec(
                &["sh", "-c", "id; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; ulimit -n; touch /x 2>&1; true"],
                false,
            );
            sp["process"]["user"] = serde_json::json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20]});
            sp["process"]["rlimits"] = serde_json::json!([{"type": "RLIMIT_NOFILE", "hard": 512, "soft": 256}]);
            sp["process"]["capabilities"] = serde_json::json!({"bounding": ["CAP_NET_BIND_SERVICE", "CAP_KILL"], "effective": [], "permitted": []});
            sp["root"]["readonly"] = serde_json::json!(true);
            create(&vm, &c, "creds", sp).unwrap();
            c.call::<StartContainer>(&ContainerRequest { container_id: "creds".into() }).unwrap();
            let out = String::from_utf8(drain(&c, "creds", "", false)).unwrap();
            assert_eq!(wait(&c, "creds", "").exit_status, 0, "{out}");
            c.call::<RemoveContainer>(&ContainerRequest { container_id: "creds".into() }).unwrap();
            assert!(out.contains("uid=1000 gid=1000 groups=10,20"), "{out}");
            assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
            // CAP_KILL (5) and CAP_NET_BIND_SERVICE (10): 0x420.
            assert!(out.contains("CapBnd:\t0000000000000420"), "{out}");
            assert!(out.contains("NoNewPrivs:\t1"), "{out}");
            assert!(out.lines().any(|l| l == "256"), "{out}");
            assert!(out.contains("Read-only file system"), "{out}");
        }
    });

    checks.check("stdin reaches the process", {
        let (vm, c) = (vm.clone(), c.clone());
        move || {
            create(
                &vm,
                &c,
                "stdin",
                spec(
                    &["sh", "-c", "read line; echo got:$line; cat | wc -c"],
                    false,
                ),
            )
            .unwrap();
            c.call::<StartContainer>(&ContainerRequest {
                container_id: "stdin".into(),
            })
            .unwrap();
            let w = |data: &[u8]| {
                c.call::<WriteStdin>(&WriteStdinRequest {
                    container_id: "stdin".into(),
                    exec_id: String::new(),
                    data: data.to_vec(),
                })
                .unwrap()
            };
            assert_eq!(w(b"card-data\n").len, 10);
            assert_eq!(w(&[b'x'; 100_000]).len, 100_000);
            c.call::<CloseStdin>(&req("stdin", "")).unwrap();
            let out = String::from_utf8(drain(&c, "stdin", "", false)).unwrap();
            assert_eq!(
                out.split_whitespace().collect::<Vec<_>>(),
                ["got:card-data", "100000"]
            );
            assert_eq!(wait(&c, "stdin", "").exit_status, 0);
            c.call::<RemoveContainer>(&ContainerRequest {
                container_id: "stdin".into(),
            })
            .unwrap();
        }
    });

    checks.check("signal kills a sleeping process; exec, stats and reads do not block each other", {
        let (vm, c) = (vm.clone(), c.clone());
        move || {
            create(&vm, &c, "sleeper", spec(&["sleep", "1000"], false)).unwrap();
            let pid = c.call::<StartContainer>(&ContainerRequest { container_id: "sleeper".into() }).unwrap().pid;
            assert!(pid > 1);
            // A read that blocks (sleep prints nothing) while other requests go on.
            let c2 = c.clone();
            let pending = std::thread::spawn(move || drain(&c2, "sleeper", "", false));
            // exec into the running container: same namespaces, own process.
            let p = serde_json::json!({"args": ["sh", "-c", "echo exec:$$; cat /proc/1/cmdline; echo; hostname"], "env": ["PATH=/bin"], "cwd": "/"});
            c.call::<ExecProcess>(&ExecProcessRequest {
                container_id: "sleeper".into(),
                exec_id: "e1".into(),
                process: serde_json::to_vec(&p).unwrap(),
            })
            .unwrap();
            let out = String::from_utf8(drain(&c, "sleeper", "e1", false)).unwrap();
            // An exec with a terminal.
            let p = serde_json::json!({"terminal": true, "args": ["sh", "-c", "test -t 1 && echo exec-tty"], "env": ["PATH=/bin"], "cwd": "/"});
            c.call::<ExecProcess>(&ExecProcessRequest {
                container_id: "sleeper".into(),
                exec_id: "t1".into(),
                process: serde_json::to_vec(&p).unwrap(),
            })
            .unwrap();
            let tty_out = String::from_utf8(drain(&c, "sleeper", "t1", false)).unwrap();
            assert_eq!(tty_out, "exec-tty\r\n", "a tty turns \\n into \\r\\n");
            assert_eq!(wait(&c, "sleeper", "t1").exit_status, 0);
            let lines: Vec<&str> = out.lines().collect();
            assert!(lines[0].starts_with("exec:") && lines[0] != "exec:1", "{out}");
            assert_eq!(lines[1], "sleep\u{0}1000\u{0}", "exec sees the container's PID 1");
            assert_eq!(lines[2], "pod");
            assert_eq!(wait(&c, "sleeper", "e1").exit_status, 0);
            let s = c.call::<StatsContainer>(&ContainerRequest { container_id: "sleeper".into() }).unwrap();
            assert!(s.memory_usage_bytes > 0, "{s:?}");
            assert!(s.pids_current >= 1, "{s:?}");
            assert!(!pending.is_finished(), "stdout of a silent process is still open");
            c.call::<SignalProcess>(&SignalProcessRequest {
                container_id: "sleeper".into(),
                exec_id: String::new(),
                signal: 9,
                all: false,
            })
            .unwrap();
            let w = wait(&c, "sleeper", "");
            assert_eq!((w.exit_status, w.signal), (137, 9));
            assert!(pending.join().unwrap().is_empty());
            let again = c.call::<SignalProcess>(&SignalProcessRequest {
                container_id: "sleeper".into(),
                exec_id: String::new(),
                signal: 9,
                all: false,
            });
            assert_eq!(again.unwrap_err().code(), Some(Code::NotFound));
            c.call::<RemoveContainer>(&ContainerRequest { container_id: "sleeper".into() }).unwrap();
        }
    });

    checks.check(
        "tty: output through the terminal, resize seen by the process",
        {
            let (vm, c) = (vm.clone(), c.clone());
            move || {
                create(
                    &vm,
                    &c,
                    "tty",
                    spec(
                        &["sh", "-c", "read x; stty size; test -t 0 && echo tty"],
                        true,
                    ),
                )
                .unwrap();
                c.call::<StartContainer>(&ContainerRequest {
                    container_id: "tty".into(),
                })
                .unwrap();
                c.call::<ResizeTty>(&ResizeTtyRequest {
                    container_id: "tty".into(),
                    exec_id: String::new(),
                    rows: 33,
                    cols: 101,
                })
                .unwrap();
                c.call::<WriteStdin>(&WriteStdinRequest {
                    container_id: "tty".into(),
                    exec_id: String::new(),
                    data: b"go\n".to_vec(),
                })
                .unwrap();
                let out = String::from_utf8(drain(&c, "tty", "", false)).unwrap();
                assert!(out.contains("33 101"), "{out:?}");
                assert!(out.contains("tty"), "{out:?}");
                assert_eq!(wait(&c, "tty", "").exit_status, 0);
                c.call::<RemoveContainer>(&ContainerRequest {
                    container_id: "tty".into(),
                })
                .unwrap();
            }
        },
    );

    checks.check("bad requests get clear errors", {
        let (vm, c) = (vm.clone(), c.clone());
        move || {
            let e = create(
                &vm,
                &c,
                "bad1",
                serde_json::json!({"process": {"args": []}}),
            )
            .unwrap_err();
            assert_eq!(e.code(), Some(Code::InvalidArgument));
            assert!(e.to_string().contains("process.args"), "{e}");
            let e = c
                .call::<CreateContainer>(&CreateContainerRequest {
                    container_id: "x".into(),
                    oci_spec: b"{}".to_vec(),
                    rootfs: "../../etc".into(),
                })
                .unwrap_err();
            assert!(e.to_string().contains("rootfs"), "{e}");
            let e = create(&vm, &c, "bad2", spec(&["no-such-program"], false)).map(|_| ());
            assert!(e.is_ok(), "{e:?}");
            let e = c
                .call::<StartContainer>(&ContainerRequest {
                    container_id: "bad2".into(),
                })
                .unwrap_err();
            assert!(e.to_string().contains("no-such-program"), "{e}");
            c.call::<RemoveContainer>(&ContainerRequest {
                container_id: "bad2".into(),
            })
            .unwrap();
            let e = c.call::<WaitProcess>(&req("nope", "")).unwrap_err();
            assert_eq!(e.code(), Some(Code::NotFound));
        }
    });

    checks.check("garbage gets an error and the agent keeps serving", {
        let (vm, c) = (vm.clone(), c.clone());
        move || {
            use std::io::{Read, Write};
            let mut raw = vm.connect_raw(Duration::from_secs(10)).unwrap();
            raw.write_all(b"\x00\x00\x00\x05\x00\x00\x00\x01\x01\x00\xff\xfe\xfd\xfc\xfb")
                .unwrap();
            let (_, payload) = enclave_agent_protocol::frame::read_frame(&mut raw)
                .map_err(|_| "read")
                .unwrap();
            use prost::Message;
            let r = enclave_agent_protocol::frame::Response::decode(&payload[..]).unwrap();
            assert_eq!(r.status.unwrap().code(), Code::InvalidArgument);
            raw.write_all(&[0xff; 64]).unwrap();
            let mut rest = Vec::new();
            let _ = raw.read_to_end(&mut rest);
            // The agent is still there, on this connection and on new ones.
            c.handshake().unwrap();
            vm.connect(Duration::from_secs(10)).unwrap();
        }
    });

    checks.check("network configured from the request", {
        let (vm, c) = (vm.clone(), c.clone());
        move || {
            c.call::<ConfigureNetwork>(&ConfigureNetworkRequest {
                interfaces: vec![Interface {
                    mac: mac.to_uppercase(),
                    name: "eth0".into(),
                    mtu: 1400,
                    addresses: vec!["10.1.0.5/24".into(), "fd00:1::5/64".into()],
                }],
                routes: vec![Route {
                    destination: "default".into(),
                    gateway: "10.1.0.1".into(),
                    device_mac: mac.into(),
                }],
                dns: Some(Dns {
                    nameservers: vec!["10.1.0.10".into()],
                    searches: vec!["pci.svc".into()],
                    options: vec![],
                }),
            })
            .unwrap();
            let (w, out, err) = run(&vm, &c, "net", &["sh", "-c", "ip addr show eth0; ip route"]);
            assert_eq!(w.exit_status, 0, "{err}");
            assert!(out.contains("mtu 1400"), "{out}");
            assert!(out.contains("inet 10.1.0.5/24"), "{out}");
            assert!(out.contains("inet6 fd00:1::5/64"), "{out}");
            assert!(out.contains("default via 10.1.0.1 dev eth0"), "{out}");
            let e = c
                .call::<ConfigureNetwork>(&ConfigureNetworkRequest {
                    interfaces: vec![Interface {
                        mac: "02:00:00:00:00:99".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .unwrap_err();
            assert!(e.to_string().contains("interfaces[0].mac"), "{e}");
        }
    });

    if !checks.0.is_empty() {
        panic!(
            "{} check(s) failed:\n{}\n{}",
            checks.0.len(),
            checks.0.join("\n"),
            vm.logs()
        );
    }
}

#[test]
fn guest_shutdown_powers_off() {
    let Some((mut vm, client)) = boot("guest_shutdown_powers_off", VmOptions::default()) else {
        return;
    };
    create(&vm, &client, "s", spec(&["sleep", "1000"], false)).unwrap();
    client
        .call::<StartContainer>(&ContainerRequest {
            container_id: "s".into(),
        })
        .unwrap();
    client.call::<Shutdown>(&Empty {}).unwrap();
    let st = vm.wait_qemu(Duration::from_secs(60));
    assert!(
        st.is_some(),
        "QEMU still running 60 s after Shutdown\n{}",
        vm.logs()
    );
}
